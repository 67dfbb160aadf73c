"""A newcomer's friction: file modes, sweep discovery messages, cached demo, readable pictures,
validation that warns, no half-made results folders."""
import os
import stat
from dataclasses import asdict, replace

import matplotlib
import numpy as np
import pytest
import torch

import attack_encoder as attack_script
import models
import pretrain_encoder as pretrain_script
from common import io as atomic
from datasets import DataError, save_reference, save_trigger, white_square_trigger
from decree.detect import DetectionJob
from decree.outputs import run_id_for
from sweeps.discovery import discover_output_folder
from sweeps.report import write_report
from experiments.demo import cached_detection
from validate import val_cifar10_training_downstream_classifier as downstream_script
from validate.downstream import DownstreamData, check_measurable

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


@pytest.fixture
def umask():
    """Set the process umask for one test, restoring it afterwards."""
    old = os.umask(0o022)
    os.umask(old)
    yield os.umask
    os.umask(old)


@pytest.mark.parametrize("mask, file_mode, dir_mode", [(0o022, 0o644, 0o755), (0o027, 0o640, 0o750)])
def test_outputs_get_the_modes_the_umask_allows(tmp_path, umask, mask, file_mode, dir_mode):
    umask(mask)
    assert atomic.current_umask() == mask
    atomic.write_json(tmp_path / "results" / "run.json", {"a": 1})
    atomic.write_torch(tmp_path / "results" / "model.pth", {"w": 1})
    atomic.append_csv_row(tmp_path / "results" / "rows.csv", {"a": 1})
    atomic.append_line(tmp_path / "results" / "lines.csv", "a,b")
    assert stat.S_IMODE((tmp_path / "results").stat().st_mode) == dir_mode
    for name in ("run.json", "model.pth", "rows.csv", "lines.csv"):
        assert stat.S_IMODE((tmp_path / "results" / name).stat().st_mode) == file_mode, name


def test_sweep_discovery_names_where_it_looked_and_the_flag_that_finds_the_demo(tmp_path):
    demo = tmp_path / "demo" / "encoders" / "clean_encoder"
    demo.mkdir(parents=True)
    (demo / "model_12.pth").write_bytes(b"")
    with pytest.raises(FileNotFoundError) as err:
        discover_output_folder(tmp_path)
    message = str(err.value)
    assert f"{tmp_path}/cifar10/" in message and f"{tmp_path}/CLIP_text/" in message
    assert f"--encoders {tmp_path}/demo " in message and "--manifest" in message
    with pytest.raises(FileNotFoundError, match="--output_root .*no such folder.*--encoders"):
        discover_output_folder(tmp_path / "missing")


def _downstream_data(train_y, test_y):
    x = np.zeros((1, 32, 32, 3), np.uint8)
    return DownstreamData(x.repeat(len(train_y), 0), np.array(train_y), x.repeat(len(test_y), 0), np.array(test_y))


@pytest.mark.parametrize("train_y, test_y, target, refusal", [
    ([0, 0, 0], [0, 1], 1, "train.npz: every training image is class 0"),
    ([0, 1, 2], [1, 1], 1, "test.npz: every test image is of the target class 1"),
])
def test_downstream_refuses_data_that_cannot_measure_accuracy_or_attack_success(train_y, test_y, target, refusal):
    with pytest.raises(DataError, match=refusal):
        check_measurable(_downstream_data(train_y, test_y), target, "train.npz", "test.npz")


def test_downstream_warns_when_the_test_set_covers_few_classes():
    assert check_measurable(_downstream_data([0, 1, 2], [0, 1, 2]), 1, "train.npz", "test.npz") == []
    [one] = check_measurable(_downstream_data([0, 1, 2], [0, 0]), 1, "train.npz", "test.npz")
    assert "every test image is class 0" in one
    [missing] = check_measurable(_downstream_data([0, 1, 2], [0, 1]), 1, "train.npz", "test.npz")
    assert "class(es) [2]" in missing


def test_downstream_script_on_one_class_data_exits_2_before_writing(tmp_path, capsys):
    torch.manual_seed(0)
    encoder = tmp_path / "model_1.pth"
    torch.save({"epoch": 1, "state_dict": models.get_encoder("cifar10", "resnet18_w4").state_dict()}, encoder)
    save_trigger(tmp_path / "trigger.npz", *white_square_trigger(32, 21, 10))
    np.savez(tmp_path / "one.npz", x=np.zeros((8, 32, 32, 3), np.uint8), y=np.zeros(8, np.int64))
    with pytest.raises(SystemExit) as exit_info:
        downstream_script.main(["--encoder_path", str(encoder), "--arch", "resnet18_w4",
                                "--train_data", str(tmp_path / "one.npz"), "--test_data", str(tmp_path / "one.npz"),
                                "--trigger_file", str(tmp_path / "trigger.npz"), "--reference_label", "0",
                                "--device", "cpu", "--quiet", "--epochs", "1", "--results_file", str(tmp_path / "r.csv")])
    assert exit_info.value.code == 2
    assert "every training image is class 0" in capsys.readouterr().err
    assert not (tmp_path / "r.csv").exists()


