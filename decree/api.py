"""DECREE from Python: `scan` one encoder as main.py does and get its verdict (README.md, "Python").

    from decree import scan
    result = scan("encoders/demo_backdoored_encoder/model_12.pth", usage_info="cifar10")
    print(result.verdict, result.pl1)

A checkpoint runs main.py's own detection (decree/detect.py) with main.py's defaults (decree/settings.py) and
main.py's torch settings (CPU threads, cuDNN determinism), so the verdict and PL1 are main.py's on the same file,
bit for bit. An nn.Module in memory runs the same inversion on a copy of it. Relative paths, the usage info's
default shadow data (data/<usage_info>/...) included, are relative to the working directory, as for main.py.
"""
import copy
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial

import numpy as np
import torch

from common.determinism import configure_determinism
from common.threads import configure_threads
from models import DEFAULT_USAGE_INFO, HUB_FAMILIES, EncoderSpec, encoder_spec

from .detect import (Detection, DetectionJob, EncoderUnderTest, job_shadow_set, load_under_test, print_line,
                     run_detection)
from .repo_modules import repo_modules
from .settings import check_setting_names
from .target import TargetSetup, resolve_templates

IN_MEMORY = {"encoder_realpath": None, "encoder_sha256": None}  # the record's file identity of an nn.Module


@dataclass(frozen=True)
class ScanResult:
    """main.py's answer for one encoder, and the trigger it inverted."""
    verdict: str                # "TROJANED" or "CLEAN", as main.py prints it
    trojaned: bool
    pl1: float | None           # PL1-norm = L1 / (H*W*3) of the smallest trigger; None when none was found
    l1: float | None
    pl1_threshold: float        # TROJANED when pl1 < pl1_threshold
    mask: np.ndarray | None     # float32 (H,W) in [0,1]; None when no trigger was found
    pattern: np.ndarray | None  # float32 (H,W,3) in [0,255]
    target: str | None          # the name main.py ranks first for the trigger's target (encoders with a CLIP text
                                # tower), else None
    notes: list                 # what the verdict does not say, as main.py prints after it
    epochs: int
    seconds: float              # the inversion's
    record: dict                # everything main.py writes to trigger_norm/<run_id>.json
    warp_gain: float | None     # the warp test's statistic (scan(..., warp_test=True)), else None
    warp_flagged: bool | None
    combined_verdict: str       # "TROJANED" when DECREE or the warp test flags; DECREE's verdict without the test

    @classmethod
    def of(cls, detection: Detection) -> "ScanResult":
        record, result = detection.record, detection.result
        names = (record["target"] or {}).get("names")
        warp = record.get("warp_test")  # records written before the warp test existed have no such key
        return cls(verdict=record["verdict"].upper(), trojaned=result.trojaned, pl1=record["pl1"],
                   l1=record["l1"], pl1_threshold=record["pl1_threshold"], mask=result.mask,
                   pattern=result.pattern, target=names[0]["name"] if names else None, notes=record["notes"],
                   epochs=record["epochs"], seconds=record["seconds"], record=record,
                   warp_gain=warp["gain"] if warp else None, warp_flagged=warp["flagged"] if warp else None,
                   combined_verdict=record.get("combined_verdict", record["verdict"]).upper())


