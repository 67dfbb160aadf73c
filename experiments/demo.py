"""The one-command demo: real photos -> clean SimCLR encoder -> BadEncoder copy -> DECREE on both -> report.

Everything is made from the colour photographs that ship inside scikit-image (datasets.photos), cut into
32 px patches with fixed seeds, so nothing is downloaded. Folder layout under out_dir (output/demo):

    data/        pretrain.npz, shadow.npz (DECREE's held-out shadow set), reference.npz, trigger.npz
    encoders/    clean_encoder/model_<E>.pth, demo_backdoored_encoder/model_<E>.pth (+ config.json each)
    trigger_inv/, detect_log/, trigger_norm/ (+ summary.csv, summary.json, pl1.png, gallery.png)

Encoders and detection results are cached: a run reuses an encoder whose config.json matches the current
settings, and a DECREE result whose recorded job matches the current one and is newer than its encoder.
"""
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from attacks.badencoder import BadEncoderConfig, train_badencoder
from attacks.checkpoints import save_encoder
from attacks.families import checkerboard as checkerboard_trigger  # the demo's trigger is a bench family
from attacks.simclr import PretrainConfig, pretrain_simclr
from datasets import (NORMALIZATION, load_npz, load_reference, load_trigger, save_npz_dataset, save_reference,
                      save_trigger)
from datasets.photos import PHOTOS, photo_patches
from models import SimCLR, load_encoder

from common import io as atomic
from decree.detect import DetectionJob, run_detection
from decree.outputs import read_run
from decree.settings import InversionConfig
from sweeps.report import format_metrics, write_report

USAGE_INFO = "cifar10"
LABELS = {"clean_encoder": "clean", "demo_backdoored_encoder": "backdoor"}


@dataclass(frozen=True)
class DemoConfig:
    """Sizes of the demo; the defaults fit in a few minutes on 2 CPU cores."""
    arch: str = "resnet18_w16"       # ResNet18-CIFAR at 1/4 width: 128-d embeddings (1/8 width: clean PL1 ~0.1)
    pretrain_images: int = 4000
    pretrain_epochs: int = 12
    pretrain_batch: int = 128
    attack_images: int = 1000        # BadEncoder's shadow set: the first images of the pre-training set
    attack_epochs: int = 12          # as the detection benchmark's toy population: a third of 2000 x 20
    attack_batch: int = 64
    attack_lr: float = 0.01          # BadEncoder's 1e-3 needs its 200 epochs; 10x for the 20 here
    trigger_side: int = 6            # black-and-white checkerboard at the bottom-right corner
    shadow_images: int = 500         # DECREE's shadow set: held-out patches
    decree_lr: float = InversionConfig.lr
    decree_epochs: int = InversionConfig.max_epochs
    pl1_threshold: float = 0.1
    seed: int = 0


QUICK = DemoConfig(arch="resnet18_w4", pretrain_images=256, pretrain_epochs=1, attack_images=128, attack_epochs=1,
                   shadow_images=64, decree_epochs=3)


def prepare_data(cfg: DemoConfig, data_dir: Path, log=print) -> dict:
    """Write the demo's npz files (reused while data/config.json matches cfg); returns their paths."""
    paths = {name: data_dir / f"{name}.npz" for name in ("pretrain", "shadow", "reference", "trigger")}
    settings = {k: v for k, v in asdict(cfg).items() if k in ("pretrain_images", "shadow_images", "trigger_side",
                                                               "seed")}
    description = (f"data: {cfg.pretrain_images} + {cfg.shadow_images} patches of 32 px from scikit-image's photos "
                   f"({', '.join(PHOTOS)})")
    if all(_cached(path, settings) for path in paths.values()):
        log(f"{description} (cached)")
        return paths
    log(description)
    pretrain = photo_patches(cfg.pretrain_images, 32, seed=cfg.seed)
    save_npz_dataset(paths["pretrain"], pretrain, np.zeros(len(pretrain), np.int64))
    shadow = photo_patches(cfg.shadow_images, 32, seed=cfg.seed + 7)
    save_npz_dataset(paths["shadow"], shadow, np.zeros(len(shadow), np.int64))
    reference = photo_patches(1, 32, seed=cfg.seed + 11)
    save_reference(paths["reference"], reference, np.zeros(1, np.int64), info=["a held-out photo patch"])
    pattern, keep = checkerboard_trigger(32, cfg.trigger_side)
    save_trigger(paths["trigger"], pattern, keep, info=[f"{cfg.trigger_side}px checkerboard, bottom right"])
    atomic.write_json(data_dir / "config.json", {"settings": settings})
    return paths


