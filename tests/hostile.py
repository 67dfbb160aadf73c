"""Hostile checkpoints built in the tests (no binary fixtures): hand-assembled pickles and TorchScript archives,
and real scripted modules whose own code would leave a marker file or spin forever if it ever ran."""
import struct
import zipfile
from pathlib import Path
from typing import Tuple

import torch
from torch import nn

# ---- a tiny pickle assembler (protocol 2 opcodes, plus the ones attacks use) -----------------------

MARK, TUPLE, REDUCE, BUILD, STOP = b"(", b"t", b"R", b"b", b"."
EMPTY_DICT, EMPTY_TUPLE, SETITEMS, NEWOBJ = b"}", b")", b"u", b"\x81"
NEWTRUE, NEWFALSE, NONE, BINPERSID = b"\x88", b"\x89", b"N", b"Q"
PROTO2 = b"\x80\x02"


def s(text: str) -> bytes:
    data = text.encode()
    return b"X" + struct.pack("<I", len(data)) + data


def i(value: int) -> bytes:
    return b"\x8a" + bytes([8]) + value.to_bytes(8, "little", signed=True)  # LONG1: any size


def glob(module: str, name: str) -> bytes:
    return b"c" + module.encode() + b"\n" + name.encode() + b"\n"


def tup(*items: bytes) -> bytes:
    return MARK + b"".join(items) + TUPLE


def tensor(key: str, numel: int, size=(2,), stride=(1,), offset: int = 0, storage: str = "FloatStorage") -> bytes:
    """_rebuild_tensor_v2 of a storage record, as torch's pickler writes it."""
    pid = tup(s("storage"), glob("torch", storage), s(key), s("cpu"), i(numel)) + BINPERSID
    hooks = glob("collections", "OrderedDict") + EMPTY_TUPLE + REDUCE
    return glob("torch._utils", "_rebuild_tensor_v2") + tup(pid, i(offset), tup(*map(i, size)),
                                                           tup(*map(i, stride)), NEWFALSE, hooks) + REDUCE


def module(cls: str, *items: Tuple[bytes, bytes]) -> bytes:
    """A __torch__ object: NEWOBJ, then BUILD with its attribute dict."""
    body = b"".join(k + v for k, v in items)
    return glob("__torch__", cls) + EMPTY_TUPLE + NEWOBJ + EMPTY_DICT + MARK + body + SETITEMS + BUILD


def honest_pickle() -> bytes:
    """M with parameter w (2 floats) and buffer b (3 floats), each its own storage."""
    return PROTO2 + module("M", (s("training"), NEWFALSE), (s("w"), tensor("0", 2)),
                           (s("b"), tensor("1", 3, size=(3,)))) + STOP


HONEST_CODE = 'class M(Module):\n  __parameters__ = ["w", ]\n  __buffers__ = ["b", ]\n  w : Tensor\n  b : Tensor\n'
HONEST_RECORDS = {"data/0": struct.pack("<2f", 1.5, -2.0), "data/1": struct.pack("<3f", 0.25, 4.0, 8.0)}


def write_archive(path, data_pkl: bytes = None, records=None, code=None, extra=(), prefix: str = "archive",
                  record_compression=zipfile.ZIP_STORED) -> Path:
    """A TorchScript-layout zip: prefix/data.pkl, prefix/data/<key>, prefix/code/__torch__.py, constants.pkl."""
    records = HONEST_RECORDS if records is None else records
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(f"{prefix}/data.pkl", honest_pickle() if data_pkl is None else data_pkl)
        for name, data in records.items():
            zf.writestr(zipfile.ZipInfo(f"{prefix}/{name}"), data, compress_type=record_compression)
        zf.writestr(f"{prefix}/code/__torch__.py", HONEST_CODE if code is None else code,
                    compress_type=zipfile.ZIP_DEFLATED)
        zf.writestr(f"{prefix}/constants.pkl", PROTO2 + EMPTY_TUPLE + STOP)
        for name, data in extra:
            zf.writestr(name, data)
    return Path(path)


def marker_open(marker) -> bytes:
    """Unpickling this calls open(marker, 'w'): the marker file appears if any code from the pickle ran."""
    return glob("builtins", "open") + tup(s(str(marker)), s("w")) + REDUCE


def stack_global_open(marker) -> bytes:
    """The same call through protocol 4's STACK_GLOBAL, with FRAME and MEMOIZE."""
    body = (b"\x8c\x08builtins\x94\x8c\x04open\x94\x93" + tup(s(str(marker)), s("w")) + REDUCE)
    return b"\x80\x04\x95" + struct.pack("<Q", len(body) + 1) + body + STOP


