"""What pretrain_encoder.py and attack_encoder.py run: load inputs, train, save checkpoints and the config JSON."""
import time
from dataclasses import asdict
from pathlib import Path

from datasets import (CLIP_NORMALIZATION, NORMALIZATION, load_images, load_npz, load_reference, load_trigger,
                      select_shadow)
from common.device import resolve_device
from common.io import check_writable, write_json
from common.provenance import versions
from models import (HUB_FAMILIES, NonFiniteEmbeddings, SimCLR, clip_model, clip_tokenizer, encoder_spec,
                    load_encoder)
from models.checkpoint import CheckpointError, extract_state_dict, load_into, read_checkpoint

from . import badencoder
from .checkpoints import checkpoint_path, save_encoder, save_pretrained
from .simclr import PretrainConfig, pretrain_simclr
from .text_target import TextTargetConfig, train_text_target
from .training import TrainingError

# keys of OpenAI's TorchScript CLIP archives that are build parameters, not weights
OPENAI_EXTRA_KEYS = ("input_resolution", "context_length", "vocab_size")


def attack_normalization(usage_info: str, reference_type: str, choice: str = "paper", spec=None):
    """(mean, std) of the attack: 'paper' = BadEncoder's CLIP constants for CLIP image targets, ImageNet's for
    the text target (as the paper's script), the usage info's own otherwise (a hub encoder's: its config's);
    or 'imagenet'/'clip' forced."""
    if choice == "clip" or (choice == "paper" and usage_info == "CLIP" and reference_type == "image"):
        return CLIP_NORMALIZATION
    if choice == "imagenet":
        return NORMALIZATION["imagenet"]
    if usage_info in HUB_FAMILIES:
        return spec.mean, spec.std
    return NORMALIZATION[usage_info]


def last_epochs_saver(results_dir, epochs: int, save_last: int, config: dict, save_format: str = "torch"):
    """on_epoch callback writing model_<epoch>.pth (or .safetensors) for each of the last `save_last` epochs.

    config.json goes first, with the first checkpoint: every checkpoint says how it was made, and a run that
    fails before it has anything to save leaves nothing behind.
    """
    first = epochs - min(save_last, epochs) + 1

    def on_epoch(epoch, encoder, optimizer, record):
        if epoch >= first:
            if epoch == first:
                write_json(Path(results_dir) / "config.json", config)
            save_encoder(checkpoint_path(results_dir, f"model_{epoch}", save_format), epoch, encoder, optimizer,
                         save_format)
    return on_epoch


def load_full_clip(path, arch: str, trust_checkpoint: bool = False):
    """A full open_clip CLIP (visual + text tower) from a checkpoint holding the whole model (text target)."""
    sd = extract_state_dict(read_checkpoint(path, trust_checkpoint), path)
    if all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    if not any(k.startswith("transformer.") for k in sd):
        raise CheckpointError(f"{path}: holds no CLIP text tower (no 'transformer.' keys); the text-target attack "
                              "needs the full clean CLIP model, e.g. OpenAI's RN50.pt")
    model = clip_model(arch)
    load_into(model, {k: v for k, v in sd.items() if k not in OPENAI_EXTRA_KEYS}, path, tried=f"CLIP {arch}")
    return model


def read_class_names(path) -> list[str]:
    names = [line.strip() for line in Path(path).read_text().splitlines() if line.strip()]
    if not names:
        raise ValueError(f"{path}: no class names (one per line expected)")
    return names


def _finish(results_dir, config: dict, history: list, start: float) -> dict:
    record = {**config, "history": history, "seconds": round(time.time() - start, 1), "versions": versions()}
    write_json(Path(results_dir) / "config.json", record)
    return record


