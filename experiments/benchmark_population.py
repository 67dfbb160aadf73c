"""Time to verdict over a population of encoders: the paper's settings against the project's presets.

For each encoder of a manifest (sweeps.discovery's CSV: path, usage_info, arch, label[, family]) the encoder and its
shadow set are loaded once, then the contenders run in turn, their order rotated from encoder to encoder so
drifting machine load hits all of them alike:
    paper    the paper's settings as its code ran them: experiments.paper_path (DataLoader, per-image normalise)
    default  this project's main.py/sweep defaults (--preset paper): the same math on the vectorised path
    fast     --preset fast
    triage   --preset triage (fast + exact early exit)
    fast_amp --preset fast --amp (bf16 autocast where the hardware has it; not run unless asked for)
Per encoder: wall seconds of each inversion, its PL1, epochs and verdict, and whether the verdict is the first
contender's (the reference: paper by default); per contender: total time, ratio to the reference, verdict agreement, detection and false-positive rates, AUROC per
family (each attack family against all clean encoders). Overheads outside the inversion are measured too:
process start and imports (a fresh interpreter, once), checkpoint load and shadow preparation (per encoder).

`restarts=K` adds a contender that runs K restarts together (default preset); since restart k of a K-run is the
run a K'-run (K' > k) would also make, its per-restart PL1s give the verdicts of every K' <= K from one run.

Attacks that did not take are not backdoors in TPR and AUROC (the rule of sweeps.metrics): when a
population.json of experiments.bench_detection lies beside the manifest, its per-encoder `took` is read from it.
Every run records its best PL1 and wall seconds after each epoch, so the verdict and time of any shorter epoch
budget are read off the same runs (`budget_rates`): a shorter run's best PL1 is the longer run's at that epoch.
"""
import copy
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from common import io as atomic

from decree.inversion import invert_trigger
from decree.settings import preset
from sweeps.discovery import read_manifest
from sweeps.metrics import BACKDOOR, CLEAN, auroc, by_truth, flagged, pl1_or_inf, rates, row_truth
from sweeps.workers import WorkerServer, worker_imports
from .paper_path import paper_invert_trigger
from .paper_run import load_with_shadow

CONTENDERS = ("paper", "default", "fast", "triage", "fast_amp")
DEFAULT_CONTENDERS = CONTENDERS[:4]
SPEED_OF = {"paper": "paper", "default": "paper", "fast": "fast", "triage": "triage", "fast_amp": "fast"}
OVERRIDES_OF = {"fast_amp": {"amp": True}}  # --preset fast --amp: bf16 autocast where the hardware has it


def startup_seconds(python: str = sys.executable) -> dict:
    """Wall seconds of a bare interpreter and of one that imports what main.py imports (what a sweep pays once
    per worker), and of an encoder's process forked from a sweep's warm worker server (once per encoder)."""
    def timed(code):
        start = time.perf_counter()
        subprocess.run([python, "-c", code], check=True, capture_output=True)
        return time.perf_counter() - start
    bare = timed("pass")
    return {"process_start_s": bare, "imports_s": timed("import decree.detect, decree.cli, models") - bare,
            "forked_start_s": forked_start_seconds()}


def forked_start_seconds() -> float:
    """Wall seconds of one run of an empty script forked from a worker server that has imported main.py's
    modules (sweeps.workers.WorkerServer), from the request to its exit status."""
    with tempfile.TemporaryDirectory(prefix="decree-bench-") as scratch:
        script = Path(scratch) / "empty.py"
        script.write_text("")
        server = WorkerServer(dict(os.environ), worker_imports(scratch), script=script)
        try:
            server.start([], Path(scratch) / "first.log")
            server.wait()  # the first answer waits for the server's imports
            start = time.perf_counter()
            server.start([], Path(scratch) / "second.log")
            server.wait()
            return time.perf_counter() - start
        finally:
            server.close()


