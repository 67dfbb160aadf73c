"""Sweep report: a table, detection metrics and two figures for every encoder of an output folder.

Reads only `trigger_norm/<run_id>.json` (finished runs) and `trigger_norm/failed/<run_id>.json` (failures),
so shards that wrote into the same folder are merged by reading it. Writes `trigger_norm/summary.csv`,
`trigger_norm/summary.json` (metrics), `trigger_norm/pl1.png` and `trigger_norm/gallery.png`.
Lower PL1-norm = more suspicious: an encoder is flagged when PL1 < threshold (SPEC 1).
"""
import csv
import io
import json
import math
from pathlib import Path

import numpy as np

from common import io as atomic
from .sweep import LABELS, failed_dir, infer_label

SUMMARY_COLUMNS = ("path", "run_id", "usage_info", "arch", "label", "l1", "pl1", "verdict", "epochs", "seconds",
                   "status", "error")
LABEL_COLOURS = {"clean": "tab:blue", "backdoor": "tab:red"}
GALLERY_COLUMNS, GALLERY_MAX_TILES = 8, 96


def _records(folder: Path) -> list[dict]:
    """The run records in a folder; other JSONs there (summary.json) have no matching run_id and are skipped."""
    records = []
    for path in sorted(folder.glob("*.json")):
        record = json.loads(path.read_text())
        if isinstance(record, dict) and record.get("run_id") == path.stem:
            records.append(record)
    return records


def _label(record: dict, labels: dict) -> str:
    """The sweep's label (manifest) if given, else the one the run recorded, else the paper's path rule."""
    if record["run_id"] in labels:
        return labels[record["run_id"]]
    flag = record.get("model_flag")
    return flag if flag in LABELS else infer_label(record["encoder_path"])


def _identity(record: dict, labels: dict) -> dict:
    return {"path": record["encoder_path"], "run_id": record["run_id"], "usage_info": record.get("usage_info"),
            "arch": record.get("arch"), "label": _label(record, labels)}


def verdict_at(pl1: float | None, threshold: float) -> str:
    return "trojaned" if pl1 is not None and pl1 < threshold else "clean"


RESTART_COLUMNS = ("restarts", "pl1_min", "pl1_median", "pl1_max")  # in summary.csv when a run had --restarts > 1


def restart_spread(record: dict) -> dict:
    """Seed spread of a --restarts K > 1 run: K and the min/median/max PL1 over restarts (no trigger = inf)."""
    restarts = record.get("restarts") or []
    if len(restarts) < 2:
        return {}
    pl1 = [math.inf if r["pl1"] is None else r["pl1"] for r in restarts]
    return {"restarts": len(pl1), "pl1_min": min(pl1), "pl1_median": float(np.median(pl1)), "pl1_max": max(pl1)}


def collect_rows(out_dir, threshold: float = 0.1, encoders=()) -> list[dict]:
    """One summary row per encoder (finished, failed, or listed in `encoders` but not run), sorted by path."""
    norm = Path(out_dir) / "trigger_norm"
    labels = {enc.run_id: enc.label for enc in encoders}
    rows = {enc.run_id: {"path": enc.path, "run_id": enc.run_id, "usage_info": enc.usage_info, "arch": enc.arch,
                         "label": enc.label, "status": "not run"} for enc in encoders}
    for record in _records(failed_dir(out_dir)):  # a failure outranks not having run
        rows[record["run_id"]] = {**_identity(record, labels), "seconds": record.get("seconds"), "status": "failed",
                                  "error": record.get("error")}
    for record in _records(norm):  # a finished run outranks an older failure of the same encoder
        rows[record["run_id"]] = {**_identity(record, labels), "l1": record["l1"], "pl1": record["pl1"],
                                  "verdict": verdict_at(record["pl1"], threshold), "epochs": record["epochs"],
                                  "seconds": record["seconds"], "status": "done", **restart_spread(record)}
    return sorted(({**dict.fromkeys(SUMMARY_COLUMNS), **row} for row in rows.values()),
                  key=lambda row: (row["path"], row["run_id"]))


