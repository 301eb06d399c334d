"""OpenVINO as a peer engine: the student's fp32 ONNX file converted to an OpenVINO IR, and its NNCF int8
quantisation, behind kdlib's :class:`~kdlib.inference.Predictor` interface, so ``time_pipeline``,
``measure_quality`` and ``compute_size`` measure them exactly as they measure kdlib's own variants.

What OpenVINO is given to do well on single queries: the latency hint (``PERFORMANCE_HINT=LATENCY``,
one stream), ``INFERENCE_NUM_THREADS`` = the run's threads, and two shape modes that the benchmark
times side by side: dynamic shapes (one compiled model, any length) and static-shape buckets (one
compiled model per fixed sequence length of :data:`DEFAULT_BUCKETS`, each query padded to the
smallest bucket that holds it; the attention mask hides the padding). The fp32 IR runs at
``INFERENCE_PRECISION_HINT=f32``, since the CPU plugin otherwise computes in bf16 where the CPU has it;
the int8 IR keeps the plugin's default precision for what NNCF leaves unquantised (recorded by
``describe()``).

NNCF calibrates on :data:`CALIBRATION_QUERIES` training queries drawn with a fixed seed
(:func:`calibration_subset`), one query per sample as they are served, ``model_type=TRANSFORMER``.

The optional extra ``openvino`` of pyproject.toml, locked in ``requirements-openvino.lock``:

    make extras EXTRA=openvino    # i.e. .venv/bin/pip install --require-hashes --no-deps -r requirements-openvino.lock

Without it :func:`build_openvino_peers` returns no predictors and says why (:func:`peer_status`).
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import sys
from collections.abc import Sequence
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import numpy as np
from transformers import PreTrainedTokenizerBase

from kdlib.config import MAX_LENGTH
from kdlib.inference import LABELS_KEY, Predictor, _lean_encoder, onnx_metadata

DEFAULT_BUCKETS = (8, 12, 16, 24, 32, 64, MAX_LENGTH)  # static sequence lengths; the last holds max_length
CALIBRATION_QUERIES = 300
INSTALL_HINT = ".venv/bin/pip install --require-hashes --no-deps -r requirements-openvino.lock"


def _installed(package: str) -> str | None:
    """The installed version of ``package``, None where it is not importable."""
    if importlib.util.find_spec(package) is None:
        return None
    try:
        return version(package)
    except PackageNotFoundError:
        return "unknown"


def peer_status() -> dict:
    """Which peer rows can run here: the installed ``openvino`` / ``nncf`` versions and, per precision,
    why its rows are skipped (None: they run)."""
    ov_version, nncf_version = _installed("openvino"), _installed("nncf")
    missing = f"openvino is not installed (the optional extra: {INSTALL_HINT})"
    return {
        "openvino": ov_version,
        "nncf": nncf_version,
        "fp32_skipped": None if ov_version else missing,
        "int8_skipped": (missing if not ov_version else
                         None if nncf_version else f"nncf is not installed (the optional extra: {INSTALL_HINT})"),
    }


def calibration_subset(texts: Sequence[str], n: int = CALIBRATION_QUERIES, seed: int = 42) -> list[str]:
    """``n`` texts drawn without replacement by a seeded generator, in their original order (all of them
    when there are fewer): the same calibration set on every run."""
    texts = list(texts)
    if n < 1:
        raise ValueError(f"n (calibration queries) must be >= 1, got {n}.")
    if len(texts) <= n:
        return texts
    index = np.sort(np.random.default_rng(seed).choice(len(texts), size=n, replace=False))
    return [texts[i] for i in index]


def _check_buckets(buckets: Sequence[int], max_length: int) -> tuple[int, ...]:
    ordered = tuple(sorted(set(buckets)))
    if not ordered or ordered[0] < 1 or any(not isinstance(b, int) for b in ordered):
        raise ValueError(f"buckets must be whole sequence lengths >= 1, got {list(buckets)}.")
    if ordered[-1] < max_length:
        raise ValueError(f"The largest bucket ({ordered[-1]}) must hold max_length={max_length} tokens: "
                         f"add {max_length} to buckets.")
    return ordered


class OpenVinoPredictor(Predictor):
    """An OpenVINO IR (``.xml`` + ``.bin``) run by OpenVINO's CPU plugin, with its tokenizer.

    ``buckets`` None: one compiled model with the IR's dynamic shapes, a batch padded to its longest text.
    ``buckets`` given: one compiled model per static length ``(1, L)``; each text is padded to the
    smallest bucket that holds it and run alone, so a batch costs one call per text. ``precision`` sets
    ``INFERENCE_PRECISION_HINT`` (None: the plugin's default).
    """

    def __init__(
        self,
        xml_path: str | Path,
        tokenizer: PreTrainedTokenizerBase,
        *,
        labels: Sequence[str],
        threads: int | None,
        buckets: Sequence[int] | None = None,
        precision: str | None = None,
        dtype: str = "float32",
        max_length: int = MAX_LENGTH,
    ) -> None:
        import openvino as ov  # the optional extra: imported only when a peer is built

        self.path = Path(xml_path)
        if not self.path.is_file() or not self.path.with_suffix(".bin").is_file():
            raise FileNotFoundError(f"{self.path} (with its .bin beside it) is not there: save the IR first.")
        self.tokenizer, self.labels, self.threads = tokenizer, list(labels), threads
        self.max_length, self.dtype, self.precision = max_length, dtype, precision
        self.buckets = _check_buckets(buckets, max_length) if buckets else None
        self.config: dict = {"PERFORMANCE_HINT": "LATENCY"}
        if threads:
            self.config["INFERENCE_NUM_THREADS"] = int(threads)
        if precision:
            self.config["INFERENCE_PRECISION_HINT"] = precision
        core = ov.Core()
        model = core.read_model(self.path)
        self.input_names = [port.get_any_name() for port in model.inputs]
        outputs = {port.get_any_name() for port in model.outputs}
        self.exposes_features = "features" in outputs
        self._compiled = {}
        for length in self.buckets or (None,):
            shaped = model
            if length is not None:
                shaped = model.clone()
                shaped.reshape({name: [1, length] for name in self.input_names})
            self._compiled[length] = core.compile_model(shaped, "CPU", self.config)
        self._requests = {length: compiled.create_infer_request() for length, compiled in self._compiled.items()}
        self._outputs = {length: {name: compiled.output(name) for name in outputs}
                         for length, compiled in self._compiled.items()}
        first = next(iter(self._compiled.values()))
        hint = first.get_property("INFERENCE_PRECISION_HINT")
        self.inference_precision = hint.get_type_name() if hasattr(hint, "get_type_name") else str(hint)
        self.version = ov.get_version()
        self._encoder = _lean_encoder(tokenizer, max_length)
        self._pad_id = tokenizer.pad_token_id or 0

    def _encode(self, texts: list[str]) -> dict[str, np.ndarray]:
        """Token ids, padded to the batch's longest text (the same ids as ``OnnxPredictor``'s)."""
        if self._encoder is None:
            encoded = self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_length,
                                     return_tensors="np")
            ids = np.asarray(encoded["input_ids"], dtype=np.int64)
            mask = np.asarray(encoded["attention_mask"], dtype=np.int64)
            types = np.asarray(encoded.get("token_type_ids", np.zeros_like(ids)), dtype=np.int64)
        else:
            encodings = self._encoder.encode_batch(texts)
            ids = np.array([e.ids for e in encodings], dtype=np.int64)
            mask = np.array([e.attention_mask for e in encodings], dtype=np.int64)
            types = np.array([e.type_ids for e in encodings], dtype=np.int64)
        return {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}

    def _feed(self, encoded: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        missing = [name for name in self.input_names if name not in encoded]
        if missing:
            raise KeyError(f"The OpenVINO model needs input(s) {missing}, which the tokenizer does not produce.")
        return {name: encoded[name] for name in self.input_names}

    def _bucket(self, length: int) -> int:
        return next(b for b in self.buckets if b >= length)

    def _run(self, texts: Sequence[str], names: Sequence[str]) -> list[np.ndarray]:
        """The named outputs for ``texts``: one call for dynamic shapes, one per text for buckets."""
        texts = list(texts)
        if self.buckets is None:
            result = self._requests[None].infer(self._feed(self._encode(texts)))
            return [np.asarray(result[self._outputs[None][n]], dtype=np.float32) for n in names]
        rows: list[list[np.ndarray]] = [[] for _ in names]
        for text in texts:
            encoded = self._encode([text])
            length = encoded["input_ids"].shape[1]
            bucket = self._bucket(length)
            pad = bucket - length
            padded = {
                "input_ids": np.pad(encoded["input_ids"], ((0, 0), (0, pad)), constant_values=self._pad_id),
                "attention_mask": np.pad(encoded["attention_mask"], ((0, 0), (0, pad))),
                "token_type_ids": np.pad(encoded["token_type_ids"], ((0, 0), (0, pad))),
            }
            result = self._requests[bucket].infer(self._feed(padded))
            for row, name in zip(rows, names, strict=True):
                row.append(np.asarray(result[self._outputs[bucket][name]], dtype=np.float32))
        return [np.concatenate(row) for row in rows]

    def logits(self, texts: Sequence[str]) -> np.ndarray:
        return self._run(texts, ["logits"])[0]

    def logits_and_features(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray | None]:
        if not self.exposes_features:
            return self.logits(texts), None
        logits, features = self._run(texts, ["logits", "features"])
        return logits, features

    def size_bytes(self) -> int:
        """Bytes on disk: the IR's ``.xml`` and ``.bin``."""
        return self.path.stat().st_size + self.path.with_suffix(".bin").stat().st_size

    def describe(self) -> dict:
        return {
            "backend": "openvino",
            "device": "cpu",
            "dtype": self.dtype,
            "inference_precision": self.inference_precision,
            "threads": self.threads,
            "performance_hint": "LATENCY",
            "shapes": f"static buckets {list(self.buckets)}" if self.buckets else "dynamic",
            "openvino": self.version,
            "path": self.path.name,
        }


