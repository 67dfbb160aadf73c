"""Safe checkpoint reading and layout detection (docs/method.md): one loader for every script.

Nothing in a checkpoint runs unless the user passes --trust_checkpoint: torch.save files are read by torch's
weights-only unpickler (or, for pickle protocol 4/5, by models.torchscript's restricted one), TorchScript
archives by models.torchscript, never by torch.jit.load.
"""
import io
import pickle
import pickletools
import warnings
import zipfile
from pathlib import Path

import torch

from .torchscript import (MAX_PICKLE_BYTES, NeedsCode, TorchScriptError, read_pickled_weights,
                          read_torchscript_state_dict)


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message names the file and the fix."""


class UnsafeCheckpointError(CheckpointError):
    """A well-formed checkpoint whose loading would need arbitrary unpickling (it could run code)."""


def _is_torchscript(path: Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    try:
        with zipfile.ZipFile(path) as zf:
            return any(n.endswith("/constants.pkl") or "/code/" in n for n in zf.namelist())
    except (zipfile.BadZipFile, OSError):
        return False


def _unsafe(path, needs: str) -> UnsafeCheckpointError:
    return UnsafeCheckpointError(
        f"{path}: refused: {needs}, and loading it would run code the file chooses. Only if you trust its "
        "source, rerun with --trust_checkpoint")


def _corrupt(path, detail: str) -> CheckpointError:
    return CheckpointError(f"{path}: not a PyTorch checkpoint, or truncated or corrupt ({detail}); "
                           "re-download it or re-create it with torch.save")


def pickle_globals(data: bytes, pickles: int = 1):
    """The globals (module.name) the first `pickles` pickles in `data` import ('?' for a STACK_GLOBAL, whose
    name is on the stack), or None if they are not well-formed pickles. Reads opcodes only; runs nothing."""
    stream = io.BytesIO(data)
    found = []
    try:
        for _ in range(pickles):
            for opcode, arg, _ in pickletools.genops(stream):
                if opcode.name in ("GLOBAL", "INST"):
                    found.append(arg.replace(" ", "."))
                elif opcode.name == "STACK_GLOBAL":
                    found.append("?")
    except Exception:  # noqa: BLE001 - genops raises ValueError, KeyError, ... on garbage
        return None
    return found


def _well_formed_needs(path: Path, unpickler_says: str | None = None) -> str | None:
    """Why a well-formed pickle that torch's weights-only loader refused needs more; None for corruption."""
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as zf:
                name = next(n for n in zf.namelist() if n.count("/") == 1 and n.endswith("/data.pkl"))
                with zf.open(name) as fh:
                    found = pickle_globals(fh.read(MAX_PICKLE_BYTES))
        else:  # torch's legacy format: magic number, protocol, system info, then the object
            with open(path, "rb") as fh:
                found = pickle_globals(fh.read(MAX_PICKLE_BYTES), pickles=4)
    except (StopIteration, zipfile.BadZipFile, OSError, EOFError):
        return None
    if found is None:
        return None
    if unpickler_says:
        return f"it is a pickle that needs more than weights ({unpickler_says})"
    foreign = [g for g in found if g != "?" and not g.startswith(("torch.", "collections.OrderedDict"))]
    return "it is a pickle that needs more than weights" + (f" (it references {foreign[0]})" if foreign else "")


