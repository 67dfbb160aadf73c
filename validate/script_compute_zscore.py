r"""z-scores of every encoder (*.pth) in some folders, as the paper's validate/script_compute_zscore.py.

    python validate/script_compute_zscore.py output/CLIP_text/stl10_backdoored_encoder --data data/imagenet

Default folders: the paper's output/CLIP_text/{stl10,svhn,gtsrb}_backdoored_encoder. The images are loaded
once for all encoders. A checkpoint that cannot be loaded is reported and skipped (exit status 1 at the end).
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# first: OpenMP reads OMP_WAIT_POLICY when torch is loaded (common/threads.py)
from common.threads import configure_threads  # noqa: E402
from datasets import DataError  # noqa: E402
from decree.cli import OneLineParser, user_errors  # noqa: E402
from models import import_arch_modules  # noqa: E402
from validate.cli import add_zscore_args, print_result, zscore_job  # noqa: E402
from validate.zscore import PAPER_ENCODER_DIRS, find_encoders, run_zscore  # noqa: E402


def parse_args(argv=None):
    parser = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("encoder_dirs", nargs="*", help="folders of encoders (default: the paper's three)")
    add_zscore_args(parser)
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    with user_errors("script_compute_zscore.py"):
        configure_threads(args.threads)
        job = zscore_job(args)
        import_arch_modules(args.arch_module)
        encoders = find_encoders(args.encoder_dirs or PAPER_ENCODER_DIRS, skip_missing=not args.encoder_dirs)
        if not encoders:
            raise DataError(f"no *.pth encoders in {', '.join(args.encoder_dirs or PAPER_ENCODER_DIRS)}")
        print(f"{len(encoders)} encoder(s)")
        outcomes = run_zscore(encoders, job, progress=not args.quiet, keep_going=True, on_result=print_result)
    failed = [(path, err) for path, err in outcomes if isinstance(err, Exception)]
    for path, err in failed:
        print(f"script_compute_zscore.py: error: skipped {path}: {err}", file=sys.stderr)
    flagged = sum(1 for _, r in outcomes if not isinstance(r, Exception) and r.trojaned)
    print(f"{len(outcomes) - len(failed)} validated, {flagged} trojaned "
          f"({'legacy' if args.legacy else 'corrected'} statistic, threshold {args.threshold}); "
          f"results appended to {Path(job.out_dir) / job.res_file} and {Path(job.out_dir) / job.csv_file}")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
