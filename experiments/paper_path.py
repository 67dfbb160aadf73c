"""The paper's main.py for DECREE, re-implemented as a yardstick for scripts/benchmark.py and the parity tests.

Same method as `decree.inversion.invert_trigger` (loss, adaptive lambda, best tracking, early stop), but the draws,
the data path and the reductions are main.py's own, rebuilt here without the project's draw, order or cosine code:
- draws: torch.manual_seed(seed), then the model main.py builds for the encoder (its initial weights are
  overwritten by the checkpoint, but drawing them moves the global stream), then the mask torch.rand((H,W),
  float64) and the pattern torch.rand_like on an (H,W,3) array in float64 (`orc` draws the pattern only), a
  shuffling DataLoader, and the unused torch.rand([1, 512], float64); every epoch's order is the DataLoader's own.
- data path: a DataLoader over uint8 HWC numpy images (pinned on CUDA), a host->device copy of every batch, the
  mask repeated to (H,W,3) before the float64 trigger math, and a Python loop over the batch that divides by 255,
  permutes to CHW and applies torchvision's `Normalize` image by image, for the clean batch as well as the stamped
  one (main.py normalised both and fed only the stamped one to the encoder), then
  `torch.stack(...).to(float).to(device)`.
- reductions: the mean pairwise cosine as main.py's compute_self_cos_sim (mm, masked_select of the off-diagonal,
  mean), `torch.abs(cos) > thres` on the float32 tensor, and each epoch's means as torch.mean of the stacked steps.
With the paper's settings the project's run is this one bit for bit (tests/test_benchmark.py,
tests/test_paper_draws.py).

Left out on purpose, so the yardstick errs in the paper's favour: main.py's `assert_range` checks (three
min/max host syncs a step, diagnostics only) and its encoder weight gradients (main.py never froze the
encoder, so every backward also computed and accumulated gradients of all its weights).
Not used for detection: the project's vectorised path is the one to run.
"""
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms

from models.simclr import _narrow_resnet18, narrow_width
from decree.inversion import (EPS, BestTrigger, InversionError, InversionResult, LambdaSchedule, final_result,
                              learning_rate, seed_everything)
from decree.settings import InversionConfig


class ShadowImages(Dataset):
    """The paper's in-memory dataset (CIFAR10Mem without transform): item = (uint8 HWC numpy image, label); the
    label, which main.py ignores, is the image's index here, so the order a loader gave can be read back."""

    def __init__(self, images: np.ndarray):
        self.images = images

    def __len__(self):
        return len(self.images)

    def __getitem__(self, index):
        return self.images[index], index


def _bad_encoder_simclr(arch: str) -> nn.Module:
    """BadEncoder's SimCLR as it builds it: torchvision's ResNet, its first conv replaced by a 3x3 one while its
    children are collected (fc and maxpool left out), then the projection head. A narrow resnet18_wN (not in the
    paper) takes the project's narrow ResNet18 in torchvision's place."""
    from torchvision.models import resnet
    width = narrow_width(arch)
    net = _narrow_resnet18(width) if width else getattr(resnet, arch)()
    width = width or 64
    backbone = [nn.Conv2d(3, width, kernel_size=3, stride=1, padding=1, bias=False) if name == "conv1" else module
                for name, module in net.named_children() if not isinstance(module, (nn.Linear, nn.MaxPool2d))]
    head = [nn.Linear(2048 if arch == "resnet50" else 8 * width, 512, bias=False), nn.BatchNorm1d(512),
            nn.ReLU(inplace=True), nn.Linear(512, 128, bias=True)]
    return nn.Sequential(nn.Sequential(*backbone), nn.Sequential(*head))


