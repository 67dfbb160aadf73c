"""Shadow sets: the few hundred clean images DECREE inverts triggers on (SPEC 2 defaults)."""
from pathlib import Path

import numpy as np

from .images import DataError, sample_indices

# usage info -> (default data path, default selection) as in the paper's code
SHADOW_DEFAULTS = {
    "cifar10": ("data/cifar10/test.npz", {"per_class_fraction": 0.1}),
    "stl10": ("data/stl10/test.npz", {"count": 800}),
    "imagenet": ("data/imagenet", {"fraction": 0.2}),
    "CLIP": ("data/imagenet", {"fraction": 0.2}),
    "moco": ("data/imagenet", {"fraction": 0.2}),
    # encoders from model hubs: an ImageNet folder, decoded at each model's own input size
    "open_clip": ("data/imagenet", {"fraction": 0.2}),
    "hf_clip": ("data/imagenet", {"fraction": 0.2}),
    "timm": ("data/imagenet", {"fraction": 0.2}),
}


def default_shadow_path(usage_info: str) -> Path:
    return Path(SHADOW_DEFAULTS[usage_info][0])


def select_shadow(x: np.ndarray, y: np.ndarray | None = None, *, fraction: float | None = None,
                  count: int | None = None, per_class_fraction: float | None = None,
                  seed: int = 0) -> np.ndarray:
    """Pick the shadow set from uint8 (N,H,W,3) images.

    per_class_fraction: the first ceil(f * n_c) images of each class, as the paper did for CIFAR10
    (needs labels); fraction/count: a seeded random sample. With none given, all images.
    """
    if per_class_fraction is not None:
        if y is None:  # no labels: the same share, drawn at random
            return x[sample_indices(len(x), fraction=per_class_fraction, seed=seed)]
        keep = []
        for c in np.unique(y):
            idx = np.flatnonzero(y == c)
            keep.append(idx[: int(np.ceil(per_class_fraction * len(idx)))])
        return x[np.sort(np.concatenate(keep))]
    shadow = x[sample_indices(len(x), fraction, count, seed)]
    if len(shadow) == 0:
        raise DataError("the shadow set is empty; give more images or a larger --shadow_size")
    return shadow
