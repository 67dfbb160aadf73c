"""Writing a report's matplotlib figures."""
from pathlib import Path

from common import io as atomic


def save_figure(fig, path: Path) -> None:
    """Write `fig` as a PNG at `path` atomically (a reader never sees half a file) and free it."""
    import matplotlib.pyplot as plt
    with atomic.atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
