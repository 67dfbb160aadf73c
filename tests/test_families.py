"""Trigger families (attacks/families.py) and BadEncoder with trigger functions, the clean control and DRUPE."""
import numpy as np
import pytest
import torch

from attacks.badencoder import BadEncoderConfig, train_badencoder
from attacks.families import (FAMILIES, dct_matrix, drupe_alignment, make_trigger, sliced_wasserstein,
                              warp_grid)
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
    for family, bound in (("blend", 0.2 * 255 + 1), ("sig", 21), ("wanet", 255), ("ctrl", 60)):
        diff = (make_trigger(family, 32, seed=0)(images).float() - images.float()).abs()
        assert diff.max() <= bound, family
    # WaNet moves pixels by at most strength 0.5 * mean|flow| scaled: a small warp, not a new image
    field = warp_grid(32, seed=0)
    line = torch.linspace(-1, 1, 32)
    identity = torch.stack(torch.meshgrid(line, line, indexing="ij")[::-1], dim=-1)
    assert 0 < (field[0] - identity).abs().max() * 16 < 3  # less than 3 pixels anywhere


def test_dct_matrix_is_orthonormal_and_ctrl_perturbs_only_its_frequencies(images):
    d = dct_matrix(32)
    assert torch.allclose(d @ d.T, torch.eye(32), atol=1e-5)
    x = images.float()
    delta = make_trigger("ctrl")(images).float() - x
    # in YCbCr the perturbation sits on the chosen coefficients of Cb and Cr (up to uint8 rounding and clipping)
    m = torch.tensor([[0.299, 0.587, 0.114], [-0.168736, -0.331264, 0.5], [0.5, -0.418688, -0.081312]])
    coeffs = d @ torch.einsum("ij,bhwj->bihw", m, delta) @ d.T
    big = coeffs.abs().mean(0) > 20
    assert big.nonzero().tolist() == [[1, 15, 15], [1, 31, 31], [2, 15, 15], [2, 31, 31]]


def test_unknown_family_and_wrong_input_are_one_line_errors(images):
    with pytest.raises(ValueError, match="unknown attack family 'nope'"):
        make_trigger("nope")
    with pytest.raises(ValueError, match="uint8 \\(B,32,32,3\\)"):
        make_trigger("sig")(images.float())


def test_sliced_wasserstein_is_zero_for_equal_sets_and_grows_with_a_shift():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(64, 8, generator=g)
    assert sliced_wasserstein(a, a[torch.randperm(64)], torch.Generator().manual_seed(1)) < 1e-6
    near = sliced_wasserstein(a, a + 0.1, torch.Generator().manual_seed(1))
    far = sliced_wasserstein(a, a + 1.0, torch.Generator().manual_seed(1))
    assert 0 < near < far
    collapsed = drupe_alignment(torch.ones(8, 8) + 0.01 * a[:8], a[8:16], torch.Generator().manual_seed(1))
    spread = drupe_alignment(a[:8], a[8:16], torch.Generator().manual_seed(1))
    assert collapsed > spread


@pytest.fixture(scope="module")
def photos_and_reference():
    from datasets.photos import photo_patches
    return photo_patches(64, 32, seed=0), photo_patches(1, 32, seed=9)


def cos_to_reference(f, x, reference, trigger=None):
    stamped = trigger(x) if trigger is not None else x
    return (unit_embeddings(f, stamped, MEAN, STD) @ unit_embeddings(f, reference, MEAN, STD).T).mean().item()


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


def test_drupe_adds_its_alignment_term_to_the_history(photos_and_reference):
    photos, _ = photos_and_reference
    from datasets.photos import photo_patches
    references = photo_patches(3, 32, seed=9)
    torch.manual_seed(0)
    f0 = SimCLRBackbone("resnet18_w4").eval()
    _, history = train_badencoder(f0, photos, make_trigger("drupe"), references, MEAN, STD,
                                  BadEncoderConfig(epochs=1, batch_size=32, lr=0.01, seed=0, alignment_weight=1.0,
                                                   nearest_reference=True), "cpu", progress=False)
    record = history[0]
    assert record["alignment"] > 0
    assert record["loss"] == pytest.approx(record["loss0"] + record["loss1"] + record["loss2"] + record["alignment"],
                                           abs=1e-4)
