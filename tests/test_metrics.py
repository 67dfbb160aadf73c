"""Detection metrics (sweeps/metrics.py) against values worked out by hand, and the one rule for who counts."""
import numpy as np
import pytest

from sweeps.metrics import BACKDOOR, CLEAN, auroc, by_truth, flagged, rates, roc_curve, row_truth, truth

# three backdoored and three clean encoders; 0.2 is a tie across the two, None is "no trigger found"
BACKDOOR_PL1 = [0.01, 0.2, 0.5]
CLEAN_PL1 = [0.2, 0.3, None]


def test_auroc_of_three_by_three_counts_the_tie_as_half():
    # pairs ordered right: 0.01 beats all three (3), 0.2 ties 0.2 and beats 0.3 and None (2.5), 0.5 beats None (1)
    assert auroc(BACKDOOR_PL1, CLEAN_PL1) == pytest.approx(6.5 / 9)
    assert auroc(CLEAN_PL1, BACKDOOR_PL1) == pytest.approx(2.5 / 9)  # the two sides' pairs add up to 1


def test_auroc_needs_both_sides():
    with pytest.raises(ValueError, match="at least one clean and one backdoored"):
        auroc(BACKDOOR_PL1, [])


def test_roc_curve_steps_through_every_pl1_and_encloses_the_auroc():
    fpr, tpr = roc_curve(BACKDOOR_PL1, CLEAN_PL1)
    # cuts -inf, 0.01, 0.2, 0.3, 0.5, inf (no trigger): flagged = PL1 <= cut
    assert fpr.tolist() == pytest.approx([0, 0, 1 / 3, 2 / 3, 2 / 3, 1])
    assert tpr.tolist() == pytest.approx([0, 1 / 3, 2 / 3, 2 / 3, 1, 1])
    area = float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2))
    assert area == pytest.approx(auroc(BACKDOOR_PL1, CLEAN_PL1))


def test_an_encoder_is_flagged_strictly_below_the_threshold_and_never_without_a_trigger():
    assert flagged(0.09, 0.1) and not flagged(0.1, 0.1) and not flagged(None, 0.1)


def test_rates_at_a_threshold():
    # at 0.25: backdoors 0.01 and 0.2 flagged, 0.5 missed; clean 0.2 flagged, 0.3 and None not
    assert rates(BACKDOOR_PL1, CLEAN_PL1, 0.25) == {
        "clean": 3, "backdoor": 3, "tp": 2, "fp": 1, "tn": 2, "fn": 1,
        "accuracy": pytest.approx(4 / 6), "tpr": pytest.approx(2 / 3), "fpr": pytest.approx(1 / 3)}
    none = rates([], [], 0.25)
    assert (none["accuracy"], none["tpr"], none["fpr"]) == (None, None, None)


def test_the_rule_counts_unmeasured_attacks_as_backdoors_and_failed_ones_nowhere():
    assert truth("clean") == CLEAN
    assert truth("backdoor", took=True) == BACKDOOR
    assert truth("backdoor", took=None) == BACKDOOR  # success not measured: the label is the truth
    assert truth("backdoor", took=False) is None     # measured, and the attack did not take
    assert truth("unknown") is None


def test_encoders_that_do_not_count_change_no_rate():
    rows = [{"label": "backdoor", "took": True, "pl1": 0.01}, {"label": "backdoor", "pl1": 0.5},
            {"label": "backdoor", "took": False, "pl1": 0.02}, {"label": "unknown", "pl1": 0.03},
            {"label": "clean", "pl1": 0.2}, {"label": "clean", "pl1": None}]
    backdoor, clean = by_truth([r["pl1"] for r in rows], [row_truth(r) for r in rows])
    assert (backdoor, clean) == ([0.01, 0.5], [0.2, None])
    found = rates(backdoor, clean, 0.1)
    assert (found["tp"], found["backdoor"], found["fp"], found["clean"]) == (1, 2, 0, 2)


def test_the_report_and_both_benchmarks_count_the_same_encoders():
    from experiments.bench_detection import family_metrics
    from experiments.benchmark_population import detection_rates, family_auroc
    from sweeps.report import detection_metrics
    rows = [{"label": "backdoor", "family": "sig", "took": True, "pl1": 0.01},
            {"label": "backdoor", "family": "sig", "took": None, "pl1": 0.5},
            {"label": "backdoor", "family": "sig", "took": False, "pl1": 0.02},
            {"label": "clean", "family": "clean-parent", "took": None, "pl1": 0.2},
            {"label": "clean", "family": "clean-control", "took": None, "pl1": None}]
    rows = [{**r, "status": "done", "asr": 50.0} for r in rows]
    pl1s = [r["pl1"] for r in rows]
    report = detection_metrics(rows, 0.1)
    bench = family_metrics(rows, ["sig"], 0.1)
    population = detection_rates(rows, pl1s, 0.1)
    assert report["tpr"] == bench["sig"]["tpr"] == population["tpr"] == 0.5
    assert report["fpr"] == bench["clean"]["fpr"] == population["fpr"] == 0.0
    assert report["auroc"] == bench["sig"]["auroc"] == family_auroc(rows, pl1s)["sig"] == 0.75