def hostile_pickles(marker) -> dict:
    """name -> data.pkl bytes: code-running opcodes and malformed tensor/storage declarations."""
    w, b = (s("w"), tensor("0", 2)), (s("b"), tensor("1", 3, size=(3,)))
    return {
        "GLOBAL+REDUCE open": PROTO2 + marker_open(marker) + STOP,
        "STACK_GLOBAL protocol 4": stack_global_open(marker),
        "INST opcode": b"(" + s(str(marker)) + s("w") + b"ibuiltins\nopen\n" + STOP,
        "OBJ opcode": b"(" + glob("builtins", "open") + s(str(marker)) + s("w") + b"o" + STOP,
        "payload inside module state": PROTO2 + module("M", w, b, (s("x"), marker_open(marker))) + STOP,
        "os.system": PROTO2 + glob("os", "system") + tup(s(f"touch {marker}")) + REDUCE + STOP,
        "torch.from_file": PROTO2 + glob("torch", "from_file") + tup(s(str(marker)), NEWTRUE, i(8)) + REDUCE + STOP,
        "__torch__ class called with arguments": PROTO2 + glob("__torch__", "M") + tup(s("x")) + REDUCE + STOP,
        "BUILD on a tensor record": PROTO2 + module("M", (s("w"), tensor("0", 2) + EMPTY_DICT + MARK + s("size")
                                                          + tup(i(1 << 40)) + SETITEMS + BUILD), b) + STOP,
        "protocol 5 out-of-band buffer": b"\x80\x05\x97" + STOP,
        "malformed storage reference": PROTO2 + module("M", (s("w"), glob("torch._utils", "_rebuild_tensor_v2") + tup(
            tup(s("storage"), s("evil")) + BINPERSID, i(0), tup(i(2)), tup(i(1)), NEWFALSE, NONE) + REDUCE), b) + STOP,
        "storage key with path traversal": PROTO2 + module("M", (s("w"), tensor("../../etc/passwd", 2)), b) + STOP,
        "huge declared storage": PROTO2 + module("M", (s("w"), tensor("0", 1 << 40, size=(1 << 40,))), b) + STOP,
        "view past the storage": PROTO2 + module("M", (s("w"), tensor("0", 2, size=(1000,))), b) + STOP,
        "expanded (stride-0) view": PROTO2 + module("M", (s("w"), tensor("0", 2, size=(1 << 30,), stride=(0,))),
                                                    b) + STOP,
        "negative stride": PROTO2 + module("M", (s("w"), tensor("0", 2, stride=(-1,))), b) + STOP,
        "unknown storage type": PROTO2 + module("M", (s("w"), tensor("0", 2, storage="UntypedStorage")), b) + STOP,
        "storage declared twice": PROTO2 + module("M", w, (s("b"), tensor("0", 3, size=(3,)))) + STOP,
        "non-string attribute name": PROTO2 + module("M", w, b, (i(7), NEWTRUE)) + STOP,
        "module contains itself": PROTO2 + glob("__torch__", "M") + EMPTY_TUPLE + NEWOBJ + b"q\x00" + EMPTY_DICT + MARK
        + s("w") + tensor("0", 2) + s("self") + b"h\x00" + SETITEMS + BUILD + STOP,
        "state is a tuple": PROTO2 + glob("__torch__", "M") + EMPTY_TUPLE + NEWOBJ + tup(tensor("0", 2)) + BUILD + STOP,
        "not a module": PROTO2 + EMPTY_DICT + STOP,
        "truncated pickle": honest_pickle()[:60],
        "random bytes": bytes(range(256)) * 4,
    }


