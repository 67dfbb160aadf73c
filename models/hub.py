"""Encoders people download from model hubs: open_clip, Hugging Face transformers CLIP, timm.

Each family is built from a JSON config we parse and check (never a library's from_pretrained, which may
reach the network or run a repository's code), then our own reader's state dict is loaded strictly. The
model is first built on the meta device, where a config describing a huge model costs nothing, and the
weights are checked against it before any real memory is allocated.

Embeddings, as each library defines them:
- open_clip: model.encode_image(x) (= model.visual(x), unnormalised); only the visual tower is kept;
- hf_clip:   model.get_image_features(x) (pooled output through visual_projection; CLIPVisionModel, which
             has no projection: its pooled output);
- timm:      model.forward_head(model.forward_features(x), pre_logits=True), the pooled pre-logits feature.
"""
import logging
import warnings
from dataclasses import dataclass

import torch
from torch import nn

from datasets.normalization import CLIP_NORMALIZATION

from .checkpoint import CheckpointError, check_model_fits, load_into
from .formats import CONFIG_METADATA_KEY, HF_CLIP_ARCHITECTURES, EncoderFiles, embed_config

MAX_CONFIG_INT = 1 << 20  # no width, depth, size or vocabulary of a real model comes near this
MAX_CONFIG_DEPTH = 32      # real configs nest a few levels
MAX_CONFIG_NODES = 100_000  # values in one config; real ones have hundreds
MAX_INPUT_SIZE = 1024       # px: hub models take 224-518; a trigger over more pixels is beyond an inversion's use
MIN_STD = 0.01              # a smaller normalising std would turn pixel rounding into huge inputs


@dataclass
class HubEncoder:
    """A loaded hub model: the wrapped encoder and what it expects (input px, normalisation, output dim)."""
    model: nn.Module
    arch: str
    input_size: int
    mean: tuple
    std: tuple
    embed_dim: int


class _Exportable(nn.Module):
    """Wrappers keep the library's state-dict keys, and the config, so a fine-tuned copy saves loadably."""
    family = ""

    def __init__(self, config: dict):
        super().__init__()
        self.hub_config = embed_config(self.family, config)

    def export_state_dict(self) -> dict:
        return self.state_dict()


class OpenCLIPImageEncoder(_Exportable):
    family = "open_clip"

    def __init__(self, visual: nn.Module, config: dict):
        super().__init__(config)
        self.visual = visual  # keys visual.*: the open_clip layout, text tower left out

    def forward(self, x):
        return self.visual(x)


class HFCLIPImageEncoder(_Exportable):
    family = "hf_clip"

    def __init__(self, model: nn.Module, config: dict):
        super().__init__(config)
        self.vision_model = model.vision_model
        self.visual_projection = getattr(model, "visual_projection", None)

    def forward(self, x):
        pooled = self.vision_model(pixel_values=x).pooler_output
        return pooled if self.visual_projection is None else self.visual_projection(pooled)


class TimmPreLogitsEncoder(_Exportable):
    family = "timm"

    def __init__(self, model: nn.Module, config: dict):
        super().__init__(config)
        self.model = model

    def forward(self, x):
        return self.model.forward_head(self.model.forward_features(x), pre_logits=True)

    def export_state_dict(self) -> dict:
        return {k[len("model."):]: v for k, v in self.state_dict().items()}


def export_state_dict(encoder: nn.Module) -> dict:
    """The state dict to save for `encoder`, in its library's own layout."""
    return encoder.export_state_dict() if isinstance(encoder, _Exportable) else encoder.state_dict()


def hub_config_of(encoder: nn.Module) -> dict | None:
    return encoder.hub_config if isinstance(encoder, _Exportable) else None


# ---- config checks ----------------------------------------------------------------------------------------

def _check_values(obj, where: str, source) -> None:
    """Config values are JSON data of sane size: numbers bounded, lists and dicts only, at most MAX_CONFIG_DEPTH
    deep and MAX_CONFIG_NODES values in all (shared references count each time: no walk can blow up)."""
    stack, seen = [(obj, where, 0)], 0
    while stack:
        value, at, depth = stack.pop()
        seen += 1
        if seen > MAX_CONFIG_NODES or depth > MAX_CONFIG_DEPTH:
            what = f"holds more than {MAX_CONFIG_NODES} values" if seen > MAX_CONFIG_NODES else \
                f"is nested more than {MAX_CONFIG_DEPTH} deep"
            raise CheckpointError(f"{source}: {where} {what}, too much for a model config; use the config that came "
                                  "with the weights")
        if isinstance(value, dict):
            stack += [(v, f"{at}.{k}", depth + 1) for k, v in value.items()]
        elif isinstance(value, (list, tuple)):
            stack += [(v, f"{at}[{i}]", depth + 1) for i, v in enumerate(value)]
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and \
                not -MAX_CONFIG_INT <= value <= MAX_CONFIG_INT:
            raise CheckpointError(f"{source}: {at} = {value} is out of range for a model config; fix the config")


