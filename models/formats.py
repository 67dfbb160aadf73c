"""Weight files and hub folders: which format a path is, and reading it without running anything from it.

Detection rules (docs/formats.md), overridden by --encoder_format:
- a folder is a hub snapshot: `open_clip_config.json` (or an open_clip model config: `embed_dim` and
  `vision_cfg`) -> open_clip; `config.json` with a CLIP `model_type` or `architectures` -> hf_clip; `config.json`
  with a timm `architecture` -> timm; another Hugging Face `model_type` is refused by name. Its weights file is
  the first of WEIGHT_NAMES present (else the folder's only weights file); a folder holding one of WEIGHT_NAMES
  is one encoder, whichever of its weight files a glob names (hub_folder_of).
- a file ending in .safetensors, or starting with a safetensors header, is read as safetensors; anything else
  (.pth, .pt, .bin) by read_checkpoint (torch.load with weights_only=True; TorchScript archives by their
  tensors). A hub config file next to a weights file is used as that file's config (open_clip's training
  checkpoints, epoch_N.pt, load beside the run's model config); --model_config names one explicitly.
"""
import json
import math
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path

from common.files import SpecialFileError, check_regular, read_bounded

from .checkpoint import CheckpointError, extract_state_dict, read_checkpoint

FORMATS = ("auto", "torch", "safetensors")
HUB_FAMILIES = ("open_clip", "hf_clip", "timm")
WEIGHT_NAMES = ("open_clip_model.safetensors", "model.safetensors", "open_clip_pytorch_model.bin",
                "pytorch_model.bin")
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
CONFIG_NAMES = ("open_clip_config.json", "config.json")
MAX_CONFIG_BYTES = 1 << 20      # hub configs are a few KiB; a bigger one is not a config
MAX_HEADER_BYTES = 100 << 20    # the safetensors library's own cap on the JSON header
# where our own checkpoints carry the encoder's hub config (see embed_config)
CONFIG_METADATA_KEY = "decree_encoder_config"
HF_CLIP_ARCHITECTURES = ("CLIPModel", "CLIPVisionModel", "CLIPVisionModelWithProjection")
HF_CLIP_MODEL_TYPES = ("clip", "clip_vision_model")
SAFETENSORS_DTYPES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
                      "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "U32": 4, "U64": 8}


@dataclass
class EncoderFiles:
    """What a path points at: the weights file, its format, and the hub config (family + parsed JSON) if any."""
    weights: Path
    format: str                      # torch | safetensors
    family: str | None = None        # open_clip | hf_clip | timm, from the config
    config: dict | None = None
    config_path: Path | None = None
    extra: dict = field(default_factory=dict)  # preprocessor_config.json of an HF folder


def read_json_config(path: Path) -> dict:
    """A JSON object from a small regular file: hub configs are data, parsed by us, never code."""
    try:
        text = read_bounded(path, MAX_CONFIG_BYTES, "model config").decode("utf-8")
    except SpecialFileError as err:
        raise CheckpointError(str(err)) from None
    except UnicodeDecodeError as err:
        raise CheckpointError(f"{path}: not valid JSON ({err}); re-download the model's config") from None
    obj = parse_json(text, path, "re-download the model's config")
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: a model config must be a JSON object; re-download the model's config")
    return obj


def is_open_clip_model_config(config: dict) -> bool:
    """open_clip's own model config (open_clip/model_configs/*.json, or a custom one): embed_dim + vision_cfg."""
    return isinstance(config.get("embed_dim"), int) and isinstance(config.get("vision_cfg"), dict)


def parse_json(text: str, source, fix: str):
    """json.loads, with bad or absurdly nested JSON (RecursionError) as a CheckpointError naming `source`."""
    try:
        return json.loads(text)
    except (json.JSONDecodeError, RecursionError) as err:
        what = "nested too deep" if isinstance(err, RecursionError) else str(err)
        raise CheckpointError(f"{source}: not valid JSON ({what}); {fix}") from None


def config_family(path: Path, config: dict) -> str | None:
    """open_clip | hf_clip | timm for a hub config, None for any other JSON (e.g. a training run's config).

    A Hugging Face config of another model type (DINOv2, ViT-MAE, ...) is refused by name: its embedding is not
    a CLIP image embedding, and guessing which output stands for it would make verdicts about another model."""
    if path.name == "open_clip_config.json" or "model_cfg" in config or is_open_clip_model_config(config):
        return "open_clip"
    if config.get("model_type") in HF_CLIP_MODEL_TYPES or \
            set(config.get("architectures") or ()) & set(HF_CLIP_ARCHITECTURES):
        return "hf_clip"
    if isinstance(config.get("architecture"), str):
        return "timm"
    if isinstance(config.get("model_type"), str) and "transformers_version" in config:
        kind = " ".join(map(str, config.get("architectures") or [config["model_type"]]))
        raise CheckpointError(
            f"{path}: a Hugging Face {kind} model; supported are CLIP image encoders "
            f"({', '.join(HF_CLIP_ARCHITECTURES)}), open_clip and timm folders (timm exports of DINOv2, MAE, ... load as timm: vit_small_patch14_dinov2, "
            "vit_base_patch16_224.mae)")
    return None


