"""Quantisation by hand, as the book teaches it: one layer's weights mapped to int8 (:func:`quantize_by_hand`),
an int8 matrix product timed against fp32 (:func:`time_matmul`), and the arithmetic behind each variant's
megabytes (:func:`parameter_breakdown`, :func:`size_arithmetic`). :mod:`kdlib.inference` builds the int8 variants
with the libraries; this module shows what they do.
"""

from __future__ import annotations

import re
import timeit
import warnings
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from kdlib.inference import quantize_dynamic_int8

INT8_MIN, INT8_MAX = -128, 127
MB = 2**20  # the benchmark's megabyte (compute_size)


@dataclass(frozen=True)
class QuantizedWeights:
    """A weight matrix mapped to int8 by :func:`quantize_by_hand`."""

    name: str
    weights: torch.Tensor  # the fp32 original
    values: torch.Tensor  # the int8 levels
    scale: float
    zero_point: int
    agreement: float  # share of levels equal to torch.quantize_per_tensor's

    def dequantized(self) -> torch.Tensor:
        """``(q - zero_point) * scale``: the fp32 values the int8 levels stand for."""
        return (self.values.to(torch.float32) - self.zero_point) * self.scale

    def summary(self) -> pd.Series:
        """The figures of the mapping, for a notebook: range, scale, zero point, error and bytes."""
        error = (self.weights - self.dequantized()).abs().max().item()
        fp32_bytes, int8_bytes = self.weights.numel() * 4, self.values.numel() + 8  # + one scale and zero point
        return pd.Series({
            "layer": self.name,
            "shape": tuple(self.weights.shape),
            "min": self.weights.min().item(),
            "max": self.weights.max().item(),
            "scale = (max - min) / 255": self.scale,
            "zero_point (min -> -128)": self.zero_point,
            "largest rounding error": error,
            "half a step (scale / 2)": self.scale / 2,
            "same levels as torch.quantize_per_tensor": f"{100 * self.agreement:.2f} %",
            "fp32 bytes": fp32_bytes,
            "int8 bytes": int8_bytes,
            "fp32 / int8": fp32_bytes / int8_bytes,
        }, name="quantisation by hand")


def layer_weight(model: torch.nn.Module, name: str | None = None) -> tuple[str, torch.Tensor]:
    """One linear layer's weight matrix by its ``state_dict`` key; without ``name``, the first
    transformer layer's attention output projection (the layer the book quantises by hand)."""
    state = model.state_dict()
    if name is None:  # the lesson's layer (BERT's name, then DistilBERT's), else the first linear layer
        lesson = re.compile(r"layer\.0\.attention\.(output\.dense|out_lin)\.weight$")
        linear = (f"{n}.weight" for n, m in model.named_modules() if isinstance(m, torch.nn.Linear))
        name = next((key for key in state if lesson.search(key)), None) or next(linear)
    if name not in state:
        raise KeyError(f"{name!r} is not a weight of this model; choose one of its state_dict keys.")
    weights = state[name].detach().to("cpu", torch.float32)
    if weights.dim() != 2:
        raise ValueError(f"{name!r} has shape {tuple(weights.shape)}: choose a 2-D weight matrix.")
    return name, weights


def quantize_by_hand(weights: torch.Tensor, name: str = "weights") -> QuantizedWeights:
    """The affine map of ``weights`` onto int8: ``scale = (max - min) / 255`` spreads the range over the 256
    levels, ``zero_point`` puts ``min`` on -128, and each weight becomes ``clamp(round(w / scale) + zero_point,
    -128, 127)``. ``agreement`` compares the levels with ``torch.quantize_per_tensor``'s."""
    weights = weights.detach().to("cpu", torch.float32)
    low, high = weights.min().item(), weights.max().item()
    if not high > low:
        raise ValueError("quantize_by_hand needs weights with a range (max > min).")
    scale = (high - low) / (INT8_MAX - INT8_MIN)
    zero_point = int(np.clip(round(INT8_MIN - low / scale), INT8_MIN, INT8_MAX))
    values = (torch.round(weights / scale) + zero_point).clamp(INT8_MIN, INT8_MAX).to(torch.int8)
    with warnings.catch_warnings():  # PyTorch marks its quantized tensors deprecated; the reference stays valid
        warnings.filterwarnings("ignore", message=r".*quantize_per_tensor.*deprecated.*")
        reference = torch.quantize_per_tensor(weights, scale, zero_point, torch.qint8).int_repr()
    agreement = (reference == values).to(torch.float64).mean().item()
    return QuantizedWeights(name, weights, values, scale, zero_point, agreement)


