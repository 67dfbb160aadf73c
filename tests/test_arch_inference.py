"""--arch inferred from the checkpoint: SimCLR depth and width, CLIP RN50 vs ViT-B/32; ambiguous ones refused."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import main
from conftest import smooth_images
from datasets import save_npz_dataset
from models import CheckpointError, SimCLR, SimCLRBackbone, load_encoder
from models.clip import open_clip_name
from models.arch_inference import infer_arch

ROOT = Path(__file__).resolve().parents[1]


def meta_state_dict(build):
    """Keys and shapes only: inference never looks at values, and meta tensors cost no memory."""
    with torch.device("meta"):
        return build().state_dict()


@pytest.mark.parametrize("arch", ["resnet18", "resnet34", "resnet50", "resnet18_w16", "resnet18_w4"])
@pytest.mark.parametrize("layout", ["backbone", "full SimCLR model"])
def test_simclr_depth_and_width_are_inferred(arch, layout):
    sd = meta_state_dict(lambda: SimCLRBackbone(arch) if layout == "backbone" else SimCLR(arch))
    inferred, why = infer_arch(sd, "cifar10", "x.pth")
    assert inferred == arch and "stem" in why


def test_simclr_width_of_a_deeper_resnet_is_ambiguous_and_refused():
    sd = meta_state_dict(lambda: SimCLRBackbone("resnet34"))
    sd["f.0.weight"] = torch.empty(16, 3, 3, 3, device="meta")  # a narrow ResNet34: no such --arch
    with pytest.raises(CheckpointError, match=r"x.pth: cannot infer the SimCLR backbone .*pass --arch"):
        infer_arch(sd, "stl10", "x.pth")


def open_clip_meta(name: str):
    """The open_clip CLIP `name` with meta tensors (create_model would move it to a real device)."""
    import open_clip
    return open_clip.CLIP(**open_clip.get_model_config(name))


@pytest.mark.parametrize("arch, full", [("RN50", True), ("ViT-B/32", True), ("RN50", False)])
def test_clip_rn50_and_vit_b32_are_told_apart(arch, full):
    name = open_clip_name(arch)
    sd = meta_state_dict(lambda: open_clip_meta(name) if full else open_clip_meta(name).visual)
    assert infer_arch(sd, "CLIP", "clip.pt")[0] == arch


def test_other_clip_towers_point_at_open_clip():
    sd = meta_state_dict(lambda: open_clip_meta("ViT-B-16"))
    with pytest.raises(CheckpointError, match="not ViT-B/32; use --encoder_usage_info open_clip --arch"):
        infer_arch(sd, "CLIP", "vit16.pt")


def test_layouts_without_a_rule_keep_the_default():
    assert infer_arch({"conv1.weight": torch.empty(64, 3, 7, 7)}, "imagenet", "x.pth") == (None, "")


def test_load_encoder_says_what_it_inferred(tmp_path):
    torch.save({"state_dict": SimCLRBackbone("resnet18_w4").state_dict()}, tmp_path / "model.pth")
    _, spec = load_encoder(tmp_path / "model.pth", "cifar10")
    assert spec.arch == "resnet18_w4" and "stem 4 channels" in spec.arch_note
    _, spec = load_encoder(tmp_path / "model.pth", "cifar10", "resnet18_w4")
    assert spec.arch_note == ""  # given, not inferred


@pytest.fixture(scope="module")
def narrow_encoders(tmp_path_factory):
    """resnet18_w4 checkpoints as the demo writes them (full SimCLR model, backbone; config.json beside each)."""
    from attacks.checkpoints import save_encoder
    folder = tmp_path_factory.mktemp("narrow")
    for name, model in (("clean_encoder", SimCLR("resnet18_w4")),
                        ("backdoored_encoder", SimCLRBackbone("resnet18_w4"))):
        save_encoder(folder / name / "model_1.pth", 1, model)
        (folder / name / "config.json").write_text(json.dumps({"settings": {"arch": "resnet18_w4"}, "history": []}))
    save_npz_dataset(folder / "shadow.npz", smooth_images(16, 32, seed=1), np.zeros(16, np.int64))
    return folder


def test_main_prints_and_records_the_inferred_arch(narrow_encoders, tmp_path, capsys):
    main.main(["--encoder_path", str(narrow_encoders / "clean_encoder" / "model_1.pth"), "--shadow_data",
               str(narrow_encoders / "shadow.npz"), "--epochs", "1", "--device", "cpu", "--out_dir",
               str(tmp_path), "--id", "run", "--quiet"])
    assert "--arch resnet18_w4 (inferred from the checkpoint" in capsys.readouterr().out
    record = json.loads((tmp_path / "trigger_norm" / "run.json").read_text())
    assert record["arch"] == "resnet18_w4"


@pytest.mark.slow  # two main.py processes: ~60 s on a busy 2-core machine
def test_run_decree_sweeps_the_demos_narrow_encoders_without_arch(narrow_encoders, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, str(ROOT / "run_decree.py"), "--encoders",
                           str(narrow_encoders / "**" / "model_1.pth"), "--shadow_data",
                           str(narrow_encoders / "shadow.npz"), "--epochs", "1", "--devices", "cpu",
                           "--out_dir", str(tmp_path), "--quiet"], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "2 finished, 0 failed" in done.stdout