def as_hub_config(family: str, config: dict) -> dict:
    """An open_clip model config (embed_dim, vision_cfg, ...) in the hub layout {model_cfg, preprocess_cfg}."""
    if family == "open_clip" and "model_cfg" not in config and is_open_clip_model_config(config):
        return {"model_cfg": config, "preprocess_cfg": {}}
    return config


def _hub_config(folder: Path, beside_a_file: bool = False):
    """(family, config, path) of the folder's hub config, or Nones.

    Beside a weights file, a config.json that is not a readable hub config is someone else's file (e.g. the
    config.json our attack scripts write next to their checkpoints) and is passed over.
    """
    for name in CONFIG_NAMES:
        path = folder / name
        if os.path.lexists(path):  # a link to a device or /proc entry is refused by read_json_config
            try:
                config = read_json_config(path)
            except CheckpointError:
                if beside_a_file and name == "config.json":
                    continue
                raise
            family = config_family(path, config)
            if family:
                return family, as_hub_config(family, config), path
    return None, None, None


def model_config(path) -> tuple[str, dict, Path]:
    """(family, config, path) of a --model_config file: a hub config, or an open_clip model config JSON."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"--model_config {path}: no such file; give the model's config JSON "
                              "(open_clip_config.json, an open_clip model config, a Hugging Face/timm config.json)")
    config = read_json_config(path)
    family = config_family(path, config)
    if family is None:
        raise CheckpointError(f"--model_config {path}: not an open_clip, Hugging Face CLIP or timm config "
                              "(an open_clip model config has embed_dim and vision_cfg)")
    return family, as_hub_config(family, config), path


def hub_folder_of(path) -> Path | None:
    """The hub folder a weights file belongs to (a folder with a hub config and one of WEIGHT_NAMES), or None.

    Such a folder is one encoder: open_clip's folders hold the same weights twice (.safetensors and .bin)."""
    path = Path(path)
    folder = path if path.is_dir() else path.parent
    if path.is_file() and path.name not in WEIGHT_NAMES:
        return None
    if not any((folder / name).is_file() for name in WEIGHT_NAMES):
        return None
    try:
        family, _, _ = _hub_config(folder)
    except CheckpointError:
        return None
    return folder if family else None


def usage_info_from(path, config_path=None) -> str | None:
    """The hub family of --encoder_path (a hub folder, a weights file beside a hub config, or --model_config),
    or None when nothing names one (a paper checkpoint: --encoder_usage_info decides)."""
    if config_path:
        return model_config(config_path)[0]
    path = Path(path)
    if path.is_dir():
        return _hub_config(path)[0]
    return _hub_config(path.parent, beside_a_file=True)[0] if path.is_file() else None


def _weights_in(folder: Path) -> Path:
    for name in WEIGHT_NAMES:
        if os.path.lexists(folder / name):
            return folder / name
    found = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix in WEIGHT_SUFFIXES)
    if len(found) != 1:
        what = "no weights file" if not found else f"{len(found)} weights files"
        raise CheckpointError(f"{folder}: {what} ({', '.join(WEIGHT_NAMES)} or one *.safetensors/*.bin/*.pth); "
                              "pass the weights file itself as --encoder_path")
    return found[0]


def sniff_format(path: Path) -> str:
    """safetensors if the suffix says so or the file opens with a plausible safetensors header, else torch."""
    if path.suffix == ".safetensors":
        return "safetensors"
    with open(path, "rb") as fh:
        head = fh.read(9)
    if len(head) == 9 and head[8:9] == b"{" and 0 < struct.unpack("<Q", head[:8])[0] <= MAX_HEADER_BYTES:
        return "safetensors"
    return "torch"


def locate(path, encoder_format: str = "auto", given_config=None) -> EncoderFiles:
    """Resolve --encoder_path (file or hub folder) into its weights file, format and hub config (given_config:
    --model_config, which wins over a config beside the weights)."""
    path = Path(path)
    if encoder_format not in FORMATS:
        raise ValueError(f"--encoder_format {encoder_format!r}: choose one of {', '.join(FORMATS)}")
    if path.is_dir():
        family, config, config_path = _hub_config(path)
        weights = _weights_in(path)
    elif os.path.exists(path):
        weights = path
        family, config, config_path = _hub_config(path.parent, beside_a_file=True)
    else:
        raise CheckpointError(f"{path}: no such checkpoint file or folder; check --encoder_path")
    if given_config:
        family, config, config_path = model_config(given_config)


    try:
        check_regular(weights, "weights file")
    except SpecialFileError as err:
        raise CheckpointError(str(err)) from None
    fmt = sniff_format(weights) if encoder_format == "auto" else encoder_format
    extra = {}
    preprocessor = weights.parent / "preprocessor_config.json"
    if family == "hf_clip" and os.path.lexists(preprocessor):
        extra = read_json_config(preprocessor)
    return EncoderFiles(weights, fmt, family, config, config_path, extra)


