"""Checkpoint writers in the layouts users already have (SPEC 3/5), atomic and weights_only-loadable."""
from pathlib import Path

import torch

from common.io import write_torch


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


def save_encoder(path, epoch: int, encoder: torch.nn.Module, optimizer=None, extra_tensors=None) -> Path:
    """A backdoored encoder: the backbone's (f.0.weight...) or visual tower's (conv1.weight...) own state dict,
    plus `extra_tensors` (an ImageNet ResNet's unused fc.*, so the original code loads it strictly)."""
    write_torch(path, encoder_checkpoint(epoch, {**encoder.state_dict(), **(extra_tensors or {})}, optimizer))
    return Path(path)


def save_pretrained(results_dir, epoch: int, model, optimizer=None) -> tuple[Path, Path]:
    """A pre-trained SimCLR model twice: full (f.f.*, g.*) as model_<epoch>.pth, backbone (f.*) as backbone_<epoch>.pt.

    The backbone file ends in .pt so that sweeps globbing **/*.pth count each clean encoder once.
    """
    results_dir = Path(results_dir)
    full = results_dir / f"model_{epoch}.pth"
    write_torch(full, encoder_checkpoint(epoch, model.state_dict(), optimizer))
    return full, save_encoder(results_dir / f"backbone_{epoch}.pt", epoch, model.f)
