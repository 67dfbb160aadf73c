"""The warp test: an opt-in second model-level test beside DECREE, for triggers that are not patches
(docs/warp_test.md).

DECREE's trigger is a mask and a pattern, x' = (1-m) x + m p, and its evidence a small mask that collapses every
stamped embedding onto one point. WaNet (Nguyen & Tran, ICLR 2021, arXiv 2102.10369) stamps nothing: its trigger
resamples the whole image through a fixed smooth warp, which no small mask reproduces, so DECREE needs a large mask
and calls such encoders clean. The warp test searches the trigger space WaNet uses instead: a smooth field of
`grid` x `grid` control displacements, upsampled bicubically as WaNet upsamples its own, each bounded by `budget`
times the image side. It asks how much closer together the best such warp brings the shadow images' embeddings:

    gain = (cos_warped - cos_clean) / (1 - cos_clean)

with cos the mean pairwise cosine of the embeddings (DECREE's measure), cos_clean before any warp and cos_warped
through the warp found. 0: the warp left the embeddings as spread as they were; 1: it collapsed them onto one
point. An encoder trained to send one warp to a target reacts to warps near it far more than a clean encoder
reacts to any warp of that size: gain above `threshold` flags it. The threshold is set from clean encoders only
(docs/warp_test.md says by which rule and on which encoders); DECREE's numbers are never changed by this test.
"""
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from tqdm import tqdm

from datasets import to_model_input
from .inversion import InversionError, mean_pairwise_cos
from .target import mean_pairwise_cos_of_units, unit_embeddings

# 1.5 x the largest gain among the clean encoders of the detection benchmark's default population (seed 0: three
# toy SimCLR parents, their fine-tuned controls, the real MobileNetV2 parent and its control), rounded up to 0.01;
# docs/warp_test.md has the rule and the measurements
WARP_THRESHOLD = 0.07


@dataclass(frozen=True)
class WarpTestConfig:
    """The warp test's settings; the command-line flags (decree/cli.py) default to these."""
    budget: float = 0.0625       # each control displacement at most this fraction of the image side
    grid: int = 4                # control points per side (WaNet's k)
    steps: int = 128             # Adam steps on the field
    batch_size: int = 32         # shadow images per step
    lr: float = 0.1
    eval_images: int = 256       # shadow images the gain is measured on (all of them when fewer)
    threshold: float = WARP_THRESHOLD
    seed: int = 0                # the batch order and the evaluation sample

    def check(self) -> None:
        """ValueError naming the flag whose value cannot run."""
        if not 0 < self.budget <= 1:
            raise ValueError(f"--warp_budget must be in (0,1], not {self.budget}")
        if self.grid < 2:
            raise ValueError(f"--warp_grid must be at least 2, not {self.grid}")
        if self.steps < 1:
            raise ValueError(f"--warp_steps must be at least 1, not {self.steps}")
        if not 0 < self.threshold < 1:
            raise ValueError(f"--warp_threshold must be in (0,1), not {self.threshold}")


@dataclass
class WarpTestResult:
    """The warp test's statistic and verdict for one encoder; `flow` is the field's control displacements,
    (2, grid, grid) as nested lists, in fractions of the image side."""
    gain: float
    cos_clean: float
    cos_warped: float
    threshold: float
    displacement_px: float       # mean displacement of the warp found, in pixels
    steps: int
    eval_images: int
    seconds: float
    flow: list
    settings: dict

    @property
    def flagged(self) -> bool:
        return self.gain > self.threshold

    @property
    def score(self) -> float:
        """gain / (gain + threshold) in [0, 1): 0.5 at the threshold, increasing in the gain, like DECREE's score."""
        gain = max(self.gain, 0.0)
        return gain / (gain + self.threshold)

    def record(self) -> dict:
        return {"gain": self.gain, "flagged": self.flagged, "threshold": self.threshold, "score": self.score,
                "cos_clean": self.cos_clean, "cos_warped": self.cos_warped,
                "displacement_px": self.displacement_px, "steps": self.steps, "eval_images": self.eval_images,
                "seconds": self.seconds, "flow": self.flow, "settings": self.settings}


def identity_grid(size: int, device=None) -> torch.Tensor:
    """grid_sample's identity sampling grid for align_corners=True: float (1,size,size,2) of (x, y) in [-1,1]."""
    line = torch.linspace(-1, 1, size, device=device)
    rows, cols = torch.meshgrid(line, line, indexing="ij")
    return torch.stack([cols, rows], dim=-1)[None]


def warp_field(flow: torch.Tensor, size: int, budget: float) -> torch.Tensor:
    """Free control tensor (1,2,g,g) -> sampling field (1,size,size,2): tanh bounds each control displacement to
    `budget` of the side (2 * budget in grid_sample's [-1,1] units), bicubic upsampling smooths it (WaNet's)."""
    controls = torch.tanh(flow) * (2 * budget)
    dense = F.interpolate(controls, size=size, mode="bicubic", align_corners=True).permute(0, 2, 3, 1)
    return (identity_grid(size, flow.device) + dense).clamp(-1, 1)


def warp_pixels(images: torch.Tensor, field: torch.Tensor) -> torch.Tensor:
    """Pixels (B,S,S,3) resampled through field (1 or B,S,S,2), bilinear -> float pixels (B,S,S,3), unrounded."""
    chw = images.permute(0, 3, 1, 2).float()
    warped = F.grid_sample(chw, field.to(images.device).expand(len(images), -1, -1, -1), align_corners=True)
    return warped.permute(0, 2, 3, 1)


