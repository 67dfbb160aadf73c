"""One device helper for every script: --device auto|cpu|cuda|cuda:N, and the paper's --gpu N."""
import argparse

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
