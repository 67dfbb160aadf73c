"""SimCLR augmentations on a whole batch at once, on the batch's device (no per-image Python loop).

Each image draws its own crop box, flip, jitter factors, jitter order and grayscale coin, as torchvision's
per-image transforms do; the random numbers come from a CPU generator so a seed gives the same draws on
every device.
"""
from dataclasses import dataclass

import torch
from torchvision.ops import roi_align

GRAY_WEIGHTS = (0.2989, 0.587, 0.114)  # torchvision's rgb_to_grayscale


@dataclass(frozen=True)
class AugmentConfig:
    """torchvision's RandomResizedCrop, RandomHorizontalFlip, RandomApply(ColorJitter), RandomGrayscale."""
    crop: bool = True
    scale: tuple = (0.08, 1.0)
    ratio: tuple = (3 / 4, 4 / 3)
    flip: float = 0.5
    jitter: float = 0.8                        # probability of applying the colour jitter
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.4
    hue: float = 0.1
    grayscale: float = 0.2


SIMCLR = AugmentConfig()                                         # BadEncoder's pre-training transform
REFERENCE = AugmentConfig(crop=False)                            # BadEncoder's finetune transform (L1 views)
CLIP_TEXT = AugmentConfig(scale=(0.2, 1.0), jitter=0.0, grayscale=0.0)  # the text-target attack's crop + flip


def to_float_chw(x: torch.Tensor) -> torch.Tensor:
    """uint8 (N,H,W,3) in [0,255] -> float (N,3,H,W) in [0,1]; float (N,3,H,W) passes through."""
    if x.dtype == torch.uint8:
        return x.permute(0, 3, 1, 2).float() / 255.0
    if x.ndim != 4 or x.shape[1] != 3:
        raise ValueError(f"float images must be (N,3,H,W) in [0,1], got {tuple(x.shape)}")
    return x


