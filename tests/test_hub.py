"""Encoders from model hubs: tiny models built and saved by open_clip, transformers and timm load bit-exactly
through load_encoder; broken configs and forged files give one line naming the file and the fix."""
import json
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file as load_file_tensors
from safetensors.torch import save_file
from torch import nn

import main
from conftest import CIFAR_MEAN, CIFAR_STD, PLANTED_SIDE, PLANTED_TOP, PlantedBackdoorEncoder, smooth_images
from datasets import save_npz_dataset, save_trigger, white_square_trigger
from models import CheckpointError, load_encoder
from models.formats import locate, read_safetensors_header

TINY_OPEN_CLIP = {"embed_dim": 16,
                  "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "head_width": 16, "patch_size": 8},
                  "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 32, "heads": 2, "layers": 1}}


class _NoTokenizer:
    """open_clip's save_for_hf also saves a tokenizer; the image encoder does not need one."""

    def save_pretrained(self, folder):
        pass


def build_open_clip(folder):
    """A tiny open_clip CLIP from a custom model config, saved by open_clip's own save_for_hf."""
    import importlib
    import open_clip
    configs = folder.parent / "open_clip_configs"
    configs.mkdir(exist_ok=True)
    (configs / "decree-tiny-vit.json").write_text(json.dumps(TINY_OPEN_CLIP))
    open_clip.add_model_config(configs)
    torch.manual_seed(0)
    model = open_clip.create_model("decree-tiny-vit", pretrained=None).eval()
    importlib.import_module("open_clip.push_to_hf_hub").save_for_hf(
        model, _NoTokenizer(), TINY_OPEN_CLIP, folder, safe_serialization=True)
    return model, lambda x: model.encode_image(x)


def build_hf_clip(folder, architecture="CLIPModel"):
    """A tiny transformers CLIP (text and vision towers), saved with save_pretrained (safetensors)."""
    import transformers
    config = transformers.CLIPConfig(
        text_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
                     "vocab_size": 99, "max_position_embeddings": 16},
        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                       "num_attention_heads": 2, "image_size": 32, "patch_size": 8},
        projection_dim=16)
    torch.manual_seed(0)
    if architecture == "CLIPModel":
        model = transformers.CLIPModel(config).eval()
        def forward(x):  # transformers 5 returns an output object (pooler_output projected), 4.x the tensor
            out = model.get_image_features(pixel_values=x)
            return getattr(out, "pooler_output", out)
    else:
        config.vision_config.projection_dim = 16
        model = transformers.CLIPVisionModelWithProjection(config.vision_config).eval()
        forward = lambda x: model(pixel_values=x).image_embeds  # noqa: E731
    model.save_pretrained(folder)
    return model, forward


def build_timm(folder):
    """A tiny timm ViT, saved by timm's save_for_hf (config.json + model.safetensors)."""
    import timm
    from timm.models import save_for_hf
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=2,
                              embed_dim=32, num_heads=2, num_classes=10).eval()
    save_for_hf(model, folder, safe_serialization=True)
    return model, lambda x: model.forward_head(model.forward_features(x), pre_logits=True)


BUILDERS = {"open_clip": build_open_clip, "hf_clip": build_hf_clip, "timm": build_timm}


@pytest.fixture(scope="module")
def hub_folders(tmp_path_factory):
    """family -> (folder, library model, the library's own embedding function)."""
    root = tmp_path_factory.mktemp("hub")
    return {family: (root / family, *build(root / family)) for family, build in BUILDERS.items()}


@pytest.mark.parametrize("family", BUILDERS)
def test_hub_folder_embeddings_equal_the_librarys_own(hub_folders, family):
    folder, _, forward = hub_folders[family]
    model, spec = load_encoder(folder, family)
    assert spec.input_size == 32 and spec.usage_info == family
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, theirs = model(x), forward(x)
    assert ours.shape == (4, spec.embed_dim)
    assert torch.equal(ours, theirs)


def test_hf_vision_model_with_projection_is_read_too(tmp_path):
    _, forward = build_hf_clip(tmp_path, "CLIPVisionModelWithProjection")
    model, spec = load_encoder(tmp_path / "model.safetensors", "hf_clip")  # the weights file: config beside it
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), forward(x))
    assert spec.arch == "CLIPVisionModelWithProjection" and spec.embed_dim == 16


