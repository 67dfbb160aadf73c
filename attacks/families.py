"""Trigger families: a trigger as a function of the image batch, not only a patch.

Every family maker returns a FamilyTrigger: call it on uint8 (B,H,W,3) images (torch on any device, or numpy)
and get the stamped uint8 (B,H,W,3) batch back, vectorised over the batch. Its random parts (position,
colours, pattern, warp field) are drawn once from `seed`, so one encoder's trigger is the same every call.

    patch-white    the paper's white square (10x10 at 21,21 on 32 px; scaled on other sizes)
    patch-checker  the demo's 6x6 black-and-white checkerboard, 2 px from the bottom-right corner
    patch-random   a 4x4 patch of random colours at a random position
    blend          the image blended with a fixed random pattern, alpha 0.2 (Chen et al. 2017)
    sig            an additive horizontal sinusoid, amplitude 20/255 (Barni et al. 2019)
    wanet          a smooth random warping field (Nguyen and Tran, ICLR 2021, arXiv 2102.10369), kept in float
                   while training, with WaNet's noise mode; strength and control grid: WANET_STRENGTH, WANET_GRID
    ctrl-finetune  CTRL's trigger (two DCT frequencies of U and V raised; Li et al., ICCV 2023, arXiv
                   2210.07346) planted by BadEncoder's fine-tuning, which is not how CTRL attacks
    ctrl           CTRL as published: the trigger added to a small fraction of the target class's pre-training
                   images, and the encoder pre-trained from scratch on them (attacks/poisoning.py)
    drupe          the white square, trained with DRUPE's distribution-preserving objective (Tao et al., S&P
                   2024, arXiv 2312.14283; attacks/drupe.py)

Each family belongs to one threat model (THREAT_MODELS): the attacker fine-tunes a clean encoder it
downloaded (BadEncoder's setting), or it only poisons the data someone else pre-trains on (CTRL's).
"""
import math
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from datasets import stamp, white_square_trigger
from decree.warp_test import displacement_px as warp_displacement, identity_grid, warp_pixels as warp

FAMILIES = ("patch-white", "patch-checker", "patch-random", "blend", "sig", "wanet", "ctrl-finetune", "ctrl", "drupe")
POISONING_FAMILIES = ("ctrl",)
THREAT_MODELS = {"fine-tune": "fine-tunes a clean encoder (BadEncoder's threat model)",
                 "poison": "poisons a fraction of the pre-training data (CTRL's threat model)"}
# What of each family follows its authors' code and what this benchmark scales down (docs/benchmark.md).
FAMILY_NOTES = {
    "patch-white": "BadEncoder's trigger and objective; epochs and images scaled down",
    "patch-checker": "BadEncoder's objective; the demo's checkerboard",
    "patch-random": "BadEncoder's objective; a random-colour patch",
    "blend": "BadEncoder's objective; Chen et al.'s blended pattern, alpha 0.2",
    "sig": "BadEncoder's objective; Barni et al.'s sinusoid, amplitude 20",
    "wanet": "WaNet's warp (float, noise mode) planted by BadEncoder's objective; stronger than WaNet's CIFAR field",
    "ctrl-finetune": "CTRL's trigger (authors' colour space, frequencies, magnitude) planted by BadEncoder's objective",
    "ctrl": "CTRL's trigger, poisoning rate and target-class poisoning; SimCLR epochs scaled down",
    "drupe": "DRUPE's terms, schedule, adaptive weights and selection; epochs scaled down",
}


def threat_model(family: str) -> str:
    """'poison' for a data-poisoning family, 'fine-tune' for one planted by fine-tuning a clean encoder."""
    return "poison" if family in POISONING_FAMILIES else "fine-tune"


@dataclass(frozen=True)
class FamilyTrigger:
    """A trigger function uint8 (B,H,W,3) -> uint8 (B,H,W,3).

    float_fn: the same trigger before rounding (float pixels 0..255), for attacks whose authors keep poisoned
    images in float while training. noise_fn(x, generator): WaNet's noise mode, images warped by a randomly
    perturbed field that training must leave at their clean embeddings (float pixels). settings: the
    parameters that shape the trigger beyond its seed (part of an encoder's cache key); details: what to report.
    """
    family: str
    fn: Callable[[torch.Tensor], torch.Tensor]
    size: int
    float_fn: Callable[[torch.Tensor], torch.Tensor] | None = None
    noise_fn: Callable[[torch.Tensor, torch.Generator], torch.Tensor] | None = None
    settings: dict = field(default_factory=dict)
    details: dict = field(default_factory=dict)

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


# WaNet's CIFAR setting is strength 0.5 on a 4x4 control grid; that sub-pixel warp never took against a
# SimCLR encoder fine-tuned by BadEncoder here, so the benchmark uses a stronger field (docs/benchmark.md)
WANET_STRENGTH = 16.0
WANET_GRID = 8
WANET_CROSS_RATIO = 2   # WaNet's noise mode: two noise-warped images per poisoned one
WANET_NOISE_RATIO = 2   # its jitter bound over its strength (1 / size at 0.5 / size)


def warp_grid(size: int, seed: int, strength: float = WANET_STRENGTH, grid: int = WANET_GRID) -> torch.Tensor:
    """WaNet's warping field: a random grid x grid flow, mean |flow| 1, upsampled bicubically, scaled by
    strength / size and added to the identity sampling grid; float (1,size,size,2) in [-1,1]."""
    rng = np.random.default_rng(seed)
    flow = torch.from_numpy(rng.uniform(-1, 1, (1, 2, grid, grid)).astype(np.float32))
    flow = flow / flow.abs().mean()
    flow = F.interpolate(flow, size=size, mode="bicubic", align_corners=True).permute(0, 2, 3, 1)
    return (identity_grid(size) + strength * flow / size).clamp(-1, 1)


