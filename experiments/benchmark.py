"""Time to verdict: the project's inversion against the paper's data path, on the same encoder and data.

For each encoder and batch size, every contender (the paper's path and the project's variants) runs on
the same encoder, the same shadow images and the same seed:
- step: `steps` epochs over exactly one batch of shadow images (one full step per epoch); the time of a
  step is the median over the epochs after the first (the first pays one-off costs);
- epochs: `epochs` epochs over the whole shadow set; its wall time, and the L1 the trigger reached.
Contenders take turns (round robin, reversed every other repeat) so drifting machine load hits all of
them alike; medians over repeats are reported. Early stop is off so every run does the same work.
Ratios are paper time / contender time (above 1: faster than the paper), for wall time and for this
process's CPU time: on a shared CPU the wall time also counts other programs' load, the CPU time much less
(on CUDA the CPU time is the host's, waits included, so the wall ratios are the ones that count there).
A contender reaches "the same L1" when its last-epoch L1 and its best L1 match the paper's within `rtol`.

How close to the hardware: the convolution/matmul FLOPs of one step (encoder forward + input-gradient backward,
counted by torch's FlopCounterMode) over its median time, beside the machine's peak (machine_peak, with its
derivation). Restart cost: the step time of K stacked restarts against K single steps.
"""
import copy
import math
import os
import platform
import statistics
import time
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path

import numpy as np
import torch

from common.device import cpu_flags, cpu_supports_bf16, describe_machine
from datasets.photos import photo_patches
from models import encoder_spec, get_encoder
from decree.inversion import invert_trigger
from decree.settings import preset
from .paper_path import paper_invert_trigger

# name -> (usage info, arch): "tiny" is a width-8 ResNet18-CIFAR, where the data path weighs the most
ENCODERS = {"tiny": ("cifar10", "resnet18_w8"), "resnet18": ("cifar10", "resnet18"), "clip_rn50": ("CLIP", "RN50")}
# a variant is "project" or "+"-joined options of the project's inversion
OPTIONS = ("float32", "channels_last", "fold_batchnorm", "amp", "compile", "cudagraphs")
CUDA_ONLY = ("amp", "cudagraphs")  # autocast is CUDA-only in invert_trigger; CUDA graphs need CUDA
COMPILED = ("compile", "cudagraphs")
NO_EARLY_STOP = 10 ** 9


def default_variants(device: torch.device) -> list[str]:
    if device.type == "cuda":
        return ["project", "float32", "channels_last", "amp", "amp+channels_last+float32", "compile",
                "amp+channels_last+float32+cudagraphs"]
    return ["project", "float32", "channels_last", "fold_batchnorm+channels_last"]


def parse_variant(name: str, device: torch.device) -> frozenset:
    """'project' -> no option; 'amp+float32' -> {'amp', 'float32'}; unknown or unavailable options fail."""
    if name == "project":
        return frozenset()
    options = frozenset(name.split("+"))
    unknown = sorted(options - set(OPTIONS))
    if unknown:
        raise ValueError(f"variant {name!r}: unknown option(s) {', '.join(unknown)}; "
                         f"use project or +-joined {', '.join(OPTIONS)}")
    if device.type != "cuda" and options & set(CUDA_ONLY):
        raise ValueError(f"variant {name!r} needs --device cuda ({', '.join(CUDA_ONLY)} are CUDA-only)")
    return options


def make_shadow(n: int, size: int, data: str, seed: int) -> np.ndarray:
    """uint8 (n,size,size,3): crops of real photos (as the paper's shadow sets are photos) or uniform noise."""
    if data == "photos":
        return photo_patches(n, size, seed=seed)
    if data == "random":
        return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)
    raise ValueError(f"--data must be photos or random, not {data!r}")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class Contender:
    name: str
    invert: object                 # invert_trigger-like callable
    encoder: torch.nn.Module
    paper_encoder: tuple           # (usage info, arch): whose draws the paper's main.py takes
    options: frozenset = frozenset()
    warmup_s: float = 0.0
    error: str | None = None
    step_s: list = field(default_factory=list)     # per repeat: median wall seconds of one step
    step_cpu_s: list = field(default_factory=list)  # the same in process CPU seconds
    epochs_s: list = field(default_factory=list)   # per repeat: wall seconds of the fixed epochs
    epochs_cpu_s: list = field(default_factory=list)
    l1: float = math.nan                           # after the fixed epochs: last epoch's mean mask L1
    best_l1: float = math.nan                      # smallest successful L1 (inf: none reached thres)

    def config(self, base):
        return replace(base, param_dtype="float32" if "float32" in self.options else base.param_dtype,
                       amp="amp" in self.options, channels_last="channels_last" in self.options,
                       fold_batchnorm="fold_batchnorm" in self.options)


