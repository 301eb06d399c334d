"""Accuracy, size and latency of a classifier, under the reference study's names and a little more.

:class:`PerformanceBenchmark` keeps the keys of *NLP with Transformers*, ch. 8 (``accuracy``, ``size_mb``,
``time_avg_ms``, ``time_std_ms``) and adds OOS metrics, latency percentiles, throughput and the environment.
"""

from __future__ import annotations

import numbers
import os
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from datasets import Dataset

from kdlib import oos
from kdlib.config import RunConfig
from kdlib.data import OOS_LABEL
from kdlib.inference import Predictor, TorchPredictor
from kdlib.metrics import classification_metrics
from kdlib.oos import FEATURE_SCORE, OOS_SCORES, ThresholdRule
from kdlib.session import env_fingerprint

Clock = Callable[[], float]


def _sorted_batches(texts: Sequence[str], batch_size: int) -> Iterator[list[int]]:
    """Indices of ``texts`` in batches, shortest texts first (little padding waste)."""
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    for start in range(0, len(order), batch_size):
        yield order[start : start + batch_size]


def predict_labels(predictor: Predictor, texts: Sequence[str], batch_size: int = 64) -> list[str]:
    """Predicted label names, in input order, from length-sorted batches."""
    predictions: list[str] = [""] * len(texts)
    for chunk in _sorted_batches(texts, batch_size):
        for i, label in zip(chunk, predictor.predict([texts[i] for i in chunk]), strict=True):
            predictions[i] = label
    return predictions


@torch.inference_mode()
def predict_logits(predictor: Predictor, texts: Sequence[str], batch_size: int = 64, *,
                   features: bool = False) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """Logits in input order from length-sorted batches; with ``features=True`` also the predictor's features."""
    out = np.zeros((len(texts), len(predictor.labels)), dtype=np.float32)
    found = None
    for chunk in _sorted_batches(texts, batch_size):
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
        raise TypeError(f"{what} must be a datasets.Dataset with `text` and `label` columns (e.g. data['test']), "
                        f"got {type(dataset).__name__}.")


def _check_inputs(dataset: object, validation: object, train: object, oos_score: str,
                  oos_label: str | None = OOS_LABEL) -> bool:
    """Refuse wrong splits before any work; True when the data has an OOS label."""
    _check_split(dataset, "dataset")
    for split, what in ((validation, "validation"), (train, "train")):
        if split is not None:
            _check_split(split, what)
    has_oos = oos_label is not None and oos_label in dataset.features["label"].names
    if has_oos and oos_score == FEATURE_SCORE and train is None:
        raise ValueError("oos_score='mahalanobis' is fit on the training split: pass `train=` (e.g. data['train']), "
                         "or choose oos_score='energy'.")
    return has_oos


def _gold_ids(predictor: Predictor, dataset: Dataset, what: str) -> np.ndarray:
    """The split's gold labels as indices into the predictor's labels (by name); unknown labels are refused."""
    names = dataset.features["label"].names
    unknown = sorted(set(names) - set(predictor.labels))
    if unknown:
        raise ValueError(f"The model cannot predict label(s) {unknown[:10]} of the {what}: label sets differ.")
    position = {label: i for i, label in enumerate(predictor.labels)}
    return np.array([position[names[i]] for i in dataset["label"]], dtype=np.int64)


@dataclass(frozen=True)
class SplitOutputs:
    """One pass of a predictor over a split: logits, gold label ids and, with OOS data, OOS scores."""

    logits: np.ndarray
    gold: np.ndarray
    scores: np.ndarray | None

    @property
    def predicted(self) -> np.ndarray:
        return self.logits.argmax(axis=1)


@dataclass(frozen=True)
class ScoredSplits:
    """The outputs per split, the OOS score used (None without an OOS label) and the OOS label's index."""

    outputs: dict[str, SplitOutputs]
    method: str | None
    oos_index: int | None


