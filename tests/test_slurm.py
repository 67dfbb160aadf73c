"""scripts/slurm_decree.sbatch on a real Slurm cluster (one node, scripts/slurm_local.sh): an array of two
tasks, each running its shard of the sweep, then the dependent job that merges their results into the report."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import PlantedBackdoorEncoder, RandomFeatureEncoder, smooth_images
from datasets import save_npz_dataset

ROOT = Path(__file__).resolve().parents[1]
SBATCH = shutil.which("sbatch")
JOB_SECONDS = 600  # the array and the report together, on a busy 2-core machine

pytestmark = pytest.mark.skipif(SBATCH is None, reason="sbatch not found: install Slurm (apt-get install -y "
                                "slurm-wlm munge) and start a local cluster with scripts/slurm_local.sh start")


@pytest.fixture(scope="module")
def cluster():
    """A Slurm controller that answers; started here (scripts/slurm_local.sh) when we are root and none does."""
    if subprocess.run(["sinfo", "-h"], capture_output=True, timeout=60).returncode == 0:
        return
    if os.geteuid() != 0:
        pytest.skip("no Slurm controller answers; start one as root: scripts/slurm_local.sh start")
    subprocess.run([str(ROOT / "scripts" / "slurm_local.sh"), "start"], check=True, timeout=120)


def test_an_array_of_two_shards_and_the_dependent_report_cover_every_encoder(cluster, tmp_path):
    labels = {}
    for seed in (1, 2):
        for name, encoder, label in (("planted", PlantedBackdoorEncoder, "backdoor"),
                                     ("clean", RandomFeatureEncoder, "clean")):
            torch.save(encoder(dim=64, seed=seed).state_dict(), tmp_path / f"{name}_{seed}.pth")
            labels[str(tmp_path / f"{name}_{seed}.pth")] = label
    save_npz_dataset(tmp_path / "shadow.npz", smooth_images(64, 32, seed=1), np.zeros(64, dtype=np.int64))
    (tmp_path / "encoders.csv").write_text("path,arch,label\n" + "".join(
        f"{Path(path).name},{'planted' if label == 'backdoor' else 'random_features'},{label}\n"
        for path, label in labels.items()))
    args = ["--manifest", str(tmp_path / "encoders.csv"), "--arch_module", "planted_arch", "--shadow_data",
            str(tmp_path / "shadow.npz"), "--epochs", "12", "--devices", "cpu", "--out_dir", str(tmp_path / "out")]
    # the jobs get this environment (sbatch --export=ALL): this interpreter, and the tests' arch module
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")])}
    sbatch = [SBATCH, "--parsable", "--cpus-per-task=1", "--mem=1G"]
    array = subprocess.run(sbatch + ["--array=0-1", f"--output={tmp_path}/shard-%a.out",
                                     "scripts/slurm_decree.sbatch", *args],
                           cwd=ROOT, env=env, capture_output=True, text=True, check=True)
    array_id = array.stdout.strip().split(";")[0]
    try:
        report = subprocess.run(sbatch + ["--wait", f"--dependency=afterany:{array_id}",
                                          f"--output={tmp_path}/report.out", "scripts/slurm_decree.sbatch",
                                          "--report", *args],
                                cwd=ROOT, env=env, capture_output=True, text=True, timeout=JOB_SECONDS)
    finally:
        subprocess.run(["scancel", array_id], capture_output=True)
    logs = {name: (tmp_path / name).read_text() for name in ("shard-0.out", "shard-1.out", "report.out")}
    assert report.returncode == 0, logs
    for k in (1, 2):
        assert f"2 encoders (shard {k}/2), 2 to run" in logs[f"shard-{k - 1}.out"], logs
    summary = pd.read_csv(tmp_path / "out" / "trigger_norm" / "summary.csv")
    assert sorted(summary.path) == sorted(labels) and (summary.status == "done").all()
    assert (summary.verdict == summary.path.map(labels).map({"backdoor": "trojaned", "clean": "clean"})).all()
    assert "accuracy 1.000" in logs["report.out"]