def make_contenders(encoder: torch.nn.Module, variants: list[str], device: torch.device,
                    paper_encoder: tuple) -> list[Contender]:
    """The paper's path and one project contender per variant; a variant that changes the module (channels_last
    weights, compilation) gets its own copy, so the others keep the plain one."""
    contenders = [Contender("paper", paper_invert_trigger, encoder, paper_encoder)]
    for name in variants:
        options = parse_variant(name, device)
        model = encoder
        if options & {"channels_last", *COMPILED}:  # invert_trigger converts channels_last weights in place
            model = copy.deepcopy(encoder)
        if options & set(COMPILED):
            model = torch.compile(model, mode="reduce-overhead" if "cudagraphs" in options else None)
        contenders.append(Contender(name, partial(invert_trigger, progress=False), model, paper_encoder, options))
    return contenders


def clocks() -> np.ndarray:
    return np.array([time.perf_counter(), time.process_time()])


def timed_run(contender: Contender, shadow: np.ndarray, mean, std, cfg, device):
    """([wall, cpu] seconds of the call, (epochs, 2) seconds per epoch, result).

    Epoch ends are synced on CUDA: every step reads its loss to the host before the next epoch starts."""
    ends = []
    sync(device)
    start = clocks()
    result = contender.invert(contender.encoder, shadow, mean, std, contender.config(cfg), device=device,
                              on_epoch=lambda record, best: ends.append(clocks()),
                              paper_encoder=contender.paper_encoder)
    sync(device)
    return clocks() - start, np.diff(np.stack([start] + ends), axis=0), result


def bench_case(encoder_name: str, batch_size: int, variants: list[str], device: torch.device, shadow_size: int = 50,
               steps: int = 4, epochs: int = 3, repeats: int = 5, data: str = "photos", seed: int = 80,
               lr: float = 0.5, rtol: float = 1e-6, log=print) -> dict:
    """Benchmark one (encoder, batch size); returns the JSON record of the case."""
    if steps < 2 or epochs < 1 or repeats < 1:
        raise ValueError("--steps must be >= 2 (the first is not timed), --epochs and --repeats >= 1")
    usage_info, arch = ENCODERS[encoder_name]
    spec = encoder_spec(usage_info, arch)
    torch.manual_seed(seed)  # the same random weights for every run of the benchmark
    encoder = get_encoder(usage_info, arch).to(device).eval()
    shadow = make_shadow(max(shadow_size, batch_size), spec.input_size, data, seed)
    step_shadow, epoch_shadow = shadow[:batch_size], shadow[:shadow_size]
    base = preset(usage_info, lr=lr, batch_size=batch_size, seed=seed, early_stop_patience=NO_EARLY_STOP)
    contenders = make_contenders(encoder, variants, device, (usage_info, arch))

    for c in contenders:  # warm-up, untimed: lazy initialisation, cudnn plans, compilation for both shapes
        start = time.perf_counter()
        try:
            for images in (step_shadow, epoch_shadow):
                timed_run(c, images, spec.mean, spec.std, replace(base, max_epochs=1), device)
        except Exception as err:  # torch.compile can fail for want of a compiler; other errors are bugs
            if not c.options & set(COMPILED):
                raise
            c.error = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
            log(f"  {encoder_name} b{batch_size} {c.name}: skipped ({c.error})")
        c.warmup_s = time.perf_counter() - start
    live = [c for c in contenders if c.error is None]

    for r in range(repeats):
        for c in live if r % 2 == 0 else live[::-1]:
            _, per_epoch, _ = timed_run(c, step_shadow, spec.mean, spec.std, replace(base, max_epochs=steps), device)
            step_wall, step_cpu = np.median(per_epoch[1:], axis=0)
            c.step_s.append(float(step_wall))
            c.step_cpu_s.append(float(step_cpu))
            (wall, cpu), _, result = timed_run(c, epoch_shadow, spec.mean, spec.std,
                                               replace(base, max_epochs=epochs), device)
            c.epochs_s.append(float(wall))
            c.epochs_cpu_s.append(float(cpu))
            c.l1, c.best_l1 = result.history[-1]["l1"], result.l1
        log(f"  {encoder_name} b{batch_size}: repeat {r + 1}/{repeats} done")

    paper = contenders[0]
    flops = step_flops(encoder, min(batch_size, len(step_shadow)), spec.input_size, device)
    rows = [contender_record(c, paper, rtol, flops) for c in contenders]
    return {"encoder": encoder_name, "usage_info": usage_info, "arch": arch, "input_size": spec.input_size,
            "batch_size": batch_size, "step_flops": flops, "shadow_size": shadow_size, "effective_epoch_batch": min(batch_size, shadow_size),
            "steps": steps, "epochs": epochs, "repeats": repeats, "contenders": rows}


