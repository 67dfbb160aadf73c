"""One encoder through the paper's data path in a fresh interpreter: what the paper's run_decree.py started for
every encoder (`python -m experiments.paper_run ENCODER USAGE_INFO --out JSON ...`).

torch is imported before anything of the project: common.threads would make OpenMP's threads wait passively,
and the paper's code ran with torch's and OpenMP's defaults (one thread per core, threads that spin a while).
"""
import torch  # first, see above

import argparse
import os
import time

OMP_WAIT_POLICY = os.environ.get("OMP_WAIT_POLICY")  # what OpenMP read when torch loaded it

from common import io as atomic  # noqa: E402
from datasets import load_shadow_set  # noqa: E402
from decree.settings import preset  # noqa: E402
from models import load_encoder  # noqa: E402
from .paper_path import paper_invert_trigger  # noqa: E402


def load_with_shadow(path, usage_info: str, arch: str | None, shadow_data, shadow_size, seed: int, device="cpu"):
    """(encoder, spec, shadow uint8 (N,S,S,3), checkpoint seconds, shadow-set seconds) as main.py prepares them."""
    start = time.perf_counter()
    encoder, spec = load_encoder(path, usage_info, arch, device)
    load_s = time.perf_counter() - start
    start = time.perf_counter()
    shadow = load_shadow_set(usage_info, spec.input_size, shadow_data, shadow_size, None, seed=seed,
                             progress=False).images
    return encoder, spec, shadow, load_s, time.perf_counter() - start


def run_one(path, usage_info: str, arch: str | None, shadow_data, shadow_size, lr: float, seed: int,
            max_epochs: int, threshold: float) -> dict:
    """Load, prepare the shadow set and invert as the paper did; the record's seconds are the inversion's."""
    encoder, spec, shadow, load_s, shadow_s = load_with_shadow(path, usage_info, arch, shadow_data, shadow_size, seed)
    cfg = preset(usage_info, "paper", lr=lr, seed=seed, max_epochs=max_epochs, pl1_threshold=threshold)
    result = paper_invert_trigger(encoder, shadow, spec.mean, spec.std, cfg,
                                  paper_encoder=(spec.usage_info, spec.arch))
    return {"path": str(path), "pl1": result.pl1 if result.found else None, "verdict": result.verdict,
            "epochs": result.epochs, "seconds": result.seconds, "prepare_s": load_s + shadow_s,
            "torch_threads": torch.get_num_threads(), "omp_wait_policy": OMP_WAIT_POLICY}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("encoder_path")
    parser.add_argument("usage_info")
    parser.add_argument("--arch", default=None)
    parser.add_argument("--shadow_data", default=None)
    parser.add_argument("--shadow_size", type=int, default=None)
    parser.add_argument("--lr", type=float, default=0.5)
    parser.add_argument("--seed", type=int, default=80)
    parser.add_argument("--epochs", type=int, default=1000)
    parser.add_argument("--pl1_threshold", type=float, default=0.1)
    parser.add_argument("--out", required=True, help="JSON record of the run")
    args = parser.parse_args(argv)
    atomic.write_json(args.out, run_one(args.encoder_path, args.usage_info, args.arch, args.shadow_data,
                                        args.shadow_size, args.lr, args.seed, args.epochs, args.pl1_threshold))


if __name__ == "__main__":
    main()
