"""Sweeps: find many encoders, pick this shard's slice, run main.py on each in a pool of device workers.

Each encoder runs in its own `main.py` process, so a crash, an out-of-memory error or an unreadable
checkpoint ends that encoder only: it is recorded in `trigger_norm/failed/<run_id>.json` with the last
line of its error output, and the sweep goes on. A finished encoder is recognised by its
`trigger_norm/<run_id>.json` (docs/method.md) and skipped on restart; failed ones are retried on every restart.

Workers are hardened against what they inspect (docs/sweeps.md): each runs under `python -I` with an explicit
list of what it may import (common/isolated.py), in its own process group, dies with the sweep, and is
killed after --timeout seconds. Each worker slot keeps one fork server (a `WorkerServer`) that has imported
main.py's modules once; every encoder runs in a fresh child forked from it, so a sweep does not pay the
interpreter's start and torch's imports (seconds) for every encoder. Before starting an encoder a sweep
claims it with an exclusively created `trigger_norm/claims/<run_id>.claim`, so two sweeps on one --out_dir
never run the same encoder at once.
"""
import contextlib
import csv
import fcntl
import fnmatch
import json
import math
import os
import queue
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

from models import DEFAULT_USAGE_INFO, USAGE_INFOS, CheckpointError
from models.formats import WEIGHT_NAMES, hub_folder_of, usage_info_from
from models.registry import ARCH_MODULES_ENV

from common import io as atomic
from common.device import resolve_device
from common.files import printable, safe_glob, walk_files
from common.isolated import ROOT, isolated_command
from common.threads import threads_per_worker, usable_cores
from .outputs import RunPaths, finished_result, read_run, run_id_for

MAIN_PY = ROOT / "main.py"
CHECKPOINT_PATTERNS = ("*.pth", "*.pt", "*.safetensors")  # what folder discovery and ** globs pick up
# a file a glob names directly may also be a hub's torch weights (pytorch_model.bin): main.py reads them all
WEIGHT_FILE_SUFFIXES = (".pth", ".pt", ".safetensors", ".bin")
LABELS = ("clean", "backdoor")
UNKNOWN = "unknown"  # the label of an encoder whose truth nobody gave (not in the paper's folders, no manifest label)
# the paper's folders under output/: the first folder names the usage info
USAGE_FOLDERS = {"cifar10": "cifar10", "stl10": "stl10", "imagenet": "imagenet", "CLIP": "CLIP",
                 "CLIP_text": "CLIP", "moco": "moco"}
SMALL_IMAGE_USAGE = ("cifar10", "stl10")  # usage infos of 32-px encoders
# exit statuses of an interrupted main.py (decree.cli.user_errors, or killed by SIGINT)
INTERRUPTED = (130, -signal.SIGINT)
# per-encoder flags: set by the sweep for each encoder, never passed through from the command line
PER_ENCODER_FLAGS = ("encoder_usage_info", "arch", "device", "gpu", "max_memory")
DEFAULT_TIMEOUT = 6 * 3600  # seconds per encoder: generous for a ResNet-50/ViT at the paper's 1000 epochs on a GPU
CLAIM_GRACE = 60  # seconds past its owner's timeout after which a claim is stale wherever its owner runs
MANIFEST_COLUMNS = ("path", "usage_info", "arch", "label", "reference", "reference_text", "family")


@dataclass(frozen=True)
class Encoder:
    """One encoder of a sweep; label is 'clean', 'backdoor' or 'unknown'; reference/reference_text: its attack's
    known target; family: the manifest's free-text group (attack)."""
    path: str
    usage_info: str
    arch: str | None
    label: str
    reference: str | None = None
    reference_text: str | None = None
    family: str = ""

    @property
    def run_id(self) -> str:
        return run_id_for(self.path)


# ---- discovery --------------------------------------------------------------------------------------------

def infer_label(path) -> str:
    """The paper's rule for the paper's folders (discover_output_folder): 'clean' anywhere in the path means a
    clean encoder, anything else a backdoored one. Elsewhere the truth is unknown unless a manifest gives it."""
    return "clean" if "clean" in str(path).lower() else "backdoor"


def _is_checkpoint(path: Path) -> bool:
    return path.is_file() and any(fnmatch.fnmatch(path.name, p) for p in CHECKPOINT_PATTERNS)


