"""Image-folder shadow sets decoded once and reused: a sweep's encoders share one shadow tensor on disk.

Decoding and resizing 10,000 ImageNet JPEGs takes about a minute on one core, per encoder; the cache makes it
once per sweep. The key covers everything the tensor depends on: the folder (its resolved path and every image
file's name, size and modification time), the selection (fraction/count), the input size and the seed. The cache
file is a plain npz (x uint8 (N,S,S,3)), read without pickle, written atomically (parallel workers may both
write it; both write the same bytes).
"""
import hashlib
import json
from pathlib import Path

import numpy as np

from datasets import DataError, load_image_folder
from datasets.images import check_images, list_images

from common import io as atomic


def shadow_cache_key(root, size: int, seed: int, selection: dict) -> str:
    """sha256 over the folder's resolved path, its image files (name, size, mtime), selection, size and seed."""
    root = Path(root).resolve()
    files = [(str(p.relative_to(root)), st.st_size, st.st_mtime_ns) for p in list_images(root)
             for st in (p.stat(),)]
    text = json.dumps({"root": str(root), "files": files, "size": size, "seed": seed, "selection": selection},
                      sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def load_image_folder_cached(cache_dir, root, size: int, seed: int, progress: bool = True,
                             **selection) -> np.ndarray:
    """load_image_folder(root, size, seed=seed, **selection) through the cache in cache_dir (None: no cache)."""
    if cache_dir is None or not Path(root).is_dir():  # a missing folder: the loader's own message
        return load_image_folder(root, size=size, seed=seed, progress=progress, **selection)
    path = Path(cache_dir) / f"{shadow_cache_key(root, size, seed, selection)}.npz"
    if path.is_file():
        try:
            with np.load(path, allow_pickle=False) as cached:
                return check_images(cached["x"], path)
        except (OSError, ValueError, KeyError, DataError):
            pass  # a damaged cache file is rebuilt below
    shadow = load_image_folder(root, size=size, seed=seed, progress=progress, **selection)
    atomic.write_npz(path, x=shadow)
    return shadow