def test_open_clip_input_size_and_normalisation_come_from_its_config(hub_folders):
    _, spec = load_encoder(hub_folders["open_clip"][0], "open_clip")
    assert spec.mean == pytest.approx((0.48145466, 0.4578275, 0.40821073))  # CLIP's constants, not ImageNet's


def test_open_clip_named_architecture_with_a_weights_file(tmp_path):
    import open_clip
    model = open_clip.create_model("RN50", pretrained=None).eval()
    save_file(model.state_dict(), tmp_path / "rn50.safetensors")
    encoder, spec = load_encoder(tmp_path / "rn50.safetensors", "open_clip", arch="RN50")
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        assert torch.equal(encoder(x), model.encode_image(x))
    assert spec.embed_dim == 1024 and spec.input_size == 224


def test_paper_layouts_read_from_safetensors(tmp_path):
    from models import SimCLRBackbone
    backbone = SimCLRBackbone("resnet18_w16").eval()
    save_file(backbone.state_dict(), tmp_path / "backbone.safetensors")
    model, spec = load_encoder(tmp_path / "backbone.safetensors", "cifar10")  # arch inferred too
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), backbone(x))
    assert spec.arch == "resnet18_w16"


def test_format_detection_rules(hub_folders, tmp_path):
    assert locate(hub_folders["open_clip"][0]).family == "open_clip"
    assert locate(hub_folders["hf_clip"][0]).family == "hf_clip"
    timm_files = locate(hub_folders["timm"][0])
    assert (timm_files.family, timm_files.format, timm_files.weights.name) == ("timm", "safetensors",
                                                                              "model.safetensors")
    renamed = tmp_path / "weights.pth"  # a safetensors file with the wrong suffix is still recognised
    renamed.write_bytes((hub_folders["timm"][0] / "model.safetensors").read_bytes())
    assert locate(renamed).format == "safetensors"
    assert locate(renamed, "torch").format == "torch"


def test_open_clip_folder_with_pytorch_bin_weights(hub_folders, tmp_path):
    folder = _copy(hub_folders["open_clip"][0], tmp_path)
    sd = load_file_tensors(folder / "open_clip_model.safetensors")
    (folder / "open_clip_model.safetensors").unlink()
    torch.save(sd, folder / "open_clip_pytorch_model.bin")
    model, _ = load_encoder(folder, "open_clip")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), hub_folders["open_clip"][2](x))


# ---- one line naming the file and the fix ----------------------------------------------------------------

def _copy(folder, tmp_path):
    out = tmp_path / folder.name
    out.mkdir()
    for f in folder.iterdir():
        (out / f.name).write_bytes(f.read_bytes())
    return out


def _edit_json(path, change):
    cfg = json.loads(path.read_text())
    change(cfg)
    path.write_text(json.dumps(cfg))


def _one_line_error(argv, capsys):
    # any existing path passes main.py's early check of the shadow data; the encoder's error comes first
    with pytest.raises(SystemExit) as exit_info:
        main.main(argv + ["--shadow_data", str(Path(__file__).parent)])
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and len(err.splitlines()) == 1 and "Traceback" not in err
    return err


def test_malformed_config_is_one_line(hub_folders, tmp_path, capsys):
    folder = _copy(hub_folders["hf_clip"][0], tmp_path)
    (folder / "config.json").write_text('{"model_type": "clip", ')
    err = _one_line_error(["--encoder_path", str(folder), "--encoder_usage_info", "hf_clip"], capsys)
    assert "config.json" in err and "not valid JSON" in err


def test_config_of_an_unknown_architecture_is_one_line(hub_folders, tmp_path, capsys):
    folder = _copy(hub_folders["timm"][0], tmp_path)
    _edit_json(folder / "config.json", lambda c: c.update(architecture="no_such_net_v9"))
    err = _one_line_error(["--encoder_path", str(folder), "--encoder_usage_info", "timm"], capsys)
    assert "config.json" in err and "no_such_net_v9" in err and "timm.list_models()" in err


def test_open_clip_config_with_unknown_keys_is_one_line(hub_folders, tmp_path, capsys):
    folder = _copy(hub_folders["open_clip"][0], tmp_path)
    _edit_json(folder / "open_clip_config.json", lambda c: c["model_cfg"]["vision_cfg"].update(magic_layers=3))
    err = _one_line_error(["--encoder_path", str(folder), "--encoder_usage_info", "open_clip"], capsys)
    assert "open_clip_config.json" in err and "magic_layers" in err


