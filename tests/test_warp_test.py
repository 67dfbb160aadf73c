"""The warp test beside DECREE (decree/warp_test.py): it flags a planted distribution-preserving backdoor with a warp
trigger that DECREE calls clean, leaves a clean encoder unflagged, and never changes DECREE's numbers."""
import contextlib
import csv
import io
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import main
import run_decree
from conftest import CIFAR_MEAN, CIFAR_STD, PlantedWarpEncoder, RandomFeatureEncoder, smooth_images
from datasets import save_npz_dataset
from decree.inversion import invert_trigger, mean_pairwise_cos
from decree.outputs import RunPaths, run_id_for
from decree.settings import preset
from decree.warp_test import (WARP_THRESHOLD, WarpTestConfig, combined_score, combined_verdict, displacement_px,
                              identity_grid, run_warp_test, warp_field, warp_pixels)

SHADOW = smooth_images(128, 32, seed=1)


def encoders():
    return {"planted": PlantedWarpEncoder().eval().requires_grad_(False),
            "clean": RandomFeatureEncoder(64).eval().requires_grad_(False)}


def embeddings_through(encoder, images, field):
    pixels = warp_pixels(torch.from_numpy(images), field).permute(0, 3, 1, 2) / 255
    return encoder((pixels - torch.tensor(CIFAR_MEAN).view(1, 3, 1, 1)) / torch.tensor(CIFAR_STD).view(1, 3, 1, 1))


def half_pixel_shift(size: int = 32) -> torch.Tensor:
    """A warp that moves every pixel half a pixel right: bilinear sampling averages each pair of neighbours."""
    budget = WarpTestConfig().budget
    return warp_field(torch.full((1, 2, 4, 4), float(np.arctanh(0.5 / (size - 1) / budget))), size, budget)


def test_the_planted_trigger_spreads_its_target_so_decree_cannot_collapse_it(one_thread):
    with torch.no_grad():
        stamped = embeddings_through(encoders()["planted"], SHADOW, half_pixel_shift())
        clean = embeddings_through(encoders()["clean"], SHADOW, half_pixel_shift())
    target = encoders()["planted"].target
    assert (F.normalize(stamped, dim=1) @ target).min() > 0.6  # every stamped image went to the target cluster
    assert 0.3 < mean_pairwise_cos(stamped) < 0.7  # ... which stays spread out, far from DECREE's 0.99
    assert (F.normalize(clean, dim=1) @ target).abs().max() < 0.6


def test_warp_test_flags_the_planted_backdoor_decree_calls_clean(one_thread):
    planted = encoders()["planted"]
    warp = run_warp_test(planted, SHADOW, CIFAR_MEAN, CIFAR_STD, progress=False)
    assert warp.flagged and warp.gain > 2 * WARP_THRESHOLD
    assert warp.cos_warped > warp.cos_clean + 0.2
    assert 0 < warp.displacement_px <= WarpTestConfig().budget * 32
    decree = invert_trigger(planted, SHADOW, CIFAR_MEAN, CIFAR_STD, preset("cifar10", max_epochs=40), progress=False)
    assert decree.verdict == "clean"
    assert combined_verdict(decree.trojaned, warp.flagged) == "trojaned"
    assert combined_score(0.2, warp.score) == warp.score > 0.5


def test_warp_test_leaves_a_clean_encoder_unflagged(one_thread):
    warp = run_warp_test(encoders()["clean"], SHADOW, CIFAR_MEAN, CIFAR_STD, progress=False)
    assert not warp.flagged and warp.gain < WARP_THRESHOLD / 2
    assert combined_verdict(False, warp.flagged) == "clean" and combined_score(0.3, warp.score) == 0.3


def test_warp_field_is_the_identity_at_rest_and_bounded_by_the_budget():
    assert torch.equal(warp_field(torch.zeros(1, 2, 4, 4), 32, 0.0625), identity_grid(32))
    images = torch.from_numpy(SHADOW[:4])
    assert torch.allclose(warp_pixels(images, identity_grid(32)), images.float(), atol=1e-3)
    extreme = warp_field(torch.full((1, 2, 4, 4), 50.0), 32, 0.0625)
    assert displacement_px(extreme) <= 0.0625 * 31 * 2 ** 0.5 + 1e-4


def test_warp_test_is_reproducible(one_thread):
    cfg = WarpTestConfig(steps=8)
    first, second = (run_warp_test(encoders()["planted"], SHADOW, CIFAR_MEAN, CIFAR_STD, cfg, progress=False)
                     for _ in range(2))
    assert first.gain == second.gain and first.flow == second.flow


@pytest.fixture(scope="module")
def main_runs(tmp_path_factory):
    """main.py on the planted warp encoder with and without --warp_test, and on its clean twin with it."""
    folder = tmp_path_factory.mktemp("warp")
    torch.save(PlantedWarpEncoder().state_dict(), folder / "planted.pth")
    torch.save(RandomFeatureEncoder(64).state_dict(), folder / "clean.pth")
    save_npz_dataset(folder / "shadow.npz", SHADOW, np.zeros(len(SHADOW), np.int64))
    common = ["--arch_module", "planted_arch", "--shadow_data", str(folder / "shadow.npz"), "--epochs", "20",
              "--device", "cpu", "--quiet"]
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        main.main(["--encoder_path", str(folder / "planted.pth"), "--arch", "planted_warp", "--out_dir",
                   str(folder / "with"), "--warp_test"] + common)
        main.main(["--encoder_path", str(folder / "planted.pth"), "--arch", "planted_warp", "--out_dir",
                   str(folder / "without")] + common)
        main.main(["--encoder_path", str(folder / "clean.pth"), "--arch", "random_features", "--out_dir",
                   str(folder / "with"), "--warp_test"] + common)
    return folder, printed.getvalue()


