"""What produced a result: library versions written next to every output."""
import platform

import numpy as np


def versions() -> dict:
    import torch
    return {"python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__}