def auroc(pl1_backdoor, pl1_clean) -> float:
    """P(a backdoored encoder has lower PL1 than a clean one), ties counting half; None PL1 = no trigger = inf."""
    bad = np.array([math.inf if v is None else v for v in pl1_backdoor], dtype=float)[:, None]
    good = np.array([math.inf if v is None else v for v in pl1_clean], dtype=float)[None, :]
    if bad.size == 0 or good.size == 0:
        raise ValueError("AUROC needs at least one clean and one backdoored encoder")
    return float((bad < good).mean() + 0.5 * (bad == good).mean())


def detection_metrics(rows, threshold: float) -> dict:
    """Counts, accuracy, TPR, FPR at `threshold`, and AUROC over PL1 when both labels are present."""
    done = [row for row in rows if row["status"] == "done"]
    flagged = {label: [verdict_at(r["pl1"], threshold) == "trojaned" for r in done if r["label"] == label]
               for label in LABELS}
    tp, fn = sum(flagged["backdoor"]), len(flagged["backdoor"]) - sum(flagged["backdoor"])
    fp, tn = sum(flagged["clean"]), len(flagged["clean"]) - sum(flagged["clean"])
    pl1 = {label: [r["pl1"] for r in done if r["label"] == label] for label in LABELS}
    return {
        "threshold": threshold, "encoders": len(rows), "done": len(done),
        "failed": sum(row["status"] == "failed" for row in rows),
        "not_run": sum(row["status"] == "not run" for row in rows),
        "clean": tn + fp, "backdoor": tp + fn, "tp": tp, "fp": fp, "tn": tn, "fn": fn,
        "accuracy": (tp + tn) / len(done) if done else None,
        "tpr": tp / (tp + fn) if tp + fn else None,
        "fpr": fp / (fp + tn) if fp + tn else None,
        "auroc": auroc(pl1["backdoor"], pl1["clean"]) if pl1["backdoor"] and pl1["clean"] else None,
    }


def summary_csv(rows) -> str:
    buf = io.StringIO()
    spread = RESTART_COLUMNS if any(row.get("restarts") for row in rows) else ()
    writer = csv.DictWriter(buf, fieldnames=SUMMARY_COLUMNS + spread, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def _save_figure(fig, path: Path) -> None:
    import matplotlib.pyplot as plt
    with atomic.atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)


def plot_pl1(rows, threshold: float, path: Path) -> None:
    """PL1 of each finished encoder (sorted, log scale), coloured by label; 'no trigger found' drawn at 1."""
    import matplotlib.pyplot as plt
    done = sorted((r for r in rows if r["status"] == "done"),
                  key=lambda r: (math.inf if r["pl1"] is None else r["pl1"], r["path"]))
    fig, ax = plt.subplots(figsize=(max(6.0, 0.25 * len(done)), 4))
    for label in LABELS:
        for found, marker in ((True, "o"), (False, "x")):
            points = [(i, r["pl1"] if found else 1.0) for i, r in enumerate(done)
                      if r["label"] == label and (r["pl1"] is not None) == found]
            if points:
                x, y = zip(*points)
                name = label if found else f"{label}: no trigger found (drawn at 1)"
                ax.scatter(x, y, c=LABEL_COLOURS[label], marker=marker, label=name, zorder=3)
    ax.axhline(threshold, color="black", linestyle="--", label=f"threshold {threshold:g}")
    ax.set_yscale("log")
    ax.set_ylabel("PL1-norm = L1 / (H*W*3)")
    ax.set_xlabel("encoder (sorted by PL1)")
    if len(done) <= 40:
        ax.set_xticks(range(len(done)), [r["run_id"] for r in done], rotation=90, fontsize=6)
    ax.legend(fontsize=7)
    ax.set_title(f"DECREE PL1-norm of {len(done)} encoders (lower = more suspicious)")
    _save_figure(fig, path)


