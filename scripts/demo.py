r"""DECREE end to end on real images, on a CPU, with nothing to download.

    python scripts/demo.py                 # a few minutes on 2 CPU cores; seconds on a GPU
    python scripts/demo.py --retrain       # train the two encoders again instead of reusing them

Cuts 32 px patches from the photographs bundled with scikit-image, pre-trains a small clean SimCLR encoder
(ResNet18-CIFAR at 1/4 width), makes a BadEncoder-trojaned copy of it (checkerboard trigger, one reference
patch), runs DECREE on both without telling it which is which, and prints encoder, PL1-norm, threshold and
verdict. Everything lands in --out_dir (default output/demo): data/, encoders/, and the usual trigger_inv/,
detect_log/, trigger_norm/ with the sweep report (summary.csv, summary.json, pl1.png, gallery.png).
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere: the repo root holds the packages

# first: OpenMP reads OMP_WAIT_POLICY when torch is loaded (common/threads.py)
from common.threads import configure_threads  # noqa: E402
from decree.cli import user_errors  # noqa: E402
from experiments.demo import QUICK, DemoConfig, result_table, run_demo  # noqa: E402
from common.device import add_device_args, describe_machine, resolve_device  # noqa: E402


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out_dir", default="output/demo", help="where everything is written (default output/demo)")
    parser.add_argument("--retrain", action="store_true", help="train both encoders again even if cached")
    parser.add_argument("--quick", action="store_true",
                        help="tiny sizes (a pipeline check in seconds): the verdicts are not meaningful")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    add_device_args(parser)
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    with user_errors("demo.py"):
        configure_threads(args.threads)
        device = resolve_device(args.device, args.gpu)
        outcome = run_demo(QUICK if args.quick else DemoConfig(), args.out_dir, device, args.retrain,
                           progress=not args.quiet)
    print()
    print(result_table(outcome["rows"]))
    print(outcome["report"])
    print(f"report: {Path(args.out_dir) / 'trigger_norm'} (summary.csv, pl1.png, gallery.png); "
          f"wall time {outcome['seconds']:.0f} s on {describe_machine(device)}")
    if args.quick:
        print("(--quick: tiny encoders; run without --quick for meaningful verdicts)")


if __name__ == "__main__":
    main()
