"""Hostile-input matrix: every entry point x every bad input ends with one line on stderr naming
the file or flag and the fix, exit status 2, no traceback, no output files, and no code from the input run.

All inputs are generated here (tests/hostile.py builds the checkpoints). The matrix calls each script's
main(argv) in-process (a subprocess per case would spend its time importing torch); a few real subprocesses
check the same through the command line: SIGTERM, a looping TorchScript payload, one case per script, and
a sweep whose workers meet hostile encoders.
"""
import argparse
import contextlib
import errno
import importlib.util
import os
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

import hostile
from conftest import smooth_images
from datasets import save_npz_dataset, save_reference, save_trigger, white_square_trigger
from models import SimCLRBackbone
from models.registry import ARCH_MODULES_ENV

REPO = Path(__file__).resolve().parents[1]
ARCH = "resnet18_w2"
SCRIPTS = {"main.py": "main.py", "attack_encoder.py": "attack_encoder.py",
           "pretrain_encoder.py": "pretrain_encoder.py", "run_decree.py": "run_decree.py",
           "compute_zscore.py": "validate/compute_zscore.py",
           "script_compute_zscore.py": "validate/script_compute_zscore.py",
           "val_cifar10_training_downstream_classifier.py": "validate/val_cifar10_training_downstream_classifier.py"}
_MODULES = {}


def script_main(name):
    """The script's main(argv), imported once from its file (as `python <script>` would run it)."""
    if name not in _MODULES:
        spec = importlib.util.spec_from_file_location(f"script_{Path(name).stem}", REPO / SCRIPTS[name])
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        _MODULES[name] = module.main
    return _MODULES[name]


