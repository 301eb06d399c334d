"""Run identity and guards at the entry point a user uses (`python -m kdlib.run`), on the smoke profile
shrunk to a few hundred rows: a changed parameter never resumes or reports an older run's model, 03
refuses mixed records, a torn checkpoint is set aside, an unknown model fails fast."""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import pytest

from kdlib.run import main

SMALL = ["-p", "max_train_rows", "200", "-p", "max_validation_rows", "50", "-p", "max_test_rows", "50",
         "-p", "finetune_epochs", "1", "-p", "epochs", "1", "-p", "n_latency_queries", "5"]


def _digest(folder: Path) -> dict:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _run(out: Path, *args: str) -> int:
    return main(["--profile", "smoke", "-p", "output_dir", str(out), *SMALL, *args])


def _record(out: Path, variant: str) -> dict:
    return json.loads((out / "results" / "smoke" / f"{variant}.json").read_text())


def _student_keys(out: Path) -> set[str]:
    return {p.name for p in (out / "checkpoints" / "smoke" / "student").iterdir() if p.is_dir()}


@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("e2e") / "outputs"
    assert _run(out, "-p", "variants", "[onnx]") == 0
    return out


def test_records_carry_the_fingerprint_of_what_produced_them(first_run):
    teacher, student, onnx = (_record(first_run, v) for v in ("teacher", "student", "student-onnx"))
    assert len(teacher["fingerprint"]) == len(student["fingerprint"]) == 16
    assert student["fingerprint"] == onnx["fingerprint"] != teacher["fingerprint"]
    assert student["teacher_weights_digest"] == teacher["weights_digest"]


@pytest.mark.parametrize("change", [["-p", "alpha", "0.7"], ["-p", "max_train_rows", "150"],
                                    ["-p", "drop_duplicates", "true"]])
def test_a_changed_parameter_never_resumes_or_reports_the_older_model(first_run, tmp_path, change):
    import shutil

    out = tmp_path / "outputs"
    shutil.copytree(first_run, out)
    before_keys, before = _student_keys(out), _record(out, "student")["fingerprint"]
    assert _run(out, "--only", "02", "-p", "variants", "[onnx]", *change) == 0
    after = _record(out, "student")["fingerprint"]
    new_keys = _student_keys(out) - before_keys
    # the smoke profile distils, then prunes and recovers: each training in a fresh checkpoint folder
    assert after != before and len(new_keys) == len(before_keys) == 2, "fresh trainings in their own folders"
    assert _record(out, "student-onnx")["fingerprint"] == after


def test_the_same_parameters_resume_and_give_the_same_student(first_run, tmp_path):
    import shutil

    out = tmp_path / "outputs"
    shutil.copytree(first_run, out)
    before, keys = _record(out, "student"), _student_keys(out)
    assert _run(out, "--only", "02", "-p", "variants", "[onnx]") == 0
    after = _record(out, "student")
    assert _student_keys(out) == keys and after["fingerprint"] == before["fingerprint"]
    assert after["accuracy"] == before["accuracy"] and after["macro_f1"] == before["macro_f1"]


def test_03_refuses_a_new_student_beside_an_older_runs_variants(first_run, tmp_path, capsys):
    import shutil

    out = tmp_path / "outputs"
    shutil.copytree(first_run, out)
    assert _run(out, "--only", "02", "-p", "alpha", "0.7", "-p", "variants", "[]") == 0
    tables = out / "tables" / "smoke"
    before = _digest(tables)
    assert _run(out, "--only", "03") == 1
    err = capsys.readouterr().err
    assert "mixes results of different models" in err and "student-onnx" in err
    assert _digest(tables) == before, "no table written from mixed records"


def test_a_torn_checkpoint_is_set_aside_and_the_run_completes(first_run, tmp_path):
    import shutil

    out = tmp_path / "outputs"
    shutil.copytree(first_run, out)
    key = sorted(_student_keys(out))[0]  # one of the two trainings (distillation, pruning's recovery)
    checkpoint = next((out / "checkpoints" / "smoke" / "student" / key).glob("checkpoint-*"))
    weights = checkpoint / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:64])  # killed mid-save
    assert _run(out, "--only", "02", "-p", "variants", "[onnx]") == 0
    assert (checkpoint.parent / f"torn-{checkpoint.name}").is_dir()
    executed = (out / "notebooks" / "smoke" / "02_distill.ipynb").read_text()
    assert f"Checkpoint {checkpoint} cannot be resumed from" in executed


def test_an_unknown_model_fails_fast_naming_the_parameter(first_run, tmp_path, capsys):
    import shutil

    out = tmp_path / "outputs"
    shutil.copytree(first_run, out)
    before = _digest(out / "results")
    start = time.perf_counter()
    assert _run(out, "--only", "01", "-p", "teacher", "bert-bsae-uncased") == 1
    assert time.perf_counter() - start < 60  # kernel start and data load included; no minute of retries
    err = capsys.readouterr().err
    assert "teacher = 'bert-bsae-uncased': not a local directory" in err and "tiny-bert" in err
    assert _digest(out / "results") == before


def test_an_accuracy_and_latency_search_runs_through_02_and_03(first_run, tmp_path):
    """n_trials with search_latency: 02 writes the trials with their Pareto flags, trains the chosen
    depth, 03 draws the front; a rerun without a search removes the trials table."""
    import shutil

    import pandas as pd

    out = tmp_path / "outputs"
    shutil.copytree(first_run, out)
    assert _run(out, "--only", "02", "03", "-p", "variants", "[onnx]", "-p", "n_trials", "3",
                "-p", "search_latency", "true") == 0
    trials = pd.read_csv(out / "tables" / "smoke" / "search_trials.csv")
    assert len(trials) == 3 and (trials["state"] == "COMPLETE").all()
    assert {"alpha", "temperature", "epochs", "student_layers", "accuracy", "latency_ms", "pareto"} <= set(trials)
    assert trials["pareto"].any() and (trials["latency_ms"] > 0).all()
    front = trials[trials["pareto"]]
    chosen = front[front["accuracy"] >= front["accuracy"].max() - 0.01].sort_values("latency_ms").iloc[0]
    saved = json.loads((out / "models" / "smoke" / "student" / "config.json").read_text())
    assert saved["num_hidden_layers"] == chosen["student_layers"]  # the chosen depth was trained and saved
    assert (out / "figures" / "smoke" / "search_pareto.png").stat().st_size > 10_000
    assert _run(out, "--only", "02", "-p", "variants", "[]") == 0
    assert not (out / "tables" / "smoke" / "search_trials.csv").exists()
