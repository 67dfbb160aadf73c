"""Shared infrastructure that every package may import: atomic file writing, device selection, provenance.

It imports no other package of this project. Every entry point imports it first, so an older Python stops here
with one line (requirements.txt); this file keeps to syntax that older Pythons can read.
"""
import sys

if sys.version_info < (3, 10):
    sys.exit("DECREE needs Python 3.10 or newer; this is Python %d.%d" % sys.version_info[:2])
