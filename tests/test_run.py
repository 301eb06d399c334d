"""The headless runner: parameters reach the notebooks, a failing cell fails loudly and keeps the notebook."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest
from nbformat.v4 import new_code_cell, new_notebook

from kdlib.paths import RunPaths
from kdlib.run import NotebookFailed, absolute_paths, main, notebook_parameters, run_notebooks, strip_local_paths


def _notebook(path, *cells):
    nb = new_notebook(metadata={"kernelspec": {"name": "python3", "language": "python", "display_name": "Python 3"}})
    nb.cells = [new_code_cell(source) for source in cells]
    nb.cells[0].metadata["tags"] = ["parameters"]
    nbformat.write(nb, path)
    return path


def test_only_declared_parameters_are_passed(tmp_path):
    nb = _notebook(tmp_path / "a.ipynb", "alpha = 0.5\nepochs = 1", "print(alpha)")
    assert notebook_parameters(nb, {"alpha": 0.9, "teacher": "x"}) == {"alpha": 0.9}


def test_parameters_a_cell_does_not_list_reach_it_through_overrides(tmp_path):
    nb = _notebook(tmp_path / "a.ipynb", "alpha = None  # weight of the hard labels\noverrides = None  # the rest",
                   "print(alpha)")
    params = {"alpha": 0.9, "search_storage": "study.journal", "epochs": 2}
    assert notebook_parameters(nb, params) == {"alpha": 0.9,
                                               "overrides": {"search_storage": "study.journal", "epochs": 2}}
    assert notebook_parameters(nb, {"alpha": 0.9}) == {"alpha": 0.9}


def test_a_parameter_left_out_of_the_cell_reaches_the_run_configuration(tmp_path):
    """End to end through papermill: `-p n_latency_queries 7` for a notebook whose cell does not list it."""
    nb = _notebook(tmp_path / "cfg.ipynb", 'profile = "smoke"  # the profile\nalpha = None\noverrides = None',
                   "from kdlib import config_from_notebook\nconfig = config_from_notebook(globals())\n"
                   "print('queries', config.n_latency_queries, 'alpha', config.alpha)")
    run_notebooks([nb], tmp_path / "out", {"profile": "smoke", "alpha": 0.3, "n_latency_queries": 7},
                  log=lambda _: None)
    executed = nbformat.read(tmp_path / "out" / "cfg.ipynb", as_version=4)
    assert "queries 7 alpha 0.3" in executed.cells[-1].outputs[0]["text"]


def test_a_committed_notebook_counts_its_cells_from_one(tmp_path):
    nb = _notebook(tmp_path / "n.ipynb", "value = 1", "value")
    run_notebooks([nb], tmp_path / "out", {"value": 2}, log=lambda _: None)
    executed = tmp_path / "out" / "n.ipynb"
    before = [c.execution_count for c in nbformat.read(executed, as_version=4).cells]
    assert before == [1, 2, 3]  # the parameters cell, papermill's injected cell, the last cell
    strip_local_paths(executed, drop_injected=True)
    cells = nbformat.read(executed, as_version=4).cells
    assert [c.execution_count for c in cells] == [1, 2]
    assert cells[-1].outputs[0]["execution_count"] == 2


REPO = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("notebook", sorted([*REPO.glob("notebooks/*.ipynb"), *REPO.glob("tests/nbval/*.ipynb")]),
                         ids=lambda path: f"{path.parent.name}/{path.stem}")
def test_every_name_of_a_parameters_cell_reaches_the_notebook(notebook):
    """papermill skips a parameters-cell line holding a second '=' (a '>=' in its comment too): the runner
    would then drop that -p value silently."""
    cell = next(c for c in nbformat.read(notebook, as_version=4).cells if "parameters" in c.metadata.get("tags", []))
    assigned = {t.id for node in ast.parse(cell.source).body if isinstance(node, ast.Assign) for t in node.targets}
    assert set(notebook_parameters(notebook, dict.fromkeys(assigned))) == assigned


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


def _tree_digest(folder) -> dict:
    import hashlib

    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*")) if p.is_file()
    }


@pytest.fixture
def existing_run(tmp_path):
    """An output folder holding a previous run's files, which a bad command must leave untouched."""
    out = tmp_path / "outputs"
    (out / "results" / "smoke").mkdir(parents=True)
    (out / "results" / "smoke" / "student.json").write_text('{"accuracy": 0.9}')
    (out / "models" / "smoke" / "student").mkdir(parents=True)
    (out / "models" / "smoke" / "student" / "model.safetensors").write_bytes(b"weights")
    return out


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["-p", "alpah", "0.3"], "alpah: unknown parameter; did you mean 'alpha'?"),
        (["-p", "label_colum", "intent"], "did you mean 'label_column'?"),
        (["-p", "epochs", "two"], "epochs = 'two': Input should be a valid integer"),
        (["-p", "epochs", "0"], "epochs = 0: Input should be greater than or equal to 1"),
        (["-p", "temperature", "-1"], "temperature = -1: Input should be greater than 0"),
        (["-p", "temperature", "0"], "temperature = 0: Input should be greater than 0"),
        (["-p", "learning_rate", "fast"], "learning_rate = 'fast'"),
        (["-p", "run_name", "../../x"], "run_name = '../../x'"),
        (["-p", "max_train_rows", "0"], "max_train_rows = 0"),
        (["-p", "variants", "[tflite]"], "variants.0"),
        (["--profile", "no-such-profile"], "profile 'no-such-profile' not found"),
    ],
)
def test_bad_input_is_refused_before_any_work(args, message, existing_run, capsys):
    before = _tree_digest(existing_run)
    code = main(["--profile", "smoke", "-p", "output_dir", str(existing_run), *args])
    captured = capsys.readouterr()
    assert code == 2
    assert message in captured.err
    assert "Traceback" not in captured.err + captured.out
    assert _tree_digest(existing_run) == before, "a refused command must not touch the output folder"


