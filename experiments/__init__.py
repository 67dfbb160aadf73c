"""Experiments built on the detector and the attacks: the demo, speed benchmarks, the paper's data path."""
