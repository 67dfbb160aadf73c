"""A population of encoders for a detection sweep: clean ones (pre-trained with several seeds) and backdoored ones
(several targets x triggers x seeds), in the paper's folders, which run_decree.py reads (label: "clean" in path).

    output/<usage>/clean_encoder/seed<s>/model_<E>.pth
    output/<usage>/<downstream>_backdoored_encoder/model_<epoch>_tg<top>_<side>_<seed>.pth

The attacks' file names are the paper's sweep's, model_<epoch><save_id>_<seed>.pth: each attack trains
attack_epochs + save_last - 1 epochs and saves epochs attack_epochs..attack_epochs + save_last - 1.
"""
import os
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from datasets import PAPER_TRIGGERS

REPO = Path(__file__).resolve().parents[1]
# downstream task -> (reference name, target label) of BadEncoder's CIFAR10 experiments
PAPER_TARGETS = {"stl10": ("truck", 9), "gtsrb": ("priority", 12), "svhn": ("one", 1)}


@dataclass
class Step:
    """One command; it is skipped when all of `outputs` exist (a finished earlier run)."""
    argv: list
    outputs: list

    @property
    def done(self) -> bool:
        return all(Path(p).exists() for p in self.outputs)

    def command(self) -> str:
        return shlex.join(["python", *map(str, self.argv)])


@dataclass
class SweepConfig:
    usage_info: str = "cifar10"
    arch: str = "resnet18"
    pretraining_dataset: str = "data/cifar10/train.npz"
    downstreams: tuple = ("stl10", "gtsrb", "svhn")   # names of PAPER_TARGETS, or name:label
    triggers: tuple = ((21, 10),)                      # (top, side) white squares; (21, 10) is the paper's
    clean_seeds: tuple = (0, 1, 2)
    attack_seeds: tuple = (100,)
    clean_encoder: str | None = None                  # start every attack from this instead of our own
    pretrain_epochs: int = 1000
    attack_epochs: int = 200
    save_last: int = 20
    shadow_fraction: float = 0.2
    batch_size: int = 256
    output: str = "output"
    data_dir: str = "data"
    trigger_dir: str = "trigger"
    reference_dir: str = "reference"
    device_args: tuple = ()


def _target(downstream: str):
    name, _, label = downstream.partition(":")
    if label:
        return name, f"{name}_{label}", int(label)
    if name not in PAPER_TARGETS:
        raise ValueError(f"downstream {name!r}: give its target label as {name}:LABEL "
                         f"(known: {', '.join(PAPER_TARGETS)})")
    return (name, *PAPER_TARGETS[name])


def _trigger_name(top: int, side: int) -> str:
    paper = {(t, s): name for name, (size, t, s) in PAPER_TRIGGERS.items() if size == 32}
    return paper.get((top, side), f"trigger_pt_white_{top}_{side}")


def sweep_plan(cfg: SweepConfig) -> list[Step]:
    """Every command of the sweep, in order: triggers, references, clean encoders, attacks."""
    if cfg.usage_info not in ("cifar10", "stl10"):
        raise ValueError("the sweep pre-trains SimCLR encoders: --encoder_usage_info cifar10 or stl10")
    size = 32
    trig_dir, ref_dir = Path(cfg.trigger_dir), Path(cfg.reference_dir) / cfg.usage_info
    triggers = {_trigger_name(t, s): trig_dir / f"{_trigger_name(t, s)}.npz" for t, s in cfg.triggers}
    squares = [a for t, s in cfg.triggers if _trigger_name(t, s) not in PAPER_TRIGGERS
               for a in ("--square", size, t, s)]  # the paper's files are always written
    steps = [Step(["scripts/make_triggers.py", "--out_dir", trig_dir, *squares], list(triggers.values()))]
    targets = []
    for downstream in cfg.downstreams:
        name, ref_name, label = _target(downstream)
        reference = ref_dir / f"{ref_name}.npz"
        steps.append(Step(["scripts/make_reference.py", "--dataset", Path(cfg.data_dir) / name / "train.npz",
                           "--label", label, "--out", reference], [reference]))
        targets.append((name, reference))
    root = Path(cfg.output) / cfg.usage_info
    if cfg.clean_encoder:
        bases = [cfg.clean_encoder]
    else:
        bases = []
        for seed in cfg.clean_seeds:
            folder = root / "clean_encoder" / f"seed{seed}"
            bases.append(folder / f"model_{cfg.pretrain_epochs}.pth")
            steps.append(Step(["pretrain_encoder.py", "--pretraining_dataset", cfg.pretraining_dataset,
                               "--encoder_usage_info", cfg.usage_info, "--arch", cfg.arch,
                               "--epochs", cfg.pretrain_epochs, "--results_dir", folder, "--seed", seed,
                               *cfg.device_args], [bases[-1]]))
    runs = [(n, r, square, s) for n, r in targets for square in dict.fromkeys(cfg.triggers)
            for s in cfg.attack_seeds]
    last_epoch = cfg.attack_epochs + cfg.save_last - 1
    for k, (name, reference, (top, side), seed) in enumerate(runs):
        folder = root / f"{name}_backdoored_encoder"
        trigger_path = triggers[_trigger_name(top, side)]
        save_id = f"_tg{top}_{side}_{seed}"  # the paper's sweep: --save_id {save_id}_{seed}
        steps.append(Step(["attack_encoder.py", "--pretrained_encoder", bases[k % len(bases)],
                           "--shadow_dataset", cfg.pretraining_dataset, "--shadow_fraction", cfg.shadow_fraction,
                           "--reference_file", reference, "--trigger_file", trigger_path,
                           "--encoder_usage_info", cfg.usage_info, "--arch", cfg.arch,
                           "--epochs", cfg.attack_epochs, "--save_last", cfg.save_last,
                           "--batch_size", cfg.batch_size, "--results_dir", folder, "--save_id", save_id,
                           "--seed", seed, *cfg.device_args], [folder / f"model_{last_epoch}{save_id}.pth"]))
    return steps


def run_plan(steps: list[Step], dry_run: bool = False) -> int:
    """Print (dry run) or run the steps one after another, skipping finished ones; returns how many ran."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    ran = 0
    for step in steps:
        if step.done:
            print(f"# done: {step.command()}")
            continue
        print(step.command(), flush=True)
        if not dry_run:
            # scripts by absolute path, data paths relative to the caller's folder
            subprocess.run([sys.executable, str(REPO / step.argv[0]), *map(str, step.argv[1:])], env=env, check=True)
            ran += 1
    return ran
