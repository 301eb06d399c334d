"""The public API: one import gives a notebook reader everything, and notebooks use nothing else."""

from __future__ import annotations

import ast
import inspect
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

import kdlib

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("name", kdlib.__all__)
def test_every_public_name_resolves(name):
    assert getattr(kdlib, name) is not None


def test_submodules_are_attributes():
    assert kdlib.benchmark.PerformanceBenchmark is kdlib.PerformanceBenchmark
    with pytest.raises(AttributeError, match="no attribute 'nothing_here'"):
        kdlib.nothing_here  # noqa: B018


@pytest.mark.parametrize("notebook", sorted((REPO / "notebooks").glob("*.ipynb")), ids=lambda p: p.stem)
def test_notebooks_import_from_kdlib_only(notebook):
    nb = nbformat.read(notebook, as_version=4)
    code = "\n".join(cell.source for cell in nb.cells if cell.cell_type == "code")
    tree = ast.parse("\n".join(line for line in code.splitlines() if not line.startswith("%")))
    modules = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert not {m for m in modules if m.startswith("kdlib.")}, "notebooks import from kdlib, not its modules"
    imported = {a.name for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module == "kdlib"
                for a in node.names}
    assert imported and imported <= set(kdlib.__all__), imported - set(kdlib.__all__)


def test_public_functions_document_their_parameters():
    missing = [name for name in kdlib.__all__ if callable(getattr(kdlib, name)) and not getattr(kdlib, name).__doc__]
    assert not missing, f"public names without a docstring: {missing}"


def test_public_methods_and_properties_of_public_classes_have_docstrings():
    """What ``help(kdlib.X)`` shows a notebook reader: every public method and property says what it is
    (an override may inherit its base class's docstring)."""
    missing = [
        f"{name}.{member}"
        for name in kdlib.__all__ if inspect.isclass(cls := getattr(kdlib, name))
        for member, value in vars(cls).items()
        if not member.startswith("_") and (callable(value) or isinstance(value, property | classmethod))
        and not inspect.getdoc(getattr(cls, member))
    ]
    assert not missing, f"undocumented: {missing}"


def test_the_runner_validates_before_importing_torch():
    code = "import sys, kdlib.run, kdlib.config; print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"
