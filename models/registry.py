"""Your own encoder architectures: register a factory, then load its (weights-only) checkpoints like ours.

A module you name with --arch_module (or in DECREE_ARCH_MODULES, comma-separated, which sweep workers
inherit) is imported before loading and calls `register_arch`. The code comes from your module, never from
the checkpoint, so checkpoints of a custom architecture are still read with weights_only=True.
"""
import importlib
import os
from dataclasses import dataclass
from typing import Callable

from torch import nn

ARCH_MODULES_ENV = "DECREE_ARCH_MODULES"


@dataclass(frozen=True)
class CustomArch:
    factory: Callable[[], nn.Module]  # builds the encoder: float (N,3,S,S) normalised -> (N, embed_dim)
    embed_dim: int
    input_size: int | None = None     # S; None: the usage info's (32 for cifar10/stl10, else 224)
    head_prefixes: tuple = ()         # checkpoint keys of a head the encoder drops (e.g. a classifier)


CUSTOM_ARCHS: dict[str, CustomArch] = {}


def register_arch(name: str, factory: Callable[[], nn.Module], embed_dim: int, input_size: int | None = None,
                  head_prefixes: tuple = ()) -> None:
    """Make `--arch name` build `factory()`; normalisation (and input size, unless given) follow
    --encoder_usage_info. Checkpoint keys starting with one of `head_prefixes` are ignored when loading."""
    CUSTOM_ARCHS[name] = CustomArch(factory, embed_dim, input_size, tuple(head_prefixes))


def import_arch_modules(modules=()) -> None:
    """Import the modules that register custom architectures, and export them to child processes."""
    names = [m for m in os.environ.get(ARCH_MODULES_ENV, "").split(",") if m]
    names += [m for m in modules if m not in names]
    for name in names:
        try:
            importlib.import_module(name)
        except ImportError as err:
            raise ValueError(f"--arch_module {name}: cannot import it ({err}); is it on PYTHONPATH?") from err
    if names:
        os.environ[ARCH_MODULES_ENV] = ",".join(names)


def drop_head(sd: dict, head_prefixes: tuple) -> dict:
    """`sd` without the keys of a head the encoder does not have."""
    return {k: v for k, v in sd.items() if not k.startswith(head_prefixes)} if head_prefixes else sd