def _sorted_unique(encoders) -> list[Encoder]:
    """Stable order (by path) without duplicates of the same file, so shards and run ids never disagree."""
    seen, unique = set(), []
    for enc in sorted(encoders, key=lambda e: e.path):
        key = str(Path(enc.path).resolve())
        if key not in seen:
            seen.add(key)
            unique.append(enc)
    return unique


def discover_output_folder(root="output", arch: str | None = None) -> list[Encoder]:
    """The paper's layout: root/<usage>/**/*.pth|*.pt (and *.safetensors); CLIP_text/ holds CLIP encoders; other
    folders ignored."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"--output_root {root}: no such folder; for a folder of downloaded encoders pass "
                                "--encoders FOLDER (each hub folder one encoder, its family read from its config), "
                                f"else put them in {root}/<usage_info>/... or pass --manifest CSV")
    encoders = [Encoder(str(path), usage, arch, infer_label(path.relative_to(root)))
                for folder, usage in USAGE_FOLDERS.items() if (root / folder).is_dir()
                for path in walk_files(root / folder) if _is_checkpoint(path)]
    if not encoders:
        raise FileNotFoundError(_nothing_found(root))
    return _sorted_unique(encoders)


def _nothing_found(root: Path) -> str:
    """Where discovery looked, and the flags that would find the checkpoints lying elsewhere under root."""
    looked = ", ".join(f"{root / folder}/" for folder in USAGE_FOLDERS)
    message = f"no *.pth/*.pt/*.safetensors checkpoints in the paper's folders {looked}"
    # the top folder under root of every other checkpoint (root itself for one lying directly in it)
    others = sorted({root / path.relative_to(root).parts[0] if path.parent != root else root
                     for path in walk_files(root) if _is_checkpoint(path)})
    if others:
        hints = " or ".join(f"--encoders {top}" for top in others[:3])
        message += (f"; other checkpoints are under {', '.join(f'{top}/' for top in others)}: pass {hints} "
                    "(hub folders' families are read from their configs; --encoder_usage_info/--arch for paper "
                    "checkpoints that are not cifar10 ones), or list them in --manifest CSV")
    else:
        message += ("; for a folder of downloaded encoders pass --encoders FOLDER, else --output_root FOLDER or "
                    "--manifest CSV")
    return message


def _weights_at(path: Path) -> list[Path]:
    """What a glob match stands for: the file itself if it is a weights file, the checkpoints inside a folder;
    a hub folder's weights (any of them) stand for the folder, one encoder (models.formats.hub_folder_of)."""
    if path.is_file():
        found = [path] if path.suffix in WEIGHT_FILE_SUFFIXES else []
    else:
        found = [p for p in walk_files(path) if _is_checkpoint(p) or (p.name in WEIGHT_NAMES and p.is_file())]
    return [hub_folder_of(p) or p for p in found]


def detected_usage_info(path, usage_info: str | None) -> str:
    """The usage info given (--encoder_usage_info, a manifest cell), else the hub family the path's config names,
    else the default; an unreadable config is left for the encoder's own run to report."""
    if usage_info:
        return usage_info
    try:
        return usage_info_from(path) or DEFAULT_USAGE_INFO
    except (CheckpointError, OSError):
        return DEFAULT_USAGE_INFO


def discover_globs(patterns, usage_info: str | None, arch: str | None = None) -> list[Encoder]:
    """Checkpoints matching shell globs (** recursive, symlinked folders never entered: common/files.py): weight
    files the glob names, and the checkpoints inside folders it names, each hub folder once; a pattern that
    matches none is an error. Their truth is unknown."""
    encoders = []
    for pattern in patterns:
        matches = [p for match in safe_glob(pattern) for p in _weights_at(Path(match))]
        if not matches:
            raise FileNotFoundError(f"--encoders {pattern!r}: matches no .pth/.pt/.safetensors/.bin file")
        encoders += [Encoder(str(p), detected_usage_info(p, usage_info), arch, UNKNOWN) for p in matches]
    return _sorted_unique(encoders)


