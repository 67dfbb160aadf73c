"""Trigger families (attacks/families.py) and BadEncoder with trigger functions and the clean control (DRUPE: test_drupe.py)."""
import numpy as np
import pytest
import torch

from attacks.badencoder import BadEncoderConfig, train_badencoder
from attacks.families import (FAMILIES, dct_matrix, identity_grid, make_trigger, threat_model, warp,
                              warp_displacement, warp_grid)
from attacks.poisoning import poison_target_class, poisoned_indices
from attacks.training import unit_embeddings
from datasets import NORMALIZATION, load_trigger, write_paper_triggers
from models.simclr import SimCLRBackbone

from conftest import smooth_images

MEAN, STD = NORMALIZATION["cifar10"]


@pytest.fixture(scope="module")
def images():
    return torch.from_numpy(smooth_images(16, 32, seed=3))


@pytest.mark.parametrize("family", FAMILIES)
def test_trigger_keeps_shape_dtype_and_range_and_changes_the_image(family, images):
    out = make_trigger(family, 32, seed=1)(images)
    assert out.dtype == torch.uint8 and out.shape == images.shape
    changed = (out != images).any(dim=-1).float().mean(dim=(1, 2))  # fraction of changed pixels per image
    assert (changed > 0).all(), f"{family} left an image unchanged"
    numpy_out = make_trigger(family, 32, seed=1)(images.numpy())
    assert isinstance(numpy_out, np.ndarray) and np.array_equal(numpy_out, out.numpy())


@pytest.mark.parametrize("family", FAMILIES)
def test_trigger_is_deterministic_per_seed_and_stamps_each_image_alone(family, images):
    out = make_trigger(family, 32, seed=5)(images)
    assert torch.equal(out, make_trigger(family, 32, seed=5)(images))
    assert torch.equal(out[3:4], make_trigger(family, 32, seed=5)(images[3:4]))  # no mixing across the batch


@pytest.mark.parametrize("family", ["patch-random", "blend", "wanet"])
def test_random_families_differ_between_seeds(family, images):
    assert not torch.equal(make_trigger(family, 32, seed=1)(images), make_trigger(family, 32, seed=2)(images))


def test_patch_white_is_the_papers_trigger_file(images, tmp_path):
    paper = load_trigger(write_paper_triggers(tmp_path)[0])  # trigger_pt_white_21_10_ap_replace
    assert torch.equal(make_trigger("patch-white")(images), paper.stamp(images))


def test_patch_families_touch_only_their_square(images):
    for family, area in (("patch-white", 100), ("patch-checker", 36), ("patch-random", 16)):
        changed = (make_trigger(family, 32, seed=0)(images) != images).any(-1).any(0)
        assert 0 < changed.sum() <= area, family


def test_invisible_families_change_every_image_only_a_little(images):
    for family, bound in (("blend", 0.2 * 255 + 1), ("sig", 21), ("wanet", 255), ("ctrl", 60), ("ctrl-finetune", 60)):
        diff = (make_trigger(family, 32, seed=0)(images).float() - images.float()).abs()
        assert diff.max() <= bound, family


def test_wanet_warp_is_the_identity_at_zero_strength_and_its_displacement_is_measured(images):
    assert warp_displacement(identity_grid(32)) == 0
    assert torch.allclose(warp(images, identity_grid(32)), images.float(), atol=1e-3)
    # WaNet's own CIFAR field (strength 0.5, grid 4) moves pixels by a fraction of a pixel; ours by more
    theirs, ours = warp_displacement(warp_grid(32, 0, 0.5, 4)), make_trigger("wanet", 32, 0).details["displacement_px"]
    assert 0 < theirs < 0.5 < ours
    assert warp_displacement(warp_grid(32, 0, 1.0, 4)) == pytest.approx(2 * theirs, rel=1e-4)  # linear in strength


def test_wanet_keeps_float_pixels_for_training_and_its_noise_mode_draws_new_warps(images):
    trigger = make_trigger("wanet", 32, seed=0)
    warped = trigger.float_fn(images)
    assert warped.dtype == torch.float32 and torch.equal(trigger(images), warped.round().clamp(0, 255).byte())
    noisy = trigger.noise_fn(images, torch.Generator().manual_seed(0))
    assert noisy.shape == (2 * len(images), *images.shape[1:])  # WaNet's cross ratio 2
    again = trigger.noise_fn(images, torch.Generator().manual_seed(1))
    assert not torch.equal(noisy, again) and not torch.allclose(noisy[:len(images)], warped)


def ctrl_by_blocks(images: np.ndarray) -> np.ndarray:
    """CTRL's poisoning as its code does it, rebuilt with scipy: RGB to YUV (kornia's matrices), an orthonormal
    DCT of each 32 x 32 block, +100 at (15,15) and (31,31) of U and V, inverse DCT, YUV to RGB, clip."""
    from scipy.fft import dctn, idctn
    to_yuv = np.array([[0.299, 0.587, 0.114], [-0.147, -0.289, 0.436], [0.615, -0.515, -0.100]])
    to_rgb = np.array([[1.0, 0.0, 1.14], [1.0, -0.396, -0.581], [1.0, 2.029, 0.0]])
    yuv = images.astype(np.float64) @ to_yuv.T
    coeffs = dctn(yuv, axes=(1, 2), norm="ortho")
    for pos in (15, 31):
        coeffs[:, pos, pos, 1:] += 100.0
    rgb = idctn(coeffs, axes=(1, 2), norm="ortho") @ to_rgb.T
    return np.clip(rgb, 0, 255)