def score_splits(
    predictor: Predictor, splits: dict[str, Dataset], *, train: Dataset | None = None,
    oos_score: str = RunConfig.model_fields["oos_score"].default, oos_label: str | None = OOS_LABEL,
    batch_size: int = 64,
) -> ScoredSplits:
    """Logits and OOS scores of ``predictor`` on every split (``{"test": ..., ...}``), one pass each;
    ``oos_score="mahalanobis"`` is fit on ``train`` first. All labels are checked before the first pass."""
    first, *others = splits
    has_oos = _check_inputs(splits[first], splits.get("validation"), train, oos_score, oos_label)
    for what in others:
        _check_split(splits[what], what)
    golds = {what: _gold_ids(predictor, split, what) for what, split in splits.items()}
    train_gold = _gold_ids(predictor, train, "train") if train is not None else None
    # A predictor without features (e.g. an ONNX file exported elsewhere) falls back to a logit score.
    method = oos.FALLBACK_SCORE if oos_score == FEATURE_SCORE and not predictor.exposes_features else oos_score
    oos_index = predictor.labels.index(oos_label) if has_oos else None
    scorer = None
    if has_oos and method == FEATURE_SCORE:
        _, train_features = predict_logits(predictor, train["text"], batch_size, features=True)
        scorer = oos.MahalanobisScore(train_features, train_gold, oos_index)
    outputs = {}
    for what, split in splits.items():
        if scorer is not None:
            logits, features = predict_logits(predictor, split["text"], batch_size, features=True)
            scores = scorer(features)
        else:
            logits = predict_logits(predictor, split["text"], batch_size)
            scores = oos.oos_scores(logits, method, oos_index) if has_oos else None
        outputs[what] = SplitOutputs(logits, golds[what], scores)
    return ScoredSplits(outputs, method if has_oos else None, oos_index)


class Quality(NamedTuple):
    """The split's quality and OOS ``metrics``, and with an OOS label its OOS scores for
    :func:`kdlib.plots.plot_oos_scores` (``oos_detail``: ``{"scores", "is_oos", "threshold", "method"}``)."""

    metrics: dict
    oos_detail: dict | None


def measure_quality(
    predictor: Predictor, dataset: Dataset, *, batch_size: int = 64, oos_label: str | None = OOS_LABEL,
    validation: Dataset | None = None, train: Dataset | None = None,
    oos_score: str = RunConfig.model_fields["oos_score"].default, threshold: ThresholdRule | None = None,
) -> Quality:
    """The :class:`Quality` of ``predictor`` on one ``(text, label: ClassLabel)`` split (gold and predicted
    matched by name): accuracy and macro-F1, plus, when the data has an OOS label, the CLINC150 in-scope
    accuracy and OOS recall / precision, and this split's OOS scores for plotting.

    With an OOS label, also the keys of :data:`kdlib.oos.OOS_KEYS`: the ``oos_score``'s AUROC / FPR95 and,
    with ``validation``, the metrics of the threshold ``threshold`` (:class:`kdlib.oos.ThresholdRule`; None:
    the run default) chooses on it, ``threshold_missed`` saying why when the rule admits none. Without an
    OOS label these keys are None. ``oos_score="mahalanobis"`` is fit on ``train`` (required); a predictor
    without features is scored by ``energy`` instead, and the record's ``oos_score`` says which was used.
    """
    splits = {"dataset": dataset} if validation is None else {"dataset": dataset, "validation": validation}
    scored = score_splits(predictor, splits, train=train, oos_score=oos_score, oos_label=oos_label,
                          batch_size=batch_size)
    test, oos_index = scored.outputs["dataset"], scored.oos_index
    labels = np.asarray(predictor.labels, dtype=object)
    metrics = classification_metrics(list(labels[test.gold]), list(labels[test.predicted]),
                                     oos_label if oos_index is not None else None)
    metrics.update(dict.fromkeys(oos.OOS_KEYS), oos_score=scored.method, threshold_rule=None, threshold_missed=None)
    if oos_index is None:
        return Quality(metrics, None)
    is_oos = test.gold == oos_index
    metrics.update(oos.detection_metrics(test.scores, is_oos))
    choice = None
    if validation is not None:
        val = scored.outputs["validation"]
        choice = oos.choose_threshold(val.scores, val.predicted, val.gold, oos_index, threshold)
        metrics.update(threshold_rule=choice.rule, threshold_missed=choice.missed)
        # A score's separation is measurable on any split; a decision threshold only with validation.
        metrics.update(oos.threshold_metrics(test.scores, test.predicted, test.gold, oos_index, choice.threshold))
    detail = {"scores": test.scores, "is_oos": is_oos, "threshold": choice and choice.threshold,
              "method": scored.method}
    return Quality(metrics, detail)


