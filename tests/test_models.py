"""Encoders (docs/method.md): every checkpoint layout users have loads bit-exactly through load_encoder, unsafe or
broken files are refused with a message naming the file and the fix, and a wrong architecture lists the keys."""
import argparse
from collections import OrderedDict

import pytest
import torch
import torchvision
from torch import nn

import models
from models import (CheckpointError, SimCLR, SimCLRBackbone, UnsafeCheckpointError, clip_model, encoder_spec,
                    get_encoder, load_encoder, read_checkpoint, register_arch)


def scramble(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every BatchNorm non-default statistics and affine terms, so a loader that skipped any key would show."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.copy_(0.1 * torch.randn(m.running_mean.shape, generator=g))
                m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=g))
                m.weight.copy_(1 + 0.1 * torch.randn(m.weight.shape, generator=g))
                m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=g))
    return model.eval()


def inputs(size: int) -> torch.Tensor:
    n = 2 if size == 32 else 1  # 224-px towers are slow on a shared CPU
    return torch.randn((n, 3, size, size), generator=torch.Generator().manual_seed(1))


def assert_same_outputs(reference: nn.Module, path, usage_info, arch=None, **kw):
    loaded, spec = load_encoder(path, usage_info, arch, **kw)
    x = inputs(spec.input_size)
    with torch.no_grad():
        expected = reference.eval()(x)
        got = loaded(x)
    assert not loaded.training
    assert got.shape == (len(x), spec.embed_dim)
    assert torch.equal(got, expected)
    return spec


def prefixed(sd: dict, prefix: str) -> OrderedDict:
    return OrderedDict((prefix + k, v) for k, v in sd.items())


# --- SimCLR (cifar10/stl10) -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def backbone():
    torch.manual_seed(0)
    return scramble(SimCLRBackbone("resnet18_w2"))


def test_badencoder_backbone_checkpoint_with_epoch_and_optimizer_loads_bit_exact(backbone, tmp_path):
    optimizer = torch.optim.SGD(backbone.parameters(), lr=1e-3, momentum=0.9)
    torch.save({"epoch": 200, "state_dict": backbone.state_dict(), "optimizer": optimizer.state_dict()},
               tmp_path / "model_200.pth")
    assert next(iter(backbone.state_dict())) == "f.0.weight"  # BadEncoder's key names
    spec = assert_same_outputs(backbone, tmp_path / "model_200.pth", "cifar10", "resnet18_w2")
    assert (spec.input_size, spec.embed_dim, spec.family) == (32, 16, "simclr")


def test_bare_backbone_state_dict_loads_bit_exact(backbone, tmp_path):
    torch.save(backbone.state_dict(), tmp_path / "bare.pth")
    assert_same_outputs(backbone, tmp_path / "bare.pth", "stl10", "resnet18_w2")


def test_full_simclr_model_loads_its_backbone_and_ignores_the_head(tmp_path):
    torch.manual_seed(1)
    full = scramble(SimCLR("resnet18_w2"))
    sd = full.state_dict()
    assert any(k.startswith("f.f.0.") for k in sd) and any(k.startswith("g.0.") for k in sd)
    torch.save({"epoch": 1000, "state_dict": sd}, tmp_path / "model_1000.pth")
    assert_same_outputs(full.f, tmp_path / "model_1000.pth", "cifar10", "resnet18_w2")


@pytest.mark.parametrize("layout", ["backbone", "full SimCLR"])
def test_dataparallel_module_prefix_is_stripped(layout, tmp_path):
    torch.manual_seed(2)
    model = scramble(SimCLR("resnet18_w2") if layout == "full SimCLR" else SimCLRBackbone("resnet18_w2"))
    torch.save({"state_dict": prefixed(model.state_dict(), "module.")}, tmp_path / "dp.pth")
    reference = model.f if layout == "full SimCLR" else model
    assert_same_outputs(reference, tmp_path / "dp.pth", "cifar10", "resnet18_w2")


def test_simclr_backbone_is_the_cifar_resnet():
    net = SimCLRBackbone("resnet18")
    conv1 = net.f[0]
    assert (conv1.kernel_size, conv1.stride, conv1.padding, conv1.bias) == ((3, 3), (1, 1), (1, 1), None)
    assert not any(isinstance(m, (nn.MaxPool2d, nn.Linear)) for m in net.modules())
    assert get_encoder("cifar10").eval()(torch.zeros(1, 3, 32, 32)).shape == (1, 512)
    assert encoder_spec("cifar10", "resnet50").embed_dim == 2048


# --- CLIP ---------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def clip_rn50():
    torch.manual_seed(3)
    return scramble(clip_model("RN50"))


