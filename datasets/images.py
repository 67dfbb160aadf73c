"""Image datasets: BadEncoder npz files (x uint8 (N,H,W,3), y (N,) or (N,1)) and plain image folders."""
import os
import random
import warnings
import zipfile
from pathlib import Path

import numpy as np

from common.files import check_regular, walk_files

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".jpe", ".tif", ".tiff", ".ppm"}


class DataError(ValueError):
    """Input data that cannot be used, with the file and the fix in the message."""


DEFLATE_MAX_RATIO = 1100  # deflate cannot expand data more than ~1032x: a larger claim is a lie (a zip bomb)


def _memory_bytes() -> int:
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 1 << 40


def check_npz_headers(path) -> None:
    """Read each array's .npy header inside the zip and refuse object arrays and sizes that the file cannot
    hold or memory cannot take, before numpy allocates anything."""
    memory = _memory_bytes()
    with zipfile.ZipFile(path) as zf:
        for info in zf.infolist():
            key = info.filename[:-4] if info.filename.endswith(".npy") else info.filename
            if info.compress_type != zipfile.ZIP_STORED and info.file_size > DEFLATE_MAX_RATIO * info.compress_size:
                raise DataError(f"{path}: array '{key}' claims {info.file_size} bytes from {info.compress_size} "
                                "compressed ones (a zip bomb?); re-create the file with numpy.savez")
            with zf.open(info) as fh:
                try:
                    version = np.lib.format.read_magic(fh)
                    read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                                   else np.lib.format.read_array_header_2_0)
                    shape, _, dtype = read_header(fh, max_header_size=10000)
                except Exception as err:  # noqa: BLE001 - a crafted header fails with ValueError, SyntaxError, ...
                    raise DataError(f"{path}: array '{key}' has no valid .npy header ({err}); re-create the file "
                                    "with numpy.savez") from err
            if dtype.hasobject:
                raise DataError(f"{path}: array '{key}' holds Python objects, which numpy would have to unpickle; "
                                "save plain numeric arrays (e.g. x uint8, y int64)")
            nbytes = int(np.prod(shape, dtype=object)) * dtype.itemsize
            if nbytes > info.file_size or nbytes > memory:
                raise DataError(f"{path}: array '{key}' declares shape {shape} ({nbytes} bytes) but the file holds "
                                f"{info.file_size} bytes for it; the file is corrupt or crafted")


def _open_npz(path):
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such file; pass an existing .npz")
    check_regular(path, ".npz file")
    if not zipfile.is_zipfile(path):
        with open(path, "rb") as fh:
            is_npy = fh.read(6) == b"\x93NUMPY"
        hint = "it is a single .npy array: save it with numpy.savez(path, x=...)" if is_npy else \
            "not a zip archive; re-create it with numpy.savez"
        raise DataError(f"{path}: not a readable .npz file ({hint})")
    try:
        check_npz_headers(path)
        return np.load(path, allow_pickle=False)
    except (ValueError, OSError, zipfile.BadZipFile, EOFError) as err:
        if isinstance(err, DataError):
            raise
        raise DataError(f"{path}: not a readable .npz file ({err}); re-create it with numpy.savez") from err


def labels(y: np.ndarray, source, n: int) -> np.ndarray:
    """Class labels int64 (N,) from a y array of integers (or integral floats)."""
    y = np.asarray(y).reshape(-1)
    if y.dtype.kind == "f" and np.isfinite(y).all() and (y == np.round(y)).all():
        y = y.astype(np.int64)
    if y.dtype.kind not in "iub":
        raise DataError(f"{source}: labels 'y' are {y.dtype} ({y[:3].tolist()}...), not class numbers; "
                        "save integer labels (e.g. np.int64)")
    if len(y) != n:
        raise DataError(f"{source}: {len(y)} labels for {n} images")
    return y.astype(np.int64)


def check_images(x: np.ndarray, source) -> np.ndarray:
    """Validate uint8 (N,H,W,3) images; returns x unchanged."""
    if x.dtype != np.uint8:
        raise DataError(f"{source}: images must be uint8 in [0,255], got dtype {x.dtype}; "
                        "convert with (x*255).round().astype(np.uint8) if they are floats in [0,1]")
    if x.ndim != 4 or x.shape[-1] != 3:
        raise DataError(f"{source}: images must have shape (N,H,W,3), got {tuple(x.shape)}")
    if x.shape[0] == 0:
        raise DataError(f"{source}: contains no images")
    return x


def load_npz(path, require_labels: bool = False):
    """Read an npz dataset: returns (x uint8 (N,H,W,3), y int64 (N,) or None)."""
    with _open_npz(path) as data:
        if "x" not in data.files:
            raise DataError(f"{path}: has no array 'x' (found {data.files}); "
                            "image npz files need x uint8 (N,H,W,3) and optionally y")
        x = check_images(data["x"], path)
        y = None
        if "y" in data.files:
            y = labels(data["y"], path, len(x))
        elif require_labels:
            raise DataError(f"{path}: has no labels 'y' (found {data.files}); this step needs them")
    return x, y


def save_npz_dataset(path, x: np.ndarray, y: np.ndarray | None = None) -> None:
    from common.io import write_npz
    arrays = {"x": check_images(x, path)}
    if y is not None:
        arrays["y"] = np.asarray(y, dtype=np.int64)
    write_npz(path, **arrays)


def _resize_center_crop(img, size: int) -> np.ndarray:
    """torchvision's Resize(256) + CenterCrop(224), scaled to `size`, on a PIL image: uint8 (size,size,3).

    torchvision itself, not a re-derivation: its rounding of the long side and of the crop offset is what the
    paper's ImageNet loaders did, and one pixel of shift changes every image.
    """
    from torchvision.transforms import functional as TF
    img = TF.resize(img, round(size * 256 / 224), interpolation=TF.InterpolationMode.BILINEAR)
    return np.asarray(TF.center_crop(img, size), dtype=np.uint8)