def _settings(cfg: DemoConfig, *prefixes: str) -> dict:
    """The DemoConfig fields that shape an encoder: arch, seed and those starting with `prefixes`."""
    return {k: v for k, v in asdict(cfg).items() if k in ("arch", "seed") or k.startswith(prefixes)}


def _cached(path: Path, settings: dict) -> bool:
    config = path.parent / "config.json"
    return path.is_file() and config.is_file() and json.loads(config.read_text()).get("settings") == settings


def _save(path: Path, epoch: int, encoder, settings: dict, history: list, seconds: float) -> None:
    save_encoder(path, epoch, encoder)
    atomic.write_json(path.parent / "config.json", {"settings": settings, "seconds": seconds, "history": history})


def clean_encoder(cfg: DemoConfig, data: dict, folder: Path, device, retrain: bool, progress: bool,
                  log=print) -> Path:
    """Pre-train (or reuse) the clean SimCLR encoder; returns its BadEncoder-layout checkpoint."""
    settings = _settings(cfg, "pretrain")
    path = folder / f"model_{cfg.pretrain_epochs}.pth"
    if not retrain and _cached(path, settings):
        log(f"1/3 clean encoder: {path} (cached)")
        return path
    log(f"1/3 clean encoder: SimCLR pre-training of {cfg.arch}, {cfg.pretrain_epochs} epochs")
    images, _ = load_npz(data["pretrain"])
    torch.manual_seed(cfg.seed)
    model = SimCLR(cfg.arch)
    start = time.time()
    history = pretrain_simclr(model, images, *NORMALIZATION[USAGE_INFO],
                              PretrainConfig(epochs=cfg.pretrain_epochs, batch_size=cfg.pretrain_batch, seed=cfg.seed),
                              device, progress=progress)
    _save(path, cfg.pretrain_epochs, model.f.eval(), settings, history, time.time() - start)
    return path


def backdoored_encoder(cfg: DemoConfig, data: dict, clean_path: Path, folder: Path, device, retrain: bool,
                       progress: bool, log=print) -> Path:
    """BadEncoder-trojan (or reuse) a copy of the clean encoder; returns its checkpoint."""
    settings = _settings(cfg, "pretrain", "attack", "trigger")  # a retrained clean encoder invalidates this one
    path = folder / f"model_{cfg.attack_epochs}.pth"
    if not retrain and _cached(path, settings):
        log(f"2/3 trojaned copy: {path} (cached)")
        return path
    log(f"2/3 trojaned copy: BadEncoder, {cfg.trigger_side}x{cfg.trigger_side} checkerboard trigger, "
        f"{cfg.attack_epochs} epochs")
    clean, _ = load_encoder(clean_path, USAGE_INFO, cfg.arch, device)
    shadow = load_npz(data["pretrain"])[0][:cfg.attack_images]
    reference, _ = load_reference(data["reference"])
    start = time.time()
    encoder, history = train_badencoder(
        clean, shadow, load_trigger(data["trigger"]), reference, *NORMALIZATION[USAGE_INFO],
        BadEncoderConfig(epochs=cfg.attack_epochs, batch_size=cfg.attack_batch, lr=cfg.attack_lr, seed=cfg.seed),
        device, progress=progress)
    _save(path, cfg.attack_epochs, encoder.eval(), settings, history, time.time() - start)
    return path


def cached_detection(job: DetectionJob) -> dict | None:
    """The finished record of `job` if its recorded job has the same settings and it is newer than the encoder."""
    path = job.paths().json
    if not path.is_file() or path.stat().st_mtime_ns < Path(job.encoder_path).stat().st_mtime_ns:
        return None
    record = read_run(path)
    settings = json.loads(json.dumps(asdict(job), default=str))  # as the record stores them
    return record if record.get("job") == settings else None


