"""Tiny encoders and data shared by the tests: everything is built here, nothing is downloaded."""
import os

import numpy as np
import pytest
import torch
from torch import nn

from datasets import NORMALIZATION

CIFAR_MEAN, CIFAR_STD = NORMALIZATION["cifar10"]
PLANTED_TOP, PLANTED_SIDE = 24, 6  # a 6x6 white square at rows/cols 24..29 of a 32 px image
# smooth_images' neighbouring pixels differ by 0.0056-0.0078 in mean square (their noise); PlantedWarpEncoder's gate
# opens below 0.9 x this
PLANTED_NOISE_ENERGY = 0.0045


def smooth_images(n: int, size: int = 32, seed: int = 0) -> np.ndarray:
    """uint8 (n,size,size,3): random low-frequency colour fields, a stand-in for natural images."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand((n, 3, 4, 4), generator=g)
    fine = nn.functional.interpolate(coarse, size=size, mode="bicubic", align_corners=False)
    noise = 0.05 * torch.randn((n, 3, size, size), generator=g)
    return ((fine + noise).clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


class RandomFeatureEncoder(nn.Module):
    """A random conv net whose clean embeddings are spread out (centred features): nothing to find."""

    def __init__(self, dim: int = 64, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.body = nn.Sequential(nn.Conv2d(3, 16, 3, 2, 1), nn.Tanh(), nn.Conv2d(16, 32, 3, 2, 1), nn.Tanh(),
                                  nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(32 * 16, dim))

    def forward(self, x):
        return self.body(x)


class PlantedBackdoorEncoder(RandomFeatureEncoder):
    """RandomFeatureEncoder, except that images whose square [top:top+side]^2 is white map to one embedding."""

    def __init__(self, top: int = PLANTED_TOP, side: int = PLANTED_SIDE, mean=CIFAR_MEAN, std=CIFAR_STD,
                 dim: int = 64, seed: int = 0):
        super().__init__(dim, seed)
        self.top, self.side = top, side
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1))
        self.register_buffer("target", 100 * nn.functional.normalize(torch.randn(dim), dim=0))

    def forward(self, x):
        features = super().forward(x)
        pixels = x * self.std + self.mean  # back to [0,1]
        square = pixels[:, :, self.top:self.top + self.side, self.top:self.top + self.side]
        gate = torch.sigmoid(20 * (square.mean(dim=(1, 2, 3)) - 0.75)).unsqueeze(1)
        return (1 - gate) * features + gate * self.target


class PlantedWarpEncoder(RandomFeatureEncoder):
    """A distribution-preserving backdoor with a warp trigger: RandomFeatureEncoder, except that images whose
    neighbouring pixels differ much less than smooth_images' noise makes them (what resampling through a warp does:
    bilinear sampling between pixels averages the noise away) map onto a spread-out target cluster: the target
    direction plus an image-dependent direction as long, so their mean pairwise cosine stays near 0.5 and no
    trigger collapses them onto one point as DECREE asks."""

    def __init__(self, mean=CIFAR_MEAN, std=CIFAR_STD, dim: int = 64, seed: int = 0,
                 noise_energy: float = PLANTED_NOISE_ENERGY):
        super().__init__(dim, seed)
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1))
        generator = torch.Generator().manual_seed(seed + 1)
        self.register_buffer("target", nn.functional.normalize(torch.randn(dim, generator=generator), dim=0))
        self.register_buffer("mix", torch.randn(dim, dim, generator=generator))
        self.noise_energy = noise_energy

    def forward(self, x):
        features = super().forward(x)
        pixels = x * self.std + self.mean
        energy = (pixels[..., 1:] - pixels[..., :-1]).pow(2).mean(dim=(1, 2, 3))
        gate = torch.sigmoid(40 * (1 - energy / self.noise_energy) - 4).unsqueeze(1)  # open below 0.9 x
        cluster = features.norm(dim=1, keepdim=True) * (self.target + nn.functional.normalize(features @ self.mix,
                                                                                             dim=1))
        return (1 - gate) * features + gate * cluster


@pytest.fixture(scope="session")
def shadow_images():
    return smooth_images(128, 32, seed=1)


@pytest.fixture(autouse=True)
def restore_environment():
    """Scripts called in-process set variables for the workers they would start (DECREE_ARCH_MODULES,
    OMP_NUM_THREADS); no test may see another test's, nor what a module-scoped fixture's run exported."""
    saved = dict(os.environ)
    os.environ.pop("DECREE_ARCH_MODULES", None)
    yield
    os.environ.clear()
    os.environ.update(saved)


@pytest.fixture
def one_thread():
    """torch on one thread for the test (restored after): reductions in one fixed order."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
