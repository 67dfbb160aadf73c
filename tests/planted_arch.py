"""Custom architectures for tests that run in child processes (sweeps, CLIs): registered on import.

`planted`: the conftest PlantedBackdoorEncoder; `planted_warp`: PlantedWarpEncoder; `random_features`: their clean
twin; `nan_output`: broken. All plain
modules, so their checkpoints are weights-only state dicts that `load_encoder(..., arch=...)` reads.
"""
from models import register_arch

from conftest import PlantedBackdoorEncoder, PlantedWarpEncoder, RandomFeatureEncoder

EMBED_DIM = 64
register_arch("planted", lambda: PlantedBackdoorEncoder(dim=EMBED_DIM), EMBED_DIM)
register_arch("planted_warp", lambda: PlantedWarpEncoder(dim=EMBED_DIM), EMBED_DIM)
register_arch("random_features", lambda: RandomFeatureEncoder(dim=EMBED_DIM), EMBED_DIM)


class NaNEncoder(RandomFeatureEncoder):
    """A broken encoder: every embedding is NaN (as a checkpoint with NaN weights would give)."""

    def forward(self, x):
        return super().forward(x) * float("nan")


register_arch("nan_output", lambda: NaNEncoder(dim=EMBED_DIM), EMBED_DIM)