def _short_name(path, width: int = 34) -> str:
    """The end of a path, which tells encoders of one attack apart (e.g. .../stl10_backdoored_encoder/model_200.pth)."""
    name = "/".join(Path(path).parts[-2:])
    return name if len(name) <= width else "..." + name[-(width - 3):]


def plot_gallery(rows, out_dir, path: Path) -> None:
    """The inverted triggers (fusion = mask * pattern), most suspicious first, captioned with PL1 and verdict."""
    import matplotlib.pyplot as plt
    done = sorted((r for r in rows if r["status"] == "done"),
                  key=lambda r: (math.inf if r["pl1"] is None else r["pl1"], r["path"]))
    shown = done[:GALLERY_MAX_TILES]
    cols = max(1, min(GALLERY_COLUMNS, len(shown)))
    nrows = max(1, math.ceil(len(shown) / cols))
    fig, axes = plt.subplots(nrows, cols, figsize=(1.9 * cols, 2.2 * nrows), squeeze=False, layout="constrained")
    for ax in axes.flat:
        ax.axis("off")
    for ax, row in zip(axes.flat, shown):
        fusion = Path(out_dir) / "trigger_inv" / row["run_id"] / "fusion.png"
        if fusion.is_file():
            ax.imshow(plt.imread(fusion))
        pl1 = "no trigger" if row["pl1"] is None else f"PL1 {row['pl1']:.4f}"
        ax.set_title(f"{_short_name(row['path'])}\n{pl1} {row['verdict'].upper()} ({row['label']})", fontsize=6,
                     color=LABEL_COLOURS[row["label"]])
    more = f" ({len(shown)} of {len(done)})" if len(shown) < len(done) else ""
    fig.suptitle(f"inverted triggers{more}", fontsize=9)
    _save_figure(fig, path)


def write_report(out_dir, threshold: float = 0.1, encoders=()) -> dict:
    """Write summary.csv, summary.json, pl1.png and gallery.png under out_dir/trigger_norm; returns the metrics.

    encoders: optionally the sweep's list (decree.sweep.Encoder): its labels (e.g. from a manifest) override
    what the runs recorded, and its encoders without any result are listed as 'not run'.
    """
    import matplotlib
    matplotlib.use("Agg")
    norm = Path(out_dir) / "trigger_norm"
    rows = collect_rows(out_dir, threshold, encoders)
    if not rows:
        raise FileNotFoundError(f"{norm}: no finished or failed runs to report")
    metrics = detection_metrics(rows, threshold)
    atomic.write_text(norm / "summary.csv", summary_csv(rows))
    outputs = {"summary_csv": norm / "summary.csv", "pl1_plot": norm / "pl1.png", "gallery": norm / "gallery.png"}
    atomic.write_json(norm / "summary.json", {"metrics": metrics, "files": outputs,
                                              "failed": {r["run_id"]: r["error"] for r in rows
                                                         if r["status"] == "failed"},
                                              "not_run": [r["path"] for r in rows if r["status"] == "not run"]})
    plot_pl1(rows, threshold, outputs["pl1_plot"])
    plot_gallery(rows, out_dir, outputs["gallery"])
    return metrics


def format_metrics(metrics: dict) -> str:
    """Metrics as a few printable lines."""
    def pct(value):
        return "n/a" if value is None else f"{value:.3f}"
    return "\n".join([
        f"{metrics['encoders']} encoders: {metrics['done']} finished, {metrics['failed']} failed, "
        f"{metrics['not_run']} not run; "
        f"{metrics['backdoor']} backdoor / {metrics['clean']} clean among the finished",
        f"at PL1 threshold {metrics['threshold']:g}: accuracy {pct(metrics['accuracy'])}, "
        f"TPR {pct(metrics['tpr'])} ({metrics['tp']}/{metrics['backdoor']}), "
        f"FPR {pct(metrics['fpr'])} ({metrics['fp']}/{metrics['clean']}); AUROC over PL1 {pct(metrics['auroc'])}",
    ])