def _normalization(values, default, source, what: str, low: float, high: float) -> tuple:
    """A config's mean or std: 3 numbers (or 1, for every channel) in [low, high]; `default` when absent."""
    if values is None:
        return tuple(default)
    values = [values] if isinstance(values, (int, float)) else values
    if not (isinstance(values, (list, tuple)) and len(values) in (1, 3) and all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and low <= v <= high for v in values)):
        raise CheckpointError(f"{source}: {what} {values!r:.80} is not 3 numbers in [{low:g}, {high:g}]; fix the "
                              "config")
    return tuple(float(v) for v in values) * (3 if len(values) == 1 else 1)


def _mean_std(config: dict, mean_key: str, std_key: str, source) -> tuple[tuple, tuple]:
    """(mean, std) of images in [0,1] from a config, each range-checked, CLIP's where absent."""
    return (_normalization(config.get(mean_key), CLIP_NORMALIZATION[0], source, mean_key, 0.0, 1.0),
            _normalization(config.get(std_key), CLIP_NORMALIZATION[1], source, std_key, MIN_STD, 1.0))


def _config_error(source, family: str, err: Exception) -> CheckpointError:
    detail = str(err).splitlines()[0] if str(err) else type(err).__name__
    return CheckpointError(f"{source}: does not describe a {family} model ({detail}); fix the config or give "
                           "--arch with an architecture the library knows")


def _square(size, source) -> int:
    """The square input size (px) a config gives, at most MAX_INPUT_SIZE."""
    try:
        h, w = (size, size) if isinstance(size, int) else tuple(size)[-2:]
    except (TypeError, ValueError):
        raise CheckpointError(f"{source}: input size {size!r:.40} is not a size in pixels; fix the config") from None
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in (h, w)):
        raise CheckpointError(f"{source}: input size {size!r:.40} is not a size in pixels; fix the config")
    if h != w:
        raise CheckpointError(f"{source}: input size {h}x{w} is not square; DECREE inverts square triggers")
    if not 1 <= h <= MAX_INPUT_SIZE:
        raise CheckpointError(f"{source}: input size {h} px is outside 1..{MAX_INPUT_SIZE}, the sizes an inversion "
                              "can use (docs/formats.md); fix the config")
    return int(h)


def _build_and_load(build, sd: dict, files: EncoderFiles, family: str, tried: str) -> nn.Module:
    """Build on meta, check the weights fit, then build for real and load them (strict)."""
    source = files.config_path or files.weights
    try:
        with torch.device("meta"):
            skeleton = build()
    except (TypeError, ValueError, KeyError, AssertionError) as err:
        raise _config_error(source, family, err) from None
    except (NotImplementedError, RuntimeError):
        skeleton = None  # a constructor that computes on tensors; the real build below checks the same
    if skeleton is not None:
        with warnings.catch_warnings():  # "copying into a meta parameter is a no-op": only the fit is checked
            warnings.simplefilter("ignore", UserWarning)
            load_into(skeleton, sd, files.weights, tried)
        check_model_fits(skeleton, sd, files.weights)
    try:
        model = build()
    except (TypeError, ValueError, KeyError, AssertionError, RuntimeError) as err:
        raise _config_error(source, family, err) from None
    load_into(model, sd, files.weights, tried)
    return model.eval()


def _quiet_open_clip():
    # open_clip logs "no pretrained weights loaded" on every build; we load them ourselves
    logging.getLogger().setLevel(max(logging.getLogger().level, logging.ERROR))


# ---- open_clip --------------------------------------------------------------------------------------------

