"""Command-line pieces shared by the scripts: detection flags, and one-line errors for bad input."""
import argparse
import errno
import math
import sys
from contextlib import contextmanager
from pathlib import Path

from datasets import DataError
from models import FORMATS, USAGE_INFOS, CheckpointError

from common.device import DeviceError, add_device_args
from common.files import printable
from common.memory import is_out_of_memory, parse_size
from .inversion import SPEED_PRESETS, InversionError
from .target import TEMPLATE_SETS

# errors caused by the user's input: printed as one line, exit code 2, no traceback
USER_ERRORS = (CheckpointError, DataError, DeviceError, InversionError, PermissionError, FileNotFoundError,
               ValueError)


@contextmanager
def user_errors(prog: str):
    """Turn the project's input errors into `prog: error: <one line>` and exit status 2."""
    try:
        yield
    except USER_ERRORS as err:
        print(f"{prog}: error: {printable(err)}", file=sys.stderr)
        sys.exit(2)
    except (MemoryError, RuntimeError) as err:
        if not is_out_of_memory(err):
            raise
        detail = str(err).split("\n", 1)[0][:160] or type(err).__name__
        print(f"{prog}: error: out of memory ({printable(detail)}); an input (checkpoint, config or data) needs "
              "more memory than this process may use: check it, lower --batch_size, or give the run more memory "
              "(main.py, run_decree.py: --max_memory)", file=sys.stderr)
        sys.exit(2)
    except OSError as err:
        if err.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EROFS):
            raise
        where = f" writing {err.filename}" if err.filename else ""
        print(f"{prog}: error: {err.strerror or err}{where}; nothing half-written was kept: free space or "
              "choose another output folder", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted; finished results are kept, this run left no partial output", file=sys.stderr)
        sys.exit(130)


class OneLineParser(argparse.ArgumentParser):
    """argparse with the project's error style: `prog: error: <one line naming the flag>`, exit status 2."""

    def error(self, message):
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        sys.exit(2)


def _number(kind, text: str, what: str):
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not {what} (NaN/inf are not)")
    return value


def at_least(low: int):
    """argparse type: an integer >= low."""
    def parse(text: str) -> int:
        value = _number(int, text, f"an integer >= {low}")
        if value < low:
            raise argparse.ArgumentTypeError(f"{value} is too small; give an integer >= {low}")
        return value
    parse.__name__ = f"integer >= {low}"
    return parse


def in_range(low: float, high: float, low_open: bool = True, high_open: bool = False):
    """argparse type: a finite float in the interval (low, high] (ends open or closed as asked)."""
    interval = f"{'(' if low_open else '['}{low:g},{high:g}{')' if high_open else ']'}"

    def parse(text: str) -> float:
        value = _number(float, text, f"a number in {interval}")
        if value < low or value > high or (low_open and value == low) or (high_open and value == high):
            raise argparse.ArgumentTypeError(f"{value:g} is outside {interval}")
        return value
    parse.__name__ = f"number in {interval}"
    return parse


positive = in_range(0.0, math.inf, high_open=True)
finite = in_range(-math.inf, math.inf, low_open=True, high_open=True)
fraction = in_range(0.0, 1.0)  # (0,1]


def output_file(text: str) -> str:
    """argparse type: a file to write or append to; an existing folder there is refused before any work."""
    if Path(text).is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a folder; give a file path")
    return text


def run_id(text: str) -> str:
    """argparse type: a run id names files inside --out_dir, so it may not climb out of it or hide."""
    if not text or "/" in text or "\\" in text or ".." in text or text.startswith(("-", ".")) or "\0" in text:
        raise argparse.ArgumentTypeError(f"{text!r} is not a plain file name; use letters, digits, '_', '-', '.' "
                                         "(no path separators, no '..', not starting with '-' or '.')")
    return text


def add_encoder_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--encoder_usage_info", default=None, choices=USAGE_INFOS,
                        help="fixes architecture family, input size, normalisation and default shadow data; "
                             "open_clip, hf_clip, timm: encoders from model hubs, input size and normalisation "
                             "from the model's config (docs/formats.md). Default: the family a hub folder's config "
                             "names, else cifar10")
    parser.add_argument("--arch", default=None,
                        help="resnet18/34/50 (cifar10/stl10; narrow resnet18_wN too), RN50 or ViT-B/32 (CLIP; "
                             "the paper's sweep passes resnet50 for CLIP, read as RN50), mobilenet_v2 or mobilenet_v2_<px> "
                             "(torchvision's MobileNetV2 at px = 32, 64, ..., 192), an open_clip or timm model "
                             "name; default: inferred from the checkpoint or its config")
    parser.add_argument("--encoder_format", default="auto", choices=FORMATS,
                        help="how to read --encoder_path: auto (from the file/folder, docs/formats.md), torch "
                             "(torch.load, weights only) or safetensors")
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
                       help="paper: the paper's settings (default), drawn and rounded as the paper's code "
                            "draws and rounds them (see --seed); "
                            "exact: paper with --stop_at_verdict, the paper's verdict on every encoder, sooner; "
                            "fast: the paper's run with cheaper encoder calls (--fold_batchnorm --channels_last: "
                            "the same math, float32 rounding differs; our own draws); triage: fast with "
                            "--stop_at_verdict (the "
                            "quickest). Near the threshold rounding decides the paper's own verdict, so fast/triage "
                            "can differ there: 28 of the latest 30 benchmark encoders agreed. Flags given "
                            "explicitly override it. See docs/speed.md")
    group.add_argument("--stop_at_verdict", action="store_true",
                       help="exact early exit: stop once the best PL1 is below --pl1_threshold (the best PL1 "
                            "only falls, so the TROJANED verdict is final; the reported PL1 is then an upper "
                            "bound). Clean encoders run to the usual early stop")
    group.add_argument("--min_progress", type=in_range(0, 1, low_open=False, high_open=True), default=None,
                       metavar="F",
                       help="also end the run (a 'slow progress' stop) once, for more than the early-stop patience, "
                            "the best PL1 has not fallen by more than F times its distance to --pl1_threshold: at "
                            "that pace it would need over patience/F steps to get there. Cuts clean encoders' runs "
                            "short; their PL1 is then an upper bound, and a backdoor found late is missed (default 0: "
                            "the paper's rule; in no preset, see docs/speed.md)")
    group.add_argument("--restarts", type=at_least(1), default=None,
                       help="K independent inversions from different initial triggers and batch orders, run "
                            "together in one K*batch encoder batch; the smallest PL1 wins and the JSON lists all "
                            "K (default 1 = the paper's single run). Under --preset paper/exact restart 0 takes the "
                            "paper's draws for --seed (hub and custom encoders: our own generator, see --seed), the "
                            "others draws of their own; the larger encoder batch can "
                            "round differently, so only K = 1 is the paper's run bit for bit")
    group.add_argument("--batch_size", type=at_least(2), default=None,
                       help="shadow images per step, >= 2: the loss compares pairs (default 32)")
    group.add_argument("--lr", type=positive, default=None,
                       help="Adam lr on the trigger (default %(default)s; the paper's experiments: 0.5, "
                            "its main.py: 1e-3)")
    group.add_argument("--seed", type=int, default=80,
                       help="seeds python, numpy and torch, and the shadow sample (default %(default)s). Under "
                            "--preset paper/exact the initial trigger and every epoch's batch order are the ones the "
                            "paper's main.py draws for this seed (after building the encoder it builds); hub "
                            "encoders (open_clip, hf_clip, timm), custom archs and CLIP ViT-B/32, which its main.py "
                            "cannot build, draw from our own generator seeded with it, as fast/triage do")
    group.add_argument("--mask_init", default="rand", choices=("rand", "orc"),
                       help="initial mask (default %(default)s)")
    group.add_argument("--thres", type=in_range(0, 1, high_open=True), default=0.99,
                       help="|cos| in (0,1) that counts as success (default 0.99)")
    group.add_argument("--epochs", type=at_least(1), default=1000, help="maximum epochs (default 1000)")
    group.add_argument("--pl1_threshold", type=fraction, default=0.1,
                       help="flag the encoder when PL1-norm = L1/(H*W*3) is below this (default 0.1)")
    group.add_argument("--shadow_data", default=None,
                       help="npz (x uint8 (N,H,W,3)) or image folder, used whole (a folder of more than "
                            "10,000 images: a seeded 10,000). Default per usage info, with the paper's rule: "
                            "data/cifar10/test.npz or data/stl10/test.npz: the first 10%% of each class; "
                            "data/imagenet: 20%% drawn by Python's random.sample with --seed")
    group.add_argument("--shadow_size", type=at_least(2), default=None,
                       help="use this many shadow images instead, >= 2 (Python's random.sample with --seed)")
    group.add_argument("--shadow_fraction", type=fraction, default=None,
                       help="use int(fraction * N) shadow images instead, fraction in (0,1] (Python's random.sample "
                            "with --seed)")
    group.add_argument("--shadow_cache", default=None, metavar="DIR|off",
                       help="image-folder shadow sets are decoded once and kept here, keyed by folder contents, "
                            "selection, size and seed, so a sweep decodes them once (default <out_dir>/shadow_cache; "
                            "off: no cache)")
    group.add_argument("--float32", action="store_true", help="float32 trigger parameters (paper: float64)")
    group.add_argument("--amp", action="store_true",
                       help="bf16 autocast of the encoder on CUDA and on CPUs with avx512_bf16/amx_bf16 (ignored "
                            "on other CPUs, where it is slower; the JSON records amp_used). Not in any preset: on "
                            "the benchmark populations it made runs end much sooner or later than the paper's and "
                            "moved a per-family AUROC (docs/speed.md)")
    group.add_argument("--channels_last", action="store_true",
                       help="channels_last inputs and weights (faster convolutions on CPUs and most GPUs)")
    group.add_argument("--fold_batchnorm", action="store_true",
                       help="fold each eval-mode batch norm into the convolution before it (the same function in "
                            "fewer operations; encoders torch.fx cannot trace are used as they are)")
    group.add_argument("--save_snapshots", action="store_true",
                       help="also save the best trigger of every improving epoch, as the paper's code did")


