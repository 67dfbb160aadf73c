"""Time to verdict over a population of encoders: the paper's settings against the project's presets.

For each encoder of a manifest (decree.sweep's CSV: path, usage_info, arch, label[, family]) the encoder and its
shadow set are loaded once, then the contenders run in turn, their order rotated from encoder to encoder so
drifting machine load hits all of them alike:
    paper    the paper's settings as its code ran them: experiments.paper_path (DataLoader, per-image normalise)
    default  this project's main.py/sweep defaults (--preset paper): the same math on the vectorised path
    fast     --preset fast
    triage   --preset triage (fast + exact early exit)
Per encoder: wall seconds of each inversion, its PL1, epochs and verdict, and whether the verdict is the first
contender's (the reference: paper by default); per contender: total time, ratio to the reference, verdict agreement, detection and false-positive rates, AUROC per
family (each attack family against all clean encoders). Overheads outside the inversion are measured too:
process start and imports (a fresh interpreter, once), checkpoint load and shadow preparation (per encoder).

`restarts=K` adds a contender that runs K restarts together (default preset); since restart k of a K-run is the
run a K'-run (K' > k) would also make, its per-restart PL1s give the verdicts of every K' <= K from one run.
"""
import copy
import statistics
import subprocess
import sys
import time

import numpy as np
import torch

from datasets import load_shadow_set
from models import load_encoder

from decree.inversion import invert_trigger, preset
from decree.report import auroc
from decree.sweep import read_manifest
from .paper_path import paper_invert_trigger

CONTENDERS = ("paper", "default", "fast", "triage")
SPEED_OF = {"paper": "paper", "default": "paper", "fast": "fast", "triage": "triage"}


def startup_seconds(python: str = sys.executable) -> dict:
    """Wall seconds of a bare interpreter and of one that imports what main.py imports (a sweep pays both for
    every encoder, since each runs in its own main.py process)."""
    def timed(code):
        start = time.perf_counter()
        subprocess.run([python, "-c", code], check=True, capture_output=True)
        return time.perf_counter() - start
    bare = timed("pass")
    return {"process_start_s": bare, "imports_s": timed("import decree.detect, decree.cli, models") - bare}


def run_contender(name: str, encoder, shadow, spec, settings: dict, device, restarts: int = 1):
    """One inversion of `name` on a fresh copy of the encoder (channels_last converts weights in place)."""
    cfg = preset(spec.usage_info, SPEED_OF.get(name, "paper"), restarts=restarts, **settings)
    model = copy.deepcopy(encoder)
    start = time.perf_counter()
    if name == "paper":
        result = paper_invert_trigger(model, shadow, spec.mean, spec.std, cfg, device=device)
    else:
        result = invert_trigger(model, shadow, spec.mean, spec.std, cfg, device=device, progress=False)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return result, time.perf_counter() - start


def bench_encoder(enc, index: int, contenders: list[str], device, settings: dict, shadow_data, shadow_size,
                  restarts: int, log=print) -> dict:
    """Every contender on one encoder; returns its record."""
    start = time.perf_counter()
    encoder, spec = load_encoder(enc.path, enc.usage_info, enc.arch, device)
    load_s = time.perf_counter() - start
    start = time.perf_counter()
    shadow = load_shadow_set(enc.usage_info, spec.input_size, shadow_data, shadow_size, None, seed=settings["seed"],
                             progress=False).images
    shadow_s = time.perf_counter() - start
    order = contenders[index % len(contenders):] + contenders[:index % len(contenders)]
    runs = {}
    for name in order:
        k = restarts if name.startswith("restarts") else 1
        result, seconds = run_contender(name, encoder, shadow, spec, settings, device, k)
        runs[name] = {"seconds": seconds, "pl1": result.pl1 if result.found else None, "epochs": result.epochs,
                      "verdict": result.verdict, "stop_reason": result.stop_reason,
                      "restart_pl1": [r["pl1"] for r in result.restarts],
                      # best PL1 after each epoch: what any shorter budget or patience would have reported
                      "best_pl1_by_epoch": [h["best_l1"] / shadow[0].size if h["best_l1"] != np.inf else None
                                            for h in result.history]}
    paper_verdict = runs[contenders[0]]["verdict"]
    for run in runs.values():
        run["same_verdict"] = run["verdict"] == paper_verdict
    log(f"  {enc.path}: " + ", ".join(f"{n} {r['seconds']:.1f}s {r['verdict']}" for n, r in runs.items()))
    return {"path": enc.path, "label": enc.label, "family": getattr(enc, "family", "") or enc.label,
            "checkpoint_load_s": load_s, "shadow_s": shadow_s, "shadow_images": int(len(shadow)),
            "runs": {name: runs[name] for name in contenders}}