def read_manifest(path, usage_info: str | None = None, arch: str | None = None) -> list[Encoder]:
    """CSV with columns path[,usage_info][,arch][,label][,reference][,reference_text][,family]; empty cells take
    the command-line defaults (reference: the attack's reference npz; reference_text: its target caption;
    family: a free group name carried into the report).

    Relative paths (encoders, references) are relative to the manifest's folder, so a manifest travels with them.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--manifest {path}: no such file")
    with open(path, newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        columns = [c.strip() for c in reader.fieldnames or []]
        if "path" not in columns:
            raise ValueError(f"{path}: needs a header with a 'path' column (optional: "
                             f"{', '.join(MANIFEST_COLUMNS[1:])}); found {columns or 'an empty file'}")
        unknown = set(columns) - set(MANIFEST_COLUMNS)
        if unknown:
            raise ValueError(f"{path}: unknown column(s) {sorted(unknown)}; use {', '.join(MANIFEST_COLUMNS)}")
        encoders = [_manifest_row(path, line, {k.strip(): (v or "").strip() for k, v in row.items() if k},
                                  usage_info, arch)
                    for line, row in enumerate(reader, start=2)]
    if not encoders:
        raise ValueError(f"{path}: lists no encoders")
    return _sorted_unique(encoders)


def _manifest_row(manifest: Path, line: int, row: dict, usage_info: str, arch: str | None) -> Encoder:
    where = f"{manifest}:{line}"
    if not row.get("path"):
        raise ValueError(f"{where}: empty path")
    encoder = _beside(manifest, row["path"])
    usage = detected_usage_info(encoder, row.get("usage_info") or usage_info)
    if usage not in USAGE_INFOS:
        raise ValueError(f"{where}: usage_info {usage!r} is not one of {', '.join(USAGE_INFOS)}")
    label = row.get("label") or UNKNOWN
    if label not in (*LABELS, UNKNOWN):
        raise ValueError(f"{where}: label {label!r} is not 'clean' or 'backdoor' (leave it empty when unknown)")
    reference = str(_beside(manifest, row["reference"])) if row.get("reference") else None
    return Encoder(str(encoder), usage, row.get("arch") or arch, label, reference, row.get("reference_text") or None,
                   row.get("family", ""))


def _beside(manifest: Path, cell: str) -> Path:
    """A manifest's path cell: absolute, or relative to the manifest's folder."""
    path = Path(cell).expanduser()
    return path if path.is_absolute() else manifest.parent / path


def find_encoders(manifest=None, patterns=None, root="output", usage_info: str | None = None,
                  arch: str | None = None) -> list[Encoder]:
    """The sweep's encoders, sorted: from a manifest, else from globs, else from the paper's output/ folders."""
    if manifest:
        return read_manifest(manifest, usage_info, arch)
    if patterns:
        return discover_globs(patterns, usage_info, arch)
    return discover_output_folder(root, arch)


# ---- sharding ---------------------------------------------------------------------------------------------

def parse_shard(text: str) -> tuple[int, int]:
    """'K/N' (1-based) -> (K, N)."""
    try:
        k, n = (int(part) for part in text.split("/"))
    except ValueError:
        raise ValueError(f"--shard {text!r}: write it as K/N, e.g. 1/4") from None
    if not 1 <= k <= n:
        raise ValueError(f"--shard {text}: K must be between 1 and N")
    return k, n


def shard_from_slurm(environ=os.environ) -> tuple[int, int] | None:
    """This Slurm array task's (K, N), or None outside an array job; works for --array=0-3, 1-4, 0-9:3."""
    if "SLURM_ARRAY_TASK_ID" not in environ:
        return None
    task = int(environ["SLURM_ARRAY_TASK_ID"])
    first = int(environ.get("SLURM_ARRAY_TASK_MIN", 0))
    step = int(environ.get("SLURM_ARRAY_TASK_STEP", 1))
    count = int(environ["SLURM_ARRAY_TASK_COUNT"])
    k = (task - first) // step + 1
    if not 1 <= k <= count:
        raise ValueError(f"Slurm array task {task} is not within {count} tasks from {first} step {step}")
    return k, count


def select_shard(encoders, k: int, n: int) -> list[Encoder]:
    """Shard k of n (1-based) of the sorted list: every n-th encoder, so shards are disjoint, cover the list
    and differ in size by at most one. Array tasks must see the same list: a report given the list shows any
    encoder left out as 'not run', and rerunning the sweep picks it up."""
    return list(encoders)[k - 1::n]


