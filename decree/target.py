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
import hashlib
import json
import math
import time
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
TEMPLATE_SETS = ("auto", "paper", "simple", "one")
ONE_TEMPLATE = "a photo of a {}."
# shadow_spread at or above this: the clean images' embeddings already nearly coincide (a random-weight or
# collapsed encoder), so a small trigger that makes them coincide is no evidence of a backdoor (docs/target.md)
COLLAPSED_SPREAD = 0.9
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


def shadow_spread(encoder, shadow, mean, std, device) -> float | None:
    """Mean pairwise cosine of the unstamped shadow embeddings (None for fewer than 2 images): how close together
    the encoder puts clean images before any trigger."""
    if len(shadow) < 2:
        return None
    return mean_pairwise_cos_of_units(unit_embeddings(encoder, shadow, mean, std, device))


def verdict_notes(found: bool, spread: float | None, thres: float) -> list[str]:
    """What the paper's verdict does not say: no trigger converged (CLEAN by the epoch budget, not by a large
    trigger), or the embeddings were collapsed before any trigger (TROJANED on no evidence)."""
    notes = [] if found else [f"no trigger converged (none reached |cos| > {thres:g})"]
    if spread is not None and spread >= COLLAPSED_SPREAD:
        notes.append(f"collapsed embeddings (shadow spread {spread:.3f} >= {COLLAPSED_SPREAD:g}: a small trigger is "
                     "no evidence)")
    return notes


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
        raise ValueError(f"--target_templates {kind!r}: choose auto, paper (80 prompts), simple (7) or one")


def resolve_templates(kind: str, device) -> str:
    """--target_templates auto: the paper's 80 on CUDA, one on the CPU, where 80 prompts per name (80,000 for the
    ImageNet classes) keep the text tower busy for about an hour (docs/target.md)."""
    check_template_set(kind)
    if kind != "auto":
        return kind
    return "paper" if torch.device(device).type == "cuda" else "one"


def prompt_templates(kind: str = "paper") -> list:
    """'paper': CLIP's 80 ImageNet templates (as in DECREE's imagenet.py); 'simple': open_clip's 7-template subset,
    about 11x cheaper; 'one': 'a photo of a {name}.' (one of the 80). Each template is a callable name -> prompt."""
    check_template_set(kind)
    if kind == "auto":
        raise ValueError("--target_templates auto is resolved per device first (resolve_templates)")
    from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES, SIMPLE_IMAGENET_TEMPLATES
    if kind == "one":
        return [ONE_TEMPLATE.format]
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


NAMING_BATCH = 256  # prompts per progress step


