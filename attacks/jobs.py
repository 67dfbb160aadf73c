"""What pretrain_encoder.py and attack_encoder.py run: load inputs, train, save checkpoints and the config JSON."""
import time
from dataclasses import asdict
from pathlib import Path

from datasets import (CLIP_NORMALIZATION, NORMALIZATION, DataError, load_images, load_npz, load_reference, load_trigger,
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
from .training import TrainingError, check_batch_size

# keys of OpenAI's TorchScript CLIP archives that are build parameters, not weights
OPENAI_EXTRA_KEYS = ("input_resolution", "context_length", "vocab_size")
# the paper's attack_encoder.py saves this many consecutive epochs per attack (its model_cnt)
PAPER_SAVE_COUNT = 20
# batch sizes of the paper's scripts: BadEncoder 256, the CLIP text target 128
DEFAULT_BATCH = {"image": 256, "text": 128}


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


def attack_schedule(epochs: int, save_count: int | None = None, badencoder: bool = False) -> tuple[int, int]:
    """(epochs to train, first epoch saved); every epoch from the first saved one on is saved.

    The paper's attack_encoder.py: --epochs N trains N + K - 1 epochs and saves N..N+K-1 (K = 20 encoders per
    attack). BadEncoder's badencoder.py: trains N and saves the last (K = 1; a larger K saves the last K).
    """
    if epochs < 1 or (save_count is not None and save_count < 1):
        raise ValueError(f"--epochs ({epochs}) and --save_last ({save_count}) must be at least 1")
    if badencoder:
        return epochs, max(1, epochs - (save_count or 1) + 1)
    return epochs + (save_count or PAPER_SAVE_COUNT) - 1, epochs


def checkpoint_saver(results_dir, first: int, config: dict, save_id: str = "", extra_tensors=None,
                     save_format: str = "torch"):
    """on_epoch callback writing model_<epoch><save_id>.pth (or .safetensors) for every epoch from `first` on
    (the paper's names).

    config<save_id>.json goes first, with the first checkpoint: every checkpoint says how it was made, and a
    run that fails before it has anything to save leaves nothing behind. extra_tensors join each state dict.
    """
    def on_epoch(epoch, encoder, optimizer, record):
        if epoch >= first:
            if epoch == first:
                write_json(Path(results_dir) / f"config{save_id}.json", config)
            save_encoder(checkpoint_path(results_dir, f"model_{epoch}{save_id}", save_format), epoch, encoder,
                         optimizer, extra_tensors, save_format)
    return on_epoch


def _state_dict(path, trust_checkpoint: bool, prefixes=("module.",)) -> dict:
    """The checkpoint's tensors, each prefix in turn stripped when every key carries it."""
    sd = extract_state_dict(read_checkpoint(path, trust_checkpoint), path)
    for prefix in prefixes:
        if all(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix):]: v for k, v in sd.items()}
    return sd


def classifier_head(path, trust_checkpoint: bool = False) -> dict:
    """The fc.* tensors of an ImageNet ResNet checkpoint. Our encoder drops the (unused) classifier; saving it
    back lets the original code load the backdoored encoder with load_state_dict(strict=True)."""
    sd = _state_dict(path, trust_checkpoint, ("module.", "visual."))
    return {k: v for k, v in sd.items() if k.startswith("fc.")}


def load_full_clip(path, arch: str, trust_checkpoint: bool = False, text_model=None):
    """A full open_clip CLIP (visual + text tower) for the text target: from one checkpoint holding the whole
    model, or (text_model given) the visual tower from `path` and the text tower from `text_model`, as the
    paper attacked its visual-only clean encoder with OpenAI's text tower."""
    if text_model:
        text = _state_dict(text_model, trust_checkpoint)
        visual = _state_dict(path, trust_checkpoint, ("module.", "visual."))
        sd = {**{k: v for k, v in text.items() if not k.startswith("visual.")},
              **{f"visual.{k}": v for k, v in visual.items()}}
    else:
        sd = _state_dict(path, trust_checkpoint)
    if "token_embedding.weight" not in sd:  # ('transformer.' alone is also a ViT visual tower's)
        raise CheckpointError(f"{text_model or path}: holds no CLIP text tower (no 'token_embedding.weight'); the "
                              "text-target attack needs the full clean CLIP model (e.g. OpenAI's RN50.pt), or a "
                              "visual-only encoder plus --clip_text_model FULL_CLIP_FILE")
    model = clip_model(arch)
    sources = f"{path} + {text_model}" if text_model else path
    load_into(model, {k: v for k, v in sd.items() if k not in OPENAI_EXTRA_KEYS}, sources, tried=f"CLIP {arch}")
    return model


def read_class_names(path) -> list[str]:
    names = [line.strip() for line in Path(path).read_text().splitlines() if line.strip()]
    if not names:
        raise ValueError(f"{path}: no class names (one per line expected)")
    return names


