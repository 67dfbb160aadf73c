"""Parity with the paper's code and BadEncoder's: the same shadow images, attack schedules,
captions, normalisation and defaults. Each test fails on the behaviour before the fix."""
import json
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import main
import models
from attacks import jobs
from decree import inversion
from attacks.jobs import attack_schedule, checkpoint_saver, classifier_head, load_full_clip
from attacks.simclr import PretrainConfig
from attacks.text_target import IMAGENET_TEMPLATES, captions, poisoned_indices
from datasets import (CLIP_NORMALIZATION, NORMALIZATION, load_shadow_set, save_npz_dataset, save_trigger,
                      white_square_trigger)
from tests.conftest import RandomFeatureEncoder, smooth_images



def numbered_images(n: int, size: int = 32) -> np.ndarray:
    """uint8 (n,size,size,3) whose pixel (0,0) spells the image's index in channels 0 (low) and 1 (high)."""
    x = np.zeros((n, size, size, 3), np.uint8)
    x[:, 0, 0, 0], x[:, 0, 0, 1] = np.arange(n) % 256, np.arange(n) // 256
    return x


def indices_of(images: np.ndarray) -> list[int]:
    return (images[:, 0, 0, 0].astype(int) + 256 * images[:, 0, 0, 1].astype(int)).tolist()


# ---- 1. shadow sets ---------------------------------------------------------------------------------------

def test_stl10_shadow_is_the_first_80_of_each_class_in_file_order(tmp_path, monkeypatch):
    y = np.random.default_rng(0).permutation(np.repeat(np.arange(10), 800))  # classes interleaved, 800 each
    (tmp_path / "data" / "stl10").mkdir(parents=True)
    np.savez(tmp_path / "data" / "stl10" / "test.npz", x=numbered_images(8000), y=y.reshape(-1, 1))
    monkeypatch.chdir(tmp_path)
    shadow = load_shadow_set("stl10", 32, seed=80)
    expected = sorted(i for c in range(10) for i in np.flatnonzero(y == c)[:80])
    assert indices_of(shadow.images) == expected and len(expected) == 800
    assert indices_of(load_shadow_set("stl10", 32, seed=1).images) == expected  # no randomness
    assert "first 10% of each class" in shadow.describe() and "800 of 8000" in shadow.describe()


def write_imagenet_val(root: Path, n: int = 50) -> None:
    """An ImageNet-style val/<wnid>/ folder of n solid-colour PNGs; image i in torchvision order has value 5*i."""
    files = sorted((f"n{c:08d}", f"ILSVRC2012_val_{(7 * i) % 1000:08d}.png") for c in range(3) for i in range(
        c * 20, min(n, c * 20 + 20)))  # torchvision's order: sorted classes, then sorted file names
    for i, (wnid, name) in enumerate(files):
        (root / "val" / wnid).mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((12, 16, 3), 5 * i, np.uint8)).save(root / "val" / wnid / name)


