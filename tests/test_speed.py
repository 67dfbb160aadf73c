"""Speed options of the inversion: restarts, exact early exit, presets, bf16 detection, progress that tells the truth."""
import json
import math
from dataclasses import replace
from functools import partial

import numpy as np
import pytest
import torch
from PIL import Image

import main
import models
from conftest import CIFAR_MEAN, CIFAR_STD, PlantedBackdoorEncoder, RandomFeatureEncoder, smooth_images
from common.device import cpu_supports_bf16
from decree.inversion import invert_trigger
from decree.restarts import drop_rows
from decree.settings import preset
from decree.stop_reasons import STOP_BUDGET, STOP_EARLY, STOP_SLOW, STOP_VERDICT, UPPER_BOUND_STOPS
from decree import detect, shadow_cache
from decree.target import analyse_target, load_target, recover_target
from models.fold import batchnorm_count, fold_batchnorm
from decree.outputs import run_id_for
from sweeps.report import restart_spread, summary_csv

FAST = dict(lr=0.5, batch_size=32, max_epochs=60)


pytestmark = pytest.mark.usefixtures("one_thread")  # one reduction order, as the comparisons assume


def run(encoder, images, **overrides):
    return invert_trigger(encoder, images, CIFAR_MEAN, CIFAR_STD, preset("cifar10", **{**FAST, **overrides}),
                          progress=False)


class BatchSizes(torch.nn.Module):
    """Wraps an encoder and records the batch size of every call."""

    def __init__(self, encoder):
        super().__init__()
        self.encoder, self.sizes = encoder, []

    def forward(self, x):
        self.sizes.append(x.shape[0])
        return self.encoder(x)


def test_stacked_adam_rows_equal_separate_adams_also_after_dropping_a_row():
    g = torch.Generator().manual_seed(0)
    start = torch.randn(3, 4, 5, generator=g, dtype=torch.float64)
    grads = [torch.randn(3, 4, 5, generator=g, dtype=torch.float64) for _ in range(8)]
    stacked = start.clone().requires_grad_(True)
    opt = torch.optim.Adam([stacked], lr=0.5, betas=(0.5, 0.9))
    separate = [start[k].clone().requires_grad_(True) for k in range(3)]
    opts = [torch.optim.Adam([p], lr=0.5, betas=(0.5, 0.9)) for p in separate]
    rows = [0, 1, 2]
    for step, grad in enumerate(grads):
        if step == 4:  # restart 1 finishes: the stack keeps rows 0 and 2
            (stacked,) = drop_rows(opt, [0, 2])
            rows = [0, 2]
        stacked.grad = grad[rows].clone()
        opt.step()
        for k in rows:
            separate[k].grad = grad[k].clone()
            opts[k].step()
    for row, k in enumerate(rows):
        assert torch.equal(stacked[row].detach(), separate[k].detach())


def test_restart_zero_of_a_multi_start_run_is_the_single_run(shadow_images):
    single = run(PlantedBackdoorEncoder(), shadow_images[:64])
    multi = run(PlantedBackdoorEncoder(), shadow_images[:64], restarts=3)
    first = multi.restarts[0]
    assert first["seed"] == 80 and first["epochs"] == single.epochs
    # same draws and the same math; only the encoder batch is 3x larger, so float32 sums may round apart
    assert first["l1"] == pytest.approx(single.l1, rel=1e-5)
    assert len({r["seed"] for r in multi.restarts}) == 3


def test_the_smallest_restart_wins_and_every_restart_is_reported(shadow_images):
    result = run(PlantedBackdoorEncoder(), shadow_images[:64], restarts=3)
    l1s = [r["l1"] for r in result.restarts]
    assert len(l1s) == 3 and result.l1 == min(l1s)
    winner = result.restarts[l1s.index(min(l1s))]
    assert result.epochs == winner["epochs"] and result.stop_reason == winner["stop_reason"]
    assert result.pl1 == pytest.approx(min(r["pl1"] for r in result.restarts))


