"""benchmarks/openvino_peer.py and latency.py's peer rows and FLOP columns: OpenVINO's logits are the
ONNX Runtime ones (dynamic shapes and static buckets), the calibration subset is fixed, and a machine
without the optional extra gets its rows skipped with the reason in the output and the record."""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest

from benchmarks import openvino_peer
from benchmarks.openvino_peer import (
    INSTALL_HINT,
    build_openvino_peers,
    calibration_subset,
    fastest_peers,
    peer_status,
)
from kdlib.inference import OnnxPredictor, export_onnx
from kdlib.models import make_tiny_model, make_tiny_tokenizer, save_model

LABELS = ["alarm", "music", "oos"]
TEXTS = ["wake me up", "play a song by someone i like a lot", "how tall is the tallest tower in the world today"]
needs_openvino = pytest.mark.skipif(
    importlib.util.find_spec("openvino") is None or importlib.util.find_spec("nncf") is None,
    reason=f"openvino / nncf are not installed: the optional extra, {INSTALL_HINT}",
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_the_calibration_subset_is_seeded_and_keeps_the_original_order():
    texts = [f"query {i}" for i in range(1000)]
    subset = calibration_subset(texts, 300, seed=42)
    assert len(subset) == len(set(subset)) == 300
    assert subset == calibration_subset(texts, 300, seed=42)
    assert subset != calibration_subset(texts, 300, seed=7)
    assert subset == sorted(subset, key=texts.index)
    assert calibration_subset(texts[:10], 300) == texts[:10]
    with pytest.raises(ValueError, match="calibration queries"):
        calibration_subset(texts, 0)


def test_without_openvino_no_peer_is_built_and_the_status_says_why(monkeypatch, tmp_path):
    monkeypatch.setattr(openvino_peer, "_installed", lambda package: None)
    status = peer_status()
    assert status["openvino"] is None and "openvino is not installed" in status["fp32_skipped"]
    assert INSTALL_HINT in status["int8_skipped"]
    peers, built = build_openvino_peers(tmp_path / "absent.onnx", make_tiny_tokenizer(), tmp_path, threads=1,
                                        calibration_texts=TEXTS)
    assert peers == {} and built == status and not list(tmp_path.iterdir())
    monkeypatch.setattr(openvino_peer, "_installed", lambda package: "1.0" if package == "openvino" else None)
    assert peer_status()["fp32_skipped"] is None and "nncf is not installed" in peer_status()["int8_skipped"]


def test_the_faster_shape_mode_of_each_precision_is_kept():
    timed = {"openvino-fp32": 3.0, "openvino-fp32-static": 4.0, "openvino-int8": 2.0, "openvino-int8-static": 1.0}
    assert fastest_peers(timed) == {"fp32": "openvino-fp32", "int8": "openvino-int8-static"}
    assert fastest_peers({"openvino-fp32": 3.0}) == {"fp32": "openvino-fp32"}


@needs_openvino
def test_openvino_gives_onnx_runtimes_logits_with_dynamic_shapes_and_static_buckets(tmp_path):
    model, tokenizer = make_tiny_model("tiny-bert", LABELS, num_layers=2), make_tiny_tokenizer()
    onnx_path = export_onnx(model, tokenizer, tmp_path / "model.onnx")
    reference = OnnxPredictor(onnx_path, tokenizer, threads=1)
    peers, status = build_openvino_peers(onnx_path, tokenizer, tmp_path / "ov", threads=1,
                                         calibration_texts=TEXTS * 4, buckets=(4, 8, 128))
    assert set(peers) == {"openvino-fp32", "openvino-fp32-static", "openvino-int8", "openvino-int8-static"}
    assert status["calibration_queries"] == 12 and status["buckets"] == [4, 8, 128]
    expected, features = reference.logits_and_features(TEXTS)
    for name in ("openvino-fp32", "openvino-fp32-static"):
        got, got_features = peers[name].logits_and_features(TEXTS)
        np.testing.assert_allclose(got, expected, atol=1e-4)
        np.testing.assert_allclose(got_features, features, atol=1e-4)
        assert peers[name].labels == LABELS and peers[name]([TEXTS[0]])[0]["label"] in LABELS
    assert peers["openvino-fp32"].describe()["inference_precision"] == "f32"
    assert peers["openvino-fp32-static"].describe()["shapes"] == "static buckets [4, 8, 128]"
    np.testing.assert_allclose(peers["openvino-int8"].logits(TEXTS), peers["openvino-int8-static"].logits(TEXTS),
                               atol=0.05)  # the same int8 IR; bucket padding moves only rounding
    assert peers["openvino-int8"].size_bytes() < peers["openvino-fp32"].size_bytes()
    with pytest.raises(ValueError, match="must hold max_length=128"):
        openvino_peer.OpenVinoPredictor(tmp_path / "ov" / "model.xml", tokenizer, labels=LABELS, threads=1,
                                        buckets=(8, 16))


@pytest.fixture()
def run_argv(tmp_path, intent_csv_folder):
    models = tmp_path / "outputs" / "models" / "r"
    save_model(make_tiny_model("tiny-bert", LABELS, num_layers=4), make_tiny_tokenizer(), models / "teacher")
    save_model(make_tiny_model("tiny-bert", LABELS, num_layers=2, seed=1), make_tiny_tokenizer(),
               models / "student")
    return ["--run", "r", "--outputs", str(tmp_path / "outputs"), "--data", str(intent_csv_folder),
            "--queries", "6", "--repeats", "1", "--threads", "1", "--out", str(tmp_path / "latency.json")]


class _Quiet:
    share = 0.0

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return None


def test_latency_skips_the_peer_rows_when_asked_and_records_every_rows_flops(load_script, run_argv, monkeypatch,
                                                                             capsys, tmp_path):
    script = load_script("benchmarks/latency.py")
    monkeypatch.setattr(script, "OtherProcesses", _Quiet)
    report = script.main([*run_argv, "--no-openvino"])
    out = capsys.readouterr().out
    assert "OpenVINO fp32 rows skipped: --no-openvino" in out and "% peak: of the int8 peak" in out
    assert report["openvino"]["fp32_skipped"] == report["openvino"]["int8_skipped"] == "--no-openvino"
    rows = {row["variant"]: row for row in report["rows"]}
    assert not [name for name in rows if name.startswith("openvino")]
    teacher, student = report["matmul_flops"]["teacher"], report["matmul_flops"]["student"]
    assert len(teacher["layers"]) == 4 and len(student["layers"]) == 2 and teacher["total"] > student["total"]
    assert rows["student-onnx-fused-int8"]["matmul_gflops_per_query"] == pytest.approx(student["total"] / 1e9)
    assert rows["teacher (pipeline, fp32)"]["matmul_gflops_per_query"] == pytest.approx(teacher["total"] / 1e9)
    peak = report["int8_peak"]
    for row in rows.values():
        if peak["peak_gops"] is None:
            assert row["int8_peak_share"] is None
        else:
            assert row["int8_peak_share"] == pytest.approx(
                row["matmul_gflops_per_query"] / (row["p50_ms"] / 1e3) / peak["peak_gops"])
    written = json.loads((tmp_path / "latency.json").read_text())
    assert written["int8_peak"] == json.loads(json.dumps(peak)) and "assumption" in written["int8_peak"]


def test_latency_says_the_peer_rows_are_skipped_without_openvino(load_script, run_argv, monkeypatch, capsys):
    script = load_script("benchmarks/latency.py")
    monkeypatch.setattr(script, "OtherProcesses", _Quiet)
    monkeypatch.setattr(openvino_peer, "_installed", lambda package: None)
    report = script.main(run_argv)
    assert "OpenVINO int8 rows skipped: openvino is not installed" in capsys.readouterr().out
    assert "openvino is not installed" in report["openvino"]["fp32_skipped"] and report["openvino"]["kept"] == {}


@needs_openvino
def test_latency_times_the_openvino_peers_in_the_same_rounds(load_script, run_argv, monkeypatch, capsys):
    script = load_script("benchmarks/latency.py")
    monkeypatch.setattr(script, "OtherProcesses", _Quiet)
    report = script.main(run_argv)
    rows = {row["variant"]: row for row in report["rows"]}
    peers = {"openvino-fp32", "openvino-fp32-static", "openvino-int8", "openvino-int8-static"}
    assert peers <= set(rows) and set(report["openvino"]["kept"]) == {"fp32", "int8"}
    for name in peers:
        assert len(rows[name]["p50_all_repeats_ms"]) == 1 and rows[name]["backend"]["backend"] == "openvino"
        assert rows[name]["matmul_gflops_per_query"] == rows["student"]["matmul_gflops_per_query"]
    # the fp32 IR answers like the student it was converted from
    assert rows["openvino-fp32"]["accuracy"] == rows["student-onnx"]["accuracy"]
    kept = report["openvino"]["kept"]["int8"]
    assert f"OpenVINO int8 ({kept}" in capsys.readouterr().out
