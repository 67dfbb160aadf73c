"""DECREE trigger inversion (docs/method.md): the whole method in one place, with the paper's symbols.

A trigger is a mask m in [0,1]^(H,W) (shared by the 3 channels) and a pattern p in [0,255]^(H,W,3);
stamping is x' = clip((1 - m) * x + m * p, 0, 255) in pixel space. DECREE searches for the smallest
trigger (L1 = 3 * sum(m)) that makes the encoder map every stamped shadow image to (almost) the same
embedding: loss = -cos + lambda * L1, cos = mean off-diagonal cosine similarity of a batch's embeddings.
A backdoored encoder has such a trigger covering a small fraction of the image (PL1 = L1 / (H*W*3)).
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
from .paper_draws import PaperDraws, paper_build
from .settings import InversionConfig

EPS = 1e-7
NO_TRIGGER_L1 = 1 / EPS  # the paper's "infinite" L1 before any trigger reached the threshold
# why a run (or one restart) ended
STOP_EARLY, STOP_BUDGET, STOP_VERDICT = "early stop", "epoch budget", "exact early exit"
STOP_SLOW = "slow progress"  # --min_progress: stopped before the paper's early stop; the PL1 is an upper bound
UPPER_BOUND_STOPS = (STOP_VERDICT, STOP_SLOW)


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


class OwnDraws:
    """The project's draws for one restart: a generator of its own, seeded with the restart's seed."""

    def __init__(self, seed: int):
        self.generator = torch.Generator().manual_seed(seed)

    def initial_trigger(self, size: int, mask_init: str, dtype=torch.float64):
        """(mask (S,S), pattern (S,S,3)), both U[0,1) in dtype; the mask is drawn for `orc` too, and unused."""
        mask0 = torch.rand((size, size), generator=self.generator, dtype=dtype)
        return mask0, torch.rand((size, size, 3), generator=self.generator, dtype=dtype)

    def epoch_order(self, n: int) -> torch.Tensor:
        """int64 (n,): this epoch's shuffled order of the n shadow images."""
        return torch.randperm(n, generator=self.generator)


def initial_params(size: int, cfg: InversionConfig, draws, dtype, device):
    """`rand`: m0, p0 ~ U[0,1) from `draws` (OwnDraws or paper_draws.PaperDraws); `orc`: m0 = eps except a square
    of ones (docs/method.md)."""
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


class StepValues:
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