class Payload:
    """Unpickling this creates `marker`: proof that code from the file ran."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


# ---- the good inputs every case starts from ------------------------------------------------------------

@pytest.fixture(scope="module")
def good(tmp_path_factory):
    root = tmp_path_factory.mktemp("good")
    torch.manual_seed(0)
    torch.save({"epoch": 1, "state_dict": SimCLRBackbone(ARCH).state_dict()}, root / "good.pth")
    save_npz_dataset(root / "shadow.npz", smooth_images(16, 32, seed=1), np.arange(16) % 2)
    pattern, keep = white_square_trigger(32, 24, 6)
    save_trigger(root / "trigger.npz", pattern, keep)
    save_reference(root / "reference.npz", smooth_images(1, 32, seed=2), np.zeros(1, np.int64))
    return root


@pytest.fixture(scope="module")
def archives(tmp_path_factory):
    """The TorchScript family: crafted archives and real scripted payloads, sharing one marker path."""
    root = tmp_path_factory.mktemp("archives")
    marker = root / "marker"
    made = hostile.hostile_archives(root, marker)
    made.update(hostile.scripted_payloads(root, marker))
    return made, marker


# ---- bad inputs ------------------------------------------------------------------------------------------

def bad_checkpoint(row: str, folder: Path, good: Path, marker: Path) -> Path:
    """A checkpoint file for one checkpoint row (torch.save family)."""
    path = folder / f"{row.replace(' ', '_').replace('/', '_')}.pth"
    weights = SimCLRBackbone(ARCH).state_dict()
    good_bytes = (good / "good.pth").read_bytes()
    makers = {
        "missing file": lambda: None,
        "empty file": lambda: path.write_bytes(b""),
        "random bytes": lambda: path.write_bytes(np.random.default_rng(0).bytes(4096)),
        "truncated checkpoint": lambda: path.write_bytes(good_bytes[:20000]),
        "code-running pickle": lambda: torch.save({"state_dict": weights, "hook": Payload(marker)}, path),
        "code-running pickle, protocol 4": lambda: torch.save({"hook": Payload(marker)}, path, pickle_protocol=4),
        "code-running legacy format": lambda: torch.save({"hook": Payload(marker)}, path,
                                                         _use_new_zipfile_serialization=False),
        "plain pickle with os.system": lambda: path.write_bytes(
            hostile.PROTO2 + hostile.glob("os", "system") + hostile.tup(hostile.s(f"touch {marker}"))
            + hostile.REDUCE + hostile.STOP),
        "argparse.Namespace inside": lambda: torch.save({"state_dict": weights, "args": argparse.Namespace()}, path),
        "argparse.Namespace, protocol 4": lambda: torch.save({"state_dict": weights, "args": argparse.Namespace()},
                                                             path, pickle_protocol=4),
        "other architecture": lambda: torch.save({"state_dict": SimCLRBackbone("resnet18_w4").state_dict()}, path),
        "non-string keys": lambda: torch.save({0: torch.ones(2), 1: torch.ones(3)}, path),
        "meta tensor": lambda: torch.save({"w": torch.zeros(2, device="meta")}, path),
        "sparse tensor": lambda: torch.save({"w": torch.eye(3).to_sparse()}, path),
        "quantized tensor": lambda: torch.save({"w": torch.quantize_per_tensor(torch.ones(2), 0.1, 0,
                                                                               torch.quint8)}, path),
        "nested tensor": lambda: torch.save({"w": torch.nested.nested_tensor([torch.ones(2), torch.ones(3)])}, path),
        "a list, not a dict": lambda: torch.save([torch.ones(2)], path),
        "a dict without tensors": lambda: torch.save({"epoch": 3, "lr": 0.1}, path),
        "zip with a garbage data.pkl": lambda: _zip_with(path, {"archive/data.pkl": b"\x80\x02garbage",
                                                                "archive/version": b"3\n"}),
    }
    makers[row]()
    return path


def _zip_with(path: Path, entries: dict) -> None:
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in entries.items():
            zf.writestr(name, data)


CHECKPOINT_ROWS = {  # row -> (what the message says, does it name --trust_checkpoint)
    "missing file": ("no such", False), "empty file": ("corrupt", False), "random bytes": ("corrupt", False),
    "truncated checkpoint": ("corrupt", False), "code-running pickle": ("io.open", True),
    "code-running pickle, protocol 4": ("io.open", True), "code-running legacy format": ("refused", True),
    "plain pickle with os.system": ("", None), "argparse.Namespace inside": ("argparse.Namespace", True),
    "argparse.Namespace, protocol 4": ("argparse.Namespace", True), "other architecture": ("resnet18_w4", False),
    "non-string keys": ("not a parameter name", False), "meta tensor": ("meta tensor", False),
    "sparse tensor": ("sparse", False), "quantized tensor": ("quantized", False), "nested tensor": ("nested", False),
    "a list, not a dict": ("no state dict", False), "a dict without tensors": ("no state dict", False),
    "zip with a garbage data.pkl": ("corrupt", False),
}
TORCHSCRIPT_NEEDS_CODE = {"GLOBAL+REDUCE open", "STACK_GLOBAL protocol 4", "INST opcode", "OBJ opcode",
                          "payload inside module state", "os.system", "torch.from_file", "unknown storage type",
                          "state is a tuple", "class with __setstate__ code", "__setstate__ writes a file",
                          "submodule __setstate__ writes a file", "__setstate__ loops forever"}
TORCHSCRIPT_ROWS = [name for name in list(hostile.hostile_pickles("m")) + [
    "compressed tensor record", "missing tensor record", "record shorter than its storage", "duplicate entries",
    "escaping entry name", "absolute entry name", "two archive folders", "big-endian tensors",
    "class without definition", "code line that is an expression", "class with __setstate__ code",
    "zip bomb data.pkl", "not a zip at all", "__setstate__ writes a file", "submodule __setstate__ writes a file",
    "__setstate__ loops forever"]]


def bad_npz(row: str, folder: Path) -> Path:
    """An image dataset (npz or folder) for one data row."""
    path = folder / f"{row.replace(' ', '_')}.npz"
    images = smooth_images(4, 32)
    if row == "missing file":
        pass
    elif row == "random bytes":
        path.write_bytes(np.random.default_rng(1).bytes(2048))
    elif row == ".npy renamed .npz":
        np.save(folder / "x.npy", images)
        (folder / "x.npy").rename(path)
    elif row == "huge declared array":
        header = _npy_header((10 ** 6, 10 ** 6, 3), "|u1")
        _zip_with(path, {"x.npy": header + bytes(64)})
    elif row == "huge array, deflated":
        with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
            zf.writestr("x.npy", _npy_header((2000, 1000, 1000, 3), "|u1") + bytes(4 << 20))
    elif row == "broken .npy header":
        _zip_with(path, {"x.npy": b"\x93NUMPY\x01\x00\x10\x00{'descr': nonsense"})
    elif row == "object images":
        np.savez(path, x=np.array([images[0], "a"], dtype=object))
    elif row == "object labels":
        np.savez(path, x=images, y=np.array([1, "a", None, 2], dtype=object))
    elif row == "string labels":
        np.savez(path, x=images, y=np.array(["cat", "dog", "cat", "dog"]))
    elif row == "no x":
        np.savez(path, images=images)
    elif row == "float images":
        np.savez(path, x=images.astype(np.float32) / 255, y=np.zeros(4))
    elif row == "channels first":
        np.savez(path, x=images.transpose(0, 3, 1, 2).copy(), y=np.zeros(4))
    elif row == "no images":
        np.savez(path, x=np.zeros((0, 32, 32, 3), np.uint8), y=np.zeros(0))
    elif row == "truncated npz":
        np.savez(path, x=images, y=np.zeros(4))
        path.write_bytes(path.read_bytes()[:3000])
    elif row == "2 images, a tenth of them":
        np.savez(path, x=images[:2])
    elif row == "decompression bomb image":
        path = folder / "bomb_images"
        path.mkdir()
        for name in "abcd":
            (path / f"{name}.png").write_bytes(_png_header(30000, 30000))
    elif row == "corrupt image":
        path = folder / "corrupt_images"
        path.mkdir()
        for name in "abcd":
            (path / f"{name}.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(100))
    elif row == "folder without images":
        path = folder / "empty_images"
        path.mkdir()
        (path / "notes.txt").write_text("no images here")
    return path


def _npy_header(shape, descr) -> bytes:
    import io
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": descr, "fortran_order": False, "shape": shape})
    return buf.getvalue()


def _png_header(width: int, height: int) -> bytes:
    """A PNG that declares width x height pixels (PIL checks the size when it opens the file)."""
    import struct
    import zlib

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0")) + chunk(b"IEND", b"")


DATA_ROWS = {  # row -> what the message says
    "missing file": "", "random bytes": "not a readable .npz", ".npy renamed .npz": "single .npy",
    "huge declared array": "declares shape", "huge array, deflated": "declares shape", "broken .npy header": "header",
    "object images": "Python objects", "object labels": "Python objects", "string labels": "labels 'y'",
    "no x": "'x'", "float images": "uint8", "channels first": "(N,H,W,3)", "no images": "no images",
    "truncated npz": "npz", "decompression bomb image": "too large", "corrupt image": "not a readable image",
    "folder without images": "no images",
}
NPZ_ONLY = {"decompression bomb image", "corrupt image", "folder without images"}  # folders: not for npz-only flags


def bad_trigger(row: str, folder: Path) -> Path:
    path = folder / f"trigger_{row.replace(' ', '_')}.npz"
    pattern, keep = white_square_trigger(32, 24, 6)
    arrays = {
        "no triggers (K=0)": {"t": np.zeros((0, 32, 32, 3)), "tm": np.zeros((0, 32, 32, 3))},
        "NaN in t": {"t": np.where(pattern > 0, np.nan, 0.0), "tm": keep},
        "NaN in tm": {"t": pattern, "tm": np.where(keep > 0, np.nan, 0.0)},
        "tm outside {0,1}": {"t": pattern, "tm": keep * 0.5},
        "t outside [0,255]": {"t": pattern * 2, "tm": keep},
        "t and tm shapes differ": {"t": pattern, "tm": keep[:, :16]},
        "no tm": {"t": pattern},
        "object t": {"t": np.array([None, 1], dtype=object), "tm": keep},
    }
    if row == "missing file":
        return path
    if row == ".npy renamed .npz":
        np.save(folder / "t.npy", pattern)
        (folder / "t.npy").rename(path)
        return path
    np.savez(path, **arrays[row])
    return path


TRIGGER_ROWS = {"missing file": "no such", "no triggers (K=0)": "no trigger", "NaN in t": "NaN", "NaN in tm": "NaN",
                "tm outside {0,1}": "'tm' must be", "t outside [0,255]": "[0,255]",
                "t and tm shapes differ": "must both be", "no tm": "'tm'", "object t": "Python objects",
                ".npy renamed .npz": "single .npy"}
REFERENCE_ROWS = ("missing file", "object images", "string labels", "no x", "float images", "no images",
                  ".npy renamed .npz", "huge declared array")


# ---- how each script is called -----------------------------------------------------------------------------

def argv_for(script: str, good: Path, out: Path, **over) -> list:
    """Arguments of a good run of `script` writing under `out`; `over` replaces inputs (encoder, data, ...)."""
    enc, data, trig = over.get("encoder", good / "good.pth"), over.get("data", good / "shadow.npz"), \
        over.get("trigger", good / "trigger.npz")
    common = ["--arch", ARCH, "--device", "cpu", "--quiet"]
    if script == "main.py":
        return ["--encoder_path", enc, "--shadow_data", data, "--out_dir", out, "--epochs", "1"] + common
    if script == "run_decree.py":
        return ["--encoders", enc, "--shadow_data", data, "--out_dir", out, "--epochs", "1", "--devices", "cpu",
                "--arch", ARCH, "--quiet"]
    if script == "attack_encoder.py":
        return ["--pretrained_encoder", enc, "--shadow_dataset", data, "--trigger_file", trig, "--reference_file",
                over.get("reference", good / "reference.npz"), "--results_dir", out / "attack", "--epochs", "1",
                "--batch_size", "8"] + common
    if script == "pretrain_encoder.py":
        return ["--pretraining_dataset", data, "--results_dir", out / "pretrain", "--epochs", "1",
                "--batch_size", "8"] + common
    if script == "compute_zscore.py":
        return ["--encoder_path", enc, "--encoder_usage_info", "cifar10", "--data", data, "--trigger_file", trig,
                "--num_images", "4", "--out_dir", out] + common
    if script == "script_compute_zscore.py":
        return [over.get("encoder_dir", good), "--encoder_usage_info", "cifar10", "--data", data,
                "--trigger_file", trig, "--num_images", "4", "--out_dir", out] + common
    if script == "val_cifar10_training_downstream_classifier.py":
        return ["--encoder_path", enc, "--train_data", data, "--test_data", good / "shadow.npz", "--trigger_file",
                trig, "--reference_label", "0", "--epochs", "1", "--results_file", out / "downstream.csv"] + common
    raise KeyError(script)


def run_main(script: str, argv: list, monkeypatch, capsys, cwd: Path):
    """main(argv) in-process, as the command line would run it: returns (status, stdout, stderr)."""
    monkeypatch.setattr(sys, "argv", [script])  # argparse names the program after argv[0]
    monkeypatch.chdir(cwd)
    monkeypatch.setenv(ARCH_MODULES_ENV, "")
    capsys.readouterr()
    try:
        script_main(script)([str(a) for a in argv])
        status = 0
    except SystemExit as stop:
        status = stop.code if isinstance(stop.code, int) else 1
    out, err = capsys.readouterr()
    return status, out, err


def files_under(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()) if folder.is_dir() else []


def assert_one_line_refusal(script, status, out, err, names, says="", out_dir=None, marker=None, expect=2):
    assert "Traceback" not in out + err
    assert status == expect, (status, err)
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith(f"{script}: error: "), lines[0]
    assert str(names) in lines[0] and says in lines[0], (names, says, lines[0])
    if out_dir is not None:
        assert files_under(out_dir) == [], files_under(out_dir)
    if marker is not None:
        assert not Path(marker).exists(), "code from the input ran"
    return lines[0]


# ---- the matrix -------------------------------------------------------------------------------------------

LOADERS = ("main.py", "attack_encoder.py", "compute_zscore.py", "val_cifar10_training_downstream_classifier.py")
@pytest.mark.parametrize("row", list(CHECKPOINT_ROWS))
@pytest.mark.parametrize("script", LOADERS)
def test_bad_checkpoint(script, row, good, tmp_path, monkeypatch, capsys):
    marker = tmp_path / "payload_ran"
    path = bad_checkpoint(row, tmp_path, good, marker)
    status, out, err = run_main(script, argv_for(script, good, tmp_path / "out", encoder=path), monkeypatch,
                                capsys, tmp_path)
    says, names_trust = CHECKPOINT_ROWS[row]
    line = assert_one_line_refusal(script, status, out, err, path.name, says, tmp_path / "out", marker)
    if names_trust is not None:
        assert ("--trust_checkpoint" in line) == names_trust, line



@pytest.mark.parametrize("row", TORCHSCRIPT_ROWS)
@pytest.mark.parametrize("script", LOADERS)
def test_hostile_torchscript(script, row, archives, good, tmp_path, monkeypatch, capsys):
    made, marker = archives
    status, out, err = run_main(script, argv_for(script, good, tmp_path / "out", encoder=made[row]), monkeypatch,
                                capsys, tmp_path)
    line = assert_one_line_refusal(script, status, out, err, made[row].name, "", tmp_path / "out", marker)
    assert ("--trust_checkpoint" in line) == (row in TORCHSCRIPT_NEEDS_CODE), line


DATA_FLAGS = {"main.py": "data", "attack_encoder.py": "data", "pretrain_encoder.py": "data",
              "compute_zscore.py": "data", "val_cifar10_training_downstream_classifier.py": "data"}
DATA_CASES = [(script, row) for script in DATA_FLAGS for row in DATA_ROWS
              if not (row in NPZ_ONLY and script in ("pretrain_encoder.py",
                                                     "val_cifar10_training_downstream_classifier.py"))
]
DATA_CASES += [("main.py", "2 images, a tenth of them")]


@pytest.mark.parametrize("script,row", DATA_CASES)
def test_bad_images(script, row, good, tmp_path, monkeypatch, capsys):
    path = bad_npz(row, tmp_path)
    argv = argv_for(script, good, tmp_path / "out", data=path)
    if script == "main.py" and path.is_dir():  # the default 10% of a 4-image folder would be no image at all
        argv += ["--shadow_fraction", "1"]
    if row == "2 images, a tenth of them":  # a file the user names is used whole unless a share is asked for
        argv += ["--shadow_fraction", "0.1"]
    status, out, err = run_main(script, argv, monkeypatch, capsys, tmp_path)
    says = DATA_ROWS.get(row, "--shadow_size")
    names = "a.png" if row in ("decompression bomb image", "corrupt image") else path.name
    assert_one_line_refusal(script, status, out, err, names, says, tmp_path / "out")

TRIGGER_SCRIPTS = ("attack_encoder.py", "compute_zscore.py", "val_cifar10_training_downstream_classifier.py")


@pytest.mark.parametrize("row", list(TRIGGER_ROWS))
@pytest.mark.parametrize("script", TRIGGER_SCRIPTS)
def test_bad_trigger(script, row, good, tmp_path, monkeypatch, capsys):
    path = bad_trigger(row, tmp_path)
    status, out, err = run_main(script, argv_for(script, good, tmp_path / "out", trigger=path), monkeypatch, capsys,
                                tmp_path)
    assert_one_line_refusal(script, status, out, err, path.name, TRIGGER_ROWS[row], tmp_path / "out")



@pytest.mark.parametrize("row", REFERENCE_ROWS)
def test_bad_reference(row, good, tmp_path, monkeypatch, capsys):
    path = bad_npz(row, tmp_path)
    status, out, err = run_main("attack_encoder.py", argv_for("attack_encoder.py", good, tmp_path / "out",
                                                              reference=path), monkeypatch, capsys, tmp_path)
    assert_one_line_refusal("attack_encoder.py", status, out, err, path.name, DATA_ROWS[row], tmp_path / "out")


INVERSION_FLAGS = [("--batch_size", v) for v in ("0", "1", "-3", "abc")] + \
    [("--epochs", v) for v in ("0", "-1", "1.5")] + [("--lr", v) for v in ("0", "-1", "nan", "inf")] + \
    [("--thres", v) for v in ("0", "1", "1.5", "nan")] + [("--pl1_threshold", v) for v in ("0", "2", "nan")] + \
    [("--shadow_fraction", v) for v in ("0", "1.5", "nan")] + [("--shadow_size", v) for v in ("0", "1")] + \
    [("--arch", "resnet18_w99999999"), ("--arch", "resnet18_w0")]
FLAG_CASES = [(script, flag, value) for script in ("main.py", "run_decree.py") for flag, value in INVERSION_FLAGS]
FLAG_CASES += [("main.py", "--id", v) for v in ("../escape", "a/b", "..", "-x", "a\\b")]
FLAG_CASES += [(script, "--max_memory", v) for script in ("main.py", "run_decree.py") for v in ("lots", "512M", "-1G")]
FLAG_CASES += [("run_decree.py", "--workers", "0"), ("run_decree.py", "--shard", "3/2"),
               ("run_decree.py", "--shard", "x")]
FLAG_CASES += [("attack_encoder.py", flag, value) for flag, value in (
    ("--batch_size", "0"), ("--epochs", "0"), ("--lr", "0"), ("--lr", "nan"), ("--save_last", "0"),
    ("--poison_rate", "0"), ("--poison_rate", "2"), ("--shadow_fraction", "0"), ("--lambda1", "nan"),
    ("--lambda2", "inf"), ("--arch", "resnet18_w99999999"))]
FLAG_CASES += [("pretrain_encoder.py", flag, value) for flag, value in (
    ("--epochs", "0"), ("--batch_size", "0"), ("--batch_size", "1"), ("--lr", "0"), ("--lr", "nan"),
    ("--arch", "resnet18_w99999999"))]
FLAG_CASES += [("compute_zscore.py", flag, value) for flag, value in (
    ("--num_images", "0"), ("--num_images", "1"), ("--batch_size", "0"), ("--block_size", "0"),
    ("--threshold", "nan"), ("--arch", "resnet18_w99999999"))]
FLAG_CASES += [("val_cifar10_training_downstream_classifier.py", flag, value) for flag, value in (
    ("--epochs", "0"), ("--batch_size", "0"), ("--lr", "0"), ("--hidden_size_1", "0"),
    ("--arch", "resnet18_w99999999"))]


def with_flag(argv: list, flag: str, value: str) -> list:
    """argv with `flag value` replacing any earlier value of flag."""
    argv = list(argv)
    if flag in argv:
        i = argv.index(flag)
        return argv[:i] + [flag, value] + argv[i + 2:]
    return argv + [flag, value]


@pytest.mark.parametrize("script,flag,value", FLAG_CASES)
def test_bad_flag(script, flag, value, good, tmp_path, monkeypatch, capsys):
    argv = with_flag(argv_for(script, good, tmp_path / "out"), flag, value)
    status, out, err = run_main(script, argv, monkeypatch, capsys, tmp_path)
    assert_one_line_refusal(script, status, out, err, flag, "", tmp_path / "out")


FOLDER_FLAGS = [("main.py", "--result_file"), ("run_decree.py", "--result_file"),
                ("compute_zscore.py", "--csv_file"), ("compute_zscore.py", "--res_file"),
                ("script_compute_zscore.py", "--csv_file"),
                ("val_cifar10_training_downstream_classifier.py", "--results_file"),
                ("val_cifar10_training_downstream_classifier.py", "--result_dir")]


@pytest.mark.parametrize("script,flag", FOLDER_FLAGS)
def test_result_file_that_is_a_folder(script, flag, good, tmp_path, monkeypatch, capsys):
    """Refused before any work: nothing is loaded, run or written."""
    folder = tmp_path / "out" / "a_folder"
    folder.mkdir(parents=True)
    value = "a_folder" if flag in ("--csv_file", "--res_file") else str(folder)
    status, out, err = run_main(script, with_flag(argv_for(script, good, tmp_path / "out"), flag, value),
                                monkeypatch, capsys, tmp_path)
    assert_one_line_refusal(script, status, out, err, flag, "folder", tmp_path / "out")

DEVICE_SCRIPTS = [s for s in SCRIPTS if s != "script_compute_zscore.py"]


@pytest.mark.parametrize("script", DEVICE_SCRIPTS)
@pytest.mark.parametrize("problem", ["cuda without CUDA", "output folder under a file"])
def test_unusable_device_or_output_folder(script, problem, good, tmp_path, monkeypatch, capsys):
    if problem == "cuda without CUDA":
        if torch.cuda.is_available():
            pytest.skip("this machine has CUDA")
        argv, names = with_flag(argv_for(script, good, tmp_path / "out"), "--device", "cuda"), "cuda"
        if script == "run_decree.py":
            argv = with_flag(argv, "--devices", "cuda")
    else:
        blocker = tmp_path / "a_file"
        blocker.write_text("a file where a folder should be")
        argv, names = argv_for(script, good, blocker / "out"), "a_file"
    status, out, err = run_main(script, argv, monkeypatch, capsys, tmp_path)
    assert_one_line_refusal(script, status, out, err, names, "", tmp_path / "out")

ENOSPC_SCRIPTS = ("main.py", "attack_encoder.py", "pretrain_encoder.py", "compute_zscore.py",
                  "val_cifar10_training_downstream_classifier.py")


@pytest.mark.parametrize("script", ENOSPC_SCRIPTS)
@pytest.mark.parametrize("when", ["first write", "last write"])
def test_full_disk(script, when, good, tmp_path, monkeypatch, capsys):
    """ENOSPC: one line, no temp files, and never PNGs/logs without the run's JSON."""
    from common import io as atomic
    real = atomic.write_bytes
    calls = []

    def full_disk(path, data):
        calls.append(path)
        if when == "first write" or str(path).endswith(".json"):
            with atomic.atomic_path(path) as tmp:  # fails inside, as a real write would: the temp file goes too
                tmp.write_bytes(data[:10])
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp))
        real(path, data)
    monkeypatch.setattr(atomic, "write_bytes", full_disk)
    argv = argv_for(script, good, tmp_path / "out")
    status, out, err = run_main(script, argv, monkeypatch, capsys, tmp_path)
    assert calls, "nothing was written"
    assert files_under(tmp_path / "out") == []  # no temp file, no PNG/log/checkpoint without its JSON
    assert_one_line_refusal(script, status, out, err, "No space left", "free space")