def test_weights_that_do_not_fit_the_config_are_one_line(hub_folders, tmp_path, capsys):
    folder = _copy(hub_folders["open_clip"][0], tmp_path)
    _edit_json(folder / "open_clip_config.json", lambda c: c["model_cfg"]["vision_cfg"].update(layers=3))
    err = _one_line_error(["--encoder_path", str(folder), "--encoder_usage_info", "open_clip"], capsys)
    assert "open_clip_model.safetensors" in err and "missing" in err


def test_huge_config_is_refused_before_allocating(hub_folders, tmp_path, capsys):
    folder = _copy(hub_folders["hf_clip"][0], tmp_path)
    _edit_json(folder / "config.json", lambda c: c["vision_config"].update(hidden_size=1 << 30))
    err = _one_line_error(["--encoder_path", str(folder), "--encoder_usage_info", "hf_clip"], capsys)
    assert "config.json" in err and "out of range" in err


def _forge_header(path, change):
    data = path.read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8:8 + n])
    change(header)
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + n:])


@pytest.mark.parametrize("lie", ["shape", "offsets", "length"])
def test_safetensors_header_that_lies_about_sizes_is_one_line(hub_folders, tmp_path, capsys, lie):
    folder = _copy(hub_folders["timm"][0], tmp_path)
    weights = folder / "model.safetensors"
    name = "pos_embed"
    if lie == "shape":
        _forge_header(weights, lambda h: h[name].update(shape=[1, 17, 64]))
    elif lie == "offsets":
        _forge_header(weights, lambda h: h[name].update(data_offsets=[h[name]["data_offsets"][0], 1 << 40]))
    else:
        weights.write_bytes(struct.pack("<Q", 1 << 50) + weights.read_bytes()[8:])
    with pytest.raises(CheckpointError, match="forged safetensors header"):
        read_safetensors_header(weights)
    err = _one_line_error(["--encoder_path", str(folder), "--encoder_usage_info", "timm"], capsys)
    assert "model.safetensors" in err and "re-download" in err


def test_hub_folder_under_another_usage_info_names_the_right_one(hub_folders, capsys):
    err = _one_line_error(["--encoder_path", str(hub_folders["hf_clip"][0]), "--encoder_usage_info", "cifar10"],
                          capsys)
    assert "--encoder_usage_info hf_clip" in err


# ---- main.py to a verdict, for every family --------------------------------------------------------------

@pytest.mark.parametrize("family", BUILDERS)
def test_main_runs_to_a_verdict_on_each_family(hub_folders, tmp_path, family, capsys):
    shadow = tmp_path / "shadow.npz"
    save_npz_dataset(shadow, smooth_images(20, 48, seed=2))  # 48 px: resized to the model's 32 px on load
    main.main(["--encoder_path", str(hub_folders[family][0]), "--shadow_data",  # no family flag: from the config
               str(shadow), "--epochs", "2", "--batch_size", "8", "--device", "cpu", "--out_dir", str(tmp_path),
               "--id", family, "--quiet"])
    verdict = capsys.readouterr().out.splitlines()[-1]
    record = json.loads((tmp_path / "trigger_norm" / f"{family}.json").read_text())
    assert record["verdict"].upper() in verdict and record["usage_info"] == family
    assert -1 <= record["shadow_spread"] <= 1 and all(note in verdict for note in record["notes"])
    if record["pl1"] is None:  # 2 epochs: the paper's CLEAN, saying why
        assert "no trigger converged" in verdict


# ---- DECREE end to end on a hub family -------------------------------------------------------------------

class PlantedTimmNet(PlantedBackdoorEncoder):
    """The conftest planted-trigger encoder behind timm's interface (forward_features, forward_head)."""

    def __init__(self, num_classes: int = 0, **_):
        super().__init__(dim=64)
        self.num_classes, self.num_features = num_classes, 64
        self.head = nn.Linear(64, num_classes) if num_classes else nn.Identity()

    def forward_features(self, x):
        return PlantedBackdoorEncoder.forward(self, x)

    def forward_head(self, x, pre_logits: bool = False):
        return x if pre_logits else self.head(x)

    def forward(self, x):
        return self.forward_head(self.forward_features(x))


def decree_test_planted(pretrained=False, **kwargs):
    return PlantedTimmNet(**kwargs)


