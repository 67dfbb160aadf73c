"""Whole sweeps over a population manifest, timed end to end as users run them:

    paper_code  the paper's run_decree.py: one fresh interpreter per encoder, one after the other, each running
                the paper's data path (experiments.paper_run) with torch's default threads and OpenMP wait policy
    <preset>    this project's run_decree.py --preset <preset> with its defaults (one worker per core for 32-px
                encoders, encoder processes forked from warm worker servers, target recovery and report included)

Per sweep: wall seconds from the first process start to the last result, per encoder the verdict against the
paper's, and the detection rates and per-family AUROC (attacks that did not take, as read from the population.json
beside the manifest, count in neither). Every sweep starts in an empty folder (a resumed sweep would skip
finished encoders).
"""
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from sweeps.discovery import read_manifest
from sweeps.report import collect_rows
from .benchmark_population import attack_success, detection_rates, encoder_took, family_auroc

ROOT = Path(__file__).resolve().parents[1]
REFERENCE = "paper_code"  # the reference sweep's name (ours are named by their preset, `paper` included)


def paper_env() -> dict:
    """The environment the paper's code ran in: no thread count or OpenMP wait policy of ours."""
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS")}
    env["PYTHONPATH"] = str(ROOT)
    return env


def setting_flags(settings: dict) -> list[str]:
    """The flags both sweeps' scripts share (main.py's names): lr, seed, epochs, threshold, shadow set."""
    flags = ["--lr", str(settings["lr"]), "--seed", str(settings["seed"]), "--epochs", str(settings["max_epochs"]),
             "--pl1_threshold", str(settings["threshold"])]
    flags += ["--shadow_data", str(settings["shadow_data"])] if settings["shadow_data"] else []
    return flags + (["--shadow_size", str(settings["shadow_size"])] if settings["shadow_size"] else [])


def paper_sweep(encoders, settings: dict, folder: Path, log=print) -> dict:
    """The paper's run_decree.py over `encoders`: one `python -m experiments.paper_run` after the other."""
    runs = {}
    start = time.perf_counter()
    for i, enc in enumerate(encoders):
        path, record = str(Path(enc.path).resolve()), folder / f"{i:04d}.json"
        command = [sys.executable, "-m", "experiments.paper_run", path, enc.usage_info, "--out", str(record),
                   *setting_flags(settings), *(["--arch", enc.arch] if enc.arch else [])]
        subprocess.run(command, env=paper_env(), cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
        runs[path] = json.loads(record.read_text())
        log(f"  paper {i + 1}/{len(encoders)}: {enc.path} {runs[path]['verdict']}")
    return {"wall_s": time.perf_counter() - start, "runs": runs}


def project_sweep(manifest, preset: str, settings: dict, folder: Path, log=print) -> dict:
    """run_decree.py --preset `preset` over the manifest with the sweep's defaults; its stdout goes to sweep.log."""
    command = [sys.executable, str(ROOT / "run_decree.py"), "--manifest", str(manifest), "--preset", preset,
               "--out_dir", str(folder), "--quiet", *setting_flags(settings)]
    start = time.perf_counter()
    with open(folder / "sweep.log", "w") as out:
        subprocess.run(command, cwd=ROOT, check=True, stdout=out, stderr=subprocess.STDOUT)
    wall = time.perf_counter() - start
    runs = {str(Path(r["path"]).resolve()): {k: r[k] for k in ("pl1", "verdict", "epochs", "seconds")}
            for r in collect_rows(folder, settings["threshold"]) if r["status"] == "done"}
    plan = next((line for line in (folder / "sweep.log").read_text().splitlines() if "worker(s)" in line), "")
    log(f"  {preset}: {wall:.1f} s; {plan}")
    return {"wall_s": wall, "plan": plan, "runs": runs}


def run_sweeps(manifest, presets, settings: dict, scratch, log=print) -> dict:
    """The paper's sweep, then ours with each preset; returns per sweep: wall seconds, ratio, same verdicts."""
    encoders = read_manifest(manifest)
    sweeps = {}
    for name in [REFERENCE, *presets]:
        folder = Path(scratch) / name
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        log(f"sweep {name} over {len(encoders)} encoders")
        sweeps[name] = (paper_sweep(encoders, settings, folder, log) if name == REFERENCE
                        else project_sweep(manifest, name, settings, folder, log))
    paper, rows = sweeps[REFERENCE], population_rows(manifest, encoders)
    for sweep in sweeps.values():
        sweep["speedup"] = paper["wall_s"] / sweep["wall_s"]
        sweep["same_verdict"] = sum(sweep["runs"].get(path, {}).get("verdict") == run["verdict"]
                                    for path, run in paper["runs"].items())
        sweep["encoders"] = len(paper["runs"])
        pl1s = [sweep["runs"].get(row["path"], {}).get("pl1") for row in rows]
        sweep.update(detection_rates(rows, pl1s, settings["threshold"]), auroc=family_auroc(rows, pl1s))
    return {"settings": {**settings, "manifest": str(manifest), "presets": list(presets)}, "sweeps": sweeps}


def population_rows(manifest, encoders) -> list[dict]:
    """Per encoder: resolved path, label, family and whether its attack took (None for clean encoders)."""
    took = attack_success(manifest)
    return [{"path": str(Path(enc.path).resolve()), "label": enc.label, "family": enc.family or enc.label,
             "took": encoder_took(took, enc)} for enc in encoders]


def sweeps_table(doc: dict) -> str:
    """One line per sweep: wall seconds, ratio to the paper's, verdicts equal to the paper's, detections, the
    largest per-family AUROC difference from the paper's sweep; then each sweep's per-family AUROC."""
    paper = doc["sweeps"][REFERENCE]
    lines = [f"{'sweep':<12} {'wall s':>9} {'x paper':>8} {'same verdict':>13} {'detected':>9} {'clean fl.':>9} "
             f"{'max |dAUROC|':>12}  how it ran"]
    for name, s in doc["sweeps"].items():
        how = ("the paper's way: a fresh interpreter per encoder, sequential, torch defaults" if name == REFERENCE
               else f"run_decree.py --preset {name}: {s.get('plan', '')}")
        change = max((abs(a - paper["auroc"][f]) for f, a in s["auroc"].items()), default=0.0)
        lines.append(f"{name:<12} {s['wall_s']:>9.1f} {s['speedup']:>8.2f} {s['same_verdict']:>6}/{s['encoders']:<6} "
                     f"{s['detected']:>5}/{s['backdoors']:<3} {s['false_positives']:>5}/{s['cleans']:<3} "
                     f"{change:>12.3f}  {how}")
    lines += [f"AUROC {name}: " + ", ".join(f"{f} {a:.3f}" for f, a in s["auroc"].items())
              for name, s in doc["sweeps"].items()]
    return "\n".join(lines)
