"""DECREE's trigger inversion: the method of Feng et al., "Detecting Backdoors in Pre-trained Encoders" (CVPR 2023,
arXiv 2303.15180), with the paper's symbols; docs/method.md describes it with its defaults.

A trigger is a mask m in [0,1]^(H,W) (shared by the 3 channels) and a pattern p in [0,255]^(H,W,3);
stamping is x' = clip((1 - m) * x + m * p, 0, 255) in pixel space. DECREE searches for the smallest
trigger (L1 = 3 * sum(m)) that makes the encoder map every stamped shadow image to (almost) the same
embedding: loss = -cos + lambda * L1, cos = mean off-diagonal cosine similarity of a batch's embeddings.
A backdoored encoder has such a trigger covering a small fraction of the image (PL1 = L1 / (H*W*3)).

Where each part of the method is:
- the trigger made from free tensors (w, v), so that m and p stay in their ranges: trigger_from_params,
  initial_params;
- the loss on a batch of shadow images (stamp, normalise, encode, mean_pairwise_cos, l1_norm) and the Adam step
  on (w, v): step;
- after every step, the adaptive lambda (LambdaSchedule) and the best trigger so far (BestTrigger): after_step;
- after every epoch, the epoch's means and the early stop (BestTrigger.stop_reason): end_epoch;
- the search, epoch after epoch over the shuffled shadow set at the scheduled learning rate: invert_trigger.
Beside the method: restarts.py runs several inversions in one encoder batch, progress.py shows a run on stderr,
stop_reasons.py names why a run ended.
"""
import functools
import math
import random
import sys
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from common.device import cpu_supports_bf16
from models.fold import fold_batchnorm
from .paper_draws import paper_build
from .progress import ProgressBar
from .restarts import Restart, RestartStack, smallest_best
from .settings import InversionConfig
from .stop_reasons import STOP_BUDGET, STOP_EARLY, STOP_SLOW, STOP_VERDICT, UPPER_BOUND_STOPS

EPS = 1e-7
NO_TRIGGER_L1 = 1 / EPS  # the paper's "infinite" L1 before any trigger reached the threshold


class InversionError(RuntimeError):
    """The inversion cannot go on (e.g. the encoder returns NaN/inf)."""


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
    stop_reason: str | None = None      # STOP_EARLY, STOP_BUDGET or STOP_VERDICT
    restarts: list = field(default_factory=list)  # per restart: seed, l1, pl1, epochs, stop_reason
    amp_used: bool = False
    batchnorms_folded: int = 0

    @property
    def pl1_upper_bound(self) -> bool:
        """After an exact early exit or a slow-progress stop the paper's run could have shrunk the trigger further:
        the PL1 is an upper bound."""
        return self.stop_reason in UPPER_BOUND_STOPS

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
    """Free tensors w (...,H,W), v (...,H,W,3) -> mask (...,H,W,3) in [0,1], the same on every channel, and
    pattern (...,H,W,3) in [0,255].

    The mask is made from w repeated on the 3 channels, as the paper's code made it, rather than from w alone and
    broadcast: its gradient then sums the three channels' terms where the paper's did, so a run rounds exactly as
    the paper's code does, step for step (tests/test_benchmark.py)."""
    mask = (torch.tanh(w.unsqueeze(-1).repeat(*(1,) * w.dim(), 3)) / (2 - EPS) + 0.5).clamp(0, 1)
    pattern = ((torch.tanh(v) / (2 - EPS) + 0.5) * 255).clamp(0, 255)
    return mask, pattern


def params_from_trigger(mask0: torch.Tensor, pattern01: torch.Tensor):
    """Inverse of the parametrisation: mask0 (H,W) and pattern01 (H,W,3), both in [0,1]."""
    w = torch.arctanh((mask0 - 0.5) * (2 - EPS))
    v = torch.arctanh((pattern01 - 0.5) * (2 - EPS))
    return w, v


