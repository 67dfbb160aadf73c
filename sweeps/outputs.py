"""The files a sweep writes under --out_dir beside main.py's (docs/method.md): a record per failed encoder, the
output of each encoder's process, and how each sweep (or shard) was run."""
import os
import time
from pathlib import Path

from common import io as atomic


def failed_dir(out_dir) -> Path:
    """Failure records live apart from trigger_norm/*.json, which holds finished runs only (docs/method.md)."""
    return Path(out_dir) / "trigger_norm" / "failed"


def failure_path(out_dir, run_id: str) -> Path:
    return failed_dir(out_dir) / f"{run_id}.json"


def worker_log_path(out_dir, run_id: str) -> Path:
    return Path(out_dir) / "detect_log" / f"{run_id}.worker.log"


def write_sweep_config(out_dir, config: dict) -> Path:
    """Record how this sweep (or shard) was run, next to the per-encoder logs."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path = Path(out_dir) / "detect_log" / f"sweep_{stamp}_{os.getpid()}.json"
    atomic.write_json(path, config)
    return path
