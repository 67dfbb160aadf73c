"""SimCLR encoders in BadEncoder's layout: backbone keys `f.0.weight`..., full model `f.f.*` + head `g.*`."""
import re

import torch
from torch import nn

# torchvision is imported where a backbone is built: importing it imports torch._dynamo (about a second), which
# processes that only name archs (a sweep's parent, --help) need not pay
TORCHVISION_RESNETS = ("resnet18", "resnet34", "resnet50")
# resnet18_w16 = ResNet18 with base width 16 instead of 64: small enough for tests and the CPU demo
NARROW = re.compile(r"resnet18_w(\d+)$")
MAX_WIDTH = 1024  # 16x torchvision's 64: wider would take tens of GB before failing


def narrow_width(arch: str) -> int | None:
    """The base width of a narrow resnet18_wN arch (None for other archs); N must be in 1..MAX_WIDTH."""
    match = NARROW.match(arch)
    if not match:
        return None
    width = int(match.group(1))
    if not 1 <= width <= MAX_WIDTH:
        raise ValueError(f"--arch {arch}: width {width} is outside 1..{MAX_WIDTH}; e.g. resnet18_w16 or resnet18")
    return width


def _narrow_resnet18(width: int) -> nn.Module:
    """torchvision-named ResNet18 (conv1, bn1, relu, maxpool, layer1-4, avgpool, fc) with base width `width`."""
    from torchvision.models.resnet import BasicBlock, conv1x1
    net = nn.Module()
    net.conv1 = nn.Conv2d(3, width, 7, 2, 3, bias=False)
    net.bn1 = nn.BatchNorm2d(width)
    net.relu = nn.ReLU(inplace=True)
    net.maxpool = nn.MaxPool2d(3, 2, 1)
    inplanes = width
    for i, planes in enumerate((width, 2 * width, 4 * width, 8 * width)):
        stride = 1 if i == 0 else 2
        down = None
        if stride != 1 or inplanes != planes:
            down = nn.Sequential(conv1x1(inplanes, planes, stride), nn.BatchNorm2d(planes))
        setattr(net, f"layer{i + 1}", nn.Sequential(BasicBlock(inplanes, planes, stride, down),
                                                     BasicBlock(planes, planes)))
        inplanes = planes
    net.avgpool = nn.AdaptiveAvgPool2d(1)
    net.fc = nn.Linear(inplanes, 10)
    return net


def backbone_archs() -> str:
    return ", ".join(list(TORCHVISION_RESNETS) + ["resnet18_wN (narrow, e.g. resnet18_w16)"])


def _resnet(arch: str) -> nn.Module:
    if arch in TORCHVISION_RESNETS:
        from torchvision.models import resnet
        return getattr(resnet, arch)(weights=None)
    width = narrow_width(arch)
    if width is not None:
        return _narrow_resnet18(width)
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
