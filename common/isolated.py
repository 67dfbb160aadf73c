"""Run a project script in a Python that imports nothing from the current, the script's or the output folder.

Sweep workers are started as `python -I common/isolated.py SETUP SCRIPT ARGS...` (`isolated_command`).
Python's isolated mode (-I) ignores the PYTHON* variables and the user's site-packages, and puts neither the
current folder nor the script's folder on sys.path, so a `torch.py`, `decree.py` or `sitecustomize.py`
that someone (or a hostile checkpoint) left in one of them is never imported. What the worker may import
besides the standard library and site-packages is spelled out in SETUP (JSON):
  - modules: top-level name -> folder, found there by name only (the project's packages in the project
    root, the --arch_module modules where the parent process found them); nothing else in those folders;
  - path: folders searched after the standard library and site-packages (the --arch_module folders and the
    caller's PYTHONPATH, without the folders above), so they cannot shadow an installed module;
  - parent: the sweep's pid; the worker dies with it (PR_SET_PDEATHSIG on Linux, else a watchdog thread);
  - serve (optional): modules to import once, after which the process is a fork server ("zygote") for SCRIPT:
    for every request line on its standard input ({"args": [...], "output": file}) it forks a child that runs
    SCRIPT with those args in a session of its own, its output in that file, and answers {"pid": N}, then
    {"returncode": R} when the child has ended. A sweep thus pays the interpreter's start and the imports of
    torch once per worker instead of once per encoder, while each encoder still runs in a process of its own
    that cannot touch the server or the other encoders' processes.
"""
import ctypes
import importlib
import importlib.abc
import importlib.machinery
import json
import os
import runpy
import signal
import sys
import threading
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# the project's top-level packages (tests/test_sweep.py checks that this is every package in the root)
PROJECT_PACKAGES = ("attacks", "common", "datasets", "decree", "experiments", "models", "sweeps", "validate")
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
WATCHDOG_SECONDS = 0.5


class NamedModules(importlib.abc.MetaPathFinder):
    """Finds exactly the listed top-level modules, each in its own folder; submodules follow their package."""

    def __init__(self, folders: dict):
        self.folders = folders

    def find_spec(self, name, path=None, target=None):
        if path is None and name in self.folders:
            return importlib.machinery.PathFinder.find_spec(name, [self.folders[name]])
        return None


def isolated_command(script, args, modules: dict, path: list, parent: int, serve: list | None = None) -> list[str]:
    """argv that runs `script args` under -I with the project's packages plus `modules` (name -> folder); with
    `serve` (modules to preload), a fork server that runs `script` once per request instead."""
    setup = {"modules": {**dict.fromkeys(PROJECT_PACKAGES, str(ROOT)), **modules}, "path": path,
             "parent": parent, **({"serve": list(serve)} if serve is not None else {})}
    return [sys.executable, "-I", str(Path(__file__).resolve()), json.dumps(setup), str(script), *map(str, args)]


def die_with_parent(parent: int) -> None:
    """End this process (and its process group) when the process that started it dies, even by SIGKILL."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL) != 0:
            raise OSError(ctypes.get_errno(), "prctl")
    except (OSError, AttributeError):  # not Linux: poll for the parent instead
        threading.Thread(target=_watch_parent, args=(parent,), daemon=True).start()
    if os.getppid() != parent:  # it died before prctl took effect
        os._exit(1)


def _watch_parent(parent: int) -> None:
    while os.getppid() == parent:
        threading.Event().wait(WATCHDOG_SECONDS)
    if os.getpgrp() == os.getpid():  # sweep workers lead their own group: take what they started along
        os.killpg(os.getpgrp(), signal.SIGKILL)
    os.kill(os.getpid(), signal.SIGKILL)


def serve(script: str, preload: list[str]) -> None:
    """The fork server's loop (see the module docstring): one forked child per request, one at a time."""
    # answers go to the pipe that was stdout; whatever else prints to stdout (an import, say) goes to stderr
    replies = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    for name in preload:
        importlib.import_module(name)
    server = os.getpid()
    for line in sys.stdin:
        request = json.loads(line)
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            try:  # whatever happens, the child never returns into this loop
                replies.close()  # the child's code cannot forge the server's answers
                run_forked(script, request["args"], request["output"], server)
            finally:
                os._exit(1)
        print(json.dumps({"pid": pid}), file=replies, flush=True)
        _, status = os.waitpid(pid, 0)
        print(json.dumps({"returncode": os.waitstatus_to_exitcode(status)}), file=replies, flush=True)


def run_forked(script: str, args: list, output: str, server: int) -> None:
    """In a child of the fork server: its own session, output to `output`, `script args`, then exit."""
    os.setsid()  # a timeout or a stopped sweep ends this child's process group, never the server
    die_with_parent(server)  # PDEATHSIG does not survive fork(): set it again, for the server this time
    log = os.open(output, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
    os.dup2(log, 1)
    os.dup2(log, 2)
    code = 0
    try:
        sys.argv = [script, *args]
        runpy.run_path(script, run_name="__main__")
    except SystemExit as stop:
        if isinstance(stop.code, int) or stop.code is None:
            code = stop.code or 0
        else:  # sys.exit("message"), as the interpreter would report it
            print(stop.code, file=sys.stderr)
            code = 1
    except BaseException:  # noqa: BLE001 - the interpreter's own reaction to an uncaught exception
        traceback.print_exc()
        code = 1
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
    os._exit(code)


def main(argv) -> None:
    setup, script, args = json.loads(argv[0]), argv[1], argv[2:]
    die_with_parent(setup["parent"])
    sys.meta_path.insert(0, NamedModules(setup["modules"]))
    sys.path.extend(setup["path"])
    if "serve" in setup:
        serve(script, setup["serve"])
        return
    sys.argv = [script, *args]
    runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    main(sys.argv[1:])
