"""DRUPE (attacks/drupe.py): the schedule, terms, adaptive weights and selection of its authors' training code."""
import pytest
import torch
import torch.nn.functional as F

from attacks.badencoder import BadEncoderConfig
from attacks.drupe import (AUTHORS_PHASES, INIT_COSINE_WEIGHT, INIT_DISTANCE_WEIGHT, DrupeObjective, DrupeWeights,
                           reference_similarity, scale_phases, sliced_wasserstein, train_drupe)
from attacks.families import make_trigger
from datasets import NORMALIZATION
from datasets.photos import photo_patches
from models.simclr import SimCLRBackbone

MEAN, STD = NORMALIZATION["cifar10"]
EFFECTIVE = dict(loss0=-0.98, loss1=-0.95, loss2=-0.95)
FAILING = dict(loss0=-0.5, loss1=-0.95, loss2=-0.95)


def test_scale_phases_is_the_authors_schedule_at_200_epochs_and_keeps_its_order_below():
    assert scale_phases(200) == AUTHORS_PHASES
    p = scale_phases(200)
    assert (p.warm_up, p.badencoder, p.adapt_after, p.select_after) == (1, 4, 20, 24)
    toy = scale_phases(40)  # the 196 epochs after the first four scaled to 36
    assert (toy.warm_up, toy.badencoder, toy.adapt_after, toy.select_after) == (1, 4, 7, 8)
    for epochs in range(5, 60):
        p = scale_phases(epochs)
        assert p.badencoder <= p.adapt_after <= p.select_after < epochs
    with pytest.raises(ValueError, match="--drupe_epochs"):
        scale_phases(4)


def test_cosine_weight_rises_while_effective_and_falls_otherwise():
    w = DrupeWeights()
    w.adapt(**EFFECTIVE, sim=0.9, distance=1.0)
    assert w.cosine == pytest.approx(INIT_COSINE_WEIGHT * 1.25)
    w.adapt(**FAILING, sim=0.9, distance=1.0)
    assert w.cosine == pytest.approx(INIT_COSINE_WEIGHT * 1.25 / 1.25 ** 1.25)


def test_distance_weight_rises_only_when_effective_and_spread_out_and_sets_the_measure():
    w = DrupeWeights()
    w.adapt(**EFFECTIVE, sim=0.9, distance=1.0)  # effective, still concentrated: the distance weight falls
    assert w.distance == pytest.approx(INIT_DISTANCE_WEIGHT / 1.25 ** 1.25) and w.measure == 0.0
    w = DrupeWeights()
    w.adapt(**EFFECTIVE, sim=0.55, distance=2.5)
    assert w.distance == pytest.approx(INIT_DISTANCE_WEIGHT * 1.25) and w.measure == 2.5
    w.adapt(**FAILING, sim=0.55, distance=1.0)  # not effective: both fall, the measure stays
    assert w.distance == pytest.approx(INIT_DISTANCE_WEIGHT * 1.25 / 1.25 ** 1.25) and w.measure == 2.5


def test_well_spread_stamped_embeddings_skip_the_next_cosine_raise():
    w = DrupeWeights()
    w.adapt(**EFFECTIVE, sim=0.4, distance=1.0)
    assert w.cosine == pytest.approx(INIT_COSINE_WEIGHT * 1.25)
    w.adapt(**EFFECTIVE, sim=0.9, distance=1.0)  # skipped: the counter was set back
    assert w.cosine == pytest.approx(INIT_COSINE_WEIGHT * 1.25)
    w.adapt(**EFFECTIVE, sim=0.9, distance=1.0)
    assert w.cosine == pytest.approx(INIT_COSINE_WEIGHT * 1.25 ** 2)


def test_selection_keeps_the_smallest_measure_and_a_measure_never_set_keeps_the_first_epoch():
    w = DrupeWeights()
    w.adapt(**EFFECTIVE, sim=0.55, distance=3.0)
    assert w.keep()
    w.adapt(**EFFECTIVE, sim=0.55, distance=2.0)
    assert w.keep()
    w.adapt(**EFFECTIVE, sim=0.55, distance=2.5)
    assert not w.keep()
    never = DrupeWeights()  # their args.measure starts at 0: nothing later is smaller
    assert never.keep()
    never.adapt(**EFFECTIVE, sim=0.55, distance=0.1)
    assert not never.keep()


