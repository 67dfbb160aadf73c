"""Attack validation (docs/method.md): z-scores of text-target CLIP encoders, downstream CA/BA/ASR of image-target ones.

Library code lives in the modules (embed, zscore, downstream); the scripts beside them parse flags and print.
"""
