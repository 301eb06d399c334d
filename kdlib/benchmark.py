"""Accuracy, size and latency of a classifier, measured the reference way and a little better.

The reference study (*NLP with Transformers*, ch. 8) reports three figures per model: accuracy on
the CLINC150 test split, the size of the saved state dict in MB, and the mean and standard
deviation of single-query latency over 100 ``pipeline`` calls. :class:`PerformanceBenchmark`
keeps those keys (``accuracy``, ``size_mb``, ``time_avg_ms``, ``time_std_ms``) and adds:

* batched, length-sorted inference for accuracy (same predictions, many times faster);
* in-scope accuracy, out-of-scope recall / precision (the CLINC150 paper's metrics) and macro-F1;
* latency percentiles and batch throughput, with the thread count they were measured at;
* an environment fingerprint, so that every figure says where it came from.
"""

from __future__ import annotations

import datetime as dt
import os
import platform
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from datasets import Dataset

from kdlib.data import OOS_LABEL
from kdlib.inference import Predictor, TorchPredictor
from kdlib.models import pick_device
from kdlib.oos import FEATURE_SCORE

Clock = Callable[[], float]


# ---------------------------------------------------------------------------------------------
# Accuracy
# ---------------------------------------------------------------------------------------------


def predict_labels(predictor: Predictor, texts: Sequence[str], batch_size: int = 64) -> list[str]:
    """Predicted label names, in input order, from length-sorted batches (little padding waste)."""
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    predictions: list[str] = [""] * len(texts)
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        for i, label in zip(chunk, predictor.predict([texts[i] for i in chunk]), strict=True):
            predictions[i] = label
    return predictions


def classification_metrics(
    gold: Sequence[str], predicted: Sequence[str], oos_label: str | None = OOS_LABEL
) -> dict:
    """Accuracy and macro-F1 (scikit-learn's); with an OOS label present, also the CLINC150 paper's metrics:

    * ``in_scope_accuracy``: accuracy on queries whose gold label is not OOS;
    * ``oos_recall``: share of OOS queries predicted as OOS;
    * ``oos_precision``: share of OOS predictions that really are OOS.
    """
    if len(gold) != len(predicted) or len(gold) == 0:
        raise ValueError(
            f"Need as many predictions as gold labels (got {len(predicted)} and {len(gold)}), at least one."
        )
    from sklearn.metrics import f1_score

    gold_a, pred_a = np.asarray(gold, dtype=object), np.asarray(predicted, dtype=object)
    correct = gold_a == pred_a
    # scikit-learn's macro-F1 averages over every label seen in gold or predictions.
    metrics = {
        "accuracy": float(correct.mean()),
        "macro_f1": float(f1_score(list(gold), list(predicted), average="macro", zero_division=0)),
    }
    if oos_label is not None and oos_label in set(gold):
        in_scope = gold_a != oos_label
        is_oos = ~in_scope
        predicted_oos = pred_a == oos_label
        metrics["in_scope_accuracy"] = float(correct[in_scope].mean()) if in_scope.any() else float("nan")
        metrics["oos_recall"] = float(predicted_oos[is_oos].mean())
        metrics["oos_precision"] = float(is_oos[predicted_oos].mean()) if predicted_oos.any() else 0.0
    return metrics


def predict_logits(
    predictor: Predictor, texts: Sequence[str], batch_size: int = 64, *, features: bool = False
) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """Logits ``(len(texts), len(predictor.labels))`` in input order, from length-sorted batches;
    with ``features=True`` also the predictor's features (:meth:`Predictor.logits_and_features`)."""
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    out = np.zeros((len(texts), len(predictor.labels)), dtype=np.float32)
    found = None
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        batch = [texts[i] for i in chunk]
        if not features:
            out[chunk] = predictor.logits(batch)
            continue
        out[chunk], batch_features = predictor.logits_and_features(batch)
        if found is None:
            found = np.zeros((len(texts), batch_features.shape[1]), dtype=np.float32)
        found[chunk] = batch_features
    return (out, found) if features else out


