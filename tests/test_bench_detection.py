"""The detection benchmark (scripts/bench_detection.py): the quick variant end to end, its cache, its metrics."""
import csv
import json
from pathlib import Path

import pytest

from common.device import describe_machine
from common.threads import usable_cores
from attacks.families import POISONING_FAMILIES
from experiments.real_parent import RealParentUnavailable, verified_weights
from experiments.bench_detection import (CLEAN_FAMILIES, QUICK, default_jobs, family_metrics, markdown_table,
                                         nearest_reference_asr, run_bench, second_test_table, settings_key)
from sweeps.discovery import read_manifest
from sweeps.metrics import roc_curve
from sweeps.report import write_report

ROOT = Path(__file__).resolve().parents[1]
QUIET = {"device": "cpu", "progress": False, "log": lambda *args: None}


def real_parent_installed() -> bool:
    try:
        verified_weights()
    except RealParentUnavailable:
        return False
    return True


REAL_ROLES = {"clean-parent", "clean-control", *QUICK.real_parent_families} if real_parent_installed() else set()


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    return out, run_bench(QUICK, out, **QUIET)


def test_quick_bench_writes_every_output(quick):
    out, outcome = quick
    families = {"clean-parent", "clean-control", *QUICK.families}
    with open(out / "manifest.csv", newline="") as fh:
        manifest = list(csv.DictReader(fh))
    toy = [r for r in manifest if r["arch"] == QUICK.arch]
    assert {r["family"] for r in toy} == families and len(toy) == len(families)
    # the real parent's lineage: its weights file as the parent, its children at 64 px (when it is installed)
    real = [r for r in manifest if r["arch"] == "mobilenet_v2_64"]
    assert {r["family"] for r in real} == REAL_ROLES and len(real) == len(REAL_ROLES)
    assert all(r["usage_info"] == "imagenet" for r in real) and len(toy) + len(real) == len(manifest)
    assert all(r["label"] == ("clean" if r["family"] in CLEAN_FAMILIES else "backdoor") for r in manifest)
    assert all((out / r["path"]).is_file() for r in manifest)
    population = json.loads((out / "population.json").read_text())
    for e in population["encoders"]:
        assert (e["family"] in CLEAN_FAMILIES) == ("asr" not in e)
        if "asr" in e:
            assert 0 <= e["asr"] <= 100 and -1 <= e["target_cos"] <= 1 and isinstance(e["took"], bool)

    detect = outcome["detect_dir"]
    with open(detect / "trigger_norm" / "summary.csv", newline="") as fh:
        summary = list(csv.DictReader(fh))
    assert {r["family"] for r in summary} == families  # the sweep carried the manifest's family column
    assert all(r["status"] == "done" for r in summary)
    for name in ("summary.json", "pl1.png", "gallery.png"):
        assert (detect / "trigger_norm" / name).is_file()

    report = json.loads((out / "report" / "bench.json").read_text())
    assert set(report["metrics"]) == {"clean", *QUICK.families, "all attacks"}
    assert report["metrics"]["clean"]["n"] == 2 and report["metrics"]["all attacks"]["n"] == len(QUICK.families)
    assert len(report["encoders"]) == len(families)
    every = report["encoders"] + (report["real_parent"]["encoders"] if REAL_ROLES else [])
    assert {r["run_id"] for r in report["not_taken"]} == {r["run_id"] for r in every
                                                          if r["label"] == "backdoor" and not r["took"]}
    md = (out / "report" / "bench.md").read_text()
    assert report["table"] in md and "| blend |" in md and describe_machine("cpu") in md  # stage times, machine
    assert "n/a" not in md and "| ctrl | poison |" in md and "WaNet's warp moves pixels by" in md
    assert report["second_test_table"] in md and "| DECREE alone TPR |" in md  # the warp test ran beside DECREE
    assert all(r["warp_gain"] is not None for r in report["encoders"])
    if REAL_ROLES:
        assert report["real_parent"]["metrics"]["clean"]["n"] == 2 and report["real_parent"]["table"] in md
    for name in ("roc.png", "pl1_by_family.png", "gallery.png"):
        assert (out / "report" / name).stat().st_size > 1000
    assert json.loads((out / "config.json").read_text())["config"]["families"] == list(QUICK.families)
    assert set(json.loads((out / "timings.json").read_text())) == {"population", "detect", "report"}


