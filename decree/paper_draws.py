"""The paper's random draws, so that under its settings (presets paper and exact) a seed gives the paper's run.

The paper's main.py takes every draw from torch's global generator. After torch.manual_seed(seed) it builds its
encoder, whose random initial weights the checkpoint then overwrites (drawing them still moves the stream); draws
the mask with torch.rand((H,W), float64) and the pattern with torch.rand_like on an (H,W,3) array, in float64
(`orc` draws the pattern only); builds its shuffling DataLoader; and draws one more torch.rand([1, 512], float64)
that it never uses. Each epoch its single-process DataLoader takes two 64-bit draws from the global stream: the
iterator's base seed (for workers it does not have), then its RandomSampler's seed, which seeds a fresh generator
for that epoch's torch.randperm. PaperDraws replays these draws on a private generator that continues the global
stream from just after the encoder was built, so nothing else in the process can move them.

Encoders the paper's main.py cannot build (hub models, custom archs, CLIP ViT-B/32) have no such draws: they keep
the project's own generator (decree.restarts.OwnDraws). The narrow SimCLR ResNets (resnet18_wN) take the draws of
the SimCLR main.py would build were the arch BadEncoder's: its model code, with the narrow backbone.
"""
from functools import partial
from typing import Callable

import torch

from models.clip import clip_arch
from models.simclr import TORCHVISION_RESNETS, SimCLR, narrow_width

PROJECTION_DRAW = (1, 512)  # main.py's unused `projectee`, drawn after the trigger and before the first epoch


def _torchvision_resnet(arch: str):
    from torchvision import models
    return getattr(models, arch)(weights=None)


def _paper_clip_visual():
    """The visual tower the paper's CLIP class builds: OpenAI's RN50 ModifiedResNet (output 1024, 32 heads) without
    the weight initialisation that only OpenAI's full CLIP class (and open_clip's tower) applies."""
    from open_clip.modified_resnet import ModifiedResNet

    class Uninitialised(ModifiedResNet):
        def init_parameters(self):
            pass

    return Uninitialised(layers=(3, 4, 6, 3), output_dim=1024, heads=32, image_size=224, width=64)


def paper_build(usage_info: str, arch: str | None) -> Callable[[], object] | None:
    """What the paper's main.py builds before it draws the trigger, as a callable that builds it (the same modules,
    shapes and order, so the same draws); None where main.py cannot build the encoder.

    cifar10/stl10: BadEncoder's SimCLR (torchvision ResNet18/34/50, or a narrow ResNet18, with a 3x3 first
    convolution, then the projection head); imagenet: a ResNet50 with its fc layer; CLIP: the RN50 visual tower;
    moco: torchvision's ResNet18, the model main.py's moco branch builds and loads (its published
    get_encoder_architecture_usage has no moco case, so the branch's own ResNet18 is taken as the only model
    built)."""
    simclr = arch is not None and (arch in TORCHVISION_RESNETS or narrow_width(arch) is not None)
    if usage_info in ("cifar10", "stl10") and simclr:
        return partial(SimCLR, arch)
    if usage_info == "imagenet" and arch == "resnet50":
        return partial(_torchvision_resnet, "resnet50")
    if usage_info == "moco" and arch == "resnet18":
        return partial(_torchvision_resnet, "resnet18")
    if usage_info == "CLIP" and arch is not None and clip_arch(arch) == "RN50":
        return _paper_clip_visual
    return None


class PaperDraws:
    """Restart 0's draws as the paper's main.py takes them: the initial trigger, then one batch order per epoch."""

    def __init__(self, seed: int, build: Callable[[], object]):
        torch.manual_seed(seed)
        build()
        self.generator = torch.Generator()
        self.generator.set_state(torch.get_rng_state())

    def initial_trigger(self, size: int, mask_init: str, dtype=None):
        """(mask (S,S) in [0,1), or None for `orc`, which draws no mask; pattern (S,S,3) in [0,1)): float64 whatever
        `dtype` the parameters have, as main.py draws them."""
        mask0 = torch.rand((size, size), dtype=torch.float64, generator=self.generator) if mask_init == "rand" else None
        pattern01 = torch.rand((size, size, 3), dtype=torch.float64, generator=self.generator)
        torch.rand(PROJECTION_DRAW, dtype=torch.float64, generator=self.generator)
        return mask0, pattern01

    def _seed_draw(self) -> int:
        return int(torch.empty((), dtype=torch.int64).random_(generator=self.generator).item())

    def epoch_order(self, n: int) -> torch.Tensor:
        """int64 (n,): the order a shuffling DataLoader gives its epoch."""
        self._seed_draw()  # the iterator's base seed for workers
        return torch.randperm(n, generator=torch.Generator().manual_seed(self._seed_draw()))
