"""cuDNN determinism as the paper's scripts set it (main.py, attack_encoder.py): deterministic kernels on CUDA."""
import argparse

import torch


def add_determinism_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--nondeterministic", action="store_true",
                        help="let cuDNN pick faster, non-deterministic kernels (default: deterministic, as the "
                             "paper set torch.backends.cudnn.deterministic = True); no effect on CPU")


def configure_determinism(nondeterministic: bool = False) -> None:
    """cudnn.deterministic = not nondeterministic, benchmark off unless nondeterministic (as the paper)."""
    torch.backends.cudnn.deterministic = not nondeterministic
    torch.backends.cudnn.benchmark = nondeterministic
