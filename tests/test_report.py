"""The sweep report: metrics on hand-made examples, and the files it writes from trigger_norm records alone."""
import csv

import numpy as np
import pytest

from common import io as atomic
from decree.outputs import run_id_for
from sweeps.discovery import Encoder
from sweeps.metrics import auroc
from sweeps.outputs import failure_path
from sweeps.report import detection_metrics, format_metrics, write_report


def row(pl1, label, status="done"):
    return {"pl1": pl1, "label": label, "status": status}


def test_auroc_counts_lower_pl1_as_more_suspicious_and_ties_as_half():
    assert auroc([0.01, 0.02], [0.3, None]) == 1.0
    assert auroc([0.3], [0.01]) == 0.0
    assert auroc([0.1, 0.3], [0.2, 0.4]) == 0.75  # 3 of the 4 pairs are ordered right
    assert auroc([0.2, None], [0.2, None]) == 0.5  # "no trigger found" ties with itself
    with pytest.raises(ValueError, match="at least one clean and one backdoored"):
        auroc([], [0.1])


def test_metrics_at_the_threshold_on_a_hand_example():
    rows = [row(0.01, "backdoor"), row(0.2, "backdoor"), row(None, "backdoor"),
            row(0.05, "clean"), row(0.3, "clean"), row(None, "clean"), row(None, "backdoor", "failed")]
    m = detection_metrics(rows, threshold=0.1)
    assert (m["tp"], m["fn"], m["fp"], m["tn"]) == (1, 2, 1, 2)
    assert (m["encoders"], m["done"], m["failed"]) == (7, 6, 1)
    assert m["accuracy"] == 0.5 and m["tpr"] == pytest.approx(1 / 3) and m["fpr"] == pytest.approx(1 / 3)
    assert m["auroc"] == pytest.approx(5.5 / 9)  # PL1 ranks do not depend on the threshold
    assert detection_metrics(rows, threshold=0.25)["tpr"] == pytest.approx(2 / 3)


def test_metrics_with_one_label_only_leave_the_other_rates_undefined():
    m = detection_metrics([row(0.01, "backdoor"), row(0.02, "backdoor")], threshold=0.1)
    assert m["tpr"] == 1.0 and m["fpr"] is None and m["auroc"] is None
    assert "FPR n/a" in format_metrics(m) and "AUROC over PL1 n/a" in format_metrics(m)


def finished_record(path, pl1, flag):
    return {"run_id": run_id_for(path), "encoder_path": path, "usage_info": "cifar10", "arch": "resnet18",
            "l1": None if pl1 is None else pl1 * 3072, "pl1": pl1, "verdict": "trojaned" if pl1 and pl1 < 0.1
            else "clean", "epochs": 40, "seconds": 2.5, "model_flag": flag, "pl1_threshold": 0.1}


BAD, CLEAN, OTHER_BAD, NO_TRIGGER, BROKEN = (f"output/cifar10/{name}.pth" for name in (
    "stl10_backdoored_encoder/model_1", "clean_encoder/model_1000", "gtsrb_backdoored_encoder/model_2",
    "clean_encoder/model_900", "bad/model"))


@pytest.fixture
def merged_shards(tmp_path):
    """Records as two shards leave them: finished runs, a failure, and a stale failure of a finished run."""
    for path, pl1, flag in ((BAD, 0.02, "backdoor"), (CLEAN, 0.3, "clean"), (OTHER_BAD, 0.15, ""),
                            (NO_TRIGGER, None, "clean")):
        atomic.write_json(tmp_path / "trigger_norm" / f"{run_id_for(path)}.json", finished_record(path, pl1, flag))
    atomic.write_npz(tmp_path / "trigger_inv" / run_id_for(BAD) / "trigger.npz",
                     mask=np.full((32, 32), 0.5, np.float32), pattern=np.full((32, 32, 3), 200, np.uint8))
    for path in (BROKEN, BAD):
        atomic.write_json(failure_path(tmp_path, run_id_for(path)), {
            "run_id": run_id_for(path), "encoder_path": path, "usage_info": "cifar10", "arch": "resnet18",
            "model_flag": "backdoor", "status": "failed", "error": "CUDA out of memory", "seconds": 1.0})
    return tmp_path


