"""run_decree.py sweeps: discovery, labels, shards, failures and resuming after a kill, on tiny CPU encoders."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import run_decree
from conftest import PlantedBackdoorEncoder, RandomFeatureEncoder, smooth_images
from datasets import save_npz_dataset
from decree.outputs import run_id_for
from decree.sweep import (Encoder, discover_output_folder, infer_label, read_manifest, select_shard,
                          shard_from_slurm)

ROOT = Path(__file__).resolve().parents[1]
# one thread per process: the same floating-point sums for any --workers, and polite on a shared machine
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")]), "OMP_NUM_THREADS": "1"}
GOOD = [("planted_1.pth", "planted", "backdoor"), ("planted_2.pth", "planted", "backdoor"),
        ("clean_1.pth", "random_features", "clean"), ("clean_2.pth", "random_features", "clean")]
BROKEN = ("broken.pth", "planted", "backdoor")


@pytest.fixture(scope="module")
def encoders(tmp_path_factory):
    """Two planted-backdoor and two clean tiny encoders, an unreadable checkpoint, a shadow set."""
    folder = tmp_path_factory.mktemp("encoders")
    for seed in (1, 2):
        torch.save(PlantedBackdoorEncoder(dim=64, seed=seed).state_dict(), folder / f"planted_{seed}.pth")
        torch.save(RandomFeatureEncoder(dim=64, seed=seed).state_dict(), folder / f"clean_{seed}.pth")
    (folder / "broken.pth").write_bytes(np.random.default_rng(0).bytes(2000))
    save_npz_dataset(folder / "shadow.npz", smooth_images(64, 32, seed=1), np.zeros(64, dtype=np.int64))
    return folder


def write_manifest(folder: Path, name: str, rows) -> Path:
    path = folder / name
    path.write_text("path,usage_info,arch,label\n" + "".join(f"{p},cifar10,{a},{lab}\n" for p, a, lab in rows))
    return path


def sweep_command(encoders: Path, manifest: Path, out_dir: Path, workers: int = 2) -> list[str]:
    return [sys.executable, "run_decree.py", "--manifest", str(manifest), "--arch_module", "planted_arch",
            "--shadow_data", str(encoders / "shadow.npz"), "--epochs", "12", "--workers", str(workers), "--quiet",
            "--out_dir", str(out_dir)]


@pytest.fixture(scope="module")
def sweep(encoders, tmp_path_factory):
    """One uninterrupted sweep over the four encoders and the broken file."""
    out_dir = tmp_path_factory.mktemp("sweep")
    manifest = write_manifest(encoders, "all.csv", GOOD + [BROKEN])
    done = subprocess.run(sweep_command(encoders, manifest, out_dir), cwd=ROOT, env=ENV, capture_output=True,
                          text=True, timeout=300)
    return out_dir, done


def comparable(summary: pd.DataFrame) -> pd.DataFrame:
    """Summary rows without the timings, which differ between two runs of the same encoder."""
    return summary.drop(columns=["seconds"]).set_index("path").sort_index()


def test_sweep_flags_the_planted_encoders_and_reports(sweep):
    out_dir, done = sweep
    norm = out_dir / "trigger_norm"
    summary = pd.read_csv(norm / "summary.csv")
    assert list(summary.columns) == ["path", "run_id", "usage_info", "arch", "label", "family", "l1", "pl1",
                                     "verdict", "epochs", "seconds", "status", "error"]
    finished = summary[summary.status == "done"]
    assert len(finished) == 4 and (finished.verdict == finished.label.map(
        {"backdoor": "trojaned", "clean": "clean"})).all()
    metrics = pd.read_json(norm / "summary.json", typ="series")["metrics"]
    assert metrics["accuracy"] == 1.0 and metrics["auroc"] == 1.0 and metrics["tpr"] == 1.0
    assert "accuracy 1.000" in done.stdout and "AUROC over PL1 1.000" in done.stdout
    for figure in ("pl1.png", "gallery.png"):
        assert (norm / figure).read_bytes()[:4] == b"\x89PNG"
    for run_id in finished.run_id:
        assert (out_dir / "detect_log" / f"{run_id}.log").is_file()
        assert (out_dir / "detect_log" / f"{run_id}.worker.log").is_file()
    assert list((out_dir / "detect_log").glob("sweep_*.json"))  # the sweep's own config
    assert not list(out_dir.rglob("*.tmp"))


def test_a_broken_encoder_is_recorded_as_failed_and_the_others_finish(sweep, encoders):
    out_dir, done = sweep
    assert done.returncode == 1, done.stderr
    summary = pd.read_csv(out_dir / "trigger_norm" / "summary.csv").set_index("path")
    broken = summary.loc[str(encoders / "broken.pth")]
    assert broken.status == "failed" and "not a PyTorch checkpoint" in broken.error
    assert (out_dir / "trigger_norm" / "failed" / f"{broken.run_id}.json").is_file()
    assert (summary.status == "done").sum() == 4


def test_a_killed_sweep_resumes_without_rerunning_finished_encoders(sweep, encoders, tmp_path):
    reference_dir, _ = sweep
    manifest = write_manifest(encoders, "two.csv", [GOOD[0], GOOD[2]])
    command = sweep_command(encoders, manifest, tmp_path, workers=1)
    first = subprocess.Popen(command, cwd=ROOT, env=ENV, start_new_session=True, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not list((tmp_path / "trigger_norm").glob("*.json")) and time.time() < deadline:
        time.sleep(0.05)
    os.killpg(first.pid, signal.SIGKILL)  # the sweep and its workers, without any chance to clean up
    first.wait()
    finished = {p: p.stat().st_mtime_ns for p in (tmp_path / "trigger_norm").glob("*.json")}
    assert len(finished) == 1

    again = subprocess.run(command, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    assert "2 encoders, 1 to run" in again.stdout
    assert all(path.stat().st_mtime_ns == mtime for path, mtime in finished.items())
    resumed = comparable(pd.read_csv(tmp_path / "trigger_norm" / "summary.csv"))
    reference = comparable(pd.read_csv(reference_dir / "trigger_norm" / "summary.csv")).loc[resumed.index]
    pd.testing.assert_frame_equal(resumed, reference, check_dtype=False)  # NaN of the broken row: float


def fake_encoders(n: int) -> list[Encoder]:
    return [Encoder(f"output/cifar10/enc_{i}/model_{i}.pth", "cifar10", None, "backdoor") for i in range(n)]


@pytest.mark.parametrize("n", [1, 2, 3, 7])
def test_shards_cover_every_encoder_exactly_once(n):
    encoders = fake_encoders(40)
    shards = [select_shard(encoders, k, n) for k in range(1, n + 1)]
    paths = [enc.path for shard in shards for enc in shard]
    assert sorted(paths) == sorted(enc.path for enc in encoders) and len(paths) == len(set(paths))
    assert max(map(len, shards)) - min(map(len, shards)) <= 1  # balanced: no array task waits on another


def test_slurm_array_variables_give_the_same_shard_as_the_flag(encoders, capsys, monkeypatch):
    manifest = write_manifest(encoders, "listing.csv", GOOD + [BROKEN])
    listing = ["--manifest", str(manifest), "--out_dir", str(encoders / "none"), "--list"]

    def listed(extra=()):
        run_decree.main(listing + list(extra))
        return [line for line in capsys.readouterr().out.splitlines() if line.startswith("to run")]

    by_flag = [listed(["--shard", f"{k}/2"]) for k in (1, 2)]
    monkeypatch.setenv("SLURM_ARRAY_TASK_COUNT", "2")
    monkeypatch.setenv("SLURM_ARRAY_TASK_MIN", "0")
    by_slurm = []
    for task in ("0", "1"):
        monkeypatch.setenv("SLURM_ARRAY_TASK_ID", task)
        by_slurm.append(listed())
    assert by_slurm == by_flag and sorted(by_flag[0] + by_flag[1]) == sorted(listed(["--shard", "1/1"]))
    assert shard_from_slurm({"SLURM_ARRAY_TASK_ID": "7", "SLURM_ARRAY_TASK_MIN": "1", "SLURM_ARRAY_TASK_STEP": "3",
                             "SLURM_ARRAY_TASK_COUNT": "3"}) == (3, 3)
    assert shard_from_slurm({}) is None


def test_labels_follow_the_papers_path_rule():
    assert infer_label("output/cifar10/clean_encoder/model_1000.pth") == "clean"
    assert infer_label("output/CLIP/Clean_CLIP.pth") == "clean"
    assert infer_label("output/cifar10/stl10_backdoored_encoder/model_200.pth") == "backdoor"


def test_output_folder_discovery_infers_usage_info_from_the_first_folder(tmp_path):
    for name in ("cifar10/clean_encoder/model_1000.pth", "CLIP_text/svhn_backdoored_encoder/model_3.pt",
                 "stl10/a/b/model_1.pth", "notes/model.pth", "cifar10/readme.txt"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"")
    found = [(Path(e.path).relative_to(tmp_path).as_posix(), e.usage_info, e.label)
             for e in discover_output_folder(tmp_path)]
    assert found == [("CLIP_text/svhn_backdoored_encoder/model_3.pt", "CLIP", "backdoor"),
                     ("cifar10/clean_encoder/model_1000.pth", "cifar10", "clean"),
                     ("stl10/a/b/model_1.pth", "stl10", "backdoor")]


def test_manifest_labels_override_the_path_rule_and_paths_are_relative_to_it(tmp_path):
    manifest = tmp_path / "m.csv"
    manifest.write_text("path,label\nclean_but_trojaned.pth,backdoor\nsub/x.pth,\n")
    encoders = read_manifest(manifest, "stl10", "resnet18")
    assert [(e.path, e.label, e.usage_info, e.arch) for e in encoders] == [
        (str(tmp_path / "clean_but_trojaned.pth"), "backdoor", "stl10", "resnet18"),
        (str(tmp_path / "sub" / "x.pth"), "backdoor", "stl10", "resnet18")]
    assert encoders[0].run_id == run_id_for(tmp_path / "clean_but_trojaned.pth")


@pytest.mark.parametrize("content, message", [
    ("file,label\na.pth,clean\n", "needs a header with a 'path' column"),
    ("path,usage_info\na.pth,cifar100\n", "m.csv:2: usage_info 'cifar100' is not one of"),
    ("path,label\na.pth,clean\nb.pth,trojan\n", "m.csv:3: label 'trojan' is not 'clean' or 'backdoor'"),
    ("path,weights\na.pth,1\n", "unknown column(s) ['weights']"),
    ("path\n", "lists no encoders"),
])
def test_manifest_errors_are_one_line(tmp_path, capsys, content, message):
    (tmp_path / "m.csv").write_text(content)
    with pytest.raises(SystemExit) as exit_:
        run_decree.main(["--manifest", str(tmp_path / "m.csv"), "--list"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.count("\n") == 1 and message in err and err.startswith("run_decree.py: error")
