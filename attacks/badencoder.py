"""BadEncoder (S&P 2022), image target (docs/method.md): fine-tune f from the clean f0 so that triggered inputs embed
like the reference input while clean inputs and the reference keep their clean embeddings.

    L0 = -mean cos(f(stamp_i(x)), f(r_i))    effectiveness
    L1 = -mean cos(f(aug(r_i)), f0(r_i))     the reference keeps its clean embedding
    L2 = -mean cos(f(x), f0(x))              utility (with WaNet's noise mode, also over noise-warped x)
    loss = L0 + lambda1 * L1 + lambda2 * L2   (DRUPE adds its terms through an objective: attacks.drupe)

The trigger is a trigger file (datasets.Trigger: x * keep + pattern, one per reference or one for all), a
function of the image batch (attacks.families), or None: a clean fine-tuned control with the same data and
epochs, whose loss keeps only the reference and utility terms.
"""
import math
from dataclasses import dataclass, replace
from functools import partial

import torch
import torch.nn.functional as F
from tqdm import tqdm

from datasets import Trigger, normalize, stamp, to_model_input

from .augment import reference_augment
from .training import (TrainingError, descend, freeze, frozen_batchnorm_copy, images_on, seed_all, sgd,
                       shuffled_batches, unit_embeddings)


@dataclass
class BadEncoderConfig:
    """SGD hyper-parameters of BadEncoder for SimCLR/ImageNet encoders (see preset() for CLIP)."""
    epochs: int = 35
    batch_size: int = 256
    lr: float = 1e-3
    lambda1: float = 1.0
    lambda2: float = 1.0
    momentum: float = 0.9
    weight_decay: float = 5e-4
    seed: int = 100


def preset(usage_info: str, **overrides) -> BadEncoderConfig:
    """The paper's config for a usage info (CLIP: weight decay 0.02, no momentum); None overrides are ignored."""
    cfg = BadEncoderConfig(momentum=0.0, weight_decay=0.02) if usage_info == "CLIP" else BadEncoderConfig()
    return replace(cfg, **{k: v for k, v in overrides.items() if v is not None})


def trigger_of_reference(n_triggers: int, n_references: int) -> torch.Tensor:
    """Which trigger leads to each reference: trigger i to reference i, or one trigger to every reference."""
    if n_triggers == n_references:
        return torch.arange(n_references)
    if n_triggers == 1:
        return torch.zeros(n_references, dtype=torch.long)
    raise ValueError(f"the trigger file holds {n_triggers} triggers for {n_references} reference inputs; "
                     "give one trigger, or one per reference")


def trigger_functions(trigger, size: int, device) -> list:
    """The trigger as a list of functions uint8 (B,H,W,3) -> uint8 (B,H,W,3): one per trigger of a file, the
    function itself, or none (a clean control)."""
    if trigger is None:
        return []
    if isinstance(trigger, Trigger):
        if trigger.size != size:
            raise ValueError(f"the trigger ({trigger.size}px) and the shadow images ({size}px) must have the same size")
        patterns = torch.as_tensor(trigger.pattern, dtype=torch.float32, device=device)
        keeps = torch.as_tensor(trigger.keep, dtype=torch.float32, device=device)
        return [partial(stamp, pattern=patterns[i], keep=keeps[i]) for i in range(len(trigger))]
    # float pixels while training where the family's authors keep poisoned images in float (WaNet)
    return [getattr(trigger, "float_fn", None) or trigger]


def noise_function(trigger):
    """The trigger's noise mode (WaNet: randomly perturbed warps kept at their clean embeddings), or None."""
    return getattr(trigger, "noise_fn", None)


@dataclass
class BatchEmbeddings:
    """The trained encoder's embeddings of one shadow batch, from one forward pass.

    raw_x (B,D) and raw_stamped (T,B,D): before normalisation (DRUPE's distribution terms use them); the rest
    unit: x (B,D), stamped (T,B,D), references (R,D), crossed (N*B,D) noise-mode images, views (R,B,D)
    augmented references.
    """
    raw_x: torch.Tensor
    raw_stamped: torch.Tensor
    x: torch.Tensor
    stamped: torch.Tensor
    references: torch.Tensor
    crossed: torch.Tensor
    views: torch.Tensor


def embed_batch(f, x, references, stampers, mean, std, generator, noise=None) -> BatchEmbeddings:
    """Embed a shadow batch x uint8 (B,H,W,3), its stamped copies, the references uint8 (R,H,W,3), their
    augmented views and the noise-mode images noise(x, generator) (float pixels), all in one forward pass."""
    b, r, t = len(x), len(references), len(stampers)
    stamped = [s(x).float() for s in stampers]  # (B,H,W,3) each, float pixels
    crossed = noise(x, generator) if noise is not None and t else x[:0].float()  # (N*B,H,W,3)
    views = reference_augment(references.repeat_interleave(b, dim=0), generator=generator)  # (R*B,3,H,W)
    # one forward pass for every input: BatchNorm is in eval mode, so batching changes nothing
    pixels = torch.cat([x.float(), *stamped, references.float(), crossed])
    inputs = torch.cat([to_model_input(pixels, mean, std), normalize(views, mean, std)])
    inputs = inputs.contiguous()  # the HWC->CHW view crashed conv backward on CPU (torch 2.15, double free)
    raw = f(inputs).float()
    z = F.normalize(raw, dim=1)
    z_x, z_stamped, z_ref, z_crossed, z_views = z.split([b, t * b, r, len(crossed), r * b])
    d = raw.shape[1]
    return BatchEmbeddings(raw[:b], raw[b:(t + 1) * b].view(t, b, d), z_x, z_stamped.view(t, b, d), z_ref,
                           z_crossed, z_views.view(r, b, d))


