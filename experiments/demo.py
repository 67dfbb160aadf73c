"""The one-command demo: real photos -> clean SimCLR encoder -> BadEncoder copy -> DECREE on both -> report.

Everything is made from the colour photographs that ship inside scikit-image (datasets.photos), cut into
32 px patches with fixed seeds, so nothing is downloaded. Folder layout under out_dir (output/demo):

    data/        pretrain.npz, shadow.npz (DECREE's held-out shadow set), reference.npz, trigger.npz
    encoders/    clean_encoder/model_<E>.pth, demo_backdoored_encoder/model_<E>.pth (+ config.json each)
    trigger_inv/, detect_log/, trigger_norm/ (+ summary.csv, summary.json, pl1.png, gallery.png)

Encoders are cached: a run reuses an encoder whose config.json matches the current settings.
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
from decree.report import format_metrics, write_report

USAGE_INFO = "cifar10"
LABELS = {"clean_encoder": "clean", "demo_backdoored_encoder": "backdoor"}


@dataclass(frozen=True)
class DemoConfig:
    """Sizes of the demo; the defaults fit in a few minutes on 2 CPU cores."""
    arch: str = "resnet18_w16"       # ResNet18-CIFAR at 1/4 width: 128-d embeddings (1/8 width: clean PL1 ~0.1)
    pretrain_images: int = 4000
    pretrain_epochs: int = 12
    pretrain_batch: int = 128
    attack_images: int = 2000        # BadEncoder's shadow set: the first images of the pre-training set
    attack_epochs: int = 20
    attack_batch: int = 64
    attack_lr: float = 0.01          # BadEncoder's 1e-3 needs its 200 epochs; 10x for the 20 here
    trigger_side: int = 6            # black-and-white checkerboard at the bottom-right corner
    shadow_images: int = 500         # DECREE's shadow set: held-out patches
    decree_lr: float = 0.5           # the paper's sweep setting
    decree_epochs: int = 1000
    pl1_threshold: float = 0.1
    seed: int = 0


QUICK = DemoConfig(arch="resnet18_w4", pretrain_images=256, pretrain_epochs=1, attack_images=128, attack_epochs=1,
                   shadow_images=64, decree_epochs=3)


def prepare_data(cfg: DemoConfig, data_dir: Path) -> dict:
    """Write the demo's npz files (cheap, redone every run so they always match cfg); returns their paths."""
    paths = {name: data_dir / f"{name}.npz" for name in ("pretrain", "shadow", "reference", "trigger")}
    pretrain = photo_patches(cfg.pretrain_images, 32, seed=cfg.seed)
    save_npz_dataset(paths["pretrain"], pretrain, np.zeros(len(pretrain), np.int64))
    shadow = photo_patches(cfg.shadow_images, 32, seed=cfg.seed + 7)
    save_npz_dataset(paths["shadow"], shadow, np.zeros(len(shadow), np.int64))
    reference = photo_patches(1, 32, seed=cfg.seed + 11)
    save_reference(paths["reference"], reference, np.zeros(1, np.int64), info=["a held-out photo patch"])
    pattern, keep = checkerboard_trigger(32, cfg.trigger_side)
    save_trigger(paths["trigger"], pattern, keep, info=[f"{cfg.trigger_side}px checkerboard, bottom right"])
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


def clean_encoder(cfg: DemoConfig, data: dict, folder: Path, device, retrain: bool, progress: bool) -> Path:
    """Pre-train (or reuse) the clean SimCLR encoder; returns its BadEncoder-layout checkpoint."""
    settings = _settings(cfg, "pretrain")
    path = folder / f"model_{cfg.pretrain_epochs}.pth"
    if not retrain and _cached(path, settings):
        return path
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
                       progress: bool) -> Path:
    """BadEncoder-trojan (or reuse) a copy of the clean encoder; returns its checkpoint."""
    settings = _settings(cfg, "pretrain", "attack", "trigger")  # a retrained clean encoder invalidates this one
    path = folder / f"model_{cfg.attack_epochs}.pth"
    if not retrain and _cached(path, settings):
        return path
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


def detect(cfg: DemoConfig, encoder_path: Path, shadow_path: Path, out_dir: Path, device, progress: bool) -> dict:
    """DECREE on one demo encoder, writing the usual three output folders under out_dir."""
    job = DetectionJob(encoder_path=str(encoder_path), encoder_usage_info=USAGE_INFO, arch=cfg.arch,
                       shadow_data=str(shadow_path), shadow_size=cfg.shadow_images,  # all of it, not 10%/class
                       out_dir=str(out_dir), model_flag=LABELS[encoder_path.parent.name],
                       device=str(device), lr=cfg.decree_lr, epochs=cfg.decree_epochs,
                       pl1_threshold=cfg.pl1_threshold)
    return run_detection(job, progress=progress)


def run_demo(cfg: DemoConfig = DemoConfig(), out_dir="output/demo", device="cpu", retrain: bool = False,
             progress: bool = True, log=print) -> dict:
    """The whole demo; returns {'rows': [...], 'metrics': {...}, 'seconds': float}."""
    start = time.time()
    out_dir = atomic.check_writable(out_dir)
    log(f"data: {cfg.pretrain_images} + {cfg.shadow_images} patches of 32 px from scikit-image's photos "
        f"({', '.join(PHOTOS)})")
    data = prepare_data(cfg, out_dir / "data")
    encoders = out_dir / "encoders"
    log(f"1/3 clean encoder: SimCLR pre-training of {cfg.arch}, {cfg.pretrain_epochs} epochs")
    clean = clean_encoder(cfg, data, encoders / "clean_encoder", device, retrain, progress)
    log(f"2/3 trojaned copy: BadEncoder, {cfg.trigger_side}x{cfg.trigger_side} checkerboard trigger, "
        f"{cfg.attack_epochs} epochs")
    backdoored = backdoored_encoder(cfg, data, clean, encoders / "demo_backdoored_encoder", device, retrain, progress)
    log("3/3 DECREE on both encoders (labels are not given to it)")
    rows = [detect(cfg, path, data["shadow"], out_dir, device, progress) for path in (clean, backdoored)]
    metrics = write_report(out_dir, cfg.pl1_threshold)
    return {"rows": rows, "metrics": metrics, "seconds": time.time() - start, "report": format_metrics(metrics)}


def result_table(rows) -> str:
    """encoder | truth | PL1-norm | threshold | verdict, one line each."""
    lines = [f"{'encoder':<48} {'truth':<9} {'PL1-norm':>9} {'threshold':>9}  verdict"]
    for row in rows:
        pl1 = "none" if row["pl1"] is None else f"{row['pl1']:.4f}"
        name = str(Path(row["encoder_path"]).relative_to(Path(row["encoder_path"]).parents[2]))
        lines.append(f"{name:<48} {row['model_flag']:<9} {pl1:>9} {row['pl1_threshold']:>9}  {row['verdict'].upper()}")
    return "\n".join(lines)
