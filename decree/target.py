"""Beyond a verdict: what a backdoor targets, how close we got to the truth, its name, and a ranking score.

- Recovered target: under the best inverted trigger the stamped shadow images collapse onto the attacker's
  target embedding, so their normalised mean embedding estimates it. Saved as a plain float32 (D,) unit
  tensor, `trigger_norm/<run_id>.target.pt` (torch.load(..., weights_only=True) reads it), with the spread:
  the mean pairwise cosine of those embeddings (near 1 = a tight collapse).
- Truth, when known: an image target (the reference inputs of a BadEncoder-style attack, embedded by the
  encoder under test) or a text target (a caption embedded by a CLIP text tower); reported as the cosine.
- Name, for CLIP encoders with a text tower: zero-shot ranking of a vocabulary (default: the 1,000 ImageNet
  class names) with the paper's prompt templates, which are CLIP's 80 ImageNet templates (DECREE's
  imagenet.py `imagenet_prompts`; open_clip ships them as OPENAI_IMAGENET_TEMPLATES).
- Score: thr / (thr + PL1) in [0, 1]; see ranking_score.
"""
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from datasets import DataError, load_reference, to_model_input
from models.text_tower import load_text_encoder

from common import io as atomic
from .inversion import stamp

TOP_NAMES = 5
TEMPLATE_SETS = ("paper", "simple")
EMBED_BATCH = 256  # images per forward pass when embedding the whole shadow set


# ---- score ------------------------------------------------------------------------------------------------

def ranking_score(pl1: float | None, threshold: float) -> float:
    """Suspicion score thr / (thr + PL1) in [0, 1]: 1 at PL1 = 0, 0.5 at the threshold, decreasing in PL1;
    0 when no trigger was found (PL1 None or inf). Strictly monotone, so it ranks encoders exactly as PL1 does."""
    if pl1 is None or not math.isfinite(pl1):
        return 0.0
    return threshold / (threshold + pl1)


# ---- embeddings -------------------------------------------------------------------------------------------

@torch.no_grad()
def unit_embeddings(encoder, images, mean, std, device, mask=None, pattern=None,
                    batch_size: int = EMBED_BATCH) -> torch.Tensor:
    """uint8 (N,S,S,3), stamped first when mask (S,S) in [0,1] and pattern (S,S,3) in [0,255] are given ->
    L2-normalised float32 (N,D) on device."""
    device = torch.device(device)
    images = torch.as_tensor(images)
    if mask is not None:
        mask = torch.as_tensor(mask, dtype=torch.float32, device=device).unsqueeze(-1)
        pattern = torch.as_tensor(pattern, dtype=torch.float32, device=device)
    encoder.eval()
    chunks = []
    for first in range(0, len(images), batch_size):
        x = images[first:first + batch_size].to(device)
        if mask is not None:
            x = stamp(x, mask, pattern)
        chunks.append(F.normalize(encoder(to_model_input(x, mean, std)).float(), dim=1))
    return torch.cat(chunks)


def mean_pairwise_cos_of_units(units: torch.Tensor) -> float:
    """Mean off-diagonal cosine of unit rows (N,D), N >= 2, without the N x N matrix: (|sum|^2 - N) / (N(N-1))."""
    n = units.shape[0]
    total = units.sum(dim=0)
    return float(((total @ total) - n) / (n * (n - 1)))


def unit_mean(units: torch.Tensor) -> torch.Tensor:
    """The normalised mean of unit rows (N,D): float32 (D,) on the CPU."""
    return F.normalize(units.mean(dim=0), dim=0).cpu()


@dataclass
class RecoveredTarget:
    vector: torch.Tensor  # float32 (D,), unit norm, CPU
    spread: float         # mean pairwise cosine of the stamped embeddings
    images: int


def recover_target(encoder, shadow, mask, pattern, mean, std, device) -> RecoveredTarget:
    """The target embedding an inverted trigger (mask (S,S), pattern (S,S,3)) sends shadow images (N,S,S,3) to."""
    units = unit_embeddings(encoder, shadow, mean, std, device, mask, pattern)
    return RecoveredTarget(unit_mean(units), mean_pairwise_cos_of_units(units), len(units))