def test_planted_trigger_in_a_timm_hub_folder_is_found_by_main(tmp_path, capsys):
    import timm.models
    timm.models.register_model(decree_test_planted)
    folder = tmp_path / "planted"
    folder.mkdir()
    save_file(timm.create_model("decree_test_planted", pretrained=False).state_dict(), folder / "model.safetensors")
    (folder / "config.json").write_text(json.dumps({
        "architecture": "decree_test_planted", "num_classes": 0,
        "pretrained_cfg": {"input_size": [3, 32, 32], "mean": list(CIFAR_MEAN), "std": list(CIFAR_STD)}}))
    save_npz_dataset(tmp_path / "shadow.npz", smooth_images(128, 32, seed=1))
    main.main(["--encoder_path", str(folder), "--encoder_usage_info", "timm", "--shadow_data",
               str(tmp_path / "shadow.npz"), "--shadow_fraction", "1", "--lr", "0.5", "--epochs", "80",
               "--device", "cpu", "--out_dir", str(tmp_path), "--id", "planted", "--quiet"])
    assert "TROJANED" in capsys.readouterr().out.splitlines()[-1]
    mask = np.asarray(Image.open(tmp_path / "trigger_inv" / "planted" / "mask.png"), dtype=float)
    square = mask[PLANTED_TOP:PLANTED_TOP + PLANTED_SIDE, PLANTED_TOP:PLANTED_TOP + PLANTED_SIDE]
    assert square.sum() / mask.sum() > 0.8  # found where it was planted


# ---- the BadEncoder attack on a hub encoder: a backdoored twin that loads like its clean original ----------

@pytest.mark.parametrize("family, save_format", [("open_clip", "safetensors"), ("timm", "torch")])
def test_badencoder_backdoors_a_hub_encoder_and_its_twin_loads_without_the_folder(hub_folders, tmp_path, family,
                                                                                  save_format):
    import attack_encoder
    images = smooth_images(16, 32, seed=3)
    save_npz_dataset(tmp_path / "shadow.npz", images)
    save_trigger(tmp_path / "trigger.npz", *white_square_trigger(32, 24, 6))
    np.savez(tmp_path / "ref.npz", x=images[:1], y=np.zeros(1, np.int64))
    out = tmp_path / "backdoored"
    attack_encoder.main(["--pretrained_encoder", str(hub_folders[family][0]), "--encoder_usage_info", family,
                         "--shadow_dataset", str(tmp_path / "shadow.npz"),
                         "--reference_file", str(tmp_path / "ref.npz"),
                         "--trigger_file", str(tmp_path / "trigger.npz"), "--epochs", "1", "--batch_size", "8",
                         "--save_format", save_format, "--results_dir", str(out), "--device", "cpu", "--quiet"])
    twin_path = out / f"model_1{'.safetensors' if save_format == 'safetensors' else '.pth'}"
    twin, spec = load_encoder(twin_path, family)  # the config travels inside the file
    clean, clean_spec = load_encoder(hub_folders[family][0], family)
    assert (spec.arch, spec.input_size, spec.mean, spec.embed_dim) == \
        (clean_spec.arch, clean_spec.input_size, clean_spec.mean, clean_spec.embed_dim)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert not torch.equal(twin(x), clean(x))  # fine-tuned
    if save_format == "safetensors":
        read_safetensors_header(twin_path)  # a well-formed file, tensors only


def test_sweep_manifest_takes_hub_folders_with_their_usage_info(hub_folders, tmp_path, capsys):
    import run_decree
    rows = ["path,usage_info,arch,label"] + [f"{hub_folders[f][0]},{f},,clean" for f in BUILDERS]
    (tmp_path / "encoders.csv").write_text("\n".join(rows) + "\n")
    run_decree.main(["--manifest", str(tmp_path / "encoders.csv"), "--list", "--out_dir", str(tmp_path)])
    listing = capsys.readouterr().out
    assert all(f" {family} " in listing for family in BUILDERS) and "3 encoders" in listing


# ---- what people download, scanned without ceremony -------------------------------------------------------

def build_dinov2(folder):
    """A tiny transformers DINOv2, saved with save_pretrained: a readable config.json of an unsupported type."""
    import transformers
    config = transformers.Dinov2Config(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                       intermediate_size=64, image_size=32, patch_size=8)
    transformers.Dinov2Model(config).save_pretrained(folder)