def epoch_record(epoch: int, values: StepValues, lr: float, lambdas: LambdaSchedule, best: BestTrigger,
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


# ---- the loop --------------------------------------------------------------------------------------

def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def restart_seed(seed: int, index: int) -> int:
    """Restart 0 draws exactly what a single run draws; the others get independent streams of the same seed."""
    return seed if index == 0 else int(np.random.SeedSequence([seed, index]).generate_state(1)[0])


def amp_active(cfg: InversionConfig, device: torch.device) -> bool:
    """bf16 autocast is used on CUDA, and on CPUs with bf16 instructions (elsewhere it would be slower)."""
    return cfg.amp and (device.type == "cuda" or (device.type == "cpu" and cpu_supports_bf16()))


class Restart:
    """One of the K independent inversions of a run: its random stream, lambda schedule, best trigger, history.

    `paper_model`: what the paper's main.py builds before its draws (paper_draws.paper_build), or None; with it,
    restart 0 draws as the paper's run does. Every other restart has its own generator."""

    def __init__(self, index: int, cfg: InversionConfig, size: int, dtype, device, paper_model=None):
        self.index, self.cfg, self.seed = index, cfg, restart_seed(cfg.seed, index)
        self.paper_draws = index == 0 and paper_model is not None
        self.draws = PaperDraws(cfg.seed, paper_model) if self.paper_draws else OwnDraws(self.seed)
        self.w, self.v = (p.detach() for p in initial_params(size, cfg, self.draws, dtype, device))
        self.lambdas = LambdaSchedule(cfg)
        self.best = BestTrigger(cfg.min_progress, cfg.pl1_threshold * size * size * 3)
        self.history, self.stop_reason = [], None
        self.values = StepValues()

    def start_epoch(self, n: int) -> torch.Tensor:
        """This epoch's shuffled order of the n shadow images."""
        self.best.improved_this_epoch = False
        self.values = StepValues()
        return self.draws.epoch_order(n)

    def after_step(self, cos: float, l1: float, loss: float, mask: torch.Tensor, pattern: torch.Tensor) -> None:
        success = similar_enough(cos, self.cfg.thres)
        self.best.update(success, l1, mask, pattern)
        self.lambdas.step(success)
        self.values.add(loss, cos, l1)

    def end_epoch(self, epoch: int, lr: float, start: float) -> dict:
        record = epoch_record(epoch, self.values, lr, self.lambdas, self.best, start)
        self.history.append(record)
        if self.stop_reason is None:
            self.stop_reason = self.best.stop_reason(record["cos"], self.cfg)
        return record

    def summary(self, size: int) -> dict:
        found = self.best.mask is not None
        return {"restart": self.index, "seed": self.seed, "paper_draws": self.paper_draws,
                "l1": self.best.l1 if found else None,
                "pl1": pl1_norm(self.best.l1, size) if found else None, "epochs": len(self.history),
                "stop_reason": self.stop_reason}


def drop_rows(optimizer: torch.optim.Optimizer, keep: list[int]) -> list[torch.Tensor]:
    """Keep rows `keep` of every stacked parameter and of its Adam moments; returns the new parameters.

    Adam is elementwise (moments per entry, one shared step count), so the rows of one stacked Adam are K
    independent Adams, and a finished restart can leave the stack without changing the others."""
    group = optimizer.param_groups[0]
    rows = torch.tensor(keep, device=group["params"][0].device)
    params = []
    for old in group["params"]:
        new = old.detach()[rows].requires_grad_(True)
        state = optimizer.state.pop(old, {})
        optimizer.state[new] = {k: s[rows] if torch.is_tensor(s) and s.dim() > 0 else s for k, s in state.items()}
        params.append(new)
    group["params"] = params
    return params


PROGRESS_LEGEND = ("best_PL1: smallest trigger so far that reached |cos| > thres (the result; it only falls), "
                   "against the threshold; since_best: steps since it last improved, against the early-stop "
                   "patience; cos, PL1: the current trigger (this epoch's means)")


def progress_postfix(restarts: list, active: list, size: int, cfg: InversionConfig) -> dict:
    """What the run waits for: best PL1 vs the threshold, early-stop count vs its patience (leading restart)."""
    lead = min(active, key=lambda r: (r.best.l1, r.index))
    record = lead.history[-1]
    if lead.best.mask is None:
        status = {"best": f"none yet (needs |cos|>{cfg.thres})"}
    else:
        status = {"best_PL1": f"{pl1_norm(lead.best.l1, size):.4f} (thr {cfg.pl1_threshold})",
                  "since_best": f"{lead.best.stale_steps}/{cfg.early_stop_patience} steps"}
        if cfg.min_progress:
            status["since_progress"] = f"{lead.best.slow_steps}/{cfg.early_stop_patience} steps"
    status.update(cos=f"{record['cos']:.4f}", PL1=f"{pl1_norm(record['l1'], size):.4f}", lam=f"{record['lambda']:.0e}")
    if len(restarts) > 1:
        status["running"] = f"{len(active)}/{len(restarts)}"
    return status


def stop_message(result: "InversionResult", cfg: InversionConfig) -> str:
    """One line: why the run ended (the reason of the restart that gave the result)."""
    why = {STOP_EARLY: f"early stop: the best L1 did not improve for more than {cfg.early_stop_patience} steps "
                       f"while the epoch's mean |cos| was above {cfg.thres}",
           STOP_BUDGET: f"epoch budget: --epochs {cfg.max_epochs} reached",
           STOP_VERDICT: f"exact early exit: PL1 fell below the threshold {cfg.pl1_threshold} and can only fall "
                         "further, so the verdict is final (the PL1 is an upper bound)",
           STOP_SLOW: f"slow progress: for more than {cfg.early_stop_patience} steps the best PL1 fell by less than "
                      f"{cfg.min_progress:g} of its distance to the threshold {cfg.pl1_threshold} (--min_progress), "
                      "while the epoch's mean |cos| was above "
                      f"{cfg.thres}; the paper's run would go on and could only lower the PL1, so it is an upper "
                      "bound"}[result.stop_reason]
    return f"DECREE stopped after {result.epochs} epochs ({result.seconds:.1f} s): {why}"


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
    n, size = shadow.shape[0], shadow.shape[1]
    if n < 2:
        raise InversionError(f"the shadow set has {n} image(s); DECREE needs at least 2 per batch")
    if cfg.restarts < 1:
        raise ValueError(f"--restarts must be at least 1, not {cfg.restarts}")
    batch_size = min(cfg.batch_size, n)
    norm_mean, norm_std = (torch.tensor(c, dtype=dtype, device=device).view(1, 3, 1, 1) for c in (mean, std))
    memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format
    use_amp = amp_active(cfg, device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp)

    prepared = encoder if isinstance(encoder, PreparedEncoder) else prepare_encoder(encoder, cfg, progress)
    encoder = prepared.module
    paper_model = paper_build(*paper_encoder) if cfg.paper_draws and paper_encoder else None
    restarts = [Restart(k, cfg, size, dtype, device, paper_model) for k in range(cfg.restarts)]
    active = list(restarts)
    # one stacked (K,S,S) / (K,S,S,3) parameter pair: one encoder call per step serves every restart
    w = torch.stack([r.w for r in restarts]).requires_grad_(True)
    v = torch.stack([r.v for r in restarts]).requires_grad_(True)
    optimizer = torch.optim.Adam([w, v], lr=cfg.lr, betas=(0.5, 0.9))
    start, total_steps = time.time(), 0

    if progress:
        tqdm.write(PROGRESS_LEGEND, file=sys.stderr)
    bar = tqdm(desc=f"DECREE (up to {cfg.max_epochs} epochs)", unit="epoch", disable=not progress,
               dynamic_ncols=True)  # no total: the run usually ends at its early stop, long before the budget
    try:  # closed before any message of an interrupted run, so the message is the last line
        for epoch in range(cfg.max_epochs):
            lr = learning_rate(epoch, cfg)
            for group in optimizer.param_groups:
                group["lr"] = lr
            orders = torch.stack([r.start_epoch(n) for r in active]).to(device)  # (K, n)
            for first in range(0, n, batch_size):
                index = orders[:, first:first + batch_size]
                if index.shape[1] < 2:  # a last batch of one image has no pairs
                    continue
                # (K,1,S,S,3), broadcast on the batch; stamp and L1 use this one tensor, so its gradient adds their
                # terms in the paper's order
                mask, pattern = trigger_from_params(w.unsqueeze(1), v.unsqueeze(1))
                stamped = stamp(shadow[index], mask, pattern)  # (K,B,S,S,3)
                inputs = normalise(stamped.flatten(0, 1).permute(0, 3, 1, 2), norm_mean, norm_std).float().contiguous(
                    memory_format=memory_format)
                with autocast:
                    embeddings = encoder(inputs)
                cos = mean_pairwise_cos(embeddings.view(len(active), index.shape[1], -1))  # (K,)
                l1 = l1_norm(mask)[:, 0]
                lambda_ = torch.tensor([r.lambdas.lambda_ for r in active], dtype=l1.dtype, device=device)
                loss = -cos + lambda_ * l1
                optimizer.zero_grad(set_to_none=True)
                loss.sum().backward()  # each restart's loss depends on its own rows only
                optimizer.step()

                cos_values, l1_values, loss_values = torch.stack([cos.detach().double(), l1.detach().double(),
                                                                  loss.detach().double()]).tolist()  # one sync a step
                if not all(math.isfinite(c) for c in cos_values):
                    raise InversionError("the encoder returned NaN/inf embeddings; the checkpoint is broken or "
                                         "does not match --encoder_usage_info/--arch (try without --amp)")
                total_steps += 1
                for k, r in enumerate(active):
                    r.after_step(cos_values[k], l1_values[k], loss_values[k], mask[k, 0, ..., 0], pattern[k, 0])
                if cfg.stop_at_verdict and any(r.best.mask is not None and pl1_norm(r.best.l1, size) < cfg.pl1_threshold
                                               for r in active):
                    for r in active:
                        r.stop_reason = STOP_VERDICT
                    break

            records = [r.end_epoch(epoch, lr, start) for r in active]
            lead = min(active, key=lambda r: (r.best.l1, r.index))
            bar.update()
            bar.set_postfix(progress_postfix(restarts, active, size, cfg))
            if on_epoch is not None:
                on_epoch(records[active.index(lead)], lead.best)
            keep = [k for k, r in enumerate(active) if r.stop_reason is None]
            if len(keep) < len(active):
                if not keep:
                    break
                w, v = drop_rows(optimizer, keep)
                active = [active[k] for k in keep]
        for r in active:
            r.stop_reason = r.stop_reason or STOP_BUDGET
    finally:
        bar.close()
    if total_steps == 0:  # a result without a single optimisation step would be a verdict about nothing
        raise InversionError(f"no optimisation step ran ({cfg.max_epochs} epochs, batch size {batch_size}); "
                             "use --epochs >= 1 and --batch_size >= 2")

    chosen = min(restarts, key=lambda r: (r.best.l1, r.index))
    result = final_result(chosen.best, size, cfg, chosen.history, time.time() - start, stop_reason=chosen.stop_reason,
                          restarts=[r.summary(size) for r in restarts], amp_used=use_amp,
                          batchnorms_folded=prepared.batchnorms_folded)
    if progress:
        tqdm.write(stop_message(result, cfg), file=sys.stderr)  # beside the bar
    return result