def _open_clip_cfg(files: EncoderFiles, arch: str | None, config: dict | None):
    """(name, model_cfg, preprocess_cfg, source) from --arch (a name open_clip knows) or the hub config."""
    import open_clip
    if arch:
        model_cfg = open_clip.get_model_config(arch.replace("/", "-"))
        if model_cfg is None:
            raise ValueError(f"--arch {arch}: open_clip does not know this architecture; choose one of "
                             "open_clip.list_models() (e.g. ViT-B-16, ViT-L-14-336, RN50) or drop --arch to use "
                             "the folder's open_clip_config.json")
        return arch, model_cfg, model_cfg.get("preprocess_cfg", {}), f"--arch {arch}"
    source = files.config_path or files.weights
    if config is None:
        raise CheckpointError(f"{files.weights}: no open_clip_config.json beside it; pass --arch (an open_clip "
                              "model name such as ViT-B-16) or the hub folder")
    model_cfg = config.get("model_cfg")
    if not isinstance(model_cfg, dict) or not isinstance(model_cfg.get("vision_cfg"), dict) or \
            not isinstance(model_cfg.get("embed_dim"), int):
        raise CheckpointError(f"{source}: model_cfg needs embed_dim (int) and vision_cfg (object); re-download "
                              "the config or pass --arch with an open_clip model name")
    preprocess = config.get("preprocess_cfg") or {}
    if not isinstance(preprocess, dict):
        raise CheckpointError(f"{source}: preprocess_cfg must be an object; fix the config")
    _check_values(config, "open_clip_config", source)
    return "custom", model_cfg, preprocess, source


def load_open_clip(files: EncoderFiles, sd: dict, arch: str | None, config: dict | None) -> HubEncoder:
    from open_clip.model import CLIPVisionCfg, _build_vision_tower
    name, model_cfg, preprocess, source = _open_clip_cfg(files, arch, config)
    vision = dict(model_cfg["vision_cfg"])
    unknown = set(vision) - set(CLIPVisionCfg.__dataclass_fields__)
    if unknown:
        raise CheckpointError(f"{source}: unknown vision_cfg key(s) {sorted(unknown)}; this open_clip does not "
                              "know them (fix the config or upgrade open_clip)")
    vision["timm_model_pretrained"] = False  # a timm tower's weights come from this checkpoint, not a download
    if any(k.startswith("visual.") for k in sd):
        sd = {k[len("visual."):]: v for k, v in sd.items() if k.startswith("visual.")}
    _quiet_open_clip()
    embed_dim = model_cfg["embed_dim"]
    mean, std = _mean_std(preprocess, "mean", "std", source)
    size = _square(preprocess.get("size", vision.get("image_size", 224)), source)
    _square(vision.get("image_size", size), source)
    visual = _build_and_load(lambda: _build_vision_tower(embed_dim, vision, model_cfg.get("quick_gelu", False)),
                             sd, files, "open_clip", f"open_clip {name}")
    cfg = {"model_cfg": model_cfg, "preprocess_cfg": preprocess}
    return HubEncoder(OpenCLIPImageEncoder(visual, cfg), name, size, mean, std, embed_dim)


# ---- Hugging Face transformers CLIP -----------------------------------------------------------------------

def load_hf_clip(files: EncoderFiles, sd: dict, arch: str | None, config: dict | None) -> HubEncoder:
    import transformers
    source = files.config_path or files.weights
    if config is None:
        raise CheckpointError(f"{files.weights}: no readable Hugging Face config.json beside it; pass the model's folder "
                              "(config.json + model.safetensors)")
    _check_values(config, "config", source)
    architecture = arch or (config.get("architectures") or ["CLIPModel" if config.get("model_type") == "clip"
                                                           else "CLIPVisionModelWithProjection"])[0]
    if architecture not in HF_CLIP_ARCHITECTURES:
        raise CheckpointError(f"{source}: architecture {architecture!r} is not a CLIP image model; supported: "
                              f"{', '.join(HF_CLIP_ARCHITECTURES)} (pass --arch to choose one)")
    config_class = transformers.CLIPConfig if config.get("model_type") == "clip" else transformers.CLIPVisionConfig
    try:
        hf_config = config_class.from_dict({k: v for k, v in config.items() if k != "auto_map"})
    except (TypeError, ValueError, KeyError) as err:
        raise _config_error(source, "Hugging Face CLIP", err) from None
    model_class = getattr(transformers, architecture)
    vision_config = hf_config.vision_config if config_class is transformers.CLIPConfig else hf_config
    if architecture != "CLIPModel" and config_class is transformers.CLIPConfig:
        hf_config = vision_config  # a vision-only class over a full CLIP config: its vision part
    # checkpoints from before transformers 4.31 also store the position_ids buffers, now rebuilt at init
    sd = {k: v for k, v in sd.items() if not k.endswith("embeddings.position_ids")}
    size = _square(vision_config.image_size, source)
    preprocessor = files.weights.parent / "preprocessor_config.json"
    _check_values(files.extra, "preprocessor_config", preprocessor)
    mean, std = _mean_std(files.extra, "image_mean", "image_std", preprocessor)
    model = _build_and_load(lambda: model_class(hf_config), sd, files, "Hugging Face CLIP",
                            f"transformers {architecture}")
    embed_dim = getattr(hf_config, "projection_dim", None) if architecture != "CLIPVisionModel" else None
    return HubEncoder(HFCLIPImageEncoder(model, config), architecture, size, mean, std,
                      embed_dim or vision_config.hidden_size)


