"""benchmarks/profile_query.py and latency.py on tiny models: their figures are the ones they measured."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kdlib.models import make_tiny_model, make_tiny_tokenizer, save_model

LABELS = ["alarm", "music", "oos"]

pytestmark = pytest.mark.usefixtures("one_torch_thread")


class _Share:
    """OtherProcesses stand-in: the busy check's outcome under the test's control."""

    share = 0.0

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return None


@pytest.fixture()
def run_outputs(tmp_path, intent_csv_folder):
    data = intent_csv_folder
    models = tmp_path / "outputs" / "models" / "r"
    save_model(make_tiny_model("tiny-bert", LABELS, num_layers=4), make_tiny_tokenizer(), models / "teacher")
    student = make_tiny_model("tiny-bert", LABELS, num_layers=2, seed=1)
    save_model(student, make_tiny_tokenizer(), models / "student")
    argv = ["--run", "r", "--outputs", str(tmp_path / "outputs"), "--data", str(data), "--queries", "6",
            "--repeats", "2", "--threads", "1"]
    return argv, student, tmp_path / "outputs" / "benchmarks" / "r" / "profile_query.json"


def test_profile_query_reports_steps_kernels_and_the_arithmetic(load_script, run_outputs, monkeypatch):
    argv, student, written = run_outputs
    script = load_script("benchmarks/profile_query.py")
    monkeypatch.setattr(script, "OtherProcesses", _Share)
    report = script.main(argv)
    assert set(report["p50_ms"]) == {*script.STEPS, "teacher pipeline", "teacher tokenizer + forward"}
    assert all(len(rounds) == 2 for rounds in report["p50_all_repeats_ms"].values())
    profile = report["onnx_runtime_profile"]
    # The fused int8 graph of a 2-layer student: one QAttention node per layer, kernels inside model_run.
    assert profile["nodes_by_op"]["QAttention"] == 2
    assert 0 < profile["kernel_us"] <= profile["model_run_us"]
    assert profile["kernel_us"] == pytest.approx(sum(profile["kernel_us_by_op"].values()))
    # 2 FLOPs per weight of Q, K, V, output, intermediate and output dense per layer, per token.
    hidden, inner = student.config.hidden_size, student.config.intermediate_size
    per_token = 2 * 2 * (4 * hidden * hidden + 2 * hidden * inner)
    assert report["student_gflop_per_query"] == pytest.approx(per_token * report["mean_tokens_per_query"] / 1e9)
    assert json.loads(written.read_text())["onnx_runtime_profile"] == json.loads(json.dumps(profile))
    elsewhere = written.parent / "profile_query-other-machine.json"
    monkeypatch.setattr(script, "onnx_runtime_profile", lambda *a: profile)  # the profile is checked above
    again = script.main([*argv, "--out", str(elsewhere), "--repeats", "1"])
    assert json.loads(elsewhere.read_text())["p50_all_repeats_ms"] == again["p50_all_repeats_ms"]


def test_profile_query_on_a_busy_machine_writes_nothing(load_script, run_outputs, monkeypatch):
    argv, _, written = run_outputs
    script = load_script("benchmarks/profile_query.py")
    monkeypatch.setattr(script, "OtherProcesses", type("Busy", (_Share,), {"share": 0.9}))
    with pytest.raises(SystemExit) as stop:
        script.main(argv)
    assert stop.value.code == 3 and not written.exists()


@pytest.fixture()
def shallow_student(tmp_path):
    """A 1-layer student that answers ``music`` to every query (its classifier: zero weights, one bias)."""
    folder = tmp_path / "shallow"
    model = make_tiny_model("tiny-bert", LABELS, num_layers=1, seed=2)
    with torch.no_grad():
        model.classifier.weight.zero_()
        model.classifier.bias.zero_()[model.config.label2id["music"]] = 5.0
    save_model(model, make_tiny_tokenizer(), folder)
    return folder


def test_latency_times_the_run_and_another_student_in_one_process(load_script, run_outputs, shallow_student,
                                                                  monkeypatch):
    argv, _, _ = run_outputs
    script = load_script("benchmarks/latency.py")
    monkeypatch.setattr(script, "OtherProcesses", _Share)
    out = run_outputs[2].parent / "latency-depth.json"
    report = script.main([*argv, "--student", f"one-layer={shallow_student}", "--out", str(out), "--no-openvino"])
    rows = {row["variant"]: row for row in report["rows"]}
    assert set(rows) == {"teacher (pipeline, fp32)", "student", "student-int8", "student-onnx", "student-onnx-int8",
                         "student-onnx-fused-int8",
                         "one-layer", "one-layer-onnx-fused-int8"}
    teacher_p50 = statistics.median(rows["teacher (pipeline, fp32)"]["p50_all_repeats_ms"])
    for row in rows.values():
        assert len(row["p50_all_repeats_ms"]) == 2
        assert row["speedup"] == pytest.approx(teacher_p50 / statistics.median(row["p50_all_repeats_ms"]))
    # the extra student's figures are its own: "music" for everything, in PyTorch and in fused ONNX int8
    for name in ("one-layer", "one-layer-onnx-fused-int8"):
        assert rows[name]["accuracy"] == pytest.approx(1 / 3)  # a third of the test queries are music
        assert (rows[name]["in_scope_accuracy"], rows[name]["oos_recall"]) == (pytest.approx(0.5), 0.0)
    assert json.loads(out.read_text())["rows"] == json.loads(json.dumps(report["rows"]))
    assert not (out.parent / "latency.json").exists()  # the run's own file is left alone


@pytest.mark.parametrize("spec, message", [
    ("no-equals-sign", "expected NAME=DIR"),
    ("student-2=somewhere", "must be new"),
    ("two={missing}", "has no config.json or model.safetensors"),
])
def test_latency_refuses_a_bad_student_before_any_work(load_script, run_outputs, tmp_path, monkeypatch, capsys,
                                                       spec, message):
    argv, _, _ = run_outputs
    script = load_script("benchmarks/latency.py")
    monkeypatch.setattr(script, "load_run_models", lambda *a, **k: pytest.fail("models loaded before the check"))
    with pytest.raises(SystemExit) as stop:
        script.main([*argv, "--student", spec.format(missing=tmp_path / "nowhere")])
    assert stop.value.code == 2 and message in capsys.readouterr().err


def test_latency_on_a_busy_machine_keeps_the_earlier_figures(load_script, run_outputs, monkeypatch):
    argv, _, profile_file = run_outputs
    earlier = profile_file.parent / "latency.json"
    earlier.parent.mkdir(parents=True)
    earlier.write_text('{"rows": "timed on a quiet machine"}\n')
    script = load_script("benchmarks/latency.py")
    monkeypatch.setattr(script, "OtherProcesses", type("Busy", (_Share,), {"share": 0.9}))
    with pytest.raises(SystemExit) as stop:
        script.main(argv)
    assert stop.value.code == 3 and earlier.read_text() == '{"rows": "timed on a quiet machine"}\n'
    assert [f.name for f in earlier.parent.iterdir()] == ["latency.json"]  # nothing half written beside it


@pytest.mark.parametrize("name", ["profile_query", "latency"])
@pytest.mark.parametrize("missing", ["teacher", "student"])
def test_a_run_without_its_models_is_refused_before_any_work(load_script, run_outputs, monkeypatch, capsys, name,
                                                             missing):
    argv, _, _ = run_outputs
    models = run_outputs[2].parents[2] / "models" / "r"
    (models / missing / "model.safetensors").unlink()
    script = load_script(f"benchmarks/{name}.py")
    monkeypatch.setattr(script, "load_run_models", lambda *a, **k: pytest.fail("models loaded before the check"))
    with pytest.raises(SystemExit) as stop:
        script.main(argv)
    err = capsys.readouterr().err
    assert stop.value.code == 2 and f"run 'r' has no saved {missing} under {models}" in err and "make run" in err


@pytest.mark.parametrize("name", ["profile_query", "latency"])
def test_the_run_benchmarks_run_as_modules_from_the_project_root(tmp_path, name):
    """``python -m benchmarks.<name>``: the shared helper is imported as ``benchmarks.run_cli``, no path edits."""
    repo = Path(__file__).resolve().parent.parent
    done = subprocess.run([sys.executable, "-m", f"benchmarks.{name}", "--run", "r", "--outputs", str(tmp_path)],
                          cwd=repo, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr
    assert "run 'r' has no saved teacher" in done.stderr and "Traceback" not in done.stderr


def test_no_script_edits_the_import_path():
    """Scripts import their shared helpers as packages (``benchmarks.run_cli``, ``scripts.recipe``)."""
    repo = Path(__file__).resolve().parent.parent
    offenders = [str(f.relative_to(repo)) for folder in ("benchmarks", "scripts") for f in (repo / folder).glob("*.py")
                 if "sys.path.insert" in f.read_text() or "sys.path.append" in f.read_text()]
    assert offenders == []