def close(a: float, b: float, rtol: float) -> bool:
    return math.isclose(a, b, rel_tol=rtol, abs_tol=0.0)  # inf == inf: neither reached the threshold


def contender_record(c: Contender, paper: Contender, rtol: float, flops: int) -> dict:
    record = {"name": c.name, "options": sorted(c.options), "warmup_s": c.warmup_s, "error": c.error}
    if c.error is not None:
        return record
    median = {key: statistics.median(getattr(c, key)) for key in ("step_s", "step_cpu_s", "epochs_s", "epochs_cpu_s")}
    ratio = {key: statistics.median(getattr(paper, key)) / median[key] for key in median}
    l1_diff = 0.0 if c.l1 == paper.l1 else abs(c.l1 - paper.l1)
    best_diff = 0.0 if c.best_l1 == paper.best_l1 else abs(c.best_l1 - paper.best_l1)
    record.update(
        step_s=c.step_s, step_median_s=median["step_s"], step_ratio=ratio["step_s"],
        step_cpu_s=c.step_cpu_s, step_cpu_median_s=median["step_cpu_s"], step_cpu_ratio=ratio["step_cpu_s"],
        epochs_s=c.epochs_s, epochs_median_s=median["epochs_s"], epochs_ratio=ratio["epochs_s"],
        epochs_cpu_s=c.epochs_cpu_s, epochs_cpu_median_s=median["epochs_cpu_s"],
        epochs_cpu_ratio=ratio["epochs_cpu_s"], achieved_flops=flops / median["step_s"],
        l1=c.l1, best_l1=c.best_l1 if math.isfinite(c.best_l1) else None,
        l1_abs_diff=l1_diff, best_l1_abs_diff=best_diff if math.isfinite(best_diff) else None,
        same_l1=close(c.l1, paper.l1, rtol) and close(c.best_l1, paper.best_l1, rtol))
    return record


def step_flops(encoder: torch.nn.Module, batch_size: int, input_size: int, device: torch.device) -> int:
    """Conv/matmul FLOPs of one inversion step's encoder work: forward + backward to the input (weights frozen)."""
    from torch.utils.flop_counter import FlopCounterMode
    encoder.eval().requires_grad_(False)
    x = torch.zeros(batch_size, 3, input_size, input_size, device=device, requires_grad=True)
    with FlopCounterMode(display=False) as counter:
        encoder(x).float().sum().backward()
    return int(counter.get_total_flops())


def _cpu_ghz() -> tuple[float, str]:
    """Highest clock the kernel reports: cpufreq's maximum if present, else /proc/cpuinfo's current MHz."""
    max_freq = Path("/sys/devices/system/cpu/cpu0/cpufreq/cpuinfo_max_freq")
    if max_freq.is_file():
        return int(max_freq.read_text()) / 1e6, "cpufreq cpuinfo_max_freq"
    try:
        mhz = [float(line.split(":")[1]) for line in Path("/proc/cpuinfo").read_text().splitlines()
               if line.startswith("cpu MHz")]
    except OSError:
        mhz = []
    return (max(mhz) / 1e3, "/proc/cpuinfo 'cpu MHz' (current clock; turbo may be higher)") if mhz else (
        math.nan, "unknown")


