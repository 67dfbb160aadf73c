"""The tensors of a TorchScript archive (OpenAI's CLIP .pt files), read without TorchScript.

torch.jit.load runs the archive's own code while it loads (its classes' `__setstate__`), so an archive
from a stranger can write files or spin forever. Here nothing from the archive is executed: `data.pkl`
is unpickled by an unpickler that knows only inert stand-ins (every `__torch__.*` class becomes a
ScriptRecord holding its state; tensors and storages become records checked against the archive's
`data/` entries), and which attributes are parameters or buffers is read from the `__parameters__` /
`__buffers__` lines of the class definitions in `code/` as text. The result is the same name -> tensor
dict as `torch.jit.load(path).state_dict()` for an honest archive, bit for bit.
"""
import ast
import math
import pickle
import re
import zipfile
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import torch

MAX_PICKLE_BYTES = 64 << 20     # data.pkl of OpenAI's ViT-L/14 is ~100 kB: anything far larger is not weights
MAX_CODE_BYTES = 64 << 20       # all class definitions read, together
MAX_DIMS = 32
MAX_DEPTH = 200                 # module nesting
STORAGE_KEY = re.compile(r"[A-Za-z0-9_]{1,64}")
CLASS_HEADER = re.compile(r"^class (\w+)\(?(\w*)\)?:", re.M)

# the storage classes torch's pickler names, and the element type each holds
STORAGE_DTYPES = {
    "FloatStorage": torch.float32, "DoubleStorage": torch.float64, "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16, "LongStorage": torch.int64, "IntStorage": torch.int32,
    "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8, "BoolStorage": torch.bool,
    "ComplexFloatStorage": torch.complex64, "ComplexDoubleStorage": torch.complex128,
}


class TorchScriptError(ValueError):
    """An archive whose tensors cannot be read safely; the message says why (no file name: the caller adds it)."""


class NeedsCode(TorchScriptError):
    """A well-formed archive whose state only its own code could rebuild (it needs --trust_checkpoint)."""


class ScriptRecord:
    """Inert stand-in for an object of an archive class: its qualified name and the state pickled for it."""
    qualified_name = "__torch__"

    def __new__(cls, *args):
        record = super().__new__(cls)
        record.state = None
        return record

    def __init__(self, *args):
        if args:
            raise TorchScriptError(f"{self.qualified_name} is built from arguments, not from its state")

    def __setstate__(self, state):
        self.state = state


class _Inert:
    """Base of the unpickler's checked values: pickle's BUILD may not change them after the check."""

    def __setstate__(self, state):
        raise TorchScriptError(f"unexpected state for a {type(self).__name__}")


class StorageType(_Inert):
    def __init__(self, name: str, dtype: torch.dtype):
        self.name, self.dtype = name, dtype


@dataclass(frozen=True)
class StorageRef(_Inert):
    key: str
    dtype: torch.dtype
    numel: int


@dataclass(frozen=True)
class TensorRecord(_Inert):
    """A tensor as pickled: a view (offset, size, stride) of a storage record; no bytes read yet."""
    storage: StorageRef
    offset: int
    size: tuple
    stride: tuple


def _identity(value, *_):
    return value


def _ints(value, what: str) -> tuple:
    if not isinstance(value, (tuple, list)) or len(value) > MAX_DIMS or \
            not all(type(v) is int and 0 <= v < 1 << 48 for v in value):
        raise TorchScriptError(f"tensor {what} {value!r:.80} is not a short tuple of non-negative integers")
    return tuple(value)


def _rebuild_tensor(storage, offset, size, stride, requires_grad=False, hooks=None, metadata=None, *extra):
    """Stand-in for torch._utils._rebuild_tensor_v2: checks the view fits its storage."""
    if not isinstance(storage, StorageRef):
        raise TorchScriptError("a tensor without a storage record")
    size, stride = _ints(size, "size"), _ints(stride, "stride")
    if type(offset) is not int or offset < 0 or len(size) != len(stride):
        raise TorchScriptError(f"tensor view (offset {offset!r:.40}, size {size}, stride {stride}) is malformed")
    if math.prod(size) > storage.numel:  # an expanded (stride-0) view: a tiny archive describing a huge model
        raise TorchScriptError(f"a tensor of size {size} is an expanded view of storage '{storage.key}', which "
                               f"holds {storage.numel} elements")
    if all(size):  # an empty tensor reads nothing
        last = offset + sum((n - 1) * s for n, s in zip(size, stride))
        if last >= storage.numel:
            raise TorchScriptError(f"a tensor of size {size} reaches element {last} of storage "
                                   f"'{storage.key}', which holds {storage.numel}")
    return TensorRecord(storage, offset, size, stride)


