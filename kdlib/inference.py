"""Predictors and their faster variants: one interface for PyTorch, int8 and ONNX Runtime models.

:class:`~kdlib.benchmark.PerformanceBenchmark` only talks to a :class:`Predictor`, so every variant is measured by
the same code. ``int8`` is PyTorch dynamic quantisation (``nn.Linear`` weights only); ``onnx`` the fp32 model run by
ONNX Runtime (fused operators, no Python dispatch per op); ``onnx-int8`` / ``onnx-fused-int8`` the ONNX graph (plain,
or with ORT's transformer fusions) quantised by ONNX Runtime, embedding tables included: the smallest file.
Every file is written beside its target and moved into place (:func:`kdlib.io.atomic_path`).
"""

from __future__ import annotations

import contextlib
import copy
import functools
import json
import logging
import os
import shutil
import tempfile
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
import torch.ao.quantization
from onnxruntime import quantization as ort_quantization
from onnxruntime.quantization.shape_inference import quant_pre_process
from onnxruntime.transformers.optimizer import optimize_model
from scipy.special import softmax
from tokenizers import Tokenizer
from transformers import PreTrainedModel, PreTrainedTokenizerBase, pipeline

from kdlib.config import MAX_LENGTH, VARIANTS
from kdlib.io import atomic_path
from kdlib.models import MODEL_INPUT_NAMES, attention_heads, forward_inputs, model_labels
from kdlib.session import pick_device

LABELS_KEY = "kdlib.labels"
QUANTIZATION_KEY = "kdlib.quantization"
ONNX_OUTPUTS = ("logits", "features")  # every exported graph's outputs, in this order


class Predictor:
    """Base class: subclasses implement ``logits``, ``size_bytes`` and ``describe``."""

    labels: list[str]
    exposes_features = False  # True where logits_and_features returns features (the Mahalanobis OOS score)

    def logits(self, texts: Sequence[str]) -> np.ndarray:  # pragma: no cover - abstract
        """One row of class scores per text, columns in the order of ``labels``."""
        raise NotImplementedError

    def logits_and_features(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray | None]:
        """Logits and, where the variant exposes them, one feature vector per text (else None)."""
        return self.logits(texts), None

    def size_bytes(self) -> int:  # pragma: no cover - abstract
        """Bytes of what a deployment ships: the saved weights (state dict or ONNX file)."""
        raise NotImplementedError

    def num_parameters(self) -> int | None:
        """Number of weights (None where the backend does not say)."""
        return None

    def describe(self) -> dict:
        """Backend, device, dtype and threads: what the benchmark records beside each figure."""
        return {}

    def __call__(self, texts: str | Sequence[str]) -> list[dict]:
        """Pipeline-style output: the top label and its probability for each text."""
        batch = [texts] if isinstance(texts, str) else list(texts)
        probs = softmax(self.logits(batch), axis=-1)
        return [{"label": self.labels[i], "score": float(p[i])} for i, p in zip(probs.argmax(-1), probs, strict=True)]

    def predict(self, texts: Sequence[str]) -> list[str]:
        """Label names for a batch of texts."""
        return [self.labels[i] for i in self.logits(list(texts)).argmax(axis=-1)]