# dense datasheet peaks (FLOP/s) of GPUs we ran on: float32 (CUDA cores), TF32 and bf16 tensor cores
GPU_PEAKS = {"H100": {"fp32": 67e12, "tf32": 494.7e12, "bf16": 989.4e12, "source": "NVIDIA H100 SXM datasheet"},
             "H200": {"fp32": 67e12, "tf32": 494.7e12, "bf16": 989.4e12, "source": "NVIDIA H200 SXM datasheet"},
             "A100": {"fp32": 19.5e12, "tf32": 156e12, "bf16": 312e12, "source": "NVIDIA A100 datasheet"}}


def machine_peak(device: torch.device, threads: int) -> dict:
    """Peak float32 FLOP/s of the cores this process uses (or the GPU's datasheet figures), with the derivation."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        peaks = next((v for k, v in GPU_PEAKS.items() if k in name), None)
        if peaks is None:
            return {"flops": math.nan, "derivation": f"{name}: no datasheet figure known"}
        tf32 = torch.backends.cudnn.allow_tf32  # float32 convolutions run on TF32 tensor cores by default
        return {"flops": peaks["tf32" if tf32 else "fp32"], "bf16_flops": peaks["bf16"],
                "derivation": f"{name}: {peaks['source']}, dense {'TF32 (cudnn.allow_tf32)' if tf32 else 'FP32'} "
                              f"{peaks['tf32' if tf32 else 'fp32'] / 1e12:.0f} TFLOP/s, bf16 "
                              f"{peaks['bf16'] / 1e12:.0f} TFLOP/s"}
    flags = cpu_flags()
    lanes = 16 if "avx512f" in flags else 8 if "avx2" in flags else 4  # float32 lanes of one vector FMA
    ghz, clock_source = _cpu_ghz()
    cores = min(threads, len(os.sched_getaffinity(0)))
    fma_units = 2  # two FMA pipes per core: AMD Zen 2-4 and Intel server cores since Skylake-SP Gold
    flops = cores * ghz * 1e9 * lanes * fma_units * 2
    return {"flops": flops, "bf16": cpu_supports_bf16(),
            "derivation": f"{cores} cores x {ghz:.2f} GHz ({clock_source}) x {lanes} float32 lanes "
                          f"({'AVX-512' if lanes == 16 else 'AVX2' if lanes == 8 else 'SSE'}) x {fma_units} FMA "
                          f"units (assumed) x 2 FLOP per FMA = {flops / 1e9:.0f} GFLOP/s"}


def bench_restarts(encoder_name: str, batch_size: int, ks: list[int], device: torch.device, variant: str = "project",
                   shadow_size: int = 64, steps: int = 4, repeats: int = 3, data: str = "photos", seed: int = 80,
                   lr: float = 0.5, log=print) -> dict:
    """Median step time of K restarts stacked in one encoder batch, against K times the single run's step."""
    usage_info, arch = ENCODERS[encoder_name]
    spec = encoder_spec(usage_info, arch)
    torch.manual_seed(seed)
    encoder = get_encoder(usage_info, arch).to(device).eval()
    options = parse_variant(variant, device)
    contender = make_contenders(encoder, [variant], device, (usage_info, arch))[1]
    shadow = make_shadow(batch_size, spec.input_size, data, seed)
    base = contender.config(preset(usage_info, lr=lr, batch_size=batch_size, seed=seed,
                                   early_stop_patience=NO_EARLY_STOP))
    step_s = {k: [] for k in ks}
    for k in ks:  # warm-up of every shape
        timed_run(contender, shadow, spec.mean, spec.std, replace(base, max_epochs=1, restarts=k), device)
    for r in range(repeats):
        for k in ks if r % 2 == 0 else ks[::-1]:
            _, per_epoch, _ = timed_run(contender, shadow, spec.mean, spec.std,
                                        replace(base, max_epochs=steps, restarts=k), device)
            step_s[k].append(float(np.median(per_epoch[1:, 0])))
        log(f"  {encoder_name} b{batch_size} restarts: repeat {r + 1}/{repeats} done")
    single = statistics.median(step_s[ks[0]]) / ks[0]
    rows = [{"restarts": k, "step_s": step_s[k], "step_median_s": statistics.median(step_s[k]),
             "vs_k_single_runs": statistics.median(step_s[k]) / (k * single)} for k in ks]
    return {"encoder": encoder_name, "batch_size": batch_size, "variant": variant, "options": sorted(options),
            "rows": rows}