def test_end_epoch_adapts_after_adapt_after_and_keeps_the_state_of_the_selected_epoch():
    objective = DrupeObjective(BadEncoderConfig(), scale_phases(40))  # adapt after 7, select after 8
    f = torch.nn.Linear(2, 2)
    for epoch in range(1, 11):
        with torch.no_grad():
            f.weight.fill_(epoch)
        objective.last = (torch.tensor(0.55), torch.tensor(10.0 - epoch))
        record = {**EFFECTIVE}
        objective.end_epoch(epoch, f, record)
        assert record["w_cos"] == pytest.approx(INIT_COSINE_WEIGHT * 1.25 ** max(0, epoch - 8))
        assert record["kept"] == (epoch > 8)
    assert objective.kept_epoch == 10 and objective.kept_state["weight"].eq(10).all()


def test_sliced_wasserstein_of_one_dimension_is_the_exact_transport_cost():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(64, 1, generator=g), 2 * torch.randn(64, 1, generator=g) + 1
    exact = ((a.sort(0).values - b.sort(0).values) ** 2).mean().sqrt()  # W2 between two empirical 1-D sets
    assert sliced_wasserstein(a, b, torch.Generator().manual_seed(1)) == pytest.approx(float(exact), rel=1e-5)
    assert sliced_wasserstein(a, a[torch.randperm(64)], torch.Generator().manual_seed(1)) < 1e-6


def test_reference_similarity_averages_the_pairs_with_the_diagonal():
    z = F.normalize(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]), dim=1)
    off = 0 + 2 ** -0.5 + 2 ** -0.5
    assert float(reference_similarity(z)) == pytest.approx((3 + off) / 6)


@pytest.fixture(scope="module")
def trained():
    torch.manual_seed(0)
    f0 = SimCLRBackbone("resnet18_w4").eval()
    x = photo_patches(32, 32, seed=1)
    references = photo_patches(3, 32, seed=9)
    # one batch an epoch: the recorded parts are that batch's, so the loss can be rebuilt from them
    return train_drupe(f0, x, make_trigger("drupe"), references, MEAN, STD,
                       BadEncoderConfig(epochs=6, batch_size=32, lr=0.01, seed=0), "cpu", progress=False)


def test_each_phase_trains_the_authors_loss(trained):
    assert (trained.phases.badencoder, trained.phases.adapt_after, trained.phases.select_after) == (4, 4, 4)
    for r in trained.history:
        kept = r["loss1"] + r["loss2"]
        push = r["loss3"] if r["loss3"] > 0.5 else 0.2 * r["loss3"] if r["loss3"] > 0.4 else 0.0
        if r["epoch"] == 1:  # warm-up: no backdoor term
            expected = kept + 0.5 * r["loss3"] - (0.2 * r["loss3"] if r["loss3"] < 0.2 else 0.0)
        elif r["epoch"] <= 4:
            expected = r["loss0"] + kept + 2 * r["balance"] + push
        else:
            expected = (r["loss0"] + kept + r["w_cos"] * (r["balance"] + r["stamped_cos"]) + r["w_sw"] * r["sw"]
                        + 0.5 * r["balance"] + (1.5 * r["balance"] if r["balance"] > 0.1 else 0.0) + push)
        assert r["loss"] == pytest.approx(expected, abs=1e-4), r["epoch"]
    assert [r["w_cos"] for r in trained.history[:5]] == [INIT_COSINE_WEIGHT] * 5


def test_train_drupe_returns_the_selected_encoder_and_the_last(trained):
    kept = [r["epoch"] for r in trained.history if r["kept"]]
    assert kept and kept[-1] == trained.kept_epoch and kept[0] == trained.phases.select_after + 1
    same = all(torch.equal(a, b) for a, b in zip(trained.encoder.state_dict().values(),
                                                 trained.last.state_dict().values()))
    assert same == (trained.kept_epoch == trained.phases.epochs)


@pytest.mark.parametrize("references, message", [(photo_patches(1, 32, seed=9), "several references"),
                                                 (photo_patches(1, 32, seed=9).repeat(3, 0), "distinct")])
def test_drupe_needs_several_distinct_references(references, message):
    with pytest.raises(ValueError, match=message):
        train_drupe(SimCLRBackbone("resnet18_w4"), photo_patches(32, 32, seed=1), make_trigger("drupe"),
                    references, MEAN, STD, BadEncoderConfig(epochs=5, batch_size=32), "cpu")
