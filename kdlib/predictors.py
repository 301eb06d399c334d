"""One interface for everything that classifies text: PyTorch models, quantised models, ONNX Runtime.

:class:`PerformanceBenchmark` only talks to a :class:`Predictor`, so every variant of a model gets
its accuracy, size and latency measured by the same code. A predictor:

* ``labels`` - label names in output order;
* ``logits(texts)`` - a ``(len(texts), len(labels))`` float array for a batch (tokenisation included);
* ``__call__(text_or_texts)`` - like a ``transformers`` pipeline: ``[{"label": ..., "score": ...}]``;
* ``size_bytes()`` / ``num_parameters()`` - what the model weighs on disk and in parameters;
* ``describe()`` - a small dict for result records (backend, dtype, threads ...).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence

import numpy as np
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from kdlib.models import forward_inputs, pick_device

DEFAULT_MAX_LENGTH = 128


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=-1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=-1, keepdims=True)


class Predictor:
    """Base class: subclasses implement ``logits``, ``size_bytes`` and ``describe``."""

    labels: list[str]

    def logits(self, texts: Sequence[str]) -> np.ndarray:  # pragma: no cover - abstract
        raise NotImplementedError

    def size_bytes(self) -> int:  # pragma: no cover - abstract
        raise NotImplementedError

    def num_parameters(self) -> int | None:
        return None

    def describe(self) -> dict:
        return {}

    def __call__(self, texts: str | Sequence[str]) -> list[dict]:
        """Pipeline-style output: the top label and its probability for each text."""
        batch = [texts] if isinstance(texts, str) else list(texts)
        probs = softmax(self.logits(batch))
        best = probs.argmax(axis=-1)
        return [{"label": self.labels[i], "score": float(p[i])} for i, p in zip(best, probs, strict=True)]

    def predict(self, texts: Sequence[str]) -> list[str]:
        """Label names for a batch of texts."""
        return [self.labels[i] for i in self.logits(list(texts)).argmax(axis=-1)]


def state_dict_size_bytes(model: torch.nn.Module) -> int:
    """Bytes of ``torch.save(model.state_dict())``: the size figure of the reference study."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "model.pt")
        torch.save(model.state_dict(), path)
        return os.path.getsize(path)


class TorchPredictor(Predictor):
    """A ``transformers`` sequence classifier (fp32, or dynamically quantised) with its tokenizer."""

    def __init__(
        self,
        model: PreTrainedModel | torch.nn.Module,
        tokenizer: PreTrainedTokenizerBase,
        *,
        labels: Sequence[str] | None = None,
        device: str | torch.device | None = None,
        max_length: int = DEFAULT_MAX_LENGTH,
        backend: str = "pytorch",
        num_parameters: int | None = None,
    ) -> None:
        self.device = pick_device(str(device) if device is not None else None)
        self.model = model.to(self.device).eval()
        self.tokenizer = tokenizer
        config = getattr(model, "config", None)
        if labels is None:
            if config is None:
                raise ValueError("Pass `labels=` for a model without a transformers config.")
            labels = [config.id2label[i] for i in range(config.num_labels)]
        self.labels = list(labels)
        self.max_length = max_length
        self.backend = backend
        # A quantised model packs its int8 weights outside .parameters(): its caller passes the count.
        self._num_parameters = num_parameters

    @torch.inference_mode()
    def logits(self, texts: Sequence[str]) -> np.ndarray:
        encoded = self.tokenizer(
            list(texts), padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
        ).to(self.device)
        return self.model(**forward_inputs(self.model, encoded)).logits.float().cpu().numpy()

    def size_bytes(self) -> int:
        return state_dict_size_bytes(self.model)

    def num_parameters(self) -> int:
        if self._num_parameters is not None:
            return self._num_parameters
        return sum(p.numel() for p in self.model.parameters())

    def describe(self) -> dict:
        if self.backend.endswith("int8"):
            dtype = "int8 linear layers, float32 embeddings"
        else:
            dtype = str(next(self.model.parameters()).dtype).replace("torch.", "")
        return {"backend": self.backend, "device": str(self.device), "dtype": dtype}


class PipelinePredictor(Predictor):
    """The reference way: a ``transformers`` text-classification pipeline, one query per call.

    Used as the baseline in the speed benchmarks, so that kdlib's figures are compared with what
    the book measured, in the same process.
    """

    def __init__(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, *, device: str | None = None):
        from transformers import pipeline

        self.model = model.eval()
        self.device = pick_device(device)
        self.pipe = pipeline("text-classification", model=model, tokenizer=tokenizer, device=self.device)
        self.labels = [model.config.id2label[i] for i in range(model.config.num_labels)]

    def __call__(self, texts: str | Sequence[str]) -> list[dict]:
        return self.pipe(texts if isinstance(texts, str) else list(texts))

    def predict(self, texts: Sequence[str]) -> list[str]:
        """One pipeline call per query, as the reference's accuracy loop does."""
        return [self.pipe(text)[0]["label"] for text in texts]

    def size_bytes(self) -> int:
        return state_dict_size_bytes(self.model)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    def describe(self) -> dict:
        return {"backend": "transformers-pipeline", "device": str(self.device)}
