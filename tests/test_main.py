"""main.py as a user runs it: the paper's flags, the three output folders, files that agree with each other."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import main
import models
from conftest import smooth_images
from decree.outputs import run_id_for

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def encoder_and_data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("enc")
    torch.manual_seed(0)
    encoder = models.get_encoder("cifar10", "resnet18_w8")
    path = folder / "stl10_backdoored_encoder" / "model_1.pth"
    path.parent.mkdir()
    torch.save({"epoch": 1, "state_dict": encoder.state_dict()}, path)
    data = folder / "test.npz"
    np.savez(data, x=smooth_images(100, 32, seed=2), y=np.repeat(np.arange(10), 10).reshape(-1, 1))
    return path, data


def test_outputs_exist_parse_and_agree(encoder_and_data, tmp_path, capsys, monkeypatch):
    path, data = encoder_and_data
    result_file = tmp_path / "results.csv"
    (tmp_path / "data" / "cifar10").mkdir(parents=True)
    shutil.copy(data, tmp_path / "data" / "cifar10" / "test.npz")  # the paper's default shadow file
    monkeypatch.chdir(tmp_path)
    main.main(["--encoder_path", str(path), "--arch", "resnet18_w8", "--lr", "0.5",
               "--epochs", "4", "--out_dir", str(tmp_path), "--result_file", str(result_file),
               "--model_flag", "backdoor", "--device", "cpu", "--quiet", "--save_snapshots"])
    run_id = run_id_for(path)
    record = json.loads((tmp_path / "trigger_norm" / f"{run_id}.json").read_text())
    history = pd.read_csv(tmp_path / "detect_log" / f"{run_id}.csv")
    line = result_file.read_text().strip().split(",")
    assert record["l1"] == pytest.approx(history["best_l1"].iloc[-1])
    assert float(line[2]) == pytest.approx(record["l1"], abs=1e-4) and line[1] == "backdoor"
    assert record["pl1"] == pytest.approx(record["l1"] / 3072) and record["pl1_divisor"].endswith("3072")
    assert record["shadow_images"] == 10  # the paper's rule for its cifar10 file: 10% of each class
    assert record["config"]["lr"] == 0.5 and record["seed"] == 80 and record["device"] == "cpu"
    assert len(history) == record["epochs"]
    trigger = np.load(tmp_path / "trigger_inv" / run_id / "trigger.npz")
    assert trigger["mask"].dtype == np.float32 and trigger["mask"].shape == (32, 32)
    assert trigger["pattern"].dtype == np.uint8 and trigger["pattern"].shape == (32, 32, 3)
    assert 3 * trigger["mask"].sum() == pytest.approx(record["l1"], rel=1e-5)
    for name in ("mask.png", "pattern.png", "fusion.png"):
        assert (tmp_path / "trigger_inv" / run_id / name).stat().st_size > 0
    assert list((tmp_path / "trigger_inv" / run_id / "snapshots").glob("fusion_e*_reg*.png"))
    assert "PL1" in (tmp_path / "detect_log" / f"{run_id}.log").read_text()
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert record["verdict"].upper() in last and "threshold 0.1" in last and "3072" in last
    assert not list(tmp_path.rglob("*.tmp"))


def test_cli_runs_to_a_verdict_with_the_papers_flags(encoder_and_data, tmp_path):
    path, data = encoder_and_data
    cmd = [sys.executable, "main.py", "--encoder_path", str(path), "--encoder_usage_info", "cifar10",
           "--arch", "resnet18_w8", "--batch_size", "16", "--lr", "0.5", "--seed", "3", "--mask_init", "orc",
           "--thres", "0.99", "--model_flag", "clean", "--id", "my_run", "--shadow_data", str(data),
           "--shadow_size", "40", "--epochs", "2", "--device", "cpu", "--out_dir", str(tmp_path)]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1].split(": ")[1].split()[0] in ("TROJANED", "CLEAN")
    record = json.loads((tmp_path / "trigger_norm" / "my_run.json").read_text())
    assert record["shadow_images"] == 40 and record["config"]["mask_init"] == "orc" and record["seed"] == 3


def test_asking_for_cuda_without_cuda_is_one_line(encoder_and_data, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    path, data = encoder_and_data
    out = subprocess.run([sys.executable, "main.py", "--encoder_path", str(path), "--gpu", "0",
                          "--shadow_data", str(data), "--out_dir", str(tmp_path)],
                         cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    assert out.stderr.strip().count("\n") == 0 and "no CUDA" in out.stderr
    assert not (tmp_path / "trigger_norm").exists()
