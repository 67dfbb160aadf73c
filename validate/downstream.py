"""Downstream validation of image-target attacks (docs/method.md): an MLP on frozen embeddings; CA, BA and ASR.

As BadEncoder's and DECREE's training_downstream_classifier.py: embeddings L2-normalised, the MLP
d -> 512 -> ReLU -> Dropout 0.5 -> 256 -> ReLU -> classes, Adam lr 1e-4, batch 64, training batches in
data order (no shuffling), last-epoch numbers. Embeddings are computed once per encoder and image set.
- CA: the clean encoder's MLP on clean test images; BA: the backdoored encoder's MLP on them.
- asr_all: stamped test images classified as the target class, all of them (the papers' ASR);
  asr: the same over stamped test images whose true class is not the target (stricter).
Inputs are normalised as the original evaluation did (EVALUATION_NORMALIZATION: CLIP's constants for CLIP,
none for imagenet), so the numbers compare with BadEncoder's tables; "detection" uses DECREE's constants.
"""
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from datasets import EVALUATION_NORMALIZATION, DataError, load_npz, load_trigger
from common import io as atomic
from common.device import resolve_device
from models import CheckpointError, NonFiniteEmbeddings, load_encoder

from .embed import embed_images
from .record import new_run_name, write_run_record

# downstream dataset -> target class the papers used (truck, digit one, priority road sign)
PAPER_TARGETS = {"stl10": 9, "svhn": 1, "gtsrb": 12}
PAPER_TRIGGERS = {32: "trigger/trigger_pt_white_21_10_ap_replace.npz",
                  224: "trigger/trigger_pt_white_173_50_ap_replace.npz"}


class DownstreamMLP(nn.Module):
    """The papers' NeuralNet (same parameter names): float (N,d) -> logits (N,classes)."""

    def __init__(self, input_size: int, hidden=(512, 256), num_classes: int = 10, dropout: float = 0.5):
        super().__init__()
        self.fc1 = nn.Linear(input_size, hidden[0])
        self.dropout2 = nn.Dropout(dropout)
        self.fc2 = nn.Linear(hidden[0], hidden[1])
        self.fc3 = nn.Linear(hidden[1], num_classes)

    def forward(self, x):
        x = self.dropout2(F.relu(self.fc1(x)))
        return self.fc3(F.relu(self.fc2(x)))


@dataclass
class DownstreamConfig:
    """The papers' classifier hyper-parameters (DECREE's copy: 200 epochs; BadEncoder: 500)."""
    epochs: int = 200
    batch_size: int = 64
    lr: float = 1e-4
    hidden: tuple = (512, 256)
    dropout: float = 0.5
    seed: int = 100
    shuffle: bool = False          # the papers' loaders did not shuffle
    embed_batch_size: int = 256


@dataclass
class DownstreamData:
    """Labelled train/test images: x uint8 (N,S,S,3), y int64 (N,)."""
    train_x: np.ndarray
    train_y: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray

    @property
    def num_classes(self) -> int:
        return int(max(self.train_y.max(), self.test_y.max())) + 1


def load_downstream_data(train_path, test_path, size: int) -> DownstreamData:
    """Read BadEncoder-style npz files (x, y) and check they fit an encoder of input size `size`."""
    arrays = []
    for path in (train_path, test_path):
        x, y = load_npz(path, require_labels=True)
        if x.shape[1:3] != (size, size):
            raise DataError(f"{path}: images are {x.shape[1]}x{x.shape[2]} but the encoder expects {size}x{size}; "
                            "use a dataset of the encoder's input size (e.g. train_224.npz for CLIP)")
        if y.min() < 0:
            raise DataError(f"{path}: labels must be 0..C-1, found {y.min()}")
        arrays += [x, y]
    return DownstreamData(*arrays)


def check_measurable(data: DownstreamData, target: int, train_path, test_path) -> list[str]:
    """Refuse data on which CA/BA or ASR mean nothing; return warnings for data that measures them weakly."""
    train_classes, test_classes = np.unique(data.train_y), np.unique(data.test_y)
    if len(train_classes) < 2:
        raise DataError(f"{train_path}: every training image is class {train_classes[0]}; a classifier trained on "
                        "one class always answers it, so accuracy and attack success would read 100%; "
                        "use labelled data with at least two classes")
    if not (data.test_y != target).any():
        raise DataError(f"{test_path}: every test image is of the target class {target}; the attack success rate "
                        "needs stamped images of other classes; use a test set with other classes or another "
                        "--reference_label")
    warnings = []
    if len(test_classes) < 2:
        warnings.append(f"{test_path}: every test image is class {test_classes[0]}; CA/BA measure that class only")
    missing = np.setdiff1d(train_classes, test_classes)
    if len(test_classes) >= 2 and len(missing):
        warnings.append(f"{test_path}: no test images of class(es) {missing.tolist()}; CA/BA ignore them")
    return warnings


