"""decree.scan, the Python API: main.py's verdict and PL1 on the same encoder, silent unless asked, and usable
beside another top-level `datasets` package (Hugging Face's)."""
import ast
import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

import main
import models
from conftest import CIFAR_MEAN, CIFAR_STD, PLANTED_SIDE, PLANTED_TOP, PlantedBackdoorEncoder, smooth_images
from decree import ScanResult, scan
from decree.detect import Detection

ROOT = Path(__file__).resolve().parents[1]
TINY_ARCH = "resnet18_w8"


def json_values(value):
    """`value` as a run record stores it (tuples become lists)."""
    return json.loads(json.dumps(value))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny SimCLR checkpoint, the paper's default cifar10 shadow file under data/, and main.py's record of it."""
    folder = tmp_path_factory.mktemp("tiny")
    torch.manual_seed(0)
    encoder = models.get_encoder("cifar10", TINY_ARCH)
    path = folder / "tiny_encoder" / "model_1.pth"
    path.parent.mkdir()
    torch.save({"epoch": 1, "state_dict": encoder.state_dict()}, path)
    (folder / "data" / "cifar10").mkdir(parents=True)
    np.savez(folder / "data" / "cifar10" / "test.npz", x=smooth_images(100, 32, seed=2),
             y=np.repeat(np.arange(10), 10).reshape(-1, 1))
    cwd = Path.cwd()
    os.chdir(folder)
    try:
        main.main(["--encoder_path", str(path), "--encoder_usage_info", "cifar10", "--device", "cpu", "--quiet",
                   "--out_dir", str(folder / "main")])
    finally:
        os.chdir(cwd)
    record = json.loads(next((folder / "main" / "trigger_norm").glob("*.json")).read_text())
    return folder, path, record


def assert_same_run(result, record):
    assert result.verdict == record["verdict"].upper() and result.pl1 == record["pl1"] and result.l1 == record["l1"]
    assert result.epochs == record["epochs"] and result.notes == record["notes"]
    assert json_values(result.record["config"]) == record["config"]


def test_scan_gives_main_pys_verdict_and_pl1_with_main_pys_defaults(tiny, monkeypatch):
    folder, path, record = tiny
    monkeypatch.chdir(folder)
    result = scan(str(path), usage_info="cifar10", device="cpu")
    assert_same_run(result, record)
    assert result.mask.dtype == np.float32 and result.mask.shape == (32, 32)
    assert result.pattern.shape == (32, 32, 3) and 0 <= result.pattern.min() and result.pattern.max() <= 255
    assert result.trojaned == (result.verdict == "TROJANED") and result.pl1_threshold == 0.1


def test_a_module_and_images_run_as_main_py_runs_its_checkpoint_on_them(tiny, tmp_path):
    folder, path, _ = tiny
    images = smooth_images(24, 32, seed=5)
    np.savez(tmp_path / "shadow.npz", x=images)
    main.main(["--encoder_path", str(path), "--arch", TINY_ARCH, "--shadow_data", str(tmp_path / "shadow.npz"),
               "--epochs", "5", "--device", "cpu", "--quiet", "--out_dir", str(tmp_path)])
    record = json.loads(next((tmp_path / "trigger_norm").glob("*.json")).read_text())
    module = models.load_encoder(path, "cifar10", TINY_ARCH)[0].train()
    result = scan(module, images, usage_info="cifar10", arch=TINY_ARCH, device="cpu", max_epochs=5)
    assert_same_run(result, record)
    assert module.training and all(p.requires_grad for p in module.parameters())  # the caller's, untouched


def test_a_module_with_its_normalisation_finds_the_planted_trigger(shadow_images):
    result = scan(PlantedBackdoorEncoder(), shadow_images, mean=CIFAR_MEAN, std=CIFAR_STD, device="cpu",
                  max_epochs=80)
    assert result.verdict == "TROJANED" and result.record["arch"] is None  # own draws: no arch main.py builds
    square = result.mask[PLANTED_TOP:PLANTED_TOP + PLANTED_SIDE, PLANTED_TOP:PLANTED_TOP + PLANTED_SIDE]
    assert square.sum() / result.mask.sum() > 0.8


def test_a_module_without_images_or_normalisation_is_refused(shadow_images):
    with pytest.raises(ValueError, match="mean and std"):
        scan(PlantedBackdoorEncoder(), shadow_images)
    with pytest.raises(ValueError, match="images"):
        scan(PlantedBackdoorEncoder(), mean=CIFAR_MEAN, std=CIFAR_STD)


def test_an_unknown_setting_is_a_type_error_naming_the_settings(tiny):
    with pytest.raises(TypeError, match=r"lrate.*InversionConfig's fields: lr, batch_size"):
        scan(str(tiny[1]), usage_info="cifar10", lrate=0.5)


def test_nothing_is_printed_or_left_on_disk_without_progress(tiny, tmp_path, monkeypatch, capfd):
    folder, path, _ = tiny
    (tmp_path / "data").symlink_to(folder / "data")
    monkeypatch.chdir(tmp_path)
    capfd.readouterr()
    scan(str(path), usage_info="cifar10", device="cpu", max_epochs=2)
    assert capfd.readouterr() == ("", "")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]
    scan(str(path), usage_info="cifar10", device="cpu", max_epochs=2, progress=True, out_dir=tmp_path / "out")
    out, err = capfd.readouterr()
    assert "shadow set: 10 of 100 images" in out and "DECREE stopped" in err
    assert list((tmp_path / "out" / "trigger_norm").glob("*.json"))


def test_the_readme_example_gives_main_pys_verdict_and_pl1(tiny, monkeypatch, capsys):
    folder, path, record = tiny
    text = (ROOT / "README.md").read_text()
    section = re.search(r"^#+ [^\n]*Python[^\n]*\n(.*?)^```python\n(.*?)^```", text, re.M | re.S)
    code = section.group(2)
    code = re.sub(r'sys\.path\.insert\(0, "[^"]*"\)', f"sys.path.insert(0, {str(ROOT)!r})", code)
    code = re.sub(r'scan\("[^"]*"', f"scan({str(path)!r}", code)
    assert "usage_info=\"cifar10\"" in code  # the tiny encoder's usage info
    monkeypatch.chdir(folder)
    monkeypatch.setattr(sys, "path", list(sys.path))
    namespace = {}
    exec(code, namespace)
    assert_same_run(namespace["result"], record)
    assert capsys.readouterr().out.split() == [record["verdict"].upper(), repr(record["pl1"])]


FAKE_HF = "FAKE_HUGGING_FACE = True\n"


def run_python(code: str, cwd: Path) -> str:
    """`code` in a fresh interpreter (no PYTHONPATH: the checkout is on sys.path only where `code` puts it)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=cwd, env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    return out.stdout


