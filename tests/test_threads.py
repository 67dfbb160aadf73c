"""CPU thread policy (common/threads.py): bounded by the usable cores, overridable, set before torch loads."""
import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import models
from common.threads import choose_threads, threads_per_worker, usable_cores
from conftest import smooth_images

ROOT = Path(__file__).resolve().parents[1]
ENTRY_POINTS = ("main.py", "run_decree.py", "attack_encoder.py", "pretrain_encoder.py", "scripts/demo.py",
                "scripts/benchmark.py", "validate/compute_zscore.py", "validate/script_compute_zscore.py",
                "validate/val_cifar10_training_downstream_classifier.py")
STDLIB = set(sys.stdlib_module_names)


def test_threads_come_from_the_flag_then_the_environment_then_the_cores():
    assert choose_threads(3, {"OMP_NUM_THREADS": "1"}, cores=2) == (3, "--threads")
    assert choose_threads(None, {"OMP_NUM_THREADS": "1"}, cores=2) == (1, "OMP_NUM_THREADS")
    assert choose_threads(None, {"OMP_NUM_THREADS": "4,2"}, cores=2) == (4, "OMP_NUM_THREADS")
    threads, why = choose_threads(None, {}, cores=2)
    assert threads == 2 and "2 core(s)" in why


@pytest.mark.parametrize("requested, environ", [(0, {}), (None, {"OMP_NUM_THREADS": "many"}),
                                                (None, {"OMP_NUM_THREADS": "0"})])
def test_a_bad_thread_count_is_named(requested, environ):
    with pytest.raises(ValueError, match="--threads|OMP_NUM_THREADS"):
        choose_threads(requested, environ, cores=2)


def test_usable_cores_obey_a_cgroup_quota(tmp_path):
    affinity = len(os.sched_getaffinity(0))
    cpu_max = tmp_path / "cpu.max"
    cpu_max.write_text("max 100000\n")
    assert usable_cores(cpu_max) == affinity
    cpu_max.write_text("50000 100000\n")  # half a core: still one thread
    assert usable_cores(cpu_max) == 1
    assert usable_cores(tmp_path / "missing") == affinity
    assert threads_per_worker(3, cores=2) == 1 and threads_per_worker(2, cores=8) == 4


@pytest.mark.parametrize("script", ENTRY_POINTS)
def test_every_entry_point_imports_the_thread_policy_before_torch(script):
    """OpenMP reads OMP_WAIT_POLICY when torch loads: common.threads must be the first non-stdlib import."""
    imports = [node for node in ast.parse((ROOT / script).read_text()).body
               if isinstance(node, (ast.Import, ast.ImportFrom))]
    names = [node.module if isinstance(node, ast.ImportFrom) else node.names[0].name for node in imports]
    first = next(name for name in names if name.split(".")[0] not in STDLIB)
    assert first == "common.threads", f"{script}: first imports {first}"
    assert "configure_threads(args.threads" in (ROOT / script).read_text()


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("threads")
    torch.manual_seed(0)
    path = folder / "enc" / "model_1.pth"
    path.parent.mkdir()
    torch.save({"epoch": 1, "state_dict": models.get_encoder("cifar10", "resnet18_w4").state_dict()}, path)
    data = folder / "shadow.npz"
    np.savez(data, x=smooth_images(16, 32, seed=2), y=np.zeros(16, np.int64))
    return ["--encoder_path", str(path), "--arch", "resnet18_w4", "--shadow_data", str(data), "--shadow_size", "16",
            "--epochs", "1", "--device", "cpu", "--quiet", "--id", "run"]


def test_main_says_and_records_its_threads_and_waits_passively(tiny_run, tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY")}
    out = subprocess.run([sys.executable, str(ROOT / "main.py"), *tiny_run, "--out_dir", str(tmp_path)],
                         env=env, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    line = next(line for line in out.stdout.splitlines() if line.startswith("CPU threads:"))
    threads = usable_cores()
    assert line.startswith(f"CPU threads: {threads} ") and "core(s)" in line and "PASSIVE" in line
    versions = json.loads((tmp_path / "trigger_norm" / "run.json").read_text())["versions"]
    assert versions["torch_threads"] == threads and versions["omp_wait_policy"] == "PASSIVE"
