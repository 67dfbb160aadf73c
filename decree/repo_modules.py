"""The checkout's top-level packages `common`, `datasets` and `models`, bound privately where the names are taken.

The paper's code layout keeps these packages at the top level, and other packages use the same names (Hugging
Face's `datasets`). Inside `repo_modules()` the names mean this checkout's packages; outside, sys.modules holds
what it held before, so another `datasets` imported before or after decree stays that package. The checkout's
modules are kept here between uses; the ones a plain `import` would find anyway stay in sys.modules, so that
scripts run from the checkout never load a second copy of them.

Only the standard library is imported here: decree/__init__.py enters the context before anything else.
"""
import importlib.util
import os
import sys
from contextlib import contextmanager

ROOT = os.path.dirname(os.path.dirname(os.path.realpath(__file__)))
SHARED_NAMES = ("common", "datasets", "models")
_private = {}  # the checkout's modules that are bound only inside repo_modules(), by module name


def is_ours(module) -> bool:
    """Whether `module` was loaded from this checkout."""
    origin = getattr(getattr(module, "__spec__", None), "origin", None) or getattr(module, "__file__", None)
    return bool(origin) and os.path.realpath(origin).startswith(ROOT + os.sep)


def pop_package(name: str) -> dict:
    """Remove the package `name` and its submodules from sys.modules; returns them by name."""
    return {key: sys.modules.pop(key) for key in list(sys.modules) if key == name or key.startswith(name + ".")}


def plain_import_finds_ours(name: str) -> bool:
    """Whether `import name`, with sys.modules holding no such package, would load this checkout's package."""
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return False
    return spec is not None and bool(spec.origin) and os.path.realpath(spec.origin).startswith(ROOT + os.sep)


@contextmanager
def repo_modules():
    """Inside: `common`, `datasets` and `models` are this checkout's packages, imported from it when needed."""
    displaced, bound = {}, []
    for name in SHARED_NAMES:
        current = sys.modules.get(name)
        if current is not None and is_ours(current):
            continue
        displaced.update(pop_package(name))
        sys.modules.update({key: module for key, module in _private.items()
                            if key == name or key.startswith(name + ".")})
        bound.append(name)
    sys.path.insert(0, ROOT)
    try:
        yield
    finally:
        sys.path.remove(ROOT)  # the first equal entry: the one inserted above
        for name in bound:
            ours = pop_package(name)
            if name not in displaced and plain_import_finds_ours(name):
                sys.modules.update(ours)
            else:
                _private.update(ours)
        sys.modules.update(displaced)