# ---- third look: memory and time bombs, discovery, names, special files, shared output folders ----------------

MEMORY_BOUND = 3 << 30  # bytes a refused bomb may map on top of the test process (the bombs describe 11-76 GiB)
TIME_BOUND = 60         # seconds a refusal may take on one slow core


@contextlib.contextmanager
def bounded_memory(extra: int = MEMORY_BOUND):
    """Run the block under an address-space limit `extra` above what this process maps now (a bomb that got
    through would end in an out-of-memory error instead of the expected refusal), then lift it."""
    import resource
    from common.memory import mapped_bytes
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    resource.setrlimit(resource.RLIMIT_AS, (mapped_bytes() + extra, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


TINY_TIMM = dict(img_size=32, patch_size=8, depth=1, embed_dim=16, num_heads=1, num_classes=0)
TINY_VISION = {"model_type": "clip_vision_model", "architectures": ["CLIPVisionModelWithProjection"],
               "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 1,
               "image_size": 32, "patch_size": 8, "projection_dim": 8}
TINY_OPEN_CLIP_CFG = {"model_cfg": {"embed_dim": 8, "vision_cfg": {"image_size": 32, "layers": 1, "width": 16,
                                                                   "head_width": 8, "patch_size": 8}}}


def _timm_folder(folder: Path, edit_config=None, weights=None) -> Path:
    """A tiny timm ViT saved by timm (config.json + model.safetensors), its config edited by `edit_config`."""
    import json
    import timm
    from timm.models import save_for_hf
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, **TINY_TIMM)
    save_for_hf(model, folder, safe_serialization=True)
    if weights is not None:
        (folder / "model.safetensors").unlink()
        torch.save(weights, folder / "pytorch_model.bin")
    if edit_config is not None:
        config = json.loads((folder / "config.json").read_text())
        edit_config(config)
        (folder / "config.json").write_text(json.dumps(config))
    return folder


def _json_file(path: Path, obj) -> None:
    import json
    path.write_text(obj if isinstance(obj, str) else json.dumps(obj))


def _one_tensor(folder: Path, name: str = "model.safetensors") -> None:
    from safetensors.torch import save_file
    save_file({"x": torch.zeros(2)}, folder / name)


def bomb_input(row: str, folder: Path) -> tuple:
    """(encoder path, --encoder_usage_info) of one bomb row, built here."""
    folder.mkdir(parents=True, exist_ok=True)
    hub = folder / "hub"
    if row == "expanded views: width-1024 ResNet18 in a small .pth":
        sd = hostile.expanded(hostile.meta_state_dict(lambda: SimCLRBackbone("resnet18_w1024")))
        torch.save({"state_dict": sd}, folder / "wide.pth")
        return folder / "wide.pth", "cifar10"
    if row == "views repeating one storage":
        sd = hostile.one_storage(hostile.meta_state_dict(lambda: SimCLRBackbone("resnet18_w16")))
        torch.save({"state_dict": sd}, folder / "shared.pth")
        return folder / "shared.pth", "cifar10"
    if row == "expanded views beside a timm config":
        import timm
        huge = dict(img_size=224, patch_size=14, depth=48, embed_dim=6144, num_heads=48, num_classes=0)
        sd = hostile.expanded(hostile.meta_state_dict(
            lambda: timm.create_model("vit_tiny_patch16_224", pretrained=False, **huge)))
        hub.mkdir()
        _json_file(hub / "config.json", {"architecture": "vit_tiny_patch16_224", "model_args": huge})
        torch.save(sd, hub / "pytorch_model.bin")
        return hub, "timm"
    if row == "timm input size 8000 px":
        hub.mkdir()
        return _timm_folder(hub, lambda c: c.setdefault("pretrained_cfg", {}).update(input_size=[3, 8000, 8000])), \
            "timm"
    if row == "open_clip preprocess size 30000 px":
        hub.mkdir()
        _json_file(hub / "open_clip_config.json", {**TINY_OPEN_CLIP_CFG, "preprocess_cfg": {"size": 30000}})
        _one_tensor(hub, "open_clip_model.safetensors")
        return hub, "open_clip"
    if row in ("Hugging Face image_std of 0", "Hugging Face image_mean NaN"):
        hub.mkdir()
        _json_file(hub / "config.json", TINY_VISION)
        bad = {"image_std": [0, 0, 0]} if "std" in row else {"image_mean": [float("nan")] * 3}
        _json_file(hub / "preprocessor_config.json", bad)
        _one_tensor(hub)
        return hub, "hf_clip"
    if row in ("embedded config 24 deep with shared references", "embedded config nested 100 deep"):
        nested = hostile.shared_nesting(24) if "shared" in row else hostile.deep_nesting(100)
        torch.save({"state_dict": {"x": torch.zeros(2)}, "decree_encoder_config":
                    {"family": "timm", "config": {"architecture": "vit_tiny_patch16_224", "model_args": nested}}},
                   folder / "nested.pth")
        return folder / "nested.pth", "timm"
    if row == "config.json nested 100,000 deep":
        hub.mkdir()
        _json_file(hub / "config.json", hostile.deep_json(100_000))
        _one_tensor(hub)
        return hub, "timm"
    raise KeyError(row)


BOMB_ROWS = {  # row -> what the message says
    "expanded views: width-1024 ResNet18 in a small .pth": "expanded view",
    "views repeating one storage": "the file stores",
    "expanded views beside a timm config": "expanded view",
    "timm input size 8000 px": "outside 1..1024",
    "open_clip preprocess size 30000 px": "outside 1..1024",
    "Hugging Face image_std of 0": "image_std",
    "Hugging Face image_mean NaN": "image_mean",
    "embedded config 24 deep with shared references": "more than 100000 values",
    "embedded config nested 100 deep": "nested more than 32 deep",
    "config.json nested 100,000 deep": "nested too deep",
}


def hub_argv(good: Path, out: Path, encoder, usage_info: str) -> list:
    return ["--encoder_path", encoder, "--encoder_usage_info", usage_info, "--shadow_data", good / "shadow.npz",
            "--out_dir", out, "--epochs", "1", "--device", "cpu", "--quiet"]


@pytest.mark.parametrize("row", list(BOMB_ROWS))
def test_memory_and_time_bombs_are_refused_within_bounds(row, good, tmp_path, monkeypatch, capsys):
    encoder, usage_info = bomb_input(row, tmp_path / "in")
    started = time.time()
    with bounded_memory():
        status, out, err = run_main("main.py", hub_argv(good, tmp_path / "out", encoder, usage_info), monkeypatch,
                                    capsys, tmp_path)
    assert time.time() - started < TIME_BOUND
    names = encoder.name if encoder.is_file() else encoder.name
    assert_one_line_refusal("main.py", status, out, err, names, BOMB_ROWS[row], tmp_path / "out")


def test_torchscript_reader_refuses_expanded_views(tmp_path):
    from models.torchscript import TorchScriptError, read_torchscript_state_dict
    path = hostile.write_archive(tmp_path / "expanded.pt", data_pkl=hostile.hostile_pickles("m")[
        "expanded (stride-0) view"])
    with pytest.raises(TorchScriptError, match="expanded view"):
        read_torchscript_state_dict(path)


def test_tied_and_half_precision_weights_still_load(tmp_path):
    """The storage bound counts a tied weight once and an fp16 file's elements, not its bytes."""
    from models import load_encoder
    torch.manual_seed(0)
    weights = SimCLRBackbone(ARCH).state_dict()
    torch.save({"state_dict": {k: v.half() if v.is_floating_point() else v for k, v in weights.items()}},
               tmp_path / "half.pth")
    load_encoder(tmp_path / "half.pth", "cifar10", ARCH)
    tied = dict(weights, **{"extra_alias": weights["f.0.weight"]})  # the same view twice
    torch.save(tied, tmp_path / "tied.pth")
    from models.checkpoint import extract_state_dict
    extract_state_dict(torch.load(tmp_path / "tied.pth"), tmp_path / "tied.pth")


# discovery: a downloaded folder with symlink loops and links out of the tree
DISCOVERY_ROWS = ("symlink loops x -> ..", "link to a folder outside", "link to a file outside")
DISCOVERY_MODES = ("--encoders 'dl/**/*.pth'", "--encoders dl (a folder)", "--output_root")


def _downloaded_folder(root: Path, row: str, good: Path) -> Path:
    """root/dl/cifar10/{a.pth, sub/b.pth} plus the row's links; root/elsewhere/c.pth must never be found."""
    inner = root / "dl" / "cifar10"
    (inner / "sub").mkdir(parents=True)
    for path in (inner / "a.pth", inner / "sub" / "b.pth"):
        path.write_bytes((good / "good.pth").read_bytes())
    (root / "elsewhere").mkdir()
    (root / "elsewhere" / "c.pth").write_bytes(b"not inside the tree")
    if row == "symlink loops x -> ..":
        (inner / "sub" / "x").symlink_to("..")
        (inner / "y").symlink_to("../..")
    elif row == "link to a folder outside":
        (inner / "out").symlink_to(root / "elsewhere")
    else:
        (inner / "c.pth").symlink_to(root / "elsewhere" / "c.pth")
    return root / "dl"


@pytest.mark.parametrize("mode", DISCOVERY_MODES)
@pytest.mark.parametrize("row", DISCOVERY_ROWS)
def test_discovery_never_follows_symlinked_folders_or_leaves_the_tree(row, mode, good, tmp_path, monkeypatch,
                                                                      capsys):
    _downloaded_folder(tmp_path, row, good)
    which = {"--encoders 'dl/**/*.pth'": ["--encoders", "dl/**/*.pth"], "--encoders dl (a folder)":
             ["--encoders", "dl"], "--output_root": ["--output_root", "dl"]}[mode]
    started = time.time()
    status, out, err = run_main("run_decree.py", which + ["--list", "--arch", ARCH, "--out_dir", tmp_path / "out"],
                                monkeypatch, capsys, tmp_path)
    assert time.time() - started < TIME_BOUND and status == 0, err
    listed = sorted(Path(line.split()[-2]).name for line in out.splitlines() if line.startswith("to run"))
    assert listed == ["a.pth", "b.pth"], out


# run ids: one result can never stand for another file
def _finished_record(out_dir: Path, encoder: Path, **identity) -> None:
    from common import io as atomic
    from decree.outputs import RunPaths, run_id_for
    run_id = run_id_for(encoder)
    atomic.write_json(RunPaths(out_dir, run_id).json, {"run_id": run_id, "encoder_path": str(encoder), "l1": 1.0,
                                                       "pl1": 0.5, "epochs": 1, "seconds": 1.0, **identity})


STALE_ROWS = ("result of another file under this run id", "result of an older version of this file",
              "result without a content hash")


@pytest.mark.parametrize("row", STALE_ROWS)
def test_a_result_is_reused_only_for_the_same_file_and_content(row, good, tmp_path):
    from decree.outputs import encoder_identity, run_id_for
    from sweeps.discovery import Encoder
    from sweeps.pool import pending
    mine, other = tmp_path / "mine.pth", tmp_path / "other.pth"
    for path in (mine, other):
        path.write_bytes((good / "good.pth").read_bytes())
    identity = encoder_identity(mine)
    if row == "result of another file under this run id":
        identity = encoder_identity(other)
    elif row == "result of an older version of this file":
        identity["encoder_sha256"] = "0" * 64
    else:
        del identity["encoder_sha256"]
    _finished_record(tmp_path / "out", mine, **identity)
    enc = Encoder(str(mine), "cifar10", ARCH, "clean")
    assert pending([enc], tmp_path / "out") == [enc]
    _finished_record(tmp_path / "out", mine, **encoder_identity(mine))  # the real result is reused
    assert pending([enc], tmp_path / "out") == []
    assert len(run_id_for(mine).rsplit("-", 1)[1]) == 64  # the full SHA-256 of the path


def test_the_report_lists_every_encoder_by_path_even_when_a_record_claims_its_run_id(good, tmp_path):
    from decree.outputs import encoder_identity
    from sweeps.discovery import Encoder
    from sweeps.report import collect_rows
    mine, other = tmp_path / "mine.pth", tmp_path / "other.pth"
    for path in (mine, other):
        path.write_bytes((good / "good.pth").read_bytes())
    _finished_record(tmp_path / "out", mine, **encoder_identity(other), **{"encoder_path": str(other)})
    rows = collect_rows(tmp_path / "out", 0.1, [Encoder(str(mine), "cifar10", ARCH, "clean")])
    assert sorted((Path(r["path"]).name, r["status"]) for r in rows) == [("mine.pth", "not run"),
                                                                         ("other.pth", "done")]


# names: '-' first, control characters
NAME_ROWS = {"newline": "x\nmain.py: error: forged.pth", "terminal escape": "x\x1b[2Jclear.pth",
             "line separator": "x\u2028forged.pth", "carriage return": "x\rCLEAN forged.pth"}


@pytest.mark.parametrize("row", list(NAME_ROWS))
def test_names_with_control_characters_stay_on_one_line(row, good, tmp_path, monkeypatch, capsys):
    from common.files import printable
    name = NAME_ROWS[row]
    status, out, err = run_main("main.py", argv_for("main.py", good, tmp_path / "out", encoder=tmp_path / name),
                                monkeypatch, capsys, tmp_path)
    assert_one_line_refusal("main.py", status, out, err, printable(name), "no such", tmp_path / "out")
    (tmp_path / "dl").mkdir()
    (tmp_path / "dl" / name).with_suffix(".pth").write_bytes((good / "good.pth").read_bytes())
    status, out, err = run_main("run_decree.py", ["--encoders", "dl", "--list", "--arch", ARCH], monkeypatch, capsys,
                                tmp_path)
    assert status == 0 and len(out.splitlines()) == 2 and "\r" not in out and "\x1b" not in out, out


def test_names_starting_with_a_dash_reach_main_py_as_files(good, tmp_path, monkeypatch, capsys):
    from sweeps.discovery import Encoder
    from sweeps.workers import main_py_args
    spec = importlib.util.spec_from_file_location("main_for_args", REPO / "main.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    args = module.parse_args(main_py_args(Encoder("-evil.pth", "cifar10", "--arch", "clean"), "cpu", "-out", {}))
    assert args.encoder_path == "./-evil.pth" and args.out_dir == "./-out" and args.arch == "--arch"
    (tmp_path / "-evil.pth").write_bytes((good / "good.pth").read_bytes())
    argv = main_py_args(Encoder("-evil.pth", "cifar10", ARCH, "clean"), "cpu", "out", {"epochs": 1}) + [
        "--shadow_data", good / "shadow.npz"]
    status, _, err = run_main("main.py", argv, monkeypatch, capsys, tmp_path)
    assert status == 0 and list((tmp_path / "out" / "trigger_norm").glob("*.json")), err


# special files behind symlinks
SPECIAL_ROWS = {"weights link to /proc/self/status": "/proc/self/status", "weights link to /dev/zero": "/dev/zero",
                "weights are a FIFO": None, "hub config.json links to /proc/self/status": "/proc/self/status",
                "hub model.safetensors links to /proc/self/mem": "/proc/self/mem",
                "--shadow_data links to /dev/zero": "/dev/zero"}


@pytest.mark.parametrize("row", list(SPECIAL_ROWS))
def test_special_files_behind_symlinks_are_refused(row, good, tmp_path, monkeypatch, capsys):
    target = SPECIAL_ROWS[row]
    if target is not None and not Path(target).exists():
        pytest.skip(f"no {target} here")
    argv, named = None, None
    if row.startswith("weights"):
        named = tmp_path / "special.pth"
        os.mkfifo(named) if target is None else named.symlink_to(target)
        argv = argv_for("main.py", good, tmp_path / "out", encoder=named)
    elif row.startswith("hub"):
        hub = _timm_folder(tmp_path / "hub")
        named = hub / ("config.json" if "config" in row else "model.safetensors")
        named.unlink()
        named.symlink_to(target)
        argv = hub_argv(good, tmp_path / "out", hub, "timm")
    else:
        named = tmp_path / "shadow.npz"
        named.symlink_to(target)
        argv = argv_for("main.py", good, tmp_path / "out", data=named)
    status, out, err = run_main("main.py", argv, monkeypatch, capsys, tmp_path)
    assert_one_line_refusal("main.py", status, out, err, named.name, "not a regular file", tmp_path / "out")


# shared output folders: planted symlinks, other users' folders, replaced cache files
OUTPUT_ROWS = ("trigger_inv", "trigger_norm", "detect_log", "shadow_cache", "trigger_inv/<run_id>",
               "trigger_norm of another user")


@pytest.mark.parametrize("script", ("main.py", "run_decree.py"))
@pytest.mark.parametrize("row", OUTPUT_ROWS)
def test_planted_output_folders_are_refused(row, script, good, tmp_path, monkeypatch, capsys):
    from decree.outputs import run_id_for
    out, elsewhere = tmp_path / "out", tmp_path / "elsewhere"
    elsewhere.mkdir()
    folder = out / row.replace("<run_id>", run_id_for(good / "good.pth")).split(" ")[0]
    folder.parent.mkdir(parents=True, exist_ok=True)
    if row.endswith("another user"):
        if os.geteuid() != 0:
            pytest.skip("giving a folder to another user needs root")
        folder.mkdir()
        os.chown(folder, 54321, 54321)
    else:
        folder.symlink_to(elsewhere)
    status, out_text, err = run_main(script, argv_for(script, good, out), monkeypatch, capsys, tmp_path)
    if script == "run_decree.py" and "<run_id>" in row:  # one encoder's folder: that encoder fails, with the reason
        failures = list((out / "trigger_norm" / "failed").glob("*.json"))
        assert status == 1 and len(failures) == 1 and "is a symlink" in failures[0].read_text(), err
    else:
        assert_one_line_refusal(script, status, out_text, err, folder.name, "", out)
    assert files_under(elsewhere) == []


def test_a_replaced_or_forged_shadow_cache_file_is_not_used(tmp_path):
    from PIL import Image
    from decree import shadow_cache
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i, image in enumerate(smooth_images(4, 40, seed=3)):
        Image.fromarray(image).save(folder / f"{i}.png")
    used = {}
    first = shadow_cache.load_image_folder_cached(tmp_path / "cache", folder, 32, 0, False, used=used, count=3)
    path = Path(used["file"])
    np.savez(path, x=np.zeros_like(first))  # another user's content under the same name
    again = {}
    assert np.array_equal(shadow_cache.load_image_folder_cached(tmp_path / "cache", folder, 32, 0, False,
                                                                used=again, count=3), first)
    path.write_bytes(_npy_zip({"x.npy": _npy_header((40 << 30,), "|u1")}))  # a 40 GiB header: not read
    with bounded_memory():
        assert np.array_equal(shadow_cache.load_image_folder_cached(tmp_path / "cache", folder, 32, 0, False,
                                                                    count=3), first)


def _npy_zip(entries: dict) -> bytes:
    import io
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in entries.items():
            zf.writestr(name, data)
    return buf.getvalue()


def test_the_run_record_names_the_shadow_cache_file_and_its_hash(good, tmp_path, monkeypatch, capsys):
    import hashlib
    import json
    from PIL import Image
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i, image in enumerate(smooth_images(4, 32, seed=3)):
        Image.fromarray(image).save(folder / f"{i}.png")
    status, _, err = run_main("main.py", argv_for("main.py", good, tmp_path / "out", data=folder) +
                              ["--shadow_fraction", "1"], monkeypatch, capsys, tmp_path)
    assert status == 0, err
    record = json.loads(next((tmp_path / "out" / "trigger_norm").glob("*.json")).read_text())
    cache = record["shadow_cache"]
    assert hashlib.sha256(Path(cache["file"]).read_bytes()).hexdigest() == cache["sha256"]
    assert record["encoder_sha256"] and record["encoder_realpath"] == str((good / "good.pth").resolve())


# a worker's memory
def test_out_of_memory_is_one_line(monkeypatch, capsys):
    from decree.cli import user_errors
    for error in (MemoryError(), RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: not enough "
                                              "memory: you tried to allocate 11811160064 bytes.")):
        with pytest.raises(SystemExit) as stop, user_errors("main.py"):
            raise error
        err = capsys.readouterr().err
        assert stop.value.code == 2 and err.count("\n") == 1 and "out of memory" in err and "--max_memory" in err


def test_max_memory_bounds_a_process_and_is_passed_to_cpu_workers_only(tmp_path):
    from sweeps.discovery import Encoder
    from sweeps.workers import main_py_args
    code = ("import numpy\nfrom common.memory import limit_address_space\nfrom decree.cli import user_errors\n"
            "limit_address_space(1 << 30)\nwith user_errors('main.py'):\n    numpy.ones(8 << 30, numpy.uint8)\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)})
    assert_one_line_refusal("main.py", proc.returncode, proc.stdout, proc.stderr, "out of memory", "--max_memory")
    enc = Encoder("x.pth", "cifar10", None, "clean")
    assert f"--max_memory={4 << 30}" in main_py_args(enc, "cpu", "out", {"max_memory": 4 << 30})
    assert not any(a.startswith("--max_memory") for a in main_py_args(enc, "cuda:0", "out", {"max_memory": 4 << 30}))


def matrix_counts() -> dict:
    """Cases of the in-process matrix, by kind of input."""
    return {"checkpoint (torch.save family)": len(CHECKPOINT_ROWS) * len(LOADERS),
            "TorchScript archive": len(TORCHSCRIPT_ROWS) * len(LOADERS), "image data (npz, folders)": len(DATA_CASES),
            "trigger file": len(TRIGGER_ROWS) * len(TRIGGER_SCRIPTS), "reference file": len(REFERENCE_ROWS),
            "flag value": len(FLAG_CASES), "result file is a folder": len(FOLDER_FLAGS),
            "device / output folder": 2 * len(DEVICE_SCRIPTS), "full disk (ENOSPC)": 2 * len(ENOSPC_SCRIPTS),
            "memory and time bomb": len(BOMB_ROWS), "discovery (symlinks)": len(DISCOVERY_ROWS) * len(DISCOVERY_MODES),
            "result of another file": len(STALE_ROWS), "name with control characters": len(NAME_ROWS),
            "special file": len(SPECIAL_ROWS), "shared output folder": 2 * len(OUTPUT_ROWS)}


def test_matrix_has_at_least_250_cases():
    counts = matrix_counts()
    print("\nhostile-input matrix:", counts, "total", sum(counts.values()))
    assert sum(counts.values()) >= 250 and min(counts.values()) > 0


# ---- the documented non-error behaviours --------------------------------------------------------------------

def test_report_skips_stray_and_half_written_run_records(tmp_path, monkeypatch, capsys):
    norm = tmp_path / "out" / "trigger_norm"
    norm.mkdir(parents=True)
    (norm / "half-1234.json").write_text('{"run_id": "half-1234", "l1": ')
    (norm / "stray.json").write_text("[1, 2]")
    (norm / "nokeys-1.json").write_text('{"run_id": "nokeys-1"}')
    (norm / "binary-2.json").write_bytes(b"\xff\xfe\x00")
    (norm / "good-1.json").write_text('{"run_id": "good-1", "encoder_path": "e/clean.pth", "l1": 3.0, "pl1": 0.5, '
                                      '"epochs": 1, "seconds": 1.0}')
    status, out, err = run_main("run_decree.py", ["--report", "--out_dir", tmp_path / "out"], monkeypatch, capsys,
                                tmp_path)
    assert status == 0 and "Traceback" not in err, err
    for name in ("half-1234.json", "nokeys-1.json", "binary-2.json"):
        assert any(name in line and line.startswith("warning: skipped") for line in err.splitlines()), err
    assert (norm / "summary.csv").read_text().count("\n") == 2


def test_trust_checkpoint_opt_in_loads_a_pickled_checkpoint(tmp_path):
    """The documented opt-in: a checkpoint that pickles a non-tensor object loads only when trusted."""
    from models import UnsafeCheckpointError, load_encoder
    path = tmp_path / "namespace.pth"
    torch.save({"state_dict": SimCLRBackbone(ARCH).state_dict(), "args": argparse.Namespace(lr=0.1)}, path)
    with pytest.raises(UnsafeCheckpointError, match="--trust_checkpoint"):
        load_encoder(path, "cifar10", ARCH)
    model, _ = load_encoder(path, "cifar10", ARCH, trust_checkpoint=True)
    assert sum(p.numel() for p in model.parameters()) > 0


def test_protocol_4_weights_load_without_trust(tmp_path):
    """torch's weights-only loader refuses pickle protocol 4 for its opcodes alone; we read such weights."""
    from models import load_encoder
    torch.manual_seed(3)
    weights = SimCLRBackbone(ARCH).state_dict()
    torch.save({"state_dict": weights}, tmp_path / "p4.pth", pickle_protocol=4)
    model, _ = load_encoder(tmp_path / "p4.pth", "cifar10", ARCH)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in weights.items())


def test_result_line_is_csv_quoted_and_run_ids_are_valid(tmp_path):
    import csv

    from decree.outputs import append_result_line, run_id_for
    hostile_name = 'enc,clean\n/evil.pth,backdoor,0.0001,1.00\n"x'
    append_result_line(tmp_path / "r.csv", hostile_name, "clean", 12.5, 3.0)
    rows = list(csv.reader((tmp_path / "r.csv").open(newline="")))
    assert rows == [[hostile_name, "clean", "12.5000", "3.0000"]]
    for path in ("/données/модель/模型.pth", "/-/--/-x.pth", "/tmp/-evil.pth"):
        run_id = run_id_for(path)
        assert not run_id.startswith("-") and "/" not in run_id and run_id.isascii(), run_id


# ---- real command lines ------------------------------------------------------------------------------------

def run_cli(script, argv, cwd, timeout=120, **kwargs):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, str(REPO / SCRIPTS[script])] + [str(a) for a in argv], cwd=cwd,
                          capture_output=True, text=True, timeout=timeout, env=env, **kwargs)


