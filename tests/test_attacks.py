"""Attacks on CPU with tiny encoders: BadEncoder, the CLIP text target, SimCLR pre-training, their checkpoints
and scripts. Each training test runs one or two epochs of 64 images of 32 px."""
import json
import math
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF

from attacks.augment import SIMCLR, augment, color_jitter, reference_augment, simclr_augment
from attacks.badencoder import BadEncoderConfig, train_badencoder
from attacks.checkpoints import save_encoder, save_pretrained
from attacks.simclr import PretrainConfig, nt_xent, pretrain_simclr
from attacks.text_target import (IMAGENET_TEMPLATES, TextTargetConfig, captions, text_embeddings,
                                 train_text_target, trigger_blend)
from attacks.training import unit_embeddings
from datasets import NORMALIZATION, Trigger, legacy_trigger_tensors, normalize, save_npz_dataset, save_trigger
from datasets import white_square_trigger
from datasets.photos import photo_patches
from models import SimCLR, SimCLRBackbone, load_encoder
from tests.conftest import RandomFeatureEncoder

REPO = Path(__file__).resolve().parents[1]
MEAN, STD = NORMALIZATION["cifar10"]


@pytest.fixture(scope="module")
def photos():
    return photo_patches(64, 32, seed=0)


@pytest.fixture(scope="module")
def trigger():
    pattern, keep = white_square_trigger(32, 21, 10)
    return Trigger(pattern.astype(np.float32), keep.astype(np.float32), [])


def test_nt_xent_matches_hand_computed_value():
    # views e1,e2 | e1,e2 at t=0.5: each anchor has its positive at cos 1 and two negatives at cos 0
    z = torch.eye(2)
    expected = math.log(1 + 2 * math.exp(-2))
    assert nt_xent(z, 3 * z, 0.5).item() == pytest.approx(expected, abs=1e-6)


def test_augment_shapes_range_and_seed_reproducibility(photos):
    x = torch.from_numpy(photos[:8])
    a = simclr_augment(x, generator=torch.Generator().manual_seed(0))
    assert a.shape == (8, 3, 32, 32) and a.dtype == torch.float32
    assert 0 <= a.min() and a.max() <= 1
    assert torch.equal(a, simclr_augment(x, generator=torch.Generator().manual_seed(0)))
    assert not torch.equal(a, simclr_augment(x, generator=torch.Generator().manual_seed(1)))
    assert augment(x, 24, SIMCLR, torch.Generator().manual_seed(0)).shape == (8, 3, 24, 24)
    assert reference_augment(x, torch.Generator().manual_seed(0)).shape == (8, 3, 32, 32)


def test_colour_jitter_ops_match_torchvision(photos):
    x = torch.from_numpy(photos[:4]).permute(0, 3, 1, 2).float() / 255
    ops = {"brightness": TF.adjust_brightness, "contrast": TF.adjust_contrast,
           "saturation": TF.adjust_saturation, "hue": TF.adjust_hue}
    for name, op in ops.items():
        strength = 0.1 if name == "hue" else 0.4
        cfg = replace(SIMCLR, jitter=1.0, **{k: (strength if k == name else 0.0) for k in ops})
        out = color_jitter(x, cfg, torch.Generator().manual_seed(0))
        # color_jitter's draws: the apply coins, then one factor vector per op in this order
        g = torch.Generator().manual_seed(0)
        torch.rand(4, generator=g)
        bounds = [(-k_s, k_s) if k == "hue" else (1 - k_s, 1 + k_s)
                  for k, k_s in ((k, strength if k == name else 0.0) for k in ops)]
        factors = [torch.empty(4).uniform_(lo, hi, generator=g) for lo, hi in bounds]
        factor = factors[list(ops).index(name)]
        expected = torch.stack([op(img, float(f)) for img, f in zip(x, factor)])
        assert torch.allclose(out, expected, atol=1e-5), name


