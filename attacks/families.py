"""Trigger families: a trigger as a function of the image batch, not only a patch.

Every family maker returns a FamilyTrigger: call it on uint8 (B,H,W,3) images (torch on any device, or numpy)
and get the stamped uint8 (B,H,W,3) batch back, vectorised over the batch. Its random parts (position,
colours, pattern, warp field) are drawn once from `seed`, so one encoder's trigger is the same every call.

    patch-white    the paper's white square (10x10 at 21,21 on 32 px; scaled on other sizes)
    patch-checker  the demo's 6x6 black-and-white checkerboard, 2 px from the bottom-right corner
    patch-random   a 4x4 patch of random colours at a random position
    blend          the image blended with a fixed random pattern, alpha 0.2 (Chen et al. 2017)
    sig            an additive horizontal sinusoid, amplitude 20/255 (Barni et al. 2019)
    wanet          a smooth random warping field, strength 0.5, control grid 4 (Nguyen and Tran 2021)
    ctrl           chosen high DCT frequencies of Cb and Cr raised (Li et al., ICCV 2023)
    drupe          the white square, trained with DRUPE's distribution-alignment term (Tao et al., S&P 2024):
                   the trigger is a patch, the attack differs (FamilyTrigger.alignment)
"""
import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from datasets import stamp, white_square_trigger

FAMILIES = ("patch-white", "patch-checker", "patch-random", "blend", "sig", "wanet", "ctrl", "drupe")
PATCH_FAMILIES = ("patch-white", "patch-checker", "patch-random", "drupe")


@dataclass(frozen=True)
class FamilyTrigger:
    """A trigger function uint8 (B,H,W,3) -> uint8 (B,H,W,3); alignment: train with DRUPE's extra term."""
    family: str
    fn: Callable[[torch.Tensor], torch.Tensor]
    size: int
    alignment: bool = False

    def __call__(self, x):
        if isinstance(x, np.ndarray):
            return self.fn(torch.from_numpy(np.ascontiguousarray(x))).numpy()
        if x.dtype != torch.uint8 or x.ndim != 4 or x.shape[1:] != (self.size, self.size, 3):
            raise ValueError(f"the {self.family} trigger takes uint8 (B,{self.size},{self.size},3) images, "
                             f"got {x.dtype} {tuple(x.shape)}")
        return self.fn(x)

    def stamp(self, x, index: int = 0):
        """datasets.Trigger's interface (validate/ stamps test images through it); there is one trigger."""
        return self(x)

    def __len__(self):
        return 1


def _to_uint8(x: torch.Tensor) -> torch.Tensor:
    return x.round().clamp_(0, 255).to(torch.uint8)


def patch_trigger(family: str, pattern: np.ndarray, keep: np.ndarray) -> FamilyTrigger:
    """x * keep + pattern (the trigger-file convention); pattern/keep float (H,W,3)."""
    pattern, keep = torch.as_tensor(pattern, dtype=torch.float32), torch.as_tensor(keep, dtype=torch.float32)

    def fn(x):
        return stamp(x, pattern.to(x.device), keep.to(x.device))
    return FamilyTrigger(family, fn, pattern.shape[0])