def test_a_second_run_on_the_same_run_folder_is_refused(existing_run, capsys):
    from filelock import FileLock

    with FileLock(RunPaths.of(existing_run, "smoke").lock_file):
        code = main(["--profile", "smoke", "-p", "output_dir", str(existing_run), "--only", "03"])
    assert code == 3
    assert "another run is writing into run 'smoke'" in capsys.readouterr().err


def test_relative_paths_are_taken_from_where_the_command_runs(tmp_path):
    (tmp_path / "mydata").mkdir()
    resolved = absolute_paths(
        {"data_source": "mydata", "teacher": "./missing", "student": "distilbert-base-uncased", "alpha": 0.5},
        tmp_path,
    )
    assert resolved["data_source"] == str(tmp_path / "mydata")
    assert resolved["teacher"] == str(tmp_path / "missing")  # shown absolute in the error that follows
    assert resolved["student"] == "distilbert-base-uncased" and resolved["alpha"] == 0.5


def test_help_params_lists_every_parameter(capsys):
    from kdlib.config import RunConfig

    assert main(["--help-params"]) == 0
    printed = capsys.readouterr().out
    assert all(name in printed for name in RunConfig.model_fields)
    # The default profile's own value is shown, with the default it replaces.
    keep = next(line for line in printed.splitlines() if line.split()[0] == "keep_layers")
    assert "4 (default None)" in keep
    assert main(["--help-params", "--profile", "smoke"]) == 0
    smoke = capsys.readouterr().out
    assert "'tiny-bert' (default" in next(line for line in smoke.splitlines() if line.split()[0] == "teacher")
    assert main(["--help-params", "--profile", "no-such-profile"]) == 2
    assert "no-such-profile" in capsys.readouterr().err


