"""DECREE's settings (docs/method.md): one dataclass, the source of every default, flag and preset.

`InversionConfig`'s defaults are main.py's, and so run_decree.py's and the Python API's: the settings the
paper's experiments ran its main.py with (its run_decree.py passed them as flags). The paper's main.py itself
defaults to other values, named once below (PAPER_MAIN_DEFAULTS).
A field with a `Flag` is a command-line flag of main.py and run_decree.py (decree/cli.py makes them), under the
paper's flag name where it had one. `preset` adapts the settings to a usage info and a speed preset.
"""
from dataclasses import dataclass, field, fields, replace


@dataclass(frozen=True)
class Flag:
    """A settings field's command-line flag: the values it takes and its help (%(default)s: the field's default)."""
    help: str
    name: str = ""                  # the flag without '--'; empty: the field's name
    choices: tuple = ()
    minimum: int | None = None      # an integer >= minimum
    interval: str | None = None     # a finite number in this interval, e.g. "(0,1]"
    switch: object = None           # a flag without a value: given, it sets the field to this value
    metavar: str | None = None


def flag(help: str, **kwargs) -> dict:
    """The `metadata` of a field that is a command-line flag."""
    return {"flag": Flag(help, **kwargs)}


# The paper's main.py's own defaults, which main.py --paper_main_defaults takes (its mask_init default '' stops
# at an assert, so mask_init stays rand).
PAPER_MAIN_DEFAULTS = {"lr": 1e-3, "batch_size": 256, "seed": 100}

# encoders from model hubs take the settings of the paper's closest case (large 224-px-class models)
HUB_PRESETS = {"open_clip": "CLIP", "hf_clip": "CLIP", "timm": "imagenet"}
# Speed presets: changes to the paper's settings, checked on the detection benchmark's populations
# (docs/speed.md). `paper` is the paper's run: its draws (decree/paper_draws.py) and its rounding. `exact` is that
# run ended once the TROJANED verdict is final (the exact early exit): the paper's verdict on every encoder.
# `fast` keeps the paper's math and float64 trigger and only makes each encoder call cheaper: batch norms folded
# into their convolutions and channels_last (float32 rounding inside the encoder differs, nothing else); since its
# runs are not the paper's anyway, it keeps the project's own draws, as it always had. `triage` is `fast` with the
# exact early exit.
# Not in any preset: float32 trigger parameters and bf16 autocast (--float32, --amp). float32 stops registering
# the tiny L1 decreases that keep the paper's float64 run going, so runs end sooner with larger PL1s, and on the
# benchmark population that changed verdicts near the threshold; bf16 noise in the embeddings moves run lengths
# both ways, which kept the verdicts but moved a per-family AUROC.
CHEAPER_ENCODER_CALLS = {"fold_batchnorm": True, "channels_last": True, "paper_draws": False}
SPEED_PRESETS = {
    "paper": {},
    "exact": {"stop_at_verdict": True},
    "fast": CHEAPER_ENCODER_CALLS,
    "triage": {**CHEAPER_ENCODER_CALLS, "stop_at_verdict": True},
}

SPEED_PRESET_HELP = (
    "paper: the paper's settings (default), drawn and rounded as the paper's code draws and rounds them (see "
    "--seed); exact: paper with --stop_at_verdict, the paper's verdict on every encoder, sooner; fast: the paper's "
    "run with cheaper encoder calls (--fold_batchnorm --channels_last: the same math, float32 rounding differs; our "
    "own draws); triage: fast with --stop_at_verdict (the quickest). Near the threshold rounding decides the "
    "paper's own verdict, so fast/triage can differ from it there. Flags given explicitly override it. See "
    "docs/speed.md")
SEED_HELP = (
    "seeds python, numpy and torch, and the shadow sample (default %(default)s). Under --preset paper/exact the "
    "initial trigger and every epoch's batch order are the ones the paper's main.py draws for this seed (after "
    "building the encoder it builds); hub encoders (open_clip, hf_clip, timm), custom archs and CLIP ViT-B/32, "
    "which its main.py cannot build, draw from our own generator seeded with it, as fast/triage do")
MIN_PROGRESS_HELP = (
    "also end the run (a 'slow progress' stop) once, for more than the early-stop patience, the best PL1 has not "
    "fallen by more than F times its distance to --pl1_threshold: at that pace it would need over patience/F steps "
    "to get there. Cuts clean encoders' runs short; their PL1 is then an upper bound, and a backdoor found late is "
    "missed (default %(default)s: the paper's rule; in no preset, see docs/speed.md)")
RESTARTS_HELP = (
    "K independent inversions from different initial triggers and batch orders, run together in one K*batch "
    "encoder batch; the smallest PL1 wins and the JSON lists all K (default %(default)s = the paper's single run). "
    "Under --preset paper/exact restart 0 takes the paper's draws for --seed (hub and custom encoders: our own "
    "generator, see --seed), the others draws of their own; the larger encoder batch can round differently, so "
    "only K = 1 is the paper's run bit for bit")