def _quantize(model, tokenizer: PreTrainedTokenizerBase, texts: list[str], max_length: int):
    """NNCF int8 of an OpenVINO model, calibrated on ``texts`` one query per sample."""
    import nncf  # the optional extra: imported only when a peer is built

    names = [port.get_any_name() for port in model.inputs]
    samples = []
    for text in texts:
        encoded = tokenizer([text], truncation=True, max_length=max_length, return_tensors="np")
        ids = np.asarray(encoded["input_ids"], dtype=np.int64)
        feed = {"input_ids": ids, "attention_mask": np.asarray(encoded["attention_mask"], dtype=np.int64),
                "token_type_ids": np.asarray(encoded.get("token_type_ids", np.zeros_like(ids)), dtype=np.int64)}
        samples.append({name: feed[name] for name in names})
    with contextlib.redirect_stdout(sys.stderr):  # NNCF's progress bars: beside the warnings, not in the report
        return nncf.quantize(model, nncf.Dataset(samples), model_type=nncf.ModelType.TRANSFORMER,
                             subset_size=len(samples))


def build_openvino_peers(
    onnx_path: str | Path,
    tokenizer: PreTrainedTokenizerBase,
    out_dir: str | Path,
    *,
    threads: int | None,
    calibration_texts: Sequence[str],
    buckets: Sequence[int] = DEFAULT_BUCKETS,
    max_length: int = MAX_LENGTH,
    seed: int = 42,
) -> tuple[dict[str, Predictor], dict]:
    """``({name: predictor}, status)``: OpenVINO fp32 and NNCF int8 of the fp32 ONNX file ``onnx_path``,
    each with dynamic shapes (``openvino-fp32``, ``openvino-int8``) and static buckets (``...-static``).

    The IRs are written to ``out_dir`` (``model.xml`` / ``model-int8.xml``, fp32 weights kept as fp32).
    ``status`` is :func:`peer_status` plus the calibration size; rows whose package is missing are left
    out and the status says why.
    """
    onnx_path, out_dir = Path(onnx_path), Path(out_dir)
    status = peer_status()
    if status["fp32_skipped"]:
        return {}, status
    if not onnx_path.is_file():
        raise FileNotFoundError(f"{onnx_path} is not there: export the student's fp32 ONNX file first "
                                "(kdlib.inference.export_onnx).")
    import openvino as ov  # the optional extra: imported only when a peer is built

    labels = json.loads(onnx_metadata(onnx_path)[LABELS_KEY])
    out_dir.mkdir(parents=True, exist_ok=True)
    model = ov.Core().read_model(onnx_path)
    fp32_xml = out_dir / "model.xml"
    ov.save_model(model, fp32_xml, compress_to_fp16=False)
    common = {"labels": labels, "threads": threads, "max_length": max_length}
    peers: dict[str, Predictor] = {
        "openvino-fp32": OpenVinoPredictor(fp32_xml, tokenizer, precision="f32", **common),
        "openvino-fp32-static": OpenVinoPredictor(fp32_xml, tokenizer, precision="f32", buckets=buckets, **common),
    }
    if not status["int8_skipped"]:
        texts = calibration_subset(calibration_texts, CALIBRATION_QUERIES, seed)
        int8_xml = out_dir / "model-int8.xml"
        ov.save_model(_quantize(model, tokenizer, texts, max_length), int8_xml, compress_to_fp16=False)
        peers["openvino-int8"] = OpenVinoPredictor(int8_xml, tokenizer, dtype="int8", **common)
        peers["openvino-int8-static"] = OpenVinoPredictor(int8_xml, tokenizer, dtype="int8", buckets=buckets,
                                                          **common)
        status.update(calibration_queries=len(texts), calibration_seed=seed)
    status["buckets"] = list(_check_buckets(buckets, max_length))
    return peers, status


def fastest_peers(p50_ms: dict[str, float]) -> dict[str, str]:
    """Per precision, the faster shape mode among the timed peer rows: ``{"fp32": name, "int8": name}``."""
    kept = {}
    for precision in ("fp32", "int8"):
        timed = {name: p50_ms[name] for name in (f"openvino-{precision}", f"openvino-{precision}-static")
                 if name in p50_ms}
        if timed:
            kept[precision] = min(timed, key=timed.get)
    return kept