def test_a_finished_restart_leaves_the_encoder_batch(shadow_images):
    encoder = BatchSizes(PlantedBackdoorEncoder())
    result = invert_trigger(encoder, shadow_images[:64], CIFAR_MEAN, CIFAR_STD,
                            preset("cifar10", restarts=3, **FAST), progress=False)
    epochs = sorted(r["epochs"] for r in result.restarts)
    assert epochs[0] < epochs[-1]  # they stop at different epochs ...
    assert encoder.sizes[0] == 3 * 32 and encoder.sizes[-1] < 3 * 32  # ... and the batch shrinks when they do
    assert len(encoder.sizes) == 2 * epochs[-1]  # two steps of 32 per epoch while any restart runs


def test_stop_at_verdict_ends_a_trojaned_run_early_with_an_upper_bound(shadow_images):
    full = run(PlantedBackdoorEncoder(), shadow_images[:64])
    early = run(PlantedBackdoorEncoder(), shadow_images[:64], stop_at_verdict=True)
    assert full.trojaned and early.trojaned
    assert early.stop_reason == STOP_VERDICT and early.pl1_upper_bound and full.stop_reason == STOP_EARLY
    assert early.epochs < full.epochs and early.pl1 >= full.pl1
    # up to the exit, the run is the same run
    assert [h["cos"] for h in early.history[:-1]] == [h["cos"] for h in full.history[:early.epochs - 1]]


def test_stop_at_verdict_leaves_a_clean_run_unchanged(shadow_images):
    plain = run(RandomFeatureEncoder(), shadow_images[:64], max_epochs=6)
    exact = run(RandomFeatureEncoder(), shadow_images[:64], max_epochs=6, stop_at_verdict=True)
    assert not exact.trojaned and exact.stop_reason == plain.stop_reason == STOP_BUDGET
    assert [h["l1"] for h in exact.history] == [h["l1"] for h in plain.history]


def test_min_progress_cuts_a_slow_clean_run_short_and_runs_the_same_steps_until_then(shadow_images):
    full = run(RandomFeatureEncoder(), shadow_images[:64])
    slow = run(RandomFeatureEncoder(), shadow_images[:64], min_progress=0.2)
    assert not full.trojaned and full.found and full.stop_reason in (STOP_BUDGET, STOP_EARLY)
    assert slow.stop_reason == STOP_SLOW and slow.pl1_upper_bound and slow.epochs < full.epochs
    assert slow.pl1 >= full.pl1 and not slow.trojaned
    assert [h["l1"] for h in slow.history] == [h["l1"] for h in full.history[:slow.epochs]]


def test_presets_set_their_fields_and_explicit_values_win():
    paper, exact, fast, triage = (preset("cifar10", name) for name in ("paper", "exact", "fast", "triage"))
    assert not paper.stop_at_verdict and paper.param_dtype == "float64" and paper.speed_preset == "paper"
    # exact: the paper's run and rounding, only ended at a final verdict
    assert exact == replace(paper, stop_at_verdict=True, speed_preset="exact")
    assert triage.stop_at_verdict and not fast.stop_at_verdict and fast.speed_preset == "fast"
    assert not (paper.amp or fast.amp or triage.amp)  # bf16 ended runs early on the benchmark population
    # fast and triage keep the paper's float64 trigger (float32 ended runs early) and only cheapen encoder calls
    assert triage.param_dtype == fast.param_dtype == paper.param_dtype == "float64"
    assert fast.fold_batchnorm and fast.channels_last and triage.fold_batchnorm and triage.channels_last
    assert not (paper.fold_batchnorm or paper.channels_last)
    assert preset("cifar10", "triage", param_dtype="float64").param_dtype == "float64"
    assert preset("CLIP", "fast").early_stop_patience == 35  # the usage info's settings stay
    with pytest.raises(ValueError, match="--preset"):
        preset("cifar10", "turbo")