def logits_and_features(model: torch.nn.Module, inputs: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """A classifier's logits and the mean of its last layer's states over each text's real tokens (the
    Mahalanobis OOS score's features), from one forward pass."""
    output = model(**inputs, output_hidden_states=True)
    hidden = output.hidden_states[-1]
    mask = inputs.get("attention_mask")
    if mask is None:
        mask = torch.ones_like(inputs["input_ids"])
    mask = mask.unsqueeze(-1).to(hidden.dtype)
    return output.logits, (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)


def state_dict_size_bytes(model: torch.nn.Module) -> int:
    """Bytes of ``torch.save(model.state_dict())`` to ``model.pt``, the reference study's size figure
    (a file, not a buffer: torch names the archive's records after the file)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "model.pt")
        torch.save(model.state_dict(), path)
        return os.path.getsize(path)


class TorchPredictor(Predictor):
    """A ``transformers`` sequence classifier (fp32, or dynamically quantised) with its tokenizer."""

    exposes_features = True

    def __init__(
        self, model: PreTrainedModel | torch.nn.Module, tokenizer: PreTrainedTokenizerBase, *,
        labels: Sequence[str] | None = None, device: str | torch.device | None = None,
        max_length: int = MAX_LENGTH, backend: str = "pytorch", num_parameters: int | None = None,
    ) -> None:
        self.device = pick_device(str(device) if device is not None else None)
        self.model = model.to(self.device).eval()
        self.tokenizer = tokenizer
        labels = model_labels(model) if labels is None else labels
        if labels is None:
            raise ValueError("Pass `labels=` for a model without a transformers config.")
        self.labels = list(labels)
        self.max_length = max_length
        self.backend = backend
        # A quantised model packs its int8 weights outside .parameters(): its caller passes the count.
        self._num_parameters = num_parameters

    @torch.inference_mode()
    def logits(self, texts: Sequence[str]) -> np.ndarray:
        return self.model(**self._inputs(texts)).logits.float().cpu().numpy()

    @torch.inference_mode()
    def logits_and_features(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """Logits and the mean of the last layer's states over each text's real tokens, in one pass."""
        logits, features = logits_and_features(self.model, self._inputs(texts))
        return logits.float().cpu().numpy(), features.float().cpu().numpy()

    def _inputs(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        encoded = self.tokenizer(list(texts), padding=True, truncation=True, max_length=self.max_length,
                                 return_tensors="pt").to(self.device)
        return forward_inputs(self.model, encoded)

    def size_bytes(self) -> int:
        return state_dict_size_bytes(self.model)

    def num_parameters(self) -> int:
        if self._num_parameters is not None:
            return self._num_parameters
        return sum(p.numel() for p in self.model.parameters())  # what PreTrainedModel.num_parameters() counts

    def describe(self) -> dict:
        dtype = ("int8 linear layers, float32 embeddings" if self.backend.endswith("int8")
                 else str(next(self.model.parameters()).dtype).replace("torch.", ""))
        return {"backend": self.backend, "device": str(self.device), "dtype": dtype}


class PipelinePredictor(Predictor):
    """The reference way: a ``transformers`` text-classification pipeline, one query per call (the speed
    benchmarks' baseline, so kdlib's figures are compared with the book's in the same process)."""

    def __init__(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, *, device: str | None = None):
        self.model = model.eval()
        self.device = pick_device(device)
        self.pipe = pipeline("text-classification", model=model, tokenizer=tokenizer, device=self.device)
        self.labels = model_labels(model)

    def __call__(self, texts: str | Sequence[str]) -> list[dict]:
        return self.pipe(texts if isinstance(texts, str) else list(texts))

    def logits(self, texts: Sequence[str]) -> np.ndarray:
        """Raw scores of every label (``top_k=None``, no softmax), in :attr:`labels` order."""
        position = {label: i for i, label in enumerate(self.labels)}
        out = np.zeros((len(texts), len(self.labels)), dtype=np.float32)
        for row, scores in enumerate(self.pipe(list(texts), top_k=None, function_to_apply="none")):
            for entry in scores:
                out[row, position[entry["label"]]] = entry["score"]
        return out

    def predict(self, texts: Sequence[str]) -> list[str]:
        """One pipeline call per query, as the reference's accuracy loop does."""
        return [self.pipe(text)[0]["label"] for text in texts]

    def size_bytes(self) -> int:
        return state_dict_size_bytes(self.model)

    def num_parameters(self) -> int:
        return self.model.num_parameters()

    def describe(self) -> dict:
        return {"backend": "transformers-pipeline", "device": str(self.device)}


def quantize_dynamic_int8(model: torch.nn.Module) -> torch.nn.Module:
    """An int8 copy of ``model`` on the CPU (``nn.Linear`` weights in int8, activations quantised per batch);
    the caller's fp32 model stays usable. torch's deprecation warnings are silenced: the caller cannot act on them."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*torch\.ao\.quantization is deprecated.*")
        warnings.filterwarnings("ignore", message=r".*quantize_per_tensor.*deprecated.*")
        fp32 = copy.deepcopy(model).to("cpu").eval()
        return torch.ao.quantization.quantize_dynamic(fp32, {torch.nn.Linear}, dtype=torch.qint8)


def torch_int8_predictor(
    model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, *, max_length: int = MAX_LENGTH
) -> TorchPredictor:
    """The int8 model behind the common interface (on the CPU, the only device it runs on)."""
    return TorchPredictor(quantize_dynamic_int8(model), tokenizer, labels=model_labels(model), device="cpu",
                          max_length=max_length, backend="pytorch-int8", num_parameters=model.num_parameters())


def _example_inputs(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase) -> dict[str, torch.Tensor]:
    """The padded example batch as int64 tensors: the tokenizer outputs ``model.forward`` takes, in the
    tokenizer's order (DistilBERT takes no ``token_type_ids``, so its graph must not declare them)."""
    produced = getattr(tokenizer, "model_input_names", None) or MODEL_INPUT_NAMES
    names = list(forward_inputs(model, dict.fromkeys(produced)))
    if "input_ids" not in names:
        raise TypeError(f"{type(model).__name__}.forward takes no `input_ids`: not a text classifier.")
    # Unequal lengths: the batch has padding, and no dimension is 0 or 1 (torch.export would fix it).
    encoded = tokenizer(["a short example", "a slightly longer example sentence for the export"], padding=True,
                        return_tensors="pt")
    return {n: encoded[n].to(torch.long) for n in names}


def _export_metadata(model: torch.nn.Module) -> dict[str, str]:
    """The ``metadata_props`` of every exported file: the label names (JSON) and the model type."""
    model_type = getattr(getattr(model, "config", None), "model_type", "")
    return {LABELS_KEY: json.dumps(model_labels(model)), "kdlib.model_type": str(model_type)}


def export_onnx(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, path: str | os.PathLike, *,
    opset: int | None = None, check: bool = True,
) -> Path:
    """Export a BERT / DistilBERT sequence classifier to one self-contained ONNX file.

    Inputs are the tokenizer outputs ``forward`` takes (int64, ``batch`` and ``sequence`` axes dynamic); outputs
    are ``logits`` and ``features`` (:func:`logits_and_features`); the label names go into ``metadata_props``
    (``kdlib.labels``, JSON). The dynamo exporter keeps the attention mask's Python branches general; if it
    fails, the legacy TorchScript exporter runs once, with a warning, on a padded example. With ``check``, ONNX
    Runtime must match PyTorch on that example (max abs diff 1e-3) before the file replaces anything at ``path``.
    """
    path = Path(path)
    inputs = _example_inputs(model, tokenizer)
    was_training = model.training
    on_cpu = all(p.device.type == "cpu" for p in model.parameters())
    cpu_model = (model if on_cpu else copy.deepcopy(model).to("cpu")).eval()
    metadata = _export_metadata(model)
    try:
        with atomic_path(path, suffix=".tmp.onnx") as tmp:
            try:
                _export_dynamo(cpu_model, inputs, tmp, opset, metadata)
            except Exception as err:  # any exporter failure: try the other exporter once
                warnings.warn(f"Dynamo ONNX export failed ({type(err).__name__}: {err}); using the legacy "
                              "TorchScript exporter.", RuntimeWarning, stacklevel=2)
                _export_torchscript(cpu_model, inputs, tmp, opset, metadata)
            if check:
                _check_export(cpu_model, inputs, tmp)
    finally:
        model.train(was_training)
    return path


def _export_dynamo(model: torch.nn.Module, inputs: dict, out: Path, opset: int | None, metadata: dict) -> None:
    dynamic = {n: {0: "batch", 1: "sequence"} for n in inputs}
    with _quiet(all_warnings=False):
        # Harmless: all inputs share the batch / sequence axes, so torch keeps one name for each.
        warnings.filterwarnings("ignore", message=r".*axis name: .* will not be used.*")
        warnings.filterwarnings("ignore", category=FutureWarning)
        program = torch.onnx.export(_NamedOutputs(model).eval(), (), kwargs=inputs, dynamo=True,
                                    dynamic_shapes=dynamic, input_names=list(inputs), output_names=list(ONNX_OUTPUTS),
                                    opset_version=opset, optimize=True, verbose=False)
    # Node metadata (stack traces with local paths, FX dumps) can outweigh a tiny model's weights: drop it.
    for node in program.model.graph.all_nodes():
        node.metadata_props.clear()
    program.model.metadata_props.update(metadata)
    program.save(out, external_data=False)


def _export_torchscript(model: torch.nn.Module, inputs: dict, out: Path, opset: int | None, metadata: dict) -> None:
    # The legacy exporter passes inputs positionally, in _NamedOutputs.forward's order.
    names = [n for n in MODEL_INPUT_NAMES if n in inputs]
    if names != list(MODEL_INPUT_NAMES[: len(names)]):
        raise ValueError(f"The legacy ONNX exporter needs inputs in the order {MODEL_INPUT_NAMES}; got {list(inputs)}.")
    axes = {n: {0: "batch", 1: "sequence"} for n in names} | {n: {0: "batch"} for n in ONNX_OUTPUTS}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(_NamedOutputs(model).eval(), tuple(inputs[n] for n in names), str(out), dynamo=False,
                          input_names=names, output_names=list(ONNX_OUTPUTS), dynamic_axes=axes,
                          opset_version=opset or 17, do_constant_folding=True)
    _add_metadata(out, metadata)


def export_onnx_fused(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, path: str | os.PathLike) -> Path:
    """An ONNX file whose attention, LayerNorm, GELU and embeddings ONNX Runtime has fused (Optimum's O2).

    ORT's optimizer recognises eager attention in the TorchScript exporter's graph, not in dynamo's; the file is
    checked as in :func:`export_onnx`. MPNet's attention has no ORT fusion: a warning says so."""
    path = Path(path)
    inputs = _example_inputs(model, tokenizer)
    eager = copy.deepcopy(model).to("cpu").eval()
    eager.set_attn_implementation("eager")  # the pattern the fusions look for
    heads = attention_heads(eager.config)
    # The attention's width, heads x head size: narrower than hidden_size in a pruned model.
    width = heads * (eager.config.hidden_size // eager.config.num_attention_heads)
    with atomic_path(path, suffix=".tmp.onnx") as tmp, tempfile.TemporaryDirectory(dir=path.parent) as work:
        raw = Path(work) / "raw.onnx"
        _export_torchscript(eager, inputs, raw, None, _export_metadata(eager))
        with _quiet():  # BERT's fusions also match DistilBERT's blocks
            fused = optimize_model(str(raw), model_type="bert", num_heads=heads, hidden_size=width)
        counts, model_type = fused.get_fused_operator_statistics(), eager.config.model_type
        if not (counts.get("Attention", 0) or counts.get("MultiHeadAttention", 0)):  # correct, but gains less
            warnings.warn(
                f"ONNX Runtime's transformer optimizer fused no attention in this {model_type} graph (its BERT "
                f"pattern does not match {model_type}'s attention; MPNet adds a relative position bias): the fused "
                f"file has {counts.get('SkipLayerNormalization', 0)} fused LayerNorms and "
                f"{counts.get('BiasGelu', 0) + counts.get('FastGelu', 0)} fused GELUs, and its "
                "attention runs unfused.",
                RuntimeWarning, stacklevel=2,
            )
        fused.save_model_to_file(str(tmp))
        _check_export(eager, inputs, tmp)
    return path


class _NamedOutputs(torch.nn.Module):
    """The graph's :data:`ONNX_OUTPUTS` from named inputs (which dynamo matches ``dynamic_shapes`` to)."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        given = {"input_ids": input_ids, "attention_mask": attention_mask, "token_type_ids": token_type_ids}
        return logits_and_features(self.model, {k: v for k, v in given.items() if v is not None})


def _add_metadata(path: Path, metadata: dict[str, str]) -> None:
    """Set ``metadata``'s keys in an ONNX file's ``metadata_props``, keeping its other keys."""
    proto = onnx.load(str(path))
    onnx.helper.set_model_props(proto, {p.key: p.value for p in proto.metadata_props} | metadata)
    onnx.save(proto, str(path))


def _check_export(model: torch.nn.Module, inputs: dict, onnx_path: Path, atol: float = 1e-3) -> None:
    """Refuse a file whose logits or features differ from PyTorch's: a wrong graph must not replace a good one."""
    model.eval()  # an exporter may have restored some module's training mode (dropout on)
    # One thread: a two-text batch, where threads would only add start-up cost.
    session = ort.InferenceSession(str(onnx_path), session_options(1), providers=["CPUExecutionProvider"])
    got = session.run(list(ONNX_OUTPUTS), {n: v.numpy() for n, v in inputs.items()})
    with torch.inference_mode():
        expected = [t.float().numpy() for t in logits_and_features(model, inputs)]
    for name, found, wanted in zip(ONNX_OUTPUTS, got, expected, strict=True):
        diff = float(np.abs(found - wanted).max())
        if not diff <= atol:
            raise RuntimeError(f"The exported ONNX graph disagrees with PyTorch (max abs {name} diff {diff:.3g}).")


def onnx_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The ``metadata_props`` of an ONNX file (weights not loaded)."""
    proto = onnx.load(str(path), load_external_data=False)
    return {p.key: p.value for p in proto.metadata_props}


def _lean_encoder(tokenizer: PreTrainedTokenizerBase, max_length: int):
    """A copy of a fast tokenizer's ``tokenizers`` encoder that truncates and pads like the call
    ``tokenizer(texts, padding=True, truncation=True, max_length=...)``; None for a slow tokenizer."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or tokenizer.pad_token_id is None or tokenizer.padding_side != "right":
        return None
    encoder = Tokenizer.from_str(backend.to_str())
    encoder.enable_truncation(max_length=min(max_length, tokenizer.model_max_length))
    encoder.enable_padding(pad_id=tokenizer.pad_token_id, pad_token=tokenizer.pad_token)
    return encoder


def session_options(threads: int | None = None):
    """ONNX Runtime session options for every kdlib graph (all graph optimisations, ``threads`` intra-op
    threads, None: ORT's default), in one place so a profile runs what is timed."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        options.intra_op_num_threads = threads
    return options


class OnnxPredictor(Predictor):
    """An ONNX file run by ONNX Runtime on the CPU, with its tokenizer. ``labels`` default to the names
    :func:`export_onnx` stored in the file; ``threads`` sets ORT's intra-op thread pool (None: ORT's default)."""

    def __init__(
        self, path: str | os.PathLike, tokenizer: PreTrainedTokenizerBase, *, labels: Sequence[str] | None = None,
        threads: int | None = None, max_length: int = MAX_LENGTH,
    ) -> None:
        self.path = Path(path)
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.threads = threads
        proto = onnx.load(str(self.path), load_external_data=False)
        metadata = {p.key: p.value for p in proto.metadata_props}
        if labels is None:
            if LABELS_KEY not in metadata:
                raise ValueError(f"{self.path.name} stores no label names ({LABELS_KEY}); pass `labels=`.")
            labels = json.loads(metadata[LABELS_KEY])
        self.labels = list(labels)
        self.quantization = metadata.get(QUANTIZATION_KEY)
        self._num_parameters = sum(int(np.prod(t.dims, dtype=np.int64)) for t in proto.graph.initializer)
        self._external_files = sorted(
            {e.value for t in proto.graph.initializer for e in t.external_data if e.key == "location"})
        del proto
        self.session = ort.InferenceSession(str(self.path), session_options(threads),
                                            providers=["CPUExecutionProvider"])
        self.input_names = [i.name for i in self.session.get_inputs()]
        outputs = [o.name for o in self.session.get_outputs()]
        self.output_name = "logits" if "logits" in outputs else outputs[0]
        self.exposes_features = "features" in outputs  # graphs kdlib exported; older files have logits only
        self._encoder = _lean_encoder(tokenizer, max_length)

    def feed(self, texts: Sequence[str]) -> dict[str, np.ndarray]:
        """The session's inputs for ``texts``. With a fast tokenizer the ids go straight from the ``tokenizers``
        encoder into numpy (the same ids as the tokenizer call): no torch on the single-query path."""
        texts = list(texts)
        if self._encoder is None:
            encoded = self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_length,
                                     return_tensors="np")
        else:
            encodings = self._encoder.encode_batch(texts)
            encoded = {"input_ids": [e.ids for e in encodings], "attention_mask": [e.attention_mask for e in encodings],
                       "token_type_ids": [e.type_ids for e in encodings]}
        feed = {}
        for name in self.input_names:
            if name in encoded:
                feed[name] = np.asarray(encoded[name], dtype=np.int64)
            elif name == "token_type_ids":  # a tokenizer that omits them means "all segment 0"
                feed[name] = np.zeros_like(np.asarray(encoded["input_ids"], dtype=np.int64))
            else:
                raise KeyError(f"The ONNX graph needs input {name!r}, which the tokenizer does not produce.")
        return feed

    def logits(self, texts: Sequence[str]) -> np.ndarray:
        return np.asarray(self.session.run([self.output_name], self.feed(texts))[0], dtype=np.float32)

    def logits_and_features(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray | None]:
        if not self.exposes_features:
            return self.logits(texts), None
        logits, features = self.session.run([self.output_name, "features"], self.feed(texts))
        return np.asarray(logits, dtype=np.float32), np.asarray(features, dtype=np.float32)

    def size_bytes(self) -> int:
        """Bytes on disk: the .onnx file plus any external-data files it references."""
        sidecars = sum(os.path.getsize(self.path.parent / f) for f in self._external_files)
        return os.path.getsize(self.path) + sidecars

    def num_parameters(self) -> int | None:
        """Elements in the graph initializers (for an int8 file: int8 weights plus scales / zero points)."""
        return self._num_parameters or None

    def describe(self) -> dict:
        int8 = self.quantization == "int8"
        return {"backend": "onnxruntime-int8" if int8 else "onnxruntime", "device": "cpu",
                "dtype": "int8" if int8 else "float32", "threads": self.threads, "path": self.path.name}


def quantize_onnx_int8(
    src: str | os.PathLike, dst: str | os.PathLike, *, quantize_embeddings: bool = True, per_channel: bool = True,
    quantize_attention: bool = False,
) -> Path:
    """Quantise an fp32 ONNX file with ONNX Runtime's dynamic quantisation (8-bit weights).

    Constant-weight ``MatMul``s get ``QInt8`` weights (per output channel with ``per_channel``) and run-time
    activation scales; attention scores stay fp32. ``quantize_embeddings`` stores the embedding tables (a large
    share of a small encoder) in 8 bits; ``quantize_attention`` turns fused ``Attention`` into ``QAttention``.
    ``Gemm`` (pooler, classifier) stays fp32: ORT's dynamic mode has no Gemm kernel. The label metadata is kept
    and ``kdlib.quantization=int8`` added.
    """
    src, dst = Path(src).resolve(), Path(dst).resolve()  # absolute: the quantiser runs in a work folder
    metadata = onnx_metadata(src) | {QUANTIZATION_KEY: "int8"}
    ops = ["MatMul", "Gather"] if quantize_embeddings else ["MatMul"]
    if quantize_attention:
        ops.append("Attention")
    with (atomic_path(dst, suffix=".tmp.onnx") as tmp,
          tempfile.TemporaryDirectory(dir=dst.parent, prefix=".quant.") as work):
        source = _preprocess(src, Path(work) / "pre.onnx")
        with _quiet(work):
            ort_quantization.quantize_dynamic(
                source, tmp, op_types_to_quantize=ops, per_channel=per_channel,
                weight_type=ort_quantization.QuantType.QInt8,
                # Fused contrib ops (Attention ...) have no inferred output types: they are float.
                extra_options={"MatMulConstBOnly": True, "DefaultTensorType": onnx.TensorProto.FLOAT},
            )
        _add_metadata(tmp, metadata)
    return dst


def _preprocess(src: Path, out: Path) -> Path:
    """``quant_pre_process`` with symbolic shapes, else without them, else (with a warning) the graph as
    exported. Run in the work folder: a failed symbolic shape inference dumps files into the current one."""
    error: Exception | None = None
    for options in ({"auto_merge": True}, {"skip_symbolic_shape": True}):
        try:
            with _quiet(out.parent):
                quant_pre_process(str(src), str(out), **options)
            return out
        except Exception as err:  # pre-processing is an optimisation: try less of it
            error = err
    warnings.warn(f"ONNX quantisation pre-processing failed ({type(error).__name__}: {error}); "
                  "quantising the graph as exported.", RuntimeWarning, stacklevel=3)
    # A copy in the work folder: the quantiser writes a "-inferred" file beside its input.
    return Path(shutil.copyfile(src, out.with_name("raw.onnx")))


@contextlib.contextmanager
def _quiet(cwd: str | os.PathLike | None = None, *, all_warnings: bool = True) -> Iterator[None]:
    """Keep exporter and ORT chatter out of notebooks: warnings caught (ignored with ``all_warnings``), the root and
    ``torch.onnx`` loggers at ERROR, in ``cwd`` when given (for tools that write side files there)."""
    levels = {logger: logger.level for logger in (logging.getLogger(), logging.getLogger("torch.onnx"))}
    for logger, level in levels.items():
        logger.setLevel(max(level, logging.ERROR))
    try:
        with warnings.catch_warnings(), contextlib.chdir(cwd) if cwd else contextlib.nullcontext():
            if all_warnings:
                warnings.simplefilter("ignore")
            yield
    finally:
        for logger, level in levels.items():
            logger.setLevel(level)


def parity_check(reference: Predictor, candidate: Predictor, texts: Sequence[str], batch_size: int = 64) -> dict:
    """How far a variant's logits are from the reference's: ``max_abs_logit_diff`` catches a broken export (fp32
    ONNX: ~1e-6), ``prediction_agreement`` (share of equal argmax) is what quantisation may move."""
    texts = list(texts)
    if not texts:
        raise ValueError("parity_check needs at least one text.")
    if list(reference.labels) != list(candidate.labels):
        raise ValueError("The predictors have different labels (or label order): logits do not compare.")
    max_diff, agree = 0.0, 0
    for start in range(0, len(texts), batch_size):
        batch = texts[start : start + batch_size]
        ref, cand = reference.logits(batch), candidate.logits(batch)
        max_diff = max(max_diff, float(np.abs(ref - cand).max()))
        agree += int((ref.argmax(axis=-1) == cand.argmax(axis=-1)).sum())
    return {"max_abs_logit_diff": max_diff, "prediction_agreement": agree / len(texts), "n": len(texts)}


def build_variants(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, out_dir: str | os.PathLike, *,
    threads: int | None = None, variants: Sequence[str] = VARIANTS, prefix: str = "student",
    max_length: int = MAX_LENGTH,
) -> dict[str, Predictor]:
    """The requested variants of ``model`` as ``{f"{prefix}-{variant}": predictor}``. ONNX files go to
    ``out_dir``: ``model.onnx``, ``model-int8.onnx``, ``model-fused.onnx`` and ``model-fused-int8.onnx``;
    ``threads`` applies to the ONNX Runtime sessions."""
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise ValueError(f"Unknown variant(s) {unknown}; choose from {VARIANTS}.")
    out_dir = Path(out_dir)
    fp32_path, int8_path = out_dir / "model.onnx", out_dir / "model-int8.onnx"
    onnx_predictor = functools.partial(OnnxPredictor, tokenizer=tokenizer, threads=threads, max_length=max_length)
    result: dict[str, Predictor] = {}
    if "int8" in variants:
        result[f"{prefix}-int8"] = torch_int8_predictor(model, tokenizer, max_length=max_length)
    if "onnx" in variants or "onnx-int8" in variants:
        export_onnx(model, tokenizer, fp32_path)
    if "onnx" in variants:
        result[f"{prefix}-onnx"] = onnx_predictor(fp32_path)
    if "onnx-int8" in variants:
        quantize_onnx_int8(fp32_path, int8_path)
        result[f"{prefix}-onnx-int8"] = onnx_predictor(int8_path)
    if "onnx-fused-int8" in variants:
        fused_path, fused_int8_path = out_dir / "model-fused.onnx", out_dir / "model-fused-int8.onnx"
        quantize_onnx_int8(export_onnx_fused(model, tokenizer, fused_path), fused_int8_path, quantize_attention=True)
        result[f"{prefix}-onnx-fused-int8"] = onnx_predictor(fused_int8_path)
    return result