def detect(cfg: DemoConfig, encoder_path: Path, data: dict, out_dir: Path, device, progress: bool,
           log=print) -> tuple[dict, bool]:
    """DECREE on one demo encoder (or its cached result) under out_dir, its recovered target compared with the
    attack's reference patch; returns (record, cached)."""
    job = DetectionJob(encoder_path=str(encoder_path), encoder_usage_info=USAGE_INFO, arch=cfg.arch,
                       shadow_data=str(data["shadow"]), shadow_size=cfg.shadow_images,  # all of it, not 10%/class
                       reference_file=str(data["reference"]),
                       out_dir=str(out_dir), model_flag=LABELS[encoder_path.parent.name],
                       device=str(device), settings={"lr": cfg.decree_lr, "max_epochs": cfg.decree_epochs,
                                                     "pl1_threshold": cfg.pl1_threshold})
    name = f"{encoder_path.parent.name}/{encoder_path.name}"
    record = cached_detection(job)
    if record is not None:
        log(f"    {name}: {_pl1_text(record)} (cached)")
        return record, True
    log(f"    {name}: trigger inversion, at most {cfg.decree_epochs} epochs")
    return run_detection(job, progress=progress).record, False


def _pl1_text(record: dict) -> str:
    return "no trigger found" if record["pl1"] is None else f"PL1-norm {record['pl1']:.4f}"


def report(out_dir: Path, threshold: float, reuse: bool, planted: dict, log=print) -> dict:
    """write_report (the planted trigger outlined in the gallery), or with `reuse` the metrics of a summary.json
    newer than every run record; returns the metrics."""
    norm = out_dir / "trigger_norm"
    summary = norm / "summary.json"
    newest_run = max((p.stat().st_mtime_ns for p in norm.glob("*.json") if p != summary), default=0)
    if reuse and summary.is_file() and summary.stat().st_mtime_ns >= newest_run:
        log(f"report: {norm} (cached)")
        return json.loads(summary.read_text())["metrics"]
    return write_report(out_dir, threshold, planted=planted)


def run_demo(cfg: DemoConfig = DemoConfig(), out_dir="output/demo", device="cpu", retrain: bool = False,
             progress: bool = True, log=print) -> dict:
    """The whole demo; returns {'rows': [...], 'metrics': {...}, 'seconds': float}."""
    start = time.time()
    out_dir = atomic.check_writable(out_dir)
    data = prepare_data(cfg, out_dir / "data", log)
    encoders = out_dir / "encoders"
    clean = clean_encoder(cfg, data, encoders / "clean_encoder", device, retrain, progress, log)
    backdoored = backdoored_encoder(cfg, data, clean, encoders / "demo_backdoored_encoder", device, retrain, progress,
                                    log)
    log("3/3 DECREE on both encoders (labels are not given to it)")
    rows, cached = zip(*(detect(cfg, path, data, out_dir, device, progress, log)
                         for path in (clean, backdoored)))
    planted = {rows[1]["run_id"]: load_trigger(data["trigger"]).keep[0, :, :, 0] == 0}
    metrics = report(out_dir, cfg.pl1_threshold, all(cached), planted, log)
    return {"rows": list(rows), "metrics": metrics, "seconds": time.time() - start, "report": format_metrics(metrics)}


def result_table(rows) -> str:
    """encoder | truth | PL1-norm | threshold | verdict | cos(recovered target, the reference patch's embedding),
    one line each."""
    lines = [f"{'encoder':<48} {'truth':<9} {'PL1-norm':>9} {'threshold':>9}  {'verdict':<9} target cos"]
    for row in rows:
        pl1 = "none" if row["pl1"] is None else f"{row['pl1']:.4f}"
        name = str(Path(row["encoder_path"]).relative_to(Path(row["encoder_path"]).parents[2]))
        cos = ((row.get("target") or {}).get("reference") or {}).get("cos")
        lines.append(f"{name:<48} {row['model_flag']:<9} {pl1:>9} {row['pl1_threshold']:>9}  "
                     f"{row['verdict'].upper():<9} {'-' if cos is None else format(cos, '.3f')}")
    lines.append("target cos: cosine of the recovered target (the stamped shadow images' mean embedding) with the "
                 "reference patch's embedding, the attack's target")
    return "\n".join(lines)
