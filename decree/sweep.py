"""Sweeps: find many encoders, pick this shard's slice, run main.py on each in a pool of device workers.

Each encoder runs in its own `main.py` process, so a crash, an out-of-memory error or an unreadable
checkpoint ends that encoder only: it is recorded in `trigger_norm/failed/<run_id>.json` with the last
line of its error output, and the sweep goes on. A finished encoder is recognised by its
`trigger_norm/<run_id>.json` (SPEC 7) and skipped on restart; failed ones are retried on every restart.
"""
import csv
import fnmatch
import glob
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

from models import USAGE_INFOS

from common import io as atomic
from common.device import resolve_device
from .outputs import RunPaths, read_run, run_id_for

MAIN_PY = Path(__file__).resolve().parents[1] / "main.py"
CHECKPOINT_PATTERNS = ("*.pth", "*.pt")
LABELS = ("clean", "backdoor")
# the paper's folders under output/: the first folder names the usage info
USAGE_FOLDERS = {"cifar10": "cifar10", "stl10": "stl10", "imagenet": "imagenet", "CLIP": "CLIP",
                 "CLIP_text": "CLIP", "moco": "moco"}
# the paper's sweep (run_decree.py) differs from main.py's defaults only in the learning rate
SWEEP_DEFAULTS = {"lr": 0.5}
# exit statuses of an interrupted main.py (decree.cli.user_errors, or killed by SIGINT)
INTERRUPTED = (130, -signal.SIGINT)
# per-encoder flags: set by the sweep for each encoder, never passed through from the command line
PER_ENCODER_FLAGS = ("encoder_usage_info", "arch", "device", "gpu")


@dataclass(frozen=True)
class Encoder:
    """One encoder of a sweep; label is 'clean' or 'backdoor'; family: the manifest's free-text group (attack)."""
    path: str
    usage_info: str
    arch: str | None
    label: str
    family: str = ""

    @property
    def run_id(self) -> str:
        return run_id_for(self.path)


# ---- discovery --------------------------------------------------------------------------------------------