# ---- timm -------------------------------------------------------------------------------------------------

FORBIDDEN_TIMM_ARGS = ("pretrained", "checkpoint", "file", "url", "hub", "path")


def _timm_num_classes(arch: str, sd: dict, config: dict | None) -> int:
    """The classifier size the weights were saved with (0 = none): from the config, else the head's shape."""
    import timm
    if config is not None and isinstance(config.get("num_classes"), int):
        return config["num_classes"]
    pretrained = timm.models.get_pretrained_cfg(arch)
    heads = (pretrained.classifier if pretrained is not None else None) or "head"
    heads = heads if isinstance(heads, (list, tuple)) else (heads,)
    weight = sd.get(f"{heads[0]}.weight")
    return int(weight.shape[0]) if weight is not None else 0


def load_timm(files: EncoderFiles, sd: dict, arch: str | None, config: dict | None) -> HubEncoder:
    import timm
    from timm.data import resolve_data_config
    source = files.config_path or files.weights
    if config is not None:
        _check_values(config, "config", source)
    named_by = "--arch" if arch else f"{source}: architecture"
    arch = arch or (config or {}).get("architecture")
    if not arch:
        raise CheckpointError(f"{files.weights}: no timm config.json beside it; pass --arch (a timm model name "
                              "such as vit_small_patch16_224.dino)")
    if ":" in arch or not timm.is_model(arch.split(".")[0]):
        raise ValueError(f"{named_by} {arch!r} is not a timm architecture; choose one of timm.list_models() "
                         "(e.g. vit_small_patch16_224, resnet50)")
    model_args = (config or {}).get("model_args") or {}
    if not isinstance(model_args, dict):
        raise CheckpointError(f"{source}: model_args must be an object; fix the config")
    refused = [k for k in model_args if any(word in k for word in FORBIDDEN_TIMM_ARGS)]
    if refused:
        raise CheckpointError(f"{source}: model_args {refused} would make timm fetch or read other files; "
                              "remove them from the config")
    model_args = {**model_args, "num_classes": _timm_num_classes(arch, sd, config)}
    model = _build_and_load(lambda: timm.create_model(arch, pretrained=False, **model_args),
                            sd, files, "timm", f"timm {arch}")
    data = resolve_data_config({}, pretrained_cfg=(config or {}).get("pretrained_cfg"), model=model)
    embed_dim = getattr(model, "head_hidden_size", None) or model.num_features
    mean, std = _mean_std(data, "mean", "std", source)
    return HubEncoder(TimmPreLogitsEncoder(model, config or {"architecture": arch, "model_args": model_args}),
                      arch, _square(data["input_size"], source), mean, std, embed_dim)


LOADERS = {"open_clip": load_open_clip, "hf_clip": load_hf_clip, "timm": load_timm}


def load_hub_encoder(files: EncoderFiles, sd: dict, embedded: dict | None, family: str,
                     arch: str | None = None) -> HubEncoder:
    """The encoder of `family` from a state dict; config from the hub folder, else embedded in the file."""
    if files.family is not None and files.family != family:
        raise ValueError(f"{files.config_path}: is a {files.family} config; pass --encoder_usage_info {files.family}")
    config = files.config
    if sd and all(k.startswith("module.") for k in sd):  # saved from DistributedDataParallel (open_clip's training)
        sd = {k[len("module."):]: v for k, v in sd.items()}
    if config is None and embedded is not None:
        if embedded.get("family") != family or not isinstance(embedded.get("config"), dict):
            raise CheckpointError(f"{files.weights}: its {CONFIG_METADATA_KEY} is for {embedded.get('family')!r}, "
                                  f"not {family}; pass --encoder_usage_info {embedded.get('family')}")
        config = embedded["config"]
    return LOADERS[family](files, sd, arch, config)
