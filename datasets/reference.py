"""Reference inputs of image-target attacks (docs/method.md): x uint8 (K,H,W,3), y int64 (K,), optional info."""
import numpy as np

from .images import DataError, _open_npz, check_images, labels, load_npz


def load_reference(path):
    """Returns (x uint8 (K,H,W,3), y int64 (K,))."""
    with _open_npz(path) as data:
        if "x" not in data.files:
            raise DataError(f"{path}: a reference file needs 'x' (found {data.files}); "
                            "make one with scripts/make_reference.py")
        x = check_images(data["x"], path)
        y = labels(data["y"], path, len(x)) if "y" in data.files else np.zeros(len(x), np.int64)
    return x, y


def save_reference(path, x: np.ndarray, y: np.ndarray, info=None) -> None:
    from common.io import write_npz
    arrays = {"x": check_images(x, path), "y": np.asarray(y, np.int64).reshape(-1)}
    if info:
        arrays["info"] = np.asarray(info, dtype=str)
    write_npz(path, **arrays)


def pick_reference(dataset_path, label: int, count: int = 1, seed: int = 0):
    """Draw `count` images of class `label` from a labelled npz: returns (x, y)."""
    x, y = load_npz(dataset_path, require_labels=True)
    idx = np.flatnonzero(y == label)
    if len(idx) < count:
        raise DataError(f"{dataset_path}: class {label} has {len(idx)} images, {count} requested")
    pick = np.sort(np.random.default_rng(seed).choice(idx, size=count, replace=False))
    return x[pick], y[pick]
