"""Command-line pieces shared by the scripts: detection flags, and one-line errors for bad input."""
import argparse
import sys
from contextlib import contextmanager

from datasets import DataError
from models import USAGE_INFOS, CheckpointError

from common.device import DeviceError, add_device_args
from .inversion import SPEED_PRESETS, InversionError

# errors caused by the user's input: printed as one line, exit code 2, no traceback
USER_ERRORS = (CheckpointError, DataError, DeviceError, InversionError, PermissionError, FileNotFoundError,
               ValueError)


@contextmanager
def user_errors(prog: str):
    """Turn the project's input errors into `prog: error: <one line>` and exit status 2."""
    try:
        yield
    except USER_ERRORS as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted; finished results are kept, this run left no partial output", file=sys.stderr)
        sys.exit(130)


def add_encoder_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--encoder_usage_info", default="cifar10", choices=USAGE_INFOS,
                        help="fixes architecture family, input size, normalisation and default shadow data")
    parser.add_argument("--arch", default=None,
                        help="resnet18/34/50 (cifar10/stl10; narrow resnet18_wN too), RN50 or ViT-B/32 (CLIP); "
                             "default per usage info")
    parser.add_argument("--arch_module", action="append", default=[], metavar="MODULE",
                        help="import MODULE first; it may call models.register_arch to add your own --arch "
                             "(repeatable; also read from $DECREE_ARCH_MODULES)")
    parser.add_argument("--trust_checkpoint", action="store_true",
                        help="allow checkpoints that need full unpickling: this can RUN CODE hidden in the file; "
                             "only for files from a source you trust")
    parser.add_argument("--clip_normalization", action="store_true",
                        help="normalise CLIP inputs with CLIP's own constants (the paper used ImageNet's)")
    add_device_args(parser)


def add_inversion_args(parser: argparse.ArgumentParser) -> None:
    """DECREE hyper-parameters; unset ones take the paper's per-usage-info preset."""
    group = parser.add_argument_group("trigger inversion (defaults: the paper's, per usage info)")
    group.add_argument("--preset", default="paper", choices=tuple(SPEED_PRESETS),
                       help="paper: the paper's settings (default); fast: float32 trigger, channels_last, bf16 "
                            "autocast where the hardware has it (same verdicts as paper on the populations of docs/speed.md); "
                            "triage: fast + --stop_at_verdict (for sweeps). Flags given explicitly override it. "
                            "See docs/speed.md")
    group.add_argument("--stop_at_verdict", action="store_true",
                       help="exact early exit: stop once the best PL1 is below --pl1_threshold (the best PL1 "
                            "only falls, so the TROJANED verdict is final; the reported PL1 is then an upper "
                            "bound). Clean encoders run to the usual early stop")
    group.add_argument("--restarts", type=int, default=None,
                       help="K independent inversions from different initial triggers and batch orders, run "
                            "together in one K*batch encoder batch; the smallest PL1 wins and the JSON lists all "
                            "K (default 1 = the paper's single run)")
    group.add_argument("--batch_size", type=int, default=None, help="shadow images per step (default 32)")
    group.add_argument("--lr", type=float, default=None, help="Adam lr on the trigger (main.py: 1e-3; sweeps: 0.5)")
    group.add_argument("--seed", type=int, default=80, help="seeds python, numpy and torch (default 80)")
    group.add_argument("--mask_init", default="rand", choices=("rand", "orc"), help="initial mask (default rand)")
    group.add_argument("--thres", type=float, default=0.99, help="|cos| that counts as success (default 0.99)")
    group.add_argument("--epochs", type=int, default=1000, help="maximum epochs (default 1000)")
    group.add_argument("--pl1_threshold", type=float, default=0.1,
                       help="flag the encoder when PL1-norm = L1/(H*W*3) is below this (default 0.1)")
    group.add_argument("--shadow_data", default=None,
                       help="npz (x uint8 (N,H,W,3)) or image folder; default data/cifar10/test.npz (10%% of "
                            "each class), data/stl10/test.npz (800), data/imagenet (20%%) per usage info")
    group.add_argument("--shadow_size", type=int, default=None, help="use this many shadow images (seeded)")
    group.add_argument("--shadow_fraction", type=float, default=None, help="use this fraction (seeded)")
    group.add_argument("--shadow_cache", default=None, metavar="DIR|off",
                       help="image-folder shadow sets are decoded once and kept here, keyed by folder contents, "
                            "selection, size and seed, so a sweep decodes them once (default <out_dir>/shadow_cache; "
                            "off: no cache)")
    group.add_argument("--float32", action="store_true", help="float32 trigger parameters (paper: float64)")
    group.add_argument("--amp", action="store_true",
                       help="bf16 autocast of the encoder on CUDA and on CPUs with avx512_bf16/amx_bf16 (ignored "
                            "on other CPUs, where it is slower; the JSON records amp_used)")
    group.add_argument("--channels_last", action="store_true", help="channels_last inputs (faster on some GPUs)")
    group.add_argument("--save_snapshots", action="store_true",
                       help="also save the best trigger of every improving epoch, as the paper's code did")


def inversion_kwargs(args) -> dict:
    """The DetectionJob fields that add_encoder_args/add_inversion_args define."""
    return {k: getattr(args, k) for k in (
        "encoder_usage_info", "arch", "trust_checkpoint", "clip_normalization", "device", "gpu", "batch_size",
        "lr", "seed", "mask_init", "thres", "epochs", "pl1_threshold", "shadow_data", "shadow_size",
        "shadow_fraction", "float32", "amp", "channels_last", "save_snapshots", "preset", "stop_at_verdict",
        "restarts", "shadow_cache")}