def test_clip_visual_only_checkpoint_with_openai_keys_loads_bit_exact(clip_rn50, tmp_path):
    sd = clip_rn50.visual.state_dict()
    assert {"conv1.weight", "layer1.0.conv1.weight", "attnpool.positional_embedding"} <= set(sd)
    torch.save({"epoch": 1, "state_dict": sd, "optimizer": {}}, tmp_path / "model_1.pth")
    spec = assert_same_outputs(clip_rn50.visual, tmp_path / "model_1.pth", "CLIP")
    assert (spec.arch, spec.input_size, spec.embed_dim, spec.family) == ("RN50", 224, 1024, "clip")


def test_full_clip_state_dict_loads_its_visual_tower(clip_rn50, tmp_path):
    sd = clip_rn50.state_dict()
    assert any(k.startswith("transformer.") for k in sd) and "token_embedding.weight" in sd
    torch.save({"state_dict": sd}, tmp_path / "clip_full.pth")
    assert_same_outputs(clip_rn50.visual, tmp_path / "clip_full.pth", "CLIP", "RN50")


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning", "ignore::FutureWarning")
def test_openai_style_torchscript_archive_loads_its_visual_tower(clip_rn50, tmp_path):
    # OpenAI's RN50.pt is a TorchScript archive of the whole CLIP model (keys visual.*, transformer.*, ...)
    archive = torch.jit.trace_module(clip_rn50, {"encode_image": inputs(224)}, check_trace=False)
    archive.save(str(tmp_path / "RN50.pt"))
    keys = set(read_checkpoint(tmp_path / "RN50.pt"))
    assert "visual.conv1.weight" in keys and "token_embedding.weight" in keys
    assert_same_outputs(clip_rn50.visual, tmp_path / "RN50.pt", "CLIP", "RN50")


def test_clip_vit_b32_visual_checkpoint_loads_with_openai_spelling(tmp_path):
    torch.manual_seed(4)
    visual = scramble(clip_model("ViT-B/32").visual)
    torch.save({"state_dict": visual.state_dict()}, tmp_path / "vit.pth")
    spec = assert_same_outputs(visual, tmp_path / "vit.pth", "CLIP", "ViT-B/32")
    assert spec.embed_dim == 512


def test_clip_transformers_use_openais_quickgelu(clip_rn50):
    # OpenAI's weights reproduce OpenAI's text (and ViT) embeddings only with QuickGELU, not nn.GELU
    activations = {type(m).__name__ for m in clip_rn50.transformer.modules() if "GELU" in type(m).__name__}
    assert activations == {"QuickGELU"}


def test_clip_normalization_flag_selects_clips_own_constants():
    assert encoder_spec("CLIP").mean == (0.485, 0.456, 0.406)  # the paper's detection code: ImageNet's
    assert encoder_spec("CLIP", clip_normalization=True).mean == (0.48145466, 0.4578275, 0.40821073)
    assert encoder_spec("CLIP", clip_normalization=True).std == (0.26862954, 0.26130258, 0.27577711)


# --- ImageNet ResNet50 and MoCo ResNet18 ------------------------------------------------------------------
def test_imagenet_resnet50_checkpoint_drops_fc_and_loads_bit_exact(tmp_path):
    torch.manual_seed(5)
    net = scramble(torchvision.models.resnet50(weights=None))
    sd = net.state_dict()
    assert "fc.weight" in sd
    torch.save({"state_dict": sd}, tmp_path / "imagenet.pth")
    net.fc = nn.Identity()
    spec = assert_same_outputs(net, tmp_path / "imagenet.pth", "imagenet")
    assert (spec.arch, spec.embed_dim, spec.input_size) == ("resnet50", 2048, 224)


@pytest.mark.parametrize("prefix", ["module.encoder_q.", "encoder_q."])
def test_moco_checkpoint_keeps_the_query_encoder_without_fc(prefix, tmp_path):
    torch.manual_seed(6)
    query = scramble(torchvision.models.resnet18(weights=None, num_classes=128), seed=1)
    key_encoder = scramble(torchvision.models.resnet18(weights=None, num_classes=128), seed=2)
    sd = prefixed(query.state_dict(), prefix)
    sd.update(prefixed(key_encoder.state_dict(), prefix.replace("encoder_q", "encoder_k")))
    outer = prefix[:-len("encoder_q.")]
    sd[outer + "queue"] = torch.randn(128, 16)
    sd[outer + "queue_ptr"] = torch.zeros(1, dtype=torch.long)
    torch.save({"epoch": 200, "arch": "resnet18", "state_dict": sd}, tmp_path / "moco.pth.tar")
    query.fc = nn.Identity()
    spec = assert_same_outputs(query, tmp_path / "moco.pth.tar", "moco")
    assert (spec.arch, spec.embed_dim) == ("resnet18", 512)


# --- custom architectures -----------------------------------------------------------------------------------
class TinyEncoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 4, 3, 2, 1), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(2),
                                  nn.Flatten(), nn.Linear(16, 8))

    def forward(self, x):
        return self.body(x)


