"""decree/settings.py is the one source of the inversion's settings: main.py, run_decree.py and DetectionJob
all take their defaults and flags from InversionConfig."""
import re
from dataclasses import fields

import pytest

import main
import run_decree
from decree.cli import settings_from_flags
from decree.detect import DetectionJob
from decree.settings import PAPER_MAIN_DEFAULTS, InversionConfig, preset, settings_flags


def test_main_py_run_decree_py_and_a_job_default_to_the_dataclass():
    ours = preset("cifar10")
    assert preset("cifar10", **settings_from_flags(main.parse_args(["--encoder_path", "x.pth"]))) == ours
    assert preset("cifar10", **settings_from_flags(run_decree.parse_args(["--encoders", "x.pth"]))) == ours
    assert DetectionJob("x.pth", encoder_usage_info="cifar10").inversion_config() == ours
    assert (ours.lr, ours.batch_size, ours.seed, ours.mask_init) == (0.5, 32, 80, "rand")


def test_paper_main_defaults_change_only_what_they_name():
    args = main.parse_args(["--encoder_path", "x.pth", "--paper_main_defaults"])
    cfg = preset("cifar10", **settings_from_flags(args))
    assert cfg == preset("cifar10", **PAPER_MAIN_DEFAULTS)


def test_the_papers_flag_names_set_their_fields():
    args = main.parse_args(["--encoder_path", "x.pth", "--epochs", "7", "--preset", "fast", "--float32"])
    cfg = preset("cifar10", **settings_from_flags(args))
    assert (cfg.max_epochs, cfg.speed_preset, cfg.param_dtype) == (7, "fast", "float32")
    assert {flag.name for flag in settings_flags().values()} >= {"lr", "batch_size", "seed", "mask_init", "thres",
                                                                 "epochs", "pl1_threshold", "preset"}


def test_a_switch_left_unset_keeps_the_presets_value():
    args = main.parse_args(["--encoder_path", "x.pth", "--preset", "triage"])
    cfg = preset("cifar10", **settings_from_flags(args))
    assert cfg.stop_at_verdict and cfg.fold_batchnorm and cfg.channels_last


def test_flag_values_are_checked_as_the_fields_allow(capsys):
    for argv in (["--batch_size", "1"], ["--lr", "0"], ["--thres", "1"], ["--min_progress", "1"], ["--mask_init", "x"]):
        with pytest.raises(SystemExit):
            main.parse_args(["--encoder_path", "x.pth", *argv])
        assert argv[0] in capsys.readouterr().err


def test_an_unknown_setting_names_every_field():
    every_field = ", ".join(f.name for f in fields(InversionConfig))
    with pytest.raises(TypeError, match=f"unknown setting.*lrate.*{re.escape(every_field)}"):
        preset("cifar10", lrate=0.5)
