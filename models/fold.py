"""Batch norms folded into the convolutions before them: the same eval-mode function in fewer operations.

In eval mode a BatchNorm is a fixed per-channel affine map, so conv followed by BN is one conv with scaled
weights and a bias. DECREE differentiates through a frozen encoder thousands of times; on the CPU the BNs'
elementwise passes (forward and input-gradient backward) are a large share of a small ResNet's step.
Tracing runs the architecture's own Python code (ours, or a trusted --arch_module), never anything from a
checkpoint; an encoder torch.fx cannot trace is used as it is.
"""
from torch import nn
from torch.fx.experimental.optimization import fuse


def batchnorm_count(module: nn.Module) -> int:
    return sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in module.modules())


def fold_batchnorm(encoder: nn.Module) -> tuple[nn.Module, int, str]:
    """(encoder with every conv->BN / linear->BN pair folded, how many BNs were folded, why none were).

    The encoder must be in eval mode (its running statistics are what gets folded); it is not modified."""
    if encoder.training:
        raise ValueError("fold_batchnorm needs an encoder in eval mode")
    before = batchnorm_count(encoder)
    if before == 0:
        return encoder, 0, "the encoder has no batch norm"
    try:
        folded = fuse(encoder)
    except Exception as err:  # noqa: BLE001 - tracing runs arbitrary architecture code; folding is optional
        return encoder, 0, f"torch.fx could not trace the encoder ({type(err).__name__}); batch norms left as they are"
    return folded.eval(), before - batchnorm_count(folded), ""