SCAN_TINY = """
    import numpy as np
    result = scan({path!r}, np.load({images!r})["x"], usage_info="cifar10", device="cpu", max_epochs=2)
    import datasets
    print(result.verdict, datasets.__name__, hasattr(datasets, "FAKE_HUGGING_FACE"))
"""


@pytest.mark.parametrize("order", ["theirs first, ours appended", "theirs first, ours inserted",
                                   "ours appended, theirs found first"])
def test_scan_works_beside_another_datasets_package_which_stays_theirs(order, tiny, tmp_path):
    folder, path, _ = tiny
    site = tmp_path / "site"
    (site / "datasets").mkdir(parents=True)
    (site / "datasets" / "__init__.py").write_text(FAKE_HF)
    np.savez(tmp_path / "images.npz", x=smooth_images(8, 32, seed=3))
    setup = {
        "theirs first, ours appended": f"sys.path.insert(0, {str(site)!r}); import datasets; "
                                       f"sys.path.append({str(ROOT)!r})",
        "theirs first, ours inserted": f"sys.path.insert(0, {str(site)!r}); import datasets; "
                                       f"sys.path.insert(0, {str(ROOT)!r})",
        "ours appended, theirs found first": f"sys.path.insert(0, {str(site)!r}); sys.path.append({str(ROOT)!r})",
    }[order]
    code = f"import sys; {setup}\nfrom decree import scan\n" + textwrap.dedent(SCAN_TINY).format(
        path=str(path), images=str(tmp_path / "images.npz"))
    verdict, name, fake = run_python(code, tmp_path).split()
    assert verdict in ("TROJANED", "CLEAN") and name == "datasets" and fake == "True"


def test_the_target_is_the_name_main_py_ranks_first():
    record = {"verdict": "trojaned", "pl1": 0.01, "l1": 30.7, "pl1_threshold": 0.1, "notes": [], "epochs": 3,
              "seconds": 1.0, "target": {"names": [{"name": "truck", "similarity": 0.9}]}}
    result = type("Result", (), {"trojaned": True, "mask": None, "pattern": None})()
    assert ScanResult.of(Detection(record, result)).target == "truck"
    assert ScanResult.of(Detection({**record, "target": None}, result)).target is None
    assert ScanResult.of(Detection(record, result)).combined_verdict == "TROJANED"  # a record from before the warp test


@pytest.mark.parametrize("file", ["common/__init__.py", "decree/__init__.py", "decree/repo_modules.py"])
def test_older_pythons_read_the_files_before_the_version_check(file):
    ast.parse((ROOT / file).read_text(), feature_version=(3, 6))


def test_an_older_python_stops_with_one_line(monkeypatch):
    monkeypatch.setattr(sys, "version_info", (3, 9, 18))
    with pytest.raises(SystemExit, match=r"^DECREE needs Python 3.10 or newer; this is Python 3.9$"):
        exec((ROOT / "common" / "__init__.py").read_text(), {})
