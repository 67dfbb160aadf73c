"""DECREE: detecting backdoors in pre-trained self-supervised image encoders (Feng et al., CVPR 2023,
arXiv 2303.15180). From Python: `from decree import scan` (decree/api.py, README.md "Python")."""
from .repo_modules import repo_modules

__all__ = ["ScanResult", "scan"]

with repo_modules():
    import common  # noqa: F401  first: it stops Pythons older than 3.10 with one line
    from .api import ScanResult, scan