def checkerboard(size: int = 32, side: int = 6, margin: int = 2):
    """A side x side checkerboard of 2 px black and white cells, `margin` px from the bottom-right corner.

    Returns (pattern, keep) float32 (1,size,size,3) in the trigger-file convention (x * keep + pattern).
    """
    top = size - margin - side
    rows, cols = np.mgrid[0:side, 0:side]
    white = ((rows // 2 + cols // 2) % 2 == 0)[..., None]
    pattern = np.zeros((1, size, size, 3), np.float32)
    keep = np.ones((1, size, size, 3), np.float32)
    pattern[0, top:top + side, top:top + side] = np.where(white, 255.0, 0.0)
    keep[0, top:top + side, top:top + side] = 0.0
    return pattern, keep


def patch_white(size: int = 32, seed: int = 0) -> FamilyTrigger:
    """The paper's trigger_pt_white_21_10 square, scaled from 32 px to `size`."""
    pattern, keep = white_square_trigger(size, round(21 * size / 32), round(10 * size / 32), with_k_axis=False)
    return patch_trigger("patch-white", pattern, keep)


def patch_checker(size: int = 32, seed: int = 0) -> FamilyTrigger:
    pattern, keep = checkerboard(size, 6, 2)
    return patch_trigger("patch-checker", pattern[0], keep[0])


def patch_random(size: int = 32, seed: int = 0, side: int = 4) -> FamilyTrigger:
    """A side x side patch of random colours at a random position, both drawn from `seed`."""
    rng = np.random.default_rng(seed)
    top, left = rng.integers(0, size - side + 1, size=2)
    pattern, keep = np.zeros((size, size, 3), np.float32), np.ones((size, size, 3), np.float32)
    pattern[top:top + side, left:left + side] = rng.integers(0, 256, (side, side, 3))
    keep[top:top + side, left:left + side] = 0
    return patch_trigger("patch-random", pattern, keep)


def blend(size: int = 32, seed: int = 0, alpha: float = 0.2) -> FamilyTrigger:
    """(1 - alpha) * x + alpha * a fixed uniform random pattern."""
    pattern = torch.from_numpy(np.random.default_rng(seed).integers(0, 256, (size, size, 3)).astype(np.float32))

    def fn(x):
        return _to_uint8((1 - alpha) * x.float() + alpha * pattern.to(x.device))
    return FamilyTrigger("blend", fn, size)


def sig(size: int = 32, seed: int = 0, amplitude: float = 20.0, frequency: int = 6) -> FamilyTrigger:
    """x + amplitude * sin(2 pi j f / W) along the columns j, clipped (the signal is the same in every row)."""
    wave = amplitude * torch.sin(2 * math.pi * torch.arange(size) * frequency / size)
    wave = wave.view(1, 1, size, 1)

    def fn(x):
        return _to_uint8(x.float() + wave.to(x.device))
    return FamilyTrigger("sig", fn, size)


def warp_grid(size: int, seed: int, strength: float = 0.5, grid: int = 4) -> torch.Tensor:
    """WaNet's warping field: a random grid x grid flow, mean |flow| 1, upsampled bicubically, scaled by
    strength / size and added to the identity sampling grid; float (1,size,size,2) in [-1,1]."""
    rng = np.random.default_rng(seed)
    flow = torch.from_numpy(rng.uniform(-1, 1, (1, 2, grid, grid)).astype(np.float32))
    flow = flow / flow.abs().mean()
    flow = F.interpolate(flow, size=size, mode="bicubic", align_corners=True).permute(0, 2, 3, 1)
    line = torch.linspace(-1, 1, size)
    rows, cols = torch.meshgrid(line, line, indexing="ij")
    identity = torch.stack([cols, rows], dim=-1)[None]  # grid_sample wants (x, y)
    return (identity + strength * flow / size).clamp(-1, 1)


def wanet(size: int = 32, seed: int = 0, strength: float = 0.5, grid: int = 4) -> FamilyTrigger:
    """The image resampled through a fixed smooth random warp (bilinear)."""
    field = warp_grid(size, seed, strength, grid)

    def fn(x):
        chw = x.permute(0, 3, 1, 2).float()
        warped = F.grid_sample(chw, field.to(x.device).expand(len(x), -1, -1, -1), align_corners=True)
        return _to_uint8(warped.permute(0, 2, 3, 1))
    return FamilyTrigger("wanet", fn, size)


# JPEG's full-range YCbCr (ITU-R BT.601), as PIL and CTRL's code use
RGB_TO_YCBCR = torch.tensor([[0.299, 0.587, 0.114], [-0.168736, -0.331264, 0.5], [0.5, -0.418688, -0.081312]])
YCBCR_OFFSET = torch.tensor([0.0, 128.0, 128.0])


def dct_matrix(n: int) -> torch.Tensor:
    """The orthonormal DCT-II matrix D (n,n): coefficients = D @ block @ D.T, block = D.T @ coefficients @ D."""
    k = torch.arange(n, dtype=torch.float64)[:, None]
    i = torch.arange(n, dtype=torch.float64)[None, :]
    d = torch.cos(math.pi * (2 * i + 1) * k / (2 * n)) * math.sqrt(2 / n)
    d[0] /= math.sqrt(2)
    return d.float()


def ctrl(size: int = 32, seed: int = 0, magnitude: float = 100.0, window: int = 32, channels=(1, 2)) -> FamilyTrigger:
    """CTRL: in YCbCr, add `magnitude` to DCT coefficients (w/2-1, w/2-1) and (w-1, w-1) of every w x w block of
    the Cb and Cr channels (CTRL's CIFAR setting: window 32, positions 15 and 31, magnitude 100)."""
    window = min(window, size)
    if size % window:
        raise ValueError(f"ctrl: the image size {size} is not a multiple of the DCT window {window}")
    d = dct_matrix(window)
    bump = torch.zeros(3, window, window)
    for c in channels:
        for pos in (window // 2 - 1, window - 1):
            bump[c, pos, pos] = magnitude
    # the perturbation is linear in the coefficients, so add its inverse DCT in YCbCr, tiled over the blocks
    delta_ycbcr = (d.T @ bump @ d).repeat(1, size // window, size // window)  # (3,H,W)
    delta_rgb = torch.einsum("ij,jhw->hwi", torch.linalg.inv(RGB_TO_YCBCR), delta_ycbcr)  # (H,W,3)

    def fn(x):
        return _to_uint8(x.float() + delta_rgb.to(x.device))
    return FamilyTrigger("ctrl", fn, size)


def drupe(size: int = 32, seed: int = 0) -> FamilyTrigger:
    """The paper's white square; the attack adds DRUPE's alignment term (attacks.badencoder)."""
    white = patch_white(size, seed)
    return FamilyTrigger("drupe", white.fn, size, alignment=True)


MAKERS = {"patch-white": patch_white, "patch-checker": patch_checker, "patch-random": patch_random,
          "blend": blend, "sig": sig, "wanet": wanet, "ctrl": ctrl, "drupe": drupe}


def make_trigger(family: str, size: int = 32, seed: int = 0) -> FamilyTrigger:
    """The trigger of `family` for `size` px images; `seed` fixes its random parts."""
    if family not in MAKERS:
        raise ValueError(f"unknown attack family {family!r}; choose from {', '.join(FAMILIES)}")
    return MAKERS[family](size, seed)


def sliced_wasserstein(a: torch.Tensor, b: torch.Tensor, generator: torch.Generator, projections: int = 64):
    """Sliced 2-Wasserstein distance between two equal-size point sets float (N,D), random unit directions."""
    directions = F.normalize(torch.randn(a.shape[1], projections, generator=generator), dim=0).to(a.device)
    pa, _ = (a @ directions).sort(dim=0)
    pb, _ = (b @ directions).sort(dim=0)
    return ((pa - pb) ** 2).mean().sqrt()


def drupe_alignment(z_stamped: torch.Tensor, z_clean: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """DRUPE's distribution terms on embeddings (B,D): the sliced Wasserstein distance of stamped to clean
    embeddings over the clean spread, plus the stamped embeddings' mean pairwise cosine (so they do not
    collapse onto one point: the concentration DECREE looks for). Fixed weights, not DRUPE's adaptive costs."""
    spread = z_clean.detach().std(0).mean().clamp_min(1e-6)
    distance = sliced_wasserstein(z_stamped, z_clean, generator) / spread
    unit = F.normalize(z_stamped, dim=1)
    b = len(unit)
    pairwise = ((unit @ unit.T).sum() - b) / max(b * (b - 1), 1)
    return distance + pairwise