# ---- target files -----------------------------------------------------------------------------------------

def save_target(path, vector: torch.Tensor) -> None:
    """A plain float32 (D,) tensor file (no pickled objects), written atomically."""
    atomic.write_torch(path, vector.detach().to("cpu", torch.float32).contiguous().clone())


def load_target(path) -> torch.Tensor:
    """Read a target file safely (weights_only): float32 (D,)."""
    vector = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(vector, torch.Tensor) or vector.dim() != 1:
        raise DataError(f"{path}: not a target file (a 1-D float tensor)")
    return vector.float()


# ---- naming -----------------------------------------------------------------------------------------------

def check_template_set(kind: str) -> None:
    if kind not in TEMPLATE_SETS:
        raise ValueError(f"--target_templates {kind!r}: choose paper (80 prompts) or simple (7)")


def prompt_templates(kind: str = "paper") -> list:
    """'paper': CLIP's 80 ImageNet templates (as in DECREE's imagenet.py); 'simple': open_clip's 7-template subset,
    about 11x cheaper. Each template is a callable name -> prompt."""
    check_template_set(kind)
    from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES, SIMPLE_IMAGENET_TEMPLATES
    return list(OPENAI_IMAGENET_TEMPLATES if kind == "paper" else SIMPLE_IMAGENET_TEMPLATES)


def read_vocabulary(path=None) -> list[str]:
    """Names to rank, one per line (blank lines and # comments skipped); default the 1,000 ImageNet classes."""
    if path is None:
        from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES
        return list(IMAGENET_CLASSNAMES)
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--target_vocab {path}: no such file; give a text file with one name per line")
    names = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    names = [name for name in names if name and not name.startswith("#")]
    if not names:
        raise DataError(f"--target_vocab {path}: lists no names; write one name per line")
    return names


@torch.no_grad()
def name_embeddings(encode_text, names: list[str], templates: list) -> torch.Tensor:
    """Zero-shot classifier rows: per name, the normalised mean of its normalised prompt embeddings: (V,D)."""
    prompts = [template(name) for name in names for template in templates]
    units = F.normalize(encode_text(prompts).float(), dim=1).view(len(names), len(templates), -1)
    return F.normalize(units.mean(dim=1), dim=1).cpu()


def top_names(target: torch.Tensor, embeddings: torch.Tensor, names: list[str], k: int = TOP_NAMES) -> list[dict]:
    """The k names whose embeddings (V,D) are closest (cosine) to the unit target (D,), best first."""
    similarity = embeddings @ target.to(embeddings.dtype)
    best = similarity.topk(min(k, len(names)))
    return [{"name": names[i], "similarity": float(s)} for s, i in zip(best.values.tolist(), best.indices.tolist())]


# ---- one run ----------------------------------------------------------------------------------------------

@dataclass
class TargetSetup:
    """What a run needs besides the encoder, checked before the (long) inversion so bad input fails fast."""
    reference_file: str | None = None
    reference_images: np.ndarray | None = None  # uint8 (K,S,S,3)
    reference_text: str | None = None
    encode_text: object = None                  # list[str] -> float (N,D), or None without a text tower
    vocabulary: list | None = None
    vocabulary_source: str | None = None
    templates: str = "paper"