def resize_center_crop(x: np.ndarray, size: int, chunk: int = 256) -> np.ndarray:
    """uint8 (N,H,W,3) -> uint8 (N,size,size,3): shorter side to `size` (bilinear, antialiased), centre crop.

    Images already of that size are returned unchanged, so one shadow set serves encoders of any input size.
    """
    import torch
    import torch.nn.functional as F
    n, h, w = x.shape[:3]
    if (h, w) == (size, size):
        return x
    scale = size / min(h, w)
    new_h, new_w = max(size, round(h * scale)), max(size, round(w * scale))
    top, left = int(round((new_h - size) / 2)), int(round((new_w - size) / 2))  # torchvision's CenterCrop
    out = np.empty((n, size, size, 3), dtype=np.uint8)
    for start in range(0, n, chunk):  # bounded memory for large sets
        batch = torch.from_numpy(x[start:start + chunk]).permute(0, 3, 1, 2).float()
        batch = F.interpolate(batch, size=(new_h, new_w), mode="bilinear", antialias=True, align_corners=False)
        batch = batch[:, :, top:top + size, left:left + size].round().clamp(0, 255).to(torch.uint8)
        out[start:start + chunk] = batch.permute(0, 2, 3, 1).numpy()
    return out


def list_images(root) -> list[Path]:
    root = Path(root)
    if (root / "val").is_dir():  # a torchvision ImageNet root: the paper samples the validation split
        root = root / "val"
    # symlinked folders are not entered and links out of the folder not followed (common/files.py)
    return sorted(p for p in walk_files(root) if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def load_image_folder(root, size: int = 224, fraction: float | None = None, count: int | None = None,
                      seed: int = 0, progress: bool = True, indices=None):
    """Read an ImageNet root or image folder (class sub-folders or flat) into uint8 (N,size,size,3).

    Only the sampled files are decoded, so a 20% shadow set of ImageNet val reads 10,000 images, not 50,000.
    `indices` (positions in the sorted file list) replaces the seeded sample when given.
    """
    from tqdm import tqdm
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: no such folder; pass an ImageNet root or a folder of images")
    files = list_images(root)
    if not files:
        raise DataError(f"{root}: no images ({', '.join(sorted(IMAGE_SUFFIXES))}) found")
    if indices is None:
        indices = sample_indices(len(files), fraction, count, seed)
    elif len(indices) and not 0 <= min(indices) <= max(indices) < len(files):
        raise DataError(f"{root}: has {len(files)} images; asked for positions up to {max(indices)}")
    files = [files[i] for i in indices]
    out = np.empty((len(files), size, size, 3), dtype=np.uint8)
    for i, f in enumerate(tqdm(files, desc=f"reading {root.name}", disable=not progress, leave=False)):
        out[i] = _read_image(f, size)
    return out


def _read_image(path, size: int) -> np.ndarray:
    """One image file -> uint8 (size,size,3); huge images (PIL's decompression-bomb limits) are refused."""
    from PIL import Image, UnidentifiedImageError
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                return _resize_center_crop(img.convert("RGB"), size)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise DataError(f"{path}: image too large to decode safely ({err}); shrink it or remove it") from err
    except (UnidentifiedImageError, OSError, ValueError) as err:
        raise DataError(f"{path}: not a readable image ({err})") from err
def python_sample(n: int, k: int, seed: int, drawn_before=()) -> list[int]:
    """`random.sample(range(n), k)` right after `random.seed(seed)`, in draw order: how the paper's code drew
    its subsets (ImageNet shadow set, z-score samples, poisoned images). `drawn_before`: sizes of the samples
    the same generator drew first (the paper sometimes drew one before the one it kept)."""
    rng = random.Random(seed)
    for m in drawn_before:
        rng.sample(range(n), m)
    return rng.sample(range(n), k)


def sample_indices(n: int, fraction: float | None = None, count: int | None = None, seed: int = 0) -> np.ndarray:
    """Sorted seeded sample of range(n), by fraction (int(n * fraction), as the paper) or count; all when neither.

    The draw is the paper's (python_sample), kept in file order.
    """
    if count is None and fraction is None:
        return np.arange(n)
    k = count if count is not None else int(n * fraction)
    if not 0 < k <= n:
        raise DataError(f"asked for {k} of {n} images; choose a count in 1..{n} or a fraction in (0,1]")
    return np.sort(np.asarray(python_sample(n, k, seed), dtype=np.int64))


def load_images(path, size: int | None = None, **sample):
    """Images from an npz file or an image folder, as uint8 (N,H,W,3); `sample` as in load_image_folder."""
    path = Path(path)
    if path.suffix == ".npz":
        x, _ = load_npz(path)
        if sample.get("indices") is not None:
            if len(sample["indices"]) and max(sample["indices"]) >= len(x):
                raise DataError(f"{path}: has {len(x)} images; asked for positions up to {max(sample['indices'])}")
            x = x[np.asarray(sample["indices"], dtype=np.int64)]
        elif sample.get("fraction") is not None or sample.get("count") is not None:
            x = x[sample_indices(len(x), sample.get("fraction"), sample.get("count"), sample.get("seed", 0))]
    else:
        x = load_image_folder(path, size=size or 224, **sample)
    if size is not None and x.shape[1:3] != (size, size):
        raise DataError(f"{path}: images are {x.shape[1]}x{x.shape[2]} but the encoder expects {size}x{size}; "
                        "use a dataset of the encoder's input size (e.g. train_224.npz for CLIP)")
    return x