class _RecordUnpickler(pickle.Unpickler):
    """Builds only ScriptRecord/TensorRecord/StorageRef and plain containers; every other global is refused."""

    SAFE = {
        ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
        ("collections", "OrderedDict"): OrderedDict,
        # TorchScript's typed-container markers: their value is the container itself
        **{("torch.jit._pickle", name): _identity for name in (
            "build_intlist", "build_doublelist", "build_boollist", "build_tensorlist", "build_genericlist",
            "restore_type_tag")},
    }

    def __init__(self, data: bytes):
        import io
        super().__init__(io.BytesIO(data))
        self.classes = {}
        self.storages = {}

    def find_class(self, module, name):
        if (module, name) in self.SAFE:
            return self.SAFE[(module, name)]
        if module == "torch" and name in STORAGE_DTYPES:
            return StorageType(name, STORAGE_DTYPES[name])
        if (module == "__torch__" or module.startswith("__torch__.")) and name.isidentifier():
            qualified = f"{module}.{name}"
            if qualified not in self.classes:  # a class that only records: no method of the archive exists here
                self.classes[qualified] = type(name, (ScriptRecord,), {"qualified_name": qualified})
            return self.classes[qualified]
        raise NeedsCode(f"it refers to {module}.{name}, which plain weights do not need")

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage" and isinstance(pid[1], StorageType)
                and isinstance(pid[2], str) and STORAGE_KEY.fullmatch(pid[2]) and type(pid[4]) is int
                and 0 <= pid[4] < 1 << 48):
            raise TorchScriptError("malformed storage reference (not storage type, plain key, size)")
        ref = StorageRef(pid[2], pid[1].dtype, pid[4])
        if self.storages.setdefault(ref.key, ref) != ref:
            raise TorchScriptError(f"storage '{ref.key}' is declared twice with different types or sizes")
        return ref


@dataclass(frozen=True)
class ClassInfo:
    is_module: bool
    parameters: tuple
    buffers: tuple
    has_setstate: bool


class _Archive:
    """The zip, checked once: one top folder, no duplicate or escaping names."""

    def __init__(self, zf: zipfile.ZipFile, archive_bytes: int):
        self.zf, self.archive_bytes = zf, archive_bytes
        names = zf.namelist()
        if len(set(names)) != len(names):
            dup = next(n for n in names if names.count(n) > 1)
            raise TorchScriptError(f"entry {dup!r} appears twice in the zip")
        for name in names:
            if name.startswith("/") or "\\" in name or ".." in name.split("/"):
                raise TorchScriptError(f"entry {name!r} has an absolute or escaping path")
        tops = {n.split("/", 1)[0] for n in names}
        pickles = [n for n in names if n.count("/") == 1 and n.endswith("/data.pkl")]
        if len(tops) != 1 or len(pickles) != 1:
            raise TorchScriptError("it is not one archive folder holding one data.pkl")
        self.prefix = pickles[0][:-len("data.pkl")]
        if self.prefix + "byteorder" in names and self.read("byteorder", 16) != b"little":
            raise TorchScriptError("its tensors are stored big-endian; re-save it on a little-endian machine")
        self.code_budget = MAX_CODE_BYTES
        self.class_files = {}

    def read(self, name: str, limit: int) -> bytes:
        """At most `limit` bytes of an entry, decompressing no further (a zip bomb stops there)."""
        with self.zf.open(self.prefix + name) as fh:
            data = fh.read(limit + 1)
        if len(data) > limit:
            raise TorchScriptError(f"{name} is larger than {limit} bytes")
        return data

    def storage(self, ref: StorageRef) -> torch.Tensor:
        """The storage's elements as a flat tensor, after checking the record holds them."""
        name = f"data/{ref.key}"
        try:
            info = self.zf.getinfo(self.prefix + name)
        except KeyError:
            raise TorchScriptError(f"tensor record {name} is missing") from None
        nbytes = ref.numel * torch.empty((), dtype=ref.dtype).element_size()
        if info.compress_type != zipfile.ZIP_STORED:  # torch stores tensors uncompressed; a packed one could bomb
            raise TorchScriptError(f"tensor record {name} is compressed; torch.jit.save stores tensors as they are")
        if info.file_size < nbytes or nbytes > self.archive_bytes:
            raise TorchScriptError(f"tensor record {name} holds {info.file_size} bytes, its storage declares {nbytes}")
        data = self.read(name, info.file_size)[:nbytes]
        if len(data) != nbytes:
            raise TorchScriptError(f"tensor record {name} is cut short")
        if nbytes == 0:
            return torch.empty(0, dtype=ref.dtype)
        return torch.frombuffer(bytearray(data), dtype=ref.dtype)

    def class_info(self, qualified: str) -> ClassInfo:
        """A class's kind and its parameter/buffer names, read as text from code/<module path>.py."""
        module, _, name = qualified.rpartition(".")
        path = "code/" + module.replace(".", "/") + ".py"
        if path not in self.class_files:
            try:
                text = self.read(path, self.code_budget)
            except KeyError:
                raise TorchScriptError(f"no definition of class {qualified} ({path} is missing)") from None
            self.code_budget -= len(text)
            self.class_files[path] = text.decode("utf-8", errors="replace")
        source = self.class_files[path]
        headers = list(CLASS_HEADER.finditer(source))
        for i, header in enumerate(headers):
            if header.group(1) == name:
                end = headers[i + 1].start() if i + 1 < len(headers) else len(source)
                body = source[header.end():end]
                return ClassInfo(header.group(2) == "Module", _names(body, "__parameters__", qualified),
                                 _names(body, "__buffers__", qualified),
                                 re.search(r"^  def __setstate__\(", body, re.M) is not None)
        raise TorchScriptError(f"no definition of class {qualified} in {path}")


