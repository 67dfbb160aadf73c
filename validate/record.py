"""Each validation run records its full configuration beside its CSV; every row it appends names that record."""
import dataclasses
import os
import sys
from datetime import datetime, timezone
from pathlib import Path

from common import io as atomic
from common.provenance import versions


def new_run_name() -> str:
    """Unique per process and second: UTC time + pid, filesystem-safe."""
    return f"{datetime.now(timezone.utc):%Y%m%dT%H%M%SZ}-{os.getpid()}"


def run_record_path(csv_path, run_name: str) -> Path:
    csv_path = Path(csv_path)
    return csv_path.with_name(f"{csv_path.stem}_runs") / f"{run_name}.json"


def write_run_record(csv_path, run_name: str, job, **extra) -> Path:
    """Write <csv stem>_runs/<run_name>.json: the job's every field, the command line, the device, versions."""
    path = run_record_path(csv_path, run_name)
    atomic.write_json(path, {"run": run_name, "argv": sys.argv, "job": dataclasses.asdict(job),
                             "versions": versions(), **extra})
    return path