@torch.no_grad()
def name_embeddings(encode_text, names: list[str], templates: list, progress: bool = False) -> torch.Tensor:
    """Zero-shot classifier rows: per name, the normalised mean of its normalised prompt embeddings: (V,D)."""
    from tqdm import tqdm
    step = max(1, NAMING_BATCH // len(templates))  # names per text-tower call
    rows = []
    with tqdm(total=len(names), desc="naming the target", unit="name", disable=not progress,
              dynamic_ncols=True) as bar:
        for first in range(0, len(names), step):
            chunk = names[first:first + step]
            prompts = [template(name) for name in chunk for template in templates]
            units = F.normalize(encode_text(prompts).float(), dim=1).view(len(chunk), len(templates), -1)
            rows.append(F.normalize(units.mean(dim=1), dim=1).cpu())
            bar.update(len(chunk))
    return torch.cat(rows)


def name_cache_path(folder: Path, encode_text, names: list[str], templates: list) -> Path:
    """The cache file of a vocabulary's name embeddings: keyed by the text tower's weights, the names and the
    prompts (as the shadow cache is keyed by what its tensor depends on)."""
    text = json.dumps({"tower": encode_text.fingerprint(), "names": names,
                       "templates": [template("{}") for template in templates]})
    return Path(folder) / f"names-{hashlib.sha256(text.encode()).hexdigest()[:32]}.pt"


def cached_name_embeddings(encode_text, names: list[str], templates: list, cache_dir=None,
                           progress: bool = False) -> tuple[torch.Tensor, bool]:
    """(name embeddings (V,D), whether they came from the cache); cached under cache_dir when the text encoder
    has a fingerprint (models.text_tower.TextEncoder). A cache file of the wrong shape is recomputed."""
    path = name_cache_path(cache_dir, encode_text, names, templates) \
        if cache_dir is not None and hasattr(encode_text, "fingerprint") else None
    if path is not None and path.is_file():
        try:
            cached = torch.load(path, map_location="cpu", weights_only=True)
            if isinstance(cached, torch.Tensor) and cached.dim() == 2 and cached.shape[0] == len(names):
                return cached.float(), True
        except (OSError, RuntimeError, ValueError, EOFError):
            pass  # a damaged cache file is recomputed below
    embeddings = name_embeddings(encode_text, names, templates, progress)
    if path is not None:
        atomic.write_torch(path, embeddings.contiguous().clone())
    return embeddings, False


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
    templates: str = "paper"                    # a TEMPLATE_SETS entry other than auto (resolve_templates)
    name_cache: Path | None = None              # folder of cached name embeddings, or None


def check_target_flags(job, usage_info: str) -> None:
    """What can be checked of the target flags before the encoder loads (which takes a while for big ones)."""
    check_template_set(job.target_templates)
    for flag, path in (("--reference_file", job.reference_file), ("--text_tower", job.text_tower)):
        if path and not Path(path).is_file():
            raise FileNotFoundError(f"{flag} {path}: no such file")
    if job.reference_text and not job.text_tower and usage_info != "CLIP":
        raise DataError(f"--reference_text needs a CLIP text tower and {job.encoder_path} has none; pass a full "
                        f"CLIP file of the same arch (e.g. OpenAI's RN50.pt) with --text_tower")


def prepare_target(job, spec, device, log=print) -> TargetSetup:
    """Load the truth (reference images / text) and the text tower a run's flags ask for (job: DetectionJob);
    `log` takes the line that says how the target will be named."""
    setup = TargetSetup(reference_file=job.reference_file, reference_text=job.reference_text,
                        templates=resolve_templates(job.target_templates, device),
                        name_cache=job.shadow_cache_dir())
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
        if job.target_templates == "auto":
            count = len(prompt_templates(setup.templates))
            log(f"naming the target: {len(setup.vocabulary)} names x {count} template(s) ({setup.templates}, "
                f"--target_templates auto on {torch.device(device).type}; paper = CLIP's 80 templates), name "
                "embeddings cached per text tower")
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


def analyse_target(setup: TargetSetup, encoder, spec, shadow, result, device, path: Path,
                   progress: bool = False) -> dict | None:
    """Recover the target under the best trigger, write it to `path`, compare it with the truth and name it.

    Returns the run JSON's `target` section, or None when no trigger was found (any old target file is removed).
    Interrupted or failed after writing `path` (e.g. Ctrl-C while naming), it removes it: no partial output.
    """
    path = Path(path)
    if not result.found:
        path.unlink(missing_ok=True)
        return None
    target = recover_target(encoder, shadow, result.mask, result.pattern, spec.mean, spec.std, device)
    save_target(path, target.vector)
    try:
        return _describe_target(setup, target, encoder, spec, device, path, progress)
    except BaseException:
        path.unlink(missing_ok=True)
        raise


def _describe_target(setup: TargetSetup, target: RecoveredTarget, encoder, spec, device, path: Path,
                     progress: bool) -> dict:
    summary = {"file": path.name, "dim": int(target.vector.numel()), "spread": target.spread,
               "images": target.images}
    truth = true_target(setup, encoder, spec, device)
    if truth is not None:
        kind, source, vector = truth
        check_dims(target.vector, vector, f"the {kind} target")
        summary["reference"] = {"kind": kind, "source": source, "cos": float(vector @ target.vector)}
    if setup.vocabulary:
        templates = prompt_templates(setup.templates)
        started = time.time()
        embeddings, cached = cached_name_embeddings(setup.encode_text, setup.vocabulary, templates, setup.name_cache,
                                                    progress)
        check_dims(target.vector, embeddings[0], "the text tower")
        summary["names"] = top_names(target.vector, embeddings, setup.vocabulary)
        summary["vocabulary"] = {"source": setup.vocabulary_source, "size": len(setup.vocabulary),
                                 "templates": setup.templates, "prompts": len(setup.vocabulary) * len(templates),
                                 "cached": cached, "seconds": time.time() - started}
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
        vocab = target["vocabulary"]
        how = "cached" if vocab.get("cached") else f"{vocab.get('seconds', 0):.0f} s"
        lines.append(f"target named ({vocab['size']} names, {vocab['templates']} templates, {how}): {names}")
    return lines