def run_contender(name: str, encoder, shadow, spec, settings: dict, device, restarts: int = 1):
    """One inversion of `name` on a fresh copy of the encoder (channels_last converts weights in place)."""
    cfg = preset(spec.usage_info, SPEED_OF.get(name, "paper"), restarts=restarts, **settings,
                 **OVERRIDES_OF.get(name, {}))
    model = copy.deepcopy(encoder)
    start = time.perf_counter()
    draws = (spec.usage_info, spec.arch)
    if name == "paper":
        result = paper_invert_trigger(model, shadow, spec.mean, spec.std, cfg, device=device, paper_encoder=draws)
    else:
        result = invert_trigger(model, shadow, spec.mean, spec.std, cfg, device=device, progress=False,
                                paper_encoder=draws)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return result, time.perf_counter() - start


def attack_success(manifest) -> dict:
    """{resolved encoder path: took (bool)} from the population.json beside `manifest`; {} when there is none."""
    record = Path(manifest).parent / "population.json"
    if not record.is_file():
        return {}
    encoders = json.loads(record.read_text()).get("encoders", [])
    return {str((record.parent / e["path"]).resolve()): bool(e["took"]) for e in encoders if "took" in e}


def bench_encoder(enc, index: int, contenders: list[str], device, settings: dict, shadow_data, shadow_size,
                  restarts: int, log=print, took: bool | None = None) -> dict:
    """Every contender on one encoder; returns its record."""
    encoder, spec, shadow, load_s, shadow_s = load_with_shadow(enc.path, enc.usage_info, enc.arch, shadow_data,
                                                               shadow_size, settings["seed"], device)
    order = contenders[index % len(contenders):] + contenders[:index % len(contenders)]
    runs = {}
    for name in order:
        k = restarts if name.startswith("restarts") else 1
        result, seconds = run_contender(name, encoder, shadow, spec, settings, device, k)
        runs[name] = {"seconds": seconds, "pl1": result.pl1 if result.found else None, "epochs": result.epochs,
                      "verdict": result.verdict, "stop_reason": result.stop_reason,
                      "restart_pl1": [r["pl1"] for r in result.restarts],
                      "restart_epochs": [r["epochs"] for r in result.restarts],
                      # best PL1 and wall seconds after each epoch: what any shorter budget would have reported
                      "best_pl1_by_epoch": [h["best_l1"] / shadow[0].size if h["best_l1"] != np.inf else None
                                            for h in result.history],
                      "seconds_by_epoch": [h["seconds"] for h in result.history]}
    paper_verdict = runs[contenders[0]]["verdict"]
    for run in runs.values():
        run["same_verdict"] = run["verdict"] == paper_verdict
    log(f"  {enc.path}: " + ", ".join(f"{n} {r['seconds']:.1f}s {r['verdict']}" for n, r in runs.items()))
    return {"path": enc.path, "label": enc.label, "family": getattr(enc, "family", "") or enc.label, "took": took,
            "checkpoint_load_s": load_s, "shadow_s": shadow_s, "shadow_images": int(len(shadow)),
            "runs": {name: runs[name] for name in contenders}}


def encoder_took(took: dict, enc) -> bool | None:
    """Whether a backdoored encoder's attack took, from attack_success's dict; None for clean or unmeasured ones."""
    return took.get(str(Path(enc.path).resolve())) if enc.label == "backdoor" else None


def detection_rates(rows: list[dict], pl1s: list, threshold: float) -> dict:
    """TPR and FPR at `threshold` (sweeps.metrics: attacks that did not take count in neither); plus how many
    encoders whose attack did not take were flagged."""
    found = rates(*by_truth(pl1s, [row_truth(r) for r in rows]), threshold)
    untaken = [flagged(p, threshold) for p, r in zip(pl1s, rows) if r["label"] == BACKDOOR and row_truth(r) is None]
    return {"tpr": found["tpr"], "fpr": found["fpr"], "detected": found["tp"], "backdoors": found["backdoor"],
            "false_positives": found["fp"], "cleans": found["clean"],
            "untaken_flagged": sum(untaken), "untaken": len(untaken)}


