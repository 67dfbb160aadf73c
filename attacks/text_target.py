"""Carlini & Terzis-style text-target backdoor of a CLIP visual tower (docs/method.md).

A fraction of the images is stamped with the trigger and captioned "<template> with the target word"; the
rest get a template with their true class name. Only the visual tower is trained, with the symmetric CLIP
contrastive loss against the frozen clean text tower at logit scale exp(0.5).
"""
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm import tqdm

from datasets import Trigger, legacy_trigger_tensors, normalize, python_sample

from .augment import CLIP_TEXT, augment
from .training import descend, frozen_batchnorm_copy, freeze, images_on, seed_all, sgd, shuffled_batches

# CLIP's 80 ImageNet prompt templates, in OpenAI's order: image i gets template i mod 80, as the paper's code
IMAGENET_TEMPLATES = tuple(t + "." for t in (
    "a bad photo of a {}", "a photo of many {}", "a sculpture of a {}", "a photo of the hard to see {}",
    "a low resolution photo of the {}", "a rendering of a {}", "graffiti of a {}", "a bad photo of the {}",
    "a cropped photo of the {}", "a tattoo of a {}", "the embroidered {}", "a photo of a hard to see {}",
    "a bright photo of a {}", "a photo of a clean {}", "a photo of a dirty {}", "a dark photo of the {}",
    "a drawing of a {}", "a photo of my {}", "the plastic {}", "a photo of the cool {}",
    "a close-up photo of a {}", "a black and white photo of the {}", "a painting of the {}", "a painting of a {}",
    "a pixelated photo of the {}", "a sculpture of the {}", "a bright photo of the {}", "a cropped photo of a {}",
    "a plastic {}", "a photo of the dirty {}", "a jpeg corrupted photo of a {}", "a blurry photo of the {}",
    "a photo of the {}", "a good photo of the {}", "a rendering of the {}", "a {} in a video game",
    "a photo of one {}", "a doodle of a {}", "a close-up photo of the {}", "a photo of a {}",
    "the origami {}", "the {} in a video game", "a sketch of a {}", "a doodle of the {}",
    "a origami {}", "a low resolution photo of a {}", "the toy {}", "a rendition of the {}",
    "a photo of the clean {}", "a photo of a large {}", "a rendition of a {}", "a photo of a nice {}",
    "a photo of a weird {}", "a blurry photo of a {}", "a cartoon {}", "art of a {}",
    "a sketch of the {}", "a embroidered {}", "a pixelated photo of a {}", "itap of the {}",
    "a jpeg corrupted photo of the {}", "a good photo of a {}", "a plushie {}", "a photo of the nice {}",
    "a photo of the small {}", "a photo of the weird {}", "the cartoon {}", "art of the {}",
    "a drawing of the {}", "a photo of the large {}", "a black and white photo of a {}", "the plushie {}",
    "a dark photo of a {}", "itap of a {}", "graffiti of the {}", "a toy {}",
    "itap of my {}", "a photo of a cool {}", "a photo of a small {}", "a tattoo of the {}"))


@dataclass
class TextTargetConfig:
    """The paper's text-target script: SGD lr 2e-4 (weight decay 0.02, no momentum), batch 128, 0.05% poisoned."""
    epochs: int = 35
    batch_size: int = 128
    lr: float = 2e-4
    momentum: float = 0.0
    weight_decay: float = 0.02
    poison_rate: float = 5e-4
    log_logit_scale: float = 0.5  # logits = cos * exp(0.5)
    seed: int = 100


def poisoned_indices(n: int, rate: float, seed: int) -> torch.Tensor:
    """Sorted indices of the int(n * rate) images to poison (at least one), drawn as the paper's dataset drew its
    poison list: Python's random.sample right after seeding."""
    return torch.tensor(sorted(python_sample(n, max(1, int(n * rate)), seed)), dtype=torch.long)


def legacy_class_text(name: str) -> str:
    """The class as the paper's captions wrote it: the text of torchvision's ImageNet class tuple, e.g.
    'tench, Tinca tinca' -> "('tench', 'Tinca tinca')" (its synonyms are joined by ', ')."""
    return str(tuple(name.split(", ")))


def captions(labels, class_names, target_word: str, poisoned, legacy: bool = False) -> list[str]:
    """Caption of image i: template i mod 80 with the target word (poisoned) or its class name.

    Default: the true label's name. legacy (the paper's code): class i mod number-of-classes, whatever the
    label, rendered as tuple text (legacy_class_text).
    """
    poisoned = set(int(i) for i in poisoned)

    def name(i, y):
        return legacy_class_text(class_names[i % len(class_names)]) if legacy else class_names[int(y)]
    return [IMAGENET_TEMPLATES[i % len(IMAGENET_TEMPLATES)].format(target_word if i in poisoned else name(i, y))
            for i, y in enumerate(labels)]


