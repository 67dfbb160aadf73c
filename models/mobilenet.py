"""MobileNetV2 (Sandler et al., arXiv:1801.04381) as an image encoder: torchvision's network without its classifier.

`--arch mobilenet_v2` takes 224 px inputs; `--arch mobilenet_v2_<px>` the same weights at px in INPUT_SIZES (the
network ends in global average pooling, so any multiple of its stride 32 gives a 1280-d embedding).
Normalisation follows --encoder_usage_info (imagenet: the ImageNet constants torchvision's weights were
trained with). Checkpoints in torchvision's layout (features.*, classifier.*) load as they are: the
classifier is dropped.
"""
from torch import nn

from .registry import register_arch

EMBED_DIM = 1280
INPUT_SIZES = (32, 64, 96, 128, 160, 192, 224)
CLASSIFIER_PREFIX = "classifier."


class MobileNetV2Encoder(nn.Module):
    """float (N,3,S,S) normalised -> (N,1280): the pooled features that torchvision's classifier reads."""

    def __init__(self):
        super().__init__()
        import torchvision
        self.features = torchvision.models.mobilenet_v2(weights=None).features
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())

    def forward(self, x):
        return self.pool(self.features(x))


def arch_name(input_size: int) -> str:
    """The --arch of MobileNetV2 at `input_size` px."""
    if input_size not in INPUT_SIZES:
        raise ValueError(f"MobileNetV2 input size {input_size}: choose one of {', '.join(map(str, INPUT_SIZES))}")
    return "mobilenet_v2" if input_size == 224 else f"mobilenet_v2_{input_size}"


for _size in INPUT_SIZES:
    register_arch(arch_name(_size), MobileNetV2Encoder, EMBED_DIM, input_size=_size,
                  head_prefixes=(CLASSIFIER_PREFIX,))