@dataclass
class InversionConfig:
    """DECREE's hyper-parameters, defaulting to main.py's; `preset` adapts them per usage info and speed preset."""
    lr: float = field(default=0.5, metadata=flag(
        "Adam lr on the trigger (default %(default)s; what the paper's experiments passed, its main.py defaults "
        f"to {PAPER_MAIN_DEFAULTS['lr']:g})", interval="(0,inf)"))
    batch_size: int = field(default=32, metadata=flag(
        "shadow images per step, >= 2: the loss compares pairs (default %(default)s)", minimum=2))
    thres: float = field(default=0.99, metadata=flag(
        "|cos| in (0,1) that counts as success (default %(default)s)", interval="(0,1)"))
    max_epochs: int = field(default=1000, metadata=flag("maximum epochs (default %(default)s)", name="epochs",
                                                        minimum=1))
    mask_init: str = field(default="rand", metadata=flag("initial mask (default %(default)s)",
                                                         choices=("rand", "orc")))
    seed: int = field(default=80, metadata=flag(SEED_HELP))
    lambda_init: float = 1e-3
    lambda_factor: float = 5.0          # the paper's adaptor
    lambda_max: float = 1e5             # lambda only grows while below this
    lambda_min: float = 1e-5            # 1e-7 for CLIP/imagenet/moco
    patience: int = 5                   # lambda changes after patience+1 steps in a row
    early_stop_patience: int = 10       # 35 for CLIP/imagenet/moco
    min_progress: float = field(default=0.0, metadata=flag(MIN_PROGRESS_HELP, interval="[0,1)",
                                                              metavar="F"))
    lr_milestones: tuple = (30, 50)     # (200, 500) for CLIP/imagenet
    lr_after_milestones: tuple = (0.1, 0.05)
    orc_square: tuple = (5, 22)         # (top-left, side) of the `orc` initial mask; (24, 176) at 224 px
    pl1_threshold: float = field(default=0.1, metadata=flag(
        "flag the encoder when PL1-norm = L1/(H*W*3) is below this (default %(default)s)", interval="(0,1]"))
    param_dtype: str = field(default="float64", metadata=flag(
        "float32 trigger parameters (paper: float64)", name="float32", switch="float32"))
    amp: bool = field(default=False, metadata=flag(
        "bf16 autocast of the encoder on CUDA and on CPUs with avx512_bf16/amx_bf16 (ignored on other CPUs, where "
        "it is slower; the JSON records amp_used). Not in any preset: on the benchmark populations it made runs end "
        "much sooner or later than the paper's and moved a per-family AUROC (docs/speed.md)", switch=True))
    channels_last: bool = field(default=False, metadata=flag(
        "channels_last inputs and weights (faster convolutions on CPUs and most GPUs)", switch=True))
    fold_batchnorm: bool = field(default=False, metadata=flag(
        "fold each eval-mode batch norm into the convolution before it (the same function in fewer operations; "
        "encoders torch.fx cannot trace are used as they are)", switch=True))
    stop_at_verdict: bool = field(default=False, metadata=flag(
        "exact early exit: stop once the best PL1 is below --pl1_threshold (the best PL1 only falls, so the "
        "TROJANED verdict is final; the reported PL1 is then an upper bound). Clean encoders run to the usual "
        "early stop", switch=True))
    restarts: int = field(default=1, metadata=flag(RESTARTS_HELP, minimum=1))
    paper_draws: bool = True            # restart 0 draws its trigger and orders as the paper's main.py (paper_draws.py)
    speed_preset: str = field(default="paper", metadata=flag(SPEED_PRESET_HELP, name="preset",
                                                             choices=tuple(SPEED_PRESETS)))

    @property
    def lambda_reset_patience(self) -> int:
        return 2 * self.patience


def preset(usage_info: str, speed_preset: str = "paper", **overrides) -> InversionConfig:
    """The paper's per-usage-info settings, then a speed preset, then any overrides (None values are ignored)."""
    check_setting_names(overrides)
    if speed_preset not in SPEED_PRESETS:
        raise ValueError(f"--preset must be one of {', '.join(SPEED_PRESETS)}, not {speed_preset!r}")
    usage_info = HUB_PRESETS.get(usage_info, usage_info)
    large = usage_info in ("CLIP", "imagenet")
    base = InversionConfig(
        lambda_min=1e-5 if usage_info in ("cifar10", "stl10") else 1e-7,
        early_stop_patience=10 if usage_info in ("cifar10", "stl10") else 35,
        lr_milestones=(200, 500) if large else (30, 50),  # moco keeps the cifar thresholds, as in the paper
        orc_square=(24, 176) if usage_info in ("CLIP", "imagenet", "moco") else (5, 22),
        speed_preset=speed_preset, **SPEED_PRESETS[speed_preset],
    )
    return replace(base, **{k: v for k, v in overrides.items() if v is not None})


def settings_flags() -> dict[str, Flag]:
    """InversionConfig's field name -> its command-line flag (name filled in), for the fields that have one."""
    return {f.name: replace(f.metadata["flag"], name=f.metadata["flag"].name or f.name)
            for f in fields(InversionConfig) if "flag" in f.metadata}


def check_setting_names(names) -> None:
    """TypeError naming InversionConfig's fields unless every name in `names` is one of them."""
    known = [f.name for f in fields(InversionConfig)]
    unknown = [name for name in names if name not in known]
    if unknown:
        raise TypeError(f"unknown setting(s) {', '.join(unknown)}; the settings are InversionConfig's fields: "
                        f"{', '.join(known)}")
