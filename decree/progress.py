"""A run's progress on stderr: a legend, one bar that shows every epoch what the run waits for, then why it ended."""
import sys

from tqdm import tqdm

from .restarts import RestartStack, smallest_best
from .stop_reasons import stop_message

PROGRESS_LEGEND = ("best_PL1: smallest trigger so far that reached |cos| > thres (the result; it only falls), "
                   "against the threshold; since_best: steps since it last improved, against the early-stop "
                   "patience; cos, PL1: the current trigger (this epoch's means)")


def progress_postfix(stack: RestartStack, pl1, cfg) -> dict:
    """What the run waits for: best PL1 vs the threshold, early-stop count vs its patience (leading restart);
    `pl1` maps an L1 to its PL1-norm."""
    lead = smallest_best(stack.active)
    record = lead.history[-1]
    if lead.best.mask is None:
        status = {"best": f"none yet (needs |cos|>{cfg.thres})"}
    else:
        status = {"best_PL1": f"{pl1(lead.best.l1):.4f} (thr {cfg.pl1_threshold})",
                  "since_best": f"{lead.best.stale_steps}/{cfg.early_stop_patience} steps"}
        if cfg.min_progress:
            status["since_progress"] = f"{lead.best.slow_steps}/{cfg.early_stop_patience} steps"
    status.update(cos=f"{record['cos']:.4f}", PL1=f"{pl1(record['l1']):.4f}", lam=f"{record['lambda']:.0e}")
    if len(stack.restarts) > 1:
        status["running"] = f"{len(stack.active)}/{len(stack.restarts)}"
    return status


class ProgressBar:
    """The legend, then a bar that ticks once an epoch, with no total: the run usually ends at its early stop, long
    before the epoch budget. Closed when its `with` block ends, so the message of an interrupted run is the last
    line."""

    def __init__(self, cfg, enabled: bool, pl1):
        self.cfg, self.enabled, self.pl1 = cfg, enabled, pl1
        if enabled:
            tqdm.write(PROGRESS_LEGEND, file=sys.stderr)
        self.bar = tqdm(desc=f"DECREE (up to {cfg.max_epochs} epochs)", unit="epoch", disable=not enabled,
                        dynamic_ncols=True)

    def __enter__(self):
        return self

    def __exit__(self, *exception):
        self.bar.close()

    def epoch_done(self, stack: RestartStack) -> None:
        self.bar.update()
        self.bar.set_postfix(progress_postfix(stack, self.pl1, self.cfg))

    def finish(self, result) -> None:
        """Why the run ended, beside the bar."""
        if self.enabled:
            tqdm.write(stop_message(result, self.cfg), file=sys.stderr)
