"""Flags shared by the z-score scripts (compute_zscore.py, script_compute_zscore.py)."""
import argparse
from pathlib import Path

from decree.cli import add_encoder_args, at_least, finite

from .zscore import PAPER_DATA, PAPER_TRIGGER, THRESHOLD, ZScoreConfig, ZScoreJob


def add_zscore_args(parser: argparse.ArgumentParser) -> None:
    add_encoder_args(parser)
    parser.set_defaults(encoder_usage_info="CLIP")
    parser.add_argument("--trigger_file", default=PAPER_TRIGGER, help=f"trigger npz (default {PAPER_TRIGGER})")
    parser.add_argument("--data", default=PAPER_DATA,
                        help=f"images: an npz (x uint8 (N,S,S,3)) or an ImageNet root/image folder (default {PAPER_DATA})")
    parser.add_argument("--num_images", type=at_least(2), default=500, help="images per set (default 500)")
    parser.add_argument("--seed", type=int, default=100, help="sampling seed (default 100, the paper's)")
    parser.add_argument("--legacy", action="store_true",
                        help="base the verdict on the paper's statistic (/variance, trigger blended into "
                             "normalised tensors, two samples, diagonal included); both are always written")
    parser.add_argument("--threshold", type=finite, default=THRESHOLD,
                        help=f"trojaned above this (default {THRESHOLD})")
    parser.add_argument("--batch_size", type=at_least(1), default=128,
                        help="images per forward pass (default 128)")
    parser.add_argument("--block_size", type=at_least(1), default=1024,
                        help="Gram-matrix rows per block (default 1024)")
    parser.add_argument("--out_dir", default=".", help="folder of the result files (default .)")
    parser.add_argument("--res_file", default="valid_cliptxt_zscore.txt",
                        help="append encoder_path:zscore here, as the paper did (relative to --out_dir)")
    parser.add_argument("--csv_file", default="valid_cliptxt_zscore.csv",
                        help="append a CSV row with both statistics here (relative to --out_dir)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def zscore_job(args) -> ZScoreJob:
    """The job of the parsed flags; result files that would land on a folder are refused before any work."""
    for flag in ("res_file", "csv_file"):
        target = Path(args.out_dir) / getattr(args, flag)
        if target.is_dir():
            raise ValueError(f"--{flag} {getattr(args, flag)}: {target} is a folder; give a file name")
    cfg = ZScoreConfig(num_images=args.num_images, seed=args.seed, threshold=args.threshold, legacy=args.legacy,
                       batch_size=args.batch_size, block_size=args.block_size)
    return ZScoreJob(encoder_usage_info=args.encoder_usage_info, arch=args.arch, trigger_file=args.trigger_file,
                     data=args.data, out_dir=args.out_dir, res_file=args.res_file, csv_file=args.csv_file,
                     device=args.device, gpu=args.gpu, trust_checkpoint=args.trust_checkpoint,
                     clip_normalization=args.clip_normalization, encoder_format=args.encoder_format, config=cfg)


def print_result(path, result) -> None:
    r = result
    print(f"clean mean: {r.clean.mean:.6f}, std={r.clean.std:.6f} | stamped mean: {r.bad.mean:.6f}, "
          f"std={r.bad.std:.6f}  (corrected sets)")
    print(f"clean mean: {r.legacy_clean.mean:.6f}, var={r.legacy_clean.var:.6f} | stamped mean: "
          f"{r.legacy_bad.mean:.6f}, var={r.legacy_bad.var:.6f}  (paper's legacy sets)")
    print(f"{path}: {r.summary()}")