def hostile_archives(folder, marker) -> dict:
    """name -> path of a hostile or broken TorchScript-layout archive (the honest one differs in one thing)."""
    folder = Path(folder)
    made = {name: write_archive(folder / f"pkl_{n}.pt", data_pkl=data)
            for n, (name, data) in enumerate(hostile_pickles(marker).items())}
    made["compressed tensor record"] = write_archive(folder / "deflated.pt", record_compression=zipfile.ZIP_DEFLATED)
    made["missing tensor record"] = write_archive(folder / "missing.pt", records={"data/0": HONEST_RECORDS["data/0"]})
    made["record shorter than its storage"] = write_archive(folder / "short.pt",
                                                            records={**HONEST_RECORDS, "data/1": b"\0" * 4})
    made["duplicate entries"] = write_archive(folder / "dup.pt", extra=[("archive/data/0", b"\0" * 8)])
    made["escaping entry name"] = write_archive(folder / "escape.pt", extra=[("archive/../../x.py", b"print(1)")])
    made["absolute entry name"] = write_archive(folder / "abs.pt", extra=[("/tmp/x.py", b"print(1)")])
    made["two archive folders"] = write_archive(folder / "two.pt", extra=[("other/data.pkl", honest_pickle())])
    made["big-endian tensors"] = write_archive(folder / "bigend.pt", extra=[("archive/byteorder", b"big")])
    made["class without definition"] = write_archive(folder / "nocode.pt", code="class Other(Module):\n  pass\n")
    made["code line that is an expression"] = write_archive(
        folder / "expr.pt", code='class M(Module):\n  __parameters__ = [__import__("os").system("x"), ]\n')
    made["class with __setstate__ code"] = write_archive(
        folder / "setstate_code.pt", code=HONEST_CODE + f"  def __setstate__(self, state):\n    open('{marker}')\n")
    bomb = folder / "bomb.pt"  # 65 MB of pickle in a few kB of deflate
    with zipfile.ZipFile(bomb, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("archive/data.pkl", PROTO2 + NONE * (65 << 20) + STOP)
        zf.writestr("archive/code/__torch__.py", HONEST_CODE)
        zf.writestr("archive/constants.pkl", PROTO2 + EMPTY_TUPLE + STOP)
    made["zip bomb data.pkl"] = bomb
    made["not a zip at all"] = folder / "garbage.pt"
    made["not a zip at all"].write_bytes(b"PK\x03\x04" + bytes(200))
    return made


# ---- real TorchScript modules whose own code is the payload ----------------------------------------

class SetstateMarker(nn.Module):
    """Its __setstate__ (run by torch.jit.load) creates the file named in its state."""

    def __init__(self, marker: str):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(2))
        self.path = marker

    @torch.jit.export
    def __getstate__(self) -> Tuple[torch.Tensor, str, bool]:
        return self.weight, self.path, self.training

    @torch.jit.export
    def __setstate__(self, state: Tuple[torch.Tensor, str, bool]) -> None:
        self.path = state[1]
        self.training = state[2]
        self.weight = state[0] + torch.from_file(state[1], shared=True, size=2, dtype=torch.float32)

    def forward(self, x):
        return x * self.weight


class SetstateLoop(nn.Module):
    """Its __setstate__ never returns."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(2))

    @torch.jit.export
    def __getstate__(self) -> Tuple[torch.Tensor, bool]:
        return self.weight, self.training

    @torch.jit.export
    def __setstate__(self, state: Tuple[torch.Tensor, bool]) -> None:
        count = 0
        while count >= 0:
            count += 1
        self.weight = state[0]
        self.training = state[1]

    def forward(self, x):
        return x * self.weight


class NestedPayload(nn.Module):
    """Honest weights, with the payload in a submodule."""

    def __init__(self, marker: str):
        super().__init__()
        self.head = nn.Linear(2, 2)
        self.inner = SetstateMarker(marker)

    def forward(self, x):
        return self.inner(self.head(x))


class ForwardMarker(nn.Module):
    """Honest state, but calling it creates the marker: loading must never call it."""

    def __init__(self, marker: str):
        super().__init__()
        self.linear = nn.Linear(2, 2)
        self.path = marker

    def forward(self, x):
        return self.linear(x) + torch.from_file(self.path, shared=True, size=2, dtype=torch.float32)


def scripted_payloads(folder, marker) -> dict:
    """name -> archive saved with torch.jit.save; torch.jit.load of the first three runs their payload."""
    folder = Path(folder)
    made = {}
    for name, net in (("__setstate__ writes a file", SetstateMarker(str(marker))),
                      ("submodule __setstate__ writes a file", NestedPayload(str(marker))),
                      ("__setstate__ loops forever", SetstateLoop()),
                      ("forward writes a file", ForwardMarker(str(marker)))):
        path = folder / (name.replace(" ", "_") + ".pt")
        torch.jit.save(torch.jit.script(net), str(path))
        made[name] = path
    return made


# ---- memory and time bombs: tiny files that describe huge models or endless walks ---------------------------

def expanded(state_dict: dict) -> dict:
    """Every tensor an expanded view of one stored element: a file of a few kB claiming the full shapes."""
    return {k: torch.zeros(1, dtype=v.dtype).expand(v.shape) if v.dim() else torch.zeros((), dtype=v.dtype)
            for k, v in state_dict.items()}


def one_storage(state_dict: dict) -> dict:
    """Every float tensor a view of the same storage (the largest one's size): full shapes, overlapping bytes."""
    floats = {k: v for k, v in state_dict.items() if v.is_floating_point() and v.dim()}
    shared = torch.zeros(max(v.numel() for v in floats.values()))
    return {k: shared[:v.numel()].view(v.shape) if k in floats else torch.zeros_like(v, device="cpu")
            for k, v in state_dict.items()}


def meta_state_dict(build) -> dict:
    """The state dict of `build()` built on the meta device (shapes only, no memory)."""
    with torch.device("meta"):
        return build().state_dict()


def shared_nesting(depth: int) -> list:
    """A list nested `depth` deep whose two items are the same list: 2**depth paths, a few bytes pickled."""
    value = []
    for _ in range(depth):
        value = [value, value]
    return value


def deep_nesting(depth: int) -> list:
    value = []
    for _ in range(depth):
        value = [value]
    return value


def deep_json(depth: int) -> str:
    return '{"a": ' * depth + "1" + "}" * depth