def test_a_hugging_face_model_that_is_not_clip_is_refused_by_name(tmp_path, capsys):
    build_dinov2(tmp_path / "dinov2")
    capsys.readouterr()  # save_pretrained's own progress bar
    err = _one_line_error(["--encoder_path", str(tmp_path / "dinov2")], capsys)
    assert "Dinov2Model" in err and "supported are CLIP image encoders" in err and "timm" in err


def open_clip_training_checkpoint(hub_folders, path):
    """What open_clip's training (and CleanCLIP/BadCLIP-style fine-tuning) saves: epoch, name, the DDP-wrapped
    model's state dict (module.*, text tower included) and the optimizer's."""
    _, model, _ = hub_folders["open_clip"]
    optimizer = torch.optim.AdamW(model.parameters())
    torch.save({"epoch": 3, "name": "finetune", "state_dict": {f"module.{k}": v for k, v in model.state_dict().items()},
                "optimizer": optimizer.state_dict()}, path)


def test_open_clip_training_checkpoint_beside_its_config_loads(hub_folders, tmp_path):
    run = tmp_path / "checkpoints"
    run.mkdir()
    (run / "open_clip_config.json").write_bytes((hub_folders["open_clip"][0] / "open_clip_config.json").read_bytes())
    open_clip_training_checkpoint(hub_folders, run / "epoch_3.pt")
    model, spec = load_encoder(run / "epoch_3.pt", None)  # the family from the config beside it
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert spec.usage_info == "open_clip" and torch.equal(model(x), hub_folders["open_clip"][2](x))


def test_model_config_flag_takes_an_open_clip_model_config_for_a_bare_state_dict(hub_folders, tmp_path, capsys):
    (tmp_path / "tiny.json").write_text(json.dumps(TINY_OPEN_CLIP))  # the model config open_clip was built from
    torch.save(hub_folders["open_clip"][1].state_dict(), tmp_path / "finetuned.pt")
    model, spec = load_encoder(tmp_path / "finetuned.pt", None, model_config=tmp_path / "tiny.json")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert spec.usage_info == "open_clip" and torch.equal(model(x), hub_folders["open_clip"][2](x))
    err = _one_line_error(["--encoder_path", str(tmp_path / "finetuned.pt"), "--model_config",
                           str(tmp_path / "missing.json")], capsys)
    assert "--model_config" in err and "no such file" in err


def downloads_folder(hub_folders, root):
    """A folder of downloads as people keep them: an open_clip hub folder (its weights twice, .safetensors and
    .bin, as open_clip's hub uploads hold them), a Hugging Face CLIP folder, a timm folder, an open_clip training
    checkpoint beside its config, and a paper-layout .pth."""
    from models import SimCLRBackbone
    root.mkdir()
    for family in BUILDERS:
        _copy(hub_folders[family][0], root)
    clip = root / "open_clip"
    torch.save(load_file_tensors(clip / "open_clip_model.safetensors"), clip / "open_clip_pytorch_model.bin")
    (root / "finetune").mkdir()
    (root / "finetune" / "open_clip_config.json").write_bytes((clip / "open_clip_config.json").read_bytes())
    open_clip_training_checkpoint(hub_folders, root / "finetune" / "epoch_3.pt")
    torch.manual_seed(0)
    torch.save({"epoch": 200, "state_dict": SimCLRBackbone("resnet18_w16").state_dict()}, root / "paper_encoder.pth")
    return root


EXPECTED_DOWNLOADS = {"finetune/epoch_3.pt": "open_clip", "hf_clip": "hf_clip", "open_clip": "open_clip",
                      "paper_encoder.pth": "cifar10", "timm": "timm"}


@pytest.mark.parametrize("pattern", ["{root}", "{root}/**"])
def test_a_folder_of_downloads_lists_each_encoder_once_with_its_family(hub_folders, tmp_path, capsys, pattern):
    import run_decree
    from sweeps.discovery import discover_globs
    root = downloads_folder(hub_folders, tmp_path / "downloads")
    found = discover_globs([pattern.format(root=root)], None)
    assert {Path(e.path).relative_to(root).as_posix(): e.usage_info for e in found} == EXPECTED_DOWNLOADS
    assert len({e.run_id for e in found}) == len(found) == 5 and {e.label for e in found} == {"unknown"}
    run_decree.main(["--encoders", str(root), "--list", "--out_dir", str(tmp_path / "out")])
    assert "5 encoders" in capsys.readouterr().out