def read_summary(out_dir):
    with open(out_dir / "trigger_norm" / "summary.csv", newline="") as fh:
        return {r["path"]: r for r in csv.DictReader(fh)}


def test_report_merges_records_into_a_table_metrics_and_figures(merged_shards):
    metrics = write_report(merged_shards, threshold=0.1)
    rows = read_summary(merged_shards)
    assert list(rows) == [BROKEN, CLEAN, NO_TRIGGER, OTHER_BAD, BAD]  # sorted by path
    assert rows[BAD]["status"] == "done" and rows[BAD]["verdict"] == "trojaned"  # finished beats old failure
    assert rows[BROKEN]["status"] == "failed" and rows[BROKEN]["error"] == "CUDA out of memory"
    assert rows[OTHER_BAD]["label"] == "unknown"  # no recorded flag, no manifest: nobody gave its truth
    assert rows[NO_TRIGGER]["pl1"] == "" and rows[NO_TRIGGER]["verdict"] == "clean"
    assert (metrics["tp"], metrics["fn"], metrics["tn"], metrics["fp"], metrics["failed"]) == (1, 0, 2, 0, 1)
    assert metrics["unknown"] == 1 and metrics["accuracy"] == 1.0  # rates over the encoders of known truth only
    assert metrics["auroc"] == 1.0
    for figure in ("pl1.png", "gallery.png"):
        assert (merged_shards / "trigger_norm" / figure).read_bytes()[:4] == b"\x89PNG"
    assert write_report(merged_shards, threshold=0.1) == metrics  # its own summary.json is not read as a run


def test_report_can_rethreshold_and_relabel_without_rerunning(merged_shards):
    never_run = "output/cifar10/zzz/model.pth"
    metrics = write_report(merged_shards, threshold=0.2, encoders=[
        Encoder(CLEAN, "cifar10", None, "backdoor"), Encoder(never_run, "cifar10", None, "backdoor")])
    rows = read_summary(merged_shards)
    assert rows[OTHER_BAD]["verdict"] == "trojaned" and rows[CLEAN]["label"] == "backdoor"
    assert rows[never_run]["status"] == "not run" and metrics["not_run"] == 1
    assert (metrics["tp"], metrics["fn"], metrics["tn"], metrics["fp"]) == (1, 1, 1, 0)  # OTHER_BAD: truth unknown


def test_report_of_an_empty_folder_says_so(tmp_path):
    with pytest.raises(FileNotFoundError, match="no finished or failed runs"):
        write_report(tmp_path)


def test_without_any_known_truth_no_rates_are_printed():
    m = detection_metrics([row(0.01, "unknown"), row(None, "unknown"), row(0.3, "unknown")], threshold=0.1)
    assert (m["done"], m["unknown"], m["backdoor"], m["clean"]) == (3, 3, 0, 0)
    assert m["accuracy"] is None and m["tpr"] is None and m["fpr"] is None
    text = format_metrics(m)
    assert "3 truth unknown" in text and "truth unknown for every finished" in text
    assert "accuracy 0" not in text and "accuracy n/a" not in text and "TPR n/a" not in text


def test_an_all_failed_sweep_writes_a_table_and_no_empty_figures(tmp_path, recwarn):
    atomic.write_png(tmp_path / "trigger_norm" / "pl1.png", np.zeros((4, 4, 3), np.uint8))  # an earlier report's
    atomic.write_json(failure_path(tmp_path, run_id_for(BROKEN)), {
        "run_id": run_id_for(BROKEN), "encoder_path": BROKEN, "status": "failed", "error": "bad", "seconds": 1.0})
    metrics = write_report(tmp_path)
    assert metrics["failed"] == 1 and (tmp_path / "trigger_norm" / "summary.csv").is_file()
    assert not any((tmp_path / "trigger_norm" / name).exists() for name in ("pl1.png", "gallery.png"))
    assert not [w for w in recwarn if "matplotlib" in str(w.filename) or "Matplotlib" in str(w.message)]
