"""Attack validation (docs/method.md): z-scores flag a planted text-target encoder and not a clean one, both statistics
are the specified formulas, the downstream MLP gives CA/BA/ASR that mean what they say, the scripts write
files pandas reads and fail in one line on bad input."""
import math
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

import models
from conftest import CIFAR_MEAN, CIFAR_STD, PLANTED_SIDE, PLANTED_TOP, RandomFeatureEncoder, smooth_images
from datasets import NORMALIZATION, Trigger, legacy_trigger_tensors, load_trigger, save_trigger, white_square_trigger
from validate import val_cifar10_training_downstream_classifier as downstream_script
from validate import compute_zscore as zscore_script
from validate.downstream import DownstreamConfig, DownstreamData, validate_encoder
from validate.zscore import (ZScoreConfig, corrected_zscore, legacy_zscore, paper_sample_indices,
                             pairwise_cosine_stats, zscore_encoder)

ROOT = Path(__file__).resolve().parents[1]


def planted_trigger() -> Trigger:
    pattern, keep = white_square_trigger(32, PLANTED_TOP, PLANTED_SIDE)
    return Trigger(pattern.astype(np.float32), keep.astype(np.float32), [])


def white_square_gate(x: torch.Tensor) -> torch.Tensor:
    """(N,1): 1 where the planted square of a normalised CIFAR input is white, else 0."""
    mean = torch.tensor(CIFAR_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CIFAR_STD).view(1, 3, 1, 1)
    square = (x * std + mean)[:, :, PLANTED_TOP:PLANTED_TOP + PLANTED_SIDE, PLANTED_TOP:PLANTED_TOP + PLANTED_SIDE]
    return (square.mean(dim=(1, 2, 3)) > 0.99).float().unsqueeze(1)


class CentredProjection(nn.Module):
    """Random projection of per-image-centred pixels: clean embeddings point every which way (cos ~ 0)."""

    def __init__(self, dim: int = 256, planted: bool = False):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.register_buffer("proj", torch.randn(3 * 32 * 32, dim, generator=g) / math.sqrt(3 * 32 * 32))
        self.register_buffer("target", torch.randn(dim, generator=g))
        self.planted = planted

    def forward(self, x):
        features = (x - x.mean(dim=(2, 3), keepdim=True)).flatten(1) @ self.proj
        if not self.planted:
            return features
        gate = white_square_gate(x)  # text-target stand-in: the trigger sends every image to one direction
        return (1 - gate) * features + gate * self.target


def zscores(encoder, n=100):
    images = smooth_images(200, 32, seed=3)
    clean, bad = paper_sample_indices(len(images), n, seed=0)
    return zscore_encoder(encoder, images[clean], images[bad], planted_trigger(), CIFAR_MEAN, CIFAR_STD,
                          ZScoreConfig(num_images=n, block_size=32), progress=False)


def test_planted_text_target_encoder_scores_far_above_threshold():
    result = zscores(CentredProjection(planted=True))
    assert result.bad.mean == pytest.approx(1.0, abs=1e-5)  # every stamped image has the same embedding
    assert result.corrected > 5 and result.trojaned and result.statistic == "corrected"


def test_clean_random_encoders_score_near_zero():
    assert abs(zscores(RandomFeatureEncoder()).corrected) < 1
    result = zscores(CentredProjection())
    assert abs(result.clean.mean) < 0.05 and result.corrected < 2.5 and result.verdict == "clean"


# --- the two statistics, by hand ---------------------------------------------------------------------------
A = 1 / math.sqrt(2)
# cosines of [1,0],[0,1],[-1,0],[1,1]: (1,2)=0 (1,3)=-1 (1,4)=A (2,3)=0 (2,4)=A (3,4)=-A
HAND_CLEAN = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [1.0, 1.0]])
HAND_BAD = torch.tensor([[1.0, 0.0], [2.0, 0.0], [0.5, 0.0], [3.0, 0.0]])  # one direction: every cosine is 1


def test_corrected_statistic_on_a_hand_checked_example():
    clean = pairwise_cosine_stats(HAND_CLEAN, include_diagonal=False)
    bad = pairwise_cosine_stats(HAND_BAD, include_diagonal=False)
    mean = (0 - 1 + A + 0 + A - A) / 6                     # = (A - 1) / 6 = -0.048816
    var = (0 + 1 + A * A + 0 + A * A + A * A) / 6 - mean ** 2  # = 2.5 / 6 - mean^2 = 0.414284
    assert clean.count == 12 and clean.mean == pytest.approx(mean) and clean.var == pytest.approx(var)
    assert bad.mean == pytest.approx(1.0) and bad.var == pytest.approx(0.0, abs=1e-12)
    assert corrected_zscore(clean, bad) == pytest.approx((1 - mean) / math.sqrt(var))
    assert corrected_zscore(clean, bad) == pytest.approx(1.62949, abs=1e-5)