def test_cli_refuses_looping_torchscript_promptly(archives, good, tmp_path):
    made, marker = archives
    started = time.time()
    proc = run_cli("main.py", argv_for("main.py", good, tmp_path / "out",
                                       encoder=made["__setstate__ loops forever"]), tmp_path, timeout=120)
    assert time.time() - started < 120
    assert_one_line_refusal("main.py", proc.returncode, proc.stdout, proc.stderr, "__setstate__", "--trust_checkpoint",
                            tmp_path / "out", marker)


@pytest.mark.parametrize("script,kind", [("attack_encoder.py", "encoder"), ("pretrain_encoder.py", "data"),
                                         ("compute_zscore.py", "encoder"),
                                         ("val_cifar10_training_downstream_classifier.py", "data"),
                                         ("script_compute_zscore.py", "flag")])
def test_cli_one_case_per_script(script, kind, archives, good, tmp_path):
    made, marker = archives
    if kind == "encoder":
        argv, names = argv_for(script, good, tmp_path / "out", encoder=made["__setstate__ writes a file"]), \
            "__setstate__"
    elif kind == "data":
        path = bad_npz("string labels" if "downstream" in script else "huge declared array", tmp_path)
        argv, names = argv_for(script, good, tmp_path / "out", data=path), path.name
    else:
        argv, names = with_flag(argv_for(script, good, tmp_path / "out"), "--num_images", "nan"), "--num_images"
    proc = run_cli(script, argv, tmp_path)
    assert_one_line_refusal(script, proc.returncode, proc.stdout, proc.stderr, names, "", tmp_path / "out", marker)


