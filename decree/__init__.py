"""DECREE: detecting backdoors in pre-trained self-supervised image encoders."""