def test_a_rerun_reuses_every_stage_and_new_settings_redo_only_what_changed(quick):
    out, outcome = quick
    checkpoints = sorted(out.glob("encoders/*/model_*.pth"))
    stamps = {p: p.stat().st_mtime_ns for p in checkpoints}
    runs = {p: p.stat().st_mtime_ns for p in outcome["detect_dir"].glob("trigger_norm/*.json")
            if p.name != "summary.json"}  # one record per DECREE run; the sweep's report is rewritten
    run_bench(QUICK, out, stages=("population", "detect"), **QUIET)
    assert {p: p.stat().st_mtime_ns for p in checkpoints} == stamps
    assert {p: p.stat().st_mtime_ns for p in runs} == runs
    # another attack length: new children under new keys, the parent (and the old children) kept
    from dataclasses import replace
    longer = replace(QUICK, attack_epochs=2)
    run_bench(longer, out, stages=("population",), **QUIET)
    after = sorted(out.glob("encoders/*/model_*.pth"))
    # a poisoned encoder is pre-trained; DRUPE trains for its own --drupe_epochs
    fine_tuned = [f for f in QUICK.families if f not in POISONING_FAMILIES and f != "drupe"]
    real_retrained = REAL_ROLES - {"clean-parent", "drupe"}  # the real parent is a file we never train
    assert set(checkpoints) < set(after)
    assert len(after) == len(checkpoints) + len(fine_tuned) + 1 + len(real_retrained)
    assert all(p.stat().st_mtime_ns == stamps[p] for p in checkpoints)


def test_a_stage_without_its_inputs_is_a_one_line_error(tmp_path, capsys, monkeypatch):
    import runpy
    import sys
    for stage in ("detect", "report"):
        with pytest.raises(FileNotFoundError, match="run --stage population first"):
            run_bench(QUICK, tmp_path, stages=(stage,), **QUIET)
    monkeypatch.setattr(sys, "argv", ["bench_detection.py", "--quick", "--stage", "report", "--out_dir",
                                      str(tmp_path), "--device", "cpu"])
    with pytest.raises(SystemExit) as stop:
        runpy.run_path(str(ROOT / "scripts" / "bench_detection.py"), run_name="__main__")
    assert stop.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and "run --stage population first" in error[0]


def test_cpu_trains_one_single_threaded_encoder_per_core_and_bad_sizes_are_refused(tmp_path, capsys, monkeypatch):
    import runpy
    import sys
    assert default_jobs("cpu") == usable_cores() and default_jobs("cuda") == 1
    for flag in ("--jobs", "--attack_images", "--parents"):
        monkeypatch.setattr(sys, "argv", ["bench_detection.py", flag, "0", "--out_dir", str(tmp_path / "never")])
        with pytest.raises(SystemExit) as stop:
            runpy.run_path(str(ROOT / "scripts" / "bench_detection.py"), run_name="__main__")
        error = capsys.readouterr().err.strip().splitlines()
        assert stop.value.code == 2 and len(error) == 1 and flag in error[0]
    assert not (tmp_path / "never").exists()


def test_settings_key_is_stable_and_order_free():
    assert settings_key({"a": 1, "b": [2, 3]}) == settings_key({"b": [2, 3], "a": 1}) != settings_key({"a": 2})


def row(family, pl1, took=True, label=None):
    return {"family": family, "pl1": pl1, "took": took, "status": "done", "asr": 90.0 if took else 5.0,
            "label": label or ("clean" if family in CLEAN_FAMILIES else "backdoor")}


def test_family_metrics_count_only_attacks_that_took_against_every_clean_encoder():
    rows = [row("clean-parent", 0.2), row("clean-control", 0.05), row("clean-parent", None),
            row("sig", 0.01), row("sig", 0.3), row("sig", 0.02, took=False),
            row("wanet", 0.5, took=False)]
    m = family_metrics(rows, ["sig", "wanet"], threshold=0.1)
    assert m["clean"] == {"n": 3, "fp": 1, "fpr": pytest.approx(1 / 3), "pl1_mean": pytest.approx(0.125),
                          "pl1_min": 0.05, "pl1_max": 0.2, "no_trigger_found": 1}
    sig = m["sig"]
    assert (sig["n"], sig["took"], sig["detected"]) == (3, 2, 1) and sig["tpr"] == 0.5
    assert sig["auroc"] == pytest.approx((3 + 1) / 6)  # 0.01 beats all 3 clean, 0.3 beats only "none"
    assert (sig["pl1_min"], sig["pl1_max"]) == (0.01, 0.3)
    assert m["wanet"]["took"] == 0 and m["wanet"]["tpr"] is None and m["wanet"]["auroc"] is None
    assert m["all attacks"]["n"] == 4 and m["all attacks"]["took"] == 2
    table = markdown_table(m, ["sig", "wanet"], 0.1)
    assert "| sig | fine-tune | 3 | 2/3 |" in table and "FPR 0.33 (1/3)" in table
    assert "n/a" not in table and "| wanet | fine-tune | 1 | 0/1 | 5.0 | - | - | - | - |" in table