def family_auroc(rows: list[dict], pl1s: list) -> dict:
    """AUROC of each family's backdoors (as sweeps.metrics counts them) against every clean encoder."""
    clean = [p for p, r in zip(pl1s, rows) if row_truth(r) == CLEAN]
    families = sorted({r["family"] for r in rows if row_truth(r) == BACKDOOR})
    if not clean:
        return {}
    return {f: auroc([p for p, r in zip(pl1s, rows) if r["family"] == f and row_truth(r) == BACKDOOR], clean)
            for f in families}


def summarise(rows: list[dict], contenders: list[str], threshold: float) -> dict:
    """Per contender: total seconds, ratio to the first (paper), verdict agreement, rates, AUROC per family."""
    base = sum(r["runs"][contenders[0]]["seconds"] for r in rows)
    out = {}
    for name in contenders:
        total = sum(r["runs"][name]["seconds"] for r in rows)
        pl1s = [r["runs"][name]["pl1"] for r in rows]
        out[name] = {"total_s": total, "speedup": base / total,
                     "same_verdict": sum(r["runs"][name]["same_verdict"] for r in rows), "encoders": len(rows),
                     **detection_rates(rows, pl1s, threshold), "auroc": family_auroc(rows, pl1s)}
    return out


def restart_rates(rows: list[dict], name: str, ks: list[int], threshold: float) -> list[dict]:
    """From one K-restart run per encoder: TPR/FPR when only the first K' restarts had run, for each K' in ks.

    `seconds_est`: the K-run's seconds times the share of its restart-epochs that the first K' restarts ran (the
    cost of a stacked restart-epoch is about constant on a CPU, where a step costs what it computes)."""
    out = []
    for k in ks:
        pl1s = [min((pl1_or_inf(p) for p in r["runs"][name]["restart_pl1"][:k]), default=np.inf) for r in rows]
        seconds = sum(r["runs"][name]["seconds"] * sum(r["runs"][name]["restart_epochs"][:k])
                      / max(sum(r["runs"][name]["restart_epochs"]), 1) for r in rows)
        out.append({"restarts": k, "seconds_est": seconds, **detection_rates(rows, pl1s, threshold)})
    return out


BUDGETS = (2, 3, 4, 5, 6, 8, 10, 15, 20, 30)  # epoch budgets read off the runs by budget_rates


def budget_rates(rows: list[dict], name: str, budgets, threshold: float, reference: str) -> list[dict]:
    """Verdicts and seconds of contender `name` had its epoch budget been each of `budgets`, read off its runs: the
    best PL1 and the wall seconds after that epoch (or the run's own end, if it ended sooner); `same_verdict`
    counts agreement with the full runs of contender `reference`."""
    out = []
    for budget in budgets:
        pl1s, seconds, same = [], 0.0, 0
        for r in rows:
            run = r["runs"][name]
            last = min(budget, len(run["best_pl1_by_epoch"])) - 1
            pl1 = run["best_pl1_by_epoch"][last] if last >= 0 else None
            pl1s.append(pl1)
            seconds += run["seconds_by_epoch"][last] if last >= 0 else 0.0
            same += flagged(pl1, threshold) == (r["runs"][reference]["verdict"] == "trojaned")
        out.append({"max_epochs": budget, "seconds": seconds, "same_verdict": same, "encoders": len(rows),
                    **detection_rates(rows, pl1s, threshold), "auroc": family_auroc(rows, pl1s)})
    return out


def exit_at_verdict(rows: list[dict], name: str, threshold: float) -> dict:
    """Seconds of contender `name` had it stopped at the end of the first epoch whose best PL1 was below the
    threshold (the exact early exit, at epoch granularity: an upper bound of --stop_at_verdict's time on the
    same trajectory); its verdicts stay those of the full runs."""
    seconds = 0.0
    for r in rows:
        run = r["runs"][name]
        crossed = [i for i, p in enumerate(run["best_pl1_by_epoch"]) if flagged(p, threshold)]
        seconds += run["seconds_by_epoch"][crossed[0]] if crossed else run["seconds"]
    return {"seconds": seconds}