def _check_split(dataset: object, what: str) -> None:
    if not isinstance(dataset, Dataset):
        raise TypeError(
            f"{what} must be a datasets.Dataset with `text` and `label` columns (e.g. data['test']), "
            f"got {type(dataset).__name__}."
        )


def _check_inputs(
    dataset: object, validation: object, train: object, oos_score: str, oos_label: str | None = OOS_LABEL
) -> bool:
    """Refuse wrong splits before any work; True when the data has an OOS label."""
    _check_split(dataset, "dataset")
    for split, what in ((validation, "validation"), (train, "train")):
        if split is not None:
            _check_split(split, what)
    has_oos = oos_label is not None and oos_label in dataset.features["label"].names
    if has_oos and oos_score == FEATURE_SCORE and train is None:
        raise ValueError(
            "oos_score='mahalanobis' is fit on the training split: pass `train=` (e.g. data['train']), "
            "or choose oos_score='energy'."
        )
    return has_oos


def _gold_ids(predictor: Predictor, dataset: Dataset, what: str) -> np.ndarray:
    """The split's gold labels as indices into the predictor's labels (matched by name); a label the
    model cannot predict is refused. Splits are type-checked by :func:`_check_inputs` first."""
    names = dataset.features["label"].names
    unknown = sorted(set(names) - set(predictor.labels))
    if unknown:
        raise ValueError(f"The model cannot predict label(s) {unknown[:10]} of the {what}: label sets differ.")
    position = {label: i for i, label in enumerate(predictor.labels)}
    return np.array([position[names[i]] for i in dataset["label"]], dtype=np.int64)


def evaluate(
    predictor: Predictor,
    dataset: Dataset,
    *,
    batch_size: int = 64,
    oos_label: str | None = OOS_LABEL,
    validation: Dataset | None = None,
    train: Dataset | None = None,
    oos_score: str = "energy",
    threshold_rule: str = "in_scope_accuracy",
    in_scope_target: float = 0.95,
) -> tuple[dict, dict | None]:
    """Metrics of ``predictor`` on a ``(text, label: ClassLabel)`` split (gold and predicted matched by name).

    With an OOS label in the data, also the OOS detection keys of :data:`kdlib.oos.OOS_KEYS`: the
    ``oos_score``'s AUROC / FPR95 on this split and, with ``validation`` given, the metrics of the
    threshold chosen on ``validation`` by ``threshold_rule`` (see :func:`kdlib.oos.choose_threshold`).
    ``oos_score="mahalanobis"`` is fit on ``train`` (required); a predictor without features is scored
    by ``energy`` instead, and the record's ``oos_score`` says which score was used.
    Without an OOS label these keys are None (not applicable).

    Returns the metrics and, with an OOS label, the test scores for plotting
    (``{"scores", "is_oos", "threshold", "method"}``; else None).
    """
    from kdlib import oos

    has_oos = _check_inputs(dataset, validation, train, oos_score, oos_label)
    splits = {"dataset": dataset, "validation": validation, "train": train}
    # every split's labels checked against the model's before the first pass over any of them
    golds = {what: _gold_ids(predictor, split, what) for what, split in splits.items() if split is not None}
    gold = golds["dataset"]
    method = oos_score
    if method == oos.FEATURE_SCORE and not predictor.exposes_features:
        method = oos.FALLBACK_SCORE  # e.g. an ONNX file exported elsewhere: logits only
    use_features = has_oos and method == oos.FEATURE_SCORE
    oos_index = predictor.labels.index(oos_label) if has_oos else None
    scorer = None
    if use_features:
        with torch.inference_mode():
            _, train_features = predict_logits(predictor, train["text"], batch_size, features=True)
        scorer = oos.MahalanobisScore(train_features, golds["train"], oos_index)

    def logits_and_scores(split: Dataset) -> tuple[np.ndarray, np.ndarray | None]:
        """One pass over ``split``: its logits and, with OOS data, its OOS scores."""
        with torch.inference_mode():
            found = predict_logits(predictor, split["text"], batch_size, features=use_features)
        if not has_oos:
            return found, None
        if scorer is not None:
            return found[0], scorer(found[1])
        return found, oos.oos_scores(found, method, oos_index)

    logits, scores = logits_and_scores(dataset)
    labels = np.asarray(predictor.labels, dtype=object)
    predicted = list(labels[logits.argmax(axis=1)])
    metrics = classification_metrics(list(labels[gold]), predicted, oos_label if has_oos else None)
    metrics.update({key: None for key in oos.OOS_KEYS})
    metrics.update(oos_score=method if has_oos else None, threshold_rule=None)
    detail = None
    if has_oos:
        metrics.update(oos.detection_metrics(scores, gold == oos_index))
        threshold = None
        if validation is not None:
            val_logits, val_scores = logits_and_scores(validation)
            threshold = oos.choose_threshold(
                val_scores,
                val_logits.argmax(axis=1),
                golds["validation"],
                oos_index,
                rule=threshold_rule,
                in_scope_target=in_scope_target,
            )
            metrics["threshold_rule"] = oos.describe_rule(threshold_rule, in_scope_target)
            # A score's separation is measurable on any split; a decision threshold only with validation.
            metrics.update(oos.threshold_metrics(scores, logits.argmax(axis=1), gold, oos_index, threshold))
        detail = {"scores": scores, "is_oos": gold == oos_index, "threshold": threshold, "method": method}
    return metrics, detail


