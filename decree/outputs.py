"""The three output folders of a run (docs/method.md), all written atomically; the JSON is written last and marks
the run finished: trigger_inv/<run_id>/, detect_log/<run_id>.log|.csv, trigger_norm/<run_id>.json."""
import csv
import hashlib
import io
import json
import os
import re
import shutil
import stat
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from common import io as atomic
from common.files import check_regular, printable
from common.provenance import versions

CSV_FIELDS = ("epoch", "loss", "cos", "l1", "lambda", "lr", "best_l1", "seconds")


def run_id_for(encoder_path) -> str:
    """Readable and unique: the path's last parts, made filesystem-safe, plus the SHA-256 of the absolute path
    (all of it: two names sharing one id would make one encoder's result stand for the other's)."""
    path = Path(encoder_path)
    resolved = str(path.resolve())
    readable = "_".join(path.with_suffix("").parts[-3:])
    # a path of only non-ASCII names leaves nothing readable; an id must not start with '-' (a CLI flag)
    readable = re.sub(r"[^A-Za-z0-9._-]+", "_", readable).strip("._-")[:80] or "encoder"
    return f"{readable}-{hashlib.sha256(resolved.encode('utf-8', 'surrogateescape')).hexdigest()}"


ENCODER_SIDE_FILES = ("open_clip_config.json", "config.json", "preprocessor_config.json")  # configs beside weights


def encoder_files(encoder_path) -> list[Path]:
    """The files an encoder is made of: a weights file and the hub configs beside it, or a hub folder's files."""
    path = Path(encoder_path)
    if path.is_dir():
        return sorted(p for p in path.iterdir() if p.is_file())
    return [path, *(path.parent / name for name in ENCODER_SIDE_FILES if (path.parent / name).is_file())]


def encoder_fingerprint(encoder_path) -> str | None:
    """SHA-256 over the names and bytes of the encoder's regular files (None if one cannot be read): a result is
    this encoder's only if the fingerprint it records is this one."""
    digest = hashlib.sha256()
    try:
        for file in encoder_files(encoder_path):
            check_regular(file)
            digest.update(f"{file.name}\0{file.stat().st_size}\0".encode("utf-8", "surrogateescape"))
            atomic.update_with_file(digest, file)
    except (OSError, ValueError):
        return None
    return digest.hexdigest()


def encoder_identity(encoder_path) -> dict:
    """What a run records about the file it inspected (is_result_for compares it)."""
    return {"encoder_realpath": str(Path(encoder_path).resolve()), "encoder_sha256": encoder_fingerprint(encoder_path)}


def is_result_for(record: dict, encoder_path) -> bool:
    """A finished run's record is the result of `encoder_path` as it is now: the same file (resolved path) with
    the same content; a record of another file, or of an older version of this one, is not."""
    return (isinstance(record, dict) and record.get("encoder_realpath") == str(Path(encoder_path).resolve())
            and record.get("encoder_sha256") is not None
            and record.get("encoder_sha256") == encoder_fingerprint(encoder_path))


def finished_result(out_dir, encoder_path, run_id: str | None = None) -> dict | None:
    """The finished run record of `encoder_path` under out_dir, if there is one and it is this encoder's."""
    path = RunPaths(Path(out_dir), run_id or run_id_for(encoder_path)).json
    try:
        record = read_run(path)
    except (OSError, ValueError):
        return None
    return record if is_result_for(record, encoder_path) else None


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


# the folders a run or sweep writes into under --out_dir (docs/method.md, plus the sweep's and the shadow cache's)
OUTPUT_FOLDERS = ("trigger_inv", "trigger_norm", "trigger_norm/failed", "trigger_norm/claims", "detect_log",
                  "shadow_cache")


def check_output_folders(out_dir, run_id: str | None = None, extra=()) -> None:
    """Refuse to write through an output folder that is a symlink (it would put results, PNGs or a trigger
    elsewhere) or belongs to another user (who could have planted anything in it): PermissionError, one line.
    `extra`: further folders written to (a --shadow_cache outside out_dir)."""
    out_dir = Path(out_dir)
    folders = [out_dir / name for name in OUTPUT_FOLDERS] + [Path(f) for f in extra]
    if run_id:
        folders += [out_dir / "trigger_inv" / run_id, out_dir / "trigger_inv" / run_id / "snapshots"]
    me = os.geteuid()
    for folder in folders:
        try:
            info = os.lstat(folder)
        except FileNotFoundError:
            continue
        if stat.S_ISLNK(info.st_mode):
            raise PermissionError(f"{printable(folder)}: is a symlink (to {printable(os.readlink(folder))}); "
                                  "results are written only into real folders: remove it or choose another "
                                  "--out_dir")
        if info.st_uid != me:
            raise PermissionError(f"{printable(folder)}: belongs to another user (uid {info.st_uid}), who could "
                                  "have planted files in it; choose an --out_dir of your own (docs/trust-model.md)")


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
    check_output_folders(paths.out_dir, paths.run_id)  # again: the run may have taken hours
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
