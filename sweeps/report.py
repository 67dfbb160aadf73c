"""Sweep report: a table, detection metrics and two figures for every encoder of an output folder.

Reads only `trigger_norm/<run_id>.json` (finished runs) and `trigger_norm/failed/<run_id>.json` (failures),
so shards that wrote into the same folder are merged by reading it. Writes `trigger_norm/summary.csv`,
`trigger_norm/summary.json` (metrics), `trigger_norm/pl1.png` and `trigger_norm/gallery.png`.
Lower PL1-norm = more suspicious: an encoder is flagged when PL1 < threshold (docs/method.md).
"""
import csv
import io
import json
import math
import sys
from pathlib import Path

import numpy as np

from common import io as atomic
from common.files import printable
from decree.target import ranking_score
from decree.warp_test import combined_score, combined_verdict
from .discovery import LABELS, UNKNOWN
from .figures import save_figure
from .metrics import (BACKDOOR, CLEAN, auroc, by_truth, flag_rates, flagged, pl1_or_inf, rates, row_truth,
                      score_auroc)
from .outputs import failed_dir

SUMMARY_COLUMNS = ("path", "run_id", "usage_info", "arch", "label", "l1", "pl1", "verdict", "epochs", "seconds",
                   "status", "error", "score", "target_cos", "target_name", "family",
                   "shadow_spread", "stamped_spread", "notes",
                   "warp_gain", "warp_verdict", "combined_verdict", "combined_score")  # new columns go last
FINISHED_KEYS = ("encoder_path", "l1", "pl1", "epochs", "seconds")
LABEL_COLOURS = {CLEAN: "tab:blue", BACKDOOR: "tab:red", UNKNOWN: "tab:gray"}
GALLERY_COLUMNS, GALLERY_MAX_TILES = 6, 96
PL1_TABLE_ROWS = 40


def _records(folder: Path, required=("encoder_path",)) -> list[dict]:
    """The run records in a folder; other JSONs there (summary.json) have no matching run_id and are skipped,
    unreadable ones (half-written, stray) with a warning naming them."""
    records = []
    for path in sorted(folder.glob("*.json")):
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:
            print(f"warning: skipped {printable(path)}: not a readable run record ({type(err).__name__})",
                  file=sys.stderr)
            continue
        if isinstance(record, dict) and record.get("run_id") == path.stem:
            if not all(key in record for key in required):
                print(f"warning: skipped {printable(path)}: a run record without {', '.join(required)}",
                      file=sys.stderr)
                continue
            records.append(record)
    return records


def _label(record: dict, labels: dict) -> str:
    """The sweep's label (manifest, the paper's folders) if given, else the one the run recorded, else unknown."""
    if record["run_id"] in labels:
        return labels[record["run_id"]]
    flag = record.get("model_flag")
    return flag if flag in LABELS else UNKNOWN


def truth_text(label: str) -> str:
    """How a label reads beside a verdict: 'truth: clean', 'truth unknown'."""
    return "truth unknown" if label not in LABELS else f"truth: {label}"


def _identity(record: dict, labels: dict) -> dict:
    return {"path": record["encoder_path"], "run_id": record["run_id"], "usage_info": record.get("usage_info"),
            "arch": record.get("arch"), "label": _label(record, labels)}


def verdict_at(pl1: float | None, threshold: float) -> str:
    return "trojaned" if flagged(pl1, threshold) else "clean"


RESTART_COLUMNS = ("restarts", "pl1_min", "pl1_median", "pl1_max")  # in summary.csv when a run had --restarts > 1


def restart_spread(record: dict) -> dict:
    """Seed spread of a --restarts K > 1 run: K and the min/median/max PL1 over restarts (no trigger = inf)."""
    restarts = record.get("restarts") or []
    if len(restarts) < 2:
        return {}
    pl1 = [pl1_or_inf(r["pl1"]) for r in restarts]
    return {"restarts": len(pl1), "pl1_min": min(pl1), "pl1_median": float(np.median(pl1)), "pl1_max": max(pl1)}