def _pl1(value):
    return np.inf if value is None else value


def detection_rates(rows: list[dict], pl1s: list, threshold: float) -> dict:
    """TPR over backdoored, FPR over clean encoders, at `threshold` (PL1 None = no trigger = clean)."""
    flagged = [_pl1(p) < threshold for p in pl1s]
    bad = [f for f, r in zip(flagged, rows) if r["label"] == "backdoor"]
    good = [f for f, r in zip(flagged, rows) if r["label"] == "clean"]
    return {"tpr": sum(bad) / len(bad) if bad else None, "fpr": sum(good) / len(good) if good else None}


def family_auroc(rows: list[dict], pl1s: list) -> dict:
    """AUROC of each backdoor family against every clean encoder of the population."""
    clean = [p for p, r in zip(pl1s, rows) if r["label"] == "clean"]
    families = sorted({r["family"] for r in rows if r["label"] == "backdoor"})
    if not clean:
        return {}
    return {f: auroc([p for p, r in zip(pl1s, rows) if r["family"] == f and r["label"] == "backdoor"], clean)
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
    """From one K-restart run per encoder: TPR/FPR when only the first K' restarts had run, for each K' in ks."""
    out = []
    for k in ks:
        pl1s = [min((_pl1(p) for p in r["runs"][name]["restart_pl1"][:k]), default=np.inf) for r in rows]
        out.append({"restarts": k, **detection_rates(rows, pl1s, threshold)})
    return out


def run_population(manifest, device, contenders=CONTENDERS, shadow_data=None, shadow_size=None, lr: float = 0.5,
                   seed: int = 80, max_epochs: int = 1000, threshold: float = 0.1, restarts: int = 1,
                   limit: int | None = None, log=print) -> dict:
    """The whole population benchmark; returns the JSON document (rows, per-contender summary, overheads)."""
    contenders = list(contenders) + ([f"restarts{restarts}"] if restarts > 1 else [])
    unknown = [c for c in contenders if c not in CONTENDERS and not c.startswith("restarts")]
    if unknown:
        raise ValueError(f"contenders must come from {', '.join(CONTENDERS)}; got {contenders}")
    encoders = read_manifest(manifest)[:limit]
    settings = {"lr": lr, "seed": seed, "max_epochs": max_epochs, "pl1_threshold": threshold}
    overheads = startup_seconds()
    rows = [bench_encoder(enc, i, contenders, device, settings, shadow_data, shadow_size, restarts, log)
            for i, enc in enumerate(encoders)]
    doc = {"settings": {**settings, "contenders": contenders, "manifest": str(manifest), "restarts": restarts},
           "overheads": {**overheads,
                         "checkpoint_load_s": statistics.median(r["checkpoint_load_s"] for r in rows),
                         "shadow_s": statistics.median(r["shadow_s"] for r in rows)},
           "summary": summarise(rows, contenders, threshold), "rows": rows}
    if restarts > 1:
        ks = [k for k in (1, 2, 4, 8, 16) if k <= restarts]
        doc["restart_rates"] = restart_rates(rows, contenders[-1], ks, threshold)
    return doc


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
    lines.append(f"\noutside the inversion, per encoder: process start {o['process_start_s']:.2f} s, imports "
                 f"{o['imports_s']:.2f} s, checkpoint load {o['checkpoint_load_s']:.2f} s, shadow set "
                 f"{o['shadow_s']:.2f} s (medians)")
    for row in doc.get("restart_rates", []):
        lines.append(f"restarts K={row['restarts']}: TPR {row['tpr']}, FPR {row['fpr']}")
    return "\n".join(lines)
