"""The paper's data path reaches the project's L1 step for step; scripts/benchmark.py runs (no timing asserted)."""
import json
import runpy
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import CIFAR_MEAN, CIFAR_STD, PlantedBackdoorEncoder, RandomFeatureEncoder, smooth_images
from experiments.benchmark import machine_peak, parse_variant, step_flops
from models import get_encoder
from decree.inversion import invert_trigger
from decree.settings import preset
from experiments.paper_path import paper_invert_trigger

BENCHMARK = Path(__file__).resolve().parents[1] / "scripts" / "benchmark.py"


@pytest.fixture(autouse=True)
def one_thread():
    """One torch thread: tiny ops gain nothing from two, and on a loaded machine two threads wait on each other;
    restored afterwards, since the benchmark's --threads sets it for the whole process."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


PAPER_RESNET18 = ("cifar10", "resnet18")  # the draws of the paper's CIFAR10 ResNet18, whatever encoder runs


def both_paths(encoder, images, cfg, paper_encoder=PAPER_RESNET18):
    project = invert_trigger(encoder, images, CIFAR_MEAN, CIFAR_STD, cfg, progress=False, paper_encoder=paper_encoder)
    paper = paper_invert_trigger(encoder, images, CIFAR_MEAN, CIFAR_STD, cfg, paper_encoder=paper_encoder)
    return project, paper


def assert_same_run(project, paper):
    """Bit for bit: every epoch's means, the early stop, the trigger (the paper's order of operations kept)."""
    assert paper.epochs == project.epochs and paper.found == project.found
    for key in ("l1", "cos", "loss", "lambda", "lr", "best_l1"):
        assert [h[key] for h in paper.history] == [h[key] for h in project.history], key
    assert paper.l1 == project.l1
    if project.found:
        assert np.array_equal(paper.mask, project.mask) and np.array_equal(paper.pattern, project.pattern)


def test_paper_path_finds_the_same_trigger_and_stops_at_the_same_epoch(shadow_images):
    # 50 images at batch 32: a full and a partial batch per epoch, as the paper's CIFAR10 shadow set
    project, paper = both_paths(PlantedBackdoorEncoder(), shadow_images[:50],
                                preset("cifar10", lr=0.5, batch_size=32, max_epochs=80, early_stop_patience=3))
    assert project.trojaned and project.epochs < 80  # the run found the trigger and stopped early
    assert_same_run(project, paper)


def test_paper_path_matches_with_orc_init_and_a_skipped_batch_of_one(shadow_images):
    project, paper = both_paths(RandomFeatureEncoder(), shadow_images[:33],
                                preset("cifar10", lr=0.5, batch_size=32, max_epochs=4, mask_init="orc"))
    assert_same_run(project, paper)


def test_paper_settings_round_as_the_papers_code_on_a_resnet_over_a_long_run(shadow_images):
    """A real (narrow) ResNet18 over many steps: tiny rounding differences grow chaotically along such a run and
    decide when the early stop fires, so only the paper's exact order of operations gives the paper's verdicts."""
    torch.manual_seed(0)
    encoder = get_encoder("cifar10", "resnet18_w4")
    project, paper = both_paths(encoder, shadow_images[:64], preset("cifar10", lr=0.5, batch_size=32, max_epochs=30))
    assert project.epochs >= 15  # long enough for any rounding difference to show
    assert_same_run(project, paper)


def test_paper_path_refuses_the_projects_own_options(shadow_images):
    with pytest.raises(ValueError, match="float64"):
        paper_invert_trigger(RandomFeatureEncoder(), shadow_images[:4], CIFAR_MEAN, CIFAR_STD,
                             preset("cifar10", param_dtype="float32"), paper_encoder=PAPER_RESNET18)


def test_variants_parse_and_cuda_only_ones_fail_on_cpu():
    cpu = torch.device("cpu")
    assert parse_variant("project", cpu) == frozenset()
    assert parse_variant("float32+channels_last", cpu) == {"float32", "channels_last"}
    with pytest.raises(ValueError, match="unknown option"):
        parse_variant("fp16", cpu)
    with pytest.raises(ValueError, match="needs --device cuda"):
        parse_variant("amp+float32", cpu)


def run_script(argv):
    return runpy.run_path(str(BENCHMARK), run_name="benchmark")["main"](argv)


def test_benchmark_runs_at_minimal_size(tmp_path, capsys):
    out = tmp_path / "bench.json"
    run_script(["--device", "cpu", "--encoders", "tiny", "--batch_sizes", "4", "--shadow_size", "6", "--steps", "2",
                "--epochs", "2", "--repeats", "2", "--threads", "1", "--json", str(out)])
    results = json.loads(out.read_text())
    assert {"machine", "settings", "cases"} <= set(results) and results["machine"]["torch_threads"] == 1
    (case,) = results["cases"]
    assert (case["encoder"], case["batch_size"], case["shadow_size"]) == ("tiny", 4, 6)
    rows = {row["name"]: row for row in case["contenders"]}
    assert list(rows) == ["paper", "project", "float32", "channels_last", "fold_batchnorm+channels_last"]
    for row in rows.values():
        assert row["error"] is None and len(row["step_s"]) == len(row["epochs_s"]) == 2
        assert row["step_ratio"] > 0 and row["epochs_ratio"] > 0
    assert rows["paper"]["step_ratio"] == 1.0 and rows["paper"]["l1_abs_diff"] == 0.0
    assert rows["project"]["same_l1"]  # same float64 math on the same layout; other variants may round apart
    table = capsys.readouterr().out
    assert "x wall" in table and "channels_last" in table and str(out) in table


def test_benchmark_rejects_a_cuda_only_variant_on_cpu_before_timing(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        run_script(["--device", "cpu", "--variants", "project", "amp", "--json", str(tmp_path / "b.json")])
    assert exit_info.value.code == 2
    assert "needs --device cuda" in capsys.readouterr().err and not (tmp_path / "b.json").exists()


def test_step_flops_count_forward_and_the_input_gradient_only():
    conv = torch.nn.Conv2d(3, 4, 3, padding=1, bias=False)
    forward = 2 * (2 * 8 * 8) * 4 * (3 * 3 * 3)  # 2 FLOP per multiply-add, per output pixel and channel
    assert step_flops(conv, 2, 8, torch.device("cpu")) == 2 * forward  # frozen weights: no weight gradient


def test_cpu_peak_is_derived_from_cores_clock_and_vector_width():
    peak = machine_peak(torch.device("cpu"), threads=1)
    assert peak["flops"] > 0 and "1 cores x" in peak["derivation"] and "FMA" in peak["derivation"]


def test_benchmark_reports_flops_and_restart_cost(tmp_path, capsys):
    out = tmp_path / "bench.json"
    run_script(["--device", "cpu", "--encoders", "tiny", "--batch_sizes", "4", "--shadow_size", "4", "--steps", "2",
                "--epochs", "1", "--repeats", "1", "--threads", "1", "--variants", "project", "--restart_cost", "1",
                "2", "--json", str(out)])
    results = json.loads(out.read_text())
    (case,) = results["cases"]
    assert case["step_flops"] > 0 and all(row["achieved_flops"] > 0 for row in case["contenders"])
    (cost,) = results["restart_cost"]
    assert [row["restarts"] for row in cost["rows"]] == [1, 2] and cost["rows"][0]["vs_k_single_runs"] == 1.0
    printed = capsys.readouterr().out
    assert "GFLOP/s" in printed and "peak:" in printed and "vs K runs" in printed


def write_population(tmp_path, members) -> Path:
    """A manifest of tiny random encoders (name, label, took) and the population.json beside it."""
    torch.manual_seed(0)
    lines, encoders = ["path,usage_info,arch,label,family"], []
    for name, label, took in members:
        path = tmp_path / name / "model_1.pth"
        path.parent.mkdir()
        torch.save({"state_dict": get_encoder("cifar10", "resnet18_w8").state_dict()}, path)
        lines.append(f"{name}/model_1.pth,cifar10,resnet18_w8,{label},{name}")
        encoders.append({"path": f"{name}/model_1.pth", "label": label, **({} if took is None else {"took": took})})
    (tmp_path / "manifest.csv").write_text("\n".join(lines) + "\n")
    (tmp_path / "population.json").write_text(json.dumps({"encoders": encoders}))
    np.savez(tmp_path / "shadow.npz", x=smooth_images(6, 32, seed=4), y=np.zeros(6, np.int64))
    return tmp_path / "manifest.csv"


def population_args(tmp_path, *extra):
    return ["--population", str(tmp_path / "manifest.csv"), "--shadow_data", str(tmp_path / "shadow.npz"),
            "--shadow_images", "6", "--threads", "1", "--device", "cpu", *extra]


def test_population_mode_compares_verdicts_and_times_per_encoder(tmp_path, capsys):
    write_population(tmp_path, [("clean_encoder", "clean", None), ("bad_encoder", "backdoor", True)])
    out = tmp_path / "population.json.out"
    run_script(population_args(tmp_path, "--max_epochs", "3", "--restarts", "2", "--json", str(out)))
    doc = json.loads(out.read_text())
    assert doc["settings"]["contenders"] == ["paper", "default", "fast", "triage", "restarts2"]
    assert len(doc["rows"]) == 2 and all(r["shadow_images"] == 6 for r in doc["rows"])
    for row in doc["rows"]:
        assert row["runs"]["default"]["same_verdict"]  # the same math as the paper's path
        assert len(row["runs"]["restarts2"]["restart_pl1"]) == 2
        assert len(row["runs"]["restarts2"]["restart_epochs"]) == 2
    assert doc["summary"]["paper"]["speedup"] == 1.0 and doc["summary"]["default"]["encoders"] == 2
    assert [r["restarts"] for r in doc["restart_rates"]] == [1, 2]
    overheads = doc["overheads"]
    assert overheads["process_start_s"] > 0 and overheads["forked_start_s"] > 0 and "peak" in doc["machine"]
    fresh = 2 * (overheads["process_start_s"] + overheads["imports_s"])  # the paper's: an interpreter per encoder
    assert doc["sweep_totals"]["paper"] > doc["summary"]["paper"]["total_s"] + fresh
    printed = capsys.readouterr().out
    assert "x paper" in printed and "shorter epoch budget" in printed
    assert not Path(f"{out}.partial").exists()  # the finished run leaves only its result


def test_population_rates_leave_out_attacks_that_did_not_take(tmp_path, capsys):
    """As in the detection benchmark's report: an attack that did not take is no backdoor to detect."""
    write_population(tmp_path, [("clean_encoder", "clean", None), ("bad_encoder", "backdoor", True),
                                ("untaken_encoder", "backdoor", False)])
    out = tmp_path / "pop.json"
    run_script(population_args(tmp_path, "--max_epochs", "1", "--contenders", "default", "--json", str(out)))
    doc = json.loads(out.read_text())
    took = {Path(r["path"]).parent.name: r["took"] for r in doc["rows"]}
    assert took == {"clean_encoder": None, "bad_encoder": True, "untaken_encoder": False}
    summary = doc["summary"]["default"]
    assert (summary["backdoors"], summary["cleans"], summary["untaken"]) == (1, 1, 1)
    assert set(summary["auroc"]) == {"bad_encoder"}
    assert "1 took, 1 did not" in capsys.readouterr().err


