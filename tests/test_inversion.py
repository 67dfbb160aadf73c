"""DECREE's inversion: finds planted triggers where they are, leaves clean encoders alone, follows docs/method.md."""
import math

import numpy as np
import pytest
import torch

from conftest import (CIFAR_MEAN, CIFAR_STD, PLANTED_SIDE, PLANTED_TOP, PlantedBackdoorEncoder,
                      RandomFeatureEncoder)
from decree.inversion import (BestTrigger, InversionError, LambdaSchedule, initial_params,
                              invert_trigger, learning_rate, mean_pairwise_cos, stamp, trigger_from_params)
from decree.restarts import OwnDraws
from decree.settings import InversionConfig, preset
from decree.stop_reasons import STOP_EARLY, STOP_SLOW

FAST = dict(lr=0.5, batch_size=32, max_epochs=80)


def test_planted_trigger_is_found_where_planted(shadow_images):
    result = invert_trigger(PlantedBackdoorEncoder(), shadow_images, CIFAR_MEAN, CIFAR_STD,
                            preset("cifar10", **FAST), progress=False)
    assert result.found and result.trojaned
    assert result.pl1 < 0.1
    square = result.mask[PLANTED_TOP:PLANTED_TOP + PLANTED_SIDE, PLANTED_TOP:PLANTED_TOP + PLANTED_SIDE]
    assert square.sum() / result.mask.sum() > 0.8  # the mask's mass lies on the planted square
    assert result.pl1 == pytest.approx(result.l1 / (32 * 32 * 3))


def test_clean_random_feature_encoder_is_not_flagged(shadow_images):
    result = invert_trigger(RandomFeatureEncoder(), shadow_images, CIFAR_MEAN, CIFAR_STD,
                            preset("cifar10", **FAST), progress=False)
    assert not result.trojaned
    assert not result.found or result.pl1 > 0.25  # well above the 0.1 threshold


def test_same_seed_same_device_gives_identical_l1(shadow_images):
    cfg = preset("cifar10", lr=0.5, max_epochs=5)
    runs = [invert_trigger(PlantedBackdoorEncoder(), shadow_images, CIFAR_MEAN, CIFAR_STD, cfg, progress=False)
            for _ in range(2)]
    assert runs[0].l1 == runs[1].l1
    assert [h["cos"] for h in runs[0].history] == [h["cos"] for h in runs[1].history]


def test_lambda_goes_up_after_six_successes_and_down_after_six_failures():
    cfg = InversionConfig(lambda_min=1e-5)
    schedule = LambdaSchedule(cfg)
    assert [schedule.step(True) for _ in range(6)] == [1e-3] * 5 + [5e-3]
    assert [schedule.step(False) for _ in range(6)] == [5e-3] * 5 + [pytest.approx(1e-3)]
    # a broken run resets the count
    for success in (True,) * 5 + (False,) + (True,) * 5:
        schedule.step(success)
    assert schedule.lambda_ == pytest.approx(1e-3)


def test_lambda_stops_growing_at_its_cap_and_shrinking_below_its_floor():
    cfg = InversionConfig(lambda_min=1e-5)
    schedule = LambdaSchedule(cfg)
    for _ in range(6 * 20):
        schedule.step(True)
    assert 1e5 <= schedule.lambda_ < 5e5
    schedule = LambdaSchedule(cfg)
    for _ in range(6 * 20):
        schedule.step(False)
    assert schedule.lambda_ == pytest.approx(8e-6)  # 1e-3 / 5**3: the last division starts from 4e-5 >= 1e-5


def test_lambda_resets_after_succeeding_below_its_floor():
    cfg = InversionConfig(lambda_min=1e-5)
    schedule = LambdaSchedule(cfg)
    schedule.lambda_ = 1e-9  # far below the floor: five-fold increases cannot lift it out in 11 steps
    values = [schedule.step(True) for _ in range(11)]
    assert values[-1] == cfg.lambda_init and values[-2] < cfg.lambda_min  # reset on the 11th success


def test_best_trigger_and_early_stop_count():
    best, cfg = BestTrigger(), InversionConfig(early_stop_patience=3, thres=0.99)
    mask, pattern = torch.zeros(2, 2), torch.zeros(2, 2, 3)
    best.update(False, 10.0, mask, pattern)
    assert best.mask is None and best.stale_steps == 0  # no count before a first success
    best.update(True, 10.0, mask, pattern)
    assert best.l1 == 10.0 and best.stale_steps == 0
    for l1 in (12.0, 11.0, 10.0, 9.5):
        best.update(True, l1, mask, pattern)
    assert best.l1 == 9.5 and best.stale_steps == 0
    for _ in range(4):
        best.update(False, 1.0, mask, pattern)  # a small but unsuccessful trigger is not a best
    assert best.l1 == 9.5 and best.stale_steps == 4
    assert best.stop_reason(0.995, cfg) == STOP_EARLY and best.stop_reason(0.98, cfg) is None