def test_registered_custom_architecture_round_trips(tmp_path):
    register_arch("tiny_test_encoder", TinyEncoder, embed_dim=8)
    torch.manual_seed(7)
    model = scramble(TinyEncoder())
    torch.save({"epoch": 3, "state_dict": prefixed(model.state_dict(), "module.")}, tmp_path / "tiny.pth")
    spec = assert_same_outputs(model, tmp_path / "tiny.pth", "cifar10", "tiny_test_encoder")
    assert (spec.family, spec.embed_dim, spec.input_size, spec.mean) == ("custom", 8, 32, (0.4914, 0.4822, 0.4465))
    assert load_encoder(tmp_path / "tiny.pth", "CLIP", "tiny_test_encoder")[1].input_size == 224


def test_arch_module_that_cannot_be_imported_is_named():
    with pytest.raises(ValueError, match="--arch_module no_such_arch_module"):
        models.import_arch_modules(["no_such_arch_module"])


# --- refusing files ---------------------------------------------------------------------------------------
class CreatesMarkerWhenUnpickled:
    """A pickle payload: unpickling it calls open(marker, 'w'), i.e. runs code of the file's choosing."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def test_malicious_pickle_is_refused_and_its_payload_never_runs(backbone, tmp_path):
    marker = tmp_path / "payload_ran"
    path = tmp_path / "evil.pth"
    torch.save({"state_dict": backbone.state_dict(), "extra": CreatesMarkerWhenUnpickled(marker)}, path)
    for load in (lambda: read_checkpoint(path), lambda: load_encoder(path, "cifar10", "resnet18_w2")):
        with pytest.raises(UnsafeCheckpointError) as info:
            load()
        message = str(info.value)
        assert str(path) in message and "--trust_checkpoint" in message and "\n" not in message
    assert not marker.exists()


def test_checkpoint_with_a_harmless_object_loads_only_when_trusted(backbone, tmp_path):
    path = tmp_path / "with_args.pth"
    torch.save({"args": argparse.Namespace(lr=1e-3), "state_dict": backbone.state_dict()}, path)
    with pytest.raises(UnsafeCheckpointError, match="argparse.Namespace.*--trust_checkpoint"):
        load_encoder(path, "cifar10", "resnet18_w2")
    assert_same_outputs(backbone, path, "cifar10", "resnet18_w2", trust_checkpoint=True)


@pytest.mark.parametrize("content", ["random bytes", "text", "truncated", "empty", "no tensors"])
def test_broken_checkpoint_fails_with_checkpoint_error_naming_the_file(content, backbone, tmp_path):
    path = tmp_path / "broken.pth"
    if content == "random bytes":
        path.write_bytes(torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(0),
                                       dtype=torch.uint8).numpy().tobytes())
    elif content == "text":  # "j" is a pickle memo lookup: the unpickler fails with a KeyError
        path.write_text("junk\n")
    elif content == "truncated":
        torch.save({"state_dict": backbone.state_dict()}, tmp_path / "whole.pth")
        data = (tmp_path / "whole.pth").read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif content == "empty":
        path.write_bytes(b"")
    else:
        torch.save({"epoch": 3, "note": "no weights here"}, path)
    with pytest.raises(CheckpointError) as info:
        load_encoder(path, "cifar10", "resnet18_w2")
    assert type(info.value) is CheckpointError  # corrupt, not "unsafe": --trust_checkpoint would not help
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_missing_checkpoint_is_named(tmp_path):
    with pytest.raises(CheckpointError, match="nope.pth: no such checkpoint file"):
        load_encoder(tmp_path / "nope.pth", "cifar10")


def test_wrong_architecture_lists_missing_and_unexpected_keys_and_what_was_tried(backbone, tmp_path):
    torch.save({"state_dict": backbone.state_dict()}, tmp_path / "simclr.pth")
    with pytest.raises(CheckpointError) as info:
        load_encoder(tmp_path / "simclr.pth", "moco")
    message = str(info.value)
    assert "missing (e.g. conv1.weight" in message and "unexpected (e.g. f.0.weight" in message
    assert "--encoder_usage_info moco --arch resnet18" in message and str(tmp_path / "simclr.pth") in message
    with pytest.raises(CheckpointError) as info:
        load_encoder(tmp_path / "simclr.pth", "cifar10", "resnet18_w4")
    assert "wrong shape (e.g. f.0.weight (2, 3, 3, 3) vs (4, 3, 3, 3)" in str(info.value)
    assert "--arch resnet18_w4" in str(info.value)


@pytest.mark.parametrize("usage_info, arch, match", [("svhn", None, "unknown --encoder_usage_info 'svhn'"),
                                                      ("imagenet", "resnet18", "uses --arch resnet50"),
                                                      ("CLIP", "RN101", "unknown CLIP arch 'RN101'"),
                                                      ("cifar10", "vgg11", "unknown SimCLR backbone arch")])
def test_unknown_usage_info_or_arch_is_rejected_by_name(usage_info, arch, match):
    with pytest.raises(ValueError, match=match):
        get_encoder(usage_info, arch)
