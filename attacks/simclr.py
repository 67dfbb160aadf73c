"""Clean SimCLR pre-training (BadEncoder's pretraining_encoder.py): NT-Xent on two augmented views."""
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm import tqdm

from datasets import normalize
from models import SimCLR

from .augment import simclr_augment
from .training import descend, images_on, seed_all, shuffled_batches


@dataclass
class PretrainConfig:
    """BadEncoder's pre-training hyper-parameters (Adam, batch 256: its code's default; temperature 0.5)."""
    epochs: int = 1000
    batch_size: int = 256
    lr: float = 1e-3
    weight_decay: float = 1e-6
    temperature: float = 0.5
    seed: int = 100


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float = 0.5) -> torch.Tensor:
    """NT-Xent of two views' projections (B,D) (normalised here): mean over the 2B anchors of
    -log(exp(s_pos / t) / sum over the 2B-1 other samples of exp(s / t))."""
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    n = len(z1)
    logits = z @ z.t() / temperature
    logits = logits.masked_fill(torch.eye(2 * n, dtype=torch.bool, device=z.device), float("-inf"))
    positive = torch.cat([torch.arange(n, 2 * n), torch.arange(n)]).to(z.device)  # view i pairs with i +- n
    return F.cross_entropy(logits, positive)


def pretrain_simclr(model: SimCLR, images, mean, std, cfg: PretrainConfig, device, progress: bool = True,
                    on_epoch=None) -> list[dict]:
    """Train `model` in place on uint8 (N,H,W,3) images; returns per-epoch history [{'epoch', 'loss'}].

    on_epoch(epoch, model, optimizer, record) is called after each epoch (checkpointing).
    """
    generator = seed_all(cfg.seed)
    x_all = images_on(images, device)
    model.to(device).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    history = []
    for epoch in tqdm(range(1, cfg.epochs + 1), desc="pre-training", disable=not progress):
        total = 0.0  # summed on the device: one host sync an epoch
        batches = shuffled_batches(len(x_all), cfg.batch_size, generator)
        for idx in batches:
            x = x_all[idx.to(device)]
            # each view through the model on its own: BatchNorm statistics per view, as the paper's loop
            _, z1 = model(normalize(simclr_augment(x, generator=generator), mean, std))
            _, z2 = model(normalize(simclr_augment(x, generator=generator), mean, std))
            loss = nt_xent(z1, z2, cfg.temperature)
            total += descend(optimizer, loss)
        record = {"epoch": epoch, "loss": float(total) / len(batches)}
        history.append(record)
        if on_epoch is not None:
            on_epoch(epoch, model, optimizer, record)
    return history