def test_epoch_budgets_are_read_off_the_recorded_runs():
    """A budget of E epochs reports the best PL1 and seconds after epoch E, or the run's end if sooner."""
    from experiments.benchmark_population import budget_rates
    def run(pl1s, verdict):
        return {"best_pl1_by_epoch": pl1s, "seconds_by_epoch": [1.0 * (i + 1) for i in range(len(pl1s))],
                "verdict": verdict}
    rows = [{"label": "backdoor", "family": "patch", "took": True,
             "runs": {"paper": run([None, 0.3, 0.05], "trojaned"), "triage": run([None, 0.3, 0.05], "trojaned")}},
            {"label": "clean", "family": "clean", "took": None,
             "runs": {"paper": run([0.4, 0.2], "clean"), "triage": run([0.4, 0.2], "clean")}}]
    two, three = budget_rates(rows, "triage", [2, 3], 0.1, "paper")
    assert (two["same_verdict"], two["detected"], two["seconds"]) == (1, 0, 4.0)  # the trojaned run not yet below
    assert (three["same_verdict"], three["detected"], three["seconds"]) == (2, 1, 5.0)  # the clean run ended at 2


def test_interrupted_population_run_goes_on_where_it_stopped(tmp_path, capsys, monkeypatch):
    import experiments.benchmark_population as population
    write_population(tmp_path, [("a_encoder", "clean", None), ("b_encoder", "backdoor", True)])
    out = tmp_path / "pop.json"
    args = population_args(tmp_path, "--max_epochs", "1", "--contenders", "default", "--json", str(out))
    real = population.bench_encoder

    def dies_on_second(enc, index, *rest, **kw):
        if index == 1:
            raise KeyboardInterrupt
        return real(enc, index, *rest, **kw)
    monkeypatch.setattr(population, "bench_encoder", dies_on_second)
    with pytest.raises(SystemExit) as stopped:
        run_script(args)
    assert stopped.value.code == 130 and "goes on from there" in capsys.readouterr().err
    assert not out.exists() and len(json.loads(Path(f"{out}.partial").read_text())["rows"]) == 1
    ran = []
    monkeypatch.setattr(population, "bench_encoder",
                        lambda enc, *rest, **kw: ran.append(enc.path) or real(enc, *rest, **kw))
    run_script(args)
    assert [Path(p).parent.name for p in ran] == ["b_encoder"]  # the first encoder's row was reused
    assert len(json.loads(out.read_text())["rows"]) == 2 and "reusing 1 finished" in capsys.readouterr().err