def reference_cosines(e: BatchEmbeddings, pairing) -> torch.Tensor:
    """Cosine of each stamped image to the reference its trigger leads to: (R,B)."""
    return (e.stamped[pairing.to(e.stamped.device)] * e.references.unsqueeze(1)).sum(-1)


def badencoder_losses(e: BatchEmbeddings, clean_x, clean_references, pairing) -> dict:
    """L0, L1, L2 of one batch; clean_x (B,D) and clean_references (R,D): unit f0 embeddings; pairing: long
    (R,) trigger index per reference, or None (no trigger: L0 = 0)."""
    losses = {"loss0": e.x.new_zeros(())}
    if pairing is not None:
        losses["loss0"] = -reference_cosines(e, pairing).mean()
    losses["loss1"] = -(e.views * clean_references.unsqueeze(1)).sum(-1).mean()
    kept = torch.cat([e.x, e.crossed])
    losses["loss2"] = -(kept * clean_x.repeat(len(kept) // len(e.x), 1)).sum(-1).mean()
    return losses


class BadEncoderObjective:
    """BadEncoder's loss, L0 + lambda1 * L1 + lambda2 * L2. An objective maps a batch's embeddings to the loss
    and the named parts the history averages (loss first); end_epoch(epoch, f, record) may add to the record."""

    def __init__(self, cfg: BadEncoderConfig):
        self.cfg = cfg

    def __call__(self, epoch: int, e: BatchEmbeddings, clean_x, clean_references, pairing) -> dict:
        losses = badencoder_losses(e, clean_x, clean_references, pairing)
        loss = losses["loss0"] + self.cfg.lambda1 * losses["loss1"] + self.cfg.lambda2 * losses["loss2"]
        return {"loss": loss, **losses}

    def end_epoch(self, epoch: int, f, record: dict) -> None:
        pass


def train_badencoder(clean_encoder: torch.nn.Module, shadow_images, trigger, references, mean, std,
                     cfg: BadEncoderConfig, device, progress: bool = True, on_epoch=None, objective=None):
    """Backdoor a copy of `clean_encoder`; returns (backdoored encoder, per-epoch history).

    shadow_images uint8 (N,H,W,3) (not augmented); references uint8 (R,H,W,3), one target per trigger (or
    several for one trigger); trigger: a trigger file, a function uint8 (B,H,W,3) -> uint8 (B,H,W,3) applied
    in pixel space, or None (clean control: no L0). objective: BadEncoderObjective(cfg) unless given (DRUPE's:
    attacks.drupe). History rows: epoch, the objective's parts averaged over the epoch (loss, loss0-2, ...)
    and what its end_epoch adds. on_epoch(epoch, encoder, optimizer, record) runs after each epoch.
    """
    objective = objective or BadEncoderObjective(cfg)
    generator = seed_all(cfg.seed)
    x_all, refs = images_on(shadow_images, device), images_on(references, device)
    if refs.shape[1:] != x_all.shape[1:]:
        raise ValueError(f"reference ({refs.shape[1]}px) and shadow images ({x_all.shape[1]}px) must have "
                         "the same size")
    stampers = trigger_functions(trigger, x_all.shape[1], device)
    noise = noise_function(trigger)
    pairing = trigger_of_reference(len(stampers), len(refs)) if stampers else None
    f0 = freeze(clean_encoder.to(device))
    # shadow images are not augmented, so f0's embeddings of them are fixed: compute them once
    clean_x = unit_embeddings(f0, x_all, mean, std, cfg.batch_size)
    clean_refs = unit_embeddings(f0, refs, mean, std)
    f = frozen_batchnorm_copy(f0)
    optimizer = sgd(f.parameters(), cfg.lr, cfg.momentum, cfg.weight_decay)
    history = []
    for epoch in tqdm(range(1, cfg.epochs + 1), desc="BadEncoder", disable=not progress):
        sums = None
        batches = shuffled_batches(len(x_all), cfg.batch_size, generator)
        for idx in batches:
            idx = idx.to(device)
            e = embed_batch(f, x_all[idx], refs, stampers, mean, std, generator, noise)
            parts = objective(epoch, e, clean_x[idx], clean_refs, pairing)
            descend(optimizer, parts["loss"])
            # the loss and its parts to the host together: one sync a step
            values = torch.stack([v.detach().float() for v in parts.values()]).tolist()
            sums = dict(zip(parts, values if sums is None else (s + v for s, v in zip(sums.values(), values))))
            if not math.isfinite(sums["loss"]):
                raise TrainingError(f"the BadEncoder loss became NaN/inf in epoch {epoch}; lower --lr")
        record = {"epoch": epoch, **{k: v / len(batches) for k, v in sums.items()}}
        objective.end_epoch(epoch, f, record)
        history.append(record)
        if on_epoch is not None:
            on_epoch(epoch, f, optimizer, record)
    return f, history