def initial_params(size: int, cfg: InversionConfig, draws, dtype, device):
    """`rand`: m0, p0 ~ U[0,1) from `draws` (restarts.OwnDraws or paper_draws.PaperDraws); `orc`: m0 = eps except
    a square of ones (docs/method.md)."""
    if cfg.mask_init not in ("rand", "orc"):
        raise ValueError(f"--mask_init must be rand or orc, not {cfg.mask_init!r}")
    mask0, pattern01 = draws.initial_trigger(size, cfg.mask_init, dtype)
    if cfg.mask_init == "orc":
        top, side = cfg.orc_square
        if top + side > size:  # scale the paper's square to the image when sizes differ
            top, side = round(top * size / 32), round(side * size / 32)
        mask0 = torch.full((size, size), EPS, dtype=dtype)
        mask0[top:top + side, top:top + side] = 1.0
    w, v = params_from_trigger(mask0.to(device, dtype), pattern01.to(device, dtype))  # on the device, as main.py
    return w.requires_grad_(True), v.requires_grad_(True)


# ---- loss pieces -----------------------------------------------------------------------------------

def stamp(x: torch.Tensor, mask: torch.Tensor, pattern: torch.Tensor) -> torch.Tensor:
    """uint8/float pixels (B,H,W,3) -> clip((1-m) x + m p, 0, 255) in mask's dtype, the whole batch at once;
    mask (...,H,W,3), or (...,H,W,1) for one mask on every channel."""
    return ((1 - mask) * x.to(mask.dtype) + mask * pattern).clamp(0, 255)