# ---- safetensors ------------------------------------------------------------------------------------------

def _bad_header(path, what: str) -> CheckpointError:
    return CheckpointError(f"{path}: corrupt or forged safetensors header ({what}); re-download the file or "
                           "re-create it with safetensors.torch.save_file")


def read_safetensors_header(path) -> tuple[dict, dict]:
    """Parse and check the header ourselves: (tensor entries, __metadata__), every offset inside the file.

    Layout: 8-byte little-endian header length n, n bytes of JSON, then the data buffer, which the entries'
    data_offsets [begin, end) must cover exactly, without overlap, with end - begin = numel * itemsize.
    """
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            raise _bad_header(path, f"the file has {size} bytes, fewer than the 8-byte header length")
        n = struct.unpack("<Q", head)[0]
        if n > min(MAX_HEADER_BYTES, size - 8):
            raise _bad_header(path, f"header length {n} exceeds the file's {size} bytes or the 100 MiB cap")
        raw = fh.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise _bad_header(path, f"header is not JSON: {err}") from None
    if not isinstance(header, dict):
        raise _bad_header(path, "header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise _bad_header(path, "__metadata__ must map strings to strings")
    buffer, spans = size - 8 - n, []
    for name, entry in header.items():
        if not isinstance(entry, dict) or entry.get("dtype") not in SAFETENSORS_DTYPES:
            raise _bad_header(path, f"tensor {name!r} has no known dtype")
        shape, offsets = entry.get("shape"), entry.get("data_offsets")
        if not (isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)):
            raise _bad_header(path, f"tensor {name!r} has shape {shape!r}")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)
                and 0 <= offsets[0] <= offsets[1] <= buffer):
            raise _bad_header(path, f"tensor {name!r} has offsets {offsets!r} outside the {buffer}-byte data buffer")
        nbytes = math.prod(shape) * SAFETENSORS_DTYPES[entry["dtype"]]
        if offsets[1] - offsets[0] != nbytes:
            raise _bad_header(path, f"tensor {name!r} {entry['dtype']}{shape} needs {nbytes} bytes, "
                                    f"its offsets span {offsets[1] - offsets[0]}")
        spans.append(offsets)
    spans.sort()
    end = 0
    for begin, stop in spans:
        if begin != end:
            raise _bad_header(path, f"data buffer {'overlaps' if begin < end else 'has a hole'} at byte {begin}")
        end = stop
    if end != buffer:
        raise _bad_header(path, f"tensors cover {end} of the {buffer} data bytes")
    return header, metadata


def load_safetensors(path) -> tuple[dict, dict]:
    """(state dict of CPU tensors, metadata) of a checked safetensors file."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    _, metadata = read_safetensors_header(path)
    try:
        return load_file(str(path), device="cpu"), metadata
    except (SafetensorError, OSError) as err:
        raise CheckpointError(f"{path}: unreadable safetensors file ({err}); re-download or re-create it") from err


# ---- one reader for both formats --------------------------------------------------------------------------

def read_weights(files: EncoderFiles, trust_checkpoint: bool = False) -> tuple[dict, dict | None]:
    """(state dict, embedded encoder config or None) of the weights file, in its format."""
    if files.format == "safetensors":
        sd, metadata = load_safetensors(files.weights)
        embedded = metadata.get(CONFIG_METADATA_KEY)
        return sd, parse_json(embedded, f"{files.weights}: metadata {CONFIG_METADATA_KEY}",
                              "re-create the file") if embedded else None
    obj = read_checkpoint(files.weights, trust_checkpoint)
    embedded = obj.get(CONFIG_METADATA_KEY) if isinstance(obj, dict) else None
    return extract_state_dict(obj, files.weights), embedded if isinstance(embedded, dict) else None


def embed_config(family: str, config: dict) -> dict:
    """The value stored under CONFIG_METADATA_KEY, so a checkpoint we write (e.g. a backdoored twin of a hub
    encoder) loads without its original folder."""
    return {"family": family, "config": config}


def save_safetensors(path, state_dict: dict, metadata: dict | None = None) -> None:
    """Atomic safetensors file of CPU tensors; metadata values become JSON strings."""
    from safetensors.torch import save
    from common.io import write_bytes
    tensors = {k: v.detach().cpu().contiguous() for k, v in state_dict.items()}
    text = {k: v if isinstance(v, str) else json.dumps(v) for k, v in (metadata or {}).items()}
    write_bytes(path, save(tensors, metadata=text))

