"""One detection run: load the encoder and shadow set, invert the trigger, write the three output folders.

Shared by main.py (one encoder) and run_decree.py (sweeps), so both behave and write the same.
"""
import shutil
import time
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from pathlib import Path

import numpy as np
import torch

from datasets import ShadowSet, load_shadow_set, resize_center_crop
from datasets.shadow import shadow_path
from models import EncoderSpec, load_encoder, resolve_usage_info

from common import io as atomic
from common.device import resolve_device
from .inversion import NO_TRIGGER_L1, InversionError, InversionResult, invert_trigger, prepare_encoder
from .outputs import (RunPaths, append_result_line, check_output_folders, encoder_identity, run_id_for, write_run,
                      write_trigger_images)
from .settings import InversionConfig, preset
from .shadow_cache import load_image_folder_cached
from .stop_reasons import STOP_SLOW, STOP_VERDICT, stop_message
from .target import (TargetSetup, analyse_target, check_target_flags, prepare_target, ranking_score, shadow_spread,
                     verdict_notes)
from .warp_test import WarpTestConfig, combined_score, combined_verdict, run_warp_test, warp_line


@dataclass
class DetectionJob:
    """Everything one run needs; field names follow the CLI flags, the inversion's settings gathered in `settings`."""
    encoder_path: str
    encoder_usage_info: str | None = None  # None: the hub family the path names, else cifar10 (resolve_usage_info)
    arch: str | None = None
    model_config: str | None = None       # a config JSON for weights without one beside them (docs/formats.md)
    encoder_format: str = "auto"          # auto | torch | safetensors (docs/formats.md)
    shadow_data: str | None = None        # npz or image folder; default per usage info (docs/method.md)
    shadow_size: int | None = None
    shadow_fraction: float | None = None
    out_dir: str = "."
    run_id: str | None = None
    model_flag: str = ""
    result_file: str | None = None
    device: str = "auto"
    gpu: int | None = None
    trust_checkpoint: bool = False
    clip_normalization: bool = False
    save_snapshots: bool = False
    shadow_cache: str | None = None       # image-folder shadow sets: cache folder (default <out_dir>/shadow_cache)
    # InversionConfig fields to override (speed_preset included); the others take the usage info's preset
    settings: dict = field(default_factory=dict)
    # the attack's target (decree/target.py): truth to compare with, and naming for CLIP encoders
    reference_file: str | None = None
    reference_text: str | None = None
    text_tower: str | None = None
    target_vocab: str | None = None
    target_templates: str = "auto"
    no_target_names: bool = False
    # the warp test beside DECREE (decree/warp_test.py): None = not run, else WarpTestConfig fields to override
    warp_test: dict | None = None

    def warp_test_config(self) -> WarpTestConfig | None:
        return None if self.warp_test is None else WarpTestConfig(**self.warp_test)

    def inversion_config(self) -> InversionConfig:
        return preset(self.encoder_usage_info, **self.settings)

    def shadow_cache_dir(self) -> Path | None:
        if self.shadow_cache == "off":
            return None
        return Path(self.shadow_cache) if self.shadow_cache else Path(self.out_dir) / "shadow_cache"

    def paths(self) -> RunPaths:
        return RunPaths(Path(self.out_dir), self.run_id or run_id_for(self.encoder_path))


def _log_text(job: DetectionJob, meta: dict, result) -> str:
    lines = [f"DECREE trigger inversion of {job.encoder_path}", f"run id: {meta['run_id']}",
             f"usage info {meta['usage_info']}, arch {meta['arch']}, device {meta['device']}, "
             f"{meta['shadow_set']}", f"config: {meta['config']}", ""]
    for r in result.history:
        lines.append(f"e={r['epoch']} loss={r['loss']:.6f} cos={r['cos']:.6f} L1={r['l1']:.4f} "
                     f"lambda={r['lambda']:.3g} lr={r['lr']:g} best_L1={r['best_l1']:.4f} t={r['seconds']:.1f}s")
    lines += ["", stop_message(result, job.inversion_config()),
              f"L1 {result.l1:.4f}, {result.summary()}, {result.epochs} epochs, {result.seconds:.1f} s"]
    if meta["warp_test"]:
        lines.append(warp_line(meta))
    lines += [f"restart {r['restart']} (seed {r['seed']}): PL1 {r['pl1']}, {r['epochs']} epochs, {r['stop_reason']}"
              for r in result.restarts if len(result.restarts) > 1]
    return "\n".join(lines) + "\n"


