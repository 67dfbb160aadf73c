r"""Pick the reference inputs of an image-target attack from a labelled npz (docs/method.md).

    python scripts/make_reference.py --dataset data/stl10/train.npz --label 9 --out reference/cifar10/truck.npz
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere: the repo root holds the packages

from datasets import pick_reference, save_reference  # noqa: E402
from decree.cli import user_errors  # noqa: E402


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", required=True, help="npz with x uint8 (N,H,W,3) and labels y")
    parser.add_argument("--label", type=int, required=True, help="target class (truck 9, priority sign 12, one 1)")
    parser.add_argument("--count", type=int, default=1, help="reference images to draw (default 1)")
    parser.add_argument("--seed", type=int, default=0, help="default 0")
    parser.add_argument("--out", required=True, help="reference npz to write")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    with user_errors("make_reference.py"):
        x, y = pick_reference(args.dataset, args.label, args.count, args.seed)
        save_reference(args.out, x, y, info=[f"{args.dataset} label {args.label} seed {args.seed}"])
    print(f"{args.out}: {len(x)} image(s) of class {args.label}")


if __name__ == "__main__":
    main()
