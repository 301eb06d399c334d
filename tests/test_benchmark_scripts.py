"""benchmarks/profile_query.py on tiny models: its figures are the profile's, its arithmetic the model's."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from kdlib.models import save_model
from kdlib.testing import make_tiny_model, make_tiny_tokenizer

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "profile_query.py"
LABELS = ["alarm", "music", "oos"]

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _load_script():
    spec = importlib.util.spec_from_file_location("profile_query", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


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


def test_profile_query_reports_steps_kernels_and_the_arithmetic(run_outputs, monkeypatch):
    argv, student, written = run_outputs
    script = _load_script()
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


def test_profile_query_on_a_busy_machine_writes_nothing(run_outputs, monkeypatch):
    argv, _, written = run_outputs
    script = _load_script()
    monkeypatch.setattr(script, "OtherProcesses", type("Busy", (_Share,), {"share": 0.9}))
    with pytest.raises(SystemExit) as stop:
        script.main(argv)
    assert stop.value.code == 3 and not written.exists()