def test_imagenet_shadow_is_pythons_random_sample_with_the_run_seed(tmp_path, monkeypatch):
    write_imagenet_val(tmp_path / "data" / "imagenet", 50)
    monkeypatch.chdir(tmp_path)
    for seed in (80, 3):
        shadow = load_shadow_set("CLIP", 224, seed=seed, progress=False)
        found = sorted(int(v) // 5 for v in shadow.images[:, 100, 100, 0])
        assert found == sorted(random.Random(seed).sample(range(50), int(0.2 * 50)))
    assert "the paper's rule" in shadow.describe() and "random.sample" in shadow.describe()
    # the same ImageNet root elsewhere is a folder the user names: the cap (10,000 of 50,000 for the real one)
    # draws the same images
    shutil.copytree(tmp_path / "data" / "imagenet", tmp_path / "elsewhere")
    monkeypatch.setattr("datasets.shadow.IMAGE_FOLDER_CAP", 10)
    capped = load_shadow_set("CLIP", 224, tmp_path / "elsewhere", seed=3, progress=False)
    assert np.array_equal(capped.images, shadow.images) and "capped at 10" in capped.describe()


def test_a_file_the_user_names_is_used_whole_and_a_large_folder_is_capped(tmp_path, monkeypatch):
    one_class = tmp_path / "mine.npz"
    save_npz_dataset(one_class, numbered_images(500), np.zeros(500, np.int64))
    whole = load_shadow_set("cifar10", 32, one_class, seed=80)
    assert indices_of(whole.images) == list(range(500)) and "all of it" in whole.describe()
    sampled = load_shadow_set("cifar10", 32, one_class, size=30, seed=80)
    assert indices_of(sampled.images) == sorted(random.Random(80).sample(range(500), 30))
    write_imagenet_val(tmp_path / "folder", 8)
    monkeypatch.setattr("datasets.shadow.IMAGE_FOLDER_CAP", 5)
    capped = load_shadow_set("CLIP", 224, tmp_path / "folder", seed=80, progress=False)
    assert len(capped.images) == 5 and "capped at 5" in capped.describe() and "5 of 8" in capped.describe()


@pytest.fixture(scope="module")
def tiny_encoder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("parity")
    torch.manual_seed(0)
    path = folder / "clean_encoder" / "model_1.pth"
    path.parent.mkdir()
    torch.save({"epoch": 1, "state_dict": models.get_encoder("cifar10", "resnet18_w2").state_dict()}, path)
    data = folder / "train.npz"
    save_npz_dataset(data, smooth_images(16, 32, seed=2), np.arange(16) % 2)
    return path, data


def test_main_prints_the_shadow_set_and_writes_the_papers_not_found_line(tiny_encoder, tmp_path, capsys,
                                                                         monkeypatch):
    path, data = tiny_encoder
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", False)
    # stamped images that never agree (cos 0 for every restart): no trigger is found
    monkeypatch.setattr(inversion, "mean_pairwise_cos", lambda embeddings: (embeddings * 0).flatten(1).sum(1))
    result_file = tmp_path / "result.csv"
    main.main(["--encoder_path", str(path), "--arch", "resnet18_w2", "--shadow_data", str(data), "--epochs", "1",
               "--out_dir", str(tmp_path), "--result_file", str(result_file), "--device", "cpu", "--quiet"])
    first = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("shadow set"))
    assert first == f"shadow set: 16 of 16 images from {data} (all of it; --shadow_size/--shadow_fraction to sample)"
    encoder, flag, l1, seconds = result_file.read_text().strip().split(",")
    assert l1 == "10000000.0000" and len(seconds.split(".")[1]) == 4
    assert torch.backends.cudnn.deterministic  # as the paper set it; --nondeterministic lifts it


def test_main_defaults_are_the_papers_experiments_and_its_main_py_is_a_switch_away(capsys):
    args = main.parse_args(["--encoder_path", "x.pth"])
    assert (args.lr, args.batch_size, args.seed, args.mask_init) == (0.5, 32, 80, "rand")
    old = main.parse_args(["--encoder_path", "x.pth", "--paper_main_defaults"])
    assert (old.lr, old.batch_size, old.seed) == (1e-3, 256, 100)
    assert main.parse_args(["--encoder_path", "x.pth", "--paper_main_defaults", "--lr", "0.2"]).lr == 0.2
    with pytest.raises(SystemExit):
        main.parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "lr 0.5, batch size 32, seed 80, mask_init rand" in text and "(default 0.5;" in text
    assert "--paper_main_defaults" in text


# ---- 2. attack schedules ----------------------------------------------------------------------------------

def attack_argv(encoder, data, tmp_path, *extra):
    pattern, keep = white_square_trigger(32, 21, 10)
    save_trigger(tmp_path / "trigger.npz", pattern, keep)
    np.savez(tmp_path / "ref.npz", x=smooth_images(1, 32, seed=5), y=np.zeros(1, np.int64))
    return ["--pretrained_encoder", str(encoder), "--arch", "resnet18_w2", "--shadow_dataset", str(data),
            "--reference_file", str(tmp_path / "ref.npz"), "--trigger_file", str(tmp_path / "trigger.npz"),
            "--batch_size", "16", "--device", "cpu", "--quiet", *map(str, extra)]


def saved_epochs(folder: Path, save_id: str = "") -> list[int]:
    return sorted(int(p.name[len("model_"):-len(f"{save_id}.pth")]) for p in folder.glob(f"model_*{save_id}.pth"))


def test_attack_epochs_count_as_the_papers_script(tiny_encoder, tmp_path):
    import attack_encoder
    encoder, data = tiny_encoder
    out = tmp_path / "stl10_backdoored_encoder"
    attack_encoder.main(attack_argv(encoder, data, tmp_path, "--epochs", 3, "--results_dir", out,
                                    "--save_id", "_tg21_10_100"))
    assert saved_epochs(out, "_tg21_10_100") == list(range(3, 23))  # trains 22 epochs, saves 3..22
    config = json.loads((out / "config_tg21_10_100.json").read_text())
    assert len(config["history"]) == 22 and config["saved_epochs"] == [3, 22]