def displacement_px(field: torch.Tensor) -> float:
    """Mean displacement of a sampling field (1,S,S,2) from the identity, in pixels."""
    size = field.shape[1]
    return float(((field - identity_grid(size, field.device)) * (size - 1) / 2).norm(dim=-1).mean())


def batch_orders(n: int, batch_size: int, steps: int, generator: torch.Generator):
    """`steps` index batches (B,) of a shuffled pass over the n images after another; B >= 2."""
    batch_size = min(batch_size, n)
    done = 0
    while done < steps:
        order = torch.randperm(n, generator=generator)
        for first in range(0, n - batch_size + 1, batch_size):
            if done == steps:
                return
            yield order[first:first + batch_size]
            done += 1


def search_warp(encoder, shadow: torch.Tensor, mean, std, cfg: WarpTestConfig, generator: torch.Generator,
                progress: bool) -> torch.Tensor:
    """Adam on the field's controls, maximising the mean pairwise cosine of the warped batches' embeddings;
    returns the controls (1,2,g,g), detached."""
    size = shadow.shape[1]
    flow = torch.zeros(1, 2, cfg.grid, cfg.grid, device=shadow.device, requires_grad=True)  # the identity warp
    optimizer = torch.optim.Adam([flow], lr=cfg.lr)
    bar = tqdm(batch_orders(len(shadow), cfg.batch_size, cfg.steps, generator), total=cfg.steps, desc="warp test",
               unit="step", disable=not progress, leave=False, dynamic_ncols=True)
    for index in bar:
        warped = warp_pixels(shadow[index.to(shadow.device)], warp_field(flow, size, cfg.budget))
        cos = mean_pairwise_cos(encoder(to_model_input(warped, mean, std)))
        if not torch.isfinite(cos):
            raise InversionError("the encoder returned NaN/inf embeddings in the warp test")
        optimizer.zero_grad(set_to_none=True)
        (-cos).backward()
        optimizer.step()
        bar.set_postfix(cos=f"{cos.item():.3f}", refresh=False)
    return flow.detach()


def run_warp_test(encoder: torch.nn.Module, shadow, mean, std, cfg: WarpTestConfig | None = None, device="cpu",
                  progress: bool = True) -> WarpTestResult:
    """The warp test on `encoder` (normalised float (N,3,S,S) -> (N,D), frozen, eval mode) with shadow images uint8
    (N,S,S,3): the best bounded warp, then its gain measured on `eval_images` shadow images."""
    cfg = cfg or WarpTestConfig()
    cfg.check()
    started = time.time()
    device = torch.device(device)
    shadow = torch.as_tensor(shadow).to(device)
    if len(shadow) < 2:
        raise InversionError(f"the shadow set has {len(shadow)} image(s); the warp test needs at least 2")
    generator = torch.Generator().manual_seed(cfg.seed)
    with torch.enable_grad():
        flow = search_warp(encoder, shadow, mean, std, cfg, generator, progress)
    size = shadow.shape[1]
    field = warp_field(flow, size, cfg.budget)
    sample = shadow[torch.randperm(len(shadow), generator=generator)[:cfg.eval_images].to(device)]
    cos_clean = mean_pairwise_cos_of_units(unit_embeddings(encoder, sample, mean, std, device))
    with torch.no_grad():
        warped = warp_pixels(sample, field)
    cos_warped = mean_pairwise_cos_of_units(unit_embeddings(encoder, warped, mean, std, device))
    gain = (cos_warped - cos_clean) / (1 - cos_clean) if cos_clean < 1 else 0.0
    return WarpTestResult(gain=gain, cos_clean=cos_clean, cos_warped=cos_warped, threshold=cfg.threshold,
                          displacement_px=displacement_px(field), steps=cfg.steps, eval_images=len(sample),
                          seconds=time.time() - started,
                          flow=(torch.tanh(flow) * cfg.budget)[0].cpu().tolist(), settings=asdict(cfg))


def combined_verdict(decree_trojaned: bool, warp_flagged: bool | None) -> str:
    """TROJANED when either test flags the encoder; without the warp test (None), DECREE's verdict."""
    return "trojaned" if decree_trojaned or bool(warp_flagged) else "clean"


def combined_score(decree_score: float, warp_score: float | None) -> float:
    """The larger of the two scores (each 0.5 at its own threshold), so above 0.5 exactly when the combined verdict
    is TROJANED; DECREE's score without the warp test (None)."""
    return decree_score if warp_score is None else max(decree_score, warp_score)


def warp_line(record: dict) -> str:
    """One line on the warp test and the combined verdict of a run record that has them."""
    warp = record["warp_test"]
    return (f"warp test: {'FLAGGED' if warp['flagged'] else 'not flagged'}, gain {warp['gain']:.4f} (threshold "
            f"{warp['threshold']}; mean cosine {warp['cos_clean']:.4f} -> {warp['cos_warped']:.4f} through a "
            f"{warp['displacement_px']:.2f}-px warp, {warp['steps']} steps, {warp['seconds']:.1f} s); combined "
            f"verdict {record['combined_verdict'].upper()}")
