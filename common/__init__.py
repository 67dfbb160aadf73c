"""Shared infrastructure that every package may import: atomic file writing, device selection, provenance.

It imports no other package of this project.
"""
