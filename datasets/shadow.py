"""Shadow sets: the few hundred clean images DECREE inverts triggers on (docs/method.md), and which of them a run uses.

- the paper's default file of a usage info gets the paper's rule for it: data/cifar10/test.npz and
  data/stl10/test.npz the first 10% of each class in file order, data/imagenet 20% drawn with Python's
  random.sample seeded with the run's seed (as its main.py seeded `random`);
- any other file is used whole, and an image folder of more than IMAGE_FOLDER_CAP images is sampled down
  to the cap (reading a folder decodes every chosen image);
- --shadow_size / --shadow_fraction replace either rule with a seeded sample of that size.
"""
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .images import DataError, list_images, load_image_folder, load_npz, resize_center_crop, sample_indices

# usage info -> (default data path, the paper's selection from it)
SHADOW_DEFAULTS = {
    "cifar10": ("data/cifar10/test.npz", {"per_class_fraction": 0.1}),
    "stl10": ("data/stl10/test.npz", {"per_class_fraction": 0.1}),
    "imagenet": ("data/imagenet", {"fraction": 0.2}),
    "CLIP": ("data/imagenet", {"fraction": 0.2}),
    "moco": ("data/imagenet", {"fraction": 0.2}),
    # encoders from model hubs: an ImageNet folder, decoded at each model's own input size
    "open_clip": ("data/imagenet", {"fraction": 0.2}),
    "hf_clip": ("data/imagenet", {"fraction": 0.2}),
    "timm": ("data/imagenet", {"fraction": 0.2}),
}
# a folder the user names is read whole up to this many images (the paper's ImageNet shadow set: 10,000)
IMAGE_FOLDER_CAP = 10_000


def default_shadow_path(usage_info: str) -> Path:
    return Path(SHADOW_DEFAULTS[usage_info][0])


def _paper_selection(path: Path) -> dict | None:
    """The paper's selection when `path` is one of its default shadow files, else None."""
    for default, selection in SHADOW_DEFAULTS.values():
        if Path(default).resolve() == path.resolve():
            return selection
    return None


def select_shadow(x: np.ndarray, y: np.ndarray | None = None, *, fraction: float | None = None,
                  count: int | None = None, per_class_fraction: float | None = None,
                  seed: int = 0) -> np.ndarray:
    """Pick the shadow set from uint8 (N,H,W,3) images.

    per_class_fraction: the first ceil(f * n_c) images of each class in file order, as the paper's
    `sample(f)` (needs labels); fraction/count: a seeded sample (see sample_indices). None given: all.
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


@dataclass
class ShadowSet:
    """The images of a run (uint8 (N,S,S,3)) and how they were chosen, for the screen and the run record."""
    images: np.ndarray
    source: str
    rule: str
    available: int  # images in the source

    def describe(self) -> str:
        return f"shadow set: {len(self.images)} of {self.available} images from {self.source} ({self.rule})"


def _rule_text(selection: dict, seed: int, labelled: bool, paper: bool) -> str:
    who = "the paper's rule for this file" if paper else "as asked"
    if "per_class_fraction" in selection:
        share = f"{selection['per_class_fraction']:.0%}"
        if labelled:
            return f"{who}: the first {share} of each class in file order"
        return f"{who}: {share} of each class, but the file has no labels: a {share} sample, seed {seed}"
    if selection.get("count") is not None:
        return f"{who}: a sample of {selection['count']} (Python's random.sample, seed {seed}), in file order"
    if selection.get("fraction") is not None:
        return (f"{who}: a {selection['fraction']:g} sample (Python's random.sample, seed {seed}), "
                "in file order")
    return "all of it; --shadow_size/--shadow_fraction to sample"


def shadow_path(usage_info: str, path=None, input_size: int | str = "S") -> Path:
    """The shadow data a run reads (--shadow_data, else the usage info's default), checked to exist: callers
    check it before loading the encoder, which can take a minute."""
    path = Path(path or default_shadow_path(usage_info))
    if not path.exists():
        raise DataError(f"{path}: shadow data not found; pass --shadow_data (an npz with x uint8 "
                        f"(N,{input_size},{input_size},3), or a folder of images)")
    return path


def load_shadow_set(usage_info: str, input_size: int, path=None, size: int | None = None,
                    fraction: float | None = None, seed: int = 0, progress: bool = True,
                    read_folder=load_image_folder) -> ShadowSet:
    """The shadow set of a run: the paper's rule on its default files, all of a file the user names (image
    folders capped at IMAGE_FOLDER_CAP), or the --shadow_size/--shadow_fraction sample when one is given.
    `read_folder` decodes an image folder (same arguments as load_image_folder; e.g. through a cache)."""
    path = shadow_path(usage_info, path, input_size)
    paper = _paper_selection(path)
    explicit = size is not None or fraction is not None
    selection = {"count": size, "fraction": fraction} if explicit else (paper or {})
    rule = None
    if path.suffix == ".npz":
        x, y = load_npz(path)
        available = len(x)
        try:
            shadow = select_shadow(x, y, seed=seed, **selection)
        except DataError as err:  # the default share of a tiny file can be no image at all
            raise DataError(f"{path}: {err} (selection {selection}); set --shadow_size or --shadow_fraction") from err
        rule = _rule_text(selection, seed, y is not None, paper is not None and not explicit)
    else:
        available = len(list_images(path))
        if "per_class_fraction" in selection:  # a folder has no labels here
            selection = {"fraction": selection["per_class_fraction"]}
        if not selection and available > IMAGE_FOLDER_CAP:
            selection = {"count": IMAGE_FOLDER_CAP}
            rule = (f"capped at {IMAGE_FOLDER_CAP} images: a sample (Python's random.sample, seed {seed}); "
                    "--shadow_size/--shadow_fraction to choose")
        shadow = read_folder(path, size=input_size, seed=seed, progress=progress, **selection)
        rule = rule or _rule_text(selection, seed, False, paper is not None and not explicit)
    shadow = resize_center_crop(shadow, input_size)  # the encoder's input size, whatever the file's
    if len(shadow) < 2:
        raise DataError(f"{path}: the shadow set has {len(shadow)} image(s); DECREE needs at least 2: give more "
                        "images, --shadow_size or --shadow_fraction")
    return ShadowSet(shadow, str(path), rule, available)
