"""Challenge-style export of a sweep: one JSON with a prediction per encoder, and its target tensors beside it.

    predictions.json  {"format": "decree-predictions/1", "threshold": 0.1, "score": "...",
                       "predictions": [{"encoder": path, "run_id": ..., "backdoored": bool, "score": float in [0,1],
                                        "target": "<run_id>.target.pt" or null}, ...],
                       "missing": [paths of encoders without a finished run]}
    <run_id>.target.pt  float32 (D,), L2-normalised; torch.load(path, weights_only=True) reads it

A leaderboard or another tool reads it with json and torch alone; read_predictions is the reference reader.
"""
import json
from pathlib import Path

from common import io as atomic
from decree.outputs import RunPaths
from decree.target import load_target
from .report import collect_rows

FORMAT = "decree-predictions/1"
SCORE_MEANING = "threshold / (threshold + PL1-norm); 0.5 at the threshold, 0 when no trigger was found"


def export_predictions(out_dir, path, threshold: float = 0.1, encoders=()) -> dict:
    """Write `path` (JSON) and copy every finished run's target file beside it; returns the written document."""
    path = Path(path)
    rows = collect_rows(out_dir, threshold, encoders)
    done = [row for row in rows if row["status"] == "done"]
    if not done:
        raise FileNotFoundError(f"{Path(out_dir) / 'trigger_norm'}: no finished runs to export")
    predictions = []
    for row in done:
        source = RunPaths(Path(out_dir), row["run_id"]).target
        target = None
        if source.is_file():
            target = source.name
            if source.resolve() != (path.parent / target).resolve():
                atomic.write_bytes(path.parent / target, source.read_bytes())
        predictions.append({"encoder": row["path"], "run_id": row["run_id"], "backdoored": row["verdict"] == "trojaned",
                            "score": row["score"], "target": target})
    document = {"format": FORMAT, "threshold": threshold, "score": SCORE_MEANING, "predictions": predictions,
                "missing": [row["path"] for row in rows if row["status"] != "done"]}
    atomic.write_json(path, document)
    return document


def read_predictions(path) -> list[dict]:
    """The entries of an export, each with `target_vector` (float32 (D,) or None) loaded weights-only."""
    path = Path(path)
    document = json.loads(path.read_text())
    if document.get("format") != FORMAT:
        raise ValueError(f"{path}: not a DECREE predictions file (format {document.get('format')!r})")
    return [{**entry, "target_vector": load_target(path.parent / entry["target"]) if entry["target"] else None}
            for entry in document["predictions"]]
