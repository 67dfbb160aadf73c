"""run_decree.py sweeps: discovery, labels, shards, failures and resuming after a kill, on tiny CPU encoders."""
import csv
import json
import os
import queue
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import run_decree
from conftest import PlantedBackdoorEncoder, RandomFeatureEncoder, smooth_images
from datasets import save_npz_dataset
from decree.outputs import run_id_for
from common.isolated import PROJECT_PACKAGES, ROOT as ISOLATION_ROOT, isolated_command
from sweeps import workers as sweep_module
from sweeps.claims import claim_encoder, claim_path, release_claim
from sweeps.discovery import Encoder, discover_globs, discover_output_folder, infer_label, read_manifest
from sweeps.shards import select_shard, shard_from_slurm
from sweeps.workers import WorkerDied, WorkerServer, cpu_workers, worker_devices

ROOT = Path(__file__).resolve().parents[1]
# one thread per process: the same floating-point sums for any --workers, and polite on a shared machine
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")]), "OMP_NUM_THREADS": "1"}
GOOD = [("planted_1.pth", "planted", "backdoor"), ("planted_2.pth", "planted", "backdoor"),
        ("clean_1.pth", "random_features", "clean"), ("clean_2.pth", "random_features", "clean")]
BROKEN = ("broken.pth", "planted", "backdoor")


@pytest.fixture(scope="module")
def encoders(tmp_path_factory):
    """Two planted-backdoor and two clean tiny encoders, an unreadable checkpoint, a shadow set."""
    folder = tmp_path_factory.mktemp("encoders")
    for seed in (1, 2):
        torch.save(PlantedBackdoorEncoder(dim=64, seed=seed).state_dict(), folder / f"planted_{seed}.pth")
        torch.save(RandomFeatureEncoder(dim=64, seed=seed).state_dict(), folder / f"clean_{seed}.pth")
    (folder / "broken.pth").write_bytes(np.random.default_rng(0).bytes(2000))
    save_npz_dataset(folder / "shadow.npz", smooth_images(64, 32, seed=1), np.zeros(64, dtype=np.int64))
    return folder


def write_manifest(folder: Path, name: str, rows) -> Path:
    path = folder / name
    path.write_text("path,usage_info,arch,label\n" + "".join(f"{p},cifar10,{a},{lab}\n" for p, a, lab in rows))
    return path


def sweep_command(encoders: Path, manifest: Path, out_dir: Path, workers: int = 2, epochs: int = 12,
                  arch_module: str = "planted_arch") -> list[str]:
    return [sys.executable, str(ROOT / "run_decree.py"), "--manifest", str(manifest), "--arch_module", arch_module,
            "--shadow_data", str(encoders / "shadow.npz"), "--epochs", str(epochs), "--workers", str(workers),
            "--quiet", "--out_dir", str(out_dir)]


@pytest.fixture(scope="module")
def sweep(encoders, tmp_path_factory):
    """One uninterrupted sweep over the four encoders and the broken file."""
    out_dir = tmp_path_factory.mktemp("sweep")
    manifest = write_manifest(encoders, "all.csv", GOOD + [BROKEN])
    done = subprocess.run(sweep_command(encoders, manifest, out_dir), cwd=ROOT, env=ENV, capture_output=True,
                          text=True, timeout=300)
    return out_dir, done