@pytest.mark.parametrize("family", ["ctrl", "ctrl-finetune"])
def test_ctrl_trigger_is_ctrls_frequency_poisoning(family, images):
    assert torch.allclose(dct_matrix(32) @ dct_matrix(32).T, torch.eye(32), atol=1e-5)
    expected = ctrl_by_blocks(images.numpy())
    ours = make_trigger(family, 32, seed=0)(images).numpy().astype(np.float64)
    assert np.abs(ours - expected).max() <= 0.5 + 1e-3  # uint8 rounding only


def test_threat_models_name_the_poisoning_family():
    assert threat_model("ctrl") == "poison"
    assert {threat_model(f) for f in FAMILIES if f != "ctrl"} == {"fine-tune"}


def test_ctrl_poisons_its_rate_of_the_whole_set_taken_from_the_target_class(images):
    labels = np.array([0, 1, 1, 2] * 50)  # 200 images, 100 of class 1
    index = poisoned_indices(labels, target_label=1, rate=0.05)
    assert index.tolist() == np.flatnonzero(labels == 1)[:10].tolist()  # int(0.05 * 200) = 10, in data order
    x = np.repeat(images.numpy()[:1], 200, axis=0)
    poisoned, index = poison_target_class(x, labels, make_trigger("ctrl"), 1, 0.05)
    changed = np.flatnonzero((poisoned != x).any(axis=(1, 2, 3)))
    assert changed.tolist() == index.tolist() and np.array_equal(x[0], images.numpy()[0])  # the input is kept
    with pytest.raises(ValueError, match="no image of the target class 7"):
        poisoned_indices(labels, 7)


def test_unknown_family_and_wrong_input_are_one_line_errors(images):
    with pytest.raises(ValueError, match="unknown attack family 'nope'"):
        make_trigger("nope")
    with pytest.raises(ValueError, match="uint8 \\(B,32,32,3\\)"):
        make_trigger("sig")(images.float())


@pytest.fixture(scope="module")
def photos_and_reference():
    from datasets.photos import photo_patches
    return photo_patches(64, 32, seed=0), photo_patches(1, 32, seed=9)


def cos_to_reference(f, x, reference, trigger=None):
    stamped = trigger(x) if trigger is not None else x
    return (unit_embeddings(f, stamped, MEAN, STD) @ unit_embeddings(f, reference, MEAN, STD).T).mean().item()


def test_wanet_noise_images_join_the_utility_term(photos_and_reference):
    photos, reference = photos_and_reference
    torch.manual_seed(0)
    f0 = SimCLRBackbone("resnet18_w4").eval()
    cfg = BadEncoderConfig(epochs=1, batch_size=32, lr=0.01, seed=0)
    from dataclasses import replace
    trigger = make_trigger("wanet", 32, seed=0)
    _, with_noise = train_badencoder(f0, photos, trigger, reference, MEAN, STD, cfg, "cpu", progress=False)
    _, without = train_badencoder(f0, photos, replace(trigger, noise_fn=None), reference, MEAN, STD, cfg, "cpu",
                                  progress=False)
    assert with_noise[0]["loss0"] == pytest.approx(without[0]["loss0"], abs=0.05)
    assert with_noise[0]["loss2"] != without[0]["loss2"]


def test_badencoder_takes_a_trigger_function(photos_and_reference):
    photos, reference = photos_and_reference
    torch.manual_seed(0)
    f0 = SimCLRBackbone("resnet18_w4").eval()
    x, ref, trigger = torch.from_numpy(photos), torch.from_numpy(reference), make_trigger("blend", 32, seed=0)
    before = cos_to_reference(f0, x, ref, trigger)
    f, history = train_badencoder(f0, photos, trigger, reference, MEAN, STD,
                                  BadEncoderConfig(epochs=1, batch_size=32, lr=0.01, seed=0), "cpu", progress=False)
    assert cos_to_reference(f.eval(), x, ref, trigger) > before + 0.05
    assert history[0]["loss0"] < 0


def test_clean_control_has_no_effectiveness_term_and_keeps_embeddings(photos_and_reference):
    photos, reference = photos_and_reference
    torch.manual_seed(0)
    f0 = SimCLRBackbone("resnet18_w4").eval()
    f, history = train_badencoder(f0, photos, None, reference, MEAN, STD,
                                  BadEncoderConfig(epochs=1, batch_size=32, lr=0.01, seed=0), "cpu", progress=False)
    assert history[0]["loss0"] == 0.0
    assert history[0]["loss"] == pytest.approx(history[0]["loss1"] + history[0]["loss2"], abs=1e-5)
    x = torch.from_numpy(photos)
    white = make_trigger("patch-white")
    # with no trigger in the loss, stamped images do not move towards the reference as an attack's do
    assert cos_to_reference(f.eval(), x, torch.from_numpy(reference), white) < 0.9