def compute_size(predictor: Predictor) -> dict:
    """Size in MB (bytes / 2**20) of the saved weights, and the parameter count when known."""
    size = predictor.size_bytes()
    return {"size_mb": size / 2**20, "size_bytes": size, "num_parameters": predictor.num_parameters()}


def latency_stats(latencies_ms: Sequence[float]) -> dict:
    """Mean and standard deviation (the reference's ``np.std``) plus p50 / p95 / p99, in ms."""
    values = np.asarray(latencies_ms, dtype=float)
    p50, p95, p99 = np.percentile(values, [50, 95, 99])
    return {"time_avg_ms": float(values.mean()), "time_std_ms": float(values.std()), "time_p50_ms": float(p50),
            "time_p95_ms": float(p95), "time_p99_ms": float(p99), "latency_queries": int(values.size)}


def time_pipeline(
    predictor: Callable[[str], object], queries: Sequence[str], *, warmup: int = 10, clock: Clock = time.perf_counter
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


def time_throughput(predictor: Predictor, texts: Sequence[str], *, batch_size: int = 32,
                    clock: Clock = time.perf_counter) -> dict:
    """Queries per second when ``texts`` are sent in batches of ``batch_size``."""
    texts = list(texts)
    predictor.logits(texts[:batch_size])  # warm-up
    start = clock()
    for i in range(0, len(texts), batch_size):
        predictor.logits(texts[i : i + batch_size])
    elapsed = clock() - start
    qps = len(texts) / elapsed if elapsed > 0 else float("inf")
    return {"throughput_qps": qps, "throughput_batch_size": batch_size}


class OtherProcesses:
    """The share of the CPU other processes used while the block ran (``/proc/stat`` minus this process): torch's
    threads slow down many times over beside a busy process, so benchmark scripts refuse figures timed beside one."""

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
        import resource  # Unix only: kdlib.benchmark itself still imports on other systems

        ticks = os.sysconf("SC_CLK_TCK")
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        own = resource.getrusage(resource.RUSAGE_SELF)
        return (sum(fields) - fields[3] - fields[4]) / ticks, own.ru_utime + own.ru_stime  # all but idle, iowait


@dataclass(frozen=True)
class BenchmarkOptions:
    """How :class:`PerformanceBenchmark` measures; every setting a run configuration also has takes its
    default from :class:`~kdlib.config.RunConfig` (:meth:`from_config` takes a run's values).

    Attributes:
        oos_score: ``"mahalanobis"`` (:class:`kdlib.oos.MahalanobisScore`, fit on the data's ``train``
            split; ``energy`` for a predictor without features), ``"energy"`` or ``"msp"``
            (:func:`kdlib.oos.oos_scores`).
        threshold: how the OOS threshold is chosen on the ``validation`` split (:class:`kdlib.oos.ThresholdRule`).
        n_latency_queries: single-query calls timed (the first queries of the test split).
        warmup: untimed calls before timing.
        batch_size: batch size of the accuracy pass (length-sorted, no gradients).
        throughput_batch_size: batch size of the throughput measurement.
        threads: torch threads while measuring (None: the session's).
        clock: the timer, replaceable in tests.

    A bad setting is refused here, when the options are built, before any model runs.
    """

    oos_score: str = RunConfig.model_fields["oos_score"].default
    threshold: ThresholdRule = field(default_factory=ThresholdRule)
    n_latency_queries: int = RunConfig.model_fields["n_latency_queries"].default
    warmup: int = 10
    batch_size: int = 64
    throughput_batch_size: int = 32
    threads: int | None = RunConfig.model_fields["threads"].default
    clock: Clock = time.perf_counter

    @classmethod
    def from_config(cls, config: RunConfig) -> BenchmarkOptions:
        """The options a run's parameters ask for: its OOS score, threshold rule, latency queries and threads."""
        return cls(oos_score=config.oos_score, threshold=ThresholdRule.from_config(config),
                   n_latency_queries=config.n_latency_queries, threads=config.threads)

    def __post_init__(self) -> None:
        if self.oos_score not in OOS_SCORES:
            raise ValueError(f"BenchmarkOptions.oos_score must be one of {OOS_SCORES}, got {self.oos_score!r}.")
        if not isinstance(self.threshold, ThresholdRule):
            raise TypeError(f"BenchmarkOptions.threshold must be a kdlib.ThresholdRule (e.g. ThresholdRule("
                            f"'in_scope_drop', in_scope_drop=0.01)), got {type(self.threshold).__name__}.")
        least_values = {"n_latency_queries": 1, "warmup": 0, "batch_size": 1, "throughput_batch_size": 1}
        if self.threads is not None:
            least_values["threads"] = 1
        for name, least in least_values.items():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < least:
                raise ValueError(f"BenchmarkOptions.{name} must be a whole number >= {least}, got {value!r}.")
        if not callable(self.clock):
            raise TypeError(f"BenchmarkOptions.clock must be a function returning seconds (e.g. time.perf_counter), "
                            f"got {type(self.clock).__name__}.")


@dataclass(frozen=True, eq=False)
class BenchmarkResult(Mapping):
    """What :meth:`PerformanceBenchmark.run_benchmark` returns: ``{name: metrics}`` as a read-only mapping, as
    the reference returns it (``dict(result)`` gives a dict to add other variants' results to), and the test
    split's OOS scores for :func:`kdlib.plots.plot_oos_scores` (``oos_detail``: None without an OOS label)."""

    name: str
    metrics: dict
    oos_detail: dict | None = None

    def __getitem__(self, key: str) -> dict:
        if key != self.name:
            raise KeyError(key)
        return self.metrics

    def __iter__(self) -> Iterator[str]:
        return iter((self.name,))

    def __len__(self) -> int:
        return 1


def _benchmark_splits(data: object, oos_score: str) -> tuple[Dataset, Dataset | None, Dataset | None]:
    """The test, validation and (for ``"mahalanobis"``) train splits of ``data``, checked; None where unused."""
    if isinstance(data, Dataset) or not isinstance(data, Mapping):
        hint = ": pass the whole DatasetDict (e.g. data), not one of its splits" if isinstance(data, Dataset) else ""
        raise TypeError("data must be a datasets.DatasetDict with a 'test' split (and 'validation' for the OOS "
                        f"threshold, 'train' for oos_score='mahalanobis'), got {type(data).__name__}{hint}.")
    if "test" not in data:
        raise ValueError(f"data has no 'test' split (it has {sorted(data)}): the benchmark measures the test split.")
    test, validation = data["test"], data.get("validation")
    _check_split(test, "data['test']")
    train = data.get("train") if oos_score == FEATURE_SCORE else None
    if train is None and oos_score == FEATURE_SCORE and OOS_LABEL in test.features["label"].names:
        raise ValueError(f"oos_score='mahalanobis' is fit on the training split, and data has no 'train' split "
                         f"(it has {sorted(data)}): pass data with its 'train' split, or "
                         "BenchmarkOptions(oos_score='energy').")
    _check_inputs(test, validation, train, oos_score)
    return test, validation, train


class PerformanceBenchmark:
    """Accuracy, size and latency of one model variant, under the reference study's names.

    Parameters:
        model: a :class:`~kdlib.inference.Predictor` (any variant: fp32, int8, ONNX Runtime) or a
            ``transformers`` model, which is wrapped together with ``tokenizer``.
        data: a ``datasets.DatasetDict`` of ``text`` and a ``label`` ClassLabel: its ``test`` split is
            measured, its ``validation`` split (if any) chooses the OOS threshold, and its ``train`` split
            fits ``oos_score="mahalanobis"`` (needed only for that score).
        name: the variant's name, the key of :meth:`run_benchmark`'s result.
        options: how to measure (:class:`BenchmarkOptions`; None: its defaults, which are
            :class:`~kdlib.config.RunConfig`'s; a run's: ``BenchmarkOptions.from_config(config)``).
        tokenizer: needed only with a ``transformers`` model.

    Every argument is checked here, before any model runs. :meth:`run_benchmark` returns one
    :class:`BenchmarkResult` and changes nothing on the benchmark: a second call measures again.
    """

    def __init__(
        self, model, data: Mapping[str, Dataset], name: str = "baseline", options: BenchmarkOptions | None = None,
        *, tokenizer=None,
    ) -> None:
        options = BenchmarkOptions() if options is None else options
        if not isinstance(options, BenchmarkOptions):
            raise TypeError(f"options must be a kdlib.BenchmarkOptions (e.g. BenchmarkOptions.from_config(config)), "
                            f"got {type(options).__name__}.")
        if not isinstance(name, str) or not name:
            raise TypeError(f"name must be the variant's name, a non-empty string, got {name!r}.")
        self.test, self.validation, self.train = _benchmark_splits(data, options.oos_score)
        if not isinstance(model, Predictor) and tokenizer is None:
            raise ValueError("Pass `tokenizer=` with a transformers model (or pass a Predictor).")
        self.predictor = model if isinstance(model, Predictor) else TorchPredictor(model, tokenizer)
        self.name = name
        self.options = options

    def compute_accuracy(self) -> Quality:
        """The test split's :class:`Quality` (:func:`measure_quality`); the book's name for the step."""
        options = self.options
        return measure_quality(self.predictor, self.test, batch_size=options.batch_size, validation=self.validation,
                               train=self.train, oos_score=options.oos_score, threshold=options.threshold)

    def compute_size(self) -> dict:
        """Size of the saved weights in MB and bytes, and the parameter count (:func:`compute_size`)."""
        return compute_size(self.predictor)

    def time_pipeline(self) -> dict:
        """Single-query latency (:func:`time_pipeline`) over the first ``n_latency_queries`` test texts."""
        queries = self.test["text"][: self.options.n_latency_queries]
        return time_pipeline(self.predictor, queries, warmup=self.options.warmup, clock=self.options.clock)

    def time_throughput(self) -> dict:
        """Batched throughput (:func:`time_throughput`) over the first 512 test texts."""
        return time_throughput(self.predictor, self.test["text"][:512],
                               batch_size=self.options.throughput_batch_size, clock=self.options.clock)

    def run_benchmark(self) -> BenchmarkResult:
        """One :class:`BenchmarkResult`: quality and OOS, size, latency, throughput, split sizes, the predictor and
        the environment fingerprint, with the test OOS scores as ``oos_detail``. Torch's thread count is restored."""
        previous_threads = torch.get_num_threads()
        if self.options.threads:
            torch.set_num_threads(self.options.threads)
        try:
            quality = self.compute_accuracy()
            metrics = {
                **quality.metrics, **self.compute_size(), **self.time_pipeline(), **self.time_throughput(),
                "test_rows": len(self.test), "validation_rows": len(self.validation or []),
                "predictor": self.predictor.describe(),
                "env": env_fingerprint(getattr(self.predictor, "device", None) and str(self.predictor.device)),
            }
        finally:
            torch.set_num_threads(previous_threads)
        return BenchmarkResult(self.name, metrics, quality.oos_detail)


def median_of_repeats(fn: Callable[[], object], repeats: int = 3, clock: Clock = time.perf_counter) -> dict:
    """Run ``fn`` ``repeats`` times: the median wall time in seconds (the figure to report on a noisy machine),
    every wall time, and the last result."""
    if repeats < 1:
        raise ValueError(f"repeats must be at least 1, got {repeats}.")
    seconds, result = [], None
    for _ in range(repeats):
        start = clock()
        result = fn()
        seconds.append(clock() - start)
    return {"median_s": float(np.median(seconds)), "all_s": seconds, "result": result}
