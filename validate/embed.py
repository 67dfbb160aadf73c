"""Embedding a set of uint8 images with a frozen encoder: batched, no_grad, once per encoder and image set."""
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from datasets import to_model_input
from models import check_finite


@torch.no_grad()
def embed_images(model: torch.nn.Module, images, mean, std, device="cpu", batch_size: int = 256,
                 stamp: Callable | None = None, blend: Callable | None = None, l2_normalize: bool = True,
                 desc: str = "embedding", progress: bool = True) -> torch.Tensor:
    """uint8 (N,H,W,3) images (numpy or torch) -> float32 (N,D) embeddings on `device`.

    stamp: applied to each uint8 (B,H,W,3) batch on the device (pixel-space trigger);
    blend: applied to each normalised float (B,3,H,W) batch (the paper's legacy trigger).
    """
    model.eval()
    n = len(images)
    out = []
    for start in tqdm(range(0, n, batch_size), desc=desc, disable=not progress, leave=False):
        batch = images[start:start + batch_size]
        batch = torch.from_numpy(np.ascontiguousarray(batch)) if isinstance(batch, np.ndarray) else batch
        batch = batch.to(device)
        if stamp is not None:
            batch = stamp(batch)
        x = to_model_input(batch, mean, std)
        if blend is not None:
            x = blend(x)
        features = model(x).float()
        out.append(F.normalize(features, dim=1) if l2_normalize else features)
    return check_finite(torch.cat(out))