def collect_rows(out_dir, threshold: float = 0.1, encoders=()) -> list[dict]:
    """One summary row per encoder (finished, failed, or listed in `encoders` but not run), sorted by path."""
    norm = Path(out_dir) / "trigger_norm"
    labels = {enc.run_id: enc.label for enc in encoders}
    families = {enc.run_id: enc.family for enc in encoders}  # only a manifest knows them
    # one row per encoder file: a record whose run id is a listed encoder's but whose file is another gets a
    # row of its own, so it can never stand for the listed encoder
    rows = {_row_key(enc.run_id, enc.path): {"path": enc.path, "run_id": enc.run_id, "usage_info": enc.usage_info,
                                             "arch": enc.arch, "label": enc.label, "status": "not run"}
            for enc in encoders}
    for record in _records(failed_dir(out_dir)):  # a failure outranks not having run
        rows[_record_key(record)] = {**_identity(record, labels), "seconds": record.get("seconds"),
                                     "status": "failed", "error": record.get("error")}
    for record in _records(norm, FINISHED_KEYS):  # a finished run outranks an older failure of the same encoder
        rows[_record_key(record)] = {**_identity(record, labels), "l1": record["l1"], "pl1": record["pl1"],
                                  "score": ranking_score(record["pl1"], threshold),
                                  "verdict": verdict_at(record["pl1"], threshold), "epochs": record["epochs"],
                                  "seconds": record["seconds"], **_target_columns(record), "status": "done",
                                  "notes": "; ".join(record.get("notes") or ()) or None, **restart_spread(record),
                                  **warp_columns(record, threshold)}
    return sorted(({**dict.fromkeys(SUMMARY_COLUMNS), **row, "family": families.get(row["run_id"])}
                   for row in rows.values()),
                  key=lambda row: (row["path"], row["run_id"]))


def warp_columns(record: dict, threshold: float) -> dict:
    """The warp test's gain and verdict and the combined verdict and score at `threshold` (decree/warp_test.py),
    for a run that had the warp test; nothing otherwise."""
    warp = record.get("warp_test")
    if not warp:
        return {}
    return {"warp_gain": warp["gain"], "warp_verdict": "flagged" if warp["flagged"] else "not flagged",
            "combined_verdict": combined_verdict(flagged(record["pl1"], threshold), warp["flagged"]),
            "combined_score": combined_score(ranking_score(record["pl1"], threshold), warp["score"])}


def _row_key(run_id: str, encoder_path) -> tuple:
    return run_id, str(Path(encoder_path).resolve())


def _record_key(record: dict) -> tuple:
    """A record's row: its run id and the file it recorded (resolved where it ran, else resolved here)."""
    realpath = record.get("encoder_realpath")
    return record["run_id"], realpath if isinstance(realpath, str) else str(Path(str(record["encoder_path"])).resolve())


def _target_columns(record: dict) -> dict:
    """cos(recovered, true target) and the best name, where the run has them (decree/target.py)."""
    target = record.get("target") or {}
    names = target.get("names") or [{}]
    return {"target_cos": target.get("reference", {}).get("cos"), "target_name": names[0].get("name"),
            "shadow_spread": record.get("shadow_spread"), "stamped_spread": target.get("spread")}


def detection_metrics(rows, threshold: float) -> dict:
    """Counts, accuracy, TPR, FPR and AUROC at `threshold` over the finished encoders whose truth was given (the
    rule of sweeps.metrics), and the target recovery."""
    finished = [row for row in rows if row["status"] == "done"]
    backdoor, clean = by_truth([row["pl1"] for row in finished], [row_truth(row) for row in finished])
    return {
        "threshold": threshold, "encoders": len(rows), "done": len(finished),
        "unknown": len(finished) - len(backdoor) - len(clean),
        "failed": sum(row["status"] == "failed" for row in rows),
        "not_run": sum(row["status"] == "not run" for row in rows),
        **rates(backdoor, clean, threshold),
        "auroc": auroc(backdoor, clean) if backdoor and clean else None,
        "target_recovery": target_recovery(finished, threshold),
        **warp_metrics(finished),
    }


def warp_metrics(finished) -> dict:
    """Rates and AUROC of the warp test alone and of the combined verdict, over the finished encoders that had the
    warp test and whose truth was given; nothing when none had it."""
    rows = [row for row in finished if row.get("warp_gain") is not None and row_truth(row) in (BACKDOOR, CLEAN)]
    if not rows:
        return {}
    backdoor = [row for row in rows if row_truth(row) == BACKDOOR]
    clean = [row for row in rows if row_truth(row) == CLEAN]

    def test(flag, score):
        return {**flag_rates([flag(r) for r in backdoor], [flag(r) for r in clean]),
                "auroc": score_auroc([score(r) for r in backdoor], [score(r) for r in clean])
                if backdoor and clean else None}
    return {"warp_test": test(lambda r: r["warp_verdict"] == "flagged", lambda r: r["warp_gain"]),
            "combined": test(lambda r: r["combined_verdict"] == "trojaned", lambda r: r["combined_score"])}


