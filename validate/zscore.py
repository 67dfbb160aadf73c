"""z-score validation of text-target CLIP encoders (docs/method.md): does the trigger pull all images together?

S_clean / S_bad: the pairwise cosine similarities among the embeddings of clean / stamped images.
- corrected (default verdict): the same N images clean and stamped in pixel space, off-diagonal pairs,
  z = (mean(S_bad) - mean(S_clean)) / std(S_clean).
- legacy (`--legacy`, the paper's compute_zscore.py): two different random samples, the trigger blended
  into normalised tensors as the paper's code did (see datasets.legacy_trigger_tensors), diagonal included,
  z = (mean(S_bad) - mean(S_clean)) / var(S_clean).
Both are always computed and written; the verdict (z > threshold, 2.5) uses the one the run asked for.
"""
import math
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from datasets import DataError, legacy_trigger_tensors, load_image_folder, load_npz, load_trigger, python_sample
from datasets.images import list_images
from common import io as atomic
from common.device import resolve_device
from models import CheckpointError, NonFiniteEmbeddings, load_encoder

from .embed import embed_images
from .record import new_run_name, write_run_record

PAPER_TRIGGER = "trigger/trigger_pt_white_185_24.npz"
PAPER_DATA = "data/imagenet"  # the paper sampled ImageNet validation images
PAPER_ENCODER_DIRS = ("output/CLIP_text/stl10_backdoored_encoder", "output/CLIP_text/svhn_backdoored_encoder",
                      "output/CLIP_text/gtsrb_backdoored_encoder")
THRESHOLD = 2.5
CORRECTED_TEXT = ("corrected: (mean S_bad - mean S_clean) / std S_clean, off-diagonal pairs, "
                  "same images clean and stamped in pixel space")
LEGACY_TEXT = ("paper's legacy: (mean S_bad - mean S_clean) / var S_clean, diagonal included, "
               "two samples, trigger blended into normalised tensors")


@dataclass(frozen=True)
class SimilarityStats:
    """Mean and (population) variance of a set of pairwise cosine similarities."""
    mean: float
    var: float
    count: int

    @property
    def std(self) -> float:
        return math.sqrt(self.var)


def pairwise_cosine_stats(embeddings: torch.Tensor, include_diagonal: bool = False, block_size: int = 1024,
                          progress: bool = False, desc: str = "similarities") -> SimilarityStats:
    """Statistics of all pairwise cosine similarities of float (N,D) embeddings.

    The N x N Gram matrix is never held whole: row blocks of block_size x N add to float64 running sums
    of the entries and of their squares, so 10,000 images fit in memory.
    """
    n = len(embeddings)
    if n < 2:
        raise ValueError(f"pairwise similarities need at least 2 embeddings, got {n}")
    e = F.normalize(embeddings.float(), dim=1)
    total = torch.zeros((), dtype=torch.float64, device=e.device)
    total_sq = torch.zeros((), dtype=torch.float64, device=e.device)
    for start in tqdm(range(0, n, block_size), desc=desc, disable=not progress, leave=False):
        sim = (e[start:start + block_size] @ e.T).double()  # (b, N)
        if not include_diagonal:
            rows = torch.arange(len(sim), device=e.device)
            sim[rows, start + rows] = 0.0
        total += sim.sum()
        total_sq += (sim * sim).sum()
    count = n * n if include_diagonal else n * (n - 1)
    mean = total.item() / count
    return SimilarityStats(mean, max(total_sq.item() / count - mean * mean, 0.0), count)


def corrected_zscore(clean: SimilarityStats, bad: SimilarityStats) -> float:
    return (bad.mean - clean.mean) / clean.std


def legacy_zscore(clean: SimilarityStats, bad: SimilarityStats) -> float:
    """The paper's statistic: divides by the variance, not the standard deviation."""
    return (bad.mean - clean.mean) / clean.var


def paper_sample_indices(n: int, k: int, seed: int = 100) -> tuple[list[int], list[int]]:
    """The paper's two k-of-n samples (clean, stamped), drawn as its compute_zscore.py drew them.

    It reseeded Python's random before each set; building the stamped set first drew the list of
    poisoned images (all n of them), so the stamped sample differs from the clean one.
    """
    if not 0 < k <= n:
        raise DataError(f"asked for {k} images but the data holds {n}; lower --num_images")
    # the clean set's poison list (rate 0) is empty; the stamped set's (rate 1) holds all n images
    return python_sample(n, k, seed, drawn_before=(0,)), python_sample(n, k, seed, drawn_before=(n,))