def test_save_last_and_badencoders_schedule(tiny_encoder, tmp_path):
    import attack_encoder
    encoder, data = tiny_encoder
    attack_encoder.main(attack_argv(encoder, data, tmp_path, "--epochs", 3, "--save_last", 2,
                                    "--results_dir", tmp_path / "paper"))
    attack_encoder.main(attack_argv(encoder, data, tmp_path, "--epochs", 3, "--badencoder_schedule",
                                    "--results_dir", tmp_path / "badencoder"))
    assert saved_epochs(tmp_path / "paper") == [3, 4]
    assert saved_epochs(tmp_path / "badencoder") == [3]
    assert attack_schedule(200, badencoder=True) == (200, 200) and attack_schedule(35) == (54, 35)


def test_sweep_names_files_as_the_papers_sweep():
    from attacks.sweep import SweepConfig, sweep_plan
    steps = sweep_plan(SweepConfig(downstreams=("stl10",), clean_encoder="clean.pth", attack_epochs=30))
    assert [str(p) for p in steps[-1].outputs] == ["output/cifar10/stl10_backdoored_encoder/model_49_tg21_10_100.pth"]


# ---- 3. text target ---------------------------------------------------------------------------------------

def test_text_target_batch_defaults_to_128(tmp_path, monkeypatch):
    seen = {}

    def fake_train(model, images, labels, names, word, trigger, mean, std, cfg, *rest):
        seen["cfg"] = cfg
        return None, [{"epoch": 1, "loss": 0.0}]
    monkeypatch.setattr(jobs, "load_full_clip", lambda *a: None)
    monkeypatch.setattr(jobs, "clip_tokenizer", lambda arch: None)
    monkeypatch.setattr(jobs, "train_text_target", fake_train)
    np.savez(tmp_path / "val.npz", x=np.zeros((4, 224, 224, 3), np.uint8), y=np.arange(4))
    (tmp_path / "classes.txt").write_text("a\nb\nc\nd\n")
    pattern, keep = white_square_trigger(224, 185, 24, with_k_axis=False)
    save_trigger(tmp_path / "t.npz", pattern, keep)
    import attack_encoder
    args = attack_encoder.parse_args(["--encoder_usage_info", "CLIP", "--reference_type", "text",
                                      "--reference_word", "truck", "--class_names", str(tmp_path / "classes.txt"),
                                      "--pretrained_encoder", "RN50.pt", "--shadow_dataset", str(tmp_path / "val.npz"),
                                      "--trigger_file", str(tmp_path / "t.npz"), "--results_dir", str(tmp_path / "o"),
                                      "--device", "cpu"])
    jobs.run_attack(args, progress=False)
    assert seen["cfg"].batch_size == 128 and seen["cfg"].lr == 2e-4


def test_legacy_captions_are_the_papers_strings():
    names = ["tench, Tinca tinca", "goldfish, Carassius auratus", "kite"]
    texts = captions([2, 2, 0, 1, 0], names, "truck", poisoned=[3], legacy=True)
    assert texts == ["a bad photo of a ('tench', 'Tinca tinca').",          # index 0 mod 3, not label 2
                     "a photo of many ('goldfish', 'Carassius auratus').",
                     "a sculpture of a ('kite',).",
                     "a photo of the hard to see truck.",
                     "a low resolution photo of the ('goldfish', 'Carassius auratus')."]
    assert captions([2], names, "truck", poisoned=[])[0] == IMAGENET_TEMPLATES[0].format("kite")


def test_poisoned_images_are_the_papers_python_sample():
    assert poisoned_indices(50_000, 5e-4, 2001).tolist() == sorted(random.Random(2001).sample(range(50_000), 25))


def tiny_open_clip(seed: int):
    import open_clip
    torch.manual_seed(seed)
    return open_clip.CLIP(32, dict(layers=1, width=32, patch_size=8, image_size=32, head_width=16),
                          dict(context_length=77, vocab_size=49408, width=32, heads=2, layers=1))


def test_clip_text_model_pairs_a_visual_only_encoder_with_a_separate_text_tower(tmp_path, monkeypatch):
    visual_model, text_model = tiny_open_clip(1), tiny_open_clip(2)
    torch.save({"state_dict": visual_model.visual.state_dict()}, tmp_path / "clean_visual.pth")
    torch.save(text_model.state_dict(), tmp_path / "openai_full.pth")
    monkeypatch.setattr(jobs, "clip_model", lambda arch: tiny_open_clip(3))
    model = load_full_clip(tmp_path / "clean_visual.pth", "RN50", text_model=tmp_path / "openai_full.pth")
    sd = model.state_dict()
    assert all(torch.equal(sd[f"visual.{k}"], v) for k, v in visual_model.visual.state_dict().items())
    assert all(torch.equal(sd[k], v) for k, v in text_model.state_dict().items() if not k.startswith("visual."))
    with pytest.raises(models.CheckpointError, match="--clip_text_model"):
        load_full_clip(tmp_path / "clean_visual.pth", "RN50")


