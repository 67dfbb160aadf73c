"""The demo (scripts/demo.py): the tiny pipeline in CI, the real verdicts in the slow suite."""
import json

import numpy as np
import pandas as pd
import pytest

from datasets import load_trigger
from experiments.demo import QUICK, DemoConfig, checkerboard_trigger, result_table, run_demo

QUIET = {"device": "cpu", "progress": False, "log": lambda *args: None}


def test_checkerboard_trigger_sits_in_the_bottom_right_corner():
    pattern, keep = checkerboard_trigger(32, 6, margin=2)
    assert np.array_equal(np.argwhere(keep[0, :, :, 0] == 0).min(0), [24, 24])
    assert np.array_equal(np.argwhere(keep[0, :, :, 0] == 0).max(0), [29, 29])
    square = pattern[0, 24:30, 24:30, 0]
    cells = square[::2, ::2]  # 2 px cells, white in the top-left corner, alternating
    assert np.array_equal(cells, [[255, 0, 255], [0, 255, 0], [255, 0, 255]])
    assert np.array_equal(square, np.kron(cells, np.ones((2, 2))))
    assert pattern[keep == 1].max() == 0


def test_quick_demo_writes_every_output_and_reuses_its_encoders(tmp_path):
    out = tmp_path / "demo"
    outcome = run_demo(QUICK, out, **QUIET)

    for name in ("pretrain", "shadow", "reference", "trigger"):
        assert (out / "data" / f"{name}.npz").is_file()
    assert load_trigger(out / "data" / "trigger.npz").keep.shape == (1, 32, 32, 3)
    clean = out / "encoders" / "clean_encoder" / f"model_{QUICK.pretrain_epochs}.pth"
    backdoored = out / "encoders" / "demo_backdoored_encoder" / f"model_{QUICK.attack_epochs}.pth"
    assert clean.is_file() and backdoored.is_file()

    rows = outcome["rows"]
    assert [r["model_flag"] for r in rows] == ["clean", "backdoor"]
    for row in rows:
        run_id = row["run_id"]
        for name in ("mask.png", "pattern.png", "fusion.png", "trigger.npz"):
            assert (out / "trigger_inv" / run_id / name).is_file()
        assert (out / "detect_log" / f"{run_id}.log").is_file()
        assert len(pd.read_csv(out / "detect_log" / f"{run_id}.csv")) == row["epochs"]
        assert json.loads((out / "trigger_norm" / f"{run_id}.json").read_text())["l1"] == row["l1"]
    summary = pd.read_csv(out / "trigger_norm" / "summary.csv")
    assert sorted(summary["label"]) == ["backdoor", "clean"]
    for name in ("summary.json", "pl1.png", "gallery.png"):
        assert (out / "trigger_norm" / name).is_file()
    assert "encoders/clean_encoder" in result_table(rows)

    trained = (clean.stat().st_mtime_ns, backdoored.stat().st_mtime_ns)
    detected = [(out / "trigger_norm" / f"{row['run_id']}.json").stat().st_mtime_ns for row in rows]
    lines = []
    again = run_demo(QUICK, out, **{**QUIET, "log": lines.append})
    assert (clean.stat().st_mtime_ns, backdoored.stat().st_mtime_ns) == trained, "cached encoders were retrained"
    assert [(out / "trigger_norm" / f"{row['run_id']}.json").stat().st_mtime_ns for row in rows] == detected
    assert [row["pl1"] for row in again["rows"]] == [row["pl1"] for row in rows]
    steps = [line for line in lines if line.startswith(("data", "1/3", "2/3", "    ", "report"))]
    assert len(steps) == 6 and all(line.endswith("(cached)") for line in steps), lines
    assert not any("pre-training" in line or "inversion" in line for line in lines)
    run_demo(QUICK, out, retrain=True, **QUIET)
    assert clean.stat().st_mtime_ns != trained[0]
    assert all((out / "trigger_norm" / f"{row['run_id']}.json").stat().st_mtime_ns > mtime
               for row, mtime in zip(rows, detected)), "results of the old encoders were reused"


@pytest.mark.slow
def test_full_demo_flags_the_trojaned_encoder_and_passes_the_clean_one(tmp_path):
    outcome = run_demo(DemoConfig(), tmp_path / "demo", **QUIET)
    verdicts = {row["model_flag"]: row["verdict"] for row in outcome["rows"]}
    assert verdicts == {"clean": "clean", "backdoor": "trojaned"}, result_table(outcome["rows"])
    assert outcome["metrics"]["accuracy"] == 1.0