@pytest.fixture(scope="module")
def attack_inputs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("attack")
    torch.manual_seed(0)
    encoder = folder / "model_1.pth"
    torch.save({"epoch": 1, "state_dict": models.get_encoder("cifar10", "resnet18_w4").state_dict()}, encoder)
    np.savez(folder / "shadow.npz", x=np.zeros((16, 32, 32, 3), np.uint8))
    save_reference(folder / "reference.npz", np.zeros((1, 32, 32, 3), np.uint8), np.zeros(1, np.int64), info=["r"])
    save_reference(folder / "reference16.npz", np.zeros((1, 16, 16, 3), np.uint8), np.zeros(1, np.int64), info=["r"])
    save_trigger(folder / "trigger.npz", *white_square_trigger(32, 21, 10))
    return folder


@pytest.mark.parametrize("flags, message", [
    (["--batch_size", "1000"], "16 shadow images from {dir}/shadow.npz are fewer than one batch of 1000"),
    (["--reference_file", "{dir}/reference16.npz"], "{dir}/reference16.npz: the reference is 16x16 px"),
])
def test_attack_on_bad_input_names_it_and_leaves_no_results_folder(attack_inputs, tmp_path, capsys, flags, message):
    results = tmp_path / "output" / "cifar10" / "backdoored"
    argv = ["--pretrained_encoder", str(attack_inputs / "model_1.pth"), "--arch", "resnet18_w4",
            "--shadow_dataset", str(attack_inputs / "shadow.npz"), "--reference_file",
            str(attack_inputs / "reference.npz"), "--trigger_file", str(attack_inputs / "trigger.npz"),
            "--results_dir", str(results), "--epochs", "1", "--device", "cpu", "--quiet"]
    with pytest.raises(SystemExit) as exit_info:
        attack_script.main(argv + [flag.format(dir=attack_inputs) for flag in flags])
    assert exit_info.value.code == 2
    assert message.format(dir=attack_inputs) in capsys.readouterr().err
    assert not (tmp_path / "output").exists()


def test_demo_reuses_a_detection_only_for_the_same_settings_and_a_newer_result(tmp_path):
    encoder = tmp_path / "encoders" / "clean_encoder" / "model_1.pth"
    encoder.parent.mkdir(parents=True)
    encoder.write_bytes(b"weights")
    job = DetectionJob(encoder_path=str(encoder), shadow_data="shadow.npz", out_dir=str(tmp_path),
                       settings={"max_epochs": 3})
    assert cached_detection(job) is None
    atomic.write_json(job.paths().json, {"pl1": 0.5, "job": asdict(job)})
    assert cached_detection(job)["pl1"] == 0.5
    assert cached_detection(replace(job, settings={"max_epochs": 4})) is None, "other settings"
    later = job.paths().json.stat().st_mtime_ns + 10**9
    os.utime(encoder, ns=(later, later))
    assert cached_detection(job) is None, "the encoder changed after the result was written"


def _finished_runs(out_dir, n: int) -> list[str]:
    """n finished run records with a 32 px trigger of one grey pixel; returns their run ids."""
    run_ids = []
    for i in range(n):
        path = f"output/cifar10/encoder_{i}_backdoored/model_{i}.pth"
        run_id = run_id_for(path)
        atomic.write_json(out_dir / "trigger_norm" / f"{run_id}.json", {
            "run_id": run_id, "encoder_path": path, "usage_info": "cifar10", "arch": "resnet18", "l1": 30.0 + i,
            "pl1": (30.0 + i) / 3072, "verdict": "trojaned", "epochs": 40, "seconds": 2.5, "model_flag": "backdoor"})
        mask = np.zeros((32, 32), np.float32)
        mask[i % 32, 5] = 1
        atomic.write_npz(out_dir / "trigger_inv" / run_id / "trigger.npz", mask=mask,
                         pattern=np.full((32, 32, 3), 128, np.uint8))
        run_ids.append(run_id)
    return run_ids


def _lime_pixels(png) -> int:
    image = plt.imread(png)[..., :3]
    return int(((image[..., 1] > 0.95) & (image[..., 0] < 0.1) & (image[..., 2] < 0.1)).sum())


def test_gallery_draws_triggers_large_pixel_by_pixel_and_outlines_the_planted_one(tmp_path):
    [run_id] = _finished_runs(tmp_path, 1)
    write_report(tmp_path, 0.1)
    gallery = tmp_path / "trigger_norm" / "gallery.png"
    height, width = plt.imread(gallery).shape[:2]
    assert width >= 250 and height >= 250, "a 32 px trigger is drawn at least ~8x"
    assert _lime_pixels(gallery) == 0
    mask = np.zeros((32, 32), bool)
    mask[24:30, 24:30] = True
    write_report(tmp_path, 0.1, planted={run_id: mask})
    assert _lime_pixels(gallery) > 100, "the planted trigger is outlined"


def test_pl1_plot_keeps_its_plot_area_for_many_encoders(tmp_path):
    _finished_runs(tmp_path, 30)
    write_report(tmp_path, 0.1)
    height, width = plt.imread(tmp_path / "trigger_norm" / "pl1.png").shape[:2]
    assert height < 800 and width < 1400, "no vertical run ids stretching the figure"


def test_pretraining_with_a_batch_larger_than_the_data_writes_nothing(attack_inputs, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        pretrain_script.main(["--pretraining_dataset", str(attack_inputs / "shadow.npz"), "--arch", "resnet18_w4",
                              "--batch_size", "64", "--epochs", "1", "--results_dir", str(tmp_path / "clean"),
                              "--device", "cpu", "--quiet"])
    assert exit_info.value.code == 2
    assert f"16 images in {attack_inputs}/shadow.npz are fewer than one batch of 64" in capsys.readouterr().err
    assert not (tmp_path / "clean").exists()
