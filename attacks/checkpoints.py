"""Checkpoint writers in the layouts users already have (docs/method.md), atomic and weights_only-loadable.

Two formats: `torch` ({'epoch', 'state_dict', 'optimizer'} by torch.save, as BadEncoder) and `safetensors`
(tensors only, which cannot carry code; the epoch and any hub config go in its string metadata, the optimizer
state is not kept). An encoder loaded from a model hub is saved in its library's key layout with its config
embedded, so the file loads again with --encoder_usage_info <family> and no folder.
"""
from pathlib import Path

import torch

from common.io import write_torch
from models import export_state_dict, hub_config_of, save_safetensors
from models.formats import CONFIG_METADATA_KEY

SAVE_FORMATS = {"torch": ".pth", "safetensors": ".safetensors"}


def _cpu(obj):
    """Tensors to CPU, recursively, so files load anywhere; dicts/lists/scalars pass through unchanged."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_cpu(v) for v in obj)
    return obj


def encoder_checkpoint(epoch: int, state_dict: dict, optimizer: torch.optim.Optimizer | None = None) -> dict:
    """{'epoch', 'state_dict', 'optimizer'} as BadEncoder saves it; plain tensors and python scalars only."""
    return {"epoch": epoch, "state_dict": _cpu(state_dict),
            "optimizer": _cpu(optimizer.state_dict()) if optimizer is not None else {}}


def checkpoint_path(folder, stem: str, save_format: str = "torch") -> Path:
    """folder/<stem>.pth or .safetensors."""
    if save_format not in SAVE_FORMATS:
        raise ValueError(f"--save_format {save_format!r}: choose one of {', '.join(SAVE_FORMATS)}")
    return Path(folder) / f"{stem}{SAVE_FORMATS[save_format]}"


def save_encoder(path, epoch: int, encoder: torch.nn.Module, optimizer=None, extra_tensors=None,
                 save_format: str = "torch") -> Path:
    """A (backdoored) encoder: its own state dict (f.0.weight..., conv1.weight..., or its hub library's keys), plus
    `extra_tensors` (an ImageNet ResNet's unused fc.*, so the original code loads it strictly)."""
    hub_config = hub_config_of(encoder)
    state = {**export_state_dict(encoder), **(extra_tensors or {})}
    if save_format == "safetensors":
        metadata = {"epoch": str(epoch), **({CONFIG_METADATA_KEY: hub_config} if hub_config else {})}
        save_safetensors(path, state, metadata)
    else:
        checkpoint = encoder_checkpoint(epoch, state, optimizer)
        if hub_config:
            checkpoint[CONFIG_METADATA_KEY] = hub_config
        write_torch(path, checkpoint)
    return Path(path)


def save_pretrained(results_dir, epoch: int, model, optimizer=None, save_format: str = "torch") -> tuple[Path, Path]:
    """A pre-trained SimCLR model twice: full (f.f.*, g.*) as model_<epoch>, backbone (f.*) as backbone_<epoch>.

    In the torch format the backbone file ends in .pt so that sweeps globbing **/*.pth count each clean
    encoder once.
    """
    full = save_encoder(checkpoint_path(results_dir, f"model_{epoch}", save_format), epoch, model, optimizer,
                        save_format=save_format)
    backbone = checkpoint_path(results_dir, f"backbone_{epoch}", save_format)
    if save_format == "torch":
        backbone = backbone.with_suffix(".pt")
    return full, save_encoder(backbone, epoch, model.f, optimizer, save_format=save_format)