def restarts_table(cases: list[dict]) -> str:
    """K stacked restarts: step time, and its ratio to K separate runs (below 1: stacking pays)."""
    head = f"{'encoder':<10} {'batch':>5} {'variant':<28} {'K':>3} {'step ms':>9} {'vs K runs':>9}"
    lines = [head, "-" * len(head)]
    for case in cases:
        for row in case["rows"]:
            lines.append(f"{case['encoder']:<10} {case['batch_size']:>5} {case['variant']:<28} {row['restarts']:>3} "
                         f"{1000 * row['step_median_s']:>9.2f} {row['vs_k_single_runs']:>9.2f}")
    return "\n".join(lines)


def machine_info(device: torch.device) -> dict:
    info = {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
            "torch": torch.__version__, "device": str(device), "machine": describe_machine(device)}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    return info


def table(cases: list[dict], peak_flops: float = math.nan) -> str:
    """Plain-text table, one line per contender and case; "x" = paper time / contender time (wall, CPU);
    GFLOP/s = the step's counted FLOPs / its median time, % peak against `peak_flops`."""
    head = (f"{'encoder':<10} {'batch':>5} {'contender':<36} {'step ms':>9} {'GFLOP/s':>8} {'%peak':>6} "
            f"{'x wall':>7} {'x cpu':>6} "
            f"{'epochs s':>9} {'x wall':>7} {'x cpu':>6} {'L1':>12} {'|dL1|':>9} same")
    lines = [head, "-" * len(head)]
    for case in cases:
        for row in case["contenders"]:
            prefix = f"{case['encoder']:<10} {case['batch_size']:>5} {row['name']:<36}"
            if row["error"] is not None:
                lines.append(f"{prefix} skipped: {row['error']}")
                continue
            lines.append(f"{prefix} {1000 * row['step_median_s']:>9.2f} {row['achieved_flops'] / 1e9:>8.1f} "
                         f"{100 * row['achieved_flops'] / peak_flops:>6.1f} {row['step_ratio']:>7.2f} "
                         f"{row['step_cpu_ratio']:>6.2f} {row['epochs_median_s']:>9.3f} {row['epochs_ratio']:>7.2f} "
                         f"{row['epochs_cpu_ratio']:>6.2f} {row['l1']:>12.6f} {row['l1_abs_diff']:>9.2e} "
                         f"{'yes' if row['same_l1'] else 'NO'}")
    return "\n".join(lines)


def run_benchmark(encoders: list[str], batch_sizes: list[int], variants: list[str], device: torch.device,
                  threads: int, log=print, **case_kwargs) -> dict:
    """Every (encoder, batch size) case in one process; returns the JSON document."""
    unknown = sorted(set(encoders) - set(ENCODERS))
    if unknown:
        raise ValueError(f"unknown encoder(s) {', '.join(unknown)}; choose from {', '.join(ENCODERS)}")
    for name in variants:
        parse_variant(name, device)  # fail before any timing, not after the first case
    torch.set_num_threads(threads)  # one setting for every contender: CPU timings depend on it
    cases = []
    for encoder_name in encoders:
        for batch_size in batch_sizes:
            log(f"benchmarking {encoder_name} at batch {batch_size} on {device}")
            cases.append(bench_case(encoder_name, batch_size, variants, device, log=log, **case_kwargs))
    return {"machine": {**machine_info(device), "peak": machine_peak(device, threads)}, "settings": {"threads": threads, "variants": variants, **case_kwargs},
            "cases": cases}
