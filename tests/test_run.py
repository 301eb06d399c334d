"""The headless runner: parameters reach the notebooks, a failing cell fails loudly and keeps the notebook."""

from __future__ import annotations

import nbformat
import pytest
from nbformat.v4 import new_code_cell, new_notebook

from kdlib.run import NotebookFailed, notebook_parameters, parse_value, run_notebooks


def _notebook(path, *cells):
    nb = new_notebook(metadata={"kernelspec": {"name": "python3", "language": "python", "display_name": "Python 3"}})
    nb.cells = [new_code_cell(source) for source in cells]
    nb.cells[0].metadata["tags"] = ["parameters"]
    nbformat.write(nb, path)
    return path


def test_only_declared_parameters_are_passed(tmp_path):
    nb = _notebook(tmp_path / "a.ipynb", "alpha = 0.5\nepochs = 1", "print(alpha)")
    assert notebook_parameters(nb, {"alpha": 0.9, "teacher": "x"}) == {"alpha": 0.9}


def test_parameters_are_injected_and_timed(tmp_path):
    nb = _notebook(tmp_path / "ok.ipynb", "value = 1", "print('value is', value)")
    timings = run_notebooks([nb], tmp_path / "out", {"value": 41}, log=lambda _: None)
    assert set(timings) == {"ok"} and timings["ok"] > 0
    executed = nbformat.read(tmp_path / "out" / "ok.ipynb", as_version=4)
    assert "value is 41" in executed.cells[-1].outputs[0]["text"]


def test_a_failing_cell_names_the_cell_and_error_and_keeps_the_partial_notebook(tmp_path):
    first = _notebook(tmp_path / "01_first.ipynb", "x = 1", "print('before')", "raise ValueError('bad alpha')")
    second = _notebook(tmp_path / "02_second.ipynb", "y = 2", "print('never')")
    with pytest.raises(NotebookFailed) as failure:
        run_notebooks([first, second], tmp_path / "out", {}, log=lambda _: None)
    assert failure.value.notebook == "01_first"
    assert failure.value.ename == "ValueError" and "bad alpha" in failure.value.evalue
    assert "01_first, cell [" in str(failure.value) and "kept at" in str(failure.value)
    partial = nbformat.read(tmp_path / "out" / "01_first.ipynb", as_version=4)
    outputs = [o for cell in partial.cells for o in cell.get("outputs", [])]
    assert any(o.get("text", "").strip() == "before" for o in outputs)
    assert not (tmp_path / "out" / "02_second.ipynb").exists(), "the run must stop at the first failure"


def test_command_line_values_are_yaml():
    assert parse_value("2") == 2 and parse_value("0.7") == 0.7
    assert parse_value("null") is None and parse_value("[int8, onnx]") == ["int8", "onnx"]
