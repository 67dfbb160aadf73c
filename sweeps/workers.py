"""The sweep's workers: one fork server per worker slot that has imported main.py's modules once, and the
main.py command line each encoder runs with.

Workers are hardened against what they inspect (docs/sweeps.md): each runs under `python -I` with an explicit
list of what it may import (common/isolated.py), in its own process group, and dies with the sweep. Every
encoder runs in a fresh child forked from its slot's server, so a sweep does not pay the interpreter's start
and torch's imports for every encoder.
"""
import contextlib
import json
import os
import queue
import signal
import subprocess
import sys
import threading
from pathlib import Path

from models.registry import ARCH_MODULES_ENV

from common.device import resolve_device
from common.isolated import ROOT, isolated_command
from common.threads import threads_per_worker, usable_cores
from .discovery import Encoder

MAIN_PY = ROOT / "main.py"
SMALL_IMAGE_USAGE = ("cifar10", "stl10")  # usage infos of 32-px encoders
# per-encoder flags: set by the sweep for each encoder, never passed through from the command line
PER_ENCODER_FLAGS = ("encoder_usage_info", "arch", "device", "gpu", "max_memory")


def cpu_workers(encoders, threads: int | None = None) -> int:
    """Default number of CPU workers: one per usable core (per `threads` cores with --threads) when every
    encoder takes 32-px images, else one.

    A 32-px encoder's convolutions are too small to keep a second thread busy, and waiting threads sleep
    (common.threads), so side-by-side 1-thread runs beat one run with every thread (docs/speed.md). 224-px
    encoders' convolutions scale with threads, and every worker holds its own model and activations in memory."""
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
    """main.py flags for the sweep-wide options (decree.cli.inversion_flags names = main.py flag names)."""
    argv = []
    for name, value in options.items():
        if name in PER_ENCODER_FLAGS or value is None or value is False:
            continue
        argv.append(f"--{name}" if value is True else flag(name, value))
    return argv


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


def worker_env(device: str, cpu_workers: int) -> dict:
    env = dict(os.environ)
    # CPU workers would each start one thread per core and slow each other down; split the cores instead
    # (main.py reads OMP_NUM_THREADS through common.threads; OMP_WAIT_POLICY=PASSIVE is inherited)
    if device == "cpu" and "OMP_NUM_THREADS" not in env:
        env["OMP_NUM_THREADS"] = str(threads_per_worker(cpu_workers))
    return env


# what main.py imports: a worker server imports these once, before it forks the first encoder's process
# (torchvision too: models import it only when they build a backbone; and torch._dynamo, which torch.optim's
# optimisers import on their first use, seconds that every encoder's process would pay)
MAIN_PY_IMPORTS = ("common.threads", "common.determinism", "common.signals", "decree.cli", "decree.detect",
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
