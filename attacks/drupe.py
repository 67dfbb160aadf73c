"""DRUPE (Tao et al., "Distribution Preserving Backdoor Attack in Self-supervised Learning", S&P 2024, arXiv
2312.14283), trained as its authors' code (Gwinhen/DRUPE, main.py, mode drupe, CIFAR10 setting) trains it:
BadEncoder towards the nearest of several target-class references, plus two terms that keep the stamped
embeddings spread out and distributed like clean ones, so they do not collapse onto one point, which is the
concentration DECREE looks for.

Per batch (f the trained encoder, f0 the clean one, x the shadow batch, r_1..r_R the references):

    cos_ib   = cos(f(stamp(x_b)), f(r_i))                                (R,B)
    L0       = -mean_b max_i cos_ib                                       nearest reference
    L1, L2   BadEncoder's (attacks.badencoder)
    balance  = std_i mean_b cos_ib                                        the references pull alike
    L3       = mean over pairs i <= j of cos(f(r_i), f(r_j))              (diagonal included, as theirs)
    push     = L3 above 0.5, 0.2 L3 above 0.4, else 0                     references pushed apart
    sim      = mean pairwise cosine of the stamped embeddings
    sw       = sliced Wasserstein(raw f(stamp(x)), raw f(x)) / (std of raw f(x), mean over dimensions)

Schedule (their 200 epochs; scale_phases maps it onto fewer):

    epoch 1        warm-up: lambda1 L1 + lambda2 L2 + 0.5 L3 (- 0.2 L3 below 0.2); no backdoor term
    epochs 2-4     L0 + lambda1 L1 + lambda2 L2 + 2 balance + push
    epochs 5-      L0 + lambda1 L1 + lambda2 L2 + w_cos (balance + sim) + w_sw sw + 0.5 balance
                   (+ 1.5 balance above 0.1) + push;  w_cos starts at 0.1, w_sw at 0.001
    after epoch 20 the weights adapt after every epoch (DrupeWeights.adapt)
    after epoch 24 the encoder kept is the first with the smallest measure (their best.pth)
"""
import copy
import math
from dataclasses import dataclass

import torch

from decree.inversion import mean_pairwise_cos

from .badencoder import BadEncoderConfig, badencoder_losses, reference_cosines, train_badencoder

INIT_COSINE_WEIGHT = 0.1
INIT_DISTANCE_WEIGHT = 0.001
WEIGHT_UP = 1.25
WEIGHT_DOWN = 1.25 ** 1.25
PATIENCE = 1
# epoch means of L0, L1, L2 below these: the backdoor is effective (their CIFAR10 thresholds)
EFFECTIVE_BELOW = (-0.96, -0.9, -0.9)
SPREAD_BELOW = 0.6       # DRUPE's goal for the stamped embeddings' mean pairwise cosine
WELL_SPREAD_BELOW = 0.5  # below it, the cosine weight skips its next raise
SW_PROJECTIONS = 50      # POT's default, which their code uses


@dataclass(frozen=True)
class Phases:
    """Where each phase ends (epochs counted from 1): warm-up through `warm_up`, BadEncoder with the balance
    term through `badencoder`, distribution terms after; weights adapt after epochs > adapt_after, the kept
    encoder is chosen among epochs > select_after."""
    epochs: int
    warm_up: int
    badencoder: int
    adapt_after: int
    select_after: int


AUTHORS_PHASES = Phases(epochs=200, warm_up=1, badencoder=4, adapt_after=20, select_after=24)


def scale_phases(total_epochs: int) -> Phases:
    """DRUPE's schedule on `total_epochs`: the warm-up epoch and the three BadEncoder epochs stay as they are
    (one epoch is already the smallest unit); the epochs after them (196 of the authors' 200) are scaled
    linearly, so the weights stay at their initial values and the selection waits for the same fraction of
    them. At 200 epochs this is the authors' schedule exactly."""
    a = AUTHORS_PHASES
    if total_epochs <= a.badencoder:
        raise ValueError(f"DRUPE needs at least {a.badencoder + 1} epochs (a warm-up epoch, three BadEncoder "
                         f"epochs and one with its distribution terms), got {total_epochs}; raise --drupe_epochs")
    scale = (total_epochs - a.badencoder) / (a.epochs - a.badencoder)

    def at(epoch):
        return a.badencoder + round((epoch - a.badencoder) * scale)
    return Phases(total_epochs, a.warm_up, a.badencoder, at(a.adapt_after), at(a.select_after))


