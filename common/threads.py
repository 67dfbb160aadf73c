"""CPU thread policy of every entry point: torch threads bounded by the cores this process may use, and
OpenMP threads that sleep instead of spinning while they wait.

torch's default (one thread per core of the machine, spinning between parallel regions) made DECREE 18x
slower on a 2-core machine that was busy with other work: every parallel region waits for its slowest
thread, and a spinning thread takes a core from the process that thread is waiting for.

OpenMP reads OMP_WAIT_POLICY once, when torch loads it, so every script imports this module before anything
that imports torch; the value is also inherited by the processes a script starts (sweep workers).
"""
import argparse
import math
import os
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

CGROUP_CPU_MAX = Path("/sys/fs/cgroup/cpu.max")


def usable_cores(cpu_max: Path = CGROUP_CPU_MAX) -> int:
    """Cores this process may run on: its CPU affinity, capped by a cgroup v2 CPU quota when there is one."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    try:
        quota, period = cpu_max.read_text().split()
        if quota != "max":
            cores = min(cores, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return max(1, cores)


def add_thread_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--threads", type=int, default=None, metavar="N",
                        help="torch CPU threads (default: $OMP_NUM_THREADS if set, else the cores this process "
                             "may use); OpenMP threads wait passively unless $OMP_WAIT_POLICY says otherwise")


def choose_threads(requested: int | None = None, environ=os.environ, cores: int | None = None) -> tuple[int, str]:
    """(threads, why): --threads, else $OMP_NUM_THREADS, else the usable cores."""
    if requested is not None:
        if requested < 1:
            raise ValueError(f"--threads {requested}: must be at least 1")
        return requested, "--threads"
    value = environ.get("OMP_NUM_THREADS", "").split(",")[0].strip()  # OpenMP allows a per-level list
    if value:
        if not value.isdigit() or int(value) < 1:
            raise ValueError(f"OMP_NUM_THREADS={environ['OMP_NUM_THREADS']!r} is not a positive integer; "
                             "unset it or use --threads N")
        return int(value), "OMP_NUM_THREADS"
    cores = cores or usable_cores()
    return cores, f"the {cores} core(s) this process may use"


def configure_threads(requested: int | None = None, log=print) -> int:
    """Set torch's CPU threads by choose_threads and say what was chosen in one line; returns the count."""
    import torch
    threads, why = choose_threads(requested)
    torch.set_num_threads(threads)
    if log:
        log(f"CPU threads: {threads} (from {why}; OpenMP wait policy {os.environ.get('OMP_WAIT_POLICY')}; "
            "change with --threads N)")
    return threads


def threads_per_worker(workers: int, cores: int | None = None) -> int:
    """Split the usable cores between `workers` CPU processes, at least one thread each."""
    return max(1, (cores or usable_cores()) // workers)
