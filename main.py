r"""DECREE trigger inversion for one encoder: is it backdoored?

    python main.py --encoder_path output/cifar10/stl10_backdoored_encoder/model_200.pth \
        --encoder_usage_info cifar10 --device cpu

Writes trigger_inv/<run_id>/, detect_log/<run_id>.log|.csv and trigger_norm/<run_id>.json under --out_dir.

Defaults are the settings the paper's experiments ran main.py with (its run_decree.py): lr 0.5, batch size 32,
seed 80, mask_init rand. --paper_main_defaults takes its main.py's own defaults instead (lr 1e-3, batch size
256, seed 100; mask_init rand, as its default '' stops at an assert). Flags given explicitly win either way.
"""
import argparse

from common.threads import configure_threads  # first: OpenMP reads OMP_WAIT_POLICY when torch loads
from common.determinism import add_determinism_arg, configure_determinism
from common.device import resolve_device
from common.files import printable
from common.memory import limit_address_space
from common.signals import interrupt_on_sigterm
from decree.cli import (OneLineParser, add_encoder_args, add_inversion_args, add_memory_arg, add_target_args,
                        add_warp_test_args, inversion_kwargs, output_file, run_id, target_kwargs, user_errors,
                        warp_test_kwargs)
from decree.detect import DetectionJob, run_detection
from decree.settings import PAPER_MAIN_DEFAULTS
from decree.target import target_lines
from decree.warp_test import warp_line
from models import import_arch_modules


def parse_args(argv=None):
    parser = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--encoder_path", required=True,
                        help="encoder checkpoint (.pth/.pt/.safetensors, any layout in docs/method.md) or a hub folder "
                             "(open_clip, Hugging Face, timm: docs/formats.md)")
    add_encoder_args(parser)
    parser.add_argument("--model_config", default=None, metavar="JSON",
                        help="the model's config when none lies beside --encoder_path: open_clip_config.json, an "
                             "open_clip model config (embed_dim, vision_cfg: e.g. a custom model's), or a Hugging "
                             "Face/timm config.json")
    add_inversion_args(parser)
    paper_main = ", ".join(f"{name} {value:g}" for name, value in PAPER_MAIN_DEFAULTS.items())
    parser.add_argument("--paper_main_defaults", action="store_true",
                        help=f"default to the paper's main.py values ({paper_main}) instead of its experiments' "
                             "(the defaults above)")
    add_determinism_arg(parser)
    add_target_args(parser)
    add_warp_test_args(parser)
    parser.add_argument("--out_dir", default=".", help="root of the three output folders (default .)")
    parser.add_argument("--id", type=run_id, default=None,
                        help="run id, a plain file name (default: derived from --encoder_path)")
    parser.add_argument("--model_flag", default="", help="free label written to --result_file (e.g. clean)")
    parser.add_argument("--result_file", type=output_file, default=None,
                        help="append the paper's CSV line encoder_path,model_flag,L1,seconds here")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    add_memory_arg(parser)
    args = parser.parse_args(argv)
    if args.paper_main_defaults:  # parse again: explicit flags still win over the other defaults
        parser.set_defaults(**PAPER_MAIN_DEFAULTS)
        args = parser.parse_args(argv)
    return args


def main(argv=None):
    args = parse_args(argv)
    with user_errors("main.py"):
        if args.max_memory and resolve_device(args.device, args.gpu).type == "cpu":
            limit_address_space(args.max_memory)
        configure_threads(args.threads)
        warp_test = warp_test_kwargs(args)
    job = DetectionJob(encoder_path=args.encoder_path, out_dir=args.out_dir, run_id=args.id,
                       model_flag=args.model_flag, result_file=args.result_file, model_config=args.model_config,
                       **inversion_kwargs(args),
                       **target_kwargs(args), **warp_test)
    configure_determinism(args.nondeterministic)
    with user_errors("main.py"):
        interrupt_on_sigterm()
        import_arch_modules(args.arch_module)
        record = run_detection(job, progress=not args.quiet).record
    print(f"results: {printable(job.paths().json)}")
    print("\n".join(target_lines(record)))  # before the verdict, which stays the last line for scripts
    if record["warp_test"]:
        print(warp_line(record))
    pl1 = "no trigger found" if record["pl1"] is None else f"PL1-norm {record['pl1']:.4f}"
    notes = "".join(f"; {note}" for note in record["notes"])
    print(f"{printable(record['encoder_path'])}: {record['verdict'].upper()} ({pl1}, L1/(H*W*3) with "
          f"{record['pl1_divisor']}; threshold {record['pl1_threshold']}; score {record['score']:.4f}){notes}")


if __name__ == "__main__":
    main()