def test_cpu_bf16_support_is_read_from_the_cpu_flags(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx2 fma avx512f\n")
    assert not cpu_supports_bf16(cpuinfo)
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu avx512f avx512_bf16 amx_tile\n")
    assert cpu_supports_bf16(cpuinfo)
    assert not cpu_supports_bf16(tmp_path / "missing")


def test_progress_shows_best_against_threshold_and_ends_with_the_reason(shadow_images, capsys):
    invert_trigger(PlantedBackdoorEncoder(), shadow_images[:64], CIFAR_MEAN, CIFAR_STD,
                   preset("cifar10", "triage", **FAST), progress=True)
    err = capsys.readouterr().err
    assert "best_PL1" in err and "(thr 0.1)" in err and "since_best" in err
    assert "/1000" not in err and "epochs" in err  # no count towards a budget the run will not reach
    last = err.strip().splitlines()[-1]
    assert last.startswith("DECREE stopped after") and "exact early exit" in last


def test_main_writes_restarts_stop_reason_and_upper_bound(tmp_path):
    torch.manual_seed(0)
    path = tmp_path / "enc" / "model_1.pth"
    path.parent.mkdir()
    torch.save({"epoch": 1, "state_dict": models.get_encoder("cifar10", "resnet18_w8").state_dict()}, path)
    data = tmp_path / "shadow.npz"
    np.savez(data, x=smooth_images(24, 32, seed=2), y=np.zeros(24, np.int64))
    main.main(["--encoder_path", str(path), "--arch", "resnet18_w8", "--shadow_data", str(data), "--shadow_size",
               "24", "--lr", "0.5", "--epochs", "2", "--out_dir", str(tmp_path), "--device", "cpu", "--quiet",
               "--preset", "triage", "--restarts", "2", "--min_progress", "0.3"])
    record = json.loads((tmp_path / "trigger_norm" / f"{run_id_for(path)}.json").read_text())
    assert record["config"]["speed_preset"] == "triage" and record["config"]["stop_at_verdict"]
    assert record["config"]["min_progress"] == 0.3  # the flag wins over the preset's value
    assert record["config"]["param_dtype"] == "float64" and len(record["restarts"]) == 2  # the paper's run, cut
    assert record["stop_reason"] in (STOP_BUDGET, STOP_EARLY, STOP_VERDICT, STOP_SLOW)
    assert record["pl1_upper_bound"] == (record["stop_reason"] in UPPER_BOUND_STOPS)
    assert "stopped after" in (tmp_path / "detect_log" / f"{run_id_for(path)}.log").read_text()


def test_fast_runs_recover_the_target_on_the_folded_encoder_with_the_unfolded_result(tmp_path, monkeypatch):
    torch.manual_seed(0)
    path = tmp_path / "enc" / "model_1.pth"
    path.parent.mkdir()
    torch.save({"epoch": 1, "state_dict": models.get_encoder("cifar10", "resnet18_w8").state_dict()}, path)
    images = smooth_images(24, 32, seed=2)
    np.savez(tmp_path / "shadow.npz", x=images, y=np.zeros(24, np.int64))
    seen = {}

    def spy(setup, encoder, spec, shadow, result, device, target_path, **options):
        seen.update(encoder=encoder, result=result)
        return analyse_target(setup, encoder, spec, shadow, result, device, target_path, **options)

    monkeypatch.setattr(detect, "analyse_target", spy)
    main.main(["--encoder_path", str(path), "--arch", "resnet18_w8", "--shadow_data", str(tmp_path / "shadow.npz"),
               "--lr", "0.5", "--epochs", "2", "--out_dir", str(tmp_path), "--device", "cpu", "--quiet",
               "--preset", "fast"])
    record = json.loads((tmp_path / "trigger_norm" / f"{run_id_for(path)}.json").read_text())
    assert record["batchnorms_folded"] > 0 and batchnorm_count(seen["encoder"]) == 0
    original, spec = models.load_encoder(path, "cifar10", "resnet18_w8", "cpu")
    expected = recover_target(original.eval(), images, seen["result"].mask, seen["result"].pattern, spec.mean,
                              spec.std, "cpu")
    torch.testing.assert_close(load_target(tmp_path / "trigger_norm" / record["target"]["file"]), expected.vector,
                               rtol=1e-5, atol=1e-5)


def test_sweep_summary_reports_the_restart_spread():
    record = {"restarts": [{"pl1": 0.05}, {"pl1": None}, {"pl1": 0.2}]}
    assert restart_spread(record) == {"restarts": 3, "pl1_min": 0.05, "pl1_median": 0.2, "pl1_max": math.inf}
    assert restart_spread({"restarts": [{"pl1": 0.05}]}) == {} and restart_spread({}) == {}


def test_image_folder_shadow_set_is_decoded_once_and_rekeyed_when_the_folder_changes(tmp_path, monkeypatch):
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i, image in enumerate(smooth_images(4, 40, seed=3)):
        Image.fromarray(image).save(folder / f"{i}.png")
    calls = []
    real = shadow_cache.load_image_folder
    monkeypatch.setattr(shadow_cache, "load_image_folder", lambda *a, **k: calls.append(1) or real(*a, **k))
    load = partial(shadow_cache.load_image_folder_cached, tmp_path / "cache", folder, 32, 0, False)
    first, second = load(count=3), load(count=3)
    assert len(calls) == 1 and np.array_equal(first, second) and first.shape == (3, 32, 32, 3)
    load(count=2)  # another selection: another entry
    Image.fromarray(smooth_images(1, 40, seed=9)[0]).save(folder / "0.png")  # the folder changed
    load(count=3)
    assert len(calls) == 3 and len(list((tmp_path / "cache").glob("*.npz"))) == 3


def test_summary_csv_has_spread_columns_only_when_a_run_had_restarts():
    plain = {"path": "a.pth", "status": "done"}
    assert "pl1_median" not in summary_csv([plain]).splitlines()[0]
    spread = {"path": "b.pth", "status": "done", "restarts": 2, "pl1_min": 0.05, "pl1_median": 0.1, "pl1_max": 0.15}
    head, *rows = summary_csv([plain, spread]).splitlines()
    assert head.endswith("restarts,pl1_min,pl1_median,pl1_max") and rows[1].endswith("2,0.05,0.1,0.15")


class BatchNormEncoder(torch.nn.Module):
    """conv -> BN -> ReLU twice, with running statistics far from the identity (as after training)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(3)
        self.body = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, 2, 1, bias=False), torch.nn.BatchNorm2d(8),
                                        torch.nn.ReLU(), torch.nn.Conv2d(8, 16, 3, 2, 1), torch.nn.BatchNorm2d(16),
                                        torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(2), torch.nn.Flatten())
        for bn in (self.body[1], self.body[4]):
            bn.running_mean.uniform_(-1, 1)
            bn.running_var.uniform_(0.1, 3)
            bn.weight.data.uniform_(0.5, 2)
            bn.bias.data.uniform_(-1, 1)

    def forward(self, x):
        return self.body(x)


class DataDependentEncoder(BatchNormEncoder):
    """Python control flow on tensor values: torch.fx cannot trace it."""

    def forward(self, x):
        return self.body(x) if x.mean() > -10 else -self.body(x)


def test_folded_batchnorm_computes_the_same_embeddings_and_input_gradients():
    encoder = BatchNormEncoder().eval()
    folded, count, why_not = fold_batchnorm(encoder)
    assert count == 2 and why_not == "" and batchnorm_count(folded) == 0
    assert batchnorm_count(encoder) == 2  # the caller's encoder is left alone
    x = torch.randn(4, 3, 16, 16, requires_grad=True)
    x_folded = x.detach().clone().requires_grad_(True)
    torch.testing.assert_close(folded(x_folded), encoder(x), rtol=1e-5, atol=1e-5)
    encoder(x).square().sum().backward()
    folded(x_folded).square().sum().backward()
    torch.testing.assert_close(x_folded.grad, x.grad, rtol=1e-4, atol=1e-5)


def test_untraceable_or_training_encoders_are_not_folded():
    encoder = DataDependentEncoder().eval()
    same, count, why_not = fold_batchnorm(encoder)
    assert same is encoder and count == 0 and "could not trace" in why_not
    with pytest.raises(ValueError, match="eval mode"):
        fold_batchnorm(BatchNormEncoder().train())


def test_fast_preset_runs_the_paper_inversion_on_a_folded_encoder(shadow_images):
    paper = run(BatchNormEncoder(), shadow_images[:64], max_epochs=4)
    fast = invert_trigger(BatchNormEncoder(), shadow_images[:64], CIFAR_MEAN, CIFAR_STD,
                          preset("cifar10", "fast", **{**FAST, "max_epochs": 4}), progress=False)
    assert fast.batchnorms_folded == 2 and paper.batchnorms_folded == 0
    # the same math: only float32 rounding inside the encoder differs
    np.testing.assert_allclose([h["l1"] for h in fast.history], [h["l1"] for h in paper.history], rtol=1e-3)
    np.testing.assert_allclose([h["cos"] for h in fast.history], [h["cos"] for h in paper.history], atol=1e-3)
