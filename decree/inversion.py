"""DECREE trigger inversion (SPEC 2): the whole method in one place, with the paper's symbols.

A trigger is a mask m in [0,1]^(H,W) (shared by the 3 channels) and a pattern p in [0,255]^(H,W,3);
stamping is x' = clip((1 - m) * x + m * p, 0, 255) in pixel space. DECREE searches for the smallest
trigger (L1 = 3 * sum(m)) that makes the encoder map every stamped shadow image to (almost) the same
embedding: loss = -cos + lambda * L1, cos = mean off-diagonal cosine similarity of a batch's embeddings.
A backdoored encoder has such a trigger covering a small fraction of the image (PL1 = L1 / (H*W*3)).
"""
import math
import random
import time
from dataclasses import asdict, dataclass, field, replace

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

EPS = 1e-7
NO_TRIGGER_L1 = 1 / EPS  # the paper's "infinite" L1 before any trigger reached the threshold


class InversionError(RuntimeError):
    """The inversion cannot go on (e.g. the encoder returns NaN/inf)."""


@dataclass
class InversionConfig:
    """Hyper-parameters with the paper's defaults (main.py); `preset` adapts them per usage info."""
    lr: float = 1e-3                    # Adam on (w, v); sweeps use 0.5
    batch_size: int = 32
    thres: float = 0.99                 # |cos| above this counts as "trigger works"
    max_epochs: int = 1000
    mask_init: str = "rand"             # rand | orc
    seed: int = 80
    lambda_init: float = 1e-3
    lambda_factor: float = 5.0          # the paper's adaptor
    lambda_max: float = 1e5             # lambda only grows while below this
    lambda_min: float = 1e-5            # 1e-7 for CLIP/imagenet/moco
    patience: int = 5                   # lambda changes after patience+1 steps in a row
    early_stop_patience: int = 10       # 35 for CLIP/imagenet/moco
    lr_milestones: tuple = (30, 50)     # (200, 500) for CLIP/imagenet
    lr_after_milestones: tuple = (0.1, 0.05)
    orc_square: tuple = (5, 22)         # (top-left, side) of the `orc` initial mask; (24, 176) at 224 px
    pl1_threshold: float = 0.1          # flag the encoder when PL1 < this
    param_dtype: str = "float64"        # the paper's trigger parameters; float32 behind a flag
    amp: bool = False                   # bf16 autocast of the encoder forward on CUDA
    channels_last: bool = False

    @property
    def lambda_reset_patience(self) -> int:
        return 2 * self.patience


# encoders from model hubs take the settings of the paper's closest case (large 224-px-class models)
HUB_PRESETS = {"open_clip": "CLIP", "hf_clip": "CLIP", "timm": "imagenet"}


def preset(usage_info: str, **overrides) -> InversionConfig:
    """The paper's per-usage-info settings, then any overrides (None values are ignored)."""
    usage_info = HUB_PRESETS.get(usage_info, usage_info)
    large = usage_info in ("CLIP", "imagenet")
    base = InversionConfig(
        lambda_min=1e-5 if usage_info in ("cifar10", "stl10") else 1e-7,
        early_stop_patience=10 if usage_info in ("cifar10", "stl10") else 35,
        lr_milestones=(200, 500) if large else (30, 50),  # moco keeps the cifar thresholds, as in the paper
        orc_square=(24, 176) if usage_info in ("CLIP", "imagenet", "moco") else (5, 22),
    )
    return replace(base, **{k: v for k, v in overrides.items() if v is not None})