def run_population(manifest, device, contenders=DEFAULT_CONTENDERS, shadow_data=None, shadow_size=None,
                   lr: float = 0.5, seed: int = 80, max_epochs: int = 1000, threshold: float = 0.1, restarts: int = 1,
                   limit: int | None = None, log=print, partial=None) -> dict:
    """The whole population benchmark; returns the JSON document (rows, per-contender summary, overheads).

    `partial`: a JSON file that holds the rows finished so far (rewritten atomically after every encoder); a
    rerun with the same settings takes its rows instead of running those encoders again."""
    contenders = list(contenders) + ([f"restarts{restarts}"] if restarts > 1 else [])
    unknown = [c for c in contenders if c not in CONTENDERS and not c.startswith("restarts")]
    if unknown:
        raise ValueError(f"contenders must come from {', '.join(CONTENDERS)}; got {contenders}")
    encoders = read_manifest(manifest)[:limit]
    took = attack_success(manifest)
    if took:
        log(f"attack success from {Path(manifest).parent / 'population.json'}: "
            f"{sum(took.values())} took, {len(took) - sum(took.values())} did not (not counted in TPR/AUROC)")
    settings = {"lr": lr, "seed": seed, "max_epochs": max_epochs, "pl1_threshold": threshold}
    run_settings = {**settings, "contenders": contenders, "manifest": str(manifest), "restarts": restarts,
                    "shadow_data": None if shadow_data is None else str(shadow_data), "shadow_size": shadow_size}
    done = finished_rows(partial, run_settings, log)
    overheads = startup_seconds()
    rows = []
    for i, enc in enumerate(encoders):
        enc_took = encoder_took(took, enc)
        rows.append(done.get(enc.path) or bench_encoder(enc, i, contenders, device, settings, shadow_data,
                                                        shadow_size, restarts, log, enc_took))
        if partial is not None:
            atomic.write_json(partial, {"settings": run_settings, "rows": rows})
    doc = {"settings": run_settings,
           "overheads": {**overheads,
                         "checkpoint_load_s": statistics.median(r["checkpoint_load_s"] for r in rows),
                         "shadow_s": statistics.median(r["shadow_s"] for r in rows)},
           "summary": summarise(rows, contenders, threshold), "rows": rows}
    if restarts > 1:
        ks = [k for k in (1, 2, 4, 8, 16) if k <= restarts]
        doc["restart_rates"] = restart_rates(rows, contenders[-1], ks, threshold)
    doc["budget_rates"] = {name: budget_rates(rows, name, [b for b in BUDGETS if b < max_epochs], threshold,
                                              contenders[0])
                           for name in contenders if not name.startswith("restarts")}
    doc["exit_at_verdict"] = {name: exit_at_verdict(rows, name, threshold) for name in contenders
                              if not name.startswith("restarts") and name != "triage"}
    doc["sweep_totals"] = sweep_totals(doc, contenders)
    return doc


def sweep_totals(doc: dict, contenders: list[str]) -> dict:
    """Seconds of a whole sweep per contender, per-encoder overheads included: the reference (the paper's code)
    starts a fresh interpreter with its imports for every encoder, as the paper's run_decree.py does; ours forks
    each encoder's process from a warm worker server. Both load the checkpoint and the shadow set."""
    rows, o = doc["rows"], doc["overheads"]
    load = sum(r["checkpoint_load_s"] + r["shadow_s"] for r in rows)
    start = {name: len(rows) * (o["process_start_s"] + o["imports_s"] if name == contenders[0] else
                                o["forked_start_s"]) for name in contenders}
    return {name: doc["summary"][name]["total_s"] + start[name] + load for name in contenders}


