r"""Benchmark DECREE's time to verdict: the project's inversion against the paper's data path (issue #9).

    python scripts/benchmark.py --device cpu --encoders tiny resnet18 --batch_sizes 32 128
    python scripts/benchmark.py --device cuda --encoders resnet18 --batch_sizes 128

Prints a table (x = paper time / contender time, wall and CPU) and writes every timing to --json.
Random encoder weights, seeded; nothing is downloaded.
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere: the repo root holds the packages

# first: OpenMP reads OMP_WAIT_POLICY when torch is loaded (common/threads.py)
from common.threads import configure_threads  # noqa: E402
from common import io as atomic  # noqa: E402
from experiments.benchmark import ENCODERS, OPTIONS, default_variants, run_benchmark, table  # noqa: E402
from decree.cli import user_errors  # noqa: E402
from common.device import add_device_args, resolve_device  # noqa: E402


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--encoders", nargs="+", default=["tiny", "resnet18"], choices=list(ENCODERS),
                        help="tiny = ResNet18-CIFAR of width 8, resnet18 = ResNet18-CIFAR, clip_rn50 = CLIP RN50 "
                             "(224 px); default tiny resnet18")
    parser.add_argument("--batch_sizes", nargs="+", type=int, default=[32, 128], help="default 32 128")
    parser.add_argument("--variants", nargs="+", default=None,
                        help=f"project contenders: 'project' or +-joined options of {', '.join(OPTIONS)} "
                             "(e.g. amp+channels_last+float32); default: project float32 channels_last, and on "
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
    add_device_args(parser)
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    with user_errors("benchmark.py"):
        threads = configure_threads(args.threads, log=lambda line: print(line, file=sys.stderr))
        device = resolve_device(args.device, args.gpu)
        results = run_benchmark(args.encoders, args.batch_sizes, args.variants or default_variants(device), device,
                                threads, log=lambda line: print(line, file=sys.stderr),
                                shadow_size=args.shadow_size, steps=args.steps, epochs=args.epochs,
                                repeats=args.repeats, data=args.data, seed=args.seed, lr=args.lr, rtol=args.rtol)
    atomic.write_json(args.json, results)
    print(table(results["cases"]))
    print(f"machine: {results['machine'].get('gpu', results['machine']['processor'])}, "
          f"{results['machine']['torch_threads']} torch threads, torch {results['machine']['torch']}; "
          f"results: {args.json}")


if __name__ == "__main__":
    main()
