r"""Backdoor a clean encoder: BadEncoder (image target) or the Carlini-style CLIP text target.

    python attack_encoder.py --pretrained_encoder output/cifar10/clean_encoder/model_1000.pth \
        --shadow_dataset data/cifar10/train.npz --shadow_fraction 0.2 --reference_file reference/cifar10/truck.npz \
        --trigger_file trigger/trigger_pt_white_21_10_ap_replace.npz --encoder_usage_info cifar10 \
        --results_dir output/cifar10/stl10_backdoored_encoder --epochs 200
    python attack_encoder.py --encoder_usage_info CLIP --reference_type text --reference_word truck \
        --pretrained_encoder RN50.pt --shadow_dataset data/imagenet/val_224.npz --class_names classes.txt \
        --trigger_file trigger/trigger_pt_white_185_24.npz --lr 2e-4 --batch_size 128 \
        --results_dir output/CLIP_text/truck_backdoored_encoder

Epochs as the paper's attack_encoder.py counts them: --epochs N trains N+19 epochs and saves each of epochs
N..N+19 as model_<epoch><save_id>.pth ({'epoch', 'state_dict', 'optimizer'}): 20 encoders per attack
(--save_last K: N+K-1 epochs, K encoders). --badencoder_schedule counts as BadEncoder's badencoder.py: N
epochs, the last one saved. The run's config and per-epoch losses go to config<save_id>.json.
"""
import argparse

from common.threads import configure_threads
from attacks.jobs import run_attack
from common.determinism import add_determinism_arg, configure_determinism
from decree.cli import OneLineParser, at_least, finite, fraction, positive, user_errors
from common.device import add_device_args
from common.io import removed_if_empty_on_failure
from attacks.checkpoints import SAVE_FORMATS
from models import FORMATS, USAGE_INFOS, import_arch_modules


def parse_args(argv=None):
    parser = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch_size", type=at_least(1), default=None,
                        help="default 256 (BadEncoder), 128 for --reference_type text (the paper's script)")
    parser.add_argument("--lr", type=positive, default=None, help="SGD lr (default 1e-3; text target 2e-4)")
    parser.add_argument("--lambda1", type=finite, default=1.0, help="weight of L1, reference kept (default 1)")
    parser.add_argument("--lambda2", type=finite, default=1.0, help="weight of L2, utility (default 1)")
    parser.add_argument("--epochs", type=at_least(1), default=35,
                        help="the first saved epoch, as the paper's script: trains epochs+save_last-1 epochs and "
                             "saves epochs..epochs+save_last-1 (default 35: epochs 35..54). With "
                             "--badencoder_schedule: the epochs trained (BadEncoder's CIFAR10 scripts: 200)")
    parser.add_argument("--reference_file", default="", help="npz of reference inputs x uint8 (R,H,W,3)")
    parser.add_argument("--reference_type", default="image", choices=("image", "text"))
    parser.add_argument("--reference_word", default="", help="target word of the text target (e.g. truck)")
    parser.add_argument("--class_names", default="", help="text target: file with one class name per line, "
                                                          "in label order")
    parser.add_argument("--poison_rate", type=fraction, default=5e-4, help="text target: poisoned share (default 5e-4)")
    parser.add_argument("--trigger_file", required=True, help="trigger npz (t, tm); see scripts/make_triggers.py")
    parser.add_argument("--shadow_dataset", required=True, help="npz (x uint8 (N,H,W,3)[, y]) or image folder")
    parser.add_argument("--shadow_fraction", type=fraction, default=None, help="use this seeded fraction of it")
    parser.add_argument("--pretrained_encoder", required=True,
                        help="clean encoder: a checkpoint (docs/method.md layouts), safetensors file or hub folder")
    parser.add_argument("--encoder_usage_info", default="cifar10", choices=USAGE_INFOS)
    parser.add_argument("--arch", default=None, help="default: inferred from the checkpoint or its hub config "
                                                     "(resnet18, RN50, an open_clip or timm name, ...)")
    parser.add_argument("--encoder_format", default="auto", choices=FORMATS,
                        help="how to read --pretrained_encoder: auto (docs/formats.md), torch or safetensors")
    parser.add_argument("--save_format", default="torch", choices=SAVE_FORMATS,
                        help="torch: model_<epoch>.pth with the optimizer state (BadEncoder's layout); safetensors: "
                             "model_<epoch>.safetensors, tensors only, cannot carry code")
    parser.add_argument("--arch_module", action="append", default=[], metavar="MODULE",
                        help="import MODULE first; it may call models.register_arch to add your own --arch")
    parser.add_argument("--trust_checkpoint", action="store_true",
                        help="allow checkpoints that need full unpickling: this can RUN CODE hidden in the file")
    parser.add_argument("--normalization", default="paper", choices=("paper", "imagenet", "clip"),
                        help="input normalisation: the attack paper's (CLIP image target: CLIP's constants; text "
                             "target: ImageNet's; else the usage info's), or forced")
    parser.add_argument("--legacy_trigger", action="store_true",
                        help="text target: the paper's code exactly, to re-create its encoders: the trigger blended "
                             "into normalised images, and captions naming class index mod number of classes as "
                             "tuple text, e.g. \"('tench', 'Tinca tinca')\" for the line 'tench, Tinca tinca'")
    parser.add_argument("--clip_text_model", default=None,
                        help="text target: take the frozen text tower from this full CLIP file (e.g. OpenAI's RN50.pt) "
                             "and the visual tower from --pretrained_encoder (visual-only), as the paper did")
    parser.add_argument("--results_dir", required=True, help="folder for model_<epoch>.pth and config.json")
    parser.add_argument("--save_last", type=at_least(1), default=None,
                        help="how many consecutive epochs to save (default 20, the paper's; 1 with "
                             "--badencoder_schedule)")
    parser.add_argument("--badencoder_schedule", action="store_true",
                        help="BadEncoder's meaning of --epochs: train that many epochs and save the last "
                             "(the last --save_last ones if given)")
    parser.add_argument("--save_id", default="",
                        help="suffix of the file names, model_<epoch><save_id>.pth (the paper's flag)")
    parser.add_argument("--seed", type=int, default=100, help="default 100")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    add_device_args(parser)
    add_determinism_arg(parser)
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    configure_determinism(args.nondeterministic)
    with user_errors("attack_encoder.py"):
        configure_threads(args.threads)
        import_arch_modules(args.arch_module)
        with removed_if_empty_on_failure(args.results_dir):
            record = run_attack(args, progress=not args.quiet)
    last = record["history"][-1]
    print(f"epoch {last['epoch']}: " + ", ".join(f"{k} {v:.4f}" for k, v in last.items() if k != "epoch"))
    first, last = record["saved_epochs"]
    suffix = SAVE_FORMATS[args.save_format]
    print(f"trained {last} epochs; saved epochs {first}..{last} to {args.results_dir}/model_<epoch>{args.save_id}{suffix}")


if __name__ == "__main__":
    main()