def sliced_wasserstein(a: torch.Tensor, b: torch.Tensor, generator: torch.Generator,
                       projections: int = SW_PROJECTIONS) -> torch.Tensor:
    """Sliced 2-Wasserstein distance between two equal-size point sets float (N,D) over random unit
    directions: sqrt of the mean over directions of the squared 1-D transport cost."""
    directions = torch.randn(a.shape[1], projections, generator=generator).to(a.device)
    directions = directions / directions.norm(dim=0, keepdim=True)
    pa, _ = (a @ directions).sort(dim=0)
    pb, _ = (b @ directions).sort(dim=0)
    return ((pa - pb) ** 2).mean().sqrt()


def reference_similarity(z_refs: torch.Tensor) -> torch.Tensor:
    """L3: mean cosine over reference pairs i <= j (each reference with itself included, as in their code)."""
    r = len(z_refs)
    return (z_refs @ z_refs.T).triu().sum() / (r * (r + 1) / 2)


def reference_push(loss3: torch.Tensor) -> torch.Tensor:
    """Their term pushing the references apart: L3 above 0.5, 0.2 L3 above 0.4, else nothing."""
    return torch.where(loss3 > 0.5, loss3, torch.where(loss3 > 0.4, 0.2 * loss3, torch.zeros_like(loss3)))


def adapted(weight: float, initial: float, up: int, down: int, good: bool) -> tuple[float, int, int]:
    """One weight's step of their schedule: after PATIENCE good epochs in a row x WEIGHT_UP (from `initial` if
    it had fallen to 0), after PATIENCE bad ones / WEIGHT_DOWN; returns (weight, up, down) counters."""
    up, down = (up + 1, 0) if good else (0, down + 1)
    if up >= PATIENCE:
        return (weight * WEIGHT_UP if weight else initial), 0, down
    if down >= PATIENCE:
        return weight / WEIGHT_DOWN, up, 0
    return weight, up, down


@dataclass
class DrupeWeights:
    """The adaptive weights and their counters (their cost / cost_1), and the selection measure."""
    cosine: float = INIT_COSINE_WEIGHT
    distance: float = INIT_DISTANCE_WEIGHT
    up: int = 0
    down: int = 0
    up_distance: int = 0
    down_distance: int = 0
    measure: float = 0.0   # their args.measure starts at 0: see keep()
    best: float = math.inf

    def adapt(self, loss0: float, loss1: float, loss2: float, sim: float, distance: float) -> None:
        """After an epoch: loss0-2 its means; sim and distance (unscaled sw) those of its last batch, as their
        code reads them. Effective backdoor: the cosine weight x1.25, else / 1.25**1.25; effective and sim
        below 0.6: the distance weight likewise, the measure becomes `distance`, and below 0.5 the cosine
        weight's next raise is skipped."""
        effective = (loss0 < EFFECTIVE_BELOW[0] and loss1 < EFFECTIVE_BELOW[1] and loss2 < EFFECTIVE_BELOW[2])
        self.cosine, self.up, self.down = adapted(self.cosine, INIT_COSINE_WEIGHT, self.up, self.down, effective)
        spread = effective and sim < SPREAD_BELOW
        if spread:
            if sim < WELL_SPREAD_BELOW:
                self.up -= 1
            self.measure = distance
        self.distance, self.up_distance, self.down_distance = adapted(
            self.distance, INIT_DISTANCE_WEIGHT, self.up_distance, self.down_distance, spread)

    def keep(self) -> bool:
        """Their best.pth rule: keep this epoch's encoder when the measure is below the best so far. The measure
        starts at 0 and only changes in an epoch that is effective and spread out, so if none was before the
        selection starts, its first epoch is kept for good."""
        if self.measure < self.best:
            self.best = self.measure
            return True
        return False