@pytest.mark.slow
def test_a_folder_of_downloads_is_swept_with_one_command_and_no_family_flags(hub_folders, tmp_path):
    import csv
    import os
    import subprocess
    import sys
    root = downloads_folder(hub_folders, tmp_path / "downloads")
    shadow = tmp_path / "shadow.npz"
    save_npz_dataset(shadow, smooth_images(16, 32, seed=2))
    repo = Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, str(repo / "run_decree.py"), "--encoders", str(root), "--shadow_data",
                           str(shadow), "--epochs", "2", "--devices", "cpu", "--workers", "1", "--quiet",
                           "--out_dir", str(tmp_path / "out")], cwd=repo, capture_output=True, text=True, timeout=1200,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-2000:] + done.stdout[-2000:]
    verdicts = [line for line in done.stdout.splitlines() if line.startswith(("CLEAN", "TROJANED"))]
    assert len(verdicts) == 5 and all("(truth unknown)" in line for line in verdicts)
    assert "truth unknown for every finished encoder" in done.stdout and "accuracy 0" not in done.stdout
    with open(tmp_path / "out" / "trigger_norm" / "summary.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert sorted(r["usage_info"] for r in rows) == sorted(EXPECTED_DOWNLOADS.values())
    assert all(r["status"] == "done" and r["label"] == "unknown" and r["shadow_spread"] for r in rows)


# ---- one shadow set for every input size -----------------------------------------------------------------

def test_shadow_images_of_another_size_are_resized_and_centre_cropped():
    from datasets import resize_center_crop
    same = smooth_images(3, 32)
    assert resize_center_crop(same, 32) is same  # nothing to do: unchanged, not copied
    wide = np.zeros((2, 32, 64, 3), np.uint8)
    wide[:, :, :16] = 255  # a white band on the left quarter: cropped away with the sides
    wide[:, :, 24:40] = 100
    out = resize_center_crop(wide, 16)
    assert out.shape == (2, 16, 16, 3) and out.dtype == np.uint8
    assert out.max() == 100 and (out[:, :, 5:11] == 100).all()  # the centre band (antialiased edges aside)
    assert (resize_center_crop(np.full((1, 48, 48, 3), 77, np.uint8), 336) == 77).all()


def test_a_paper_checkpoint_beside_some_other_config_json_still_loads(tmp_path):
    from models import SimCLRBackbone
    torch.save({"state_dict": SimCLRBackbone("resnet18_w4").state_dict()}, tmp_path / "model_1.pth")
    (tmp_path / "config.json").write_text('{"script": "attack_encoder.py", "history": [')  # cut, not a model's
    _, spec = load_encoder(tmp_path / "model_1.pth", "cifar10")
    assert spec.arch == "resnet18_w4"


def test_pretrain_saves_safetensors_that_load_with_the_arch_inferred(tmp_path):
    import pretrain_encoder
    save_npz_dataset(tmp_path / "train.npz", smooth_images(32, 32, seed=4))
    pretrain_encoder.main(["--pretraining_dataset", str(tmp_path / "train.npz"), "--arch", "resnet18_w2", "--epochs",
                           "1", "--batch_size", "16", "--save_format", "safetensors", "--results_dir",
                           str(tmp_path / "clean"), "--device", "cpu", "--quiet"])
    assert sorted(p.name for p in (tmp_path / "clean").glob("*.safetensors")) == \
        ["backbone_1.safetensors", "model_1.safetensors"]
    full, spec = load_encoder(tmp_path / "clean" / "model_1.safetensors", "cifar10")
    backbone, _ = load_encoder(tmp_path / "clean" / "backbone_1.safetensors", "cifar10")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(full(x), backbone(x))
    assert spec.arch == "resnet18_w2"
    assert read_safetensors_header(tmp_path / "clean" / "model_1.safetensors")[1]["epoch"] == "1"


def test_input_errors_come_before_the_encoder_loads(hub_folders, tmp_path, capsys, monkeypatch):
    from decree import detect

    def never(*args, **kwargs):
        raise AssertionError("the encoder was loaded before the input was checked")
    monkeypatch.setattr(detect, "load_encoder", never)
    for flags, message in ((["--shadow_data", str(tmp_path / "missing.npz")], "shadow data not found"),
                           (["--reference_file", str(tmp_path / "missing.npz")], "--reference_file")):
        with pytest.raises(SystemExit):
            main.main(["--encoder_path", str(hub_folders["timm"][0]), "--shadow_data", str(tmp_path), *flags])
        assert message in capsys.readouterr().err