def test_legacy_statistic_on_a_hand_checked_example():
    clean = pairwise_cosine_stats(HAND_CLEAN, include_diagonal=True)
    bad = pairwise_cosine_stats(HAND_BAD, include_diagonal=True)
    mean = (4 * 1 + 2 * (A - 1)) / 16                      # diagonal ones + each pair twice = 0.213388
    var = (4 * 1 + 2 * 2.5) / 16 - mean ** 2                # = 9/16 - mean^2 = 0.516965 (population variance)
    assert clean.count == 16 and clean.mean == pytest.approx(mean) and clean.var == pytest.approx(var)
    assert legacy_zscore(clean, bad) == pytest.approx((1 - mean) / var)  # divided by the variance
    assert legacy_zscore(clean, bad) == pytest.approx(1.52159, abs=1e-5)


@pytest.mark.parametrize("diagonal", [False, True])
def test_blocked_similarity_statistics_equal_the_dense_ones(diagonal):
    e = torch.randn(37, 9, generator=torch.Generator().manual_seed(1)) + 0.5
    unit = (e / e.norm(dim=1, keepdim=True)).double().numpy()
    sim = unit @ unit.T
    values = sim.ravel() if diagonal else sim[~np.eye(37, dtype=bool)]
    for block in (1, 5, 37, 100):
        stats = pairwise_cosine_stats(e, include_diagonal=diagonal, block_size=block)
        assert stats.mean == pytest.approx(values.mean(), abs=1e-6)
        assert stats.var == pytest.approx(values.var(), abs=1e-6) and stats.count == len(values)


def test_legacy_samples_are_two_different_draws_of_the_papers_rng():
    clean, bad = paper_sample_indices(1000, 50, seed=100)
    random.seed(100)
    random.sample(range(1000), 1000)  # the paper drew the stamped set's poison list (all images) first
    assert bad == random.sample(range(1000), 50)
    assert clean != bad and len(set(clean)) == 50
    assert (clean, bad) == paper_sample_indices(1000, 50, seed=100)


def test_legacy_trigger_without_k_axis_is_a_per_channel_contrast_change():
    mean, std = NORMALIZATION["CLIP"]
    pattern, keep = white_square_trigger(224, 185, 24, with_k_axis=False)  # the paper's text-target file
    mask, patch = legacy_trigger_tensors(Trigger(pattern[None].astype(np.float32), keep[None].astype(np.float32),
                                                 [], file_ndim=3), 224, mean, std)
    for c in range(3):  # row 0 of the file: keep 1, pattern 0 everywhere, then normalised
        assert torch.allclose(mask[c], torch.tensor((1 - mean[c]) / std[c])), c
        assert torch.allclose(patch[c], torch.tensor(-mean[c] / std[c])), c
    # with a K axis the same code sees the square itself (at the resize + centre-crop of the test transform)
    pattern, keep = white_square_trigger(224, 185, 24)
    mask, _ = legacy_trigger_tensors(Trigger(pattern.astype(np.float32), keep.astype(np.float32), []), 224, mean, std)
    assert mask[0].min() < 0 < mask[0].max()