def test_ctrl_c_stops_with_one_line_and_keeps_the_partial_notebook(tmp_path):
    """Ctrl-C in a terminal: the runner interrupts the kernel, papermill saves the notebook, one line says so."""
    import os
    import signal
    import subprocess
    import sys
    import time

    nb = _notebook(tmp_path / "01_sleepy.ipynb", "x = 1", "import time\nfor _ in range(120):\n    time.sleep(0.5)")
    script = (
        # a terminal's Python handles SIGINT; one started in the background (nohup, `&`) inherits it ignored
        "import signal; signal.signal(signal.SIGINT, signal.default_int_handler)\n"
        "import sys; from pathlib import Path; from kdlib.run import Interrupted, run_notebooks\n"
        f"try: run_notebooks([Path({str(nb)!r})], Path({str(tmp_path / 'out')!r}), {{}}, progress=True)\n"
        "except Interrupted as stop: print(f'STOPPED: {stop}', file=sys.stderr); sys.exit(130)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    deadline = time.monotonic() + 60
    seen = ""
    while "cell 2/2" not in seen and time.monotonic() < deadline:
        seen += proc.stdout.readline()
    time.sleep(1.0)
    os.killpg(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=90)
    assert proc.returncode == 130
    assert err.strip().splitlines()[-1].startswith("STOPPED: Interrupted in 01_sleepy")
    assert "Traceback" not in err and "Run the same command again to resume" in err
    saved = nbformat.read(tmp_path / "out" / "01_sleepy.ipynb", as_version=4)
    assert [o["ename"] for c in saved.cells for o in c.get("outputs", []) if o.get("output_type") == "error"] == [
        "KeyboardInterrupt"
    ]


def test_a_ctrl_c_as_a_cell_ends_still_stops_the_run_before_the_next_cell(tmp_path):
    """The cell sends the runner its Ctrl-C and ends at once: the kernel's interrupt lands in the cell, after
    it (lost with the reply: the runner stops after its grace period) or while idle (the next cell is not
    started). Every way, the run stops with one line and the last cell never runs."""
    nb = _notebook(tmp_path / "01_quick.ipynb", "x = 1", "import os, signal\nos.kill(os.getppid(), signal.SIGINT)",
                   "print('never')")
    script = (
        "import signal; signal.signal(signal.SIGINT, signal.default_int_handler)\n"
        "import sys; from pathlib import Path; import kdlib.run as run; run._CtrlC.grace = 3\n"
        f"try: run.run_notebooks([Path({str(nb)!r})], Path({str(tmp_path / 'out')!r}), {{}}, log=lambda _: None)\n"
        "except run.Interrupted as stop: print(f'STOPPED: {stop}', file=sys.stderr); sys.exit(130)\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                            start_new_session=True)
    assert result.returncode == 130, result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("STOPPED: Interrupted in 01_quick")
    saved = nbformat.read(tmp_path / "out" / "01_quick.ipynb", as_version=4)
    assert saved.cells[-1].outputs == [] and saved.cells[-1].execution_count is None


def test_a_diverging_distillation_stops_before_saving_anything(tmp_path, capsys):
    """-p temperature 1e20 passes validation (finite, > 0) but trains to NaN: 02 stops at the first step,
    before a student, ONNX file, record or model card is written; 01's teacher stays as it was."""
    out = tmp_path / "outputs"
    args = ["--profile", "smoke", "-p", "output_dir", str(out), "-p", "max_train_rows", "200",
            "-p", "max_validation_rows", "50", "-p", "max_test_rows", "50", "-p", "finetune_epochs", "1"]
    assert main([*args, "--only", "01"]) == 0
    before = _tree_digest(out / "results")
    code = main([*args, "-p", "temperature", "1e20", "--only", "02"])
    assert code == 1
    assert "TrainingDivergedError" in capsys.readouterr().err
    assert _tree_digest(out / "results") == before, "no student record"
    assert not (out / "models" / "smoke" / "student").exists() and not (out / "models" / "smoke" / "onnx").exists()
    assert not list((out / "checkpoints" / "smoke" / "student").glob("*/checkpoint-*"))


def _listing(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def _cli(*args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "kdlib.run", "--profile", "smoke", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=900)


@pytest.fixture
def earlier_output(tmp_path):
    """An output folder holding an earlier file: a refused command leaves its listing as it was."""
    out = tmp_path / "outputs"
    (out / "results" / "smoke").mkdir(parents=True)
    (out / "results" / "smoke" / "teacher.json").write_text("{}")
    return out


def test_data_with_a_single_label_is_refused_before_training(tmp_path, earlier_output):
    data = tmp_path / "one-intent"
    data.mkdir()
    for split in ("train", "test"):
        (data / f"{split}.csv").write_text("text,label\n" + "".join(f"wake me at {i},alarm\n" for i in range(30)))
    before = _listing(earlier_output)
    result = _cli("-p", "data_source", str(data), "-p", "output_dir", str(earlier_output))
    assert result.returncode != 0
    assert str(data / "train.csv") in result.stderr and "at least two labels" in result.stderr
    assert "Traceback" not in result.stderr
    assert _listing(earlier_output) == before


@pytest.mark.parametrize(("keep", "expected"), [
    ("[0, 9]", "keep_layers = [0, 9]: the teacher (teacher = 'tiny-bert') has 2 layers, numbered 0 to 1"),
    ("3", "keep_layers = 3: the teacher (teacher = 'tiny-bert') has 2 layers, so a student keeps at most 2"),
])
def test_keep_layers_deeper_than_the_teacher_is_refused_before_training(earlier_output, keep, expected):
    before = _listing(earlier_output)
    result = _cli("-p", "keep_layers", keep, "-p", "output_dir", str(earlier_output))
    assert result.returncode != 0
    assert expected in result.stderr
    assert "Traceback" not in result.stderr
    assert _listing(earlier_output) == before


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux's /proc, where nothing can be created")
def test_an_output_dir_that_cannot_be_written_is_refused_before_any_work():
    result = _cli("-p", "output_dir", "/proc/kdlib-out")
    assert result.returncode != 0
    assert "output_dir = '/proc/kdlib-out'" in result.stderr and "-p output_dir PATH" in result.stderr
    assert "Traceback" not in result.stderr
    assert not Path("/proc/kdlib-out").exists()
