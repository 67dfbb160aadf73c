r"""Write the paper's white-square trigger files (docs/method.md), and optionally more white squares.

    python scripts/make_triggers.py                          # trigger/trigger_pt_white_*.npz of the paper
    python scripts/make_triggers.py --square 32 2 8          # also trigger/trigger_pt_white_2_8.npz (32 px)
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere: the repo root holds the packages

from datasets import save_trigger, white_square_trigger, write_paper_triggers  # noqa: E402
from decree.cli import user_errors  # noqa: E402


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out_dir", default="trigger", help="default trigger/")
    parser.add_argument("--square", nargs=3, type=int, action="append", default=[], metavar=("SIZE", "TOP", "SIDE"),
                        help="also a white SIDE px square at (TOP, TOP) of a SIZE px image (repeatable)")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    with user_errors("make_triggers.py"):
        paths = write_paper_triggers(args.out_dir)
        for size, top, side in args.square:
            pattern, keep = white_square_trigger(size, top, side)
            path = Path(args.out_dir) / f"trigger_pt_white_{top}_{side}.npz"
            save_trigger(path, pattern, keep, info=[f"white square {side}px at ({top},{top}) of {size}px"])
            paths.append(path)
    print("\n".join(str(p) for p in paths))


if __name__ == "__main__":
    main()
