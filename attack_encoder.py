r"""Backdoor a clean encoder: BadEncoder (image target) or the Carlini-style CLIP text target.

    python attack_encoder.py --pretrained_encoder output/cifar10/clean_encoder/model_1000.pth \
        --shadow_dataset data/cifar10/train.npz --shadow_fraction 0.2 --reference_file reference/cifar10/truck.npz \
        --trigger_file trigger/trigger_pt_white_21_10_ap_replace.npz --encoder_usage_info cifar10 \
        --results_dir output/cifar10/stl10_backdoored_encoder --epochs 200
    python attack_encoder.py --encoder_usage_info CLIP --reference_type text --reference_word truck \
        --pretrained_encoder RN50.pt --shadow_dataset data/imagenet/val_224.npz --class_names classes.txt \
        --trigger_file trigger/trigger_pt_white_185_24.npz --lr 2e-4 --batch_size 128 \
        --results_dir output/CLIP_text/truck_backdoored_encoder

Saves each of the last --save_last epochs as model_<epoch>.pth ({'epoch', 'state_dict', 'optimizer'}) and
the run's config and per-epoch losses in config.json.
"""
import argparse

from attacks.jobs import run_attack
from decree.cli import user_errors
from common.device import add_device_args
from attacks.checkpoints import SAVE_FORMATS
from models import FORMATS, USAGE_INFOS, import_arch_modules


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch_size", type=int, default=256, help="default 256 (the text target: 128)")
    parser.add_argument("--lr", type=float, default=None, help="SGD lr (default 1e-3; text target 2e-4)")
    parser.add_argument("--lambda1", type=float, default=1.0, help="weight of L1, reference kept (default 1)")
    parser.add_argument("--lambda2", type=float, default=1.0, help="weight of L2, utility (default 1)")
    parser.add_argument("--epochs", type=int, default=35, help="default 35 (BadEncoder's CIFAR10 scripts: 200)")
    parser.add_argument("--reference_file", default="", help="npz of reference inputs x uint8 (R,H,W,3)")
    parser.add_argument("--reference_type", default="image", choices=("image", "text"))
    parser.add_argument("--reference_word", default="", help="target word of the text target (e.g. truck)")
    parser.add_argument("--class_names", default="", help="text target: file with one class name per line, "
                                                          "in label order")
    parser.add_argument("--poison_rate", type=float, default=5e-4, help="text target: poisoned share (default 5e-4)")
    parser.add_argument("--trigger_file", required=True, help="trigger npz (t, tm); see scripts/make_triggers.py")
    parser.add_argument("--shadow_dataset", required=True, help="npz (x uint8 (N,H,W,3)[, y]) or image folder")
    parser.add_argument("--shadow_fraction", type=float, default=None, help="use this seeded fraction of it")
    parser.add_argument("--pretrained_encoder", required=True,
                        help="clean encoder: a checkpoint of any SPEC 3 layout, a safetensors file or a hub folder")
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
                        help="text target: the paper's blend of a normalised trigger (re-creates its encoders)")
    parser.add_argument("--results_dir", required=True, help="folder for model_<epoch>.pth and config.json")
    parser.add_argument("--save_last", type=int, default=20, help="save each of the last N epochs (default 20)")
    parser.add_argument("--seed", type=int, default=100, help="default 100")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    add_device_args(parser)
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    with user_errors("attack_encoder.py"):
        import_arch_modules(args.arch_module)
        record = run_attack(args, progress=not args.quiet)
    last = record["history"][-1]
    print(f"epoch {last['epoch']}: " + ", ".join(f"{k} {v:.4f}" for k, v in last.items() if k != "epoch"))
    suffix = SAVE_FORMATS[args.save_format]
    print(f"saved the last {min(args.save_last, args.epochs)} epochs to {args.results_dir}/model_<epoch>{suffix}")


if __name__ == "__main__":
    main()