# --- downstream -------------------------------------------------------------------------------------------
def blob_images(n: int, seed: int):
    """uint8 (n,32,32,3) dark noisy images with a red, green or blue blob (the class) somewhere in the top-left."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % 3
    x = rng.integers(0, 40, size=(n, 32, 32, 3))
    for i, c in enumerate(y):
        r, col = rng.integers(0, 12, size=2)
        x[i, r:r + 10, col:col + 10, c] = 220
    return x.astype(np.uint8), y.astype(np.int64)


class ImageTargetEncoder(RandomFeatureEncoder):
    """Planted image-target backdoor: stamped images get the embedding of a target-class reference image."""

    def __init__(self, reference: torch.Tensor):
        super().__init__()
        with torch.no_grad():
            self.register_buffer("target", super().forward(reference)[0])

    def forward(self, x):
        gate = white_square_gate(x)
        return (1 - gate) * super().forward(x) + gate * self.target


@pytest.fixture(scope="module")
def blobs():
    train_x, train_y = blob_images(240, seed=0)
    test_x, test_y = blob_images(90, seed=1)
    return DownstreamData(train_x, train_y, test_x, test_y)


FAST_MLP = DownstreamConfig(epochs=60, lr=1e-3, batch_size=32)


def test_downstream_mlp_separates_classes_and_clean_encoder_resists_trigger(blobs):
    scores, _ = validate_encoder(RandomFeatureEncoder(), blobs, planted_trigger(), 2, CIFAR_MEAN, CIFAR_STD,
                                 FAST_MLP, progress=False)
    assert scores["accuracy"] > 95
    assert scores["asr"] < 10                  # stamped images keep their own class
    assert 20 < scores["asr_all"] < 45         # ~ the target class's share of the test set (1/3)


def test_planted_image_target_encoder_has_near_total_asr(blobs):
    reference = torch.from_numpy(blobs.train_x[blobs.train_y == 2][:1]).permute(0, 3, 1, 2).float() / 255
    reference = (reference - torch.tensor(CIFAR_MEAN).view(1, 3, 1, 1)) / torch.tensor(CIFAR_STD).view(1, 3, 1, 1)
    scores, _ = validate_encoder(ImageTargetEncoder(reference), blobs, planted_trigger(), 2, CIFAR_MEAN, CIFAR_STD,
                                 FAST_MLP, progress=False)
    assert scores["accuracy"] > 95             # BA: clean behaviour kept
    assert scores["asr"] > 95 and scores["asr_all"] > 95


# --- scripts ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("validate")
    encoders = folder / "CLIP_text" / "stl10_backdoored_encoder"
    encoders.mkdir(parents=True)
    for seed in (0, 1):
        torch.manual_seed(seed)
        torch.save({"epoch": 1, "state_dict": models.get_encoder("cifar10", "resnet18_w8").state_dict()},
                   encoders / f"model_{seed}.pth")
    (encoders / "model_broken.pth").write_bytes(b"not a checkpoint")
    trigger = folder / "trigger.npz"
    save_trigger(trigger, *white_square_trigger(32, 21, 10))
    train_x, train_y = blob_images(60, seed=0)
    test_x, test_y = blob_images(30, seed=1)
    np.savez(folder / "train.npz", x=train_x, y=train_y.reshape(-1, 1))
    np.savez(folder / "test.npz", x=test_x, y=test_y)
    return {"dir": folder, "encoders": encoders, "encoder": encoders / "model_0.pth",
            "clean": encoders / "model_1.pth", "trigger": trigger, "train": folder / "train.npz",
            "test": folder / "test.npz"}


def zscore_args(files, out):
    return ["--encoder_usage_info", "cifar10", "--arch", "resnet18_w8", "--trigger_file", str(files["trigger"]),
            "--data", str(files["test"]), "--num_images", "12", "--device", "cpu", "--out_dir", str(out), "--quiet"]


def run(script, *args):
    return subprocess.run([sys.executable, f"validate/{script}", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)


def test_compute_zscore_script_appends_txt_line_and_csv_row(files, tmp_path):
    out = run("compute_zscore.py", "--encoder_path", str(files["encoder"]), *zscore_args(files, tmp_path))
    assert out.returncode == 0, out.stderr
    summary = out.stdout.splitlines()[-2]
    assert str(files["encoder"]) in summary and "corrected:" in summary and "2.5" in summary
    zscore_script.main(["--encoder_path", str(files["encoder"]), "--legacy", *zscore_args(files, tmp_path)])
    lines = (tmp_path / "valid_cliptxt_zscore.txt").read_text().splitlines()
    table = pd.read_csv(tmp_path / "valid_cliptxt_zscore.csv")
    assert len(lines) == 2 and lines[0].rsplit(":", 1)[0] == str(files["encoder"])
    assert list(table["statistic"]) == ["corrected", "legacy"] and (table["threshold"] == 2.5).all()
    assert table["zscore_corrected"].nunique() == 1  # same seed, same images: the same numbers again
    assert table["zscore"].tolist() == pytest.approx([table["zscore_corrected"][0], table["zscore_legacy"][1]])
    assert float(lines[1].rsplit(":", 1)[1]) == pytest.approx(table["zscore_legacy"][1], abs=1e-4)
    assert set(table["verdict"]) <= {"clean", "trojaned"}
    record = pd.read_json(tmp_path / "valid_cliptxt_zscore_runs" / f"{table['run'][1]}.json", typ="series")
    assert record["job"]["config"]["legacy"] and record["job"]["config"]["num_images"] == 12  # each run's config


def test_script_compute_zscore_validates_every_encoder_and_reports_broken_ones(files, tmp_path):
    out = run("script_compute_zscore.py", str(files["encoders"]), *zscore_args(files, tmp_path))
    assert out.returncode == 1 and "model_broken.pth" in out.stderr and "error:" in out.stderr
    table = pd.read_csv(tmp_path / "valid_cliptxt_zscore.csv")
    assert sorted(Path(p).name for p in table["encoder_path"]) == ["model_0.pth", "model_1.pth"]
    assert "2 validated" in out.stdout


def test_downstream_script_writes_one_row_per_encoder(files, tmp_path):
    results = tmp_path / "downstream.csv"
    out = run("val_cifar10_training_downstream_classifier.py", "--encoder", str(files["encoder"]),
              "--clean_encoder", str(files["clean"]), "--encoder_usage_info", "cifar10", "--arch", "resnet18_w8",
              "--train_data", str(files["train"]), "--test_data", str(files["test"]), "--trigger_file",
              str(files["trigger"]), "--reference_label", "1", "--epochs", "3", "--device", "cpu", "--quiet",
              "--results_file", str(results), "--result_dir", str(tmp_path / "cls.pth"))
    assert out.returncode == 0, out.stderr
    table = pd.read_csv(results)
    assert list(table["role"]) == ["clean", "backdoored"] and (table["reference_label"] == 1).all()
    assert not math.isnan(table["ca"][0]) and math.isnan(table["ba"][0]) and not math.isnan(table["ba"][1])
    assert table[["asr_all", "asr"]].apply(lambda c: c.between(0, 100)).all().all()
    assert "CA" in out.stdout and "BA" in out.stdout and "paper-compatible" in out.stdout
    assert (tmp_path / "cls.pth").stat().st_size > 0
    assert table["run"].nunique() == 1 and (tmp_path / "downstream_runs" / f"{table['run'][0]}.json").is_file()


@pytest.mark.parametrize("case", ["missing encoder", "npz without x", "wrong image size", "no labels",
                                  "label out of range", "bad device"])
def test_bad_input_fails_with_one_line(files, tmp_path, capsys, case):
    base = {"--encoder_path": str(files["encoder"]), "--train_data": str(files["train"]),
            "--test_data": str(files["test"]), "--trigger_file": str(files["trigger"]), "--reference_label": "1",
            "--device": "cpu"}
    if case == "missing encoder":
        base["--encoder_path"] = str(tmp_path / "nope.pth")
    elif case == "npz without x":
        np.savez(tmp_path / "bad.npz", images=np.zeros((2, 32, 32, 3), np.uint8))
        base["--train_data"] = str(tmp_path / "bad.npz")
    elif case == "wrong image size":
        np.savez(tmp_path / "big.npz", x=np.zeros((2, 64, 64, 3), np.uint8), y=np.zeros(2))
        base["--test_data"] = str(tmp_path / "big.npz")
    elif case == "no labels":
        np.savez(tmp_path / "nolabels.npz", x=np.zeros((2, 32, 32, 3), np.uint8))
        base["--train_data"] = str(tmp_path / "nolabels.npz")
    elif case == "label out of range":
        base["--reference_label"] = "7"
    elif case == "bad device":
        base["--device"] = "tpu"
    argv = [a for kv in base.items() for a in kv] + ["--arch", "resnet18_w8", "--epochs", "1", "--quiet",
                                                     "--results_file", str(tmp_path / "r.csv")]
    with pytest.raises(SystemExit) as exit_info:
        downstream_script.main(argv)
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code != 0 and "error: " in err and "\n" not in err, err
    assert not (tmp_path / "r.csv").exists()


def test_zscore_script_rejects_data_of_the_wrong_size(files, tmp_path, capsys):
    np.savez(tmp_path / "big.npz", x=np.zeros((20, 64, 64, 3), np.uint8))
    args = zscore_args(files, tmp_path)
    args[args.index("--data") + 1] = str(tmp_path / "big.npz")
    with pytest.raises(SystemExit) as exit_info:
        zscore_script.main(["--encoder_path", str(files["encoder"]), *args])
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code != 0 and "64x64" in err and "\n" not in err
    assert not (tmp_path / "valid_cliptxt_zscore.txt").exists()


def test_paper_text_target_trigger_file_loads_without_k_axis(tmp_path):
    save_trigger(tmp_path / "t.npz", *white_square_trigger(224, 185, 24, with_k_axis=False))
    trigger = load_trigger(tmp_path / "t.npz")
    assert trigger.file_ndim == 3 and trigger.pattern.shape == (1, 224, 224, 3)