def record_of(out, encoder_path) -> dict:
    return json.loads(RunPaths(out, run_id_for(encoder_path)).json.read_text())


def test_main_reports_the_warp_test_and_a_combined_verdict(main_runs):
    folder, printed = main_runs
    planted = record_of(folder / "with", folder / "planted.pth")
    assert planted["verdict"] == "clean" and planted["combined_verdict"] == "trojaned"
    assert planted["warp_test"]["flagged"] and planted["warp_test"]["threshold"] == WARP_THRESHOLD
    assert planted["combined_score"] == planted["warp_test"]["score"] > 0.5 > planted["score"]
    assert planted["job"]["warp_test"] == {}
    clean = record_of(folder / "with", folder / "clean.pth")
    assert clean["combined_verdict"] == "clean" and not clean["warp_test"]["flagged"]
    lines = printed.splitlines()
    verdicts = [i for i, line in enumerate(lines) if "planted.pth: CLEAN" in line]
    assert "warp test: FLAGGED" in lines[verdicts[0] - 1] and "combined verdict TROJANED" in lines[verdicts[0] - 1]
    log = RunPaths(folder / "with", planted["run_id"]).log.read_text()
    assert "warp test: FLAGGED" in log


def test_the_warp_test_never_changes_decrees_numbers(main_runs):
    folder, _ = main_runs
    with_test = record_of(folder / "with", folder / "planted.pth")
    without = record_of(folder / "without", folder / "planted.pth")
    assert without["warp_test"] is None and without["combined_verdict"] == without["verdict"]
    for key in ("l1", "pl1", "epochs", "verdict", "score", "stop_reason"):
        assert with_test[key] == without[key], key
    triggers = [np.load(RunPaths(folder / out, record["run_id"]).trigger_dir / "trigger.npz")
                for out, record in (("with", with_test), ("without", without))]
    assert all(np.array_equal(triggers[0][key], triggers[1][key]) for key in triggers[0].files)


@pytest.mark.parametrize("flag", ["--warp_threshold=0.2", "--warp_budget=0.1", "--warp_steps=3"])
def test_a_warp_setting_without_warp_test_is_a_one_line_error(tmp_path, capsys, flag):
    with pytest.raises(SystemExit) as exit_:
        main.main(["--encoder_path", str(tmp_path / "enc.pth"), "--out_dir", str(tmp_path / "out"), flag])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and flag.split("=")[0] in err and "--warp_test" in err
    assert not (tmp_path / "out").exists()


def test_a_sweep_carries_the_warp_test_into_its_report(tmp_path, capsys):
    torch.save(PlantedWarpEncoder().state_dict(), tmp_path / "planted.pth")
    torch.save(RandomFeatureEncoder(64).state_dict(), tmp_path / "clean.pth")
    save_npz_dataset(tmp_path / "shadow.npz", SHADOW[:64], np.zeros(64, np.int64))
    (tmp_path / "manifest.csv").write_text("path,usage_info,arch,label\n"
                                           f"{tmp_path / 'planted.pth'},cifar10,planted_warp,backdoor\n"
                                           f"{tmp_path / 'clean.pth'},cifar10,random_features,clean\n")
    common = ["--manifest", str(tmp_path / "manifest.csv"), "--arch_module", "planted_arch", "--shadow_data",
              str(tmp_path / "shadow.npz"), "--epochs", "10", "--out_dir", str(tmp_path / "out"), "--workers", "1",
              "--quiet"]
    run_decree.main(common)
    assert "warp test alone" not in capsys.readouterr().out
    run_decree.main(common + ["--warp_test"])  # results without the warp test are not finished for this sweep
    out = capsys.readouterr().out
    assert "sweep: 2 finished" in out
    assert "warp test alone: TPR 1.000 (1/1), FPR 0.000 (0/1)" in out
    assert "combined (DECREE or warp test): TPR 1.000 (1/1), FPR 0.000 (0/1), AUROC 1.000" in out
    rows = {row["label"]: row for row in csv.DictReader(open(tmp_path / "out" / "trigger_norm" / "summary.csv"))}
    assert rows["backdoor"]["verdict"] == "clean" and rows["backdoor"]["warp_verdict"] == "flagged"
    assert rows["backdoor"]["combined_verdict"] == "trojaned" and rows["clean"]["combined_verdict"] == "clean"
    assert float(rows["backdoor"]["warp_gain"]) > WARP_THRESHOLD > float(rows["clean"]["warp_gain"])


def test_scan_runs_the_warp_test_beside_decree(one_thread):
    from decree import scan
    planted = PlantedWarpEncoder()
    with_test = scan(planted, SHADOW[:64], mean=CIFAR_MEAN, std=CIFAR_STD, max_epochs=10, warp_test=True)
    without = scan(planted, SHADOW[:64], mean=CIFAR_MEAN, std=CIFAR_STD, max_epochs=10)
    assert with_test.verdict == without.verdict == "CLEAN" and with_test.pl1 == without.pl1
    assert with_test.warp_flagged and with_test.warp_gain > WARP_THRESHOLD
    assert with_test.combined_verdict == "TROJANED" and without.combined_verdict == "CLEAN"
    assert without.warp_gain is None and without.warp_flagged is None
    strict = scan(planted, SHADOW[:64], mean=CIFAR_MEAN, std=CIFAR_STD, max_epochs=10, warp_test={"threshold": 0.9})
    assert not strict.warp_flagged and strict.combined_verdict == "CLEAN"
