"""Tests of kdlib.inference: every variant loads, predicts like the fp32 model and reports its size.

The tiny models are first fitted for a few steps on the test texts: a freshly initialised model
gives almost the same near-zero logits for every input, so "the variant predicts the same label"
would hold trivially. After fitting, predictions differ between texts and have real margins.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
import onnx.helper
import onnx.numpy_helper
import pytest
import torch
from datasets import ClassLabel, Dataset, DatasetDict, Features, Value

from kdlib import inference as optimize
from kdlib.benchmark import BenchmarkOptions, PerformanceBenchmark
from kdlib.inference import (
    LABELS_KEY,
    OnnxPredictor,
    Predictor,
    TorchPredictor,
    build_variants,
    export_onnx,
    parity_check,
    quantize_dynamic_int8,
    quantize_onnx_int8,
    state_dict_size_bytes,
    torch_int8_predictor,
)
from kdlib.models import forward_inputs, make_tiny_model, make_tiny_tokenizer

LABELS = ["balance", "travel", "weather", "music", "alarm"]
TOPICS = {
    "balance": ["what is my balance", "how much money do i have", "check my account", "show my savings",
                "what's left in checking", "balance of my card please", "how much is in my bank",
                "account total"],
    "travel": ["book a flight to paris", "find me a hotel in rome", "i need a train to boston",
               "rent a car in miami", "flights to tokyo next week", "cancel my trip to berlin",
               "is my flight on time", "book a cruise"],
    "weather": ["is it going to rain", "what's the weather like tomorrow", "will it snow tonight",
                "how hot is it outside", "forecast for the weekend", "do i need an umbrella",
                "is it windy today", "temperature in london"],
    "music": ["play some jazz music", "put on my workout playlist", "skip this song", "turn the volume up",
              "play the new album by adele", "shuffle my favourites", "stop the music",
              "who sings this song"],
    "alarm": ["set an alarm for 7am", "wake me up at six", "cancel my morning alarm",
              "snooze for ten minutes", "set a timer for 5 minutes", "remind me at noon",
              "turn off all alarms",
              "alarm at 6:30 tomorrow"],
}
TEXTS = [text for label in LABELS for text in TOPICS[label]]
GOLD = [label for label in LABELS for _ in TOPICS[label]]
KINDS = ["tiny-bert", "tiny-distilbert"]


def fitted_tiny_model(kind: str) -> torch.nn.Module:
    """A tiny classifier fitted on TEXTS, so its predictions depend on the input."""
    model = make_tiny_model(kind, LABELS, seed=0)
    tokenizer = make_tiny_tokenizer()
    batch = tokenizer(TEXTS, padding=True, return_tensors="pt")
    inputs = {k: v for k, v in batch.items() if k != "token_type_ids" or kind == "tiny-bert"}
    targets = torch.tensor([LABELS.index(g) for g in GOLD])
    torch.manual_seed(0)
    optimiser = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(60):
        optimiser.zero_grad()
        torch.nn.functional.cross_entropy(model(**inputs).logits, targets).backward()
        optimiser.step()
    return model.eval()


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


@pytest.fixture(scope="module", params=KINDS)
def setup(request, tmp_path_factory):
    kind = request.param
    model = fitted_tiny_model(kind)
    tokenizer = make_tiny_tokenizer()
    out_dir = tmp_path_factory.mktemp(kind)
    variants = build_variants(model, tokenizer, out_dir, threads=1)
    return {"kind": kind, "model": model, "tokenizer": tokenizer, "out_dir": out_dir, "variants": variants,
            "reference": TorchPredictor(model, tokenizer, device="cpu")}


def test_reference_predictions_are_not_trivial(setup):
    predicted = setup["reference"].predict(TEXTS)
    assert len(set(predicted)) >= 4
    assert np.mean([p == g for p, g in zip(predicted, GOLD, strict=True)]) >= 0.8


def test_build_variants_names_and_files(setup):
    assert set(setup["variants"]) == {"student-int8", "student-onnx", "student-onnx-int8", "student-onnx-fused-int8"}
    expected = ["model-fused-int8.onnx", "model-fused.onnx", "model-int8.onnx", "model.onnx"]
    assert sorted(os.listdir(setup["out_dir"])) == expected  # no temp or side files


def test_onnx_fp32_matches_torch(setup):
    onnx_predictor = setup["variants"]["student-onnx"]
    assert onnx_predictor.predict(TEXTS) == setup["reference"].predict(TEXTS)
    parity = parity_check(setup["reference"], onnx_predictor, TEXTS, batch_size=7)  # several batch shapes
    assert parity["n"] == len(TEXTS)
    assert parity["prediction_agreement"] == 1.0
    assert parity["max_abs_logit_diff"] < 1e-4
    single, expected = onnx_predictor("book a flight")[0], setup["reference"]("book a flight")[0]
    assert single["label"] == expected["label"]
    assert single["score"] == pytest.approx(expected["score"], abs=1e-5)


@pytest.mark.parametrize("name", ["student-int8", "student-onnx-int8", "student-onnx-fused-int8"])
def test_int8_variants_agree_with_fp32(setup, name):
    predictor = setup["variants"][name]
    parity = parity_check(setup["reference"], predictor, TEXTS)
    assert parity["prediction_agreement"] >= 0.9, parity
    assert 0 < parity["max_abs_logit_diff"] < 1.0, parity  # really quantised, and not broken
    predicted = predictor.predict(TEXTS)
    assert len(predicted) == len(TEXTS) and set(predicted) <= set(LABELS)


def test_onnx_graph_inputs_outputs(setup):
    proto = onnx.load(str(setup["out_dir"] / "model.onnx"))
    names = [i.name for i in proto.graph.input]
    expected = ["input_ids", "token_type_ids", "attention_mask"] if setup["kind"] == "tiny-bert" else [
        "input_ids", "attention_mask"]
    assert sorted(names) == sorted(expected)
    for graph_input in proto.graph.input:
        assert graph_input.type.tensor_type.elem_type == onnx.TensorProto.INT64
        dims = graph_input.type.tensor_type.shape.dim
        assert [d.dim_param for d in dims] == ["batch", "sequence"]
    assert [o.name for o in proto.graph.output] == ["logits", "features"]
    assert not any(node.metadata_props for node in proto.graph.node)  # no stack traces / local paths
    assert all(not t.HasField("data_location") or t.data_location == onnx.TensorProto.DEFAULT
               for t in proto.graph.initializer)  # every weight inside the file


def test_onnx_int8_quantises_matmuls_and_embeddings(setup):
    proto = onnx.load(str(setup["out_dir"] / "model-int8.onnx"))
    ops = [n.op_type for n in proto.graph.node]
    assert "MatMulInteger" in ops
    assert "DequantizeLinear" in ops
    # The word-embedding table (vocab x hidden) is stored in 8 bits only.
    shape = list(setup["model"].get_input_embeddings().weight.shape)
    tables = [t.data_type for t in proto.graph.initializer if list(t.dims) == shape]
    assert tables in ([onnx.TensorProto.INT8], [onnx.TensorProto.UINT8])


def test_sizes(setup):
    variants, out_dir = setup["variants"], setup["out_dir"]
    fp32_onnx, int8_onnx = variants["student-onnx"], variants["student-onnx-int8"]
    assert fp32_onnx.size_bytes() == (out_dir / "model.onnx").stat().st_size > 0
    assert int8_onnx.size_bytes() == (out_dir / "model-int8.onnx").stat().st_size > 0
    assert int8_onnx.size_bytes() < 0.6 * fp32_onnx.size_bytes()
    torch_int8 = variants["student-int8"]
    assert 0 < torch_int8.size_bytes() < state_dict_size_bytes(setup["model"])
    n_params = sum(p.numel() for p in setup["model"].parameters())
    assert fp32_onnx.num_parameters() == pytest.approx(n_params, rel=0.05)


def test_describe(setup):
    variants = setup["variants"]
    assert variants["student-int8"].describe()["backend"] == "pytorch-int8"
    fp32 = variants["student-onnx"].describe()
    assert fp32 == {"backend": "onnxruntime", "device": "cpu", "dtype": "float32", "threads": 1,
                    "path": "model.onnx"}
    assert variants["student-onnx-int8"].describe()["backend"] == "onnxruntime-int8"
    assert variants["student-onnx"].session.get_session_options().intra_op_num_threads == 1


def test_labels_rebuilt_from_file_alone(setup, tmp_path):
    for file_name in ("model.onnx", "model-int8.onnx"):
        assert OnnxPredictor(setup["out_dir"] / file_name, make_tiny_tokenizer()).labels == LABELS
    rebuilt = OnnxPredictor(setup["out_dir"] / "model.onnx", make_tiny_tokenizer())
    assert rebuilt.predict(TEXTS) == setup["reference"].predict(TEXTS)
    # Without the metadata the labels must be given.
    proto = onnx.load(str(setup["out_dir"] / "model.onnx"))
    assert LABELS_KEY in {p.key for p in proto.metadata_props}
    del proto.metadata_props[:]
    bare = tmp_path / "bare.onnx"
    onnx.save(proto, str(bare))
    with pytest.raises(ValueError, match="labels"):
        OnnxPredictor(bare, make_tiny_tokenizer())
    renamed = [f"x{i}" for i in range(len(LABELS))]
    assert OnnxPredictor(bare, make_tiny_tokenizer(), labels=renamed).labels == renamed


def test_features_are_each_texts_mean_last_layer_state_in_every_variant(setup, tmp_path):
    """The Mahalanobis score's features: padding of a batch must not move a text's feature vector."""
    reference, int8 = setup["reference"], setup["variants"]["student-int8"]
    logits, features = reference.logits_and_features(TEXTS[:4])
    np.testing.assert_allclose(logits, reference.logits(TEXTS[:4]), atol=1e-5)
    model, tokenizer = setup["model"], setup["tokenizer"]
    for row, text in enumerate(TEXTS[:4]):
        encoded = tokenizer([text], return_tensors="pt")
        with torch.inference_mode():
            states = model(**forward_inputs(model, encoded), output_hidden_states=True).hidden_states[-1]
        np.testing.assert_allclose(features[row], states[0].mean(0).numpy(), atol=1e-5)
    assert int8.exposes_features and int8.logits_and_features(TEXTS[:2])[1].shape == (2, features.shape[1])
    # Every exported graph returns the same features (fp32: equal; int8: close), so each variant can be
    # scored by Mahalanobis distance; a graph with logits only is scored by energy (no features).
    for name, atol in (("student-onnx", 1e-4), ("student-onnx-int8", 0.5)):
        onnx_logits, onnx_features = setup["variants"][name].logits_and_features(TEXTS[:4])
        np.testing.assert_allclose(onnx_features, features, atol=atol)
        np.testing.assert_allclose(onnx_logits, setup["variants"][name].logits(TEXTS[:4]), atol=1e-6)
    proto = onnx.load(str(setup["out_dir"] / "model.onnx"))
    proto.graph.output.pop()  # a file exported before the features output: logits only
    assert [o.name for o in proto.graph.output] == ["logits"]
    logits_only = tmp_path / "logits-only.onnx"
    onnx.save(proto, str(logits_only))
    older = OnnxPredictor(logits_only, make_tiny_tokenizer())
    assert not older.exposes_features and older.logits_and_features(TEXTS[:2])[1] is None


def test_benchmark_runs_with_onnx_predictor(setup):
    dataset = Dataset.from_dict(
        {"text": TEXTS, "label": [LABELS.index(g) for g in GOLD]},
        features=Features({"text": Value("string"), "label": ClassLabel(names=LABELS)}),
    )
    predictor = setup["variants"]["student-onnx"]
    options = BenchmarkOptions(n_latency_queries=5)
    result = PerformanceBenchmark(predictor, DatasetDict({"test": dataset}), "onnx", options).run_benchmark()
    metrics = result["onnx"]
    reference = setup["reference"].predict(TEXTS)
    expected_accuracy = np.mean([p == g for p, g in zip(reference, GOLD, strict=True)])
    assert metrics["accuracy"] == pytest.approx(expected_accuracy)
    assert metrics["size_bytes"] == (setup["out_dir"] / "model.onnx").stat().st_size
    assert metrics["time_avg_ms"] > 0 and metrics["latency_queries"] == 5
    assert metrics["predictor"]["backend"] == "onnxruntime"


# ---------------------------------------------------------------------------------------------
# Tests that need no fitted model fixture
# ---------------------------------------------------------------------------------------------


def test_quantize_dynamic_int8_leaves_original_fp32():
    model = make_tiny_model("tiny-bert", LABELS)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    tokenizer = make_tiny_tokenizer()
    logits_before = TorchPredictor(model, tokenizer, device="cpu").logits(TEXTS[:4])
    quantised = quantize_dynamic_int8(model)
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(type(m) is torch.nn.Linear for name, m in model.named_modules() if name.endswith("dense"))
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert "DynamicQuantizedLinear" in repr(quantised.classifier)
    assert np.array_equal(TorchPredictor(model, tokenizer, device="cpu").logits(TEXTS[:4]), logits_before)
    assert torch_int8_predictor(model, tokenizer).labels == LABELS


def test_export_of_a_model_in_training_mode_warns_nothing_and_restores_the_mode(tmp_path):
    """A model straight from training is in training mode; the exporter is given eval-mode modules (torch warns
    about training mode, a warning a user would rightly read as dropout in the graph)."""
    import warnings

    model = make_tiny_model("tiny-bert", LABELS).train()
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*training mode.*")
        export_onnx(model, make_tiny_tokenizer(), tmp_path / "model.onnx")
    assert model.training


def _write(path: Path, data: bytes) -> None:
    path.write_bytes(data)


def test_export_failure_keeps_existing_file(tmp_path, monkeypatch):
    target = tmp_path / "model.onnx"
    target.write_bytes(b"previous good model")

    def half_written(model, inputs, out, opset, metadata):
        _write(Path(out), b"half a model")
        raise RuntimeError("exporter crashed mid-way")

    monkeypatch.setattr(optimize, "_export_dynamo", half_written)
    monkeypatch.setattr(optimize, "_export_torchscript", half_written)
    with pytest.warns(RuntimeWarning, match="legacy"), pytest.raises(RuntimeError, match="mid-way"):
        export_onnx(make_tiny_model("tiny-distilbert", LABELS), make_tiny_tokenizer(), target)
    assert target.read_bytes() == b"previous good model"
    assert os.listdir(tmp_path) == ["model.onnx"]


def _matmul_model(path: Path) -> Path:
    """A one-MatMul ONNX file: enough for the quantiser, built in milliseconds."""
    weight = onnx.numpy_helper.from_array(np.arange(64, dtype=np.float32).reshape(8, 8) / 64, "weight")
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("MatMul", ["x", "weight"], ["logits"])], "g",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["batch", 8])],
        [onnx.helper.make_tensor_value_info("logits", onnx.TensorProto.FLOAT, ["batch", 8])], [weight],
    )
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)])
    onnx.save(model, str(path))
    return path


def test_quantize_onnx_int8_small_graph(tmp_path, monkeypatch):
    src = _matmul_model(tmp_path / "model.onnx")
    monkeypatch.chdir(tmp_path)
    dst = quantize_onnx_int8(src.name, "out/model-int8.onnx")  # relative paths, missing folder
    assert dst == (tmp_path / "out" / "model-int8.onnx")
    proto = onnx.load(str(dst))
    assert "MatMulInteger" in [n.op_type for n in proto.graph.node]
    assert {p.key: p.value for p in proto.metadata_props}[optimize.QUANTIZATION_KEY] == "int8"
    assert sorted(os.listdir(tmp_path)) == ["model.onnx", "out"] and os.listdir(tmp_path / "out") == [
        "model-int8.onnx"]


def test_quantize_failure_keeps_existing_file(tmp_path, monkeypatch):
    src = _matmul_model(tmp_path / "model.onnx")
    target = tmp_path / "model-int8.onnx"
    target.write_bytes(b"previous good model")
    import onnxruntime.quantization

    def crash(model_input, model_output, **kwargs):
        _write(Path(model_output), b"half a model")
        raise RuntimeError("quantiser crashed mid-way")

    monkeypatch.setattr(onnxruntime.quantization, "quantize_dynamic", crash)
    with pytest.raises(RuntimeError, match="mid-way"):
        quantize_onnx_int8(src, target)
    assert target.read_bytes() == b"previous good model"
    assert sorted(os.listdir(tmp_path)) == ["model-int8.onnx", "model.onnx"]


def test_export_falls_back_to_legacy_exporter(tmp_path, monkeypatch):
    def broken_dynamo(*args, **kwargs):
        raise RuntimeError("dynamo unavailable")

    monkeypatch.setattr(optimize, "_export_dynamo", broken_dynamo)
    model, tokenizer = make_tiny_model("tiny-bert", LABELS), make_tiny_tokenizer()
    assert model.training
    with pytest.warns(RuntimeWarning, match="dynamo unavailable"):
        path = export_onnx(model, tokenizer, tmp_path / "legacy.onnx")
    assert model.training  # the caller's mode is restored
    predictor = OnnxPredictor(path, tokenizer)
    assert predictor.labels == LABELS
    parity = parity_check(TorchPredictor(model, tokenizer, device="cpu"), predictor, TEXTS, batch_size=16)
    assert parity["max_abs_logit_diff"] < 1e-4


def test_build_variants_subset_and_prefix(tmp_path):
    model, tokenizer = make_tiny_model("tiny-distilbert", LABELS), make_tiny_tokenizer()
    variants = build_variants(model, tokenizer, tmp_path, variants=("int8",), prefix="teacher")
    assert list(variants) == ["teacher-int8"]
    assert os.listdir(tmp_path) == []
    with pytest.raises(ValueError, match="fp16"):
        build_variants(model, tokenizer, tmp_path, variants=("fp16",))


class _Fixed(Predictor):
    def __init__(self, logits, labels=("a", "b")):
        self._logits, self.labels = np.asarray(logits, dtype=np.float32), list(labels)

    def logits(self, texts):
        return self._logits[[int(t) for t in texts]]

    def size_bytes(self):
        return 1


def test_parity_check_counts_disagreements():
    reference = _Fixed([[1, 0], [0, 1], [1, 0], [0, 2]])
    candidate = _Fixed([[1, 0], [1, 0], [1, 0.5], [0, 1]])
    texts = ["0", "1", "2", "3"]
    result = parity_check(reference, candidate, texts, batch_size=3)
    assert result == {"max_abs_logit_diff": pytest.approx(1.0), "prediction_agreement": 0.75, "n": 4}
    with pytest.raises(ValueError, match="labels"):
        parity_check(reference, _Fixed([[0, 0]] * 4, labels=("b", "a")), texts)


# ---------------------------------------------------------------------------------------------
# The fused ONNX variant and the lean tokenizer path
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["tiny-bert", "tiny-distilbert"])
def test_fused_export_is_fused_and_predicts_like_pytorch(kind, tmp_path):
    import onnx

    from kdlib.inference import export_onnx_fused

    labels = ["alarm", "music", "weather"]
    model, tokenizer = make_tiny_model(kind, labels), make_tiny_tokenizer()
    path = export_onnx_fused(model, tokenizer, tmp_path / "fused.onnx")
    ops = {node.op_type for node in onnx.load(str(path)).graph.node}
    assert {"Attention", "EmbedLayerNormalization", "SkipLayerNormalization"} <= ops, ops
    texts = ["wake me up at seven", "play a song by the beatles please, right now", "x"]
    reference = TorchPredictor(model, tokenizer)
    np.testing.assert_allclose(OnnxPredictor(path, tokenizer).logits(texts), reference.logits(texts), atol=1e-4)
    variant = build_variants(model, tokenizer, tmp_path / "variants", variants=["onnx-fused-int8"])
    assert list(variant) == ["student-onnx-fused-int8"]
    assert variant["student-onnx-fused-int8"].describe()["backend"] == "onnxruntime-int8"
    int8_ops = {node.op_type for node in onnx.load(str(tmp_path / "variants" / "model-fused-int8.onnx")).graph.node}
    assert {"QAttention", "MatMulInteger"} <= int8_ops and "Attention" not in int8_ops, int8_ops
    assert parity_check(reference, variant["student-onnx-fused-int8"], texts)["prediction_agreement"] == 1.0


@pytest.mark.parametrize("which", ["tiny", "minilm"])
def test_lean_encoder_gives_the_tokenizer_calls_ids(which):
    from kdlib.inference import _lean_encoder
    from kdlib.models import load_tokenizer

    tokenizer = make_tiny_tokenizer() if which == "tiny" else load_tokenizer("all-MiniLM-L6-v2")
    encoder = _lean_encoder(tokenizer, max_length=12)
    assert encoder is not None and encoder is not tokenizer.backend_tokenizer  # a copy: the tokenizer is shared
    texts = ["a", "wake me up at seven tomorrow and again on friday, and the weekend too", "Héllo  World!"]
    for batch in (texts, texts[:1], texts[1:2]):
        expected = tokenizer(batch, padding=True, truncation=True, max_length=12, return_tensors="np")
        encodings = encoder.encode_batch(batch)
        np.testing.assert_array_equal([e.ids for e in encodings], expected["input_ids"])
        np.testing.assert_array_equal([e.attention_mask for e in encodings], expected["attention_mask"])
        if "token_type_ids" in expected:
            np.testing.assert_array_equal([e.type_ids for e in encodings], expected["token_type_ids"])
    assert len(encoder.encode_batch(texts[1:2])[0].ids) == 12  # truncated like the call
