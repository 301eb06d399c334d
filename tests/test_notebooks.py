"""The notebooks: nbval references stay in sync, nbval catches changed outputs, and the `book`
profile's code path (a teacher that is already fine-tuned, a pretrained student) runs end to end
on tiny local models, since CI has no Hugging Face Hub."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

from kdlib.data import label_names, load_intent_data, subsample
from kdlib.models import make_tiny_model, make_tiny_tokenizer, save_model
from kdlib.run import run_notebooks

REPO = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((REPO / "notebooks").glob("*.ipynb"))
REFERENCES = REPO / "tests" / "nbval"


def code_cells(path: Path) -> list[str]:
    nb = nbformat.read(path, as_version=4)
    return [
        cell.source
        for cell in nb.cells
        if cell.cell_type == "code" and "injected-parameters" not in cell.metadata.get("tags", [])
    ]


def test_there_are_three_notebooks_each_with_a_parameters_cell():
    assert [p.stem for p in NOTEBOOKS] == ["01_baseline_benchmark", "02_distill", "03_compare"]
    for path in NOTEBOOKS:
        nb = nbformat.read(path, as_version=4)
        tags = [cell.metadata.get("tags", []) for cell in nb.cells]
        assert sum("parameters" in t for t in tags) == 1, f"{path.name} needs exactly one `parameters` cell"
        # papermill's injected cell would reset a reader's edits to the parameters cell in JupyterLab
        assert not any("injected-parameters" in t for t in tags), f"{path.name} carries papermill's injected cell"


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=lambda p: p.stem)
def test_nbval_references_have_the_notebooks_code(notebook):
    reference = REFERENCES / notebook.name
    assert reference.is_file(), f"missing {reference}: run `make nbval-refs`"
    assert code_cells(reference) == code_cells(notebook), (
        f"{reference} is out of date with {notebook}: run `make nbval-refs`"
    )


def _nbval(notebook: Path, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--nbval", str(notebook),
         "--nbval-sanitize-with", str(REFERENCES / "sanitize.cfg"), "-o", "addopts=", "--rootdir", str(cwd)],
        cwd=cwd, capture_output=True, text=True, timeout=600, env={**os.environ},
    )


def _first_cells(reference: Path, n: int, out: Path) -> nbformat.NotebookNode:
    nb = nbformat.read(reference, as_version=4)
    code_seen, cells = 0, []
    for cell in nb.cells:
        cells.append(cell)
        code_seen += cell.cell_type == "code"
        if code_seen == n:
            break
    nb.cells = cells
    return nb


def test_nbval_fails_when_a_deterministic_output_changes(tmp_path):
    """Positive and negative control on the first cells of notebook 01 (parameters, set-up, data)."""
    nb = _first_cells(REFERENCES / "01_baseline_benchmark.ipynb", 5, tmp_path)
    good = tmp_path / "good.ipynb"
    nbformat.write(nb, good)
    result = _nbval(good, tmp_path)
    assert result.returncode == 0, result.stdout[-3000:]

    data_cell = next(c for c in nb.cells if c.cell_type == "code" and "data = config.load_data(" in c.source)
    output = next(o for o in data_cell.outputs if "data" in o)
    assert "test_rows" in output["data"]["text/plain"]
    output["data"]["text/plain"] = output["data"]["text/plain"].replace("500", "499", 1)
    bad = tmp_path / "bad.ipynb"
    nbformat.write(nb, bad)
    result = _nbval(bad, tmp_path)
    assert result.returncode != 0, "nbval should have caught the changed split size"
    assert "499" in result.stdout


def test_nbval_fails_when_an_fp32_accuracy_changes_in_its_4th_digit(tmp_path):
    """The whole of notebook 01 (the smoke teacher trained and benchmarked), its accuracy altered by 1e-4."""
    nb = nbformat.read(REFERENCES / "01_baseline_benchmark.ipynb", as_version=4)
    cell = next(c for c in nb.cells if c.cell_type == "code" and 'summary_frame(teacher_result)' in c.source)
    output = next(o for o in cell.outputs if "data" in o)
    accuracy = re.search(r"teacher\s+(0\.\d+)", output["data"]["text/plain"]).group(1)
    changed = f"{float(accuracy) + 1e-4:.4g}"
    assert len(accuracy.rstrip("0")) <= 6 and changed != accuracy, "shown at 4 significant digits"
    for key in ("text/plain", "text/html"):
        output["data"][key] = output["data"][key].replace(accuracy, changed, 1)
    bad = tmp_path / "bad.ipynb"
    nbformat.write(nb, bad)
    result = _nbval(bad, tmp_path)
    assert result.returncode != 0, "nbval should have caught the changed accuracy"
    assert changed in result.stdout


def _sanitized(text: str) -> str:
    """``text`` through tests/nbval/sanitize.cfg, parsed and applied as nbval does."""
    from nbval.plugin import get_sanitize_patterns

    for regex, replace in get_sanitize_patterns((REFERENCES / "sanitize.cfg").read_text()):
        text = re.sub(regex, replace, text)
    return text


def test_only_the_int8_rows_are_kept_out_of_comparison():
    """int8 kernels differ between CPU families; every other row is compared as it is."""
    nb = nbformat.read(REFERENCES / "03_compare.ipynb", as_version=4)
    cell = next(c for c in nb.cells if c.cell_type == "code" and "comparison_table(" in c.source)
    output = next(o for o in cell.outputs if "data" in o)
    for key in ("text/plain", "text/html"):
        text = output["data"][key]
        for variant in ("student-int8", "student-onnx-int8", "student-onnx-fused-int8", "student-onnx", "teacher"):
            row = re.search(rf"{variant}(</td>)?\s*(<td>)?(0\.\d+)", text)
            altered = text[: row.start(3)] + "0.9999" + text[row.end(3) :]
            same = _sanitized(altered) == _sanitized(text)
            assert same == variant.endswith("int8"), (key, variant)


# ---------------------------------------------------------------------------------------------
# The book profile's code path, on tiny local stand-ins for the Hub models
# ---------------------------------------------------------------------------------------------


def test_book_profile_code_path_runs_with_local_tiny_models(tmp_path, clinc_plus_path):
    data = subsample(load_intent_data(clinc_plus_path), {"train": 300, "validation": 100, "test": 150})
    labels = label_names(data)
    tokenizer = make_tiny_tokenizer()
    # A "fine-tuned" teacher whose head lists the labels in another order than the data (as a Hub
    # checkpoint may): 01 must match them by name and skip fine-tuning.
    teacher = make_tiny_model("tiny-bert", list(reversed(labels)))
    teacher.config.architectures = ["BertForSequenceClassification"]
    save_model(teacher, tokenizer, tmp_path / "teacher-finetuned")
    save_model(make_tiny_model("tiny-distilbert", labels), tokenizer, tmp_path / "student-pretrained")

    params = {
        "profile": "book",
        "teacher": str(tmp_path / "teacher-finetuned"),
        "student": str(tmp_path / "student-pretrained"),
        "data_source": str(clinc_plus_path),
        "output_dir": str(tmp_path / "outputs"),
        "max_train_rows": 300, "max_validation_rows": 100, "max_test_rows": 150,
        "epochs": 1, "n_latency_queries": 5, "variants": ["onnx"], "threads": 1,
    }
    notebooks = [REPO / "notebooks" / f"{name}.ipynb" for name in ("01_baseline_benchmark", "02_distill")]
    run_notebooks(notebooks, tmp_path / "executed", params, log=lambda _: None)

    executed = nbformat.read(tmp_path / "executed" / "01_baseline_benchmark.ipynb", as_version=4)
    printed = "".join(o.get("text", "") for c in executed.cells for o in c.get("outputs", []))
    assert "fine-tuning needed: False" in printed
    results = tmp_path / "outputs" / "results" / "book"
    assert {p.stem for p in results.glob("*.json")} == {"teacher", "student", "student-onnx"}
    record = json.loads((results / "teacher.json").read_text())
    assert record["model_ref"] == str(tmp_path / "teacher-finetuned") and record["test_rows"] == 150
    card = (tmp_path / "outputs" / "models" / "book" / "student" / "README.md").read_text()
    assert "base_model:" not in card  # a local folder is not a Hub model id
    assert "CLINC150 plus (release file data_oos_plus.json)" in card and "datasets:" not in card
