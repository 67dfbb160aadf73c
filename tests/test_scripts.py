"""Every script a user runs starts and documents its flags (catches broken imports in rarely used scripts)."""
import runpy
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = ["main.py", "run_decree.py", "attack_encoder.py", "pretrain_encoder.py", "scripts/demo.py",
           "scripts/benchmark.py", "scripts/bench_detection.py", "scripts/make_triggers.py", "scripts/make_reference.py",
           "scripts/run_attack_encoder.py", "validate/compute_zscore.py", "validate/script_compute_zscore.py",
           "validate/val_cifar10_training_downstream_classifier.py"]


@pytest.mark.parametrize("script", SCRIPTS)
def test_script_help(script, capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", [script, "--help"])
    with pytest.raises(SystemExit) as stop:
        runpy.run_path(str(REPO / script), run_name="__main__")
    assert stop.value.code == 0
    assert "usage:" in capsys.readouterr().out


def test_paper_flags_still_accepted_by_main(capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["main.py", "--help"])
    with pytest.raises(SystemExit):
        runpy.run_path(str(REPO / "main.py"), run_name="__main__")
    usage = capsys.readouterr().out
    for flag in ("--encoder_path", "--encoder_usage_info", "--arch", "--batch_size", "--lr", "--seed", "--mask_init",
                 "--thres", "--result_file", "--gpu", "--model_flag", "--id", "--device", "--out_dir"):
        assert flag in usage, flag