def add_memory_arg(parser: argparse.ArgumentParser, sweep: bool = False) -> None:
    """--max_memory: the address-space limit of a run (Linux RLIMIT_AS; CPU only, CUDA reserves more than it uses)."""
    default = ("default for CPU workers: the machine's memory divided among them" if sweep
               else "default: no limit")
    parser.add_argument("--max_memory", type=parse_size, default=None, metavar="SIZE",
                        help=f"cap each run's memory (address space) on the CPU, e.g. 16G, so that a file that still "
                             f"manages to allocate more costs its own run (a one-line out-of-memory error), not the "
                             f"machine; 0: no limit ({default})")


def add_target_args(parser: argparse.ArgumentParser, reference: bool = True) -> None:
    """Flags of the target recovery (docs/target.md); `reference`: also the per-encoder truth flags."""
    group = parser.add_argument_group("the attack's target (recovered for every run: trigger_norm/<run_id>.target.pt)")
    if reference:
        group.add_argument("--reference_file", default=None, metavar="NPZ",
                           help="the attack's reference inputs (x uint8 (K,H,W,3)): report cos(recovered, their "
                                "embedding)")
        group.add_argument("--reference_text", default=None, metavar="TEXT",
                           help='the attack\'s target caption, e.g. "a photo of a truck." (needs a CLIP text tower): '
                                "report cos(recovered, its text embedding)")
    group.add_argument("--text_tower", default=None, metavar="FILE",
                       help="full CLIP checkpoint (e.g. OpenAI's RN50.pt) whose text tower names the target when the "
                            "encoder's own file is a visual tower only")
    group.add_argument("--target_vocab", default=None, metavar="TXT",
                       help="names to rank against the target, one per line (default: the 1,000 ImageNet classes)")
    group.add_argument("--target_templates", default="auto", choices=TEMPLATE_SETS,
                       help="prompt templates: paper = CLIP's 80 ImageNet templates, simple = 7, one = 'a photo of "
                            "a {name}.'; auto (default) = paper on CUDA, one on the CPU (80x fewer text-tower passes: "
                            "docs/target.md). Name embeddings are cached per text tower")
    group.add_argument("--no_target_names", action="store_true",
                       help="skip naming the target (zero-shot ranking of the vocabulary) for CLIP encoders")


def target_kwargs(args) -> dict:
    """The DetectionJob fields that add_target_args defines (the reference ones only where present)."""
    names = ("reference_file", "reference_text", "text_tower", "target_vocab", "target_templates", "no_target_names")
    return {k: getattr(args, k) for k in names if hasattr(args, k)}


def inversion_kwargs(args) -> dict:
    """The DetectionJob fields that add_encoder_args/add_inversion_args define."""
    return {k: getattr(args, k) for k in (
        "encoder_usage_info", "arch", "trust_checkpoint", "clip_normalization", "device", "gpu", "batch_size",
        "encoder_format", "lr", "seed", "mask_init", "thres", "epochs", "pl1_threshold", "shadow_data", "shadow_size",
        "shadow_fraction", "float32", "amp", "channels_last", "fold_batchnorm", "save_snapshots", "preset",
        "stop_at_verdict", "min_progress", "restarts", "shadow_cache")}