def _openai_rn50_visual() -> nn.Module:
    """The paper's CLIP class: OpenAI's ModifiedResNet RN50 (3-conv stem, [3, 4, 6, 3] bottlenecks, attention pool
    to 1024), constructed module by module and not initialised further."""
    from open_clip.modified_resnet import AttentionPool2d, Bottleneck
    stem = [nn.Conv2d(3, 32, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(32),
            nn.Conv2d(32, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32),
            nn.Conv2d(32, 64, 3, padding=1, bias=False), nn.BatchNorm2d(64)]
    blocks, inplanes = [], 64
    for stage, (planes, count) in enumerate(zip((64, 128, 256, 512), (3, 4, 6, 3))):
        for i in range(count):
            blocks.append(Bottleneck(inplanes, planes, 2 if stage > 0 and i == 0 else 1))
            inplanes = planes * Bottleneck.expansion
    return nn.Sequential(*stem, *blocks, AttentionPool2d(224 // 32, 2048, 32, 1024))


def papers_encoder(usage_info: str, arch: str) -> nn.Module:
    """The model main.py builds (randomly initialised) for an encoder of this usage info and arch."""
    from torchvision import models
    if usage_info in ("cifar10", "stl10") and (arch in ("resnet18", "resnet34", "resnet50") or narrow_width(arch)):
        return _bad_encoder_simclr(arch)
    if (usage_info, arch) in (("imagenet", "resnet50"), ("moco", "resnet18")):
        return getattr(models, arch)()
    if (usage_info, arch) == ("CLIP", "RN50"):
        return _openai_rn50_visual()
    raise ValueError(f"the paper's main.py cannot build a {usage_info} {arch} encoder")


def papers_start(seed: int, paper_encoder: tuple[str, str], shadow: np.ndarray, batch_size: int, mask_init: str,
                 orc_square: tuple, device):
    """main.py up to its first epoch: (mask float64 (S,S), pattern float64 (S,S,3), both in [0,1] on device; the
    shuffling DataLoader)."""
    torch.manual_seed(seed)
    papers_encoder(*paper_encoder)
    size = shadow.shape[1]
    if mask_init == "orc":
        top, side = orc_square
        mask = np.zeros((size, size)) + EPS
        mask[top:top + side, top:top + side] = 1.0
        mask0 = torch.tensor(mask, dtype=torch.float64).to(device)
    else:
        mask0 = torch.rand((size, size), dtype=torch.float64).to(device)
    pattern01 = torch.rand_like(torch.zeros(size, size, 3), dtype=torch.float64).to(device)
    loader = DataLoader(ShadowImages(shadow), batch_size=batch_size, shuffle=True,
                        pin_memory=torch.device(device).type == "cuda")
    torch.rand([1, 512], dtype=torch.float64)  # main.py's unused projection
    return mask0, pattern01, loader


def self_cos_sim(embeddings: torch.Tensor) -> torch.Tensor:
    """main.py's compute_self_cos_sim: mean of the off-diagonal cosine similarities of (B,D) embeddings."""
    b = embeddings.shape[0]
    e = F.normalize(embeddings, dim=-1)
    sim = torch.mm(e, e.t())
    off_diagonal = (torch.ones_like(sim) - torch.eye(b, device=sim.device)).bool()
    return torch.mean(sim.masked_select(off_diagonal).view(b, -1))


def normalize_each(images: torch.Tensor, normalize) -> torch.Tensor:
    """main.py's loop: pixels (B,H,W,3) -> stack of normalize(image.permute(2,0,1) / 255), one image at a time."""
    return torch.stack([normalize(images[i].permute(2, 0, 1) / 255.0) for i in range(images.shape[0])])


def paper_invert_trigger(encoder: torch.nn.Module, shadow, mean, std, cfg: InversionConfig = None,
                         device="cpu", on_epoch=None, *, paper_encoder: tuple[str, str]) -> InversionResult:
    """DECREE as main.py runs it; encoder: normalised float (N,3,S,S) -> (N,D); shadow uint8 (N,S,S,3).

    `paper_encoder`: (usage info, arch) of the model whose construction main.py's draws follow (papers_encoder).
    `on_epoch(record, best)` is called after every epoch, as in `invert_trigger`.
    """
    cfg = cfg or InversionConfig()
    if cfg.param_dtype != "float64" or cfg.amp or cfg.channels_last or cfg.restarts != 1:
        raise ValueError("the paper's path has float64 parameters, no autocast, no channels_last and one run")
    device = torch.device(device)
    seed_everything(cfg.seed)
    shadow = np.asarray(shadow)
    n, size = shadow.shape[0], shadow.shape[1]
    if n < 2:
        raise InversionError(f"the shadow set has {n} image(s); DECREE needs at least 2 per batch")
    mask0, pattern01, loader = papers_start(cfg.seed, paper_encoder, shadow, min(cfg.batch_size, n), cfg.mask_init,
                                            cfg.orc_square, device)
    normalize = transforms.Normalize(mean, std)

    encoder.eval().requires_grad_(False)
    w = torch.arctanh((mask0 - 0.5) * (2 - EPS)).requires_grad_(True)
    v = torch.arctanh((pattern01 - 0.5) * (2 - EPS)).requires_grad_(True)
    optimizer = torch.optim.Adam([w, v], lr=cfg.lr, betas=(0.5, 0.9))
    lambdas, best = LambdaSchedule(cfg), BestTrigger()
    history, start = [], time.time()

    for epoch in range(cfg.max_epochs):
        lr = learning_rate(epoch, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        best.improved_this_epoch = False
        steps = {"loss": [], "cos": [], "reg": []}
        for clean_x, _ in loader:
            clean_x = clean_x.to(device)  # uint8 (B,H,W,3)
            if len(clean_x) < 2:
                continue
            mask3 = (torch.tanh(w.unsqueeze(2).repeat(1, 1, 3)) / (2 - EPS) + 0.5).clip(0, 1)
            pattern = ((torch.tanh(v) / (2 - EPS) + 0.5) * 255).clip(0, 255)
            stamped = ((1 - mask3) * clean_x + mask3 * pattern).clip(0, 255)  # float64
            clean_input = normalize_each(clean_x, normalize)
            bd_input = normalize_each(stamped, normalize)
            clean_input = clean_input.to(dtype=torch.float).to(device)  # computed, never used: as main.py
            loss_cos = -self_cos_sim(encoder(bd_input.to(dtype=torch.float).to(device)))
            loss_reg = mask3.abs().sum()
            loss = loss_cos + loss_reg * lambdas.lambda_
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()

            for key, value in zip(("loss", "cos", "reg"), (loss, loss_cos, loss_reg)):
                steps[key].append(value.detach())
            success = bool(torch.abs(loss_cos) > cfg.thres)  # float32, as main.py compares
            best.update(success, loss_reg.item(), mask3[..., 0], pattern)
            lambdas.step(success)

        loss_e, cos_e, reg_e = (torch.mean(torch.stack(steps[key])) for key in ("loss", "cos", "reg"))
        record = {"epoch": epoch, "loss": loss_e.item(), "cos": -cos_e.item(), "l1": reg_e.item(),
                  "lambda": lambdas.lambda_, "lr": lr, "best_l1": best.l1 if best.mask is not None else np.inf,
                  "seconds": time.time() - start}
        history.append(record)
        if on_epoch is not None:
            on_epoch(record, best)
        if torch.abs(cos_e) > cfg.thres and best.stale_steps > cfg.early_stop_patience:
            break

    return final_result(best, size, cfg, history, time.time() - start)
