"""CLIP through open_clip (no hand-written CLIP, no download): visual tower, full model, tokenizer."""
import logging
import sys

# OpenAI's CLIP uses QuickGELU (x * sigmoid(1.702 x)) in its transformers; open_clip's plain "RN50"/"ViT-B-32"
# configs use nn.GELU, so OpenAI weights only reproduce OpenAI's embeddings in the "-quickgelu" configs.
# open_clip names ViT-B/32 "ViT-B-32"; accept the paper's/OpenAI's spelling too.
CLIP_ARCHS = {"RN50": "RN50-quickgelu", "ViT-B/32": "ViT-B-32-quickgelu", "ViT-B-32": "ViT-B-32-quickgelu"}


# the paper's sweep (run_decree.py) passes --arch resnet50 for CLIP encoders: it means the RN50 visual tower
CLIP_ALIASES = {"resnet50": "RN50"}
_noted = set()


def clip_arch(arch: str) -> str:
    """The CLIP arch an --arch value means (the paper's resnet50 -> RN50, with a note on stderr once)."""
    if arch in CLIP_ALIASES and arch not in _noted:
        _noted.add(arch)
        print(f"note: --arch {arch} with CLIP means {CLIP_ALIASES[arch]}, as in the paper's sweep", file=sys.stderr)
    return CLIP_ALIASES.get(arch, arch)


def open_clip_name(arch: str) -> str:
    if arch not in CLIP_ARCHS:
        raise ValueError(f"unknown CLIP arch {arch!r}; choose one of RN50, ViT-B/32")
    return CLIP_ARCHS[arch]


def clip_model(arch: str = "RN50"):
    """A randomly initialised full open_clip CLIP model (weights come from a checkpoint)."""
    import open_clip
    # open_clip warns "no pretrained weights loaded" on every build; that is the point here
    logging.getLogger().setLevel(max(logging.getLogger().level, logging.ERROR))
    return open_clip.create_model(open_clip_name(arch), pretrained=None)


def clip_visual(arch: str = "RN50"):
    return clip_model(arch).visual


def clip_tokenizer(arch: str = "RN50"):
    """open_clip's bundled BPE tokenizer: list[str] -> int64 (N, 77)."""
    import open_clip
    return open_clip.get_tokenizer(open_clip_name(arch))


def clip_embed_dim(arch: str) -> int:
    return 1024 if open_clip_name(arch) == "RN50-quickgelu" else 512
