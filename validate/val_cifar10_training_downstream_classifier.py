r"""Downstream validation of an image-target (BadEncoder) attack: CA, BA and ASR of an MLP on frozen embeddings.

    python validate/val_cifar10_training_downstream_classifier.py \
        --encoder_path output/cifar10/stl10_backdoored_encoder/model_200.pth \
        --clean_encoder output/cifar10/clean_encoder/model_1000.pth --dataset stl10 --reference_label 9

Reads data/<dataset>/train.npz and test.npz (train_224.npz/test_224.npz for 224-px encoders) unless
--train_data/--test_data are given; appends one CSV row per encoder to --results_file.
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# first: OpenMP reads OMP_WAIT_POLICY when torch is loaded (common/threads.py)
from common.threads import configure_threads  # noqa: E402
from decree.cli import OneLineParser, add_encoder_args, at_least, output_file, positive, user_errors  # noqa: E402
from models import import_arch_modules  # noqa: E402
from validate.downstream import DownstreamConfig, DownstreamJob, run_downstream  # noqa: E402


def parse_args(argv=None):
    parser = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--encoder_path", "--encoder", dest="encoder_path", default=None,
                        help="the backdoored encoder (BA, ASR); --encoder is the paper's name")
    parser.add_argument("--clean_encoder", default=None, help="the clean encoder it came from (CA)")
    add_encoder_args(parser)
    parser.add_argument("--dataset", default="cifar10", help="downstream dataset name under data/ (default cifar10)")
    parser.add_argument("--train_data", default=None, help="labelled npz (default data/<dataset>/train.npz)")
    parser.add_argument("--test_data", default=None, help="labelled npz (default data/<dataset>/test.npz)")
    parser.add_argument("--trigger_file", default=None,
                        help="trigger npz (default trigger/trigger_pt_white_21_10_ap_replace.npz for 32 px, "
                             "trigger/trigger_pt_white_173_50_ap_replace.npz for 224 px)")
    parser.add_argument("--reference_label", type=int, default=None,
                        help="target class (default: stl10 9, svhn 1, gtsrb 12, as in the papers)")
    parser.add_argument("--reference_file", default=None, help=argparse.SUPPRESS)  # the paper's; not needed
    parser.add_argument("--epochs", "--nn_epochs", dest="epochs", type=at_least(1), default=200,
                        help="MLP epochs (default 200, DECREE's; BadEncoder used 500)")
    parser.add_argument("--batch_size", type=at_least(1), default=64, help="MLP batch size (default 64)")
    parser.add_argument("--lr", type=positive, default=1e-4, help="Adam learning rate (default 1e-4)")
    parser.add_argument("--hidden_size_1", type=at_least(1), default=512)
    parser.add_argument("--hidden_size_2", type=at_least(1), default=256)
    parser.add_argument("--seed", type=int, default=100, help="seed (default 100, the paper's)")
    parser.add_argument("--shuffle", action="store_true", help="shuffle MLP batches (the papers did not)")
    parser.add_argument("--results_file", type=output_file, default="downstream_results.csv",
                        help="append one CSV row per encoder here (default downstream_results.csv)")
    parser.add_argument("--result_dir", type=output_file, default=None,
                        help="save the backdoored encoder's classifier state dict to this .pth (the paper's flag)")
    parser.add_argument("--normalization", default="evaluation", choices=("evaluation", "detection"),
                        help="encoder inputs: as the original evaluation (default; cifar10/stl10 their constants, "
                             "CLIP CLIP's, imagenet none: ToTensor only), or as DECREE's detection")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    cfg = DownstreamConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                           hidden=(args.hidden_size_1, args.hidden_size_2), seed=args.seed, shuffle=args.shuffle)
    job = DownstreamJob(encoder_path=args.encoder_path, clean_encoder=args.clean_encoder,
                        encoder_usage_info=args.encoder_usage_info, arch=args.arch, dataset=args.dataset,
                        train_data=args.train_data, test_data=args.test_data, trigger_file=args.trigger_file,
                        reference_label=args.reference_label, results_file=args.results_file,
                        classifier_file=args.result_dir, device=args.device, gpu=args.gpu,
                        trust_checkpoint=args.trust_checkpoint, clip_normalization=args.clip_normalization,
                        normalization=args.normalization, encoder_format=args.encoder_format, config=cfg)

    def report(row):
        name = "CA" if row["role"] == "clean" else "BA"
        asr = "ASR-B (baseline)" if row["role"] == "clean" else "ASR"
        print(f"{row['encoder_path']}: {name} {row['ca'] if name == 'CA' else row['ba']:.2f}% | "
              f"{asr} {row['asr_all']:.2f}% of all stamped test images (paper-compatible), "
              f"{row['asr']:.2f}% of stamped non-target-class images | target class {row['reference_label']}, "
              f"{row['epochs']} epochs")

    with user_errors("val_cifar10_training_downstream_classifier.py"):
        configure_threads(args.threads)
        import_arch_modules(args.arch_module)
        run_downstream(job, progress=not args.quiet, on_result=report)
    print(f"appended to {args.results_file}")


if __name__ == "__main__":
    main()
