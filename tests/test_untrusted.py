"""Untrusted input matrix (issue 7): every entry point x every bad input gives a one-line error naming the
file (or flag) and the fix, a non-zero exit status, no traceback, and no partial output.

Entry points run in-process through runpy (as `python <script> ...` would); run_decree.py still runs each
encoder in its own main.py process, so its rows also check that a bad encoder is recorded as failed with
its reason while the sweep itself goes on.
"""
import os
import runpy
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import RandomFeatureEncoder, smooth_images
from datasets import save_npz_dataset, save_reference, white_square_trigger, save_trigger
from models import SimCLRBackbone
from models.registry import ARCH_MODULES_ENV

REPO = Path(__file__).resolve().parents[1]
ARCH = "resnet18_w2"


class Payload:
    """Unpickling this creates `marker`: proof that code from the file ran."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("untrusted")
    torch.manual_seed(0)
    good = root / "good.pth"
    torch.save({"epoch": 1, "state_dict": SimCLRBackbone(ARCH).state_dict()}, good)
    save_npz_dataset(root / "shadow.npz", smooth_images(16, 32, seed=1), np.zeros(16, np.int64))
    pattern, keep = white_square_trigger(32, 24, 6)
    save_trigger(root / "trigger.npz", pattern, keep)
    save_reference(root / "reference.npz", smooth_images(1, 32, seed=2), np.zeros(1, np.int64))
    return root


def bad_input(row: str, files: Path, tmp_path: Path) -> dict:
    """The arguments that differ from a good run for one row of the matrix, and what the error must name."""
    encoder, shadow = files / "good.pth", files / "shadow.npz"
    out = tmp_path / "out"
    case = {"encoder": encoder, "arch": ARCH, "shadow": shadow, "device": "cpu", "out": out, "modules": []}
    if row == "missing file":
        case.update(encoder=tmp_path / "no_such_encoder.pth", names="no_such_encoder.pth", says="no such",
                    sweep_says="matches no")  # a sweep's --encoders glob finds nothing
    elif row == "random bytes":
        path = tmp_path / "random.pth"
        path.write_bytes(np.random.default_rng(0).bytes(4096))
        case.update(encoder=path, names="random.pth", says="not a")
    elif row == "truncated checkpoint":
        path = tmp_path / "truncated.pth"
        path.write_bytes(encoder.read_bytes()[:20000])
        case.update(encoder=path, names="truncated.pth", says="corrupt")
    elif row == "code-running pickle":
        path, marker = tmp_path / "evil.pth", tmp_path / "payload_ran"
        torch.save({"state_dict": SimCLRBackbone(ARCH).state_dict(), "hook": Payload(marker)}, path)
        case.update(encoder=path, names="evil.pth", says="--trust_checkpoint", marker=marker)
    elif row == "other architecture":
        path = tmp_path / "wide.pth"
        torch.save({"state_dict": SimCLRBackbone("resnet18_w4").state_dict()}, path)
        case.update(encoder=path, names="wide.pth", says="try --arch resnet18_w4")
    elif row == "npz without x":
        path = tmp_path / "no_x.npz"
        np.savez(path, images=smooth_images(4, 32), y=np.zeros(4))
        case.update(shadow=path, names="no_x.npz", says="'x'")
    elif row == "wrong image shape/dtype":
        path = tmp_path / "chw_float.npz"
        np.savez(path, x=np.zeros((4, 3, 32, 32), np.float32), y=np.zeros(4))
        case.update(shadow=path, names="chw_float.npz", says="uint8")
    elif row == "empty shadow set":
        path = tmp_path / "empty.npz"
        np.savez(path, x=np.zeros((0, 32, 32, 3), np.uint8), y=np.zeros(0))
        case.update(shadow=path, names="empty.npz", says="no images")
    elif row == "cuda without CUDA":
        case.update(device="cuda", names="cuda", says="cpu")
    elif row == "NaN embeddings":
        path = tmp_path / "nan.pth"
        torch.save(RandomFeatureEncoder(dim=64).state_dict(), path)
        case.update(encoder=path, arch="nan_output", modules=["planted_arch"], names="nan", says="NaN")
    elif row == "unwritable output folder":
        blocker = tmp_path / "a_file"
        blocker.write_text("a file where a folder should be")
        case.update(out=blocker / "out", names="a_file", says="choose another")
    return case


ROWS = ["missing file", "random bytes", "truncated checkpoint", "code-running pickle", "other architecture",
        "npz without x", "wrong image shape/dtype", "empty shadow set", "cuda without CUDA", "NaN embeddings",
        "unwritable output folder"]


def argv_main(c, files):
    return ["main.py", "--encoder_path", c["encoder"], "--arch", c["arch"], "--shadow_data", c["shadow"],
            "--out_dir", c["out"], "--device", c["device"], "--epochs", "2", "--lr", "0.5", "--quiet"]


def argv_attack(c, files):
    return ["attack_encoder.py", "--pretrained_encoder", c["encoder"], "--arch", c["arch"],
            "--shadow_dataset", c["shadow"], "--trigger_file", files / "trigger.npz",
            "--reference_file", files / "reference.npz", "--results_dir", c["out"], "--device", c["device"],
            "--epochs", "1", "--batch_size", "8", "--quiet"]


def argv_zscore(c, files):
    return ["validate/compute_zscore.py", "--encoder_path", c["encoder"], "--encoder_usage_info", "cifar10",
            "--arch", c["arch"],
            "--data", c["shadow"], "--trigger_file", files / "trigger.npz", "--num_images", "8",
            "--out_dir", c["out"], "--device", c["device"], "--quiet"]


def argv_sweep(c, files):
    return ["run_decree.py", "--encoders", c["encoder"], "--arch", c["arch"], "--shadow_data", c["shadow"],
            "--out_dir", c["out"], "--device", c["device"], "--epochs", "2", "--quiet"]


ENTRY_POINTS = {"main.py": argv_main, "attack_encoder.py": argv_attack, "compute_zscore.py": argv_zscore,
                "run_decree.py": argv_sweep}


def run_script(argv, modules, monkeypatch):
    """Run a script as __main__; returns its exit status."""
    argv = [str(a) for a in argv]
    for module in modules:
        argv += ["--arch_module", module]
    monkeypatch.setattr(sys, "argv", argv)
    monkeypatch.chdir(REPO)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(REPO), str(REPO / "tests")]))
    monkeypatch.setenv(ARCH_MODULES_ENV, "")  # --arch_module exports it; restored (unset) after the test
    try:
        runpy.run_path(str(REPO / argv[0]), run_name="__main__")
    except SystemExit as stop:
        return stop.code if isinstance(stop.code, int) else 1
    return 0


def files_under(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()) if folder.is_dir() else []


@pytest.mark.parametrize("row", ROWS)
@pytest.mark.parametrize("entry", list(ENTRY_POINTS))
def test_bad_input_fails_cleanly(entry, row, files, tmp_path, capsys, monkeypatch):
    case = bad_input(row, files, tmp_path)
    status = run_script(ENTRY_POINTS[entry](case, files), case["modules"], monkeypatch)
    out, err = capsys.readouterr()
    assert status != 0
    assert "Traceback" not in err + out
    if "marker" in case:
        assert not case["marker"].exists(), "the checkpoint's payload ran"
    if entry == "run_decree.py":
        assert_sweep_recorded_failure(case, out + err)
        return
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"{entry}: error: "), err
    assert case["names"] in lines[0] and case["says"] in lines[0], lines[0]
    assert files_under(case["out"]) == []


def assert_sweep_recorded_failure(case, printed: str) -> None:
    """A sweep either refuses at once in one line (bad flag or folder) or records the encoder as failed."""
    if case["names"] in ("cuda", "a_file", "no_such_encoder.pth"):  # nothing to run: refused at once
        says = case.get("sweep_says", case["says"])
        assert "run_decree.py: error: " in printed and case["names"] in printed and says in printed
        assert files_under(case["out"]) == []
        return
    norm = case["out"] / "trigger_norm"
    failures = list((norm / "failed").glob("*.json"))
    assert len(failures) == 1, files_under(case["out"])
    reason = failures[0].read_text()
    assert case["says"].strip("'") in reason and case["names"].split(".")[0] in reason, reason
    assert not list((case["out"] / "trigger_inv").glob("*/*")), "a failed encoder left trigger files"
    assert [p.name for p in norm.glob("*.json")] == ["summary.json"]
    summary = (norm / "summary.csv").read_text()
    assert "failed" in summary


def test_trust_checkpoint_opt_in_loads_a_pickled_checkpoint(tmp_path):
    """The documented opt-in: a checkpoint that pickles a non-tensor object loads only when trusted."""
    import argparse
    from models import UnsafeCheckpointError, load_encoder
    path = tmp_path / "namespace.pth"
    torch.save({"state_dict": SimCLRBackbone(ARCH).state_dict(), "args": argparse.Namespace(lr=0.1)}, path)
    with pytest.raises(UnsafeCheckpointError, match="--trust_checkpoint"):
        load_encoder(path, "cifar10", ARCH)
    model, _ = load_encoder(path, "cifar10", ARCH, trust_checkpoint=True)
    assert sum(p.numel() for p in model.parameters()) > 0