def children(pid: int) -> list[int]:
    """The live child processes of `pid` (Linux /proc)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            state, parent = stat.read_text().rsplit(")", 1)[1].split()[:2]
        except OSError:
            continue
        if int(parent) == pid and state != "Z":
            found.append(int(stat.parent.name))
    return found


def descendants(pid: int) -> list[int]:
    """The live processes below `pid`: a sweep's worker servers and the encoders' processes forked from them."""
    found, todo = [], [pid]
    while todo:
        below = children(todo.pop())
        found += below
        todo += below
    return found


def running(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def wait_until_gone(pids, seconds: float = 10) -> list[int]:
    """The pids still running after up to `seconds`."""
    deadline = time.time() + seconds
    while any(map(running, pids)) and time.time() < deadline:
        time.sleep(0.05)
    return [pid for pid in pids if running(pid)]


def comparable(summary: pd.DataFrame) -> pd.DataFrame:
    """Summary rows without the timings, which differ between two runs of the same encoder."""
    return summary.drop(columns=["seconds"]).set_index("path").sort_index()


def test_sweep_flags_the_planted_encoders_and_reports(sweep):
    out_dir, done = sweep
    norm = out_dir / "trigger_norm"
    summary = pd.read_csv(norm / "summary.csv")
    assert list(summary.columns) == ["path", "run_id", "usage_info", "arch", "label", "l1", "pl1", "verdict",
                                     "epochs", "seconds", "status", "error", "score", "target_cos", "target_name",
                                     "family", "shadow_spread", "stamped_spread", "notes", "warp_gain", "warp_verdict",
                                     "combined_verdict", "combined_score"]
    assert summary.warp_gain.isna().all() and summary.combined_verdict.isna().all()  # no --warp_test here
    assert summary.shadow_spread.notna().sum() == 4  # every finished run records its unstamped spread
    finished = summary[summary.status == "done"]
    assert len(finished) == 4 and (finished.verdict == finished.label.map(
        {"backdoor": "trojaned", "clean": "clean"})).all()
    metrics = pd.read_json(norm / "summary.json", typ="series")["metrics"]
    assert metrics["accuracy"] == 1.0 and metrics["auroc"] == 1.0 and metrics["tpr"] == 1.0
    assert "accuracy 1.000" in done.stdout and "AUROC over PL1 1.000" in done.stdout
    for figure in ("pl1.png", "gallery.png"):
        assert (norm / figure).read_bytes()[:4] == b"\x89PNG"
    for run_id in finished.run_id:
        assert (out_dir / "detect_log" / f"{run_id}.log").is_file()
        assert (out_dir / "detect_log" / f"{run_id}.worker.log").is_file()
    assert list((out_dir / "detect_log").glob("sweep_*.json"))  # the sweep's own config
    assert not list(out_dir.rglob("*.tmp"))


def test_a_broken_encoder_is_recorded_as_failed_and_the_others_finish(sweep, encoders):
    out_dir, done = sweep
    assert done.returncode == 1, done.stderr
    summary = pd.read_csv(out_dir / "trigger_norm" / "summary.csv").set_index("path")
    broken = summary.loc[str(encoders / "broken.pth")]
    assert broken.status == "failed" and "not a PyTorch checkpoint" in broken.error
    assert (out_dir / "trigger_norm" / "failed" / f"{broken.run_id}.json").is_file()
    assert (summary.status == "done").sum() == 4


def test_a_killed_sweep_resumes_without_rerunning_finished_encoders(sweep, encoders, tmp_path):
    reference_dir, _ = sweep
    manifest = write_manifest(encoders, "two.csv", [GOOD[0], GOOD[2]])
    command = sweep_command(encoders, manifest, tmp_path, workers=1)
    first = subprocess.Popen(command, cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not list((tmp_path / "trigger_norm").glob("*.json")) and time.time() < deadline:
        time.sleep(0.05)
    workers = descendants(first.pid)  # the worker server and the running encoder's process
    first.kill()  # SIGKILL: no chance to clean up or to end its workers
    first.wait()
    assert wait_until_gone(workers) == []
    finished = {p: p.stat().st_mtime_ns for p in (tmp_path / "trigger_norm").glob("*.json")}
    assert len(finished) == 1

    again = subprocess.run(command, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    assert "2 encoders, 1 to run" in again.stdout
    assert all(path.stat().st_mtime_ns == mtime for path, mtime in finished.items())
    resumed = comparable(pd.read_csv(tmp_path / "trigger_norm" / "summary.csv"))
    reference = comparable(pd.read_csv(reference_dir / "trigger_norm" / "summary.csv")).loc[resumed.index]
    pd.testing.assert_frame_equal(resumed, reference, check_dtype=False)  # NaN of the broken row: float


def fake_encoders(n: int) -> list[Encoder]:
    return [Encoder(f"output/cifar10/enc_{i}/model_{i}.pth", "cifar10", None, "backdoor") for i in range(n)]


@pytest.mark.parametrize("n", [1, 2, 3, 7])
def test_shards_cover_every_encoder_exactly_once(n):
    encoders = fake_encoders(40)
    shards = [select_shard(encoders, k, n) for k in range(1, n + 1)]
    paths = [enc.path for shard in shards for enc in shard]
    assert sorted(paths) == sorted(enc.path for enc in encoders) and len(paths) == len(set(paths))
    assert max(map(len, shards)) - min(map(len, shards)) <= 1  # balanced: no array task waits on another


def test_slurm_array_variables_give_the_same_shard_as_the_flag(encoders, capsys, monkeypatch):
    manifest = write_manifest(encoders, "listing.csv", GOOD + [BROKEN])
    listing = ["--manifest", str(manifest), "--out_dir", str(encoders / "none"), "--list"]

    def listed(extra=()):
        run_decree.main(listing + list(extra))
        return [line for line in capsys.readouterr().out.splitlines() if line.startswith("to run")]

    by_flag = [listed(["--shard", f"{k}/2"]) for k in (1, 2)]
    monkeypatch.setenv("SLURM_ARRAY_TASK_COUNT", "2")
    monkeypatch.setenv("SLURM_ARRAY_TASK_MIN", "0")
    by_slurm = []
    for task in ("0", "1"):
        monkeypatch.setenv("SLURM_ARRAY_TASK_ID", task)
        by_slurm.append(listed())
    assert by_slurm == by_flag and sorted(by_flag[0] + by_flag[1]) == sorted(listed(["--shard", "1/1"]))
    assert shard_from_slurm({"SLURM_ARRAY_TASK_ID": "7", "SLURM_ARRAY_TASK_MIN": "1", "SLURM_ARRAY_TASK_STEP": "3",
                             "SLURM_ARRAY_TASK_COUNT": "3"}) == (3, 3)
    assert shard_from_slurm({}) is None


def test_globbed_encoders_have_unknown_truth_whatever_their_names(tmp_path):
    for name in ("clean_encoder.pth", "backdoored.pth"):
        (tmp_path / name).write_bytes(b"")
    assert {e.label for e in discover_globs([str(tmp_path / "*.pth")], None)} == {"unknown"}


def test_labels_follow_the_papers_path_rule():
    assert infer_label("output/cifar10/clean_encoder/model_1000.pth") == "clean"
    assert infer_label("output/CLIP/Clean_CLIP.pth") == "clean"
    assert infer_label("output/cifar10/stl10_backdoored_encoder/model_200.pth") == "backdoor"


def test_output_folder_discovery_infers_usage_info_from_the_first_folder(tmp_path):
    for name in ("cifar10/clean_encoder/model_1000.pth", "CLIP_text/svhn_backdoored_encoder/model_3.pt",
                 "stl10/a/b/model_1.pth", "notes/model.pth", "cifar10/readme.txt"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"")
    found = [(Path(e.path).relative_to(tmp_path).as_posix(), e.usage_info, e.label)
             for e in discover_output_folder(tmp_path)]
    assert found == [("CLIP_text/svhn_backdoored_encoder/model_3.pt", "CLIP", "backdoor"),
                     ("cifar10/clean_encoder/model_1000.pth", "cifar10", "clean"),
                     ("stl10/a/b/model_1.pth", "stl10", "backdoor")]


def test_discovery_finds_safetensors_and_a_named_hub_weights_file(tmp_path):
    for name in ("cifar10/clean_encoder/model.safetensors", "cifar10/hub/pytorch_model.bin",
                 "cifar10/hub/config.json", "mine/a.safetensors", "mine/notes.txt"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"")
    assert [Path(e.path).relative_to(tmp_path).as_posix() for e in discover_output_folder(tmp_path)] == [
        "cifar10/clean_encoder/model.safetensors"]
    found = discover_globs([str(tmp_path / "mine"), str(tmp_path / "cifar10/hub/*")], "stl10")
    assert [Path(e.path).relative_to(tmp_path).as_posix() for e in found] == ["cifar10/hub/pytorch_model.bin",
                                                                             "mine/a.safetensors"]
    with pytest.raises(FileNotFoundError, match="matches no .pth/.pt/.safetensors/.bin file"):
        discover_globs([str(tmp_path / "mine/*.txt")], "stl10")


def test_sweep_passes_main_py_flags_through_to_every_encoder():
    args = run_decree.parse_args(["--encoders", "x.pth", "--nondeterministic", "--preset", "triage",
                                  "--min_progress", "0.1"])
    argv = sweep_module.main_py_args(Encoder("x.pth", "cifar10", None, "clean"), "cpu", "out",
                                     run_decree.sweep_options(args))
    assert "--nondeterministic" in argv and "--preset=triage" in argv  # --flag=value: one argument each
    assert "--min_progress=0.1" in argv and "--lr=0.5" in argv
    assert "--nondeterministic" not in sweep_module.main_py_args(
        Encoder("x.pth", "cifar10", None, "clean"), "cpu", "out",
        run_decree.sweep_options(run_decree.parse_args(["--encoders", "x.pth"])))


def test_manifest_labels_are_the_truth_and_paths_are_relative_to_it(tmp_path):
    manifest = tmp_path / "m.csv"
    manifest.write_text("path,label\nclean_but_trojaned.pth,backdoor\nsub/x.pth,\n")
    encoders = read_manifest(manifest, "stl10", "resnet18")
    assert [(e.path, e.label, e.usage_info, e.arch) for e in encoders] == [
        (str(tmp_path / "clean_but_trojaned.pth"), "backdoor", "stl10", "resnet18"),
        (str(tmp_path / "sub" / "x.pth"), "unknown", "stl10", "resnet18")]  # no label: nobody said
    assert encoders[0].run_id == run_id_for(tmp_path / "clean_but_trojaned.pth")


@pytest.mark.parametrize("content, message", [
    ("file,label\na.pth,clean\n", "needs a header with a 'path' column"),
    ("path,usage_info\na.pth,cifar100\n", "m.csv:2: usage_info 'cifar100' is not one of"),
    ("path,label\na.pth,clean\nb.pth,trojan\n", "m.csv:3: label 'trojan' is not 'clean' or 'backdoor'"),
    ("path,weights\na.pth,1\n", "unknown column(s) ['weights']"),
    ("path\n", "lists no encoders"),
])
def test_manifest_errors_are_one_line(tmp_path, capsys, content, message):
    (tmp_path / "m.csv").write_text(content)
    with pytest.raises(SystemExit) as exit_:
        run_decree.main(["--manifest", str(tmp_path / "m.csv"), "--list"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.count("\n") == 1 and message in err and err.startswith("run_decree.py: error")


# ---- hardening: isolation, timeouts, claims, orphans, write failures ------------------------------------------

HOSTILE_MODULES = ("torch", "numpy", "decree", "models", "datasets", "tqdm", "planted_arch", "conftest",
                   "sitecustomize", "usercustomize")


def plant_hostile_modules(folder: Path) -> None:
    """Modules named like what a worker imports; importing any of them leaves a MARKER-<name> file here."""
    for name in HOSTILE_MODULES:
        (folder / f"{name}.py").write_text(
            f"open({str(folder / ('MARKER-' + name))!r}, 'w').write('imported')\n")


def markers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.glob("MARKER-*"))


def test_project_packages_are_every_package_in_the_root():
    packages = {p.parent.name for p in ISOLATION_ROOT.glob("*/__init__.py")}
    assert set(PROJECT_PACKAGES) == packages and ISOLATION_ROOT == ROOT


def test_an_isolated_script_imports_nothing_from_its_own_the_current_or_pythonpath_folder(tmp_path):
    plant_hostile_modules(tmp_path)
    probe = tmp_path / "probe.py"
    probe.write_text("import sys, numpy, torch, tqdm, decree.cli, models\n"
                     "print(decree.cli.__file__, models.__file__, numpy.__file__, torch.__file__, sys.argv[1:])\n")
    command = isolated_command(probe, ["--flag", "x"], {}, [], parent=os.getpid())
    done = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=120,
                          env={**ENV, "PYTHONPATH": str(tmp_path), "PYTHONSTARTUP": str(tmp_path / "torch.py")})
    assert done.returncode == 0, done.stderr
    decree_cli, models_init, numpy_init, torch_init, argv = done.stdout.split(" ", 4)
    assert Path(decree_cli) == ROOT / "decree" / "cli.py" and Path(models_init) == ROOT / "models" / "__init__.py"
    assert str(tmp_path) not in numpy_init + torch_init and argv.strip() == "['--flag', 'x']"
    assert markers(tmp_path) == []


def test_sweep_workers_import_nothing_from_the_current_or_output_folder(encoders, tmp_path):
    """The sweep itself runs isolated here, so that only its workers see the hostile PYTHONPATH entry."""
    plant_hostile_modules(tmp_path)
    manifest = write_manifest(encoders, "isolated.csv", [GOOD[0]])
    sweep = isolated_command(ROOT / "run_decree.py", sweep_command(encoders, manifest, tmp_path, 1, 2)[2:],
                             {"planted_arch": str(ROOT / "tests")}, [str(ROOT / "tests")], parent=os.getpid())
    done = subprocess.run(sweep, cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          env={**ENV, "PYTHONPATH": os.pathsep.join([str(tmp_path), "", str(ROOT / "tests")])})
    assert done.returncode == 0, done.stdout + done.stderr
    run_id = run_id_for(encoders / GOOD[0][0])
    assert (tmp_path / "trigger_norm" / f"{run_id}.json").is_file()  # the arch module still reached the worker
    assert markers(tmp_path) == []


def test_a_hanging_encoder_outlives_neither_a_killed_sweep_nor_its_timeout(encoders, tmp_path):
    torch.save(RandomFeatureEncoder(dim=64).state_dict(), tmp_path / "hangs.pth")
    manifest = write_manifest(tmp_path, "hang.csv", [("hangs.pth", "sleepy", "backdoor")])
    command = sweep_command(encoders, manifest, tmp_path / "out", workers=1, epochs=2, arch_module="sleepy_arch")
    pid_file = tmp_path / "worker.pid"
    env = {**ENV, "SLEEPY_PID_FILE": str(pid_file)}
    first = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not pid_file.is_file() and time.time() < deadline:
        time.sleep(0.05)
    worker = int(pid_file.read_text())
    assert running(worker) and worker in descendants(first.pid)
    first.kill()
    first.wait()
    assert wait_until_gone([worker]) == []

    pid_file.unlink()
    again = subprocess.run(command + ["--timeout", "15"], cwd=ROOT, env=env, capture_output=True, text=True,
                           timeout=300)
    assert again.returncode == 1, again.stdout + again.stderr
    assert "timeout after 15 s" in again.stdout  # run, not skipped: the dead sweep's claim was taken over
    summary = pd.read_csv(tmp_path / "out" / "trigger_norm" / "summary.csv")
    assert summary.status.tolist() == ["failed"] and summary.error.tolist() == ["timeout after 15 s"]
    assert not pid_file.is_file() or wait_until_gone([int(pid_file.read_text())]) == []
    assert not list((tmp_path / "out" / "trigger_norm" / "claims").glob("*.claim"))


def test_two_concurrent_sweeps_run_each_encoder_exactly_once(encoders, tmp_path):
    names = [f"planted_copy_{i}.pth" for i in range(6)]
    for name in names:
        (tmp_path / name).write_bytes((encoders / "planted_1.pth").read_bytes())
    manifest = write_manifest(tmp_path, "six.csv", [(name, "planted", "backdoor") for name in names])
    command = sweep_command(encoders, manifest, tmp_path / "out", workers=1, epochs=2) + [
        "--result_file", str(tmp_path / "results.csv")]
    sweeps = [subprocess.Popen(command, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True) for _ in range(2)]
    outputs = [sweep.communicate(timeout=300)[0] for sweep in sweeps]
    assert [sweep.returncode for sweep in sweeps] == [0, 0], outputs
    with open(tmp_path / "results.csv", newline="") as fh:
        results = [row[0] for row in csv.reader(fh) if row and row[0].endswith(".pth")]
    assert sorted(results) == sorted(str(tmp_path / name) for name in names)
    ran = [line for out in outputs for line in out.splitlines() if line.startswith(("TROJANED", "CLEAN"))]
    assert len(ran) == 6 and sum(line.startswith("SKIPPED") for out in outputs for line in out.splitlines()) == 6


def test_claims_are_exclusive_and_taken_over_only_from_a_gone_owner(tmp_path):
    claimed, mine = claim_encoder(tmp_path, "enc", timeout=100)
    assert claimed and json.loads(claim_path(tmp_path, "enc").read_text())["pid"] == os.getpid()
    assert claim_encoder(tmp_path, "enc", timeout=100) == (False, mine)  # a live owner keeps it

    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = {**mine, "pid": int(gone.stdout), "token": "dead"}
    claim_path(tmp_path, "enc").write_text(json.dumps(stale))
    claimed, taken = claim_encoder(tmp_path, "enc", timeout=100)
    assert claimed and taken["pid"] == os.getpid()

    elsewhere = {**mine, "host": "another-host", "token": "far"}  # its pid cannot be checked: only age counts
    claim_path(tmp_path, "enc").write_text(json.dumps(elsewhere))
    assert claim_encoder(tmp_path, "enc", timeout=100) == (False, elsewhere)
    claim_path(tmp_path, "enc").write_text(json.dumps({**elsewhere, "started": time.time() - 10_000}))
    assert claim_encoder(tmp_path, "enc", timeout=100)[0]

    release_claim(tmp_path, "enc", elsewhere)  # not ours any more: left alone
    assert claim_path(tmp_path, "enc").is_file()
    release_claim(tmp_path, "enc", json.loads(claim_path(tmp_path, "enc").read_text()))
    assert not claim_path(tmp_path, "enc").exists()


def test_a_worker_log_that_cannot_be_written_does_not_end_the_sweep(encoders, tmp_path):
    manifest = write_manifest(encoders, "log.csv", [GOOD[0]])
    blocked = tmp_path / "detect_log" / f"{run_id_for(encoders / GOOD[0][0])}.worker.log"
    blocked.mkdir(parents=True)  # a folder where the log should go: writing it fails
    done = subprocess.run(sweep_command(encoders, manifest, tmp_path, 1, 2), cwd=ROOT, env=ENV,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"could not write {blocked}" in done.stdout
    summary = pd.read_csv(tmp_path / "trigger_norm" / "summary.csv")
    assert summary.status.tolist() == ["done"]  # and the sweep went on to its report


@pytest.fixture
def full_disk(tmp_path):
    """A mounted tmpfs with no space left (needs root)."""
    folder = tmp_path / "full"
    folder.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16k", "tmpfs", str(folder)],
                                           capture_output=True).returncode:
        pytest.skip("a full disk is simulated with a tmpfs mount, which needs root")
    try:
        with pytest.raises(OSError), open(folder / "filler", "wb", buffering=0) as fh:
            while True:
                fh.write(bytes(4096))
        yield folder
    finally:
        subprocess.run(["umount", str(folder)], check=True)


def test_a_full_disk_fails_that_encoder_and_the_sweep_goes_on(encoders, tmp_path, full_disk):
    manifest = write_manifest(encoders, "disk.csv", [GOOD[0], GOOD[1]])
    out_dir = tmp_path / "out"
    trigger_dir = out_dir / "trigger_inv" / run_id_for(encoders / GOOD[0][0])
    trigger_dir.mkdir(parents=True)
    # this encoder's trigger images land on the full disk (mounted there: a symlink would be refused)
    subprocess.run(["mount", "--bind", str(full_disk), str(trigger_dir)], check=True)
    try:
        done = subprocess.run(sweep_command(encoders, manifest, out_dir, 1), cwd=ROOT, env=ENV, capture_output=True,
                              text=True, timeout=300)
    finally:
        subprocess.run(["umount", str(trigger_dir)], check=True)
    assert done.returncode == 1, done.stdout + done.stderr
    summary = pd.read_csv(out_dir / "trigger_norm" / "summary.csv").set_index("path")
    failed = summary.loc[str(encoders / GOOD[0][0])]
    assert failed.status == "failed" and "No space left on device" in failed.error
    assert summary.loc[str(encoders / GOOD[1][0])].status == "done"


def test_a_timeout_must_be_positive(capsys):
    with pytest.raises(SystemExit) as exit_:
        run_decree.main(["--timeout", "0", "--list"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.count("\n") == 1 and "--timeout 0" in err


PROBE = """import json, os, sys
import probe_state
print(json.dumps({"pid": os.getpid(), "ppid": os.getppid(), "sid": os.getsid(0), "seen": probe_state.touched,
                  "args": sys.argv[1:]}))