def _names(body: str, field: str, qualified: str) -> tuple:
    match = re.search(rf"^  {field} = (\[[^\]\n]*\])$", body, re.M)
    if not match:
        return ()
    try:
        names = ast.literal_eval(match.group(1))
    except (ValueError, SyntaxError):
        names = None
    if not (isinstance(names, list) and all(isinstance(n, str) for n in names)):
        raise TorchScriptError(f"class {qualified} has an unreadable {field} line")
    return tuple(names)


def _collect(record: ScriptRecord, archive: _Archive, prefix: str = "", depth: int = 0, seen=None) -> list:
    """(name, TensorRecord) of the parameters, then buffers, then submodules: nn.Module.state_dict's order."""
    seen = set() if seen is None else seen
    if id(record) in seen or depth > MAX_DEPTH:
        raise TorchScriptError("its modules form a cycle or are nested too deep")
    seen.add(id(record))
    info = archive.class_info(record.qualified_name)
    if info.has_setstate:
        raise NeedsCode(f"class {record.qualified_name} rebuilds itself with its own __setstate__ code")
    state = record.state
    if not isinstance(state, dict):
        raise NeedsCode(f"the state of {record.qualified_name} is not a plain attribute dict")
    if not all(isinstance(k, str) for k in state):
        raise TorchScriptError(f"{record.qualified_name} has an attribute whose name is not a string")
    items = []
    for kind in (info.parameters, info.buffers):
        for name in (n for n in state if n in kind):
            value = state[name]
            if value is None:  # an optional parameter left unset (e.g. bias=False) is not in the state dict
                continue
            if not isinstance(value, TensorRecord):
                raise TorchScriptError(f"{prefix}{name} of {record.qualified_name} is not a tensor")
            items.append((prefix + name, value))
    for name, value in state.items():
        if isinstance(value, ScriptRecord) and archive.class_info(value.qualified_name).is_module:
            items += _collect(value, archive, f"{prefix}{name}.", depth + 1, seen)
    return items


def _unpickle(archive: _Archive):
    try:
        return _RecordUnpickler(archive.read("data.pkl", MAX_PICKLE_BYTES)).load()
    except TorchScriptError:
        raise
    except Exception as err:  # noqa: BLE001 - any failure of a hostile pickle is "broken", never a crash
        raise TorchScriptError(f"data.pkl is not a readable pickle ({type(err).__name__}: {str(err)[:100]})") from err


def _tensors(archive: _Archive, records) -> list:
    """Materialise TensorRecords; tensors of one storage share it, as torch's loader makes them."""
    storages = {}
    out = []
    for record in records:
        ref = record.storage
        if ref.key not in storages:
            storages[ref.key] = archive.storage(ref)
        out.append(storages[ref.key].as_strided(record.size, record.stride, record.offset))
    return out


def read_torchscript_state_dict(path) -> dict:
    """name -> tensor, as torch.jit.load(path).state_dict() gives, without running anything in the archive."""
    path = Path(path)
    with zipfile.ZipFile(path) as zf:
        archive = _Archive(zf, path.stat().st_size)
        root = _unpickle(archive)
        if not isinstance(root, ScriptRecord):
            raise TorchScriptError("data.pkl does not hold a TorchScript module")
        items = _collect(root, archive)
        return dict(zip([name for name, _ in items], _tensors(archive, [record for _, record in items])))


def read_pickled_weights(path) -> dict:
    """The tensors of a torch.save zip whose pickle torch's weights-only loader rejects only for its opcodes
    (pickle protocol 4/5): the top-level dict (or its 'state_dict'/'model' dict) of name -> tensor."""
    path = Path(path)
    with zipfile.ZipFile(path) as zf:
        archive = _Archive(zf, path.stat().st_size)
        root = _unpickle(archive)
        for key in ("state_dict", "model"):
            if isinstance(root, dict) and isinstance(root.get(key), dict):
                root = root[key]
                break
        if not isinstance(root, dict):
            raise TorchScriptError("its pickle holds no dict of tensors")
        items = [(k, v) for k, v in root.items() if isinstance(v, TensorRecord)]
        return dict(zip([k for k, _ in items], _tensors(archive, [v for _, v in items])))
