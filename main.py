r"""DECREE trigger inversion for one encoder: is it backdoored?

    python main.py --encoder_path output/cifar10/stl10_backdoored_encoder/model_200.pth \
        --encoder_usage_info cifar10 --device cpu

Writes trigger_inv/<run_id>/, detect_log/<run_id>.log|.csv and trigger_norm/<run_id>.json under --out_dir.
"""
import argparse

from decree.cli import add_encoder_args, add_inversion_args, inversion_kwargs, user_errors
from decree.detect import DetectionJob, run_detection
from models import import_arch_modules


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--encoder_path", required=True,
                        help="encoder checkpoint (.pth/.pt/.safetensors, any SPEC layout) or a hub folder "
                             "(open_clip, Hugging Face, timm: docs/formats.md)")
    add_encoder_args(parser)
    add_inversion_args(parser)
    parser.set_defaults(lr=1e-3)
    parser.add_argument("--out_dir", default=".", help="root of the three output folders (default .)")
    parser.add_argument("--id", default=None, help="run id (default: derived from --encoder_path)")
    parser.add_argument("--model_flag", default="", help="free label written to --result_file (e.g. clean)")
    parser.add_argument("--result_file", default=None,
                        help="append the paper's CSV line encoder_path,model_flag,L1,seconds here")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    job = DetectionJob(encoder_path=args.encoder_path, out_dir=args.out_dir, run_id=args.id,
                       model_flag=args.model_flag, result_file=args.result_file, **inversion_kwargs(args))
    with user_errors("main.py"):
        import_arch_modules(args.arch_module)
        record = run_detection(job, progress=not args.quiet)
    print(f"results: {job.paths().json}")
    pl1 = "no trigger found" if record["pl1"] is None else f"PL1-norm {record['pl1']:.4f}"
    print(f"{record['encoder_path']}: {record['verdict'].upper()} ({pl1}, L1/(H*W*3) with "
          f"{record['pl1_divisor']}; threshold {record['pl1_threshold']})")


if __name__ == "__main__":
    main()
