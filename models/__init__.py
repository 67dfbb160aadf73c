"""Encoders: one factory (get_encoder) and one safe loader (load_encoder) for every script."""
import warnings
from dataclasses import dataclass, replace

import torch
from torch import nn

from datasets.normalization import CLIP_NORMALIZATION, NORMALIZATION

from .checkpoint import (CheckpointError, UnsafeCheckpointError, adapt_state_dict, check_model_fits, load_into,
                         read_checkpoint)
from .registry import CUSTOM_ARCHS, drop_head, import_arch_modules, register_arch
from .mobilenet import arch_name as mobilenet_arch  # importing it registers --arch mobilenet_v2[_<px>]
from .arch_inference import infer_arch
from .formats import FORMATS, HUB_FAMILIES, locate, read_weights, save_safetensors, usage_info_from
from .hub import export_state_dict, hub_config_of, load_hub_encoder
from .clip import clip_arch, clip_embed_dim, clip_model, clip_tokenizer, clip_visual, open_clip_name
from .simclr import SimCLR, SimCLRBackbone, embed_dim

USAGE_INFOS = ("cifar10", "stl10", "imagenet", "CLIP", "moco") + HUB_FAMILIES
DEFAULT_ARCH = {"cifar10": "resnet18", "stl10": "resnet18", "imagenet": "resnet50", "CLIP": "RN50",
                "moco": "resnet18"}


@dataclass(frozen=True)
class EncoderSpec:
    """What an encoder expects: input size (px), normalisation, and what it returns."""
    usage_info: str
    arch: str
    input_size: int
    mean: tuple
    std: tuple
    embed_dim: int
    arch_note: str = ""  # how --arch was inferred from the checkpoint; empty when given

    @property
    def family(self) -> str:
        if self.usage_info in HUB_FAMILIES:
            return self.usage_info
        if self.arch in CUSTOM_ARCHS:
            return "custom"
        return {"cifar10": "simclr", "stl10": "simclr", "CLIP": "clip"}.get(self.usage_info, "torchvision")


def encoder_spec(usage_info: str, arch: str | None = None, clip_normalization: bool = False) -> EncoderSpec:
    if usage_info not in USAGE_INFOS:
        raise ValueError(f"unknown --encoder_usage_info {usage_info!r}; choose one of {', '.join(USAGE_INFOS)}")
    if usage_info in HUB_FAMILIES:  # input size and normalisation are in the model's config
        raise ValueError(f"--encoder_usage_info {usage_info}: the input size comes from the checkpoint; "
                         "load it with load_encoder")
    arch = arch or DEFAULT_ARCH[usage_info]
    mean, std = CLIP_NORMALIZATION if (usage_info == "CLIP" and clip_normalization) else NORMALIZATION[usage_info]
    import_arch_modules()
    if arch in CUSTOM_ARCHS:
        custom = CUSTOM_ARCHS[arch]
        size = custom.input_size or (32 if usage_info in ("cifar10", "stl10") else 224)
        return EncoderSpec(usage_info, arch, size, mean, std, custom.embed_dim)
    if usage_info in ("cifar10", "stl10"):
        return EncoderSpec(usage_info, arch, 32, mean, std, embed_dim(arch))
    if usage_info == "CLIP":
        arch = clip_arch(arch)
        open_clip_name(arch)
        return EncoderSpec(usage_info, arch, 224, mean, std, clip_embed_dim(arch))
    expected = {"imagenet": "resnet50", "moco": "resnet18"}[usage_info]
    if arch != expected:
        raise ValueError(f"--encoder_usage_info {usage_info} uses --arch {expected}, not {arch!r}")
    return EncoderSpec(usage_info, arch, 224, mean, std, 2048 if arch == "resnet50" else 512)


def get_encoder(usage_info: str, arch: str | None = None) -> nn.Module:
    """A randomly initialised encoder for usage info/arch: float (N,3,S,S) normalised -> (N, embed_dim)."""
    spec = encoder_spec(usage_info, arch)
    if spec.family == "custom":
        return CUSTOM_ARCHS[spec.arch].factory()
    if spec.family == "simclr":
        return SimCLRBackbone(spec.arch)
    if spec.family == "clip":
        return clip_visual(spec.arch)
    import torchvision
    net = getattr(torchvision.models, spec.arch)(weights=None)
    net.fc = nn.Identity()
    return net


DEFAULT_USAGE_INFO = "cifar10"  # the paper's main.py default, for a checkpoint that names no family


def resolve_usage_info(path, usage_info: str | None, config_path=None) -> str:
    """--encoder_usage_info, or when it is not given the hub family the path (or --model_config) names, else
    the default: a hub folder needs no family flag."""
    return usage_info or usage_info_from(path, config_path) or DEFAULT_USAGE_INFO