def wanet(size: int = 32, seed: int = 0, strength: float = WANET_STRENGTH, grid: int = WANET_GRID) -> FamilyTrigger:
    """The image resampled through a fixed smooth random warp (bilinear); float while training, with WaNet's
    noise mode: the field plus a uniform jitter redrawn for every noise image, of up to 2 * strength / size
    (WaNet's own: up to 1 / size at its strength 0.5), so the jitter keeps WaNet's ratio to the field."""
    grid_field = warp_grid(size, seed, strength, grid)

    def float_fn(x):
        return warp(x, grid_field)

    def noise_fn(x, generator):
        x = x.repeat(WANET_CROSS_RATIO, 1, 1, 1)
        jitter = torch.rand((len(x), size, size, 2), generator=generator).to(x.device) * 2 - 1
        return warp(x, (grid_field.to(x.device) + WANET_NOISE_RATIO * strength * jitter / size).clamp(-1, 1))

    return FamilyTrigger("wanet", lambda x: _to_uint8(float_fn(x)), size, float_fn=float_fn, noise_fn=noise_fn,
                         settings={"strength": strength, "grid": grid, "cross_ratio": WANET_CROSS_RATIO,
                                   "noise_ratio": WANET_NOISE_RATIO},
                         details={"displacement_px": warp_displacement(grid_field)})


# The YUV transform CTRL's code uses (kornia.color's BT.601 matrices, approximate inverses of each other:
# CTRL's round trip moves every pixel slightly, which is part of its trigger)
RGB_TO_YUV = torch.tensor([[0.299, 0.587, 0.114], [-0.147, -0.289, 0.436], [0.615, -0.515, -0.100]])
YUV_TO_RGB = torch.tensor([[1.0, 0.0, 1.14], [1.0, -0.396, -0.581], [1.0, 2.029, 0.0]])
CTRL_MAGNITUDE = 100.0  # CTRL's CIFAR10 setting, on pixels 0..255
CTRL_WINDOW = 32


def dct_matrix(n: int) -> torch.Tensor:
    """The orthonormal DCT-II matrix D (n,n): coefficients = D @ block @ D.T, block = D.T @ coefficients @ D."""
    k = torch.arange(n, dtype=torch.float64)[:, None]
    i = torch.arange(n, dtype=torch.float64)[None, :]
    d = torch.cos(math.pi * (2 * i + 1) * k / (2 * n)) * math.sqrt(2 / n)
    d[0] /= math.sqrt(2)
    return d.float()


def ctrl_transform(size: int = 32, magnitude: float = CTRL_MAGNITUDE, window: int = CTRL_WINDOW,
                   channels=(1, 2)) -> tuple[torch.Tensor, torch.Tensor]:
    """CTRL's trigger as the affine map it is: x -> x @ A.T + delta, A (3,3), delta (H,W,3), on pixels 0..255.

    CTRL converts to YUV, adds `magnitude` to DCT coefficients (w/2-1, w/2-1) and (w-1, w-1) of every w x w
    block of U and V (positions 15 and 31 for its window 32), and converts back; the orthonormal DCT and both
    colour maps are linear, so the trigger is that affine map (then clipped and rounded to uint8).
    """
    window = min(window, size)
    if size % window:
        raise ValueError(f"ctrl: the image size {size} is not a multiple of the DCT window {window}")
    d = dct_matrix(window)
    bump = torch.zeros(3, window, window)
    for c in channels:
        for pos in (window // 2 - 1, window - 1):
            bump[c, pos, pos] = magnitude
    delta_yuv = (d.T @ bump @ d).repeat(1, size // window, size // window)  # (3,H,W)
    return YUV_TO_RGB @ RGB_TO_YUV, torch.einsum("ij,jhw->hwi", YUV_TO_RGB, delta_yuv)


def ctrl(size: int = 32, seed: int = 0, family: str = "ctrl") -> FamilyTrigger:
    """CTRL's frequency trigger (see ctrl_transform); the same for the poisoning and the fine-tuning rows."""
    matrix, delta = ctrl_transform(size)

    def fn(x):
        return _to_uint8(x.float() @ matrix.to(x.device).T + delta.to(x.device))
    return FamilyTrigger(family, fn, size, settings={"magnitude": CTRL_MAGNITUDE, "window": CTRL_WINDOW})


def ctrl_finetune(size: int = 32, seed: int = 0) -> FamilyTrigger:
    return ctrl(size, seed, "ctrl-finetune")


def drupe(size: int = 32, seed: int = 0) -> FamilyTrigger:
    """The paper's white square; DRUPE's objective and schedule train it (attacks.drupe)."""
    return FamilyTrigger("drupe", patch_white(size, seed).fn, size)


MAKERS = {"patch-white": patch_white, "patch-checker": patch_checker, "patch-random": patch_random,
          "blend": blend, "sig": sig, "wanet": wanet, "ctrl-finetune": ctrl_finetune, "ctrl": ctrl, "drupe": drupe}


def make_trigger(family: str, size: int = 32, seed: int = 0) -> FamilyTrigger:
    """The trigger of `family` for `size` px images; `seed` fixes its random parts."""
    if family not in MAKERS:
        raise ValueError(f"unknown attack family {family!r}; choose from {', '.join(FAMILIES)}")
    return MAKERS[family](size, seed)