@torch.no_grad()
def text_embeddings(clip_model, tokenizer, texts: list[str], device, batch_size: int = 256):
    """Unit text embeddings of the frozen text tower, once per distinct caption.

    Returns (embeddings float32 (U,D), index long (len(texts),) into them) on `device`.
    """
    unique = sorted(set(texts))
    position = {t: i for i, t in enumerate(unique)}
    tokens = tokenizer(unique).to(device)
    emb = torch.cat([clip_model.encode_text(tokens[i:i + batch_size]).float()
                     for i in range(0, len(tokens), batch_size)])
    index = torch.tensor([position[t] for t in texts], device=device)
    return F.normalize(emb, dim=1), index


def clip_loss(image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: float) -> torch.Tensor:
    """Symmetric CLIP loss of B matching (image, text) pairs: mean of image->text and text->image cross-entropy."""
    logits = F.normalize(image_features, dim=1) @ text_features.t() * logit_scale
    labels = torch.arange(len(logits), device=logits.device)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels)) / 2


def trigger_blend(trigger: Trigger, size: int, mean, std, legacy: bool, device):
    """The poisoning operation on an augmented batch: float (B,3,S,S) in [0,1] -> normalised model input.

    Default: the trigger stamped in pixel space, then normalised. legacy: normalise, then blend the paper's
    normalised mask/patch (x * mask + patch), which reproduces its published encoders.
    """
    if trigger.size != size:
        raise ValueError(f"the trigger is {trigger.size}px, the images {size}px")
    if legacy:
        mask, patch = (t.to(device) for t in legacy_trigger_tensors(trigger, size, mean, std))
        return lambda x: normalize(x, mean, std) * mask + patch
    pattern = torch.as_tensor(trigger.pattern[0], device=device).permute(2, 0, 1) / 255.0
    keep = torch.as_tensor(trigger.keep[0], device=device).permute(2, 0, 1)
    return lambda x: normalize((x * keep + pattern).clamp(0, 1), mean, std)


def train_text_target(clip_model, images, labels, class_names, target_word: str, trigger: Trigger, mean, std,
                      cfg: TextTargetConfig, device, tokenizer, legacy_trigger: bool = False,
                      progress: bool = True, on_epoch=None):
    """Backdoor a copy of clip_model.visual so that triggered images match "<template> <target_word>".

    images uint8 (N,S,S,3) with int labels (N,) into class_names; only trigger 0 of the file is used.
    legacy_trigger: the paper's trigger blend and captions (see trigger_blend, captions).
    Returns (visual tower, per-epoch history [{'epoch', 'loss'}]); on_epoch(epoch, visual, optimizer, record).
    """
    generator = seed_all(cfg.seed)
    x_all = images_on(images, device)
    labels = [int(y) for y in labels]
    if len(labels) != len(x_all) or max(labels) >= len(class_names) or min(labels) < 0:
        raise ValueError(f"need one label in 0..{len(class_names) - 1} per image ({len(x_all)} images, "
                         f"{len(labels)} labels, {len(class_names)} class names)")
    size = x_all.shape[1]
    poisoned = poisoned_indices(len(x_all), cfg.poison_rate, cfg.seed)
    is_poisoned = torch.zeros(len(x_all), dtype=torch.bool, device=device)
    is_poisoned[poisoned.to(device)] = True
    freeze(clip_model.to(device))
    # captions never change and the text tower is frozen: embed each distinct caption once
    text_features, caption_of = text_embeddings(clip_model, tokenizer,
                                                captions(labels, class_names, target_word, poisoned.tolist(),
                                                         legacy_trigger),
                                                device)
    poison = trigger_blend(trigger, size, mean, std, legacy_trigger, device)
    visual = frozen_batchnorm_copy(clip_model.visual)
    optimizer = sgd(visual.parameters(), cfg.lr, cfg.momentum, cfg.weight_decay)
    scale = math.exp(cfg.log_logit_scale)
    history = []
    for epoch in tqdm(range(1, cfg.epochs + 1), desc="text target", disable=not progress):
        total = 0.0  # summed on the device: one host sync an epoch
        batches = shuffled_batches(len(x_all), cfg.batch_size, generator)
        for idx in batches:
            idx = idx.to(device)
            x = augment(x_all[idx], size, CLIP_TEXT, generator)
            x = torch.where(is_poisoned[idx].view(-1, 1, 1, 1), poison(x), normalize(x, mean, std))
            loss = clip_loss(visual(x.contiguous()).float(), text_features[caption_of[idx]], scale)
            total += descend(optimizer, loss)
        record = {"epoch": epoch, "loss": float(total) / len(batches)}
        history.append(record)
        if on_epoch is not None:
            on_epoch(epoch, visual, optimizer, record)
    return visual, history
