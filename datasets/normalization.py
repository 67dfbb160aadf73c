"""Normalisation constants per usage info (docs/method.md) and the one uint8 -> model-input conversion."""
import torch

IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
NORMALIZATION = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)),
    "stl10": ((0.44087798, 0.42790666, 0.38678814), (0.25507198, 0.24801506, 0.25641308)),
    "imagenet": IMAGENET,
    "CLIP": IMAGENET,  # the paper's detection code normalised CLIP inputs with ImageNet constants
    "moco": IMAGENET,
}
CLIP_NORMALIZATION = ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))
# the original downstream evaluation (BadEncoder's test transforms): CLIP encoders with CLIP's constants,
# ImageNet encoders on raw [0,1] inputs (ToTensor only); the others as in detection
EVALUATION_NORMALIZATION = {**NORMALIZATION, "CLIP": CLIP_NORMALIZATION,
                            "imagenet": ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0))}


def normalize(x: torch.Tensor, mean, std) -> torch.Tensor:
    """float (N,3,H,W) in [0,1] -> normalised, in one broadcast expression."""
    mean = torch.as_tensor(mean, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    std = torch.as_tensor(std, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


def to_model_input(x_hwc: torch.Tensor, mean, std, dtype=torch.float32) -> torch.Tensor:
    """Pixels (N,H,W,3) in [0,255] (uint8 or float) -> normalised float (N,3,H,W)."""
    x = x_hwc.to(dtype).permute(0, 3, 1, 2) / 255.0
    # contiguous NCHW: torch 2.15's CPU conv backward crashes on the permuted (channels-last) strides
    return normalize(x, mean, std).contiguous()