def crop_boxes(n: int, height: int, width: int, scale, ratio, generator: torch.Generator) -> torch.Tensor:
    """RandomResizedCrop.get_params for n images at once: float (n,4) boxes x1,y1,x2,y2 in pixels."""
    attempts = 10
    area = height * width
    target = area * torch.empty(n, attempts).uniform_(scale[0], scale[1], generator=generator)
    log_ratio = torch.log(torch.tensor(ratio, dtype=torch.float64))
    aspect = torch.exp(torch.empty(n, attempts, dtype=torch.float64).uniform_(
        float(log_ratio[0]), float(log_ratio[1]), generator=generator))
    w = torch.round(torch.sqrt(target * aspect)).long()
    h = torch.round(torch.sqrt(target / aspect)).long()
    ok = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    # the first attempt that fits, as torchvision's loop takes; none fits -> torchvision's central fallback
    first = torch.where(ok.any(1), ok.float().argmax(1), torch.full((n,), -1))
    in_ratio = width / height
    if in_ratio < min(ratio):
        fw, fh = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        fw, fh = int(round(height * max(ratio))), height
    else:
        fw, fh = width, height
    rows = torch.arange(n)
    pick = first.clamp(min=0)
    w = torch.where(first >= 0, w[rows, pick], torch.full((n,), fw))
    h = torch.where(first >= 0, h[rows, pick], torch.full((n,), fh))
    u = torch.rand(n, 2, generator=generator)
    top = torch.where(first >= 0, (u[:, 0] * (height - h + 1)).floor().long(), torch.full((n,), (height - fh) // 2))
    left = torch.where(first >= 0, (u[:, 1] * (width - w + 1)).floor().long(), torch.full((n,), (width - fw) // 2))
    return torch.stack([left, top, left + w, top + h], dim=1).float()


def resized_crop(x: torch.Tensor, boxes: torch.Tensor, size: int) -> torch.Tensor:
    """Crop each float (N,3,H,W) image to its box (N,4) and resize to size x size (area-averaged bilinear)."""
    index = torch.arange(len(x), dtype=x.dtype, device=x.device).unsqueeze(1)
    rois = torch.cat([index, boxes.to(device=x.device, dtype=x.dtype)], dim=1)
    # aligned=True: box [j, j+w) covers exactly pixels j..j+w-1; adaptive sampling averages when shrinking
    return roi_align(x, rois, output_size=(size, size), spatial_scale=1.0, sampling_ratio=-1, aligned=True)


def grayscale(x: torch.Tensor) -> torch.Tensor:
    """float (N,3,H,W) -> luminance (N,1,H,W)."""
    r, g, b = x.unbind(1)
    return (GRAY_WEIGHTS[0] * r + GRAY_WEIGHTS[1] * g + GRAY_WEIGHTS[2] * b).unsqueeze(1)


def _rgb_to_hsv(x: torch.Tensor) -> torch.Tensor:
    r, g, b = x.unbind(1)
    maxc, minc = x.max(1).values, x.min(1).values
    eqc = maxc == minc
    cr = maxc - minc
    ones = torch.ones_like(maxc)
    s = cr / torch.where(eqc, ones, maxc)
    crd = torch.where(eqc, ones, cr)
    rc, gc, bc = (maxc - r) / crd, (maxc - g) / crd, (maxc - b) / crd
    h = ((maxc == r) * (bc - gc) + ((maxc == g) & (maxc != r)) * (2.0 + rc - bc)
         + ((maxc != g) & (maxc != r)) * (4.0 + gc - rc))
    return torch.stack((torch.fmod(h / 6.0 + 1.0, 1.0), s, maxc), dim=1)


def _hsv_to_rgb(x: torch.Tensor) -> torch.Tensor:
    # closed form of the sector table torchvision uses: channel = v - v*s*clamp(min(k, 4-k), 0, 1)
    h, s, v = x.unbind(1)
    n = torch.tensor((5.0, 3.0, 1.0), device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    k = torch.remainder(n + 6.0 * h.unsqueeze(1), 6.0)
    return v.unsqueeze(1) * (1 - s.unsqueeze(1) * torch.minimum(k, 4 - k).clamp(0, 1))


def _brightness(x, f):
    return (x * f).clamp(0, 1)


def _contrast(x, f):
    mean = grayscale(x).mean(dim=(1, 2, 3), keepdim=True)
    return (f * x + (1 - f) * mean).clamp(0, 1)


def _saturation(x, f):
    return (f * x + (1 - f) * grayscale(x)).clamp(0, 1)


def _hue(x, f):
    hsv = _rgb_to_hsv(x)
    h = torch.remainder(hsv[:, 0] + f.view(-1, 1, 1), 1.0)
    return _hsv_to_rgb(torch.stack((h, hsv[:, 1], hsv[:, 2]), dim=1))


def color_jitter(x: torch.Tensor, cfg: AugmentConfig, generator: torch.Generator) -> torch.Tensor:
    """ColorJitter with probability cfg.jitter per image, each image with its own factors and op order."""
    n = len(x)
    applied = torch.rand(n, generator=generator) < cfg.jitter
    factors = torch.stack([
        torch.empty(n).uniform_(max(0.0, 1 - cfg.brightness), 1 + cfg.brightness, generator=generator),
        torch.empty(n).uniform_(max(0.0, 1 - cfg.contrast), 1 + cfg.contrast, generator=generator),
        torch.empty(n).uniform_(max(0.0, 1 - cfg.saturation), 1 + cfg.saturation, generator=generator),
        torch.empty(n).uniform_(-cfg.hue, cfg.hue, generator=generator)], dim=1)
    order = torch.argsort(torch.rand(n, 4, generator=generator), dim=1)
    enabled = torch.tensor([cfg.brightness > 0, cfg.contrast > 0, cfg.saturation > 0, cfg.hue > 0])
    ops = (_brightness, _contrast, _saturation, _hue)
    x = x.clone()
    factors = factors.to(x.device, x.dtype)
    for slot in range(4):  # each image applies the op its permutation puts in this slot
        for op_id, op in enumerate(ops):
            sel = (applied & (order[:, slot] == op_id)) & enabled[op_id]
            if sel.any():
                idx = sel.nonzero().squeeze(1).to(x.device)
                f = factors[idx, op_id]
                f = f if op_id == 3 else f.view(-1, 1, 1, 1)
                x[idx] = op(x[idx], f)
    return x


def augment(x: torch.Tensor, size: int | None = None, cfg: AugmentConfig = SIMCLR,
            generator: torch.Generator | None = None) -> torch.Tensor:
    """Augmented views of a batch: uint8 (N,H,W,3) or float (N,3,H,W) in [0,1] -> float (N,3,size,size) in [0,1].

    Not normalised: follow with datasets.normalize. Without crop, `size` must equal the input size.
    """
    generator = generator if generator is not None else torch.Generator().manual_seed(
        int(torch.randint(0, 2 ** 62, (1,))))
    x = to_float_chw(x)
    n, _, height, width = x.shape
    size = size or height
    if cfg.crop:
        x = resized_crop(x, crop_boxes(n, height, width, cfg.scale, cfg.ratio, generator), size)
    elif size != height or size != width:
        raise ValueError(f"augment without crop keeps the {height}x{width} size; asked for {size}")
    if cfg.flip > 0:
        flip = (torch.rand(n, generator=generator) < cfg.flip).to(x.device).view(-1, 1, 1, 1)
        x = torch.where(flip, x.flip(-1), x)
    if cfg.jitter > 0:
        x = color_jitter(x, cfg, generator)
    if cfg.grayscale > 0:
        gray = (torch.rand(n, generator=generator) < cfg.grayscale).to(x.device).view(-1, 1, 1, 1)
        x = torch.where(gray, grayscale(x).expand_as(x), x)
    return x


def simclr_augment(x: torch.Tensor, size: int | None = None, generator: torch.Generator | None = None):
    """SimCLR's pre-training augmentation (crop, flip, jitter 0.4/0.4/0.4/0.1 p=0.8, grayscale p=0.2)."""
    return augment(x, size, SIMCLR, generator)


def reference_augment(x: torch.Tensor, generator: torch.Generator | None = None):
    """BadEncoder's view of a reference input for L1: flip, jitter, grayscale, no crop."""
    return augment(x, None, REFERENCE, generator)


__all__ = ["AugmentConfig", "SIMCLR", "REFERENCE", "CLIP_TEXT", "augment", "simclr_augment", "reference_augment",
           "crop_boxes", "resized_crop", "color_jitter", "grayscale", "to_float_chw"]
