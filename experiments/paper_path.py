"""The paper's data path for DECREE (its main.py), re-implemented as a yardstick for scripts/benchmark.py.

Same method as `decree.inversion.invert_trigger` (same initial parameters, shuffled order, loss, adaptive
lambda, best tracking, early stop), but data flows the way the paper's main.py moves it, step by step:
a DataLoader over uint8 HWC numpy images (pinned on CUDA), a host->device copy of every batch, the mask
repeated to (H,W,3) before the float64 trigger math, and a Python loop over the batch that divides by
255, permutes to CHW and applies torchvision's `Normalize` image by image, for the clean batch as well as
the stamped one (main.py normalised both and fed only the stamped one to the encoder), then
`torch.stack(...).to(float).to(device)`. Only the data path differs: the project's vectorised path keeps
the paper's order of operations, so with the paper's settings both runs are the same bit for bit
(tests/test_benchmark.py).

Left out on purpose, so the yardstick errs in the paper's favour: main.py's `assert_range` checks (three
min/max host syncs a step, diagnostics only) and its encoder weight gradients (main.py never froze the
encoder, so every backward also computed and accumulated gradients of all its weights).
Not used for detection: the project's vectorised path is the one to run.
"""
import time

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler
from torchvision import transforms

from decree.inversion import (EPS, BestTrigger, InversionConfig, InversionError, InversionResult, LambdaSchedule,
                        epoch_record, final_result, initial_params, learning_rate, mean_pairwise_cos, seed_everything)


class ShadowImages(Dataset):
    """The paper's in-memory dataset (CIFAR10Mem without transform): item = (uint8 HWC numpy image, 0)."""

    def __init__(self, images: np.ndarray):
        self.images = images

    def __len__(self):
        return len(self.images)

    def __getitem__(self, index):
        return self.images[index], 0


class SeededShuffle(Sampler):
    """`shuffle=True`, drawing each epoch's order as the project does: torch.randperm(n, generator)."""

    def __init__(self, n: int, generator: torch.Generator):
        self.n, self.generator = n, generator

    def __len__(self):
        return self.n

    def __iter__(self):
        # A DataLoader given `generator=` also draws its workers' base seed from it each epoch, which
        # would shift the order away from the project's; a sampler owning the generator does not.
        return iter(torch.randperm(self.n, generator=self.generator).tolist())


def normalize_each(images: torch.Tensor, normalize) -> torch.Tensor:
    """main.py's loop: pixels (B,H,W,3) -> stack of normalize(image.permute(2,0,1) / 255), one image at a time."""
    return torch.stack([normalize(images[i].permute(2, 0, 1) / 255.0) for i in range(images.shape[0])])


def paper_invert_trigger(encoder: torch.nn.Module, shadow, mean, std, cfg: InversionConfig = None,
                         device="cpu", on_epoch=None) -> InversionResult:
    """DECREE with the paper's data path; encoder: normalised float (N,3,S,S) -> (N,D); shadow uint8 (N,S,S,3).

    `on_epoch(record, best)` is called after every epoch, as in `invert_trigger`.
    """
    cfg = cfg or InversionConfig()
    if cfg.param_dtype != "float64" or cfg.amp or cfg.channels_last:
        raise ValueError("the paper's path has float64 parameters, no autocast and no channels_last")
    device = torch.device(device)
    seed_everything(cfg.seed)
    generator = torch.Generator().manual_seed(cfg.seed)  # same draws as the project: mask, pattern, orders
    shadow = np.asarray(shadow)
    n, size = shadow.shape[0], shadow.shape[1]
    if n < 2:
        raise InversionError(f"the shadow set has {n} image(s); DECREE needs at least 2 per batch")
    loader = DataLoader(ShadowImages(shadow), batch_size=min(cfg.batch_size, n),
                        sampler=SeededShuffle(n, generator), pin_memory=device.type == "cuda")
    normalize = transforms.Normalize(mean, std)

    encoder.eval().requires_grad_(False)
    # drawn after the loader is built, as the project draws them: the sampler takes its first order later
    w, v = initial_params(size, cfg, generator, torch.float64, device)
    optimizer = torch.optim.Adam([w, v], lr=cfg.lr, betas=(0.5, 0.9))
    lambdas, best = LambdaSchedule(cfg), BestTrigger()
    history, start = [], time.time()

    for epoch in range(cfg.max_epochs):
        lr = learning_rate(epoch, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        best.improved_this_epoch = False
        sums, steps = np.zeros(3), 0
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
            embeddings = encoder(bd_input.to(dtype=torch.float).to(device))
            cos = mean_pairwise_cos(embeddings)
            l1 = mask3.abs().sum()
            loss = -cos + lambdas.lambda_ * l1
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()

            cos_value, l1_value, loss_value = torch.stack([cos.detach().double(), l1.detach().double(),
                                                           loss.detach().double()]).tolist()
            success = abs(cos_value) > cfg.thres
            best.update(success, l1_value, mask3[..., 0], pattern)
            lambdas.step(success)
            sums += (loss_value, cos_value, l1_value)
            steps += 1

        record = epoch_record(epoch, sums, steps, lr, lambdas, best, start)
        history.append(record)
        if on_epoch is not None:
            on_epoch(record, best)
        if best.stop_reason(record["cos"], cfg):
            break

    return final_result(best, size, cfg, history, time.time() - start)
