"""Atomic output writing: every file appears whole or not at all (temp file in the same folder + rename)."""
import contextlib
import hashlib
import io
import json
import os
import tempfile
from pathlib import Path

import numpy as np


HASH_CHUNK = 1 << 20


def update_with_file(digest, path) -> None:
    """Feed a file's bytes to a hashlib digest in chunks (no file is read into memory whole)."""
    with open(path, "rb") as fh:
        while chunk := fh.read(HASH_CHUNK):
            digest.update(chunk)


def file_sha256(path) -> str:
    """Hex SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    update_with_file(digest, path)
    return digest.hexdigest()


def current_umask() -> int:
    """The process umask, read without changing it (os.umask can only be read by setting it, which would race
    with other threads creating files)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _temp_file(path: Path) -> tuple[int, str]:
    """mkstemp next to `path`, with the mode an ordinary new file gets (0666 less the umask, not mkstemp's 0600),
    so results in a shared folder can be read by the team."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.fchmod(fd, 0o666 & ~current_umask())
    return fd, tmp


@contextlib.contextmanager
def atomic_path(path):
    """Yield a temp path next to `path`; rename it onto `path` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = _temp_file(path)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_bytes(path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_text(path, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def write_json(path, obj) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=_json_default) + "\n")


def _json_default(obj):
    if isinstance(obj, (np.integer, np.floating)):
        return obj.item()
    if isinstance(obj, (Path,)):
        return str(obj)
    return str(obj)


def write_npz(path, **arrays) -> None:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    write_bytes(path, buf.getvalue())


def write_png(path, image: np.ndarray) -> None:
    """Save uint8 (H,W) or (H,W,3) as PNG."""
    from PIL import Image
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    write_bytes(path, buf.getvalue())


def write_torch(path, obj) -> None:
    import torch
    buf = io.BytesIO()
    torch.save(obj, buf)
    write_bytes(path, buf.getvalue())


def append_line(path, line: str) -> None:
    """Append one line in a single write, so concurrent sweep workers never interleave within a line."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(line.rstrip("\n") + "\n")


def check_writable(folder) -> Path:
    """Fail early, with the folder named, if results could not be written there."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-test-"):
            pass
    except OSError as err:
        raise PermissionError(f"cannot write to output folder {folder}: {err.strerror or err}; "
                              "choose another with --out_dir or fix its permissions") from err
    return folder


@contextlib.contextmanager
def removed_if_empty_on_failure(folder):
    """Around a run that creates `folder`: if the run fails, remove the folders it created that are still empty,
    so bad input leaves no empty results folder behind."""
    folder = Path(folder).absolute()
    created = [p for p in (folder, *folder.parents) if not p.exists()]  # deepest first
    try:
        yield folder
    except BaseException:
        for path in created:
            with contextlib.suppress(OSError):  # not empty (a result was written) or already gone
                path.rmdir()
        raise


def append_csv_row(path, row: dict) -> None:
    """Append one CSV row (header first when the file is new), each in a single write; pandas-readable.

    An existing file must have the same columns, so old and new rows never mix silently.
    """
    import csv
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fields = list(row)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n")
    writer.writerow(row)
    line = buf.getvalue()
    header = ",".join(fields) + "\n"
    if _create_exclusive(path, (header + line).encode("utf-8")):
        return
    with open(path, encoding="utf-8") as fh:
        existing = fh.readline()
    if existing and existing != header:
        raise ValueError(f"{path}: has columns {existing.strip()!r}, this run writes {header.strip()!r}; "
                         "choose another results file")
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(line if existing else header + line)


def _create_exclusive(path: Path, data: bytes) -> bool:
    """Create `path` holding `data`, all at once, unless it exists (then False): hard link of a full temp file."""
    fd, tmp = _temp_file(path)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        try:
            os.link(tmp, path)
            return True
        except FileExistsError:
            return False
        except OSError:  # a filesystem without hard links: exclusive create, then one write
            try:
                with open(path, "xb") as fh:
                    fh.write(data)
                return True
            except FileExistsError:
                return False
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