# ---- claims: one sweep per encoder at a time ---------------------------------------------------------------

def claims_dir(out_dir) -> Path:
    return Path(out_dir) / "trigger_norm" / "claims"


def claim_path(out_dir, run_id: str) -> Path:
    return claims_dir(out_dir) / f"{run_id}.claim"


@contextlib.contextmanager
def _claims_locked(out_dir):
    """Serialise claiming between the sweeps of this host, so a stale claim is taken over by one of them only.

    The lock is on the claims folder itself (no lock file left behind) and the kernel drops it if its holder
    dies; where the filesystem has no such locks, claims stay exclusive through O_EXCL and only the take-over
    of a stale claim is unguarded."""
    folder = claims_dir(out_dir)
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder, os.O_RDONLY)
    try:
        with contextlib.suppress(OSError):
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def read_claim(path: Path) -> dict:
    """A claim's record; one that cannot be read counts as made when the file was."""
    try:
        record = json.loads(path.read_text())
        if isinstance(record, dict):
            return record
    except (OSError, ValueError):
        pass
    try:
        return {"started": path.stat().st_mtime}
    except FileNotFoundError:
        return {}


def _create_claim(path: Path, data: bytes) -> bool:
    """Create `path` holding `data` unless it exists (then False). Readers hold the lock too, so on one host
    nobody sees it half-written; elsewhere a half-written claim reads as just made (read_claim)."""
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
    except BaseException:
        path.unlink(missing_ok=True)  # an empty claim would hold the encoder until its timeout
        raise
    return True


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    try:  # a zombie has exited; only its parent has not collected it yet
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return True


def claim_is_stale(holder: dict, timeout: float) -> bool:
    """The holder is provably gone: it ran on this host and its pid is not alive, or its time is long up."""
    pid = holder.get("pid")
    if holder.get("host") == socket.gethostname() and isinstance(pid, int) and not _alive(pid):
        return True
    return time.time() - holder.get("started", 0) > holder.get("timeout", timeout) + CLAIM_GRACE


def claim_encoder(out_dir, run_id: str, timeout: float) -> tuple[bool, dict]:
    """Claim an encoder for this process: (True, our record) or (False, the live holder's record)."""
    path = claim_path(out_dir, run_id)
    mine = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.time(),
            "started_at": time.strftime("%Y-%m-%dT%H:%M:%S"), "timeout": timeout, "token": uuid.uuid4().hex}
    data = json.dumps(mine).encode()
    with _claims_locked(out_dir):
        if _create_claim(path, data):
            return True, mine
        holder = read_claim(path)
        if not claim_is_stale(holder, timeout):
            return False, holder
        path.unlink(missing_ok=True)
        return (True, mine) if _create_claim(path, data) else (False, read_claim(path))


def release_claim(out_dir, run_id: str, mine: dict) -> None:
    """Remove our claim, unless another sweep has taken it over (after our timeout)."""
    path = claim_path(out_dir, run_id)
    with _claims_locked(out_dir):
        if read_claim(path).get("token") == mine["token"]:
            path.unlink(missing_ok=True)


# ---- the runs ---------------------------------------------------------------------------------------------

def failed_dir(out_dir) -> Path:
    """Failure records live apart from trigger_norm/*.json, which holds finished runs only (docs/method.md)."""
    return Path(out_dir) / "trigger_norm" / "failed"


def failure_path(out_dir, run_id: str) -> Path:
    return failed_dir(out_dir) / f"{run_id}.json"


def worker_log_path(out_dir, run_id: str) -> Path:
    return Path(out_dir) / "detect_log" / f"{run_id}.worker.log"


def pending(encoders, out_dir, force: bool = False) -> list[Encoder]:
    """Encoders still to run: all with --force, else those without a finished trigger_norm JSON that is theirs
    (decree.outputs.is_result_for: same file, same content)."""
    return [enc for enc in encoders if force or finished_result(out_dir, enc.path, enc.run_id) is None]