# ---------------------------------------------------------------------------------------------
# Size
# ---------------------------------------------------------------------------------------------


def compute_size(predictor: Predictor) -> dict:
    """Size in MB (bytes / 2**20) of the saved weights, and the parameter count when known."""
    size = predictor.size_bytes()
    return {"size_mb": size / 2**20, "size_bytes": size, "num_parameters": predictor.num_parameters()}


# ---------------------------------------------------------------------------------------------
# Latency and throughput
# ---------------------------------------------------------------------------------------------


def latency_stats(latencies_ms: Sequence[float]) -> dict:
    """Mean and standard deviation (the reference's ``np.std``) plus p50 / p95 / p99, in ms."""
    values = np.asarray(latencies_ms, dtype=float)
    return {
        "time_avg_ms": float(values.mean()),
        "time_std_ms": float(values.std()),
        "time_p50_ms": float(np.percentile(values, 50)),
        "time_p95_ms": float(np.percentile(values, 95)),
        "time_p99_ms": float(np.percentile(values, 99)),
        "latency_queries": int(values.size),
    }


def time_pipeline(
    predictor: Callable[[str], object],
    queries: Sequence[str],
    *,
    warmup: int = 10,
    clock: Clock = time.perf_counter,
) -> dict:
    """Time one call per query (tokenisation included), after ``warmup`` untimed calls."""
    if not queries:
        raise ValueError("time_pipeline needs at least one query.")
    for query in list(queries)[:warmup]:
        predictor(query)
    latencies = []
    for query in queries:
        start = clock()
        predictor(query)
        latencies.append((clock() - start) * 1000)
    return latency_stats(latencies)


def time_throughput(
    predictor: Predictor, texts: Sequence[str], *, batch_size: int = 32, clock: Clock = time.perf_counter
) -> dict:
    """Queries per second when ``texts`` are sent in batches of ``batch_size``."""
    texts = list(texts)
    predictor.logits(texts[:batch_size])  # warm-up
    start = clock()
    for i in range(0, len(texts), batch_size):
        predictor.logits(texts[i : i + batch_size])
    elapsed = clock() - start
    return {
        "throughput_qps": len(texts) / elapsed if elapsed > 0 else float("inf"),
        "throughput_batch_size": batch_size,
    }


