"""CLIP text towers, for naming what a backdoor targets: `encode_text(list[str]) -> float32 (N, D)`.

A text tower is available when a checkpoint holds the full CLIP model (the paper's full-CLIP files, OpenAI's
TorchScript archives): its `token_embedding.`, `transformer.`, `ln_final.`, `positional_embedding` and
`text_projection` entries. Visual-only checkpoints (the paper's attacked encoders) have none; a full CLIP file of
the same arch (e.g. OpenAI's RN50.pt) can lend its text tower. Other formats plug in by returning a TextEncoder
(any object with `encode_text(tokens)` and a tokenizer) from `load_text_encoder`.
"""
import contextlib
import hashlib

import torch

from .checkpoint import CheckpointError, extract_state_dict, load_into, read_checkpoint
from .clip import clip_model, clip_tokenizer

# entries of OpenAI's archives that are settings, not weights
_OPENAI_SETTINGS = ("input_resolution", "context_length", "vocab_size")


class TextEncoder:
    """Callable list[str] -> float32 (N, D) text embeddings (not normalised), batched, without gradients."""

    def __init__(self, model, tokenizer, device="cpu", batch_size: int = 512):
        self.model, self.tokenizer, self.device, self.batch_size = model, tokenizer, torch.device(device), batch_size

    def fingerprint(self) -> str:
        """sha256 of the text tower's weights (names, dtypes, shapes, bytes): what its text embeddings depend on
        besides the tokenizer, so a cache keyed by it serves every encoder that shares the tower."""
        digest = hashlib.sha256(type(self.tokenizer).__name__.encode())
        for name, tensor in sorted(self.model.state_dict().items()):
            tensor = tensor.detach().cpu().contiguous()
            digest.update(f"{name} {tensor.dtype} {tuple(tensor.shape)}".encode())
            digest.update(tensor.reshape(-1).view(torch.uint8).numpy())
        return digest.hexdigest()

    @torch.no_grad()
    def __call__(self, texts: list[str]) -> torch.Tensor:
        tokens = self.tokenizer(list(texts))
        chunks = []
        for first in range(0, len(tokens), self.batch_size):
            batch = tokens[first:first + self.batch_size]
            with _context_of(self.model, batch) as length:
                chunks.append(self.model.encode_text(batch[:, :length].to(self.device)).float())
        return torch.cat(chunks)


@contextlib.contextmanager
def _context_of(model, tokens: torch.Tensor):
    """The text tower runs on the batch's tokens up to its longest prompt instead of all 77 positions: with
    CLIP's causal mask no position sees the padding after it, and the embedding is read at the end-of-text
    token (argmax pooling), so the result is the same, for a fraction of the work (ImageNet prompts are 7 to
    25 tokens). Towers pooled otherwise, or without a causal mask, run at full length."""
    full = tokens.shape[1]
    length = int((tokens != 0).sum(dim=1).max()) if tokens.numel() else full
    pe, mask = getattr(model, "positional_embedding", None), getattr(model, "attn_mask", None)
    if getattr(model, "text_pool_type", None) != "argmax" or pe is None or mask is None or length >= full:
        yield full
        return
    model.positional_embedding = torch.nn.Parameter(pe[:length], requires_grad=False)
    model.attn_mask = mask[:length, :length]
    try:
        yield length
    finally:
        model.positional_embedding, model.attn_mask = pe, mask


def text_state_dict(sd: dict) -> dict:
    """The text-tower entries of a full CLIP state dict (any `module.` prefix stripped); {} for a visual tower."""
    if sd and all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    return {k: v for k, v in sd.items() if not k.startswith("visual.") and k not in _OPENAI_SETTINGS}


def load_text_encoder(path, arch: str = "RN50", device="cpu", trust_checkpoint: bool = False) -> TextEncoder | None:
    """The text tower of a full CLIP checkpoint of `arch`, or None when the file holds a visual tower only."""
    sd = text_state_dict(extract_state_dict(read_checkpoint(path, trust_checkpoint), path))
    if "token_embedding.weight" not in sd:
        return None
    model = clip_model(arch)
    model.visual = torch.nn.Identity()  # the image side is the encoder under test, loaded on its own
    try:
        load_into(model, sd, path, tried=f"the CLIP {arch} text tower")
    except CheckpointError as err:
        raise CheckpointError(f"{err} (or pass a full CLIP file of that arch with --text_tower)") from None
    return TextEncoder(model.to(device).eval(), clip_tokenizer(arch), device)
