r"""Pre-train a clean SimCLR encoder (BadEncoder's pretraining_encoder.py): NT-Xent, SimCLR augmentations, Adam.

    python pretrain_encoder.py --pretraining_dataset data/cifar10/train.npz --arch resnet18 \
        --epochs 1000 --results_dir output/cifar10/clean_encoder

Writes model_<epochs>.pth (full model: f.f.*, g.*), backbone_<epochs>.pt (backbone: f.*) and config.json;
with --save_format safetensors, model_<epochs>.safetensors and backbone_<epochs>.safetensors instead.
"""
import argparse

from common.threads import configure_threads
from attacks.jobs import run_pretrain
from common.determinism import add_determinism_arg, configure_determinism
from decree.cli import OneLineParser, at_least, positive, user_errors
from common.device import add_device_args
from attacks.checkpoints import SAVE_FORMATS
from models import USAGE_INFOS


def parse_args(argv=None):
    parser = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pretraining_dataset", required=True, help="npz with x uint8 (N,32,32,3)")
    parser.add_argument("--encoder_usage_info", default="cifar10", choices=USAGE_INFOS[:2],
                        help="fixes the input normalisation (default cifar10)")
    parser.add_argument("--arch", default="resnet18", help="resnet18/34/50 or narrow resnet18_wN (default resnet18)")
    parser.add_argument("--epochs", type=at_least(1), default=1000, help="default 1000")
    parser.add_argument("--batch_size", type=at_least(2), default=256,
                        help="default 256 (BadEncoder's pretraining_encoder.py default); >= 2 (the contrastive "
                             "loss needs other images)")
    parser.add_argument("--lr", type=positive, default=1e-3, help="Adam learning rate (default 1e-3)")
    parser.add_argument("--results_dir", required=True, help="folder for the checkpoints and config.json")
    parser.add_argument("--seed", type=int, default=100, help="default 100")
    parser.add_argument("--save_format", default="torch", choices=SAVE_FORMATS,
                        help="torch: model_<E>.pth + backbone_<E>.pt (with the optimizer state); safetensors: "
                             "model_<E>.safetensors + backbone_<E>.safetensors (tensors only, cannot carry code)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    add_device_args(parser)
    add_determinism_arg(parser)
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    configure_determinism(args.nondeterministic)
    with user_errors("pretrain_encoder.py"):
        configure_threads(args.threads)
        record = run_pretrain(args, progress=not args.quiet)
    print(f"loss {record['history'][-1]['loss']:.4f} after {args.epochs} epochs; saved {', '.join(record['checkpoints'])}")


if __name__ == "__main__":
    main()