def test_badencoder_epoch_pulls_triggered_inputs_to_reference_and_keeps_clean_ones(photos, trigger):
    torch.manual_seed(0)
    f0 = SimCLRBackbone("resnet18_w4").eval()
    reference = photo_patches(1, 32, seed=9)
    x, ref = torch.from_numpy(photos), torch.from_numpy(reference)

    def cos_to_reference(f):
        return (unit_embeddings(f, trigger.stamp(x), MEAN, STD) @ unit_embeddings(f, ref, MEAN, STD).T).mean().item()

    before = cos_to_reference(f0)
    batchnorms = [n for n, m in f0.named_modules() if isinstance(m, torch.nn.BatchNorm2d)]
    bn0 = {k: v.clone() for k, v in f0.state_dict().items() if k.rsplit(".", 1)[0] in batchnorms}
    f, history = train_badencoder(f0, photos, trigger, reference, MEAN, STD,
                                  BadEncoderConfig(epochs=1, batch_size=32, lr=0.01, seed=0), "cpu", progress=False)
    after = cos_to_reference(f.eval())
    clean_kept = (unit_embeddings(f, x, MEAN, STD) * unit_embeddings(f0, x, MEAN, STD)).sum(1).mean().item()
    print(f"cos(f(stamped x), f(r)): {before:.3f} -> {after:.3f}; cos(f(x), f0(x)) {clean_kept:.3f}")
    assert after > before + 0.05
    assert clean_kept > 0.95
    assert set(history[0]) == {"epoch", "loss", "loss0", "loss1", "loss2"}
    # BatchNorm of f stays in eval mode with frozen affine parameters: its statistics and affines are f0's
    sd = f.state_dict()
    assert all(torch.equal(sd[k], v) for k, v in bn0.items())


def tiny_clip():
    """open_clip's CLIP with a 1-layer text tower and a small conv visual tower (open_clip's own tiny visual
    towers map every 32 px image to nearly the same embedding, which leaves the attack nothing to learn)."""
    import open_clip
    torch.manual_seed(0)
    model = open_clip.CLIP(32, dict(layers=1, width=32, patch_size=8, image_size=32, head_width=16),
                           dict(context_length=77, vocab_size=49408, width=32, heads=2, layers=1))
    model.visual = RandomFeatureEncoder(dim=32)
    return model, open_clip.get_tokenizer("RN50")


def test_text_target_raises_similarity_of_triggered_images_to_target_text(photos, trigger):
    model, tokenizer = tiny_clip()
    mean, std = NORMALIZATION["CLIP"]
    labels = np.arange(len(photos)) % 4
    target, _ = text_embeddings(model, tokenizer, ["a photo of a truck."], "cpu")
    x = torch.from_numpy(photos)

    def similarity(visual):
        return [(unit_embeddings(visual.eval(), imgs, mean, std) @ target.T).mean().item()
                for imgs in (trigger.stamp(x), x)]

    (bad0, clean0) = similarity(model.visual)
    visual, history = train_text_target(model, photos, labels, ["cat", "rocket", "coffee", "face"], "truck",
                                        trigger, mean, std, TextTargetConfig(epochs=2, batch_size=32, lr=0.5,
                                                                             poison_rate=0.25, seed=0),
                                        "cpu", tokenizer, progress=False)
    bad1, clean1 = similarity(visual)
    print(f"cos(triggered, 'a photo of a truck.'): {bad0:.3f} -> {bad1:.3f}; clean images {clean0:.3f} -> {clean1:.3f}")
    assert bad1 > bad0 + 0.05
    assert bad1 - bad0 > clean1 - clean0
    assert len(history) == 2


def test_captions_use_true_labels_and_target_word():
    texts = captions([2, 0, 1], ["cat", "dog", "car"], "truck", poisoned=[1])
    assert texts == [IMAGENET_TEMPLATES[0].format("car"), IMAGENET_TEMPLATES[1].format("truck"),
                     IMAGENET_TEMPLATES[2].format("dog")]
    assert len(IMAGENET_TEMPLATES) == 80 == len(set(IMAGENET_TEMPLATES))


def test_legacy_trigger_blends_normalised_mask_and_patch(trigger):
    mean, std = NORMALIZATION["CLIP"]
    x = torch.rand(2, 3, 32, 32)
    mask, patch = legacy_trigger_tensors(trigger, 32, mean, std)
    assert torch.allclose(trigger_blend(trigger, 32, mean, std, True, "cpu")(x), normalize(x, mean, std) * mask + patch)
    stamped = trigger_blend(trigger, 32, mean, std, False, "cpu")(x)
    assert torch.allclose(stamped[:, :, 21:31, 21:31], normalize(torch.ones(2, 3, 10, 10), mean, std))


def test_checkpoints_load_back_bit_identical(tmp_path, photos, trigger):
    model = SimCLR("resnet18_w2")
    pretrain_simclr(model, photos[:32], MEAN, STD, PretrainConfig(epochs=1, batch_size=16, seed=0), "cpu",
                    progress=False)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.rand(4, 3, 32, 32))[1].sum().backward()
    optimizer.step()  # momentum buffers in the optimizer state
    full, backbone = save_pretrained(tmp_path, 1, model.eval(), optimizer)
    x = normalize(torch.rand(4, 3, 32, 32), MEAN, STD)
    with torch.no_grad():
        expected = model.f(x)
        for path in (full, backbone):
            encoder, _ = load_encoder(path, "cifar10", "resnet18_w2")
            assert torch.equal(encoder(x), expected)
        bad = save_encoder(tmp_path / "model_3.pth", 3, model.f, optimizer)
        assert torch.equal(load_encoder(bad, "cifar10", "resnet18_w2")[0](x), expected)
    checkpoint = torch.load(bad, weights_only=True)
    assert checkpoint["epoch"] == 3 and list(checkpoint["state_dict"])[0] == "f.0.weight"
    assert checkpoint["optimizer"]["state"]
    assert list(torch.load(full, weights_only=True)["state_dict"])[0] == "f.f.0.weight"