def normalise(pixels: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """Pixels (N,3,S,S) in [0,255] -> (x / 255 - mean) / std, in the order of operations of the paper's
    torchvision Normalize (one fused multiply-add would round differently)."""
    return (pixels / 255.0 - mean) / std


def mean_pairwise_cos(embeddings: torch.Tensor) -> torch.Tensor:
    """Mean off-diagonal cosine similarity of (B,D) embeddings; of each (B,D) slice of (K,B,D) -> (K,).

    Reduced as the paper's code reduces it, float32 bit for bit: one (B,B) matrix product per slice (a batched
    product rounds differently at some shapes), then the mean of the off-diagonal entries in row-major order
    (sum minus trace rounds differently)."""
    e = F.normalize(embeddings.float(), dim=-1)
    slices = e.reshape(-1, *e.shape[-2:])
    sim = torch.stack([s @ s.T for s in slices])  # one per restart, not per image
    return sim.flatten(1)[:, off_diagonal(e.shape[-2], e.device)].mean(-1).view(e.shape[:-2])


@functools.lru_cache(maxsize=16)
def off_diagonal(b: int, device: torch.device) -> torch.Tensor:
    """int64 (b*(b-1),): flat indices of a (b,b) matrix's off-diagonal entries in row-major order, the order
    masked_select takes them; made once per size, so a step does not wait for the device to count them."""
    return (~torch.eye(b, dtype=torch.bool)).flatten().nonzero().squeeze(1).to(device)


def similar_enough(cos: float, thres: float) -> bool:
    """|cos| > thres as the paper's code compares a float32 cosine with the Python threshold: in float32."""
    return bool(abs(np.float32(cos)) > np.float32(thres))


def l1_norm(mask: torch.Tensor) -> torch.Tensor:
    """L1 of the mask on its 3 channels (H,W,3); of each mask of (...,H,W,3) -> (...)."""
    return mask.abs().sum((-3, -2, -1))


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
    """Smallest successful trigger so far, and the early-stop counts.

    `stale_steps`: steps since the best last improved (the paper's early stop). `slow_steps`: steps since the best
    last fell by more than `min_progress` times its distance to the threshold (`threshold_l1`), measured from where
    that count last restarted; with min_progress 0, or once the best is at or below the threshold, it counts as
    stale_steps does.
    """

    def __init__(self, min_progress: float = 0.0, threshold_l1: float = 0.0):
        self.l1 = NO_TRIGGER_L1
        self.mask = self.pattern = None
        self.stale_steps = self.slow_steps = 0
        self.improved_this_epoch = False
        self.min_progress, self.threshold_l1 = min_progress, threshold_l1
        self.progress_from = math.inf  # the best L1 when the slow-progress count last restarted

    def update(self, success: bool, l1: float, mask: torch.Tensor, pattern: torch.Tensor) -> None:
        improved = success and l1 < self.l1
        if improved:
            self.l1, self.mask, self.pattern = l1, mask.detach().clone(), pattern.detach().clone()
            self.improved_this_epoch = True
        if self.mask is not None:
            self.stale_steps = 0 if improved else self.stale_steps + 1
            if improved and self._progressed():
                self.progress_from, self.slow_steps = self.l1, 0
            else:
                self.slow_steps += 1

    def _progressed(self) -> bool:
        """The best fell by more than min_progress of its distance to the threshold since the count restarted."""
        if math.isinf(self.progress_from) or self.l1 <= self.threshold_l1:
            return True
        return self.progress_from - self.l1 > self.min_progress * (self.progress_from - self.threshold_l1)

    def stop_reason(self, epoch_mean_cos: float, cfg: InversionConfig) -> str | None:
        """STOP_EARLY (the paper's rule), STOP_SLOW (too little progress, cfg.min_progress), or None: go on."""
        if not similar_enough(epoch_mean_cos, cfg.thres):
            return None
        if self.stale_steps > cfg.early_stop_patience:
            return STOP_EARLY
        return STOP_SLOW if self.slow_steps > cfg.early_stop_patience else None


class EpochValues:
    """One epoch's per-step loss, cos and L1, and their means as the paper takes them: torch.mean of the stacked
    values, the cosines in float32 and the loss and L1 in float64."""

    def __init__(self):
        self.loss, self.cos, self.l1 = [], [], []

    def add(self, loss: float, cos: float, l1: float) -> None:
        self.loss.append(loss)
        self.cos.append(cos)
        self.l1.append(l1)

    def means(self) -> tuple[float, float, float]:
        """(loss, cos, L1); zeros for an epoch without a step."""
        return tuple(torch.tensor(v, dtype=d).mean().item() if v else 0.0
                     for v, d in ((self.loss, torch.float64), (self.cos, torch.float32), (self.l1, torch.float64)))


def epoch_record(epoch: int, values: EpochValues, lr: float, lambdas: LambdaSchedule, best: BestTrigger,
                 start: float) -> dict:
    """One row of the per-epoch history: the epoch's mean loss, cos and L1, and where lambda and the best are."""
    loss, cos, l1 = values.means()
    return {"epoch": epoch, "loss": loss, "cos": cos, "l1": l1, "lambda": lambdas.lambda_, "lr": lr,
            "best_l1": best.l1 if best.mask is not None else math.inf, "seconds": time.time() - start}


def final_result(best: BestTrigger, size: int, cfg: InversionConfig, history: list, seconds: float, **extra):
    """The InversionResult of a finished run: the best trigger, or "no trigger found" (L1 = inf).

    `extra`: the optional InversionResult fields (stop_reason, restarts, amp_used, batchnorms_folded)."""
    if best.mask is None:
        return InversionResult(None, None, math.inf, math.inf, cfg.pl1_threshold, len(history), seconds, history,
                               **extra)
    return InversionResult(mask=best.mask.float().cpu().numpy(), pattern=best.pattern.float().cpu().numpy(),
                           l1=best.l1, pl1=pl1_norm(best.l1, size), pl1_threshold=cfg.pl1_threshold,
                           epochs=len(history), seconds=seconds, history=history, **extra)


# ---- the encoder -----------------------------------------------------------------------------------

def amp_active(cfg: InversionConfig, device: torch.device) -> bool:
    """bf16 autocast is used on CUDA, and on CPUs with bf16 instructions (elsewhere it would be slower)."""
    return cfg.amp and (device.type == "cuda" or (device.type == "cpu" and cpu_supports_bf16()))


@dataclass
class PreparedEncoder:
    """An encoder as the inversion calls it: eval mode, frozen, batch norms folded and channels_last as its
    config asks. Made once per run, so what runs after the inversion (target recovery) gets the cheaper calls too."""
    module: torch.nn.Module
    batchnorms_folded: int = 0


def prepare_encoder(encoder: torch.nn.Module, cfg: InversionConfig, progress: bool = True) -> PreparedEncoder:
    """`encoder` frozen in eval mode, its batch norms folded (cfg.fold_batchnorm) and laid out channels_last
    (cfg.channels_last); an encoder that cannot be folded runs unfolded, and with `progress` the log says why."""
    encoder.eval().requires_grad_(False)
    folded = 0
    if cfg.fold_batchnorm:
        encoder, folded, why_not = fold_batchnorm(encoder)
        if progress and why_not:
            tqdm.write(f"--fold_batchnorm: {why_not}", file=sys.stderr)
    if cfg.channels_last:  # weights too: with channels_last inputs alone every conv re-lays out its weight per call
        encoder.to(memory_format=torch.channels_last)
    return PreparedEncoder(encoder, folded)


@dataclass
class StepInputs:
    """What every step feeds the encoder: the shadow set, uint8 (N,S,S,3) on the device, its normalisation, mean and
    std (1,3,1,1) in the trigger's dtype, and the prepared encoder with the memory format and autocast of its calls."""
    shadow: torch.Tensor
    mean: torch.Tensor
    std: torch.Tensor
    memory_format: torch.memory_format
    autocast: torch.autocast
    amp_used: bool
    encoder: PreparedEncoder


def step_inputs(encoder, shadow: torch.Tensor, mean, std, cfg: InversionConfig, dtype, device: torch.device,
                progress: bool) -> StepInputs:
    """A run's StepInputs; `encoder` is prepared here unless it is a PreparedEncoder already."""
    norm_mean, norm_std = (torch.tensor(c, dtype=dtype, device=device).view(1, 3, 1, 1) for c in (mean, std))
    memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format
    use_amp = amp_active(cfg, device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp)
    prepared = encoder if isinstance(encoder, PreparedEncoder) else prepare_encoder(encoder, cfg, progress)
    return StepInputs(shadow, norm_mean, norm_std, memory_format, autocast, use_amp, prepared)


# ---- one step, one epoch ---------------------------------------------------------------------------

@dataclass
class StepOutcome:
    """What one step measured for each of the K active restarts: cos, L1 and loss as floats (K,), and the trigger
    they were measured on, mask (K,S,S) in [0,1] and pattern (K,S,S,3) in [0,255]."""
    cos: list[float]
    l1: list[float]
    loss: list[float]
    mask: torch.Tensor
    pattern: torch.Tensor


def step(inputs: StepInputs, stack: RestartStack, index: torch.Tensor, optimizer: torch.optim.Optimizer) -> StepOutcome:
    """One optimisation step of every active restart on its batch of shadow images (index int64 (K,B)): the trigger
    from (w, v), the stamped batch encoded, loss = -cos + lambda * L1, and one Adam step on (w, v)."""
    # (K,1,S,S,3), broadcast on the batch; stamp and L1 use this one tensor, so its gradient adds their terms in the
    # paper's order
    mask, pattern = trigger_from_params(stack.w.unsqueeze(1), stack.v.unsqueeze(1))
    stamped = stamp(inputs.shadow[index], mask, pattern)  # (K,B,S,S,3)
    normalised = normalise(stamped.flatten(0, 1).permute(0, 3, 1, 2), inputs.mean, inputs.std).float().contiguous(
        memory_format=inputs.memory_format)
    with inputs.autocast:
        embeddings = inputs.encoder.module(normalised)
    cos = mean_pairwise_cos(embeddings.view(*index.shape, -1))  # (K,)
    l1 = l1_norm(mask)[:, 0]
    lambda_ = torch.tensor([r.lambdas.lambda_ for r in stack.active], dtype=l1.dtype, device=l1.device)
    loss = -cos + lambda_ * l1
    optimizer.zero_grad(set_to_none=True)
    loss.sum().backward()  # each restart's loss depends on its own rows only
    optimizer.step()

    cos_values, l1_values, loss_values = torch.stack([cos.detach().double(), l1.detach().double(),
                                                      loss.detach().double()]).tolist()  # one sync a step
    if not all(math.isfinite(c) for c in cos_values):
        raise InversionError("the encoder returned NaN/inf embeddings; the checkpoint is broken or "
                             "does not match --encoder_usage_info/--arch (try without --amp)")
    return StepOutcome(cos_values, l1_values, loss_values, mask[:, 0, ..., 0], pattern[:, 0])


def after_step(restarts: list[Restart], outcome: StepOutcome, values: list[EpochValues],
               cfg: InversionConfig) -> None:
    """After every step, per restart: the step succeeded if |cos| > thres; a successful trigger smaller than the best
    becomes the best; lambda adapts to the success; the step's values join the epoch's."""
    for k, r in enumerate(restarts):
        success = similar_enough(outcome.cos[k], cfg.thres)
        r.best.update(success, outcome.l1[k], outcome.mask[k], outcome.pattern[k])
        r.lambdas.step(success)
        values[k].add(outcome.loss[k], outcome.cos[k], outcome.l1[k])


def verdict_is_final(restarts: list[Restart], size: int, cfg: InversionConfig) -> bool:
    """The exact early exit (cfg.stop_at_verdict): a restart's best PL1 is below the threshold, and bests only fall."""
    return cfg.stop_at_verdict and any(r.best.mask is not None and pl1_norm(r.best.l1, size) < cfg.pl1_threshold
                                       for r in restarts)


def end_epoch(restarts: list[Restart], values: list[EpochValues], epoch: int, lr: float, start: float,
              cfg: InversionConfig) -> list[dict]:
    """After every epoch, per restart: the epoch's record into its history, then the early stop
    (BestTrigger.stop_reason) unless the restart has a reason to stop already. Returns the records."""
    records = []
    for r, epoch_values in zip(restarts, values):
        record = epoch_record(epoch, epoch_values, lr, r.lambdas, r.best, start)
        r.history.append(record)
        if r.stop_reason is None:
            r.stop_reason = r.best.stop_reason(record["cos"], cfg)
        records.append(record)
    return records


def batches(orders: torch.Tensor, batch_size: int):
    """Column slices int64 (K,B) of the epoch's orders (K,n), in turn; a last batch of one image has no pairs and is
    left out."""
    for first in range(0, orders.shape[1], batch_size):
        index = orders[:, first:first + batch_size]
        if index.shape[1] >= 2:
            yield index


def set_learning_rate(optimizer: torch.optim.Optimizer, epoch: int, cfg: InversionConfig) -> float:
    lr = learning_rate(epoch, cfg)
    for group in optimizer.param_groups:
        group["lr"] = lr
    return lr


# ---- the run ---------------------------------------------------------------------------------------

def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def check_run_sizes(n: int, cfg: InversionConfig) -> None:
    if n < 2:
        raise InversionError(f"the shadow set has {n} image(s); DECREE needs at least 2 per batch")
    if cfg.restarts < 1:
        raise ValueError(f"--restarts must be at least 1, not {cfg.restarts}")


def start_restarts(cfg: InversionConfig, size: int, dtype, device, paper_encoder) -> RestartStack:
    """cfg.restarts inversions at their initial triggers, each with lambda at its start and no best yet, stacked."""
    paper_model = paper_build(*paper_encoder) if cfg.paper_draws and paper_encoder else None
    restarts, params = [], []
    for index in range(cfg.restarts):
        restarts.append(Restart(index, cfg.seed, paper_model, LambdaSchedule(cfg),
                                BestTrigger(cfg.min_progress, cfg.pl1_threshold * size * size * 3)))
        params.append(initial_params(size, cfg, restarts[-1].draws, dtype, device))
    return RestartStack(restarts, params)


def restart_summary(restart: Restart, size: int) -> dict:
    """One restart in the result: its seed and draws, its best L1 and PL1, its epochs and why it ended."""
    found = restart.best.mask is not None
    return {"restart": restart.index, "seed": restart.seed, "paper_draws": restart.paper_draws,
            "l1": restart.best.l1 if found else None,
            "pl1": pl1_norm(restart.best.l1, size) if found else None, "epochs": len(restart.history),
            "stop_reason": restart.stop_reason}


def invert_trigger(encoder: "torch.nn.Module | PreparedEncoder", shadow: torch.Tensor | np.ndarray, mean, std,
                   cfg: InversionConfig = None, device="cpu", progress: bool = True,
                   on_epoch=None, paper_encoder: tuple[str, str] | None = None) -> InversionResult:
    """Run DECREE on `encoder` (normalised float (N,3,S,S) -> (N,D)) with shadow images uint8 (N,S,S,3).

    `encoder` may be a PreparedEncoder made by prepare_encoder with this cfg (otherwise it is prepared here).
    cfg.restarts > 1 runs that many independent inversions together, their stamped batches stacked into one
    encoder batch; the result is the restart with the smallest L1. `on_epoch(record, best)` is called after
    every epoch with the leading restart's record and best trigger (for logs and snapshots). `paper_encoder`:
    (usage info, arch) of the encoder; with cfg.paper_draws, restart 0 takes the draws the paper's main.py takes
    for it and this seed, where main.py can build it (paper_draws.paper_build); elsewhere (hub and custom
    encoders), and without it, every restart has its own generator.
    """
    cfg = cfg or InversionConfig()
    device = torch.device(device)
    seed_everything(cfg.seed)
    dtype = getattr(torch, cfg.param_dtype)
    shadow = torch.as_tensor(shadow).to(device)  # the whole shadow set lives on the device, as uint8
    n, size, batch_size = shadow.shape[0], shadow.shape[1], min(cfg.batch_size, shadow.shape[0])
    check_run_sizes(n, cfg)
    inputs = step_inputs(encoder, shadow, mean, std, cfg, dtype, device, progress)
    stack = start_restarts(cfg, size, dtype, device, paper_encoder)
    optimizer = torch.optim.Adam([stack.w, stack.v], lr=cfg.lr, betas=(0.5, 0.9))
    start, steps_run = time.time(), 0

    with ProgressBar(cfg, progress, functools.partial(pl1_norm, size=size)) as bar:
        for epoch in range(cfg.max_epochs):
            lr = set_learning_rate(optimizer, epoch, cfg)
            values = [EpochValues() for _ in stack.active]
            for index in batches(stack.start_epoch(n, device), batch_size):
                after_step(stack.active, step(inputs, stack, index, optimizer), values, cfg)
                steps_run += 1
                if verdict_is_final(stack.active, size, cfg):
                    stack.stop_running(STOP_VERDICT)
                    break
            records = end_epoch(stack.active, values, epoch, lr, start, cfg)
            bar.epoch_done(stack)
            if on_epoch is not None:
                lead = smallest_best(stack.active)
                on_epoch(records[stack.active.index(lead)], lead.best)
            if not stack.drop_finished(optimizer):
                break
        stack.stop_running(STOP_BUDGET)
    if steps_run == 0:  # a result without a single optimisation step would be a verdict about nothing
        raise InversionError(f"no optimisation step ran ({cfg.max_epochs} epochs, batch size {batch_size}); "
                             "use --epochs >= 1 and --batch_size >= 2")

    chosen = smallest_best(stack.restarts)
    result = final_result(chosen.best, size, cfg, chosen.history, time.time() - start, stop_reason=chosen.stop_reason,
                          restarts=[restart_summary(r, size) for r in stack.restarts], amp_used=inputs.amp_used,
                          batchnorms_folded=inputs.encoder.batchnorms_folded)
    bar.finish(result)
    return result
