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
from .inversion import InversionError
from .settings import Flag, InversionConfig, settings_flags
from .target import TEMPLATE_SETS
from .warp_test import WarpTestConfig

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


def interval(text: str):
    """argparse type of an interval written as in the settings, e.g. "(0,1]" or "(0,inf)"."""
    low, high = (float(end) for end in text[1:-1].split(","))
    return in_range(low, high, low_open=text[0] == "(", high_open=text[-1] == ")")


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


# the flags, besides the settings', that a detection job takes from add_encoder_args and add_inversion_args
ENCODER_FLAGS = ("encoder_usage_info", "arch", "encoder_format", "trust_checkpoint", "clip_normalization", "device",
                 "gpu")
SHADOW_FLAGS = ("shadow_data", "shadow_size", "shadow_fraction", "shadow_cache", "save_snapshots")


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
    """DECREE's settings as flags (decree/settings.py), and the shadow set's; switches left unset take the preset."""
    group = parser.add_argument_group("trigger inversion (defaults: main.py's, adapted per usage info)")
    defaults = vars(InversionConfig())
    for name, setting in settings_flags().items():
        add_setting_flag(group, setting, defaults[name])
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
    group.add_argument("--save_snapshots", action="store_true",
                       help="also save the best trigger of every improving epoch, as the paper's code did")


def setting_type(setting: Flag, default):
    """argparse type of a settings flag that takes a value: its minimum or interval, else its default's type."""
    if setting.minimum is not None:
        return at_least(setting.minimum)
    if setting.interval:
        return interval(setting.interval)
    return None if setting.choices else type(default)


def add_setting_flag(group, setting: Flag, default) -> None:
    """One settings field's flag. A switch is None unless given, so that a preset's own value stands."""
    if setting.switch is not None:
        group.add_argument(f"--{setting.name}", action="store_true", default=None, help=setting.help)
        return
    group.add_argument(f"--{setting.name}", type=setting_type(setting, default), default=default,
                       choices=setting.choices or None, metavar=setting.metavar, help=setting.help)


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


# the warp test's value flags: flag name -> WarpTestConfig field
WARP_FLAGS = {"warp_threshold": "threshold", "warp_budget": "budget", "warp_steps": "steps"}


def add_warp_test_args(parser: argparse.ArgumentParser) -> None:
    """--warp_test and its settings (decree/warp_test.py, docs/warp_test.md); the settings default to None, so a
    sweep passes on only those given."""
    defaults = WarpTestConfig()
    group = parser.add_argument_group("second test: the warp test, beside DECREE (docs/warp_test.md)")
    group.add_argument("--warp_test", action="store_true",
                       help="also run the warp test: the smooth image warp of bounded size that brings the shadow "
                            "embeddings closest together (WaNet's trigger space, which DECREE's mask cannot "
                            "express); the JSON gets its gain and verdict and a combined verdict (TROJANED when "
                            "either test flags). DECREE's own numbers do not change")
    group.add_argument("--warp_threshold", type=interval("(0,1)"), default=None, metavar="G",
                       help=f"flag when the warp's gain is above G (default {defaults.threshold}: set from clean "
                            "encoders, docs/warp_test.md; recalibrate on clean encoders of your own kind)")
    group.add_argument("--warp_budget", type=interval("(0,1]"), default=None, metavar="F",
                       help=f"largest control displacement, a fraction of the image side (default {defaults.budget})")
    group.add_argument("--warp_steps", type=at_least(1), default=None,
                       help=f"optimisation steps of the warp (default {defaults.steps})")


def warp_test_kwargs(args) -> dict:
    """The DetectionJob field add_warp_test_args defines: None without --warp_test, else the settings given.
    ValueError when a warp setting is given without --warp_test."""
    given = {field: getattr(args, name) for name, field in WARP_FLAGS.items() if getattr(args, name) is not None}
    if not args.warp_test:
        if given:
            names = ", ".join(f"--{name}" for name, field in WARP_FLAGS.items() if field in given)
            raise ValueError(f"{names} only apply with --warp_test: add --warp_test, or leave them out")
        return {"warp_test": None}
    return {"warp_test": given}


def warp_test_flags(args) -> dict:
    """The warp test's flags by name, as a sweep passes them on to main.py."""
    return {name: getattr(args, name) for name in ("warp_test", *WARP_FLAGS)}


def target_kwargs(args) -> dict:
    """The DetectionJob fields that add_target_args defines (the reference ones only where present)."""
    names = ("reference_file", "reference_text", "text_tower", "target_vocab", "target_templates", "no_target_names")
    return {k: getattr(args, k) for k in names if hasattr(args, k)}


def inversion_flags(args) -> dict:
    """The values of the flags add_encoder_args/add_inversion_args define, by flag name (a sweep passes them on)."""
    names = (*ENCODER_FLAGS, *SHADOW_FLAGS, *(setting.name for setting in settings_flags().values()))
    return {name: getattr(args, name) for name in names}


def settings_from_flags(args) -> dict:
    """InversionConfig overrides from add_inversion_args's flags: a given switch sets its field's value."""
    overrides = {}
    for name, setting in settings_flags().items():
        value = getattr(args, setting.name)
        if value is not None:
            overrides[name] = setting.switch if setting.switch is not None else value
    return overrides


def inversion_kwargs(args) -> dict:
    """The DetectionJob fields that add_encoder_args/add_inversion_args define."""
    return {**{name: getattr(args, name) for name in (*ENCODER_FLAGS, *SHADOW_FLAGS)},
            "settings": settings_from_flags(args)}