def infer_label(path) -> str:
    """The paper's rule: 'clean' anywhere in the path means a clean encoder, anything else a backdoored one."""
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
    """The paper's layout: root/<usage>/**/*.pth|*.pt; CLIP_text/ holds CLIP encoders; other folders ignored."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: no such folder; put encoders in output/<usage_info>/... or pass "
                                "--encoders GLOB or --manifest CSV")
    encoders = [Encoder(str(path), usage, arch, infer_label(path.relative_to(root)))
                for folder, usage in USAGE_FOLDERS.items() if (root / folder).is_dir()
                for path in (root / folder).rglob("*") if _is_checkpoint(path)]
    if not encoders:
        raise FileNotFoundError(f"{root}: no *.pth/*.pt checkpoints under {', '.join(USAGE_FOLDERS)}")
    return _sorted_unique(encoders)


def discover_globs(patterns, usage_info: str, arch: str | None = None) -> list[Encoder]:
    """Checkpoints matching shell globs (** recursive); a pattern that matches nothing is an error."""
    encoders = []
    for pattern in patterns:
        matches = [Path(p) for p in glob.glob(pattern, recursive=True)]
        matches = [p for q in matches for p in ([q] if q.is_file() else q.rglob("*")) if _is_checkpoint(p)]
        if not matches:
            raise FileNotFoundError(f"--encoders {pattern!r}: matches no .pth/.pt file")
        encoders += [Encoder(str(p), usage_info, arch, infer_label(p)) for p in matches]
    return _sorted_unique(encoders)


def read_manifest(path, usage_info: str = "cifar10", arch: str | None = None) -> list[Encoder]:
    """CSV with columns path[,usage_info][,arch][,label][,family]; empty cells take the command-line defaults.

    Relative paths are relative to the manifest's folder, so a manifest travels with its encoders.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--manifest {path}: no such file")
    with open(path, newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        columns = [c.strip() for c in reader.fieldnames or []]
        if "path" not in columns:
            raise ValueError(f"{path}: needs a header with a 'path' column (optional: usage_info, arch, label, "
                             f"family); found {columns or 'an empty file'}")
        unknown = set(columns) - {"path", "usage_info", "arch", "label", "family"}
        if unknown:
            raise ValueError(f"{path}: unknown column(s) {sorted(unknown)}; use path, usage_info, arch, label, family")
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
    encoder = Path(row["path"]).expanduser()
    if not encoder.is_absolute():
        encoder = manifest.parent / encoder
    usage = row.get("usage_info") or usage_info
    if usage not in USAGE_INFOS:
        raise ValueError(f"{where}: usage_info {usage!r} is not one of {', '.join(USAGE_INFOS)}")
    label = row.get("label") or infer_label(row["path"])
    if label not in LABELS:
        raise ValueError(f"{where}: label {label!r} is not 'clean' or 'backdoor'")
    return Encoder(str(encoder), usage, row.get("arch") or arch, label, row.get("family", ""))


def find_encoders(manifest=None, patterns=None, root="output", usage_info: str = "cifar10",
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


# ---- the runs ---------------------------------------------------------------------------------------------

def failed_dir(out_dir) -> Path:
    """Failure records live apart from trigger_norm/*.json, which holds finished runs only (SPEC 7)."""
    return Path(out_dir) / "trigger_norm" / "failed"


def failure_path(out_dir, run_id: str) -> Path:
    return failed_dir(out_dir) / f"{run_id}.json"


def worker_log_path(out_dir, run_id: str) -> Path:
    return Path(out_dir) / "detect_log" / f"{run_id}.worker.log"


def pending(encoders, out_dir, force: bool = False) -> list[Encoder]:
    """Encoders still to run: all with --force, else those without a finished trigger_norm JSON."""
    return [enc for enc in encoders if force or not RunPaths(Path(out_dir), enc.run_id).finished()]


def worker_devices(devices: str | None, device: str = "auto", gpu: int | None = None,
                   workers: int | None = None) -> list[str]:
    """One device name per worker: --devices 0,1 | cpu, else from --device/--gpu (auto = every visible GPU).

    --workers N runs N workers spread round-robin over those devices (several small encoders per GPU).
    """
    import torch
    if devices:
        names = ["cpu"] if devices == "cpu" else [f"cuda:{int(i)}" for i in devices.split(",")]
    elif gpu is None and device in ("auto", "cuda") and torch.cuda.is_available():
        names = [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    else:  # one device, checked as main.py checks it (a missing CUDA device is a one-line error)
        names = [str(resolve_device(device, gpu))]
    count = workers or len(names)
    if count < 1:
        raise ValueError("--workers must be at least 1")
    return [names[i % len(names)] for i in range(count)]


def passthrough_argv(options: dict) -> list[str]:
    """main.py flags for the sweep-wide options (inversion_kwargs names = main.py flag names)."""
    argv = []
    for name, value in options.items():
        if name in PER_ENCODER_FLAGS or value is None or value is False:
            continue
        argv += [f"--{name}"] if value is True else [f"--{name}", str(value)]
    return argv


def main_py_command(enc: Encoder, device: str, out_dir, options: dict) -> list[str]:
    command = [sys.executable, str(MAIN_PY), "--encoder_path", enc.path, "--encoder_usage_info", enc.usage_info,
               "--device", device, "--out_dir", str(out_dir), "--id", enc.run_id, "--model_flag", enc.label,
               "--quiet"]
    if enc.arch:
        command += ["--arch", enc.arch]
    return command + passthrough_argv(options)


def last_error_line(output: str, returncode: int) -> str:
    """The reason shown for a failed run: the last non-empty line the process wrote, or how it died."""
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    if lines:
        return lines[-1]
    if returncode < 0:
        return f"killed by signal {signal.Signals(-returncode).name}"
    return f"exited with status {returncode} and no message"


def _child_env(device: str, cpu_workers: int) -> dict:
    env = dict(os.environ)
    # CPU workers would each start one thread per core and slow each other down; split the cores instead
    if device == "cpu" and "OMP_NUM_THREADS" not in env:
        env["OMP_NUM_THREADS"] = str(max(1, len(os.sched_getaffinity(0)) // cpu_workers))
    return env


class Sweep:
    """A pool of device workers running main.py per encoder; stop() ends the running children."""

    def __init__(self, out_dir, slots: list[str], options: dict):
        self.out_dir, self.slots, self.options = Path(out_dir), slots, options
        self._running: set[subprocess.Popen] = set()
        self._lock = threading.Lock()
        self._stopping = False
        self._cpu_workers = sum(slot == "cpu" for slot in slots)

    def run_one(self, enc: Encoder, device: str) -> dict:
        """Run one encoder: {'status': 'done', 'record': ...}, {'status': 'failed', 'error': ...} or 'stopped'."""
        command = main_py_command(enc, device, self.out_dir, self.options)
        started = time.time()
        with self._lock:
            if self._stopping:
                return {"status": "stopped"}
            proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                    env=_child_env(device, self._cpu_workers))
            self._running.add(proc)
        output, _ = proc.communicate()
        with self._lock:
            self._running.discard(proc)
        atomic.write_text(worker_log_path(self.out_dir, enc.run_id), f"$ {' '.join(command)}\n{output}")
        paths = RunPaths(self.out_dir, enc.run_id)
        # Ctrl-C reaches the children before the sweep stops them: an interrupted run is not a failure
        if self._stopping or proc.returncode in INTERRUPTED:
            return {"status": "stopped"}
        if proc.returncode == 0 and paths.finished():
            failure_path(self.out_dir, enc.run_id).unlink(missing_ok=True)
            return {"status": "done", "record": read_run(paths.json)}
        error = last_error_line(output, proc.returncode)
        atomic.write_json(failure_path(self.out_dir, enc.run_id), {
            "encoder_path": enc.path, "run_id": enc.run_id, "usage_info": enc.usage_info, "arch": enc.arch,
            "model_flag": enc.label, "status": "failed", "error": error, "returncode": proc.returncode,
            "device": device, "seconds": time.time() - started, "worker_log": str(worker_log_path(
                self.out_dir, enc.run_id)), "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S")})
        return {"status": "failed", "error": error}

    def run(self, encoders, on_result=None) -> None:
        """Run every encoder, one per free worker slot; on_result(enc, outcome) after each."""
        free = queue.Queue()
        for slot in self.slots:
            free.put(slot)

        def task(enc):
            device = free.get()  # never waits: the pool has exactly one thread per slot
            try:
                return self.run_one(enc, device)
            finally:
                free.put(device)

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

    def stop(self) -> None:
        """End the running main.py processes (their partial outputs are never written: files are atomic)."""
        with self._lock:
            self._stopping = True
            for proc in self._running:
                proc.terminate()


def outcome_line(enc: Encoder, outcome: dict) -> str:
    if outcome["status"] == "failed":
        return f"FAILED   {enc.path}: {outcome['error']}"
    record = outcome["record"]
    pl1 = "no trigger found" if record["pl1"] is None else f"PL1 {record['pl1']:.4f}"
    return f"{record['verdict'].upper():8s} {enc.path}: {pl1} ({enc.label})"


def run_sweep(encoders, out_dir, slots: list[str], options: dict, force: bool = False,
              progress: bool = True) -> dict:
    """Run the encoders without a finished result (all with force) on the worker slots; returns counts."""
    from tqdm import tqdm
    todo = pending(encoders, out_dir, force)
    bar = tqdm(total=len(todo), desc="DECREE sweep", unit="encoder", disable=not progress, dynamic_ncols=True)
    tally = {"done": 0, "failed": 0}

    def on_result(enc, outcome):
        tally[outcome["status"]] += 1
        bar.set_postfix(tally, refresh=False)
        bar.update()
        bar.write(outcome_line(enc, outcome))

    try:
        Sweep(out_dir, slots, options).run(todo, on_result)
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
