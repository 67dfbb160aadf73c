r"""z-score of one text-target CLIP encoder: do stamped images collapse onto one embedding? (docs/method.md)

    python validate/compute_zscore.py --encoder_path output/CLIP_text/stl10_backdoored_encoder/model_33.pth \
        --data data/imagenet --trigger_file trigger/trigger_pt_white_185_24.npz

Appends encoder_path:zscore to valid_cliptxt_zscore.txt and a row with both statistics (corrected and the
paper's legacy one) to valid_cliptxt_zscore.csv. The verdict uses the corrected statistic unless --legacy.
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# first: OpenMP reads OMP_WAIT_POLICY when torch is loaded (common/threads.py)
from common.threads import configure_threads  # noqa: E402
from decree.cli import OneLineParser, user_errors  # noqa: E402
from models import import_arch_modules  # noqa: E402
from validate.cli import add_zscore_args, print_result, zscore_job  # noqa: E402
from validate.zscore import run_zscore  # noqa: E402


def parse_args(argv=None):
    parser = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--encoder_path", required=True,
                        help="encoder checkpoint (.pth/.pt), any layout of docs/method.md")
    add_zscore_args(parser)
    parser.add_argument("--id", default="", help=argparse.SUPPRESS)  # the paper's log id; unused
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    with user_errors("compute_zscore.py"):
        configure_threads(args.threads)
        job = zscore_job(args)
        import_arch_modules(args.arch_module)
        [(path, result)] = run_zscore([args.encoder_path], job, progress=not args.quiet)
    print_result(path, result)
    print(f"appended to {Path(job.out_dir) / job.res_file} and {Path(job.out_dir) / job.csv_file}")


if __name__ == "__main__":
    main()
