"""One device helper for every script: --device auto|cpu|cuda|cuda:N, and the paper's --gpu N."""
import argparse
import os
import platform
from pathlib import Path

import torch

from .threads import add_thread_args


class DeviceError(ValueError):
    """A requested device that this machine does not have."""


def add_device_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="auto",
                        help="auto (CUDA if present, else CPU), cpu, cuda or cuda:N")
    parser.add_argument("--gpu", type=int, default=None,
                        help="the paper's flag: CUDA device index (same as --device cuda:N)")
    add_thread_args(parser)


def resolve_device(device: str = "auto", gpu: int | None = None) -> torch.device:
    """Turn --device/--gpu into a torch.device, failing with one clear line if it is not there."""
    if gpu is not None and device in ("auto", "cuda"):
        device = f"cuda:{gpu}"
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as err:
        raise DeviceError(f"--device {device!r} is not a device name; use auto, cpu, cuda or cuda:N") from err
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(f"--device {device} asked for CUDA but this machine has no CUDA device; "
                              "use --device cpu (or auto)")
        count = torch.cuda.device_count()
        if dev.index is not None and dev.index >= count:
            raise DeviceError(f"--device {device}: only {count} CUDA device(s) visible (0..{count - 1})")
    elif dev.type != "cpu":
        raise DeviceError(f"--device {device!r} is not supported; use auto, cpu, cuda or cuda:N")
    return dev


def cpu_flags(cpuinfo: str = "/proc/cpuinfo") -> set:
    """The instruction-set flags of the first CPU in /proc/cpuinfo (empty where there is none)."""
    return set(_cpuinfo_field(cpuinfo, "flags").split())


BF16_FLAGS = {"avx512_bf16", "amx_bf16"}


def cpu_supports_bf16(cpuinfo: str = "/proc/cpuinfo") -> bool:
    """True when the CPU has bf16 arithmetic (AVX512-BF16 or AMX), where bf16 autocast pays off."""
    return bool(BF16_FLAGS & cpu_flags(cpuinfo))


def describe_machine(device, cpuinfo: str = "/proc/cpuinfo") -> str:
    """The hardware a timing was taken on, e.g. 'AMD EPYC (AVX2), 2 cores': CPU models of one kind of cloud
    machine differ (AVX-512 or not) and moved our CPU timings threefold, so every reported time names one."""
    device = torch.device(device)
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (CUDA)"
    flags = cpu_flags(cpuinfo)
    # AMX (matrix tiles) or AVX512-BF16 vector instructions only: bf16 runs at different speeds on them
    bf16 = ", AMX bf16" if "amx_bf16" in flags else ", bf16" if BF16_FLAGS & flags else ""
    isa = "AVX-512" + bf16 if "avx512f" in flags else "AVX2" if "avx2" in flags else "no AVX2"
    model = _cpuinfo_field(cpuinfo, "model name") or platform.processor() or platform.machine()
    return f"{model} ({isa}), {len(os.sched_getaffinity(0))} cores"


def _cpuinfo_field(cpuinfo: str, name: str) -> str:
    try:
        text = Path(cpuinfo).read_text()
    except OSError:
        return ""
    return next((line.split(":", 1)[1].strip() for line in text.splitlines()
                 if line.split(":", 1)[0].strip() == name), "")