@dataclass
class InversionResult:
    """Best trigger and its norms; mask float32 (H,W) in [0,1], pattern float32 (H,W,3) in [0,255]."""
    mask: np.ndarray | None
    pattern: np.ndarray | None
    l1: float
    pl1: float
    pl1_threshold: float
    epochs: int
    seconds: float
    history: list = field(default_factory=list)

    @property
    def found(self) -> bool:
        return self.mask is not None

    @property
    def trojaned(self) -> bool:
        return self.found and self.pl1 < self.pl1_threshold

    @property
    def verdict(self) -> str:
        return "trojaned" if self.trojaned else "clean"

    def summary(self) -> str:
        size = "no trigger found" if not self.found else f"PL1-norm {self.pl1:.4f} (= L1 {self.l1:.1f} / (H*W*3))"
        return f"verdict: {self.verdict.upper()}, {size}, threshold {self.pl1_threshold}"


# ---- parametrisation -------------------------------------------------------------------------------

def trigger_from_params(w: torch.Tensor, v: torch.Tensor):
    """Free tensors w (H,W), v (H,W,3) -> mask (H,W) in [0,1], pattern (H,W,3) in [0,255]."""
    mask = (torch.tanh(w) / (2 - EPS) + 0.5).clamp(0, 1)
    pattern = ((torch.tanh(v) / (2 - EPS) + 0.5) * 255).clamp(0, 255)
    return mask, pattern


def params_from_trigger(mask0: torch.Tensor, pattern01: torch.Tensor):
    """Inverse of the parametrisation: mask0 (H,W) and pattern01 (H,W,3), both in [0,1]."""
    w = torch.arctanh((mask0 - 0.5) * (2 - EPS))
    v = torch.arctanh((pattern01 - 0.5) * (2 - EPS))
    return w, v


def initial_params(size: int, cfg: InversionConfig, generator: torch.Generator, dtype, device):
    """`rand`: m0, p0 ~ U[0,1); `orc`: m0 = eps except a square of ones (SPEC 2)."""
    mask0 = torch.rand((size, size), generator=generator, dtype=dtype)
    pattern01 = torch.rand((size, size, 3), generator=generator, dtype=dtype)
    if cfg.mask_init == "orc":
        top, side = cfg.orc_square
        if top + side > size:  # scale the paper's square to the image when sizes differ
            top, side = round(top * size / 32), round(side * size / 32)
        mask0 = torch.full((size, size), EPS, dtype=dtype)
        mask0[top:top + side, top:top + side] = 1.0
    elif cfg.mask_init != "rand":
        raise ValueError(f"--mask_init must be rand or orc, not {cfg.mask_init!r}")
    w, v = params_from_trigger(mask0, pattern01)
    return w.to(device).requires_grad_(True), v.to(device).requires_grad_(True)


# ---- loss pieces -----------------------------------------------------------------------------------

def stamp(x: torch.Tensor, mask: torch.Tensor, pattern: torch.Tensor) -> torch.Tensor:
    """uint8/float pixels (B,H,W,3) -> clip((1-m) x + m p, 0, 255) in mask's dtype, the whole batch at once."""
    m = mask.unsqueeze(-1)
    return ((1 - m) * x.to(mask.dtype) + m * pattern).clamp(0, 255)


def mean_pairwise_cos(embeddings: torch.Tensor) -> torch.Tensor:
    """Mean off-diagonal cosine similarity of (B,D) embeddings."""
    e = F.normalize(embeddings.float(), dim=-1)
    sim = e @ e.T
    b = e.shape[0]
    return (sim.sum() - sim.diagonal().sum()) / (b * (b - 1))


def l1_norm(mask: torch.Tensor) -> torch.Tensor:
    """L1 of the mask repeated on 3 channels."""
    return 3 * mask.abs().sum()


def pl1_norm(l1: float, size: int) -> float:
    return l1 / (size * size * 3)


def learning_rate(epoch: int, cfg: InversionConfig) -> float:
    """The paper's step schedule: cfg.lr, then fixed 0.1 and 0.05 after the milestones."""
    for milestone, lr in zip(cfg.lr_milestones, (cfg.lr,) + cfg.lr_after_milestones):
        if epoch < milestone:
            return lr
    return cfg.lr_after_milestones[-1]


# ---- adaptive lambda and early stop ----------------------------------------------------------------

