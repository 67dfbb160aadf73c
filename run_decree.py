r"""DECREE over many encoders: every local GPU (or N CPU workers) or a Slurm array, then a report.

    python run_decree.py                                  # output/<usage_info>/**/*.pth|.pt|.safetensors, all GPUs
    python run_decree.py --manifest encoders.csv --devices 0,1 --out_dir sweep
    python run_decree.py --encoders 'my/encoders/**/*.pth' --encoder_usage_info stl10 --devices cpu --workers 4
    python run_decree.py --encoders downloads/            # every encoder in it, each hub folder once, family read
    python run_decree.py --shard 2/4 ...                  # or inside a Slurm array job: SLURM_ARRAY_TASK_*
    python run_decree.py --report --out_dir sweep         # merge every shard's results into the report
    python run_decree.py --report --out_dir sweep --export sweep/predictions.json   # challenge-style export

Each encoder runs main.py in its own process (same outputs as main.py under --out_dir). Finished encoders
(trigger_norm/<run_id>.json) are skipped, so a killed sweep resumes where it stopped; failed ones are
recorded in trigger_norm/failed/ and retried on the next run. Ends with trigger_norm/summary.csv,
summary.json, pl1.png and gallery.png. Exit status 1 when an encoder failed.

Workers run isolated (python -I: nothing imported from the current, script or output folder), are killed
after --timeout seconds, and die with the sweep; an encoder is claimed before it runs, so two sweeps on one
--out_dir never run it twice (docs/sweeps.md).
"""
import argparse
import os
import sys
import time

from common.threads import configure_threads  # first: OpenMP reads OMP_WAIT_POLICY when torch loads
from decree.cli import (OneLineParser, add_encoder_args, add_inversion_args, add_memory_arg, add_target_args,
                        add_warp_test_args, at_least, inversion_flags, output_file, target_kwargs, user_errors,
                        warp_test_flags, warp_test_kwargs)
from common.determinism import add_determinism_arg
from common.files import printable
from common.io import check_writable
from common.memory import default_max_memory
from common.signals import interrupt_on_sigterm
from decree.outputs import check_output_folders
from models import DEFAULT_USAGE_INFO, HUB_FAMILIES, encoder_spec, import_arch_modules
from sweeps.discovery import find_encoders
from sweeps.export import export_predictions
from sweeps.outputs import write_sweep_config
from sweeps.pool import DEFAULT_TIMEOUT, check_timeout, pending, run_sweep
from sweeps.report import format_metrics, write_report
from sweeps.shards import parse_shard, select_shard, shard_from_slurm
from sweeps.workers import cpu_workers, worker_devices

PROG = "run_decree.py"


def parse_args(argv=None):
    parser = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    found = parser.add_argument_group("which encoders (default: the paper's folders output/<usage_info>/)")
    source = found.add_mutually_exclusive_group()
    source.add_argument("--manifest", default=None,
                        help="CSV with columns path[,usage_info][,arch][,label clean|backdoor][,reference NPZ]"
                             "[,reference_text TEXT][,family (a free group name, carried into the report)]; "
                             "relative paths are relative to the CSV; empty cells take --encoder_usage_info/--arch")
    source.add_argument("--encoders", nargs="+", default=None, metavar="GLOB",
                        help="checkpoint globs or folders (quote globs; ** recurses): .pth/.pt/.safetensors files, a "
                             "hub's .bin weights named directly, every checkpoint in a folder; a hub folder is one "
                             "encoder whose family its config names; the others take --encoder_usage_info "
                             "(default cifar10) and --arch. Their truth is unknown (a --manifest label gives it)")
    found.add_argument("--output_root", default="output",
                       help="folder of the paper's layout <usage_info>/**/*.pth|*.pt|*.safetensors (default output; "
                            "CLIP_text = CLIP)")
    add_encoder_args(parser)
    add_inversion_args(parser)
    add_determinism_arg(parser)
    add_target_args(parser, reference=False)  # per-encoder truths come from the manifest
    add_warp_test_args(parser)
    run = parser.add_argument_group("sweep")
    run.add_argument("--out_dir", default=".", help="root of trigger_inv/, detect_log/, trigger_norm/ (default .)")
    run.add_argument("--devices", default=None,
                     help="CUDA indices 0,1,... or cpu; default every visible GPU (--device/--gpu pick one), "
                          "else cpu")
    run.add_argument("--workers", type=at_least(1), default=None,
                     help="parallel encoders (default one per GPU; on CPU one per core when every encoder is a "
                          "32-px one (cifar10/stl10), else one); on CPU the cores are split between them "
                          "(--threads N: N threads per worker instead)")
    run.add_argument("--shard", default=None, metavar="K/N",
                     help="run only shard K of N (1-based); default from SLURM_ARRAY_TASK_ID/COUNT/MIN")
    run.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT, metavar="SECONDS",
                     help=f"kill an encoder's worker after this long and record it as failed (default "
                          f"{DEFAULT_TIMEOUT} = {DEFAULT_TIMEOUT // 3600} h; raise it for big encoders on CPU)")
    add_memory_arg(run, sweep=True)
    run.add_argument("--force", action="store_true", help="rerun encoders that already have a result")
    run.add_argument("--result_file", type=output_file, default=None,
                     help="also append the paper's line encoder_path,model_flag,L1,seconds per encoder here")
    run.add_argument("--list", action="store_true", help="print this shard's encoders and their state, run nothing")
    run.add_argument("--report", action="store_true",
                     help="run nothing: write the report of every result under --out_dir (all shards)")
    run.add_argument("--export", default=None, metavar="JSON",
                     help="also write challenge-style predictions (backdoored, score, target file per encoder) "
                          "here, with the target tensors copied beside it")
    run.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser.parse_args(argv)