@dataclass
class Features:
    """Frozen, L2-normalised embeddings, float (N,d) on the device: computed once, reused every epoch."""
    train: torch.Tensor
    test: torch.Tensor
    stamped: torch.Tensor


def embed_downstream(model, data: DownstreamData, trigger, mean, std, device="cpu", batch_size: int = 256,
                     trigger_index: int = 0, progress: bool = True) -> Features:
    def embed(x, desc, **kw):
        return embed_images(model, x, mean, std, device, batch_size, desc=desc, progress=progress, **kw)
    return Features(embed(data.train_x, "train"), embed(data.test_x, "test"),
                    embed(data.test_x, "test stamped", stamp=lambda x: trigger.stamp(x, trigger_index)))


def train_classifier(features: torch.Tensor, labels, num_classes: int, cfg: DownstreamConfig = DownstreamConfig(),
                     progress: bool = True, desc: str = "classifier") -> DownstreamMLP:
    """Train the MLP on float (N,d) features (on their device) with int labels (N,); seeded."""
    device = features.device
    torch.manual_seed(cfg.seed)
    net = DownstreamMLP(features.shape[1], cfg.hidden, num_classes, cfg.dropout).to(device)
    optimizer = torch.optim.Adam(net.parameters(), lr=cfg.lr)
    y = torch.as_tensor(labels, dtype=torch.long, device=device)
    n = len(features)
    generator = torch.Generator().manual_seed(cfg.seed)
    bar = tqdm(range(1, cfg.epochs + 1), desc=desc, disable=not progress, leave=False)
    net.train()
    for _ in bar:
        order = torch.randperm(n, generator=generator).to(device) if cfg.shuffle else None
        total = torch.zeros((), device=device)
        for start in range(0, n, cfg.batch_size):
            idx = slice(start, start + cfg.batch_size) if order is None else order[start:start + cfg.batch_size]
            loss = F.cross_entropy(net(features[idx]), y[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += loss.detach() * len(y[idx])
        if progress:
            bar.set_postfix(loss=f"{total.item() / n:.4f}")
    return net.eval()


@torch.no_grad()
def predict(net: nn.Module, features: torch.Tensor, batch_size: int = 4096) -> torch.Tensor:
    net.eval()
    return torch.cat([net(features[i:i + batch_size]).argmax(dim=1) for i in range(0, len(features), batch_size)])


def attack_scores(net: nn.Module, features: Features, test_y, target: int) -> dict:
    """accuracy on clean test images, asr_all and asr (percent)."""
    y = torch.as_tensor(test_y, dtype=torch.long, device=features.test.device)
    hit = predict(net, features.stamped) == target
    others = y != target
    return {"accuracy": 100.0 * (predict(net, features.test) == y).float().mean().item(),
            "asr_all": 100.0 * hit.float().mean().item(),
            "asr": 100.0 * hit[others].float().mean().item() if others.any() else float("nan")}


def validate_encoder(model, data: DownstreamData, trigger, target: int, mean, std,
                     cfg: DownstreamConfig = DownstreamConfig(), device="cpu", progress: bool = True,
                     desc: str = "classifier"):
    """Embed once, train the MLP, score it: returns (scores dict, trained MLP)."""
    if not 0 <= target < data.num_classes:
        raise ValueError(f"--reference_label {target} is not a class of this dataset (0..{data.num_classes - 1})")
    features = embed_downstream(model, data, trigger, mean, std, device, cfg.embed_batch_size, progress=progress)
    net = train_classifier(features.train, data.train_y, data.num_classes, cfg, progress, desc)
    return attack_scores(net, features, data.test_y, target), net


@dataclass
class DownstreamJob:
    """Everything the downstream script needs; fields follow its flags."""
    encoder_path: str | None = None      # backdoored encoder
    clean_encoder: str | None = None
    encoder_usage_info: str = "cifar10"
    arch: str | None = None
    dataset: str = "cifar10"
    train_data: str | None = None        # default data/<dataset>/train.npz (train_224.npz for 224-px encoders)
    test_data: str | None = None
    trigger_file: str | None = None      # default: the paper's white square for the input size
    reference_label: int | None = None   # default: the papers' target for stl10/svhn/gtsrb
    results_file: str = "downstream_results.csv"
    classifier_file: str | None = None   # save the backdoored encoder's MLP here (the paper's --result_dir)
    device: str = "auto"
    gpu: int | None = None
    trust_checkpoint: bool = False
    clip_normalization: bool = False
    normalization: str = "evaluation"   # the original evaluation's inputs, or "detection" (DECREE's)
    encoder_format: str = "auto"
    config: DownstreamConfig = field(default_factory=DownstreamConfig)

    def input_normalization(self, spec) -> tuple:
        """(mean, std) of the encoder inputs: the original evaluation's per usage info, or the detection spec's."""
        if self.normalization == "detection":
            return spec.mean, spec.std
        if self.normalization != "evaluation":
            raise ValueError(f"--normalization {self.normalization!r}: choose evaluation or detection")
        # hub encoders have no original evaluation: their own config's constants
        return EVALUATION_NORMALIZATION.get(spec.usage_info, (spec.mean, spec.std))

    def data_paths(self, size: int) -> tuple[Path, Path]:
        suffix = "" if size == 32 else f"_{size}"
        root = Path("data") / self.dataset
        return (Path(self.train_data or root / f"train{suffix}.npz"),
                Path(self.test_data or root / f"test{suffix}.npz"))

    def target(self) -> int:
        if self.reference_label is not None:
            return self.reference_label
        if self.dataset in PAPER_TARGETS:
            return PAPER_TARGETS[self.dataset]
        raise ValueError(f"give --reference_label (the target class); the papers' defaults cover only "
                         f"{', '.join(f'{k}={v}' for k, v in PAPER_TARGETS.items())}")


def _warn(line: str) -> None:
    print(f"warning: {line}", file=sys.stderr)


def run_downstream(job: DownstreamJob, progress: bool = True, on_result=None, warn=_warn) -> list[dict]:
    """Validate the clean and/or backdoored encoder of a job; one CSV row each, appended as it finishes.

    Refuses test data that cannot measure CA/BA or ASR; weak data is reported through `warn` and in the run record.
    """
    roles = [(role, path) for role, path in (("clean", job.clean_encoder), ("backdoored", job.encoder_path)) if path]
    if not roles:
        raise ValueError("give --encoder_path (backdoored encoder) and/or --clean_encoder")
    device = resolve_device(job.device, job.gpu)
    target = job.target()
    loaded = {role: load_encoder(path, job.encoder_usage_info, job.arch, device, job.trust_checkpoint,
                                 job.clip_normalization, job.encoder_format) for role, path in roles}  # fail early
    models = {role: model for role, (model, _) in loaded.items()}
    spec = loaded[roles[0][0]][1]  # input size and normalisation: from the checkpoint for hub encoders
    mean, std = job.input_normalization(spec)
    trigger_file = job.trigger_file or PAPER_TRIGGERS.get(spec.input_size)
    if trigger_file is None:
        raise ValueError("give --trigger_file")
    trigger = load_trigger(trigger_file)
    if trigger.size != spec.input_size:
        raise DataError(f"{trigger_file}: the trigger is {trigger.size}x{trigger.size} px but "
                        f"{spec.usage_info} encoders take {spec.input_size}x{spec.input_size}")
    train_path, test_path = job.data_paths(spec.input_size)
    data = load_downstream_data(train_path, test_path, spec.input_size)
    warnings = check_measurable(data, target, train_path, test_path)
    for line in warnings:
        warn(line)
    atomic.check_writable(Path(job.results_file).parent)
    rows, run = [], new_run_name()
    for role, path in roles:
        started = time.time()
        try:
            scores, net = validate_encoder(models.pop(role), data, trigger, target, mean, std, job.config,
                                           device, progress, desc=f"{role} classifier")
        except NonFiniteEmbeddings as err:
            raise CheckpointError(f"{path}: {err}") from err
        if role == "backdoored" and job.classifier_file:
            atomic.write_torch(job.classifier_file, net.state_dict())
        cfg = job.config
        if not rows:
            write_run_record(job.results_file, run, job, device=str(device), trigger_file=str(trigger_file),
                             train_data=str(train_path), test_data=str(test_path), reference_label=target,
                             warnings=warnings)
        row = {"time": datetime.now(timezone.utc).isoformat(timespec="seconds"), "run": run,
               "encoder_path": str(path),
               "role": role, "usage_info": spec.usage_info, "arch": spec.arch, "dataset": job.dataset,
               "train_data": str(train_path), "test_data": str(test_path), "trigger_file": str(trigger_file),
               "reference_label": target, "num_classes": data.num_classes,
               "normalization": f"{job.normalization} mean={list(mean)} std={list(std)}",
               "ca": scores["accuracy"] if role == "clean" else None,
               "ba": scores["accuracy"] if role == "backdoored" else None,
               "asr_all": scores["asr_all"], "asr": scores["asr"],
               "epochs": cfg.epochs, "batch_size": cfg.batch_size, "lr": cfg.lr, "seed": cfg.seed,
               "device": str(device), "seconds": round(time.time() - started, 2)}
        atomic.append_csv_row(job.results_file, row)
        rows.append(row)
        if on_result is not None:
            on_result(row)
    return rows