class LambdaSchedule:
    """Adaptive weight of the L1 term: up after > patience successful steps, down after > patience failures."""

    def __init__(self, cfg: InversionConfig):
        self.cfg = cfg
        self.lambda_ = cfg.lambda_init
        self.up = self.down = self.reset_count = 0

    def step(self, success: bool) -> float:
        """Update after one optimisation step; `success` = |cos| > thres. Returns the new lambda."""
        cfg = self.cfg
        # stuck below lambda_min while succeeding: the L1 term has no force left, start over
        if self.lambda_ < cfg.lambda_min and success:
            self.reset_count += 1
            if self.reset_count > cfg.lambda_reset_patience:
                self.lambda_ = cfg.lambda_init
                self.up = self.down = 0
        else:
            self.reset_count = 0
        if success:
            self.up, self.down = self.up + 1, 0
        else:
            self.up, self.down = 0, self.down + 1
        if self.up > cfg.patience:
            if self.lambda_ < cfg.lambda_max:
                self.lambda_ *= cfg.lambda_factor
            self.up = 0
        elif self.down > cfg.patience:
            if self.lambda_ >= cfg.lambda_min:
                self.lambda_ /= cfg.lambda_factor
            self.down = 0
        return self.lambda_


class BestTrigger:
    """Smallest successful trigger so far, and the early-stop count of steps since it last improved."""

    def __init__(self):
        self.l1 = NO_TRIGGER_L1
        self.mask = self.pattern = None
        self.stale_steps = 0
        self.improved_this_epoch = False

    def update(self, success: bool, l1: float, mask: torch.Tensor, pattern: torch.Tensor) -> None:
        improved = success and l1 < self.l1
        if improved:
            self.l1, self.mask, self.pattern = l1, mask.detach().clone(), pattern.detach().clone()
            self.improved_this_epoch = True
        if self.mask is not None:
            self.stale_steps = 0 if improved else self.stale_steps + 1

    def should_stop(self, epoch_mean_cos: float, cfg: InversionConfig) -> bool:
        return abs(epoch_mean_cos) > cfg.thres and self.stale_steps > cfg.early_stop_patience


def epoch_record(epoch: int, sums: np.ndarray, steps: int, lr: float, lambdas: LambdaSchedule, best: BestTrigger,
                 start: float) -> dict:
    """One row of the per-epoch history; sums = (loss, cos, L1) summed over the epoch's steps."""
    loss, cos, l1 = (float(s) for s in sums / max(steps, 1))
    return {"epoch": epoch, "loss": loss, "cos": cos, "l1": l1, "lambda": lambdas.lambda_, "lr": lr,
            "best_l1": best.l1 if best.mask is not None else math.inf, "seconds": time.time() - start}


def final_result(best: BestTrigger, size: int, cfg: InversionConfig, history: list, seconds: float):
    """The InversionResult of a finished run: the best trigger, or "no trigger found" (L1 = inf)."""
    if best.mask is None:
        return InversionResult(None, None, math.inf, math.inf, cfg.pl1_threshold, len(history), seconds, history)
    return InversionResult(mask=best.mask.float().cpu().numpy(), pattern=best.pattern.float().cpu().numpy(),
                           l1=best.l1, pl1=pl1_norm(best.l1, size), pl1_threshold=cfg.pl1_threshold,
                           epochs=len(history), seconds=seconds, history=history)


# ---- the loop --------------------------------------------------------------------------------------

