"""--arch from the checkpoint: a SimCLR ResNet's depth and width, CLIP's RN50 vs ViT-B/32, from keys and shapes.

Only unambiguous cases are named; anything else says what the checkpoint holds and asks for --arch.
"""
import re

from .checkpoint import CheckpointError, adapt_state_dict

# blocks per stage and block type -> torchvision depth (SimCLR backbones keep torchvision's stages)
RESNET_DEPTHS = {((2, 2, 2, 2), "basic"): "resnet18", ((3, 4, 6, 3), "basic"): "resnet34",
                 ((3, 4, 6, 3), "bottleneck"): "resnet50"}
# SimCLR backbone: f.0 conv1, f.1 bn1, f.2 relu, f.3..f.6 layer1..layer4 (no maxpool, no fc)
SIMCLR_STAGES = (3, 4, 5, 6)


def _blocks(sd: dict, stage_prefix: str) -> int:
    pattern = re.compile(re.escape(stage_prefix) + r"(\d+)\.")
    return len({m.group(1) for k in sd for m in [pattern.match(k)] if m})


def infer_simclr_arch(sd: dict, path) -> tuple[str, str] | None:
    """(arch, why) for a SimCLR backbone state dict, None if it is not in the SimCLR layout."""
    stem = sd.get("f.0.weight")
    if stem is None or stem.ndim != 4:
        return None
    blocks = tuple(_blocks(sd, f"f.{i}.") for i in SIMCLR_STAGES)
    kind = "bottleneck" if "f.3.0.conv3.weight" in sd else "basic"
    width = int(stem.shape[0])
    depth = RESNET_DEPTHS.get((blocks, kind))
    why = f"stem {width} channels, {kind} blocks {'-'.join(map(str, blocks))} per stage"
    if depth == "resnet18" and width != 64:
        return f"resnet18_w{width}", why
    if depth is None or width != 64:
        raise CheckpointError(f"{path}: cannot infer the SimCLR backbone ({why}); pass --arch "
                              "(resnet18/34/50 or resnet18_wN) or register your architecture with --arch_module")
    return depth, why


def infer_clip_arch(sd: dict, path) -> tuple[str, str] | None:
    """(arch, why) for a CLIP visual tower (open_clip/OpenAI keys, 'visual.' stripped), None if not CLIP."""
    conv1 = sd.get("conv1.weight")
    if conv1 is None or conv1.ndim != 4:
        return None
    if "class_embedding" in sd:  # a ViT: conv1 is the patch embedding (width, 3, patch, patch)
        width, patch, layers = int(conv1.shape[0]), int(conv1.shape[-1]), _blocks(sd, "transformer.resblocks.")
        why = f"ViT, width {width}, patch {patch}, {layers} layers"
        if (width, patch, layers) == (768, 32, 12):
            return "ViT-B/32", why
        raise CheckpointError(f"{path}: a CLIP {why} is not ViT-B/32; use --encoder_usage_info open_clip "
                              f"--arch <its open_clip name, e.g. ViT-B-{patch}>")
    blocks = tuple(_blocks(sd, f"layer{i}.") for i in range(1, 5))
    why = f"ModifiedResNet, stem {int(conv1.shape[0])} channels, blocks {'-'.join(map(str, blocks))}"
    if blocks == (3, 4, 6, 3) and conv1.shape[0] == 32:
        return "RN50", why
    raise CheckpointError(f"{path}: a CLIP {why} is not RN50; use --encoder_usage_info open_clip "
                          "--arch <its open_clip name, e.g. RN101>")


def infer_arch(sd: dict, usage_info: str, path) -> tuple[str | None, str]:
    """(arch, what it was inferred from) for cifar10/stl10 (SimCLR) and CLIP checkpoints; (None, '') otherwise."""
    if usage_info in ("cifar10", "stl10"):
        found = infer_simclr_arch(adapt_state_dict(sd, "simclr"), path)
    elif usage_info == "CLIP":
        found = infer_clip_arch(adapt_state_dict(sd, "clip"), path)
    else:
        found = None
    return found if found else (None, "")