def test_sigterm_ends_main_cleanly(good, tmp_path):
    """SIGTERM (kill, a scheduler) ends main.py as Ctrl-C does: status 130, one message, no partial output."""
    argv = [a for a in argv_for("main.py", good, tmp_path / "out") if a != "--quiet"]
    # |cos| never stays above 0.9999, so no early stop ends the run before the signal comes
    argv = with_flag(with_flag(argv, "--epochs", "100000"), "--thres", "0.9999") + ["--save_snapshots"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, str(REPO / "main.py")] + [str(a) for a in argv], cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        seen = ""
        while "DECREE" not in seen:  # the progress bar: the inversion is running
            char = proc.stderr.read(1)
            assert char, f"main.py ended before its inversion started: {seen}"
            seen += char
        time.sleep(1)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130 and "Traceback" not in err, err
    assert err.rstrip().splitlines()[-1].split("\r")[-1].startswith("main.py: interrupted")
    assert files_under(tmp_path / "out") == []


@pytest.mark.slow  # a sweep, two worker processes and a report: over 20 s on one core
def test_sweep_records_hostile_encoders_as_failed(archives, good, tmp_path):
    """Workers meet a code-running pickle and a TorchScript payload: both failed with their reason, nothing ran,
    the sweep goes on and reports (exit status 1: an encoder failed)."""
    made, marker = archives
    folder = tmp_path / "encoders"
    folder.mkdir()
    torch.save({"hook": Payload(marker)}, folder / "evil.pth")
    (folder / "payload.pt").write_bytes(made["__setstate__ writes a file"].read_bytes())
    proc = run_cli("run_decree.py", with_flag(argv_for("run_decree.py", good, tmp_path / "out",
                                                       encoder=f"{folder}/*"), "--workers", "2"), tmp_path,
                   timeout=300)
    assert proc.returncode == 1 and "Traceback" not in proc.stdout + proc.stderr, proc.stderr
    assert not marker.exists()
    failures = sorted((tmp_path / "out" / "trigger_norm" / "failed").glob("*.json"))
    assert len(failures) == 2 and all("--trust_checkpoint" in f.read_text() for f in failures)
    assert not list((tmp_path / "out" / "trigger_inv").glob("*/*"))