def read_checkpoint(path, trust_checkpoint: bool = False):
    """torch.load with weights_only=True (or without, only when trusted); TorchScript archives by our own
    reader (torch.jit.load, which runs the archive's code, only when trusted)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file; check --encoder_path")
    if _is_torchscript(path):
        return _read_torchscript(path, trust_checkpoint)
    try:
        with warnings.catch_warnings():  # torch's notes on protocols and sparse checks would break the one-line errors
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=not trust_checkpoint)
    except pickle.UnpicklingError as err:
        if "Weights only load failed" not in str(err):
            raise _corrupt(path, str(err).splitlines()[0]) from err
        unpickler_says = None
        if zipfile.is_zipfile(path):  # pickle protocol 4/5 is refused for its opcodes alone: read it ourselves
            try:
                return read_pickled_weights(path)
            except NeedsCode as inner:
                unpickler_says = str(inner)
            except (TorchScriptError, zipfile.BadZipFile, OSError) as inner:
                raise _corrupt(path, str(inner)) from err
        needs = _well_formed_needs(path, unpickler_says)
        if needs is None:
            raise _corrupt(path, "not a well-formed pickle") from err
        raise _unsafe(path, needs) from err
    except Exception as err:  # noqa: BLE001 - the unpickler fails on garbage with KeyError, IndexError, ...
        first = f"{type(err).__name__}: {str(err).splitlines()[0]}" if str(err) else type(err).__name__
        raise _corrupt(path, first) from err


def _read_torchscript(path: Path, trust_checkpoint: bool) -> dict:
    if trust_checkpoint:  # the user vouches for the file: torch's own loader, which runs its code
        try:
            return torch.jit.load(str(path), map_location="cpu").state_dict()
        except RuntimeError as err:
            raise CheckpointError(f"{path}: broken TorchScript archive ({str(err).splitlines()[0]})") from err
    try:
        return read_torchscript_state_dict(path)
    except NeedsCode as err:
        raise _unsafe(path, f"this TorchScript archive cannot be read as weights alone: {err}") from err
    except (TorchScriptError, zipfile.BadZipFile, OSError, EOFError) as err:
        raise CheckpointError(f"{path}: broken TorchScript archive ({err}); re-download it or re-save it "
                              "with torch.jit.save") from err


# tensors a state dict may hold: dense (strided) tensors with their data in memory
_UNSUPPORTED_TENSOR = (
    (lambda t: t.is_meta, "a meta tensor (shape only, no values)", "save it after loading real weights"),
    (lambda t: t.layout != torch.strided, "a sparse tensor", "save it with .to_dense()"),
    (lambda t: t.is_quantized, "a quantized tensor", "save it with .dequantize()"),
    (lambda t: t.is_nested, "a nested tensor", "save a dense tensor"),
)


def _check_tensor(key, value, path) -> None:
    for test, kind, fix in _UNSUPPORTED_TENSOR:
        if test(value):
            raise CheckpointError(f"{path}: entry {key!r} is {kind}, not dense weights; {fix}")
    # an expanded view (stride 0) claims more elements than the file stores: a tiny file describing a huge model
    if value.numel() * value.element_size() > value.untyped_storage().nbytes():
        raise CheckpointError(f"{path}: entry {key!r} of shape {tuple(value.shape)} is an expanded view of "
                              f"{value.untyped_storage().nbytes()} stored bytes, not weights; save real tensors "
                              "(model.state_dict() after .clone() of any expanded one)")


def _view_key(tensor: torch.Tensor) -> tuple:
    return tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape), tensor.stride(), \
        tensor.dtype


def claimed_elements(sd: dict) -> int:
    """Elements a model loading `sd` holds: every distinct view once (a weight tied to another counts once)."""
    return sum(t.numel() for t in {_view_key(t): t for t in sd.values()}.values())


def stored_elements(sd: dict) -> int:
    """Elements the file really stores for the tensors of `sd`: each storage once, in the narrowest element size
    of the tensors viewing it (an fp16 file stores half the bytes of the float32 model it loads into)."""
    storages = {}
    for t in sd.values():
        ptr, nbytes = t.untyped_storage().data_ptr(), t.untyped_storage().nbytes()
        storages[ptr] = max(storages.get(ptr, 0), nbytes // max(1, t.element_size()))
    return sum(storages.values())


def check_fits_storage(elements: int, sd: dict, path, what: str = "its tensors") -> None:
    """Refuse when `elements` (a model's, or the views') exceed what the file stores: memory is bounded by the
    file's size, before anything real is built."""
    stored = stored_elements(sd)
    if elements > stored:
        raise CheckpointError(f"{path}: {what} would hold {elements} elements but the file stores {stored} "
                              "(views that overlap or repeat one storage); refused, re-save the real weights "
                              "with torch.save(model.state_dict())")


def check_model_fits(model: torch.nn.Module, sd: dict, path) -> None:
    """`model` (built on the meta device) holds no more than the file stores for `sd`."""
    tensors = {id(t): t for t in model.state_dict(keep_vars=True).values()}  # a tied weight once
    check_fits_storage(sum(t.numel() for t in tensors.values()), sd, path, "the model it describes")


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
    sd = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    bad_key = next((k for k in sd if not isinstance(k, str)), None)
    if bad_key is not None:
        raise CheckpointError(f"{path}: its state dict has a key that is not a parameter name ({bad_key!r:.40}); "
                              "save model.state_dict(), whose keys are strings")
    for key, value in sd.items():
        _check_tensor(key, value, path)
    check_fits_storage(claimed_elements(sd), sd, path)
    return sd


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
