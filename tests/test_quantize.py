"""Quantisation by hand: the affine map of one layer, the int8 product, the size arithmetic."""

from __future__ import annotations

import pytest
import torch

from kdlib.models import make_tiny_model
from kdlib.quantize import (
    layer_weight,
    parameter_breakdown,
    quantize_by_hand,
    size_arithmetic,
    time_matmul,
)

LABELS = ["a", "b", "c"]


@pytest.fixture(scope="module")
def model():
    return make_tiny_model("tiny-bert", LABELS)


def test_the_book_layer_is_the_first_attention_output_projection(model):
    name, weights = layer_weight(model)
    assert name == "bert.encoder.layer.0.attention.output.dense.weight" and weights.shape == (32, 32)
    distil_name, _ = layer_weight(make_tiny_model("tiny-distilbert", LABELS))
    assert distil_name == "distilbert.transformer.layer.0.attention.out_lin.weight"
    with pytest.raises(KeyError, match="state_dict keys"):
        layer_weight(model, "nope")
    with pytest.raises(ValueError, match="2-D"):
        layer_weight(model, "bert.encoder.layer.0.attention.output.dense.bias")


def test_scale_and_zero_point_by_hand():
    weights = torch.tensor([[-0.5, 0.0], [0.25, 0.1]])
    q = quantize_by_hand(weights)
    assert q.scale == pytest.approx(0.75 / 255)
    assert q.zero_point == round(-128 + 0.5 / q.scale)  # the minimum lands on -128
    assert q.values.dtype == torch.int8 and q.values.min().item() == -128 and q.values.max().item() == 127
    assert q.agreement == 1.0  # the same levels as torch.quantize_per_tensor
    assert (q.dequantized() - weights).abs().max().item() <= q.scale / 2 + 1e-7
    summary = q.summary()
    assert summary["fp32 bytes"] == 16 and summary["int8 bytes"] == 4 + 8
    with pytest.raises(ValueError, match="range"):
        quantize_by_hand(torch.zeros(2, 2))


def test_a_real_layer_rounds_to_within_half_a_step(model):
    name, weights = layer_weight(model)
    q = quantize_by_hand(weights, name)
    summary = q.summary()
    assert summary["layer"] == name and summary["largest rounding error"] <= summary["half a step (scale / 2)"] + 1e-7
    assert summary["fp32 / int8"] == pytest.approx(4 * 1024 / (1024 + 8))


def test_time_matmul_times_fp32_and_int8(model):
    _, weights = layer_weight(model)
    table = time_matmul(weights, tokens=4, repeats=3)
    assert list(table.index) == ["fp32", "int8"] and (table["ms per product"] > 0).all()
    assert table.loc["fp32", "speed-up"] == 1.0 and table.loc["fp32", "largest relative difference"] == 0.0
    assert 0 < table.loc["int8", "largest relative difference"] < 0.1  # int8 is close to fp32, not equal


def test_size_arithmetic_counts_the_bytes_each_variant_stores(model):
    counts = {"linear": 0, "embedding": 0, "other": 0}
    for module in model.modules():
        if isinstance(module, torch.nn.Linear):
            counts["linear"] += module.weight.numel()
        elif isinstance(module, torch.nn.Embedding):
            counts["embedding"] += module.weight.numel()
    counts["other"] = model.num_parameters() - counts["linear"] - counts["embedding"]
    table = size_arithmetic(model)
    mb = 2**20
    assert table.loc["student", "predicted MB"] == pytest.approx(model.num_parameters() * 4 / mb)
    assert table.loc["student-int8", "predicted MB"] == pytest.approx(
        (counts["linear"] + 4 * counts["embedding"] + 4 * counts["other"]) / mb)
    assert table.loc["student-onnx-int8", "predicted MB"] == pytest.approx(
        (counts["linear"] + counts["embedding"] + 4 * counts["other"]) / mb)
    measured = size_arithmetic(model, {"student": {"size_mb": 0.1}, "student-int8": {"size_mb": 0.05}})
    assert list(measured.index) == ["student", "student-int8"] and measured.loc["student", "measured MB"] == 0.1


def test_parameter_breakdown_shows_what_a_shallower_student_keeps(model):
    shallow = make_tiny_model("tiny-bert", LABELS, num_layers=1)
    table = parameter_breakdown({"teacher": model, "student": shallow})
    assert list(table.index) == ["embeddings", "transformer layers", "head (pooler, classifier)", "total"]
    assert table.loc["embeddings", "teacher parameters"] == table.loc["embeddings", "student parameters"]
    assert table.loc["transformer layers", "student parameters"] * 2 == table.loc["transformer layers",
                                                                                   "teacher parameters"]
    assert table.loc["total", "teacher parameters"] == model.num_parameters()
    assert table.loc["total", "student share"] == pytest.approx(1.0)
