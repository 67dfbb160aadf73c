"""What produced a result: library versions and CPU thread settings, written next to every output."""
import os
import platform

import numpy as np


def versions() -> dict:
    import torch
    return {"python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__,
            "torch_threads": torch.get_num_threads(), "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY")}