def speed_record(result) -> dict:
    """JSON fields of the speed options: why the run stopped, whether PL1 is exact, every restart, amp, folding."""
    record = {"stop_reason": result.stop_reason, "pl1_upper_bound": result.pl1_upper_bound,
              "amp_used": result.amp_used, "batchnorms_folded": result.batchnorms_folded,
              "restarts": result.restarts}
    if result.stop_reason == STOP_VERDICT:
        record["pl1_note"] = ("--stop_at_verdict ended the run once the best PL1 fell below the threshold; the "
                              "best PL1 can only fall, so the verdict is final and the PL1 an upper bound")
    elif result.stop_reason == STOP_SLOW:
        record["pl1_note"] = ("--min_progress ended the run before the paper's early stop: the best PL1 was still "
                              "above the threshold and falling too slowly to reach it soon; a longer run could "
                              "only lower the PL1, so it is an upper bound and the verdict is not exact")
    return record


def print_line(line: str) -> None:
    """main.py's log: each line flushed at once, so that it lands in order among the progress bars on stderr."""
    print(line, flush=True)


@dataclass
class EncoderUnderTest:
    """What one run inspects: the encoder and what it expects, its shadow set, the target's truth and naming."""
    model: torch.nn.Module                 # on the run's device
    spec: EncoderSpec
    shadow_set: ShadowSet
    target_setup: TargetSetup
    identity: dict                         # encoder_identity of its files; None values for a module in memory
    shadow_cache: dict = field(default_factory=dict)  # the shadow cache file read or written, and its SHA-256


@dataclass
class Detection:
    """A finished run: its trigger_norm record and the inversion's result (the trigger in float, the history)."""
    record: dict
    result: InversionResult


def given_shadow_set(images, input_size: int) -> ShadowSet:
    """A shadow set of the caller's own images, uint8 (N,H,W,3), brought to the encoder's input size as files are."""
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"images must be uint8 (N,H,W,3), not {images.dtype} {images.shape}")
    return ShadowSet(resize_center_crop(images, input_size), "the images given", "all of them", len(images))


def job_shadow_set(job: DetectionJob, input_size: int, progress: bool, images=None) -> tuple[ShadowSet, dict]:
    """The job's shadow set at the encoder's input size, chosen as main.py chooses it, or `images` (uint8
    (N,H,W,3)) when given; and the shadow cache file it read or wrote, with its SHA-256 ({} when none)."""
    if images is not None:
        return given_shadow_set(images, input_size), {}
    cache_used = {}
    shadow_set = load_shadow_set(job.encoder_usage_info, input_size, job.shadow_data, job.shadow_size,
                                 job.shadow_fraction, seed=job.inversion_config().seed, progress=progress,
                                 read_folder=partial(load_image_folder_cached, job.shadow_cache_dir(), used=cache_used))
    return shadow_set, cache_used


def load_under_test(job: DetectionJob, device, progress: bool = True, log=print_line,
                    images=None) -> EncoderUnderTest:
    """The job's encoder file, loaded as main.py loads it, and its shadow set (job_shadow_set)."""
    if images is None:
        shadow_path(job.encoder_usage_info, job.shadow_data)  # before the encoder loads, which can take a minute
    identity = encoder_identity(job.encoder_path)  # before loading: the bytes a finished result stands for
    model, spec = load_encoder(job.encoder_path, job.encoder_usage_info, job.arch, device,
                               trust_checkpoint=job.trust_checkpoint, clip_normalization=job.clip_normalization,
                               encoder_format=job.encoder_format, model_config=job.model_config)
    if spec.arch_note:
        log(f"{job.encoder_path}: --arch {spec.arch} (inferred from the checkpoint: {spec.arch_note})")
    shadow_set, cache_used = job_shadow_set(job, spec.input_size, progress, images)
    log(shadow_set.describe())
    return EncoderUnderTest(model, spec, shadow_set, prepare_target(job, spec, device, log), identity, cache_used)