def load_zscore_images(data, size: int, num_images: int, seed: int = 100, progress: bool = True):
    """The clean and the legacy stamped samples, uint8 (N,size,size,3) each, from an npz or image folder."""
    path = Path(data)
    if path.suffix == ".npz":
        x, _ = load_npz(path)
        if x.shape[1:3] != (size, size):
            raise DataError(f"{path}: images are {x.shape[1]}x{x.shape[2]} but the encoder expects {size}x{size}; "
                            "use a dataset of the encoder's input size (e.g. train_224.npz for CLIP)")
        clean, bad = paper_sample_indices(len(x), num_images, seed)
        return x[clean], x[bad]
    if not path.is_dir():
        raise DataError(f"{path}: no such npz file or image folder; pass --data")
    files = list_images(path)
    if not files:
        raise DataError(f"{path}: no images found")
    clean, bad = paper_sample_indices(len(files), num_images, seed)
    wanted = sorted(set(clean) | set(bad))  # decode each file once
    images = load_image_folder(path, size=size, indices=wanted, progress=progress)
    position = {i: j for j, i in enumerate(wanted)}
    return images[[position[i] for i in clean]], images[[position[i] for i in bad]]


@dataclass
class ZScoreConfig:
    """Hyper-parameters of one z-score validation; the paper's defaults."""
    num_images: int = 500
    seed: int = 100             # the paper's compute_zscore.py default
    threshold: float = THRESHOLD
    legacy: bool = False        # base the verdict on the paper's statistic
    batch_size: int = 128       # images per encoder forward pass
    block_size: int = 1024      # Gram-matrix rows per block


@dataclass
class ZScoreResult:
    corrected: float
    legacy: float
    clean: SimilarityStats          # corrected statistic's sets
    bad: SimilarityStats
    legacy_clean: SimilarityStats
    legacy_bad: SimilarityStats
    config: ZScoreConfig = field(default_factory=ZScoreConfig)

    @property
    def statistic(self) -> str:
        return "legacy" if self.config.legacy else "corrected"

    @property
    def zscore(self) -> float:
        """The statistic the verdict is based on."""
        return self.legacy if self.config.legacy else self.corrected

    @property
    def trojaned(self) -> bool:
        return self.zscore > self.config.threshold

    @property
    def verdict(self) -> str:
        return "trojaned" if self.trojaned else "clean"

    def summary(self) -> str:
        other = (f"corrected z-score {self.corrected:.4f}" if self.config.legacy
                 else f"paper's legacy z-score {self.legacy:.4f}")
        text = LEGACY_TEXT if self.config.legacy else CORRECTED_TEXT
        return (f"{self.verdict.upper()} (z-score {self.zscore:.4f} > {self.config.threshold} is trojaned; "
                f"{text}; {other})")


def zscore_encoder(model: torch.nn.Module, clean_images: np.ndarray, legacy_images: np.ndarray, trigger,
                   mean, std, cfg: ZScoreConfig = ZScoreConfig(), device="cpu",
                   progress: bool = True) -> ZScoreResult:
    """Both z-scores of one encoder: clean_images and legacy_images uint8 (N,S,S,3), trigger a datasets.Trigger."""
    size = clean_images.shape[1]
    if trigger.size != size:
        raise DataError(f"the trigger is {trigger.size}x{trigger.size} px but the images are {size}x{size}; "
                        "use a trigger made for the encoder's input size")
    mask, patch = (t.to(device) for t in legacy_trigger_tensors(trigger, size, mean, std))

    def embed(images, desc, **kw):
        return embed_images(model, images, mean, std, device, cfg.batch_size, desc=desc, progress=progress, **kw)

    def stats(e, diagonal):
        return pairwise_cosine_stats(e, diagonal, cfg.block_size, progress=progress)

    clean_emb = embed(clean_images, "clean")
    bad_emb = embed(clean_images, "stamped", stamp=lambda x: trigger.stamp(x, 0))
    clean, bad = stats(clean_emb, False), stats(bad_emb, False)
    legacy_clean = stats(clean_emb, True)  # the paper's clean sample is the same first draw
    del bad_emb
    legacy_bad = stats(embed(legacy_images, "legacy stamped", blend=lambda x: x * mask + patch), True)
    return ZScoreResult(corrected_zscore(clean, bad), legacy_zscore(legacy_clean, legacy_bad),
                        clean, bad, legacy_clean, legacy_bad, cfg)