# ---- 4. downstream normalisation ------------------------------------------------------------------------

def test_downstream_inputs_are_normalised_as_the_original_evaluation(tmp_path, monkeypatch):
    import validate.downstream as downstream
    from validate.downstream import DownstreamConfig, DownstreamJob, run_downstream
    expected = {"cifar10": NORMALIZATION["cifar10"], "stl10": NORMALIZATION["stl10"], "CLIP": CLIP_NORMALIZATION,
                "imagenet": ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0)), "moco": NORMALIZATION["moco"]}
    for usage, norm in expected.items():
        spec = models.encoder_spec(usage)
        assert DownstreamJob(encoder_usage_info=usage).input_normalization(spec) == norm
        assert DownstreamJob(normalization="detection").input_normalization(spec) == (spec.mean, spec.std)
    # wired through: an imagenet-usage encoder is fed raw [0,1] inputs
    models.register_arch("parity_tiny224", lambda: RandomFeatureEncoder(dim=16), 16)
    torch.save({"state_dict": RandomFeatureEncoder(dim=16).state_dict()}, tmp_path / "enc.pth")
    for split in ("train", "test"):
        save_npz_dataset(tmp_path / f"{split}.npz", smooth_images(8, 224, seed=3), np.arange(8) % 2)
    pattern, keep = white_square_trigger(224, 173, 50)
    save_trigger(tmp_path / "trigger.npz", pattern, keep)
    seen, real = [], downstream.validate_encoder
    monkeypatch.setattr(downstream, "validate_encoder",
                        lambda model, data, trigger, target, mean, std, *a, **k:
                        seen.append((mean, std)) or real(model, data, trigger, target, mean, std, *a, **k))
    run_downstream(DownstreamJob(encoder_path=str(tmp_path / "enc.pth"), encoder_usage_info="imagenet",
                                 arch="parity_tiny224", train_data=str(tmp_path / "train.npz"),
                                 test_data=str(tmp_path / "test.npz"), trigger_file=str(tmp_path / "trigger.npz"),
                                 reference_label=1, results_file=str(tmp_path / "r.csv"), device="cpu",
                                 config=DownstreamConfig(epochs=1)), progress=False)
    assert seen == [expected["imagenet"]]


# ---- 5-7. pre-training batch, imagenet fc, CLIP resnet50 ------------------------------------------------

def test_pretraining_batch_is_badencoders_256():
    import pretrain_encoder
    assert PretrainConfig().batch_size == 256
    assert pretrain_encoder.parse_args(["--pretraining_dataset", "x.npz", "--results_dir", "o"]).batch_size == 256


def test_imagenet_encoders_keep_the_checkpoints_fc_for_strict_loading(tmp_path):
    import torchvision
    original = torchvision.models.resnet50(weights=None)  # the original code's visual tower holds fc
    torch.save({"state_dict": {f"visual.{k}": v for k, v in original.state_dict().items()}}, tmp_path / "clean.pth")
    head = classifier_head(tmp_path / "clean.pth")
    assert sorted(head) == ["fc.bias", "fc.weight"]
    encoder, _ = models.load_encoder(tmp_path / "clean.pth", "imagenet")
    checkpoint_saver(tmp_path, 1, {}, extra_tensors=head)(1, encoder, None, {})
    saved = torch.load(tmp_path / "model_1.pth", weights_only=True)["state_dict"]
    torchvision.models.resnet50(weights=None).load_state_dict(saved, strict=True)
    assert torch.equal(saved["fc.weight"], original.fc.weight)
    models.load_encoder(tmp_path / "model_1.pth", "imagenet")  # and ours still reads it


def test_clip_arch_resnet50_loads_an_rn50_visual_checkpoint(tmp_path, capsys):
    visual = models.clip_visual("RN50").eval()
    torch.save({"state_dict": visual.state_dict()}, tmp_path / "rn50.pth")
    encoder, spec = models.load_encoder(tmp_path / "rn50.pth", "CLIP", "resnet50")
    assert spec.arch == "RN50" and spec.embed_dim == 1024
    x = torch.rand(1, 3, 224, 224)
    with torch.no_grad():
        assert torch.equal(encoder(x), visual(x))
    assert "--arch resnet50 with CLIP means RN50" in capsys.readouterr().err