def run_detection(job: DetectionJob, progress: bool = True, log=print_line, load=load_under_test) -> Detection:
    """Run DECREE for one encoder and write its outputs. `log` takes the lines a run prints besides its progress
    bars; `load(job, device, progress, log)` gives the EncoderUnderTest (default: the job's encoder file)."""
    started = time.time()
    job = replace(job, encoder_usage_info=resolve_usage_info(job.encoder_path, job.encoder_usage_info,
                                                             job.model_config))
    device = resolve_device(job.device, job.gpu)
    paths = job.paths()
    atomic.check_writable(paths.out_dir)
    check_output_folders(paths.out_dir, paths.run_id, [job.shadow_cache_dir()] if job.shadow_cache_dir() else [])
    cfg = job.inversion_config()
    warp_cfg = job.warp_test_config()
    if warp_cfg is not None:
        warp_cfg.check()  # before the encoder loads
    check_target_flags(job, job.encoder_usage_info)  # before the encoder loads, which can take a minute
    under_test = load(job, device, progress, log)
    spec, shadow = under_test.spec, under_test.shadow_set.images

    def save_snapshot(record, best):
        if job.save_snapshots and best.improved_this_epoch:
            suffix = f"_e{record['epoch']}_reg{best.l1:.2f}"
            write_trigger_images(paths.trigger_dir / "snapshots", best.mask.float().cpu().numpy(),
                                 best.pattern.float().cpu().numpy(), suffix)

    try:
        prepared = prepare_encoder(under_test.model, cfg, progress)
        result = invert_trigger(prepared, shadow, spec.mean, spec.std, cfg, device=device, progress=progress,
                                on_epoch=save_snapshot, paper_encoder=(spec.usage_info, spec.arch))
    except BaseException as err:
        if job.save_snapshots:  # snapshots of a run that did not finish would be PNGs without a JSON
            shutil.rmtree(paths.trigger_dir / "snapshots", ignore_errors=True)
        if isinstance(err, InversionError):
            raise InversionError(f"{job.encoder_path}: {err}") from err
        raise
    target = analyse_target(under_test.target_setup, prepared.module, spec, shadow, result, device, paths.target,
                            progress=progress)
    spread = shadow_spread(prepared.module, shadow, spec.mean, spec.std, device)
    warp = None if warp_cfg is None else run_warp_test(prepared.module, shadow, spec.mean, spec.std, warp_cfg,
                                                       device, progress)
    score = ranking_score(result.pl1, result.pl1_threshold)
    meta = {"encoder_path": str(job.encoder_path), **under_test.identity, "usage_info": spec.usage_info,
            "arch": spec.arch, "arch_inferred_from": spec.arch_note or None,
            "input_size": spec.input_size, "normalization": {"mean": spec.mean, "std": spec.std},
            "device": str(device), "seed": cfg.seed, "shadow_images": int(len(shadow)),
            "shadow_data": under_test.shadow_set.source, "shadow_set": under_test.shadow_set.describe(),
            "shadow_cache": under_test.shadow_cache or None,
            "model_flag": job.model_flag, "config": asdict(cfg), "job": asdict(job), "run_id": paths.run_id,
            "score": score, "target": target, "shadow_spread": spread,
            "warp_test": warp.record() if warp else None,
            "combined_verdict": combined_verdict(result.trojaned, warp and warp.flagged),
            "combined_score": combined_score(score, warp and warp.score),
            "notes": verdict_notes(result.found, spread, cfg.thres),
            "wall_seconds": time.time() - started, **speed_record(result)}
    record = write_run(paths, result, meta, _log_text(job, meta, result))
    if job.result_file:
        append_result_line(job.result_file, job.encoder_path, job.model_flag,
                           result.l1 if result.found else NO_TRIGGER_L1, result.seconds)
    return Detection(record, result)
