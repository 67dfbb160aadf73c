"""Under the paper's settings a seed gives the paper's run: its first trigger, its batch orders, its reductions.

The reference is experiments/paper_path.py, which rebuilds main.py's draws (the model it builds, torch.rand,
torch.rand_like, a shuffling DataLoader) without the inversion's draw, order or cosine code.
"""
from dataclasses import replace

import numpy as np
import pytest
import torch

from conftest import CIFAR_MEAN, CIFAR_STD, PlantedBackdoorEncoder
from decree.inversion import invert_trigger, mean_pairwise_cos, similar_enough
from decree.settings import preset
from decree.paper_draws import PaperDraws, paper_build
from experiments.paper_path import paper_invert_trigger, papers_start, self_cos_sim

SEED = 84
KINDS = [("cifar10", "resnet18"), ("stl10", "resnet34"), ("cifar10", "resnet50"), ("imagenet", "resnet50"),
         ("CLIP", "RN50"), ("moco", "resnet18"), ("cifar10", "resnet18_w4")]


pytestmark = pytest.mark.usefixtures("one_thread")  # one reduction order, as the comparisons assume


def papers_draws(kind, n: int, size: int, batch_size: int, epochs: int, mask_init: str = "rand"):
    """(mask, pattern, [order of each epoch]) as main.py draws them; its loader's labels are the images' indices."""
    shadow = np.zeros((n, size, size, 3), dtype=np.uint8)
    mask0, pattern01, loader = papers_start(SEED, kind, shadow, batch_size, mask_init, (5, 22), "cpu")
    return mask0, pattern01, [torch.cat([index for _, index in loader]) for _ in range(epochs)]


@pytest.mark.parametrize("kind", KINDS, ids="-".join)
def test_first_trigger_and_batch_orders_are_the_papers_for_every_encoder_kind(kind):
    size = 32 if kind[0] in ("cifar10", "stl10") else 224
    n = 50  # a full and a partial batch of 32 per epoch
    paper_mask, paper_pattern, paper_orders = papers_draws(kind, n, size, 32, epochs=3)

    ours = PaperDraws(SEED, paper_build(*kind))
    torch.rand(1000)  # anything else drawing from the global stream meanwhile must not move the paper's draws
    mask0, pattern01 = ours.initial_trigger(size, "rand")
    assert torch.equal(mask0, paper_mask) and torch.equal(pattern01, paper_pattern)
    for paper_order in paper_orders:
        assert torch.equal(ours.epoch_order(n), paper_order)

    torch.manual_seed(SEED)  # the model built first matters: without it the draws are another trigger
    assert not torch.equal(torch.rand((size, size), dtype=torch.float64), paper_mask)


def test_orc_draws_only_the_pattern_as_the_paper():
    _, paper_pattern, paper_orders = papers_draws(("cifar10", "resnet18"), 40, 32, 32, epochs=2, mask_init="orc")
    ours = PaperDraws(SEED, paper_build("cifar10", "resnet18"))
    mask0, pattern01 = ours.initial_trigger(32, "orc")
    assert mask0 is None and torch.equal(pattern01, paper_pattern)
    assert all(torch.equal(ours.epoch_order(40), order) for order in paper_orders)


def test_encoders_the_papers_code_cannot_build_keep_our_own_generator(shadow_images):
    for kind in [("open_clip", "ViT-B-32"), ("hf_clip", None), ("timm", "resnet50"), ("CLIP", "ViT-B/32"),
                 ("cifar10", "my_custom_arch"), ("imagenet", "resnet18")]:
        assert paper_build(*kind) is None, kind
    cfg = preset("cifar10", lr=0.5, max_epochs=1)
    hub = invert_trigger(PlantedBackdoorEncoder(), shadow_images[:40], CIFAR_MEAN, CIFAR_STD, cfg, progress=False,
                         paper_encoder=("timm", "resnet50"))
    paper = invert_trigger(PlantedBackdoorEncoder(), shadow_images[:40], CIFAR_MEAN, CIFAR_STD, cfg, progress=False,
                           paper_encoder=("cifar10", "resnet18"))
    fast = invert_trigger(PlantedBackdoorEncoder(), shadow_images[:40], CIFAR_MEAN, CIFAR_STD,
                          preset("cifar10", "fast", lr=0.5, max_epochs=1), progress=False,
                          paper_encoder=("cifar10", "resnet18"))
    assert [r["paper_draws"] for r in (hub.restarts[0], paper.restarts[0], fast.restarts[0])] == [False, True, False]
    assert hub.history[0]["l1"] != paper.history[0]["l1"]  # another initial trigger


def test_a_whole_small_inversion_is_the_papers_epoch_by_epoch(shadow_images):
    """Every epoch's L1 (and cos, loss, lambda) and the final L1, both ways, with the draws of an STL10 ResNet34."""
    cfg = preset("stl10", lr=0.5, batch_size=32, max_epochs=40, early_stop_patience=3, seed=SEED)
    encoder = PlantedBackdoorEncoder()
    ours = invert_trigger(encoder, shadow_images[:50], CIFAR_MEAN, CIFAR_STD, cfg, progress=False,
                          paper_encoder=("stl10", "resnet34"))
    paper = paper_invert_trigger(encoder, shadow_images[:50], CIFAR_MEAN, CIFAR_STD, cfg,
                                 paper_encoder=("stl10", "resnet34"))
    assert ours.found and ours.epochs < 40  # found a trigger and stopped early
    for key in ("l1", "cos", "loss", "lambda", "best_l1"):
        assert [h[key] for h in ours.history] == [h[key] for h in paper.history], key
    assert ours.l1 == paper.l1 and ours.epochs == paper.epochs


def test_restart_0_of_stacked_restarts_starts_from_the_papers_draws(shadow_images):
    """Restart 0 takes the paper's draws, the others their own; the encoder then sees 3 x 32 images a call, which
    can round differently from 32, so only --restarts 1 is the paper's run bit for bit."""
    cfg = preset("cifar10", lr=0.5, batch_size=32, max_epochs=3, seed=SEED)
    encoder = PlantedBackdoorEncoder()
    single, stacked = (invert_trigger(encoder, shadow_images[:50], CIFAR_MEAN, CIFAR_STD, replace(cfg, restarts=k),
                                      progress=False, paper_encoder=("cifar10", "resnet18")) for k in (1, 3))
    assert [r["paper_draws"] for r in stacked.restarts] == [True, False, False]
    assert stacked.restarts[0]["l1"] == pytest.approx(single.restarts[0]["l1"], rel=1e-5)
    assert stacked.restarts[1]["l1"] != pytest.approx(single.restarts[0]["l1"], rel=1e-3)


def test_pairwise_cosine_is_reduced_as_the_papers_code_bit_for_bit():
    torch.manual_seed(0)
    for b, d in [(32, 512), (8, 2048), (2, 64), (31, 1024)]:
        stack = torch.randn(3, b, d) + 3 * torch.randn(1, 1, d)  # close to one direction, as near the threshold
        assert [c.item() for c in mean_pairwise_cos(stack)] == [self_cos_sim(e).item() for e in stack]
        assert mean_pairwise_cos(stack[0]).item() == self_cos_sim(stack[0]).item()


def test_the_threshold_is_compared_in_float32_as_the_papers_code():
    at = float(np.float32(0.99))  # 0.99 rounded to float32: above 0.99 in float64, equal to it in float32
    assert at > 0.99 and not bool(torch.abs(torch.tensor(at, dtype=torch.float32)) > 0.99)
    assert not similar_enough(at, 0.99) and similar_enough(float(np.nextafter(np.float32(at), np.float32(1))), 0.99)