def scan(encoder, images=None, *, usage_info: str | None = None, arch: str | None = None, mean=None, std=None,
         device: str = "auto", preset: str = "paper", out_dir=None, progress: bool = False,
         warp_test: bool | dict = False, **settings) -> ScanResult:
    """DECREE on one encoder, with main.py's defaults; prints nothing unless `progress`.

    encoder: a checkpoint file or hub folder, loaded as main.py loads it (usage_info, arch: its
    --encoder_usage_info and --arch), or an nn.Module (left as it is: a copy runs); a module needs `images` and
    mean/std, or a usage_info whose shadow set and normalisation main.py would use. images: uint8 (N,H,W,3), the
    shadow set instead of the usage info's. preset: main.py's --preset. settings: fields of
    decree.settings.InversionConfig (lr=..., seed=..., max_epochs=...). out_dir: where main.py's three output
    folders are written; None writes nothing that outlives the call. warp_test: also run the warp test
    (main.py --warp_test; docs/warp_test.md), True with its defaults or a dict of decree.warp_test.WarpTestConfig
    fields; DECREE's numbers are the same either way.
    """
    check_setting_names(settings)
    module = encoder if isinstance(encoder, torch.nn.Module) else None
    if module is not None:
        check_module_inputs(images, usage_info, mean, std)
    elif mean is not None or std is not None:
        raise ValueError("mean/std go with an nn.Module; a checkpoint is normalised as main.py normalises it")
    with repo_modules(), main_py_runtime(), output_folder(out_dir) as folder:
        job = DetectionJob(encoder_path=str(encoder) if module is None else f"<{type(module).__name__}>",
                           encoder_usage_info=usage_info or (DEFAULT_USAGE_INFO if module is not None else None),
                           arch=arch, device=device, out_dir=folder, settings={"speed_preset": preset, **settings},
                           warp_test=({} if warp_test is True else dict(warp_test)) if warp_test else None)
        load = (partial(load_under_test, images=images) if module is None
                else partial(module_under_test, module, images, mean, std))
        return ScanResult.of(run_detection(job, progress, print_line if progress else ignore_line, load))


def ignore_line(line: str) -> None:
    """The log of a scan without progress."""


def check_module_inputs(images, usage_info: str | None, mean, std) -> None:
    """ValueError unless an nn.Module comes with what main.py would know of a checkpoint: its images and
    normalisation, or a usage info that implies them."""
    if (mean is None) != (std is None):
        raise ValueError("give mean and std together")
    if mean is None and (usage_info is None or usage_info in HUB_FAMILIES):
        raise ValueError("an nn.Module needs mean and std (its input normalisation), or a usage_info of the "
                         "paper's (cifar10, stl10, imagenet, CLIP, moco) that implies them")
    if images is None and usage_info is None:
        raise ValueError("an nn.Module needs images (uint8 (N,H,W,3)), or a usage_info whose shadow set to use")


def module_spec(usage_info: str, arch: str | None, mean, std, images) -> EncoderSpec:
    """What an nn.Module expects: main.py's input size and normalisation for usage_info and arch, unless mean/std
    are given, and unless images are given without an arch, whose size it then takes. Without an arch the module
    is none main.py could build, so the inversion draws from its own generator (decree/paper_draws.py)."""
    known = None if usage_info in HUB_FAMILIES else encoder_spec(usage_info, arch)
    size = np.shape(images)[1] if images is not None and (arch is None or known is None) else known.input_size
    mean, std = (mean, std) if mean is not None else (known.mean, known.std)
    embed_dim = known.embed_dim if arch else 0  # unknown, and DECREE does not need it
    return EncoderSpec(usage_info, arch, int(size), tuple(mean), tuple(std), embed_dim)


def module_under_test(module: torch.nn.Module, images, mean, std, job: DetectionJob, device, progress: bool,
                      log) -> EncoderUnderTest:
    """A copy of `module` on the device, what it expects (module_spec) and its shadow set (job_shadow_set)."""
    spec = module_spec(job.encoder_usage_info, job.arch, mean, std, images)
    shadow_set, cache_used = job_shadow_set(job, spec.input_size, progress, images)
    log(shadow_set.describe())
    target_setup = TargetSetup(templates=resolve_templates(job.target_templates, device))  # no text tower to name it
    return EncoderUnderTest(copy.deepcopy(module).to(device), spec, shadow_set, target_setup, IN_MEMORY, cache_used)


@contextmanager
def main_py_runtime():
    """torch's CPU threads and cuDNN determinism as main.py sets them by default; the caller's come back after."""
    threads = torch.get_num_threads()
    cudnn = torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark
    configure_threads(log=None)
    configure_determinism()
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = cudnn


@contextmanager
def output_folder(out_dir):
    """out_dir, or (None) a temporary folder that is removed afterwards."""
    if out_dir is not None:
        yield str(out_dir)
        return
    with tempfile.TemporaryDirectory(prefix="decree-scan-") as folder:
        yield folder