def load_encoder(path, usage_info: str | None, arch: str | None = None, device="cpu",
                 trust_checkpoint: bool = False, clip_normalization: bool = False, encoder_format: str = "auto",
                 model_config=None):
    """Load an encoder (any layout in docs/method.md, safetensors, or a hub folder: docs/formats.md); usage_info None:
    resolve_usage_info; model_config: a hub or open_clip model config JSON for weights without one beside them.

    Returns (model in eval mode on device, EncoderSpec); its parameters are left as they are (trainable),
    the callers that only run it (DECREE, validation) freeze them.
    """
    usage_info = resolve_usage_info(path, usage_info, model_config)
    files = locate(path, encoder_format, model_config)
    sd, embedded = read_weights(files, trust_checkpoint)
    if usage_info in HUB_FAMILIES:
        hub = load_hub_encoder(files, sd, embedded, usage_info, arch)
        return hub.model.to(device).eval(), EncoderSpec(usage_info, hub.arch, hub.input_size, hub.mean, hub.std,
                                                        hub.embed_dim)
    if files.family is not None:
        raise ValueError(f"{path}: is a {files.family} model ({files.config_path.name}); "
                         f"pass --encoder_usage_info {files.family}")
    path = files.weights
    note = ""
    if arch is None:
        arch, note = infer_arch(sd, usage_info, path)
    spec = replace(encoder_spec(usage_info, arch, clip_normalization), arch_note=note)
    sd = adapt_state_dict(sd, spec.family)
    if spec.family == "custom":
        sd = drop_head(sd, CUSTOM_ARCHS[spec.arch].head_prefixes)
    tried = f"--encoder_usage_info {usage_info} --arch {spec.arch}"
    try:
        skeleton = None if spec.family == "clip" else _meta_encoder(usage_info, spec.arch)
        if skeleton is not None:  # shapes and size checked before any real memory is allocated
            with warnings.catch_warnings():  # "copying into a meta parameter is a no-op": only the fit is checked
                warnings.simplefilter("ignore", UserWarning)
                load_into(skeleton, sd, path, tried)
            check_model_fits(skeleton, sd, path)
        model = get_encoder(usage_info, spec.arch)
        load_into(model, sd, path, tried)
    except CheckpointError as err:
        raise CheckpointError(f"{err}{narrow_width_hint(sd, spec)}") from None
    return model.to(device).eval(), spec


def _meta_encoder(usage_info: str, arch: str) -> nn.Module | None:
    """get_encoder on the meta device (no memory), or None for a factory that cannot build there. (open_clip's
    CLIP towers, which cannot, are skipped: their sizes are fixed and known.)"""
    try:
        with torch.device("meta"):
            return get_encoder(usage_info, arch)
    except Exception:  # noqa: BLE001 - a factory (yours, with --arch_module) may fail there its own way
        return None  # the real build reports any error of its own


class NonFiniteEmbeddings(ValueError):
    """An encoder returned NaN/inf: a broken checkpoint, or one that does not match the usage info/arch."""


def check_finite(embeddings: torch.Tensor) -> torch.Tensor:
    """`embeddings` unchanged, or NonFiniteEmbeddings if any entry is NaN/inf (one host sync)."""
    if not torch.isfinite(embeddings).all():
        raise NonFiniteEmbeddings("the encoder returned NaN/inf embeddings; the checkpoint is broken or does not "
                                  "match --encoder_usage_info/--arch")
    return embeddings


def narrow_width_hint(sd: dict, spec: EncoderSpec) -> str:
    """For a SimCLR backbone of another width, the --arch that fits (the stem has `width` output channels)."""
    stem = sd.get("f.0.weight")
    if spec.family != "simclr" or stem is None or stem.shape[0] == 64:
        return ""
    return f" (its stem has {stem.shape[0]} channels: try --arch resnet18_w{stem.shape[0]})"


__all__ = ["CheckpointError", "UnsafeCheckpointError", "EncoderSpec", "encoder_spec", "get_encoder",
           "load_encoder", "NonFiniteEmbeddings", "check_finite", "SimCLR", "SimCLRBackbone", "clip_model",
           "clip_visual", "clip_tokenizer",
           "read_checkpoint", "USAGE_INFOS", "DEFAULT_ARCH", "register_arch", "import_arch_modules",
           "FORMATS", "HUB_FAMILIES", "DEFAULT_USAGE_INFO", "resolve_usage_info", "export_state_dict", "hub_config_of",
           "save_safetensors", "mobilenet_arch"]
