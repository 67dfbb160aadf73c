"""Pieces every attack's training loop shares: seeding, data on the device, batches, frozen BatchNorm."""
import copy
import random

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from datasets import to_model_input
from models import check_finite


class TrainingError(ValueError):
    """Training cannot go on: its loss became NaN/inf. The message says what to change."""


def seed_all(seed: int) -> torch.Generator:
    """Seed python, numpy and torch; returns a CPU generator for the loop's own draws (shuffles, augmentations)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def images_on(images, device) -> torch.Tensor:
    """uint8 (N,H,W,3) numpy or tensor -> one uint8 tensor on `device` (the whole dataset stays there)."""
    x = torch.from_numpy(np.ascontiguousarray(images)) if isinstance(images, np.ndarray) else images
    if x.dtype != torch.uint8 or x.ndim != 4 or x.shape[-1] != 3:
        raise ValueError(f"images must be uint8 (N,H,W,3), got {x.dtype} {tuple(x.shape)}")
    return x.to(device)


def check_batch_size(n: int, batch_size: int, what: str = "training images") -> None:
    """Training drops the last partial batch: fewer images than one batch would train on nothing."""
    if n < batch_size:
        raise ValueError(f"{n} {what} are fewer than one batch of {batch_size}; lower --batch_size")


def shuffled_batches(n: int, batch_size: int, generator: torch.Generator) -> list[torch.Tensor]:
    """One epoch of shuffled index batches; the last partial batch is dropped (drop_last, as the papers)."""
    check_batch_size(n, batch_size)
    order = torch.randperm(n, generator=generator)
    return list(order[: n - n % batch_size].split(batch_size))


def frozen_batchnorm_copy(encoder: nn.Module) -> nn.Module:
    """A trainable copy of `encoder` whose BatchNorm layers stay in eval mode with frozen affine parameters."""
    student = copy.deepcopy(encoder).train()
    for p in student.parameters():
        p.requires_grad_(True)
    for module in student.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.eval()
            for p in module.parameters(recurse=False):
                p.requires_grad_(False)
    return student


def freeze(model: nn.Module) -> nn.Module:
    """Eval mode, no gradients: the clean reference encoder f0."""
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


@torch.no_grad()
def unit_embeddings(encoder: nn.Module, images: torch.Tensor, mean, std, batch_size: int = 256) -> torch.Tensor:
    """L2-normalised embeddings of uint8 (N,H,W,3) images on their device: float32 (N,D)."""
    return check_finite(torch.cat([F.normalize(encoder(to_model_input(images[i:i + batch_size], mean, std)).float(),
                                               dim=1) for i in range(0, len(images), batch_size)]))


def sgd(params, lr: float, momentum: float, weight_decay: float) -> torch.optim.SGD:
    """SGD over the parameters that require gradients (frozen BatchNorm affines are left out)."""
    return torch.optim.SGD([p for p in params if p.requires_grad], lr=lr, momentum=momentum,
                           weight_decay=weight_decay)


def descend(optimizer: torch.optim.Optimizer, loss: torch.Tensor) -> torch.Tensor:
    """One optimisation step on `loss`; returns it detached, still on the device (no host sync)."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.detach()
