"""Imports run one way: core <- jobs <- the CLI and pipelines, and core <- the read side.

The core (featurestore/*.py) imports neither jobs (featurestore.ingest) nor the read side
(featurestore.queries); jobs do not import the read side; the read side does not import jobs;
only the top layer (the CLI and the pipelines that run many jobs) imports everything. Read from
the source, so an import inside a function counts too.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TOP = {"featurestore.cli", "featurestore.__main__", "featurestore.demo",
       "featurestore.grokking_experiment"}
# What each layer may not import (a prefix of the imported module's name).
FORBIDDEN = {
    "core": ("featurestore.ingest", "featurestore.queries", *sorted(TOP)),
    "jobs": ("featurestore.queries", *sorted(TOP)),
    "read side": ("featurestore.ingest", *sorted(TOP)),
}
PACKAGES = {"featurestore", "featurestore.ingest", "featurestore.queries"}


def modules() -> dict[str, tuple[str, Path]]:
    """Every module of the package: name -> (layer, file)."""
    found = {}
    for folder, package, layer in ((ROOT / "featurestore", "featurestore", "core"),
                                   (ROOT / "ingest", "featurestore.ingest", "jobs"),
                                   (ROOT / "queries", "featurestore.queries", "read side")):
        for path in sorted(folder.glob("*.py")):
            name = package if path.stem == "__init__" else f"{package}.{path.stem}"
            found[name] = ("top" if name in TOP else layer, path)
    return found


def imported(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            if node.module in PACKAGES:  # `from featurestore.ingest import collect`: a module
                names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def wrong_way() -> set[tuple[str, str]]:
    found = set()
    for name, (layer, path) in modules().items():
        for target in imported(path):
            if any(target == p or target.startswith(p + ".")
                   for p in FORBIDDEN.get(layer, ())):
                found.add((name, target))
    return found


def test_imports_run_one_way():
    assert wrong_way() == set()


def test_the_check_sees_an_import_the_wrong_way(tmp_path, monkeypatch):
    # A core module importing a job, and a job importing the read side, inside functions.
    (tmp_path / "featurestore").mkdir()
    (tmp_path / "featurestore" / "odd.py").write_text(
        "def f():\n    from featurestore.ingest.collect import collect\n")
    (tmp_path / "ingest").mkdir()
    (tmp_path / "ingest" / "job.py").write_text(
        "def g():\n    from featurestore.queries import plots\n")
    (tmp_path / "queries").mkdir()
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    assert wrong_way() == {("featurestore.odd", "featurestore.ingest.collect"),
                           ("featurestore.ingest.job", "featurestore.queries"),
                           ("featurestore.ingest.job", "featurestore.queries.plots")}
    assert imported(tmp_path / "featurestore" / "odd.py") == {"featurestore.ingest.collect"}


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_every_layer_has_modules(layer):
    assert any(found == layer for found, _ in modules().values())
