"""Restarts (cfg.restarts): independent inversions run together, the one with the smallest L1 the run's result.

Restart 0 is the single run and draws exactly what it draws; the others draw independent streams of the same seed.
Their free tensors are the rows of one stacked parameter pair, w (K,S,S) and v (K,S,S,3), under one Adam, so one
encoder call per step serves every restart. Adam is elementwise (moments per entry, one shared step count), so the
rows are K independent Adams, and a finished restart can leave the stack without changing the others.
"""
import numpy as np
import torch

from .paper_draws import PaperDraws


def restart_seed(seed: int, index: int) -> int:
    """Restart 0 draws exactly what a single run draws; the others get independent streams of the same seed."""
    return seed if index == 0 else int(np.random.SeedSequence([seed, index]).generate_state(1)[0])


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


class Restart:
    """One of a run's independent inversions: its draws, lambda schedule and best trigger (inversion.LambdaSchedule,
    inversion.BestTrigger), the record of each of its epochs, and why it ended (None while it runs).

    `paper_model`: what the paper's main.py builds before its draws (paper_draws.paper_build), or None; with it,
    restart 0 draws as the paper's run does. Every other restart has its own generator."""

    def __init__(self, index: int, seed: int, paper_model, lambdas, best):
        self.index, self.seed = index, restart_seed(seed, index)
        self.paper_draws = index == 0 and paper_model is not None
        self.draws = PaperDraws(seed, paper_model) if self.paper_draws else OwnDraws(self.seed)
        self.lambdas, self.best = lambdas, best
        self.history, self.stop_reason = [], None

    def start_epoch(self, n: int) -> torch.Tensor:
        """int64 (n,): this epoch's shuffled order of the n shadow images."""
        self.best.improved_this_epoch = False
        return self.draws.epoch_order(n)


def smallest_best(restarts: list[Restart]) -> Restart:
    """The restart whose best trigger has the smallest L1 (the first on ties)."""
    return min(restarts, key=lambda r: (r.best.l1, r.index))


def drop_rows(optimizer: torch.optim.Optimizer, keep: list[int]) -> list[torch.Tensor]:
    """Keep rows `keep` of every stacked parameter and of its Adam moments; returns the new parameters."""
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


class RestartStack:
    """A run's restarts and their free tensors stacked, w (K,S,S) and v (K,S,S,3): row k belongs to active[k], the
    restarts still running."""

    def __init__(self, restarts: list[Restart], params: list[tuple[torch.Tensor, torch.Tensor]]):
        self.restarts, self.active = restarts, list(restarts)
        self.w = torch.stack([w.detach() for w, _ in params]).requires_grad_(True)
        self.v = torch.stack([v.detach() for _, v in params]).requires_grad_(True)

    def start_epoch(self, n: int, device) -> torch.Tensor:
        """int64 (K,n): every active restart's shuffled order of the n shadow images for this epoch."""
        return torch.stack([r.start_epoch(n) for r in self.active]).to(device)

    def stop_running(self, reason: str) -> None:
        """Every active restart without a reason to stop yet stops for `reason`."""
        for r in self.active:
            r.stop_reason = r.stop_reason or reason

    def drop_finished(self, optimizer: torch.optim.Optimizer) -> bool:
        """Take the restarts that have a reason to stop out of the stack and of `optimizer`, which holds (w, v); False
        once none is left running."""
        keep = [k for k, r in enumerate(self.active) if r.stop_reason is None]
        if not keep:
            return False
        if len(keep) < len(self.active):
            self.w, self.v = drop_rows(optimizer, keep)
            self.active = [self.active[k] for k in keep]
        return True
