r"""Build a population of encoders for a DECREE sweep: clean SimCLR encoders and BadEncoder-backdoored ones.

    python scripts/run_attack_encoder.py --dry_run                     # print the commands
    python scripts/run_attack_encoder.py --downstreams stl10 gtsrb --triggers 21:10 2:8 --attack_seeds 100 101

Runs scripts/make_triggers.py, scripts/make_reference.py, pretrain_encoder.py (one clean encoder per
--clean_seeds) and attack_encoder.py (downstreams x triggers x attack seeds) one after another, skipping
finished ones, into output/<usage>/clean_encoder/seed<s>/ and output/<usage>/<downstream>_backdoored_encoder/,
which run_decree.py reads. Attack files are named as the paper's sweep names them,
model_<epoch>_tg<top>_<side>_<seed>.pth, and --attack_epochs counts as the paper's attack_encoder.py: each
attack trains attack_epochs + save_last - 1 epochs and saves epochs attack_epochs.. (--save_last encoders).
"""
import argparse
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere: the repo root holds the packages

from attacks.sweep import SweepConfig, run_plan, sweep_plan  # noqa: E402
from decree.cli import user_errors  # noqa: E402


def _square(text: str):
    top, _, side = text.partition(":")
    return int(top), int(side)


def parse_args(argv=None):
    d = SweepConfig()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--encoder_usage_info", default=d.usage_info, choices=("cifar10", "stl10"))
    parser.add_argument("--arch", default=d.arch, help=f"default {d.arch}")
    parser.add_argument("--pretraining_dataset", default=d.pretraining_dataset,
                        help=f"pre-training and shadow data (default {d.pretraining_dataset})")
    parser.add_argument("--downstreams", nargs="+", default=list(d.downstreams),
                        help="stl10 (truck), gtsrb (priority sign), svhn (one), or name:label "
                             "(reference drawn from data/<name>/train.npz)")
    parser.add_argument("--triggers", nargs="+", type=_square, default=list(d.triggers), metavar="TOP:SIDE",
                        help="white squares of 32 px images (default 21:10, the paper's)")
    parser.add_argument("--clean_seeds", nargs="+", type=int, default=list(d.clean_seeds), help="default 0 1 2")
    parser.add_argument("--attack_seeds", nargs="+", type=int, default=list(d.attack_seeds), help="default 100")
    parser.add_argument("--clean_encoder", default=None,
                        help="attack this clean encoder instead of pre-training our own (no clean ones are made)")
    parser.add_argument("--pretrain_epochs", type=int, default=d.pretrain_epochs, help=f"default {d.pretrain_epochs}")
    parser.add_argument("--attack_epochs", type=int, default=d.attack_epochs,
                        help=f"first saved epoch of each attack (default {d.attack_epochs})")
    parser.add_argument("--save_last", type=int, default=d.save_last,
                        help=f"encoders saved per attack, one per epoch (default {d.save_last}, the paper's)")
    parser.add_argument("--shadow_fraction", type=float, default=d.shadow_fraction, help=f"default {d.shadow_fraction}")
    parser.add_argument("--batch_size", type=int, default=d.batch_size, help=f"attack batch size (default {d.batch_size})")
    parser.add_argument("--output", default=d.output, help=f"default {d.output}")
    parser.add_argument("--device", default=None, help="passed to every run (auto, cpu, cuda, cuda:N)")
    parser.add_argument("--dry_run", action="store_true", help="print the commands, run nothing")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    cfg = SweepConfig(usage_info=args.encoder_usage_info, arch=args.arch, pretraining_dataset=args.pretraining_dataset,
                      downstreams=tuple(args.downstreams), triggers=tuple(args.triggers),
                      clean_seeds=tuple(args.clean_seeds), attack_seeds=tuple(args.attack_seeds),
                      clean_encoder=args.clean_encoder, pretrain_epochs=args.pretrain_epochs,
                      attack_epochs=args.attack_epochs, save_last=args.save_last,
                      shadow_fraction=args.shadow_fraction, batch_size=args.batch_size, output=args.output,
                      device_args=("--device", args.device) if args.device else ())
    with user_errors("run_attack_encoder.py"):
        steps = sweep_plan(cfg)
        try:
            ran = run_plan(steps, args.dry_run)
        except subprocess.CalledProcessError as err:
            raise ValueError(f"a step failed (exit {err.returncode}); finished steps are kept, rerun to resume") from err
    if not args.dry_run:
        print(f"{ran} step(s) run, {len(steps) - ran} already done")


if __name__ == "__main__":
    main()