def finished_rows(partial, settings: dict, log=print) -> dict:
    """{encoder path: row} of an interrupted run with the same settings in `partial`; {} otherwise."""
    if partial is None or not Path(partial).is_file():
        return {}
    try:
        earlier = json.loads(Path(partial).read_text())
    except (OSError, ValueError):
        return {}
    if earlier.get("settings") != json.loads(json.dumps(settings)):
        log(f"{partial}: from a run with other settings; starting over")
        return {}
    log(f"{partial}: reusing {len(earlier['rows'])} finished encoder(s)")
    return {row["path"]: row for row in earlier["rows"]}


def population_table(doc: dict) -> str:
    """Per encoder: seconds and verdict of each contender; then totals, ratios, agreement, rates, AUROC."""
    contenders = doc["settings"]["contenders"]
    head = f"{'encoder':<44} {'family':<16}" + "".join(f" {c:>16}" for c in contenders)
    lines = [head, "-" * len(head)]
    for r in doc["rows"]:
        cells = "".join(f" {r['runs'][c]['seconds']:>7.1f}s {r['runs'][c]['verdict'][:4]:>4}"
                        f"{'' if r['runs'][c]['same_verdict'] else '!':1}  " for c in contenders)
        lines.append(f"{'/'.join(r['path'].split('/')[-2:])[-44:]:<44} {r['family'][:16]:<16}{cells}")
    lines += ["", f"{'contender':<12} {'total s':>9} {'x ' + contenders[0]:>8} {'same verdict':>13} {'TPR':>6} {'FPR':>6}  "
                  "AUROC per family"]
    for name, s in doc["summary"].items():
        rate = lambda v: "n/a" if v is None else f"{v:.2f}"  # noqa: E731
        aurocs = ", ".join(f"{f} {a:.3f}" for f, a in s["auroc"].items())
        lines.append(f"{name:<12} {s['total_s']:>9.1f} {s['speedup']:>8.2f} {s['same_verdict']:>6}/{s['encoders']:<6} "
                     f"{rate(s['tpr']):>6} {rate(s['fpr']):>6}  {aurocs}")
    o = doc["overheads"]
    lines.append(f"\noutside the inversion: process start {o['process_start_s']:.2f} s and imports "
                 f"{o['imports_s']:.2f} s once per sweep worker; per encoder: its process forked from the worker "
                 f"{o.get('forked_start_s', float('nan')):.2f} s, checkpoint load {o['checkpoint_load_s']:.2f} s, "
                 f"shadow set {o['shadow_s']:.2f} s (medians)")
    for row in doc.get("restart_rates", []):
        lines.append(f"restarts K={row['restarts']}: {_rates(row)}, about {row['seconds_est']:.0f} s")
    totals = doc.get("sweep_totals", {})
    if totals:
        cells = ", ".join(f"{name} {total:.1f} s (x {totals[contenders[0]] / total:.2f})"
                          for name, total in totals.items())
        lines.append(f"whole sweep, per-encoder overheads included ({contenders[0]}: a fresh interpreter per "
                     f"encoder; the others: forked from a worker server): {cells}")
    base = doc["summary"][contenders[0]]["total_s"]
    for name, cut in doc.get("exit_at_verdict", {}).items():
        lines.append(f"{name} stopped at the epoch its verdict became final (read off its runs, same verdicts): "
                     f"{cut['seconds']:.1f} s, x {contenders[0]} {base / cut['seconds']:.2f}")
    for name, budgets in doc.get("budget_rates", {}).items():
        lines.append(f"\n{name} with a shorter epoch budget (read off its runs; same verdict: vs {contenders[0]}):")
        lines += [f"  max {b['max_epochs']:>3} epochs: {b['seconds']:>8.1f} s, same verdict {b['same_verdict']}/"
                  f"{b['encoders']}, {_rates(b)}" for b in budgets]
    return "\n".join(lines)


def _rates(rates: dict) -> str:
    """'TPR 5/6, FPR 0/2' (+ flagged attacks that did not take), from detection_rates."""
    text = f"TPR {rates['detected']}/{rates['backdoors']}, FPR {rates['false_positives']}/{rates['cleans']}"
    return text + (f", flagged {rates['untaken_flagged']}/{rates['untaken']} attacks that did not take"
                   if rates["untaken"] else "")