# ---------------------------------------------------------------------------------------------
# Where a figure was measured
# ---------------------------------------------------------------------------------------------


class OtherProcesses:
    """The share of the CPU that other processes used between entering and leaving the block
    (``/proc/stat`` minus this process's own CPU time): torch with 2 threads runs ~50x slower when
    another process holds the cores, so benchmark scripts refuse to store figures timed beside one."""

    share: float = 0.0

    def __enter__(self) -> OtherProcesses:
        self._start = (*self._cpu_seconds(), time.monotonic())
        return self

    def __exit__(self, *exc) -> None:
        busy, own = self._cpu_seconds()
        start_busy, start_own, start_wall = self._start
        wall = time.monotonic() - start_wall
        self.share = max(0.0, (busy - start_busy) - (own - start_own)) / (wall * (os.cpu_count() or 1))

    @staticmethod
    def _cpu_seconds() -> tuple[float, float]:
        """(CPU seconds all processes spent busy, CPU seconds this process spent)."""
        import resource

        ticks = os.sysconf("SC_CLK_TCK")
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        own = resource.getrusage(resource.RUSAGE_SELF)
        return (sum(fields) - fields[3] - fields[4]) / ticks, own.ru_utime + own.ru_stime  # all but idle, iowait


def cpu_model() -> str:
    """The CPU's model name (latency figures mean little without it)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def git_commit(cwd: str | os.PathLike | None = None) -> str | None:
    """The short commit of the checkout that produced a figure, or None outside git."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            cwd=cwd or Path(__file__).resolve().parent,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def env_fingerprint(device: str | None = None) -> dict:
    """Versions, hardware and threads: recorded with every result so figures can be compared fairly."""
    import kdlib
    from kdlib.config import library_versions

    versions = library_versions()
    return {
        "torch_version": versions["torch"],
        "transformers_version": versions["transformers"],
        "onnxruntime_version": versions["onnxruntime"],
        "kdlib_version": kdlib.__version__,
        "git_commit": git_commit(),
        "python_version": platform.python_version(),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "device": str(pick_device(device)),
        "timestamp": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }


# ---------------------------------------------------------------------------------------------
# The benchmark
# ---------------------------------------------------------------------------------------------


