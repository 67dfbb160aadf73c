"""Sweeps: DECREE over many encoders (run_decree.py), one main.py process per encoder, and the sweep's report.

discovery (which encoders, their labels), shards (Slurm arrays), claims (one sweep per encoder at a time),
workers (the main.py fork servers and command lines), pool (the sweep itself), outputs (the sweep's own files),
report (summary table and figures), metrics (AUROC, ROC, TPR/FPR: one rule for who counts, also for the
benchmarks), figures, export (challenge-style predictions). The detector itself is `decree/`.
"""
