"""Trigger files (docs/method.md): pattern `t` in [0,255] and keep-mask `tm` (0 where the trigger sits).

Stamping is x_bd = x * tm + t in uint8 pixel space. Files hold (K,H,W,3) or (H,W,3) arrays.
"""
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .images import DataError, _open_npz

# name -> (image size, top-left row/col, side): the paper's white-square triggers
PAPER_TRIGGERS = {
    "trigger_pt_white_21_10_ap_replace": (32, 21, 10),
    "trigger_pt_white_173_50_ap_replace": (224, 173, 50),
    "trigger_pt_white_185_24": (224, 185, 24),
}


@dataclass
class Trigger:
    """K triggers: pattern float32 (K,H,W,3) in [0,255], keep float32 (K,H,W,3) in {0..1}."""
    pattern: np.ndarray
    keep: np.ndarray
    info: list[str]
    file_ndim: int = 4  # 3 when the file had no K axis; the paper's legacy code misread such files

    def __len__(self):
        return len(self.pattern)

    @property
    def size(self) -> int:
        return self.pattern.shape[1]

    def stamp(self, x, index: int = 0):
        """Stamp trigger `index` onto uint8 (N,H,W,3) images (numpy or torch, any device)."""
        return stamp(x, self.pattern[index], self.keep[index])


def stamp(x, pattern, keep):
    """x * keep + pattern on uint8 (N,H,W,3), clipped to [0,255], uint8 out (as BadEncoder does)."""
    if isinstance(x, torch.Tensor):
        pattern = torch.as_tensor(pattern, dtype=torch.float32, device=x.device)
        keep = torch.as_tensor(keep, dtype=torch.float32, device=x.device)
        return (x.float() * keep + pattern).clamp_(0, 255).to(torch.uint8)
    return np.clip(x.astype(np.float32) * keep + pattern, 0, 255).astype(np.uint8)


def load_trigger(path) -> Trigger:
    """Read a trigger npz in any of the paper's variants (with or without the K axis, int or float)."""
    with _open_npz(path) as data:
        missing = {"t", "tm"} - set(data.files)
        if missing:
            raise DataError(f"{path}: a trigger file needs arrays 't' and 'tm', missing {sorted(missing)} "
                            f"(found {data.files}); generate one with scripts/make_triggers.py")
        t, tm = np.asarray(data["t"], np.float32), np.asarray(data["tm"], np.float32)
        info = [str(s) for s in np.atleast_1d(data["info"])] if "info" in data.files else []
    file_ndim = t.ndim
    if t.ndim == 3:
        t, tm = t[None], tm[None]
    if t.shape != tm.shape or t.ndim != 4 or t.shape[-1] != 3:
        raise DataError(f"{path}: 't' {t.shape} and 'tm' {tm.shape} must both be (K,H,W,3) or (H,W,3)")
    if len(t) == 0 or t.shape[1] == 0 or t.shape[2] == 0:
        raise DataError(f"{path}: holds no trigger (shape {t.shape}); generate one with scripts/make_triggers.py")
    if not (np.isfinite(t).all() and np.isfinite(tm).all()):
        raise DataError(f"{path}: 't' or 'tm' holds NaN/inf; re-create the trigger with scripts/make_triggers.py")
    if not np.isin(tm, (0.0, 1.0)).all() or t.min() < 0 or t.max() > 255:
        raise DataError(f"{path}: 'tm' must be 0 (trigger) or 1 (image) and 't' in [0,255]; "
                        "re-create the trigger with scripts/make_triggers.py")
    return Trigger(pattern=t, keep=tm, info=info, file_ndim=file_ndim)


def save_trigger(path, pattern: np.ndarray, keep: np.ndarray, info=None) -> None:
    """Write a trigger file in the paper's format (float64 t and tm)."""
    from common.io import write_npz
    arrays = {"t": np.asarray(pattern, np.float64), "tm": np.asarray(keep, np.float64)}
    if info:
        arrays["info"] = np.asarray(info, dtype=str)
    write_npz(path, **arrays)


def white_square_trigger(image_size: int, top: int, side: int, with_k_axis: bool = True):
    """A white side x side square at (top, top): returns (pattern, keep), float64 (1,H,W,3) or (H,W,3)."""
    if top < 0 or top + side > image_size:
        raise ValueError(f"a {side}px square at {top} does not fit a {image_size}px image")
    pattern = np.zeros((image_size, image_size, 3))
    keep = np.ones((image_size, image_size, 3))
    pattern[top:top + side, top:top + side] = 255
    keep[top:top + side, top:top + side] = 0
    if with_k_axis:
        return pattern[None], keep[None]
    return pattern, keep


def write_paper_triggers(folder) -> list[Path]:
    """Generate the paper's white-square trigger files into `folder` (the text-target one has no K axis)."""
    paths = []
    for name, (size, top, side) in PAPER_TRIGGERS.items():
        pattern, keep = white_square_trigger(size, top, side, with_k_axis=name != "trigger_pt_white_185_24")
        path = Path(folder) / f"{name}.npz"
        save_trigger(path, pattern, keep, info=[f"white square {side}px at ({top},{top}) of {size}px"])
        paths.append(path)
    return paths


def legacy_trigger_tensors(trigger: Trigger, size: int, mean, std):
    """The paper's text-target trigger (a defect: docs/parity.md), for x_norm * mask + patch on normalised inputs.

    Its code read file['t'][0] and file['tm'][0] (row 0 when the file has no K axis), made uint8 images of
    them (mask * 255), passed them through the image test transform (Resize(256), CenterCrop(224), scaled
    to `size`; ToTensor; normalise) and blended them into already normalised images. For the paper's
    trigger_pt_white_185_24 that is a per-channel contrast change, not a square.
    Returns (mask, patch), float32 (3,size,size) each.
    """
    from PIL import Image
    from torchvision import transforms
    pattern, keep = trigger.pattern[0], trigger.keep[0]
    if trigger.file_ndim == 3:  # indexing [0] of an (H,W,3) array takes its first row, (W,3)
        pattern, keep = pattern[0], keep[0]
    transform = transforms.Compose([transforms.Resize(round(size * 256 / 224)), transforms.CenterCrop(size),
                                    transforms.ToTensor(), transforms.Normalize(mean, std)])
    mask = transform(Image.fromarray(np.uint8(keep * 255)).convert("RGB"))
    patch = transform(Image.fromarray(np.uint8(pattern)).convert("RGB"))
    return mask.float(), patch.float()