probe_state.touched = True  # a later run must not see what this one changed
action = sys.argv[1]
if action == "exit":
    sys.exit(int(sys.argv[2]))
if action == "raise":
    raise RuntimeError("boom")
if action == "hang":
    import time
    time.sleep(600)
"""


@pytest.fixture
def probe_server(tmp_path):
    """A worker server for a probe script that preloads a module it then modifies."""
    (tmp_path / "lib").mkdir()
    (tmp_path / "lib" / "probe_state.py").write_text("print('imported')  # a stray print at import\ntouched = False\n")
    (tmp_path / "probe.py").write_text(PROBE)
    server = WorkerServer(dict(os.environ), ({"probe_state": str(tmp_path / "lib")}, []), script=tmp_path / "probe.py",
                          preload=["probe_state"])
    yield server
    server.close()


def run_probe(server, tmp_path, *args, timeout=60):
    output = tmp_path / f"out_{'_'.join(args)}.log"
    pid = server.start(list(args), output)
    returncode = server.wait(timeout)
    return pid, returncode, output.read_text()


def test_every_run_of_a_worker_server_is_a_fresh_process_of_its_own(probe_server, tmp_path):
    runs = [run_probe(probe_server, tmp_path, "ok", str(i)) for i in range(3)]
    probes = [json.loads(output.splitlines()[0]) for _, _, output in runs]
    assert [code for _, code, _ in runs] == [0, 0, 0]
    assert len({p["pid"] for p in probes}) == 3 and all(p["pid"] == pid for p, (pid, _, _) in zip(probes, runs))
    assert {p["ppid"] for p in probes} == {probe_server.proc.pid}  # forked from the one server, started once
    assert all(p["sid"] == p["pid"] for p in probes)  # its own session: a timeout kills it and what it started
    assert [p["seen"] for p in probes] == [False, False, False]  # nothing one run changes reaches the next
    assert [p["args"] for p in probes] == [["ok", "0"], ["ok", "1"], ["ok", "2"]]


def test_a_worker_server_reports_exit_status_errors_and_kills(probe_server, tmp_path):
    assert run_probe(probe_server, tmp_path, "exit", "3")[1] == 3
    _, code, output = run_probe(probe_server, tmp_path, "raise")
    assert code == 1 and "RuntimeError: boom" in output
    pid = probe_server.start(["hang"], tmp_path / "hang.log")
    with pytest.raises(queue.Empty):
        probe_server.wait(timeout=1)
    os.killpg(pid, signal.SIGKILL)
    assert probe_server.wait(timeout=30) == -signal.SIGKILL
    assert run_probe(probe_server, tmp_path, "exit", "0")[1] == 0  # the server goes on serving


def test_a_dead_worker_server_is_reported_not_waited_for(probe_server, tmp_path):
    pid = probe_server.start(["hang"], tmp_path / "hang.log")
    os.killpg(probe_server.proc.pid, signal.SIGKILL)
    with pytest.raises(WorkerDied):
        probe_server.wait(timeout=30)
    assert wait_until_gone([pid]) == []  # its running child dies with it


def test_a_run_whose_output_cannot_be_opened_fails_alone(probe_server, tmp_path):
    probe_server.start(["ok"], tmp_path / "no_such_folder" / "out.log")
    assert probe_server.wait(timeout=30) == 1
    assert run_probe(probe_server, tmp_path, "exit", "0")[1] == 0  # the server still answers, once per request


def test_cpu_sweeps_of_small_encoders_run_one_worker_per_core(monkeypatch):
    monkeypatch.setattr(sweep_module, "usable_cores", lambda: 4)
    small = [Encoder("a.pth", "cifar10", None, "clean"), Encoder("b.pth", "stl10", None, "clean")]
    assert cpu_workers(small) == 4 and cpu_workers(small, threads=2) == 2 and cpu_workers(small, threads=8) == 1
    # one 224-px encoder among them: one worker with every core (memory, and its convolutions use the threads)
    assert cpu_workers(small + [Encoder("c.pt", "CLIP", "RN50", "clean")]) == 1
    assert cpu_workers([]) == 1
    assert worker_devices("cpu", cpu_default=4) == ["cpu"] * 4
    assert worker_devices("cpu", workers=2, cpu_default=4) == ["cpu"] * 2  # --workers wins


def test_the_sweep_process_leaves_torchvision_to_its_workers():
    # importing torchvision imports torch._dynamo (about a second), paid before the first worker starts;
    # only the worker servers, which build the encoders, import it (once each)
    code = "import sys, run_decree; print('torchvision' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120)
    assert done.stdout.strip() == "False", done.stderr
    assert "torchvision.models" in sweep_module.MAIN_PY_IMPORTS


def test_an_encoder_process_imports_nothing_heavy_that_its_worker_server_could_have_preloaded():
    # torch.optim.Adam imports torch._dynamo on first use (seconds): preloaded, an encoder's run pays nothing
    code = ("import importlib, sys; from sweeps.workers import MAIN_PY_IMPORTS\n"
            "for name in MAIN_PY_IMPORTS: importlib.import_module(name)\n"
            "before = set(sys.modules); import torch\n"
            "torch.optim.Adam([torch.zeros(2, requires_grad=True)]).step()\n"
            "print(sorted(m for m in set(sys.modules) - before if m.startswith('torch')))")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "[]", done.stdout + done.stderr