def test_asr_counts_each_stamped_image_against_its_nearest_reference_and_skips_its_own_class():
    import torch
    z_refs = torch.eye(3)[:2]                    # two references, probe classes 5 and 7
    z = torch.tensor([[1.0, 0, 0], [0.9, 0.1, 0], [0, 1.0, 0], [0.1, 0.9, 0], [0, 1.0, 0]])
    predicted = torch.tensor([5, 2, 7, 7, 7])    # images 0, 2, 3, 4 land in their nearest reference's class
    labels = [0, 1, 2, 3, 7]                     # image 4 is of its reference's class: not counted
    assert nearest_reference_asr(z, predicted, z_refs, torch.tensor([5, 7]), labels) == 75.0
    # one reference: the class the probe gives it for every image, as for every single-reference family
    assert nearest_reference_asr(z, predicted, z_refs[:1], torch.tensor([7]), labels) == 50.0


def test_roc_curve_runs_from_nothing_flagged_to_everything():
    fpr, tpr = roc_curve([0.01, 0.3], [0.2, None])
    assert (fpr[0], tpr[0]) == (0, 0) and (fpr[-1], tpr[-1]) == (1, 1)
    assert list(zip(fpr, tpr))[1] == (0, 0.5)


def test_manifest_family_reaches_the_sweep_summary(tmp_path):
    manifest = tmp_path / "m.csv"
    manifest.write_text("path,label,family\na.pth,clean,clean-parent\nb.pth,backdoor,sig\n")
    encoders = read_manifest(manifest)
    assert [e.family for e in encoders] == ["clean-parent", "sig"]
    write_report(tmp_path, 0.1, encoders)
    with open(tmp_path / "trigger_norm" / "summary.csv", newline="") as fh:
        assert [r["family"] for r in csv.DictReader(fh)] == ["clean-parent", "sig"]


def warp_row(family, pl1, gain, took=True):
    """A finished row with the warp test (threshold 0.07) and the combined verdict, as the sweep report makes it."""
    from decree.target import ranking_score
    flagged = gain > 0.07
    decree = ranking_score(pl1, 0.1)
    return {**row(family, pl1, took), "verdict": "trojaned" if pl1 < 0.1 else "clean", "score": decree,
            "warp_gain": gain, "warp_verdict": "flagged" if flagged else "not flagged",
            "combined_verdict": "trojaned" if pl1 < 0.1 or flagged else "clean",
            "combined_score": max(decree, gain / (gain + 0.07))}


def test_the_second_test_table_gives_decree_the_warp_test_and_both_per_family():
    rows = [warp_row("clean-parent", 0.2, 0.02), warp_row("clean-control", 0.18, 0.08),
            warp_row("wanet", 0.15, 0.2), warp_row("wanet", 0.12, 0.05), warp_row("sig", 0.05, 0.01)]
    m = family_metrics(rows, ["sig", "wanet"], threshold=0.1)
    wanet = m["wanet"]["tests"]
    assert (wanet["decree"]["tp"], wanet["warp"]["tp"], wanet["combined"]["tp"]) == (0, 1, 1)
    assert wanet["decree"]["auroc"] == 1.0 and wanet["warp"]["auroc"] == 0.75
    assert m["clean"]["tests"]["warp"]["fp"] == 1 and m["clean"]["tests"]["decree"]["fp"] == 0
    assert m["all attacks"]["tests"]["combined"]["tp"] == 2
    table = second_test_table(m, ["sig", "wanet"])
    assert "| wanet | 2/2 | 0.00 (0/2) | 1.00 | 0.50 (1/2) | 0.75 | 0.50 (1/2) |" in table
    assert "| clean (parents + controls) | - | FPR 0.00 (0/2) | - | FPR 0.50 (1/2) | - | FPR 0.50 (1/2) | - |" in table
    assert second_test_table(family_metrics([row("sig", 0.05)], ["sig"], 0.1), ["sig"]) == ""