def time_matmul(weights: torch.Tensor, *, tokens: int = 16, repeats: int = 50, seed: int = 0) -> pd.DataFrame:
    """One layer's product ``x @ W.T`` for ``tokens`` token vectors, timed in fp32 and in int8 (PyTorch's dynamically
    quantised linear layer, as the ``int8`` variant runs it): median milliseconds per product over ``repeats``
    rounds of 10 calls after a warm-up, and the int8 result's largest difference relative to fp32's largest value.
    """
    weights = weights.detach().to("cpu", torch.float32)
    out_features, in_features = weights.shape
    linear = torch.nn.Linear(in_features, out_features, bias=False)
    with torch.no_grad():
        linear.weight.copy_(weights)
    int8 = quantize_dynamic_int8(torch.nn.Sequential(linear))
    x = torch.randn(tokens, in_features, generator=torch.Generator().manual_seed(seed))
    rows = {}
    with torch.inference_mode():
        reference = linear(x)
        for label, layer in (("fp32", linear), ("int8", int8)):
            result = layer(x)
            for _ in range(10):
                layer(x)
            times = np.array(timeit.repeat(lambda layer=layer: layer(x), number=10, repeat=repeats)) / 10
            difference = (result - reference).abs().max().item() / reference.abs().max().item()
            rows[label] = {"ms per product": 1000 * float(np.median(times)), "largest relative difference": difference}
    table = pd.DataFrame.from_dict(rows, orient="index")
    table["speed-up"] = table.loc["fp32", "ms per product"] / table["ms per product"]
    table.index.name = f"({tokens} x {in_features}) @ ({in_features} x {out_features})"
    return table


def _component(name: str) -> str:
    if "embeddings" in name:
        return "embeddings"
    if re.search(r"\.layer\.\d+\.", name) or "relative_attention_bias" in name:  # MPNet's: the encoder's own
        return "transformer layers"
    return "head (pooler, classifier)"


def parameter_breakdown(models: Mapping[str, torch.nn.Module]) -> pd.DataFrame:
    """Parameters of each model by component (embeddings, transformer layers, head) and their fp32
    megabytes: a student that keeps the teacher's embeddings and half its layers keeps most of its size."""
    columns = {}
    for label, model in models.items():
        counts = Counter()
        for name, parameter in model.named_parameters():
            counts[_component(name)] += parameter.numel()
        per_part = pd.Series(counts)
        columns[f"{label} parameters"] = per_part
        columns[f"{label} share"] = per_part / per_part.sum()
        columns[f"{label} fp32 MB"] = per_part * 4 / MB
    table = pd.DataFrame(columns).fillna(0)
    order = [c for c in ("embeddings", "transformer layers", "head (pooler, classifier)") if c in table.index]
    table = table.loc[order]
    table.loc["total"] = table.sum()
    return table


def _byte_counts(model: torch.nn.Module) -> dict[str, int]:
    """Elements of the model by how the int8 variants store them."""
    kinds = {f"{n}.weight": "linear weights" if isinstance(m, torch.nn.Linear) else "embedding tables"
             for n, m in model.named_modules() if isinstance(m, torch.nn.Linear | torch.nn.Embedding)}
    counts = dict.fromkeys(("linear weights", "embedding tables", "other (biases, LayerNorm)"), 0)
    for name, parameter in model.named_parameters():
        counts[kinds.get(name, "other (biases, LayerNorm)")] += parameter.numel()
    return counts


# Bytes per element each variant stores: (linear weights, embedding tables, the rest).
VARIANT_BYTES = {
    "student": (4, 4, 4),
    "student-int8": (1, 4, 4),  # torch dynamic int8: nn.Linear weights only
    "student-onnx": (4, 4, 4),
    "student-onnx-int8": (1, 1, 4),  # ONNX Runtime: MatMul weights and the Gather (embedding) tables
    "student-onnx-fused-int8": (1, 1, 4),
}


def size_arithmetic(model: torch.nn.Module, results: Mapping[str, Mapping] | None = None) -> pd.DataFrame:
    """Each variant's size predicted from its bytes per element (:data:`VARIANT_BYTES`) against the size the
    benchmark measured (``results``: ``{variant: record}`` with ``size_mb``): torch's int8 keeps the embedding
    tables in fp32, ONNX Runtime's stores them in 8 bits too, so only it comes close to a quarter of fp32's."""
    counts = _byte_counts(model)
    rows = {}
    for variant, per_element in VARIANT_BYTES.items():
        if results is not None and variant not in results:
            continue
        row = {"bytes per element (linear, embeddings, other)": ", ".join(map(str, per_element))}
        for (kind, n), nbytes in zip(counts.items(), per_element, strict=True):
            row[f"{kind} MB"] = n * nbytes / MB
        row["predicted MB"] = sum(n * b for n, b in zip(counts.values(), per_element, strict=True)) / MB
        if results is not None:
            row["measured MB"] = results[variant].get("size_mb")
        rows[variant] = row
    return pd.DataFrame.from_dict(rows, orient="index")