def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def invert_trigger(encoder: torch.nn.Module, shadow: torch.Tensor | np.ndarray, mean, std,
                   cfg: InversionConfig = None, device="cpu", progress: bool = True,
                   on_epoch=None) -> InversionResult:
    """Run DECREE on `encoder` (normalised float (N,3,S,S) -> (N,D)) with shadow images uint8 (N,S,S,3).

    `on_epoch(record, best)` is called after every epoch (for logs and snapshots).
    """
    cfg = cfg or InversionConfig()
    device = torch.device(device)
    seed_everything(cfg.seed)
    generator = torch.Generator().manual_seed(cfg.seed)
    dtype = getattr(torch, cfg.param_dtype)

    shadow = torch.as_tensor(shadow).to(device)  # the whole shadow set lives on the device, as uint8
    n, size = shadow.shape[0], shadow.shape[1]
    if n < 2:
        raise InversionError(f"the shadow set has {n} image(s); DECREE needs at least 2 per batch")
    batch_size = min(cfg.batch_size, n)
    # normalise((x / 255)) folded into one multiply-add, in the trigger's dtype
    scale = (1 / (255 * torch.tensor(std, dtype=dtype, device=device))).view(1, 3, 1, 1)
    shift = (torch.tensor(mean, dtype=dtype, device=device) / torch.tensor(std, dtype=dtype, device=device)
             ).view(1, 3, 1, 1)
    memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.amp and device.type == "cuda")

    encoder.eval().requires_grad_(False)
    if cfg.channels_last:  # weights too: with channels_last inputs alone every conv re-lays out its weight per call
        encoder.to(memory_format=torch.channels_last)
    w, v = initial_params(size, cfg, generator, dtype, device)
    optimizer = torch.optim.Adam([w, v], lr=cfg.lr, betas=(0.5, 0.9))
    lambdas, best = LambdaSchedule(cfg), BestTrigger()
    history, start, total_steps = [], time.time(), 0

    bar = tqdm(range(cfg.max_epochs), desc="DECREE", unit="epoch", disable=not progress, dynamic_ncols=True)
    for epoch in bar:
        lr = learning_rate(epoch, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        order = torch.randperm(n, generator=generator).to(device)
        best.improved_this_epoch = False
        sums = np.zeros(3)  # loss, cos, L1 over the epoch's steps
        steps = 0
        for first in range(0, n, batch_size):
            batch = shadow[order[first:first + batch_size]]
            if len(batch) < 2:  # a last batch of one image has no pairs
                continue
            mask, pattern = trigger_from_params(w, v)
            stamped = stamp(batch, mask, pattern).permute(0, 3, 1, 2)
            inputs = (stamped * scale - shift).float().contiguous(memory_format=memory_format)
            with autocast:
                embeddings = encoder(inputs)
            cos = mean_pairwise_cos(embeddings)
            l1 = l1_norm(mask)
            loss = -cos + lambdas.lambda_ * l1
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

            cos_value, l1_value, loss_value = torch.stack([cos.detach().double(), l1.detach().double(),
                                                           loss.detach().double()]).tolist()  # one sync a step
            if not math.isfinite(cos_value):
                raise InversionError("the encoder returned NaN/inf embeddings; the checkpoint is broken or "
                                     "does not match --encoder_usage_info/--arch (try without --amp)")
            success = abs(cos_value) > cfg.thres
            best.update(success, l1_value, mask, pattern)
            lambdas.step(success)
            sums += (loss_value, cos_value, l1_value)
            steps += 1
        total_steps += steps

        record = epoch_record(epoch, sums, steps, lr, lambdas, best, start)
        history.append(record)
        bar.set_postfix(cos=f"{record['cos']:.4f}", L1=f"{record['l1']:.1f}", lam=f"{lambdas.lambda_:.1e}",
                        best=f"{record['best_l1']:.1f}")
        if on_epoch is not None:
            on_epoch(record, best)
        if best.should_stop(record["cos"], cfg):
            break
    bar.close()
    if total_steps == 0:  # a result without a single optimisation step would be a verdict about nothing
        raise InversionError(f"no optimisation step ran ({cfg.max_epochs} epochs, batch size {batch_size}); "
                             "use --epochs >= 1 and --batch_size >= 2")
    return final_result(best, size, cfg, history, time.time() - start)


def config_dict(cfg: InversionConfig) -> dict:
    return asdict(cfg)