def prepare_target(job, spec, device) -> TargetSetup:
    """Load the truth (reference images / text) and the text tower a run's flags ask for (job: DetectionJob)."""
    setup = TargetSetup(reference_file=job.reference_file, reference_text=job.reference_text,
                        templates=job.target_templates)
    check_template_set(job.target_templates)  # fail now, not after the inversion
    if job.reference_file:
        images, _ = load_reference(job.reference_file)
        if images.shape[1:3] != (spec.input_size, spec.input_size):
            raise DataError(f"--reference_file {job.reference_file}: images are {images.shape[1]}x{images.shape[2]} "
                            f"px but the encoder takes {spec.input_size}x{spec.input_size}")
        setup.reference_images = images
    if job.text_tower or spec.family == "clip":
        setup.encode_text = load_text_encoder(job.text_tower or job.encoder_path, spec.arch, device,
                                              job.trust_checkpoint)
        if setup.encode_text is None and job.text_tower:
            raise DataError(f"--text_tower {job.text_tower}: holds no CLIP text tower; give a full CLIP checkpoint")
    if job.reference_text and setup.encode_text is None:
        raise DataError(f"--reference_text needs a CLIP text tower and {job.encoder_path} has none; pass a full "
                        f"CLIP file of the same arch (e.g. OpenAI's RN50.pt) with --text_tower")
    if setup.encode_text is not None and not job.no_target_names:
        setup.vocabulary = read_vocabulary(job.target_vocab)
        setup.vocabulary_source = job.target_vocab or "ImageNet classes (open_clip.zero_shot_metadata)"
    return setup


def true_target(setup: TargetSetup, encoder, spec, device):
    """(kind, source, unit (D,)) of the known target, or None: reference images win over a reference text."""
    if setup.reference_images is not None:
        units = unit_embeddings(encoder, setup.reference_images, spec.mean, spec.std, device)
        return "image", setup.reference_file, unit_mean(units)
    if setup.reference_text:
        return "text", setup.reference_text, F.normalize(setup.encode_text([setup.reference_text])[0].float().cpu(),
                                                          dim=0)
    return None


def check_dims(vector: torch.Tensor, other: torch.Tensor, what: str) -> None:
    if vector.shape != other.shape:
        raise DataError(f"{what} has {other.shape[-1]} dimensions but the encoder's embeddings have "
                        f"{vector.shape[-1]}; is it the text tower of the same CLIP arch?")


def analyse_target(setup: TargetSetup, encoder, spec, shadow, result, device, path: Path) -> dict | None:
    """Recover the target under the best trigger, write it to `path`, compare it with the truth and name it.

    Returns the run JSON's `target` section, or None when no trigger was found (any old target file is removed).
    """
    path = Path(path)
    if not result.found:
        path.unlink(missing_ok=True)
        return None
    target = recover_target(encoder, shadow, result.mask, result.pattern, spec.mean, spec.std, device)
    save_target(path, target.vector)
    summary = {"file": path.name, "dim": int(target.vector.numel()), "spread": target.spread,
               "images": target.images}
    truth = true_target(setup, encoder, spec, device)
    if truth is not None:
        kind, source, vector = truth
        check_dims(target.vector, vector, f"the {kind} target")
        summary["reference"] = {"kind": kind, "source": source, "cos": float(vector @ target.vector)}
    if setup.vocabulary:
        embeddings = name_embeddings(setup.encode_text, setup.vocabulary, prompt_templates(setup.templates))
        check_dims(target.vector, embeddings[0], "the text tower")
        summary["names"] = top_names(target.vector, embeddings, setup.vocabulary)
        summary["vocabulary"] = {"source": setup.vocabulary_source, "size": len(setup.vocabulary),
                                 "templates": setup.templates}
    return summary


def target_lines(record: dict) -> list[str]:
    """What main.py prints about the recovered target of a run record."""
    target = record.get("target")
    if not target:
        return ["recovered target: none (no trigger found)"]
    lines = [f"recovered target: {target['file']} ({target['dim']}-d, spread {target['spread']:.4f} = mean pairwise "
             f"cosine of {target['images']} stamped shadow embeddings)"]
    if "reference" in target:
        ref = target["reference"]
        lines.append(f"cos(recovered, true {ref['kind']} target {ref['source']!r}) = {ref['cos']:.4f}")
    if "names" in target:
        names = ", ".join(f"{n['name']} ({n['similarity']:.3f})" for n in target["names"])
        lines.append(f"target named ({target['vocabulary']['size']} names, {target['vocabulary']['templates']} "
                     f"templates): {names}")
    return lines