def check_input_size(path, what: str, size: int, spec) -> None:
    """A trigger or reference file must have the encoder's input size; the error names the file and both sizes."""
    if size != spec.input_size:
        raise DataError(f"{path}: the {what} is {size}x{size} px but {spec.usage_info} {spec.arch} encoders take "
                        f"{spec.input_size}x{spec.input_size}; use a {what} file of that size")


def _finish(results_dir, config: dict, history: list, start: float, save_id: str = "") -> dict:
    record = {**config, "history": history, "seconds": round(time.time() - start, 1), "versions": versions()}
    write_json(Path(results_dir) / f"config{save_id}.json", record)
    return record


def run_pretrain(args, progress: bool = True) -> dict:
    """Pre-train a SimCLR model on args.pretraining_dataset; writes model_<E>.pth, backbone_<E>.pt, config.json."""
    start = time.time()
    device = resolve_device(args.device, args.gpu)
    spec = encoder_spec(args.encoder_usage_info, args.arch)
    images, _ = load_npz(args.pretraining_dataset)
    cfg = PretrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, seed=args.seed)
    check_batch_size(len(images), cfg.batch_size, f"images in {args.pretraining_dataset}")
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
    """BadEncoder (--reference_type image) or the CLIP text target (text); writes model_<epoch><save_id>.pth
    for each saved epoch (attack_schedule) and config<save_id>.json."""
    start = time.time()
    if set(args.save_id) & {"/", "\\"}:
        raise ValueError(f"--save_id {args.save_id!r}: a file-name suffix cannot hold a path separator")
    epochs, first_saved = attack_schedule(args.epochs, args.save_last, args.badencoder_schedule)
    device = resolve_device(args.device, args.gpu)
    check_writable(args.results_dir)
    if args.reference_type == "image":  # first: a wrong checkpoint fails before the data are read
        clean, spec = load_encoder(args.pretrained_encoder, args.encoder_usage_info, args.arch, device,
                                   args.trust_checkpoint, encoder_format=args.encoder_format)
    else:
        spec = encoder_spec(args.encoder_usage_info, args.arch)
    mean, std = attack_normalization(args.encoder_usage_info, args.reference_type, args.normalization, spec)
    trigger = load_trigger(args.trigger_file)
    batch_size = args.batch_size or DEFAULT_BATCH[args.reference_type]
    check_input_size(args.trigger_file, "trigger", trigger.size, spec)
    config = {"script": "attack_encoder.py", "args": vars(args), "arch": spec.arch, "mean": mean, "std": std,
              "device": str(device), "epochs_trained": epochs, "saved_epochs": [first_saved, epochs]}
    if args.reference_type == "text":
        if args.encoder_usage_info != "CLIP":
            raise ValueError("--reference_type text is the CLIP text-target attack; use --encoder_usage_info CLIP")
        if not args.reference_word or not args.class_names:
            raise ValueError("--reference_type text needs --reference_word (e.g. truck) and --class_names FILE")
        images, labels = load_npz(args.shadow_dataset, require_labels=True)
        cfg = TextTargetConfig(epochs=epochs, batch_size=batch_size, lr=args.lr or 2e-4,
                               poison_rate=args.poison_rate, seed=args.seed)
        config.update(text_target=asdict(cfg), n_images=len(images), legacy_trigger=args.legacy_trigger)
        model = load_full_clip(args.pretrained_encoder, spec.arch, args.trust_checkpoint, args.clip_text_model)
        saver = checkpoint_saver(args.results_dir, first_saved, config, args.save_id, save_format=args.save_format)
        _, history = train_text_target(model, images, labels, read_class_names(args.class_names),
                                       args.reference_word, trigger, mean, std, cfg, device,
                                       clip_tokenizer(spec.arch), args.legacy_trigger, progress, saver)
    else:
        if not args.reference_file:
            raise ValueError("--reference_type image needs --reference_file (make one with scripts/make_reference.py)")
        references, _ = load_reference(args.reference_file)
        check_input_size(args.reference_file, "reference", references.shape[1], spec)
        images = load_images(args.shadow_dataset, size=spec.input_size, progress=progress)
        shadow = select_shadow(images, fraction=args.shadow_fraction, seed=args.seed)
        cfg = badencoder.preset(args.encoder_usage_info, epochs=epochs, batch_size=batch_size, lr=args.lr,
                                lambda1=args.lambda1, lambda2=args.lambda2, seed=args.seed)
        check_batch_size(len(shadow), cfg.batch_size, f"shadow images from {args.shadow_dataset}")
        config.update(badencoder=asdict(cfg), n_shadow=len(shadow))
        head = classifier_head(args.pretrained_encoder, args.trust_checkpoint) \
            if args.encoder_usage_info == "imagenet" else None
        saver = checkpoint_saver(args.results_dir, first_saved, config, args.save_id, head, args.save_format)
        try:
            _, history = badencoder.train_badencoder(clean, shadow, trigger, references, mean, std, cfg, device,
                                                     progress, saver)
        except (TrainingError, NonFiniteEmbeddings) as err:
            raise TrainingError(f"{args.pretrained_encoder}: {err}") from err
    return _finish(args.results_dir, config, history, start, args.save_id)