class PerformanceBenchmark:
    """Accuracy, size and latency of one model variant, under the reference study's names.

    Parameters:
        model: a :class:`~kdlib.inference.Predictor` (any variant: fp32, int8, ONNX Runtime) or a
            ``transformers`` model, which is wrapped together with ``tokenizer``.
        dataset: the test split, a ``datasets.Dataset`` with ``text`` and a ``label`` ClassLabel.
        name: the variant's name, the key of :meth:`run_benchmark`'s result.
        tokenizer: needed only with a ``transformers`` model.
        model_ref: where the model came from, stored in the record.
        validation: the validation split, on which the OOS threshold is chosen (None: no threshold).
        train: the training split, on which ``oos_score="mahalanobis"`` is fit (needed only for it).
        oos_score: ``"energy"``, ``"msp"`` (:func:`kdlib.oos.oos_scores`) or ``"mahalanobis"``
            (:class:`kdlib.oos.MahalanobisScore`; ``energy`` for a predictor without features).
        threshold_rule: ``"in_scope_accuracy"`` (keep validation in-scope accuracy >= ``in_scope_target``)
            or ``"accuracy"`` (maximise validation accuracy).
        in_scope_target: see ``threshold_rule``.
        n_latency_queries: single-query calls timed (the first queries of ``dataset``).
        warmup: untimed calls before timing.
        batch_size: batch size of the accuracy pass (length-sorted, no gradients).
        throughput_batch_size: batch size of the throughput measurement.
        threads: torch threads while measuring (None: the session's).
        clock: the timer, replaceable in tests.

    :meth:`run_benchmark` returns ``{name: metrics}``: accuracy and OOS metrics (:func:`evaluate`),
    size (:func:`compute_size`), latency and throughput (:meth:`time_pipeline`), and the environment.
    Afterwards ``oos_detail`` holds the test OOS scores (for :func:`kdlib.plots.plot_oos_scores`).
    """

    def __init__(
        self,
        model,
        dataset: Dataset,
        name: str = "baseline",
        *,
        tokenizer=None,
        model_ref: str | None = None,
        validation: Dataset | None = None,
        train: Dataset | None = None,
        oos_score: str = "energy",
        threshold_rule: str = "in_scope_accuracy",
        in_scope_target: float = 0.95,
        n_latency_queries: int = 100,
        warmup: int = 10,
        batch_size: int = 64,
        throughput_batch_size: int = 32,
        threads: int | None = None,
        clock: Clock = time.perf_counter,
    ) -> None:
        _check_inputs(dataset, validation, train, oos_score)  # before any work, not after the model is wrapped
        if isinstance(model, Predictor):
            self.predictor = model
        else:
            if tokenizer is None:
                raise ValueError("Pass `tokenizer=` with a transformers model (or pass a Predictor).")
            self.predictor = TorchPredictor(model, tokenizer)
        self.dataset = dataset
        self.name = name
        self.model_ref = model_ref
        self.oos_options = dict(
            validation=validation, train=train, oos_score=oos_score, threshold_rule=threshold_rule,
            in_scope_target=in_scope_target,
        )
        self.oos_detail: dict | None = None
        self.n_latency_queries = n_latency_queries
        self.warmup = warmup
        self.batch_size = batch_size
        self.throughput_batch_size = throughput_batch_size
        self.threads = threads
        self.clock = clock

    def compute_accuracy(self) -> dict:
        """Quality on the dataset (:func:`evaluate`: accuracy, macro-F1, OOS detection with a threshold);
        the book's name for the step, kept for its readers."""
        metrics, self.oos_detail = evaluate(
            self.predictor, self.dataset, batch_size=self.batch_size, **self.oos_options
        )
        return metrics

    def compute_size(self) -> dict:
        """Size of the saved weights in MB and the parameter count (:func:`compute_size`)."""
        return compute_size(self.predictor)

    def time_pipeline(self) -> dict:
        """Single-query latency over the first ``n_latency_queries`` texts, and batched throughput."""
        queries = self.dataset["text"][: self.n_latency_queries]
        stats = time_pipeline(self.predictor, queries, warmup=self.warmup, clock=self.clock)
        stats.update(
            time_throughput(
                self.predictor,
                self.dataset["text"][:512],
                batch_size=self.throughput_batch_size,
                clock=self.clock,
            )
        )
        return stats

    def run_benchmark(self) -> dict[str, dict]:
        """``{name: metrics}`` like the reference, metrics including the environment fingerprint."""
        previous_threads = torch.get_num_threads()
        if self.threads:
            torch.set_num_threads(self.threads)
        try:
            metrics = {**self.compute_accuracy(), **self.compute_size(), **self.time_pipeline()}
            metrics.update(
                {
                    "model_ref": self.model_ref,
                    "test_rows": len(self.dataset),
                    "validation_rows": len(self.oos_options["validation"] or []),
                    "predictor": self.predictor.describe(),
                    "env": env_fingerprint(
                        getattr(self.predictor, "device", None) and str(self.predictor.device)
                    ),
                }
            )
        finally:
            torch.set_num_threads(previous_threads)
        return {self.name: metrics}


def median_of_repeats(fn: Callable[[], object], repeats: int = 3, clock: Clock = time.perf_counter) -> dict:
    """Run ``fn`` ``repeats`` times; the median and every wall time in seconds, and the last result.

    Single timings on a shared machine are noisy; the median of a few repeats is the figure to report.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be at least 1, got {repeats}.")
    seconds, result = [], None
    for _ in range(repeats):
        start = clock()
        result = fn()
        seconds.append(clock() - start)
    return {"median_s": float(np.median(seconds)), "all_s": seconds, "result": result}
