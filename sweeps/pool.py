"""A sweep: find the encoders without a result, run main.py on each in a pool of device workers, one line each.

Each encoder runs in its own `main.py` process, so a crash, an out-of-memory error or an unreadable
checkpoint ends that encoder only: it is recorded in `trigger_norm/failed/<run_id>.json` with the last
line of its error output, and the sweep goes on. A finished encoder is recognised by its
`trigger_norm/<run_id>.json` (docs/method.md) and skipped on restart; failed ones are retried on every restart.
Each encoder is claimed before it runs (sweeps/claims.py) and killed after --timeout seconds.
"""
import contextlib
import math
import os
import queue
import signal
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

from common import io as atomic
from common.files import printable
from decree.outputs import RunPaths, finished_result, read_run
from .claims import claim_encoder, claims_dir, release_claim
from .discovery import UNKNOWN, Encoder
from .outputs import failure_path, worker_log_path
from .workers import (WorkerDied, WorkerServer, last_error_line, main_py_args, main_py_command, worker_env,
                      worker_imports)

# exit statuses of an interrupted main.py (decree.cli.user_errors, or killed by SIGINT)
INTERRUPTED = (130, -signal.SIGINT)
DEFAULT_TIMEOUT = 6 * 3600  # seconds per encoder: generous for a ResNet-50/ViT at the paper's 1000 epochs on a GPU


def pending(encoders, out_dir, force: bool = False, options: dict | None = None) -> list[Encoder]:
    """Encoders still to run: all with --force, else those without a finished trigger_norm JSON that is theirs
    (decree.outputs.is_result_for: same file, same content) and, when the sweep's `options` ask for the warp test,
    has its result."""
    warp_test = bool(options and options.get("warp_test"))
    return [enc for enc in encoders if force or not has_result(out_dir, enc, warp_test)]


def has_result(out_dir, enc: Encoder, warp_test: bool) -> bool:
    record = finished_result(out_dir, enc.path, enc.run_id)
    return record is not None and (not warp_test or bool(record.get("warp_test")))


def check_timeout(seconds: float) -> float:
    """--timeout, checked before any work: finite seconds above 0."""
    if not (math.isfinite(seconds) and seconds > 0):
        raise ValueError(f"--timeout {seconds}: give the seconds one encoder may take, a number above 0 "
                         f"(default {DEFAULT_TIMEOUT})")
    return seconds


def _write_record(write, path: Path, content) -> str | None:
    """Write a sweep-side file; a full disk or an unwritable path costs that file only, never the sweep."""
    try:
        write(path, content)
    except OSError as err:
        return f"could not write {path}: {err.strerror or err}"
    return None


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
            if has_result(self.out_dir, enc, bool(self.options.get("warp_test"))) and \
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
            server = WorkerServer(worker_env(self.slots[slot], self._cpu_workers), self.imports)
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
    todo = pending(encoders, out_dir, force, options)
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