class DrupeObjective:
    """DRUPE's loss on a batch (see the module doc) and, after each epoch, its weights and selection."""

    def __init__(self, cfg: BadEncoderConfig, phases: Phases):
        self.cfg, self.phases = cfg, phases
        self.weights = DrupeWeights()
        self.generator = torch.Generator().manual_seed(cfg.seed)  # the sliced Wasserstein directions
        self.last = None        # the last batch's sim and sw distance, detached (read once an epoch)
        self.kept_state, self.kept_epoch = None, None

    def __call__(self, epoch: int, e, clean_x, clean_references, pairing) -> dict:
        if pairing is None or len(e.references) < 2:
            raise ValueError("DRUPE needs a trigger and at least two reference images")
        losses = badencoder_losses(e, clean_x, clean_references, pairing)
        cos = reference_cosines(e, pairing)  # (R,B)
        loss0 = -cos.max(0).values.mean()
        balance = cos.mean(1).std()
        loss3 = reference_similarity(e.references)
        sim = mean_pairwise_cos(e.stamped[0])
        distance = sliced_wasserstein(e.raw_stamped[0], e.raw_x, self.generator)
        sw = distance / e.raw_x.std(0).mean()
        self.last = (sim.detach(), distance.detach())
        cfg, w, p = self.cfg, self.weights, self.phases
        kept = cfg.lambda1 * losses["loss1"] + cfg.lambda2 * losses["loss2"]
        if epoch <= p.warm_up:
            loss = kept + 0.5 * loss3 - torch.where(loss3 < 0.2, 0.2 * loss3, torch.zeros_like(loss3))
        elif epoch <= p.badencoder:
            loss = loss0 + kept + 2 * balance + reference_push(loss3)
        else:
            loss = (loss0 + kept + w.cosine * (balance + sim) + w.distance * sw + 0.5 * balance
                    + torch.where(balance > 0.1, 1.5 * balance, torch.zeros_like(balance)) + reference_push(loss3))
        return {"loss": loss, "loss0": loss0, "loss1": losses["loss1"], "loss2": losses["loss2"],
                "balance": balance, "loss3": loss3, "stamped_cos": sim, "sw": sw}

    def end_epoch(self, epoch: int, f, record: dict) -> None:
        """Record the weights this epoch trained with, then adapt them and apply the selection rule."""
        w = self.weights
        sim, distance = (float(v) for v in self.last)
        record.update(w_cos=w.cosine, w_sw=w.distance, last_stamped_cos=sim, last_distance=distance)
        if epoch > self.phases.adapt_after:
            w.adapt(record["loss0"], record["loss1"], record["loss2"], sim, distance)
        record["kept"] = epoch > self.phases.select_after and w.keep()
        if record["kept"]:
            self.kept_state, self.kept_epoch = copy.deepcopy(f.state_dict()), epoch


@dataclass
class DrupeResult:
    encoder: torch.nn.Module   # the encoder their selection keeps
    last: torch.nn.Module      # the encoder after the last epoch
    kept_epoch: int
    history: list
    phases: Phases


def train_drupe(clean_encoder, shadow_images, trigger, references, mean, std, cfg: BadEncoderConfig, device,
                progress: bool = True) -> DrupeResult:
    """DRUPE on BadEncoder's loop for cfg.epochs epochs (scale_phases); references uint8 (R,H,W,3), R >= 2,
    distinct target-class images. Returns the kept and the last encoder with the per-epoch history."""
    if len(references) < 2:
        raise ValueError(f"DRUPE pulls stamped images to the nearest of several references; got {len(references)}")
    if len(torch.as_tensor(references).flatten(1).unique(dim=0)) < len(references):
        raise ValueError("DRUPE's references must be distinct images; two of them are identical")
    phases = scale_phases(cfg.epochs)
    objective = DrupeObjective(cfg, phases)
    last, history = train_badencoder(clean_encoder, shadow_images, trigger, references, mean, std, cfg, device,
                                     progress, objective=objective)
    kept = copy.deepcopy(last)
    kept.load_state_dict(objective.kept_state)
    return DrupeResult(kept, last, objective.kept_epoch, history, phases)
