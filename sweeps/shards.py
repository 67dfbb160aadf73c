"""Shards: one slice of a sweep's sorted encoders per Slurm array task (or --shard K/N)."""
import os

from .discovery import Encoder


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
