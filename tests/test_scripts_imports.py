"""The scripts beside the package (benchmarks/, docs/, training/, scripts/) import names that exist: a module moved
inside the package (issue 18's io split) once left three of them failing at their first line."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = sorted(p for folder in ("benchmarks", "docs", "training", "scripts") for p in (ROOT / folder).glob("*.py"))


def _package_imports(path: Path) -> list[tuple[str, str]]:
    """(module, name) of every ``from napari_wsss_cram... import name`` in ``path``, at any depth."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "napari_wsss_cram":
            found += [(node.module, alias.name) for alias in node.names]
    return found


def test_there_are_scripts_to_check():
    assert len(SCRIPTS) >= 10 and any(_package_imports(p) for p in SCRIPTS)


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_every_package_import_of_the_script_resolves(script):
    missing = []
    for module_name, name in _package_imports(script):
        module = importlib.import_module(module_name)
        if not hasattr(module, name):
            try:
                importlib.import_module(f"{module_name}.{name}")
            except ImportError:
                missing.append(f"{module_name}.{name}")
    assert not missing, f"{script.relative_to(ROOT)} imports names that do not exist: {', '.join(missing)}"