def target_recovery(done, threshold: float) -> dict | None:
    """Mean cos(recovered, true target) over flagged encoders whose truth is known, overall and per `family`
    where rows carry one; None when no flagged encoder has a known target."""
    known = [r for r in done if r.get("target_cos") is not None and flagged(r["pl1"], threshold)]
    if not known:
        return None

    def mean_cos(rows):
        return {"mean_cos": float(np.mean([r["target_cos"] for r in rows])), "encoders": len(rows)}
    summary = mean_cos(known)
    families = sorted({r["family"] for r in known if r.get("family")})
    if families:
        summary["by_family"] = {f: mean_cos([r for r in known if r.get("family") == f]) for f in families}
    return summary


def summary_csv(rows) -> str:
    buf = io.StringIO()
    spread = RESTART_COLUMNS if any(row.get("restarts") for row in rows) else ()
    writer = csv.DictWriter(buf, fieldnames=SUMMARY_COLUMNS + spread, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def plot_pl1(rows, threshold: float, path: Path) -> None:
    """PL1 of each finished encoder (sorted, log scale), coloured by label, numbered; 'no trigger' drawn at 1.

    The numbers index a table of encoder names beside the plot (up to PL1_TABLE_ROWS encoders; beyond that,
    summary.csv lists them), so names are read horizontally instead of as vertical run ids.
    """
    import matplotlib.pyplot as plt
    done = sorted((r for r in rows if r["status"] == "done"),
                  key=lambda r: (pl1_or_inf(r["pl1"]), r["path"]))
    table = len(done) <= PL1_TABLE_ROWS
    height = max(4.5, 0.19 * (len(done) + 2)) if table else 4.5  # one 9 pt table line per encoder
    fig, (ax, side) = plt.subplots(1, 2, figsize=(11 if table else max(8.0, 0.12 * len(done)), height),
                                   width_ratios=(1.2, 1) if table else (1, 0.001), layout="constrained")
    for label in (*LABELS, UNKNOWN):
        for found, marker in ((True, "o"), (False, "x")):
            points = [(i, r["pl1"] if found else 1.0) for i, r in enumerate(done, start=1)
                      if r["label"] == label and (r["pl1"] is not None) == found]
            if points:
                x, y = zip(*points)
                who = "encoder, truth unknown" if label == UNKNOWN else f"{label} encoder"
                name = who if found else f"{who}: no trigger found (drawn at 1)"
                ax.scatter(x, y, c=LABEL_COLOURS[label], marker=marker, s=40, label=name, zorder=3)
    ax.axhline(threshold, color="black", linestyle="--", label=f"threshold {threshold:g}: below = trojaned")
    ax.set_yscale("log")
    ax.margins(y=0.15)
    ax.set_ylabel("PL1-norm = L1 / (H*W*3)", fontsize=10)
    ax.set_xlabel("encoder number (sorted by PL1; names in the table)" if table else
                  "encoder rank by PL1 (names: summary.csv)", fontsize=10)
    if table:
        ax.set_xticks(range(1, len(done) + 1, max(1, math.ceil(len(done) / 15))))
        ax.set_xlim(0.5, len(done) + 0.5)
    ax.legend(fontsize=8, loc="best")
    ax.set_title(f"DECREE PL1-norm of {len(done)} encoders (lower = more suspicious)", fontsize=11)
    side.axis("off")
    if table:
        lines = [f"{'#':>2}  {'PL1':>7}  {'truth':<8}  encoder"]
        lines += [f"{i:>2}  {'none' if r['pl1'] is None else format(r['pl1'], '.4f'):>7}  {r['label']:<8}  "
                  f"{_short_name(r['path'], 44)}" for i, r in enumerate(done, start=1)]
        side.text(0, 1, "\n".join(lines), va="top", ha="left", family="monospace", fontsize=9,
                  transform=side.transAxes)
    save_figure(fig, path)


def _short_name(path, width: int = 34) -> str:
    """The end of a path, which tells encoders of one attack apart (e.g. .../stl10_backdoored_encoder/model_200.pth)."""
    name = "/".join(Path(path).parts[-2:])
    return name if len(name) <= width else "..." + name[-(width - 3):]


def _outline(ax, mask: np.ndarray, colour: str = "lime", left: float = 0) -> None:
    """Draw the pixel edges around the True pixels of a bool (H,W) mask (exact, also for non-rectangular masks),
    `left` pixels to the right of the image's origin."""
    from matplotlib.collections import LineCollection
    padded = np.pad(mask, 1)
    rows, cols = np.nonzero(padded[1:, 1:-1] != padded[:-1, 1:-1])  # edge above pixel row r (r = H: bottom edge)
    segments = [[(left + c - 0.5, r - 0.5), (left + c + 0.5, r - 0.5)] for r, c in zip(rows, cols)]
    rows, cols = np.nonzero(padded[1:-1, 1:] != padded[1:-1, :-1])  # edge left of pixel column c
    segments += [[(left + c - 0.5, r - 0.5), (left + c - 0.5, r + 0.5)] for r, c in zip(rows, cols)]
    ax.add_collection(LineCollection(segments, colors=colour, linewidths=1.5, zorder=3))


def _pixel_grid(ax, height: int, width: int) -> None:
    """Thin lines between pixels, so single trigger pixels can be counted (small images only).

    One line collection, not minor ticks and a grid: matplotlib lays out and draws every tick as its own artist,
    which made a 20-panel gallery take seconds."""
    from matplotlib.collections import LineCollection
    segments = [[(e, -0.5), (e, height - 0.5)] for e in np.arange(-0.5, width, 1)]
    segments += [[(-0.5, e), (width - 0.5, e)] for e in np.arange(-0.5, height, 1)]
    ax.add_collection(LineCollection(segments, colors="0.35", linewidths=0.3, zorder=2))


GREY = 0.5  # the background the pattern is shown over, weighted by the mask


def trigger_panel(mask: np.ndarray, pattern: np.ndarray) -> np.ndarray:
    """float (H, 2W+1, 3) in [0,1]: the mask on its own 0..1 scale (black 0, white 1), a white column, and the
    pattern over grey weighted by the mask, (1 - m) * grey + m * p: what stamping does to a flat grey image.
    Unlike mask x pattern on black, a trigger's dark pixels stay visible."""
    m = np.clip(np.asarray(mask, np.float32), 0, 1)[..., None]
    stamped = (1 - m) * GREY + m * np.asarray(pattern, np.float32) / 255
    return np.concatenate([np.repeat(m, 3, axis=-1), np.ones_like(m[:, :1].repeat(3, -1)), stamped], axis=1)


def _read_trigger(out_dir, run_id: str):
    """(mask (H,W), pattern (H,W,3)) of a finished run's trigger.npz, or None."""
    path = Path(out_dir) / "trigger_inv" / run_id / "trigger.npz"
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as npz:
            return npz["mask"], npz["pattern"]
    except (OSError, ValueError, KeyError):
        return None


GALLERY_NOTE = ("left: the inverted mask (0 black .. 1 white); right: its pattern over grey, weighted by the mask. "
                "This is the smallest trigger DECREE found, not the planted one:\nany small patch that sends the "
                "images to the target embedding counts, so it need not coincide with the planted trigger")


def plot_gallery(rows, out_dir, path: Path, planted=None) -> None:
    """The inverted triggers (trigger_panel), most suspicious first, captioned with PL1, verdict and truth.

    Panels are drawn large, pixel by pixel (nearest neighbour, with a pixel grid for images up to 64 px);
    planted: optional {run_id: bool (H,W) mask} of the trigger known to be planted, outlined in green on both
    halves.
    """
    import matplotlib.pyplot as plt
    planted = planted or {}
    done = sorted((r for r in rows if r["status"] == "done"),
                  key=lambda r: (pl1_or_inf(r["pl1"]), r["path"]))
    shown = done[:GALLERY_MAX_TILES]
    cols = max(1, min(GALLERY_COLUMNS, len(shown)))
    nrows = max(1, math.ceil(len(shown) / cols))
    fig, axes = plt.subplots(nrows, cols, figsize=(4.4 * cols, 2.9 * nrows + 0.6), squeeze=False,
                             layout="constrained")
    for ax in axes.flat:
        ax.axis("off")
    for ax, row in zip(axes.flat, shown):
        trigger = _read_trigger(out_dir, row["run_id"])
        if trigger is not None:
            image = trigger_panel(*trigger)
            ax.axis("on")
            ax.imshow(image, interpolation="nearest", vmin=0, vmax=1)
            ax.set_xticks([]), ax.set_yticks([])
            if image.shape[0] <= 64:
                _pixel_grid(ax, *image.shape[:2])
            if row["run_id"] in planted:
                for left in (0, image.shape[0] + 1):
                    _outline(ax, np.asarray(planted[row["run_id"]], bool), left=left)
        pl1 = "no trigger" if row["pl1"] is None else f"PL1 {row['pl1']:.4f}"
        ax.set_title(f"{_short_name(row['path'], 48)}\n{pl1}: {row['verdict'].upper()} ({truth_text(row['label'])})",
                     fontsize=9, color=LABEL_COLOURS.get(row["label"], LABEL_COLOURS[UNKNOWN]))
    more = f" ({len(shown)} of {len(done)})" if len(shown) < len(done) else ""
    note = "; green outline: the planted trigger" if planted else ""
    fig.suptitle(f"inverted triggers{more}{note}\n{GALLERY_NOTE}", fontsize=9)
    save_figure(fig, path)


def write_report(out_dir, threshold: float = 0.1, encoders=(), planted=None) -> dict:
    """Write summary.csv, summary.json, pl1.png and gallery.png under out_dir/trigger_norm; returns the metrics.

    encoders: optionally the sweep's list (sweeps.discovery.Encoder): its labels (e.g. from a manifest) override
    what the runs recorded, and its encoders without any result are listed as 'not run'.
    planted: optionally {run_id: bool (H,W) mask} of known planted triggers, outlined in the gallery.
    """
    import matplotlib
    matplotlib.use("Agg")
    norm = Path(out_dir) / "trigger_norm"
    rows = collect_rows(out_dir, threshold, encoders)
    if not rows:
        raise FileNotFoundError(f"{norm}: no finished or failed runs to report")
    metrics = detection_metrics(rows, threshold)
    atomic.write_text(norm / "summary.csv", summary_csv(rows))
    figures = {"pl1_plot": norm / "pl1.png", "gallery": norm / "gallery.png"}
    finished = any(row["status"] == "done" for row in rows)
    if not finished:  # nothing to draw: no empty figures, and none left from an earlier report
        for figure in figures.values():
            figure.unlink(missing_ok=True)
    outputs = {"summary_csv": norm / "summary.csv", **(figures if finished else {})}
    atomic.write_json(norm / "summary.json", {"metrics": metrics, "files": outputs,
                                              "failed": {r["run_id"]: r["error"] for r in rows
                                                         if r["status"] == "failed"},
                                              "not_run": [r["path"] for r in rows if r["status"] == "not run"],
                                              "scores": {r["run_id"]: r["score"] for r in rows
                                                         if r["status"] == "done"}})
    if finished:
        plot_pl1(rows, threshold, outputs["pl1_plot"])
        plot_gallery(rows, out_dir, outputs["gallery"], planted)
    return metrics


def _pct(value) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def format_metrics(metrics: dict) -> str:
    """Metrics as a few printable lines."""
    pct = _pct
    unknown = metrics.get("unknown", 0)
    counts = (f"{metrics['encoders']} encoders: {metrics['done']} finished, {metrics['failed']} failed, "
              f"{metrics['not_run']} not run; among the finished {metrics['backdoor']} backdoor / "
              f"{metrics['clean']} clean" + (f" / {unknown} truth unknown" if unknown else ""))
    if not metrics["backdoor"] + metrics["clean"]:
        rates = (f"at PL1 threshold {metrics['threshold']:g}: no accuracy, TPR or FPR: truth unknown for every "
                 "finished encoder (give it in a --manifest label column)")
    else:
        rates = (f"at PL1 threshold {metrics['threshold']:g}: accuracy {pct(metrics['accuracy'])}, "
                 f"TPR {pct(metrics['tpr'])} ({metrics['tp']}/{metrics['backdoor']}), "
                 f"FPR {pct(metrics['fpr'])} ({metrics['fp']}/{metrics['clean']}); AUROC over PL1 "
                 f"{pct(metrics['auroc'])} (= over the score thr/(thr+PL1))"
                 + (f"; over the {metrics['backdoor'] + metrics['clean']} of known truth only" if unknown else ""))
    return "\n".join([counts, rates] + _warp_lines(metrics) + _recovery_lines(metrics.get("target_recovery")))


def _warp_lines(metrics: dict) -> list[str]:
    """The warp test's and the combined verdict's rates, where the runs had the warp test."""
    def line(name, m):
        return (f"{name}: TPR {_pct(m['tpr'])} ({m['tp']}/{m['backdoor']}), FPR {_pct(m['fpr'])} "
                f"({m['fp']}/{m['clean']}), AUROC {_pct(m['auroc'])}")
    if "warp_test" not in metrics:
        return []
    return [line("warp test alone", metrics["warp_test"]),
            line("combined (DECREE or warp test)", metrics["combined"])]


def _recovery_lines(recovery: dict | None) -> list[str]:
    if not recovery:
        return []
    lines = [f"target recovery: mean cos(recovered, true target) {recovery['mean_cos']:.4f} over "
             f"{recovery['encoders']} flagged encoder(s) with a known target"]
    lines += [f"  {family}: {v['mean_cos']:.4f} ({v['encoders']})"
              for family, v in recovery.get("by_family", {}).items()]
    return lines
