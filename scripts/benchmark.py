r"""Benchmark DECREE's time to verdict: the project's inversion against the paper's data path.

    python scripts/benchmark.py --device cpu --encoders tiny resnet18 --batch_sizes 32 128
    python scripts/benchmark.py --device cuda --encoders resnet18 --batch_sizes 128 --restart_cost 1 2 4 8
    python scripts/benchmark.py --population output/bench/manifest.csv --shadow_data shadow.npz --restarts 8

Step mode (default): per encoder and batch size, one step and a few epochs of every contender; prints a table
(x = paper time / contender time, wall and CPU; GFLOP/s = the step's conv/matmul FLOPs, forward + backward to
the input, over its time, % of the machine's peak, whose derivation is printed) and writes --json. Random
encoder weights, seeded; nothing is downloaded. --restart_cost K...: step time of K stacked restarts.
Population mode (--population): every manifest encoder to its verdict with (a) the paper's settings on its data
path, (b) our default, (c) --preset fast, (d) --preset triage, in turn; total and per-encoder wall time, ratios,
verdict agreement, per-family AUROC, the overheads outside the inversion, and what shorter epoch budgets would
have given (read off the same runs). Finished encoders are kept in <json>.partial: an interrupted run, started
again with the same flags, goes on where it stopped.
Sweep mode (--population M --sweeps triage ...): whole sweeps timed end to end, the paper's run_decree.py way
against ours with each preset, with verdict agreement per encoder.
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere: the repo root holds the packages

# first: OpenMP reads OMP_WAIT_POLICY when torch is loaded (common/threads.py)
from common.threads import configure_threads  # noqa: E402
from common import io as atomic  # noqa: E402
from experiments.benchmark import (ENCODERS, OPTIONS, bench_restarts, default_variants, machine_info,  # noqa: E402
                                   machine_peak, restarts_table, run_benchmark, table)
from experiments.benchmark_population import (CONTENDERS, DEFAULT_CONTENDERS, population_table,  # noqa: E402
                                              run_population)
from experiments.benchmark_sweeps import run_sweeps, sweeps_table  # noqa: E402
from decree.cli import user_errors  # noqa: E402
from decree.settings import SPEED_PRESETS  # noqa: E402
from common.device import add_device_args, resolve_device  # noqa: E402


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--encoders", nargs="+", default=["tiny", "resnet18"], choices=list(ENCODERS),
                        help="tiny = ResNet18-CIFAR of width 8, resnet18 = ResNet18-CIFAR, clip_rn50 = CLIP RN50 "
                             "(224 px); default tiny resnet18")
    parser.add_argument("--batch_sizes", nargs="+", type=int, default=[32, 128], help="default 32 128")
    parser.add_argument("--variants", nargs="+", default=None,
                        help=f"project contenders: 'project' or +-joined options of {', '.join(OPTIONS)} "
                             "(e.g. amp+channels_last+float32); default: project float32 channels_last "
                             "fold_batchnorm+channels_last (= --preset fast), and on "
                             "CUDA also amp, amp+channels_last+float32, compile, amp+channels_last+float32+cudagraphs")
    parser.add_argument("--shadow_size", type=int, default=50,
                        help="images in the fixed-epochs run (default 50, the paper's CIFAR10 shadow set)")
    parser.add_argument("--steps", type=int, default=4, help="one-batch epochs per step timing, first untimed "
                                                             "(default 4)")
    parser.add_argument("--epochs", type=int, default=3, help="epochs of the fixed-epochs run (default 3)")
    parser.add_argument("--repeats", type=int, default=5, help="rounds of all contenders, medians reported "
                                                               "(default 5)")
    parser.add_argument("--data", default="photos", choices=("photos", "random"),
                        help="shadow images: crops of bundled photos or uniform noise (default photos)")
    parser.add_argument("--seed", type=int, default=80, help="encoder weights, images and inversion (default 80)")
    parser.add_argument("--lr", type=float, default=0.5, help="Adam lr on the trigger; the sweeps' 0.5 moves the "
                                                              "L1 within few epochs (default 0.5)")
    parser.add_argument("--rtol", type=float, default=1e-6, help="relative tolerance of 'same L1' (default 1e-6)")
    parser.add_argument("--json", default="benchmark.json", help="where to write the results (default benchmark.json)")
    parser.add_argument("--restart_cost", nargs="+", type=int, default=None, metavar="K",
                        help="also time one step of K stacked restarts (first K is the unit, e.g. 1 2 4 8)")
    pop = parser.add_argument_group("population mode")
    pop.add_argument("--population", default=None, metavar="MANIFEST",
                     help="run every encoder of this sweep manifest (path,usage_info,arch,label[,family]) to a verdict")
    pop.add_argument("--contenders", nargs="+", default=list(DEFAULT_CONTENDERS), choices=CONTENDERS,
                     help="default: paper default fast triage (fast_amp: fast with bf16 autocast); the first is the "
                          "reference of the ratios and agreement")
    pop.add_argument("--shadow_data", default=None, help="shadow set of every encoder (default per usage info)")
    pop.add_argument("--shadow_images", type=int, default=None,
                     help="use this many shadow images (default: main.py's selection from --shadow_data)")
    pop.add_argument("--max_epochs", type=int, default=1000, help="epoch budget (default 1000, the paper's)")
    pop.add_argument("--pl1_threshold", type=float, default=0.1, help="default 0.1")
    pop.add_argument("--restarts", type=int, default=1,
                     help="K > 1 adds a K-restart run per encoder, giving detection/FPR for K' = 1,2,4,.. <= K")
    pop.add_argument("--limit", type=int, default=None, help="only the first N encoders")
    pop.add_argument("--sweeps", nargs="+", default=None, metavar="PRESET", choices=tuple(SPEED_PRESETS),
                     help="instead of the contenders: time whole sweeps end to end, the paper's run_decree.py "
                          "(a fresh interpreter per encoder, one after the other, torch's default threads) against "
                          "our run_decree.py --preset PRESET with its defaults, e.g. --sweeps triage paper")
    add_device_args(parser)
    return parser.parse_args(argv)


def main_sweeps(args, log):
    settings = {"lr": args.lr, "seed": args.seed, "max_epochs": args.max_epochs, "threshold": args.pl1_threshold,
                "shadow_data": args.shadow_data, "shadow_size": args.shadow_images}
    doc = run_sweeps(args.population, args.sweeps, settings, Path(f"{args.json}.sweeps"), log=log)
    doc["machine"] = machine_info(resolve_device("cpu"))
    atomic.write_json(args.json, doc)
    print(sweeps_table(doc))
    print(f"machine: {doc['machine']['machine']}; results: {args.json}")


def main_population(args, device, log):
    threads = configure_threads(args.threads, log=log)
    partial = Path(f"{args.json}.partial")
    try:
        doc = run_population(args.population, device, args.contenders, args.shadow_data, args.shadow_images, args.lr,
                             args.seed, args.max_epochs, args.pl1_threshold, args.restarts, args.limit, log=log,
                             partial=partial)
    except KeyboardInterrupt:
        if partial.is_file():
            log(f"benchmark.py: the encoders finished so far are in {partial}; the same command goes on from there")
        raise
    doc["machine"] = {**machine_info(device), "peak": machine_peak(device, threads)}
    atomic.write_json(args.json, doc)
    partial.unlink(missing_ok=True)
    print(population_table(doc))
    print(f"machine: {doc['machine'].get('gpu', doc['machine']['processor'])}, {threads} torch threads; "
          f"results: {args.json}")


def main(argv=None):
    args = parse_args(argv)
    log = lambda line: print(line, file=sys.stderr)  # noqa: E731
    if args.population and args.sweeps:
        with user_errors("benchmark.py"):
            main_sweeps(args, log)
        return
    if args.population:
        with user_errors("benchmark.py"):
            main_population(args, resolve_device(args.device, args.gpu), log)
        return
    with user_errors("benchmark.py"):
        threads = configure_threads(args.threads, log=log)
        device = resolve_device(args.device, args.gpu)
        results = run_benchmark(args.encoders, args.batch_sizes, args.variants or default_variants(device), device,
                                threads, log=log,
                                shadow_size=args.shadow_size, steps=args.steps, epochs=args.epochs,
                                repeats=args.repeats, data=args.data, seed=args.seed, lr=args.lr, rtol=args.rtol)
        if args.restart_cost:  # with the first --variants contender (default: project)
            variant = (args.variants or ["project"])[0]
            results["restart_cost"] = [bench_restarts(name, batch, args.restart_cost, device, variant, data=args.data,
                                                      seed=args.seed, lr=args.lr, log=log)
                                       for name in args.encoders for batch in args.batch_sizes]
    atomic.write_json(args.json, results)
    print(table(results["cases"], results["machine"]["peak"]["flops"]))
    print(f"peak: {results['machine']['peak']['derivation']}")
    if args.restart_cost:
        print(restarts_table(results["restart_cost"]))
    print(f"machine: {results['machine'].get('gpu', results['machine']['processor'])}, "
          f"{results['machine']['torch_threads']} torch threads, torch {results['machine']['torch']}; "
          f"results: {args.json}")


if __name__ == "__main__":
    main()
