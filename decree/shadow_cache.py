"""Image-folder shadow sets decoded once and reused: a sweep's encoders share one shadow tensor on disk.

Decoding and resizing 10,000 ImageNet JPEGs takes about a minute on one core, per encoder; the cache makes it
once per sweep. The key covers everything the tensor depends on: the folder (its resolved path and every image
file's name, size and modification time), the selection (fraction/count), the input size and the seed. The cache
file is a plain npz (x uint8 (N,S,S,3)), read without pickle, written atomically (parallel workers may both
write it; both write the same bytes).

An output folder may be shared (docs/trust-model.md), so a cache file is tied to its content: its name ends in
the SHA-256 of its bytes, checked on every read, it must be a regular file of this user's, its npz headers are
checked before numpy allocates, and the run records which file (and hash) it used. Anything else is rebuilt.
"""
import hashlib
import io
import json
import os
import stat
from pathlib import Path

import numpy as np

from datasets import DataError, load_image_folder
from datasets.images import check_images, check_npz_headers, list_images

from common import io as atomic

HASH_CHARS = 24


def shadow_cache_key(root, size: int, seed: int, selection: dict) -> str:
    """sha256 over the folder's resolved path, its image files (name, size, mtime), selection, size and seed."""
    root = Path(root).resolve()
    files = [(str(p.relative_to(root)), st.st_size, st.st_mtime_ns) for p in list_images(root)
             for st in (p.stat(),)]
    text = json.dumps({"root": str(root), "files": files, "size": size, "seed": seed, "selection": selection},
                      sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def _read_cached(path: Path) -> tuple[np.ndarray, str] | None:
    """(images, sha256) of a cache file that is this user's regular file and holds what its name says, else None."""
    try:
        info = os.lstat(path)
        if not stat.S_ISREG(info.st_mode) or info.st_uid != os.geteuid():  # a link or another user's file
            return None
        digest = atomic.file_sha256(path)
        if digest[:HASH_CHARS] != path.stem.rsplit("-", 1)[-1]:
            return None
        check_npz_headers(path)
        with np.load(path, allow_pickle=False) as cached:
            return check_images(cached["x"], path), digest
    except (OSError, ValueError, KeyError, DataError):
        return None  # a damaged, replaced or foreign cache file is rebuilt


def _write_cached(cache_dir: Path, key: str, shadow: np.ndarray) -> tuple[Path, str]:
    buf = io.BytesIO()
    np.savez(buf, x=shadow)
    data = buf.getvalue()
    digest = hashlib.sha256(data).hexdigest()
    path = cache_dir / f"{key}-{digest[:HASH_CHARS]}.npz"
    atomic.write_bytes(path, data)
    return path, digest


def load_image_folder_cached(cache_dir, root, size: int, seed: int, progress: bool = True, used: dict | None = None,
                             **selection) -> np.ndarray:
    """load_image_folder(root, size, seed=seed, **selection) through the cache in cache_dir (None: no cache);
    `used`, if given, receives the cache file and its SHA-256 (for the run's record)."""
    if cache_dir is None or not Path(root).is_dir():  # a missing folder: the loader's own message
        return load_image_folder(root, size=size, seed=seed, progress=progress, **selection)
    key = shadow_cache_key(root, size, seed, selection)
    for path in sorted(Path(cache_dir).glob(f"{key}-*.npz")):
        found = _read_cached(path)
        if found is not None:
            shadow, digest = found
            break
    else:
        shadow = load_image_folder(root, size=size, seed=seed, progress=progress, **selection)
        path, digest = _write_cached(Path(cache_dir), key, shadow)
    if used is not None:
        used.update(file=str(path), sha256=digest)
    return shadow