def run_pretrain(args, progress: bool = True) -> dict:
    """Pre-train a SimCLR model on args.pretraining_dataset; writes model_<E>.pth, backbone_<E>.pt, config.json."""
    start = time.time()
    device = resolve_device(args.device, args.gpu)
    spec = encoder_spec(args.encoder_usage_info, args.arch)
    images, _ = load_npz(args.pretraining_dataset)
    cfg = PretrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, seed=args.seed)
    config = {"script": "pretrain_encoder.py", "args": vars(args), "pretrain": asdict(cfg), "arch": spec.arch,
              "mean": spec.mean, "std": spec.std, "n_images": len(images), "device": str(device)}
    # written once the inputs are known good, before training: a crashed run still says what it was
    write_json(Path(check_writable(args.results_dir)) / "config.json", config)
    saved = []

    def save_last_epoch(epoch, model, optimizer, record):
        if epoch == cfg.epochs:
            saved.extend(str(p) for p in save_pretrained(args.results_dir, epoch, model, optimizer,
                                                         args.save_format))
    history = pretrain_simclr(SimCLR(spec.arch), images, spec.mean, spec.std, cfg, device, progress, save_last_epoch)
    return _finish(args.results_dir, {**config, "checkpoints": saved}, history, start)


def run_attack(args, progress: bool = True) -> dict:
    """BadEncoder (--reference_type image) or the CLIP text target (text); writes model_<epoch>.pth + config.json."""
    start = time.time()
    device = resolve_device(args.device, args.gpu)
    check_writable(args.results_dir)
    if args.reference_type == "image":  # first: a wrong checkpoint fails before the data are read
        clean, spec = load_encoder(args.pretrained_encoder, args.encoder_usage_info, args.arch, device,
                                   args.trust_checkpoint, encoder_format=args.encoder_format)
    else:
        spec = encoder_spec(args.encoder_usage_info, args.arch)
    mean, std = attack_normalization(args.encoder_usage_info, args.reference_type, args.normalization, spec)
    trigger = load_trigger(args.trigger_file)
    config = {"script": "attack_encoder.py", "args": vars(args), "arch": spec.arch, "mean": mean, "std": std,
              "device": str(device)}
    if args.reference_type == "text":
        if args.encoder_usage_info != "CLIP":
            raise ValueError("--reference_type text is the CLIP text-target attack; use --encoder_usage_info CLIP")
        if not args.reference_word or not args.class_names:
            raise ValueError("--reference_type text needs --reference_word (e.g. truck) and --class_names FILE")
        images, labels = load_npz(args.shadow_dataset, require_labels=True)
        cfg = TextTargetConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr or 2e-4,
                               poison_rate=args.poison_rate, seed=args.seed)
        config.update(text_target=asdict(cfg), n_images=len(images), legacy_trigger=args.legacy_trigger)
        model = load_full_clip(args.pretrained_encoder, spec.arch, args.trust_checkpoint)
        saver = last_epochs_saver(args.results_dir, args.epochs, args.save_last, config, args.save_format)
        _, history = train_text_target(model, images, labels, read_class_names(args.class_names),
                                       args.reference_word, trigger, mean, std, cfg, device,
                                       clip_tokenizer(spec.arch), args.legacy_trigger, progress, saver)
    else:
        if not args.reference_file:
            raise ValueError("--reference_type image needs --reference_file (make one with scripts/make_reference.py)")
        references, _ = load_reference(args.reference_file)
        images = load_images(args.shadow_dataset, size=spec.input_size)
        shadow = select_shadow(images, fraction=args.shadow_fraction, seed=args.seed)
        cfg = badencoder.preset(args.encoder_usage_info, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                                lambda1=args.lambda1, lambda2=args.lambda2, seed=args.seed)
        config.update(badencoder=asdict(cfg), n_shadow=len(shadow))
        saver = last_epochs_saver(args.results_dir, args.epochs, args.save_last, config, args.save_format)
        try:
            _, history = badencoder.train_badencoder(clean, shadow, trigger, references, mean, std, cfg, device,
                                                     progress, saver)
        except (TrainingError, NonFiniteEmbeddings) as err:
            raise TrainingError(f"{args.pretrained_encoder}: {err}") from err
    return _finish(args.results_dir, config, history, start)