def print_plan(encoders, out_dir, force: bool, options: dict) -> None:
    todo = {enc.run_id for enc in pending(encoders, out_dir, force, options)}
    for enc in encoders:
        state = "to run" if enc.run_id in todo else "finished"
        print(f"{state:8s} {enc.label:8s} {enc.usage_info:8s} {enc.arch or '-':10s} {printable(enc.path)}  "
              f"[{enc.run_id}]")


def describe(encoders, shard) -> str:
    return f"{len(encoders)} encoders" + (f" (shard {shard[0]}/{shard[1]})" if shard else "")


def sweep_options(args) -> dict:
    """The main.py options every encoder of the sweep runs with (sweeps.workers.passthrough_argv makes the flags)."""
    return {**inversion_flags(args), **target_kwargs(args), **warp_test_flags(args), "result_file": args.result_file,
            "nondeterministic": args.nondeterministic, "max_memory": args.max_memory}


def sweep(args, encoders, shard) -> dict:
    """Run this shard's unfinished encoders on the worker pool; returns the counts."""
    options = sweep_options(args)
    slots = worker_devices(args.devices, args.device, args.gpu, args.workers,
                           cpu_default=cpu_workers(encoders, args.threads))
    if options["max_memory"] is None:
        options["max_memory"] = default_max_memory(slots.count("cpu"))
    print(f"{describe(encoders, shard)}, {len(pending(encoders, args.out_dir, args.force, options))} "
          f"to run on {len(slots)} worker(s): {', '.join(slots)}")
    write_sweep_config(args.out_dir, {"argv": sys.argv, "options": options, "workers": slots,
                                      "shard": shard, "force": args.force, "timeout": args.timeout,
                                      "encoders": [vars(enc) for enc in encoders],
                                      "started_at": time.strftime("%Y-%m-%dT%H:%M:%S")})
    started = time.time()
    counts = run_sweep(encoders, args.out_dir, slots, options, args.force, progress=not args.quiet,
                       timeout=args.timeout)
    print(f"sweep: {counts['done']} finished, {counts['failed']} failed, {counts['skipped']} already "
          f"finished, {counts['elsewhere']} left to another sweep, in {time.time() - started:.1f} s")
    return counts


def main(argv=None):
    args = parse_args(argv)
    with user_errors(PROG):
        configure_threads(args.threads, log=None)
        if args.threads:  # the workers' thread count: they read it from the environment they inherit
            os.environ["OMP_NUM_THREADS"] = str(args.threads)
        interrupt_on_sigterm()
        check_timeout(args.timeout)
        warp_test_kwargs(args)  # warp settings without --warp_test: one line here, not in every worker
        import_arch_modules(args.arch_module)
        usage_info = args.encoder_usage_info or DEFAULT_USAGE_INFO
        if usage_info not in HUB_FAMILIES:  # a bad --arch fails here, not in every worker
            encoder_spec(usage_info, args.arch)
        encoders = []  # --report alone reports whatever is under --out_dir
        if not args.report or args.manifest or args.encoders:
            encoders = find_encoders(args.manifest, args.encoders, args.output_root, args.encoder_usage_info,
                                     args.arch)
        shard = None if args.report else parse_shard(args.shard) if args.shard else shard_from_slurm()
        if shard:
            encoders = select_shard(encoders, *shard)
        if args.list:
            print_plan(encoders, args.out_dir, args.force, sweep_options(args))
            print(describe(encoders, shard))
            return
        check_writable(args.out_dir)
        check_output_folders(args.out_dir)
        counts = {"failed": 0} if args.report else sweep(args, encoders, shard)
        metrics = write_report(args.out_dir, args.pl1_threshold, encoders)
        if args.export:
            exported = export_predictions(args.out_dir, args.export, args.pl1_threshold, encoders)
    print(format_metrics(metrics))
    figures = ", pl1.png, gallery.png" if metrics["done"] else " (no finished encoder: no figures)"
    print(f"report: {args.out_dir}/trigger_norm/summary.csv, summary.json{figures}")
    if args.export:
        print(f"export: {args.export} ({len(exported['predictions'])} encoders, target tensors beside it)")
    if counts["failed"]:
        sys.exit(1)


if __name__ == "__main__":
    main()
