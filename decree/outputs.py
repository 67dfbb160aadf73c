"""The three output folders of a run (SPEC 7), all written atomically; the JSON is written last and marks
the run finished: trigger_inv/<run_id>/, detect_log/<run_id>.log|.csv, trigger_norm/<run_id>.json."""
import csv
import hashlib
import io
import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from common import io as atomic
from common.provenance import versions

CSV_FIELDS = ("epoch", "loss", "cos", "l1", "lambda", "lr", "best_l1", "seconds")


def run_id_for(encoder_path) -> str:
    """Readable and unique: the path's last parts, made filesystem-safe, plus a hash of the absolute path."""
    path = Path(encoder_path)
    resolved = str(path.resolve())
    readable = "_".join(path.with_suffix("").parts[-3:])
    # a path of only non-ASCII names leaves nothing readable; an id must not start with '-' (a CLI flag)
    readable = re.sub(r"[^A-Za-z0-9._-]+", "_", readable).strip("._-")[:80] or "encoder"
    return f"{readable}-{hashlib.sha1(resolved.encode()).hexdigest()[:8]}"


@dataclass(frozen=True)
class RunPaths:
    out_dir: Path
    run_id: str

    @property
    def trigger_dir(self) -> Path:
        return Path(self.out_dir) / "trigger_inv" / self.run_id

    @property
    def target(self) -> Path:
        """The recovered target embedding, float32 (D,) (decree/target.py)."""
        return Path(self.out_dir) / "trigger_norm" / f"{self.run_id}.target.pt"

    @property
    def log(self) -> Path:
        return Path(self.out_dir) / "detect_log" / f"{self.run_id}.log"

    @property
    def csv(self) -> Path:
        return Path(self.out_dir) / "detect_log" / f"{self.run_id}.csv"

    @property
    def json(self) -> Path:
        return Path(self.out_dir) / "trigger_norm" / f"{self.run_id}.json"

    def finished(self) -> bool:
        return self.json.is_file()


def write_trigger_images(folder: Path, mask: np.ndarray, pattern: np.ndarray, suffix: str = "") -> None:
    """mask float (H,W) in [0,1], pattern float (H,W,3) in [0,255] -> mask/pattern/fusion PNGs."""
    atomic.write_png(folder / f"mask{suffix}.png", (mask * 255).round().astype(np.uint8))
    atomic.write_png(folder / f"pattern{suffix}.png", pattern.round().astype(np.uint8))
    atomic.write_png(folder / f"fusion{suffix}.png", (mask[..., None] * pattern).round().astype(np.uint8))


def history_csv(history: list) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CSV_FIELDS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(history)
    return buf.getvalue()


def remove_run(paths: RunPaths) -> None:
    """Delete a run's outputs (after a failed write: no trigger images or logs without their JSON)."""
    shutil.rmtree(paths.trigger_dir, ignore_errors=True)
    for path in (paths.json, paths.csv, paths.log):
        path.unlink(missing_ok=True)


def write_run(paths: RunPaths, result, meta: dict, log_text: str) -> dict:
    """Write every output of a finished inversion, the JSON last; returns the trigger_norm record.

    If any write fails (a full disk, Ctrl-C) the run's outputs are removed: a run is whole or absent.
    """
    try:
        return _write_run(paths, result, meta, log_text)
    except BaseException:
        remove_run(paths)
        raise


def _write_run(paths: RunPaths, result, meta: dict, log_text: str) -> dict:
    if result.found:
        write_trigger_images(paths.trigger_dir, result.mask, result.pattern)
        atomic.write_npz(paths.trigger_dir / "trigger.npz", mask=result.mask.astype(np.float32),
                         pattern=result.pattern.round().astype(np.uint8))
    atomic.write_text(paths.csv, history_csv(result.history))
    atomic.write_text(paths.log, log_text)
    size = meta["input_size"]
    record = {
        **meta,
        "run_id": paths.run_id,
        "l1": result.l1 if result.found else None,
        "pl1": result.pl1 if result.found else None,
        "pl1_divisor": f"H*W*3 = {size}*{size}*3 = {size * size * 3}",
        "pl1_threshold": result.pl1_threshold,
        "trigger_found": result.found,
        "verdict": result.verdict,
        "epochs": result.epochs,
        "seconds": result.seconds,
        "versions": versions(),
    }
    atomic.write_json(paths.json, record)
    return record


def read_run(json_path) -> dict:
    return json.loads(Path(json_path).read_text())


def append_result_line(result_file, encoder_path, model_flag: str, l1: float, seconds: float) -> None:
    """The paper's CSV line for old scripts: encoder_path,model_flag,L1,seconds, both numbers with 4 decimals
    (no trigger found: L1 = the paper's 1/eps, written 10000000.0000), quoted as CSV quotes (a path with a comma
    or newline stays one field: it cannot forge a line)."""
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerow([str(encoder_path), model_flag, f"{l1:.4f}", f"{seconds:.4f}"])
    atomic.append_line(result_file, buf.getvalue())
