"""Detection metrics over PL1-norms, for the sweep report and both benchmarks: AUROC, the ROC curve, TPR and FPR.

An encoder is flagged when its PL1-norm is below the threshold (docs/method.md). A PL1 of None (no trigger
found) ranks as infinite: never flagged, the least suspicious.

Which encoders count, and as what (`truth`), one rule everywhere:
  - label 'clean': a clean encoder (FPR, AUROC);
  - label 'backdoor': a backdoored encoder (TPR, AUROC), also when its attack's success was not measured: the
    label is then the only truth there is, as for every encoder of a sweep report, which measures no attack;
  - label 'backdoor' but its attack was measured and did not take: in neither rate nor AUROC. It carries no
    backdoor to find, so counting it either way would score DECREE on the attacker's failure; the benchmarks
    list it apart;
  - any other label ('unknown': nobody gave the truth): in neither rate nor AUROC.
"""
import math

import numpy as np

CLEAN, BACKDOOR = "clean", "backdoor"  # an encoder's truth, as sweeps label encoders


def truth(label: str, took: bool | None = None) -> str | None:
    """CLEAN, BACKDOOR, or None (not counted) for an encoder with `label` whose attack took (`took`: True, False,
    or None when not measured); the rule is the module's."""
    if label == CLEAN:
        return CLEAN
    if label == BACKDOOR and took is not False:
        return BACKDOOR
    return None


def row_truth(row: dict) -> str | None:
    """`truth` of a report or benchmark row: its 'label', and its 'took' where the attack's success was measured."""
    return truth(row["label"], row.get("took"))


def pl1_or_inf(pl1: float | None) -> float:
    """PL1 as a number to rank by: None (no trigger found) is infinite, the least suspicious."""
    return math.inf if pl1 is None else pl1


def flagged(pl1: float | None, threshold: float) -> bool:
    """DECREE's verdict: trojaned when the PL1-norm is below the threshold."""
    return pl1_or_inf(pl1) < threshold


def score_auroc(score_backdoor, score_clean) -> float:
    """P(a backdoored encoder scores higher than a clean one), ties counting half: the area under the ROC curve."""
    bad = np.asarray(score_backdoor, dtype=float)[:, None]
    good = np.asarray(score_clean, dtype=float)[None, :]
    if bad.size == 0 or good.size == 0:
        raise ValueError("AUROC needs at least one clean and one backdoored encoder")
    return float((bad > good).mean() + 0.5 * (bad == good).mean())


def auroc(pl1_backdoor, pl1_clean) -> float:
    """P(a backdoored encoder has a lower PL1 than a clean one), ties counting half; None PL1 = infinite."""
    return score_auroc([-pl1_or_inf(v) for v in pl1_backdoor], [-pl1_or_inf(v) for v in pl1_clean])


def roc_curve(pl1_backdoor, pl1_clean) -> tuple[np.ndarray, np.ndarray]:
    """(FPR, TPR) flagging PL1 <= each cut, from nothing flagged (0, 0) to every encoder flagged (1, 1); its area
    (trapezoids) is `auroc`."""
    bad = np.array([pl1_or_inf(v) for v in pl1_backdoor], dtype=float)
    good = np.array([pl1_or_inf(v) for v in pl1_clean], dtype=float)
    cuts = np.concatenate([[-math.inf], np.unique(np.concatenate([bad, good]))])
    return np.array([(good <= c).mean() for c in cuts]), np.array([(bad <= c).mean() for c in cuts])


def by_truth(pl1s, truths) -> tuple[list, list]:
    """(PL1s of the backdoored encoders, PL1s of the clean ones), from parallel lists of PL1s and `truth`s; the
    encoders that do not count (truth None) are left out."""
    return ([pl1 for pl1, t in zip(pl1s, truths) if t == BACKDOOR],
            [pl1 for pl1, t in zip(pl1s, truths) if t == CLEAN])


def rates(pl1_backdoor, pl1_clean, threshold: float) -> dict:
    """Counts and rates at `threshold`: clean, backdoor, tp, fp, tn, fn, and accuracy, tpr, fpr (None where no
    encoder defines one)."""
    return flag_rates([flagged(pl1, threshold) for pl1 in pl1_backdoor], [flagged(pl1, threshold) for pl1 in pl1_clean])


def flag_rates(flags_backdoor, flags_clean) -> dict:
    """`rates` from verdicts (True = flagged) of the backdoored and the clean encoders: any test's, or combined."""
    tp, fp = sum(map(bool, flags_backdoor)), sum(map(bool, flags_clean))
    backdoor, clean = len(flags_backdoor), len(flags_clean)
    return {"clean": clean, "backdoor": backdoor, "tp": tp, "fp": fp, "tn": clean - fp, "fn": backdoor - tp,
            "accuracy": (tp + clean - fp) / (backdoor + clean) if backdoor + clean else None,
            "tpr": tp / backdoor if backdoor else None, "fpr": fp / clean if clean else None}