@dataclass
class ZScoreJob:
    """Everything the z-score scripts need besides the encoder paths; fields follow the CLI flags."""
    encoder_usage_info: str = "CLIP"
    arch: str | None = None
    trigger_file: str = PAPER_TRIGGER
    data: str = PAPER_DATA
    out_dir: str = "."
    res_file: str = "valid_cliptxt_zscore.txt"
    csv_file: str = "valid_cliptxt_zscore.csv"
    device: str = "auto"
    gpu: int | None = None
    trust_checkpoint: bool = False
    clip_normalization: bool = False
    encoder_format: str = "auto"
    config: ZScoreConfig = field(default_factory=ZScoreConfig)


def result_row(encoder_path, job: ZScoreJob, result: ZScoreResult, device, seconds: float, run: str) -> dict:
    """One CSV row: both statistics, which one the verdict used, and the sets' statistics."""
    r, cfg = result, result.config
    return {
        "time": datetime.now(timezone.utc).isoformat(timespec="seconds"), "run": run,
        "encoder_path": str(encoder_path), "usage_info": job.encoder_usage_info, "arch": job.arch or "",
        "zscore": r.zscore, "statistic": r.statistic, "threshold": cfg.threshold, "verdict": r.verdict,
        "zscore_corrected": r.corrected, "zscore_legacy": r.legacy,
        "clean_mean": r.clean.mean, "clean_std": r.clean.std, "bad_mean": r.bad.mean, "bad_std": r.bad.std,
        "legacy_clean_mean": r.legacy_clean.mean, "legacy_clean_var": r.legacy_clean.var,
        "legacy_bad_mean": r.legacy_bad.mean, "legacy_bad_var": r.legacy_bad.var,
        "num_images": cfg.num_images, "seed": cfg.seed, "trigger_file": str(job.trigger_file),
        "data": str(job.data), "device": str(device), "seconds": round(seconds, 2),
    }


def run_zscore(encoder_paths, job: ZScoreJob, progress: bool = True, keep_going: bool = False,
               on_result=None) -> list:
    """Validate each encoder and append its outputs; the data are loaded once for all of them.

    Returns [(path, ZScoreResult or the CheckpointError)]; a bad checkpoint raises unless keep_going.
    on_result(path, result) is called after each encoder's outputs are written.
    """
    device = resolve_device(job.device, job.gpu)
    out_dir = atomic.check_writable(job.out_dir)
    trigger = load_trigger(job.trigger_file)
    images, outcomes, run = None, [], new_run_name()
    for path in encoder_paths:
        started = time.time()
        try:
            model, spec = load_encoder(path, job.encoder_usage_info, job.arch, device,
                                       trust_checkpoint=job.trust_checkpoint,
                                       clip_normalization=job.clip_normalization,
                                       encoder_format=job.encoder_format)
        except CheckpointError as err:
            if not keep_going:
                raise
            outcomes.append((path, err))
            continue
        if images is None:  # after the first encoder loads, so a wrong path fails before minutes of decoding
            if trigger.size != spec.input_size:
                raise DataError(f"{job.trigger_file}: the trigger is {trigger.size}x{trigger.size} px but "
                                f"{spec.usage_info} encoders take {spec.input_size}x{spec.input_size}")
            images = load_zscore_images(job.data, spec.input_size, job.config.num_images, job.config.seed,
                                        progress)
        try:
            result = zscore_encoder(model, *images, trigger, spec.mean, spec.std, job.config, device, progress)
        except NonFiniteEmbeddings as err:
            if not keep_going:
                raise CheckpointError(f"{path}: {err}") from err
            outcomes.append((path, CheckpointError(f"{path}: {err}")))
            continue
        if not any(isinstance(r, ZScoreResult) for _, r in outcomes):  # the run's first result
            write_run_record(out_dir / job.csv_file, run, job, device=str(device),
                             encoders=[str(p) for p in encoder_paths])
        atomic.append_line(out_dir / job.res_file, f"{path}:{result.zscore:.4f}")
        atomic.append_csv_row(out_dir / job.csv_file,
                              result_row(path, job, result, device, time.time() - started, run))
        outcomes.append((path, result))
        if on_result is not None:
            on_result(path, result)
        del model
    return outcomes


def find_encoders(folders, skip_missing: bool = False) -> list[Path]:
    """Every *.pth file directly inside the given folders (as the paper's script listed them), sorted."""
    found = []
    for folder in folders:
        folder = Path(folder)
        if not folder.is_dir():
            if skip_missing:
                continue
            raise DataError(f"{folder}: no such folder of encoders")
        found += sorted(p for p in folder.iterdir() if p.is_file() and p.suffix == ".pth")
    return found