def test_slow_progress_counts_steps_until_the_best_gains_a_share_of_its_way_to_the_threshold():
    best, cfg = BestTrigger(min_progress=0.1, threshold_l1=10.0), InversionConfig(early_stop_patience=3, thres=0.99)
    mask, pattern = torch.zeros(2, 2), torch.zeros(2, 2, 3)
    best.update(True, 110.0, mask, pattern)  # the first trigger starts both counts
    for l1 in (109.0, 108.0, 107.0, 106.0):  # improves every step, but by 4 < 0.1 * (110 - 10) in all
        best.update(True, l1, mask, pattern)
    assert best.stale_steps == 0 and best.slow_steps == 4
    assert best.stop_reason(0.995, cfg) == STOP_SLOW and best.stop_reason(0.98, cfg) is None
    best.update(True, 99.0, mask, pattern)  # 110 -> 99: more than 10 % of the way: the count restarts from 99
    assert best.slow_steps == 0 and best.stop_reason(0.995, cfg) is None
    best.update(True, 95.0, mask, pattern)  # 4 < 0.1 * (99 - 10)
    assert best.slow_steps == 1
    best.update(True, 9.9, mask, pattern)  # below the threshold every improvement counts, as in the paper's rule
    best.update(True, 9.8, mask, pattern)
    assert best.slow_steps == best.stale_steps == 0


def test_without_min_progress_the_slow_count_is_the_papers_count():
    best, generator = BestTrigger(min_progress=0.0, threshold_l1=300.0), torch.Generator().manual_seed(0)
    mask, pattern = torch.zeros(2, 2), torch.zeros(2, 2, 3)
    for _ in range(200):
        success, l1 = bool(torch.rand(1, generator=generator) < 0.7), float(torch.rand(1, generator=generator)) * 1000
        best.update(success, l1, mask, pattern)
        assert best.slow_steps == best.stale_steps


def test_learning_rate_schedule_per_usage_info():
    cifar, clip = preset("cifar10", lr=0.5), preset("CLIP", lr=0.5)
    assert [learning_rate(e, cifar) for e in (0, 29, 30, 49, 50, 999)] == [0.5, 0.5, 0.1, 0.1, 0.05, 0.05]
    assert [learning_rate(e, clip) for e in (199, 200, 499, 500)] == [0.5, 0.1, 0.1, 0.05]
    assert preset("moco").lr_milestones == (30, 50) and preset("moco").lambda_min == 1e-7
    assert preset("CLIP").early_stop_patience == 35 and preset("stl10").early_stop_patience == 10


def test_stamp_and_parametrisation_ranges():
    x = torch.full((2, 4, 4, 3), 100, dtype=torch.uint8)
    mask = torch.zeros(4, 4, dtype=torch.float64)
    mask[0, 0] = 1.0
    pattern = torch.full((4, 4, 3), 255.0, dtype=torch.float64)
    out = stamp(x, mask.unsqueeze(-1), pattern)
    assert (out[:, 0, 0] == 255).all() and (out[:, 1:, :] == 100).all()
    w, v = initial_params(8, InversionConfig(mask_init="orc", orc_square=(2, 4)), OwnDraws(0), torch.float64, "cpu")
    m, p = trigger_from_params(w, v)
    assert m.shape == p.shape == (8, 8, 3) and torch.equal(m[..., 0], m[..., 2])  # one mask on every channel
    assert m[2:6, 2:6].min() > 0.999 and m[0, 0, 0] < 1e-3 and 0 <= p.min() and p.max() <= 255


def test_mean_pairwise_cos_excludes_the_diagonal():
    e = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    assert mean_pairwise_cos(e).item() == pytest.approx(2 / 6)


def test_nan_embeddings_stop_the_run_with_a_clear_error(shadow_images):
    class NaNEncoder(torch.nn.Module):
        def forward(self, x):
            return x.flatten(1)[:, :8] * math.nan

    with pytest.raises(InversionError, match="NaN"):
        invert_trigger(NaNEncoder(), shadow_images[:8], CIFAR_MEAN, CIFAR_STD, preset("cifar10", max_epochs=1),
                       progress=False)


def test_float32_parameters_reach_the_same_verdict(shadow_images):
    result = invert_trigger(PlantedBackdoorEncoder(), shadow_images, CIFAR_MEAN, CIFAR_STD,
                            preset("cifar10", param_dtype="float32", **FAST), progress=False)
    assert result.trojaned and np.isfinite(result.l1)
