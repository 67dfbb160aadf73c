"""Packages import downward only: infrastructure, data, models, the detector, attacks/validation/sweeps,
experiments."""
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAYER = {"common": 0, "datasets": 1, "models": 2, "decree": 3, "attacks": 4, "validate": 4, "sweeps": 4,
         "experiments": 5}


def project_imports(path: Path):
    """Top-level project packages that the module at `path` imports (absolute imports only)."""
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        for name in names:
            top = name.split(".")[0]
            if top in LAYER:
                yield top


@pytest.mark.parametrize("package", sorted(LAYER))
def test_packages_import_only_layers_below_their_own(package):
    upward = [(str(path.relative_to(ROOT)), imported)
              for path in sorted((ROOT / package).rglob("*.py"))
              for imported in project_imports(path)
              if LAYER[imported] > LAYER[package]]
    assert upward == []


def test_infrastructure_imports_no_project_package():
    imports = {imported for path in (ROOT / "common").rglob("*.py") for imported in project_imports(path)}
    assert imports <= {"common"}


def test_the_detector_imports_no_sweep_or_experiment_code():
    imports = {imported for path in (ROOT / "decree").rglob("*.py") for imported in project_imports(path)}
    assert imports.isdisjoint({"sweeps", "experiments"})