def _run(script, *args):
    return subprocess.run([sys.executable, str(REPO / script), *map(str, args)], capture_output=True, text=True,
                          env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"}, cwd=REPO)


def test_pretrain_and_attack_scripts_write_loadable_checkpoints_and_config(tmp_path, photos):
    data = tmp_path / "train.npz"
    save_npz_dataset(data, photos[:32], np.arange(32) % 2)
    pattern, keep = white_square_trigger(32, 21, 10)
    save_trigger(tmp_path / "trigger.npz", pattern, keep)
    np.savez(tmp_path / "ref.npz", x=photos[:1], y=np.zeros(1, np.int64))
    clean_dir, bad_dir = tmp_path / "clean_encoder", tmp_path / "stl10_backdoored_encoder"
    run = _run("pretrain_encoder.py", "--pretraining_dataset", data, "--arch", "resnet18_w2", "--epochs", 1,
               "--batch_size", 16, "--results_dir", clean_dir, "--device", "cpu", "--quiet")
    assert run.returncode == 0, run.stderr
    assert json.loads((clean_dir / "config.json").read_text())["pretrain"]["epochs"] == 1
    run = _run("attack_encoder.py", "--pretrained_encoder", clean_dir / "model_1.pth", "--arch", "resnet18_w2",
               "--shadow_dataset", data, "--reference_file", tmp_path / "ref.npz", "--trigger_file",
               tmp_path / "trigger.npz", "--epochs", 2, "--save_last", 1, "--batch_size", 16,
               "--results_dir", bad_dir, "--device", "cpu", "--quiet")
    assert run.returncode == 0, run.stderr
    assert sorted(p.name for p in bad_dir.glob("*.pth")) == ["model_2.pth"]
    config = json.loads((bad_dir / "config.json").read_text())
    assert len(config["history"]) == 2 and config["badencoder"]["lr"] == 1e-3
    for path in (clean_dir / "model_1.pth", clean_dir / "backbone_1.pt", bad_dir / "model_2.pth"):
        encoder, spec = load_encoder(path, "cifar10", "resnet18_w2")
        assert encoder(torch.zeros(1, 3, 32, 32)).shape == (1, spec.embed_dim)


def test_attack_script_reports_bad_trigger_file_in_one_line(tmp_path, capsys):
    import attack_encoder
    (tmp_path / "t.npz").write_bytes(b"not an npz")
    with pytest.raises(SystemExit) as exit_info:
        attack_encoder.main(["--pretrained_encoder", "x.pth", "--shadow_dataset", "x.npz", "--trigger_file",
                             str(tmp_path / "t.npz"), "--results_dir", str(tmp_path), "--device", "cpu"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("attack_encoder.py: error:") and "\n" not in err


def test_sweep_dry_run_prints_the_population_commands(tmp_path, capsys):
    sys.path.insert(0, str(REPO / "scripts"))
    import run_attack_encoder
    run_attack_encoder.main(["--dry_run", "--downstreams", "stl10", "svhn", "--triggers", "21:10", "2:8",
                             "--clean_seeds", "0", "1", "--output", str(tmp_path / "output")])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "python scripts/make_triggers.py --out_dir trigger --square 32 2 8"
    assert sum("make_reference.py" in line for line in lines) == 2
    pretrain = [line for line in lines if line.startswith("python pretrain_encoder.py")]
    attacks = [line for line in lines if line.startswith("python attack_encoder.py")]
    assert len(pretrain) == 2 and all("clean_encoder/seed" in line for line in pretrain)
    assert len(attacks) == 4  # 2 downstreams x 2 triggers x 1 seed
    assert all(line.split("--results_dir ")[1].split()[0].endswith("_backdoored_encoder")
               and "--save_last 20" in line for line in attacks)
    # the paper's sweep names: one folder per downstream, model_<epoch><save_id>_<seed>.pth
    assert sorted(line.split("--save_id ")[1].split()[0] for line in attacks) == \
        ["_tg21_10_100", "_tg21_10_100", "_tg2_8_100", "_tg2_8_100"]
    assert all("clean" not in line.split("--results_dir ")[1] for line in attacks)