def test_exit_at_verdict_is_read_off_at_the_first_epoch_below_the_threshold():
    from experiments.benchmark_population import exit_at_verdict
    rows = [{"runs": {"paper": {"best_pl1_by_epoch": [None, 0.3, 0.05, 0.04], "seconds_by_epoch": [1, 2, 3, 4],
                                "seconds": 4.5}}},
            {"runs": {"paper": {"best_pl1_by_epoch": [0.4, 0.2], "seconds_by_epoch": [1, 2], "seconds": 2.5}}}]
    assert exit_at_verdict(rows, "paper", 0.1)["seconds"] == 3 + 2.5  # a clean run keeps its full time


def test_sweep_mode_times_the_papers_sweep_against_ours_with_the_same_verdicts(tmp_path, capsys):
    write_population(tmp_path, [("clean_encoder", "clean", None), ("bad_encoder", "backdoor", True)])
    out = tmp_path / "sweeps.json"
    run_script(population_args(tmp_path, "--max_epochs", "2", "--sweeps", "triage", "paper", "--json", str(out)))
    doc = json.loads(out.read_text())
    assert set(doc["sweeps"]) == {"paper_code", "triage", "paper"}  # our --preset paper is not the reference
    paper, triage = doc["sweeps"]["paper_code"], doc["sweeps"]["triage"]
    assert len(paper["runs"]) == len(triage["runs"]) == len(doc["sweeps"]["paper"]["runs"]) == 2
    assert paper["speedup"] == 1.0
    for run in paper["runs"].values():  # the paper's code ran with torch's defaults, not our thread policy
        assert run["omp_wait_policy"] is None and run["epochs"] <= 2
    assert triage["same_verdict"] == 2 and triage["wall_s"] > 0 and "worker(s)" in triage["plan"]
    assert (tmp_path / "sweeps.json.sweeps" / "triage" / "trigger_norm").is_dir()  # our sweep's own outputs
    for sweep in (paper, triage):  # rates and per-family AUROC from each sweep's own PL1s
        assert (sweep["backdoors"], sweep["cleans"]) == (1, 1) and len(sweep["auroc"]) == 1
        assert 0 <= next(iter(sweep["auroc"].values())) <= 1
    printed = capsys.readouterr().out
    assert "x paper" in printed and "fresh interpreter per encoder" in printed and "--preset triage" in printed
    assert "max |dAUROC|" in printed and "AUROC triage:" in printed
