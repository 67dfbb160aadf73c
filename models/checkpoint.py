"""Safe checkpoint reading and layout detection (SPEC 3): one loader for every script."""
import pickle
import re
import zipfile
from pathlib import Path

import torch


# weights-only unpickler failures that mean "not a pickle torch.save wrote" (random bytes, a cut file),
# as opposed to a well-formed pickle that asks for a non-allowlisted global (which could run code)
_CORRUPT_PICKLE = re.compile(r"Unsupported operand \d+|invalid load key[^.\n]*|[Rr]an out of input")


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message names the file and the fix."""


class UnsafeCheckpointError(CheckpointError):
    """A checkpoint whose loading would need arbitrary unpickling (it could run code)."""


def _is_torchscript(path: Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    try:
        with zipfile.ZipFile(path) as zf:
            return any(n.endswith("/constants.pkl") or "/code/" in n for n in zf.namelist())
    except zipfile.BadZipFile:
        return False


def read_checkpoint(path, trust_checkpoint: bool = False):
    """torch.load with weights_only=True (or without, only when trusted); TorchScript archives via jit."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file; check --encoder_path")
    if _is_torchscript(path):
        # OpenAI's released CLIP .pt files; reading their tensors does not execute the model's code
        try:
            return torch.jit.load(str(path), map_location="cpu").state_dict()
        except RuntimeError as err:
            raise CheckpointError(f"{path}: broken TorchScript archive ({str(err).splitlines()[0]})") from err
    try:
        return torch.load(path, map_location="cpu", weights_only=not trust_checkpoint)
    except pickle.UnpicklingError as err:
        text = str(err)
        if "Weights only load failed" in text and not _CORRUPT_PICKLE.search(text):
            culprit = re.search(r"GLOBAL (\S+)", text)
            needs = f" (it references {culprit.group(1)})" if culprit else ""
            raise UnsafeCheckpointError(
                f"{path}: refused: loading it needs arbitrary unpickling{needs}, which can run code hidden in "
                "the file. Only if you trust its source, rerun with --trust_checkpoint") from err
        detail = _CORRUPT_PICKLE.search(text)
        raise CheckpointError(f"{path}: not a PyTorch checkpoint, truncated or corrupt "
                              f"({detail.group(0) if detail else text.splitlines()[0]}); "
                              "re-download or re-create it with torch.save") from err
    except Exception as err:  # noqa: BLE001 - the unpickler fails on garbage with KeyError, IndexError, ...
        first = f"{type(err).__name__}: {str(err).splitlines()[0]}" if str(err) else type(err).__name__
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint, truncated or corrupt ({first}); "
                              "re-download or re-create it") from err


def extract_state_dict(obj, path) -> dict:
    """The tensor dict inside a checkpoint: obj['state_dict'], obj['model'], a bare dict or a module."""
    if isinstance(obj, torch.nn.Module):
        obj = obj.state_dict()
    if isinstance(obj, dict):
        for key in ("state_dict", "model"):
            if key in obj and isinstance(obj[key], dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not any(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path}: holds no state dict (a dict of tensors, or one under 'state_dict')")
    return {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}


def _strip(sd: dict, prefix: str) -> dict:
    return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}


def adapt_state_dict(sd: dict, family: str) -> dict:
    """Map any known layout onto the keys of our model for `family` (simclr, clip, torchvision)."""
    if all(k.startswith("module.") for k in sd):
        sd = _strip(sd, "module.")
    if any(k.startswith("encoder_q.") for k in sd):  # MoCo: keep the query encoder
        sd = _strip(sd, "encoder_q.")
    if family == "simclr":
        if any(k.startswith("f.f.") for k in sd):  # full SimCLR model: backbone f.f.*, head g.* ignored
            sd = {k[2:]: v for k, v in sd.items() if k.startswith("f.f.")}
    elif family == "clip":
        if any(k.startswith("visual.") for k in sd):  # full CLIP model
            sd = _strip(sd, "visual.")
    elif family == "torchvision":
        if any(k.startswith("visual.") for k in sd):
            sd = _strip(sd, "visual.")
        sd = {k: v for k, v in sd.items() if not k.startswith("fc.")}
    return sd


def load_into(model: torch.nn.Module, sd: dict, path, tried: str) -> None:
    """load_state_dict(strict) with an error that lists the first missing/unexpected keys and what was tried."""
    own = model.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    wrong_shape = [f"{k} {tuple(sd[k].shape)} vs {tuple(own[k].shape)}"
                   for k in own if k in sd and sd[k].shape != own[k].shape]
    if missing or unexpected or wrong_shape:
        parts = []
        for name, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong_shape)):
            if keys:
                parts.append(f"{len(keys)} {name} (e.g. {', '.join(keys[:4])})")
        raise CheckpointError(f"{path}: does not fit {tried}: {'; '.join(parts)}. "
                              "Check --encoder_usage_info and --arch")
    model.load_state_dict(sd, strict=True)