def cpu_workers(encoders, threads: int | None = None) -> int:
    """Default number of CPU workers: one per usable core (per `threads` cores with --threads) when every
    encoder takes 32-px images, else one.

    A 32-px encoder's convolutions are too small to keep a second thread busy, and waiting threads sleep
    (common.threads): on 2 cores two 1-thread runs side by side took 9.2 s, one after the other with 2
    threads 14.7 s (docs/speed.md). 224-px encoders' convolutions scale with threads, and every worker holds its own model
    and activations in memory."""
    small = encoders and all(enc.usage_info in SMALL_IMAGE_USAGE for enc in encoders)
    return max(1, usable_cores() // (threads or 1)) if small else 1


def worker_devices(devices: str | None, device: str = "auto", gpu: int | None = None,
                   workers: int | None = None, cpu_default: int = 1) -> list[str]:
    """One device name per worker: --devices 0,1 | cpu, else from --device/--gpu (auto = every visible GPU).

    --workers N runs N workers spread round-robin over those devices (several small encoders per GPU); without
    it, one per GPU, or `cpu_default` on the CPU.
    """
    import torch
    if devices:
        names = ["cpu"] if devices == "cpu" else [f"cuda:{int(i)}" for i in devices.split(",")]
    elif gpu is None and device in ("auto", "cuda") and torch.cuda.is_available():
        names = [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    else:  # one device, checked as main.py checks it (a missing CUDA device is a one-line error)
        names = [str(resolve_device(device, gpu))]
    count = workers or (cpu_default if names == ["cpu"] else len(names))
    if count < 1:
        raise ValueError("--workers must be at least 1")
    return [names[i % len(names)] for i in range(count)]


def passthrough_argv(options: dict) -> list[str]:
    """main.py flags for the sweep-wide options (decree.cli.inversion_flags names them by flag)."""
    argv = []
    for name, value in options.items():
        if name in PER_ENCODER_FLAGS or value is None or value is False:
            continue
        argv.append(f"--{name}" if value is True else flag(name, value))
    return argv


def check_timeout(seconds: float) -> float:
    """--timeout, checked before any work: finite seconds above 0."""
    if not (math.isfinite(seconds) and seconds > 0):
        raise ValueError(f"--timeout {seconds}: give the seconds one encoder may take, a number above 0 "
                         f"(default {DEFAULT_TIMEOUT})")
    return seconds


def worker_imports(out_dir) -> tuple[dict, list[str]]:
    """What a worker may import besides the project: the --arch_module modules (top-level name -> the folder
    this process found it in), and after site-packages their folders and $PYTHONPATH's, less the current,
    the project's and the output folder (common/isolated.py)."""
    modules = {}
    for name in filter(None, os.environ.get(ARCH_MODULES_ENV, "").split(",")):
        top = sys.modules.get(name.split(".")[0])
        if getattr(top, "__file__", None):
            folder = Path(top.__file__).resolve().parent
            modules[top.__name__] = str(folder.parent if hasattr(top, "__path__") else folder)
    unsafe = {Path.cwd().resolve(), ROOT, Path(out_dir).resolve()}
    path = []
    for folder in [*modules.values(), *os.environ.get("PYTHONPATH", "").split(os.pathsep)]:
        folder = Path(folder or ".").resolve()
        if folder not in unsafe and str(folder) not in path:
            path.append(str(folder))
    return modules, path


def main_py_command(enc: Encoder, device: str, out_dir, options: dict, imports: tuple[dict, list]) -> list[str]:
    """main.py for one encoder, run isolated (common/isolated.py); imports = worker_imports(out_dir). What a
    sweep's worker server runs for the encoder, written out as one command (the worker log's first line)."""
    return isolated_command(MAIN_PY, main_py_args(enc, device, out_dir, options), *imports, parent=os.getpid())


def flag(name: str, value) -> str:
    """`--name=value`: one argument, so a value starting with '-' (a file `-evil.pth`) is never read as an option."""
    return f"--{name}={value}"


def path_value(path) -> str:
    """A relative path as ./path, so that even outside --name=value it never starts with '-'."""
    text = str(path)
    return text if Path(text).is_absolute() or text.startswith("./") else f"./{text}"


def main_py_args(enc: Encoder, device: str, out_dir, options: dict) -> list[str]:
    """main.py's arguments for one encoder of a sweep (CPU workers under --max_memory when the options have it)."""
    args = [flag("encoder_path", path_value(enc.path)), flag("encoder_usage_info", enc.usage_info),
            flag("device", device), flag("out_dir", path_value(out_dir)), flag("id", enc.run_id),
            flag("model_flag", enc.label), "--quiet"]
    if enc.arch:
        args.append(flag("arch", enc.arch))
    if enc.reference:
        args.append(flag("reference_file", path_value(enc.reference)))
    if enc.reference_text:
        args.append(flag("reference_text", enc.reference_text))
    if device == "cpu" and options.get("max_memory"):
        args.append(flag("max_memory", options["max_memory"]))
    return args + passthrough_argv(options)


def last_error_line(output: str, returncode: int) -> str:
    """The reason shown for a failed run: the script's last one-line error, else the last non-empty line the
    process wrote (stdout and stderr share the pipe, so a buffered stdout line can come after the error), or
    how it died."""
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    errors = [line for line in lines if ".py: error: " in line]
    if errors or lines:
        return (errors or lines)[-1]
    if returncode < 0:
        return f"killed by signal {signal.Signals(-returncode).name}"
    return f"exited with status {returncode} and no message"


def _child_env(device: str, cpu_workers: int) -> dict:
    env = dict(os.environ)
    # CPU workers would each start one thread per core and slow each other down; split the cores instead
    # (main.py reads OMP_NUM_THREADS through common.threads; OMP_WAIT_POLICY=PASSIVE is inherited)
    if device == "cpu" and "OMP_NUM_THREADS" not in env:
        env["OMP_NUM_THREADS"] = str(threads_per_worker(cpu_workers))
    return env


def _write_record(write, path: Path, content) -> str | None:
    """Write a sweep-side file; a full disk or an unwritable path costs that file only, never the sweep."""
    try:
        write(path, content)
    except OSError as err:
        return f"could not write {path}: {err.strerror or err}"
    return None


# what main.py imports: a worker server imports these once, before it forks the first encoder's process
# (torchvision too: models import it only when they build a backbone; and torch._dynamo, which torch.optim's
# optimisers import on their first use: 3.3 s on a 2-core AVX2 EPYC, which every encoder's process would pay)
MAIN_PY_IMPORTS = ("common.threads", "common.determinism", "decree.cli", "decree.detect", "decree.sweep",
                   "decree.target", "models", "torchvision.models", "torch._dynamo")


class WorkerDied(RuntimeError):
    """A worker server ended (killed, or out of memory) while it should have run an encoder."""


class WorkerServer:
    """One worker slot's fork server (common/isolated.py, `serve`): isolated like any worker, in its own session,
    dies with the sweep; start() forks one run of `script` (main.py) from it, wait() waits for its end."""

    def __init__(self, env: dict, imports: tuple[dict, list], script=MAIN_PY, preload=MAIN_PY_IMPORTS):
        command = isolated_command(script, [], *imports, parent=os.getpid(), serve=preload)
        self.proc = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env,
                                     start_new_session=True)
        self.replies: queue.Queue = queue.Queue()
        threading.Thread(target=self._read_replies, daemon=True).start()

    def _read_replies(self) -> None:
        try:
            for line in self.proc.stdout:
                self.replies.put(json.loads(line))
        except ValueError:  # not an answer of the server's: treat it as a dead server
            self.close()
        self.replies.put(None)  # the server has ended

    def _died(self) -> WorkerDied:
        return WorkerDied(f"the worker process ended (exit status {self.proc.wait()})")

    def _reply(self, key: str, timeout: float | None = None):
        reply = self.replies.get(timeout=timeout)
        if reply is None:
            raise self._died()
        return reply[key]

    def start(self, args: list[str], output: Path) -> int:
        """Fork main.py with `args` (its output into `output`); returns the child's pid."""
        try:
            self.proc.stdin.write(json.dumps({"args": args, "output": str(output)}) + "\n")
            self.proc.stdin.flush()
        except OSError:  # BrokenPipeError included
            raise self._died() from None
        return self._reply("pid")

    def wait(self, timeout: float | None = None) -> int:
        """The child's exit status (negative: killed by that signal); raises queue.Empty after `timeout` s."""
        return self._reply("returncode", timeout)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.proc.stdin.close()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()


class Sweep:
    """A pool of device workers running main.py per encoder; stop() ends the running children."""

    def __init__(self, out_dir, slots: list[str], options: dict, timeout: float = DEFAULT_TIMEOUT,
                 force: bool = False):
        self.out_dir, self.slots, self.options = Path(out_dir), slots, options
        self.timeout, self.force, self.started = timeout, force, time.time()
        self.imports = worker_imports(out_dir)
        self._servers: dict[int, WorkerServer] = {}
        self._running: set[int] = set()  # pids (= process groups) of the encoders' processes
        self._lock = threading.Lock()
        self._stopping = False
        self._cpu_workers = sum(slot == "cpu" for slot in slots)

    def run_one(self, enc: Encoder, slot: int) -> dict:
        """Claim and run one encoder on worker slot `slot`: {'status': 'done', 'record'}, {'status': 'failed',
        'error'}, 'stopped', or 'elsewhere' (another sweep holds its claim, or finished it after this sweep
        started)."""
        try:
            claimed, claim = claim_encoder(self.out_dir, enc.run_id, self.timeout)
        except OSError as err:  # e.g. a full disk: this encoder cannot run, the others may
            return {"status": "failed", "error": f"could not claim it in {claims_dir(self.out_dir)}: "
                                                 f"{err.strerror or err}", "warnings": []}
        if not claimed:
            return {"status": "elsewhere", "holder": claim}
        try:
            json_path = RunPaths(self.out_dir, enc.run_id).json
            if finished_result(self.out_dir, enc.path, enc.run_id) is not None and \
                    (not self.force or json_path.stat().st_mtime >= self.started):
                return {"status": "elsewhere", "holder": None}  # finished since this sweep listed it
            return self._run_claimed(enc, slot)
        finally:
            with contextlib.suppress(OSError):
                release_claim(self.out_dir, enc.run_id, claim)

    def _server(self, slot: int) -> WorkerServer:
        """This slot's worker server, started on first use and again if it has died."""
        server = self._servers.get(slot)
        if server is None or not server.alive():
            server = WorkerServer(_child_env(self.slots[slot], self._cpu_workers), self.imports)
            self._servers[slot] = server
        return server

    def _execute(self, slot: int, args: list[str], output: Path) -> tuple[int | None, bool, str | None]:
        """Run main.py `args` on the slot's server: (exit status, timed out, why the worker died or None)."""
        with self._lock:
            if self._stopping:
                return None, False, None
            server = self._server(slot)
        try:
            pid = server.start(args, output)
        except WorkerDied as died:
            return None, False, str(died)
        with self._lock:
            self._running.add(pid)
        try:
            try:
                return server.wait(self.timeout), False, None
            except queue.Empty:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(pid, signal.SIGKILL)  # the encoder's whole process group, never the server
                return server.wait(), True, None
        except WorkerDied as died:
            return None, False, str(died)
        finally:
            with self._lock:
                self._running.discard(pid)

    def _run_claimed(self, enc: Encoder, slot: int) -> dict:
        device = self.slots[slot]
        args = main_py_args(enc, device, self.out_dir, self.options)
        started = time.time()
        with tempfile.TemporaryDirectory(prefix="decree-worker-") as scratch:
            output_file = Path(scratch) / "output.log"
            returncode, timed_out, died = self._execute(slot, args, output_file)
            output = output_file.read_text(errors="replace") if output_file.is_file() else ""
        if returncode is None and died is None:
            return {"status": "stopped"}
        log = worker_log_path(self.out_dir, enc.run_id)
        command = main_py_command(enc, device, self.out_dir, self.options, self.imports)
        warnings = [_write_record(atomic.write_text, log, f"$ {' '.join(command)}\n{output}")]
        paths = RunPaths(self.out_dir, enc.run_id)
        # a stopped sweep ended its children itself; Ctrl-C in a terminal reaches only the sweep
        if self._stopping or returncode in INTERRUPTED:
            return {"status": "stopped"}
        if returncode == 0 and paths.finished():
            failure_path(self.out_dir, enc.run_id).unlink(missing_ok=True)
            return {"status": "done", "record": read_run(paths.json), "warnings": list(filter(None, warnings))}
        error = (f"timeout after {self.timeout:g} s" if timed_out else died if died
                 else last_error_line(output, returncode))
        warnings.append(_write_record(atomic.write_json, failure_path(self.out_dir, enc.run_id), {
            "encoder_path": enc.path, "run_id": enc.run_id, "usage_info": enc.usage_info, "arch": enc.arch,
            "model_flag": enc.label, "status": "failed", "error": error, "returncode": returncode,
            "device": device, "seconds": time.time() - started, "worker_log": str(log),
            "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S")}))
        return {"status": "failed", "error": error, "warnings": list(filter(None, warnings))}

    def run(self, encoders, on_result=None) -> None:
        """Run every encoder, one per free worker slot; on_result(enc, outcome) after each."""
        free = queue.Queue()
        for slot in range(len(self.slots)):
            free.put(slot)

        def task(enc):
            slot = free.get()  # never waits: the pool has exactly one thread per slot
            try:
                return self.run_one(enc, slot)
            finally:
                free.put(slot)

        try:
            with ThreadPoolExecutor(max_workers=len(self.slots)) as pool:
                futures = {pool.submit(task, enc): enc for enc in encoders}
                try:
                    for future in as_completed(futures):
                        outcome = future.result()
                        if outcome["status"] != "stopped" and on_result:
                            on_result(futures[future], outcome)
                except BaseException:
                    for future in futures:
                        future.cancel()
                    self.stop()
                    raise
        finally:
            for server in self._servers.values():
                server.close()

    def stop(self) -> None:
        """End the running main.py processes (their partial outputs are never written: files are atomic)."""
        with self._lock:
            self._stopping = True
            for pid in self._running:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(pid, signal.SIGTERM)


