"""SimCLR encoders in BadEncoder's layout: backbone keys `f.0.weight`..., full model `f.f.*` + head `g.*`."""
import re

import torch
from torch import nn

from .resnet import LAYOUTS, resnet

# resnet18_w16 = ResNet18 with base width 16 instead of 64: small enough for tests and the CPU demo
NARROW = re.compile(r"resnet18_w(\d+)$")
MAX_WIDTH = 1024  # 16x torchvision's 64: wider would take tens of GB before failing
NARROW_CLASSES = 10  # the narrow backbones' unused fc: its size sets the random draws after it, hence conv1's


def narrow_width(arch: str) -> int | None:
    """The base width of a narrow resnet18_wN arch (None for other archs); N must be in 1..MAX_WIDTH."""
    match = NARROW.match(arch)
    if not match:
        return None
    width = int(match.group(1))
    if not 1 <= width <= MAX_WIDTH:
        raise ValueError(f"--arch {arch}: width {width} is outside 1..{MAX_WIDTH}; e.g. resnet18_w16 or resnet18")
    return width


def backbone_archs() -> str:
    return ", ".join(list(LAYOUTS) + ["resnet18_wN (narrow, e.g. resnet18_w16)"])


def _resnet(arch: str) -> nn.Module:
    """torchvision's resnet18/34/50 (weights=None), or a narrow ResNet18 with PyTorch's default initialisation."""
    if arch in LAYOUTS:
        return resnet(arch)
    width = narrow_width(arch)
    if width is not None:
        return resnet("resnet18", width, NARROW_CLASSES, torchvision_init=False)
    raise ValueError(f"unknown SimCLR backbone arch {arch!r}; choose one of {backbone_archs()}")


def embed_dim(arch: str) -> int:
    width = narrow_width(arch)
    if width is not None:
        return 8 * width
    return 2048 if arch == "resnet50" else 512


class SimCLRBackbone(nn.Module):
    """CIFAR-style ResNet: 3x3 stride-1 conv1, no maxpool, no fc; float (N,3,32,32) -> (N, embed_dim)."""

    def __init__(self, arch: str = "resnet18"):
        super().__init__()
        layers = []
        for name, module in _resnet(arch).named_children():
            if name == "conv1":
                module = nn.Conv2d(3, module.out_channels, 3, 1, 1, bias=False)
            if name in ("maxpool", "fc"):
                continue
            layers.append(module)
        self.f = nn.Sequential(*layers)  # f.0 conv1 ... f.6 layer4, f.7 avgpool

    def forward(self, x):
        return torch.flatten(self.f(x), start_dim=1)


class SimCLR(nn.Module):
    """Backbone `f` + projection head `g` for pre-training; forward returns (feature, projection)."""

    def __init__(self, arch: str = "resnet18", feature_dim: int = 128):
        super().__init__()
        self.f = SimCLRBackbone(arch)
        dim = embed_dim(arch)
        self.g = nn.Sequential(nn.Linear(dim, 512, bias=False), nn.BatchNorm1d(512),
                               nn.ReLU(inplace=True), nn.Linear(512, feature_dim, bias=True))

    def forward(self, x):
        feature = self.f(x)
        return feature, self.g(feature)