def outcome_line(enc: Encoder, outcome: dict) -> str:
    if outcome["status"] == "elsewhere":
        holder = outcome["holder"]
        where = (f"running in another sweep ({holder.get('host', '?')} pid {holder.get('pid', '?')} since "
                 f"{holder.get('started_at', '?')})") if holder is not None else "finished by another sweep"
        return f"SKIPPED  {printable(enc.path)}: {where}"
    if outcome["status"] == "failed":
        line = f"FAILED   {printable(enc.path)}: {printable(outcome['error'])}"
    else:
        record = outcome["record"]
        pl1 = "no trigger found" if record["pl1"] is None else f"PL1 {record['pl1']:.4f}"
        truth = "truth unknown" if enc.label == UNKNOWN else enc.label
        line = "; ".join([f"{record['verdict'].upper():8s} {printable(enc.path)}: {pl1} ({truth})",
                          *map(printable, record.get("notes", ()))])
    return "; ".join([line, *map(printable, outcome["warnings"])])


def run_sweep(encoders, out_dir, slots: list[str], options: dict, force: bool = False,
              progress: bool = True, timeout: float = DEFAULT_TIMEOUT) -> dict:
    """Run the encoders without a finished result (all with force) on the worker slots; returns counts."""
    from tqdm import tqdm
    todo = pending(encoders, out_dir, force)
    bar = tqdm(total=len(todo), desc="DECREE sweep", unit="encoder", disable=not progress, dynamic_ncols=True)
    tally = {"done": 0, "failed": 0, "elsewhere": 0}

    def on_result(enc, outcome):
        tally[outcome["status"]] += 1
        bar.set_postfix(tally, refresh=False)
        bar.update()
        bar.write(outcome_line(enc, outcome))

    try:
        Sweep(out_dir, slots, options, timeout, force).run(todo, on_result)
    finally:
        bar.close()
    return {"encoders": len(encoders), "skipped": len(encoders) - len(todo), **tally}


def interrupt_on_sigterm() -> None:
    """Treat SIGTERM (kill, Slurm's scancel or time limit) like Ctrl-C, so running children are ended too."""
    def handler(signum, frame):
        raise KeyboardInterrupt
    signal.signal(signal.SIGTERM, handler)


def write_sweep_config(out_dir, config: dict) -> Path:
    """Record how this sweep (or shard) was run, next to the per-encoder logs."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path = Path(out_dir) / "detect_log" / f"sweep_{stamp}_{os.getpid()}.json"
    atomic.write_json(path, config)
    return path
