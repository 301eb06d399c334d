"""Accuracy metrics, latency statistics and model size, checked against hand-computed values."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping

import numpy as np
import pandas as pd
import pytest
import torch
from datasets import ClassLabel, Dataset, DatasetDict, Features, Value

from kdlib.benchmark import (
    BenchmarkOptions,
    PerformanceBenchmark,
    compute_size,
    latency_stats,
    predict_labels,
    time_pipeline,
)
from kdlib.config import RunConfig
from kdlib.inference import Predictor, TorchPredictor, state_dict_size_bytes
from kdlib.metrics import classification_metrics
from kdlib.oos import ThresholdRule
from kdlib.report import save_benchmark, summary_frame

# ---------------------------------------------------------------------------------------------
# classification_metrics
# ---------------------------------------------------------------------------------------------

GOLD = ["a", "a", "b", "b", "c", "oos", "oos", "oos"]
PRED = ["a", "b", "b", "b", "oos", "oos", "oos", "a"]
# correct:    y    n    y    y    n      y      y      n   -> 5 / 8


def test_classification_metrics_by_hand():
    m = classification_metrics(GOLD, PRED, oos_label="oos")
    # accuracy: 5 of 8 right.
    assert m["accuracy"] == pytest.approx(5 / 8)
    # in-scope (gold a, a, b, b, c): right on 0, 2, 3 -> 3 / 5.
    assert m["in_scope_accuracy"] == pytest.approx(3 / 5)
    # OOS recall: gold OOS at 5, 6, 7; predicted OOS at 5, 6 -> 2 / 3.
    assert m["oos_recall"] == pytest.approx(2 / 3)
    # OOS precision: predicted OOS at 4, 5, 6; really OOS at 5, 6 -> 2 / 3.
    assert m["oos_precision"] == pytest.approx(2 / 3)
    # F1 = 2tp / (2tp + fp + fn) per gold label:
    #   a:   tp 1 (0), fp 1 (7), fn 1 (1) -> 2 / 4 = 1/2
    #   b:   tp 2 (2, 3), fp 1 (1), fn 0  -> 4 / 5
    #   c:   tp 0                        -> 0
    #   oos: tp 2 (5, 6), fp 1 (4), fn 1 (7) -> 4 / 6 = 2/3
    # macro = (1/2 + 4/5 + 0 + 2/3) / 4 = (15 + 24 + 0 + 20) / 30 / 4 = 59 / 120
    assert m["macro_f1"] == pytest.approx(59 / 120)


def test_classification_metrics_without_oos():
    m = classification_metrics(["a", "b", "b"], ["a", "b", "a"], oos_label="oos")
    # a: tp 1, fp 1, fn 0 -> 2/3; b: tp 1, fp 0, fn 1 -> 2/3.
    assert m == pytest.approx({"accuracy": 2 / 3, "macro_f1": 2 / 3})
    assert set(m) == {"accuracy", "macro_f1"}  # no OOS gold label: no OOS metrics
    assert set(classification_metrics(GOLD, PRED, oos_label=None)) == {"accuracy", "macro_f1"}


def test_oos_precision_is_zero_when_nothing_is_predicted_oos():
    m = classification_metrics(["oos", "a"], ["a", "a"], oos_label="oos")
    assert m["oos_recall"] == 0.0 and m["oos_precision"] == 0.0
    assert m["in_scope_accuracy"] == 1.0


def test_classification_metrics_rejects_mismatched_lengths():
    with pytest.raises(ValueError, match="as many predictions"):
        classification_metrics(["a", "b"], ["a"])
    with pytest.raises(ValueError, match="at least one"):
        classification_metrics([], [])


def test_predict_labels_keeps_input_order():
    class LengthPredictor(Predictor):
        """Predicts "long" for texts of 3+ characters and records the batches it was sent."""

        labels = ["short", "long"]

        def __init__(self) -> None:
            self.batches: list[list[str]] = []

        def logits(self, texts):
            self.batches.append(list(texts))
            return np.array([[0.0, 1.0] if len(t) >= 3 else [1.0, 0.0] for t in texts])

    predictor = LengthPredictor()
    texts = ["aaaa", "b", "cc", "ddddd", "eee"]
    assert predict_labels(predictor, texts, batch_size=2) == ["long", "short", "short", "long", "long"]
    assert predictor.batches == [["b", "cc"], ["eee", "aaaa"], ["ddddd"]]  # sorted by length


# ---------------------------------------------------------------------------------------------
# latency_stats and time_pipeline
# ---------------------------------------------------------------------------------------------


def test_latency_stats_exact():
    # mean 500; deviations all +-250 -> population std (np.std) 250; median between 250 and 750.
    stats = latency_stats([250.0, 750.0, 250.0, 750.0])
    assert stats == {
        "time_avg_ms": 500.0,
        "time_std_ms": 250.0,
        "time_p50_ms": 500.0,
        "time_p95_ms": 750.0,
        "time_p99_ms": 750.0,
        "latency_queries": 4,
    }


def test_latency_percentiles_interpolate():
    stats = latency_stats([1.0, 2.0, 3.0, 4.0, 5.0])
    # sorted position of p95 = 0.95 * (5 - 1) = 3.8 -> 4 + 0.8 * (5 - 4) = 4.8
    assert stats["time_p95_ms"] == pytest.approx(4.8)
    assert stats["time_p50_ms"] == 3.0
    assert stats["time_std_ms"] == pytest.approx(math.sqrt(2))  # (4 + 1 + 0 + 1 + 4) / 5 = 2


def test_time_pipeline_with_a_scripted_clock():
    events: list[tuple] = []
    # start, end pairs in seconds (exact in binary): 0.25, 0.25, 0.75, 0.75 s -> 250 / 750 ms.
    script = iter([0.0, 0.25, 1.0, 1.25, 2.0, 2.75, 3.0, 3.75])

    def clock() -> float:
        value = next(script)  # a StopIteration here means the clock was read more than scripted
        events.append(("clock", value))
        return value

    def predictor(query: str) -> list[dict]:
        events.append(("call", query))
        return [{"label": "x", "score": 1.0}]

    stats = time_pipeline(predictor, ["q1", "q2", "q3", "q4"], warmup=2, clock=clock)
    assert stats == {
        "time_avg_ms": 500.0,
        "time_std_ms": 250.0,
        "time_p50_ms": 500.0,
        "time_p95_ms": 750.0,
        "time_p99_ms": 750.0,
        "latency_queries": 4,
    }
    # The two warm-up calls come first and are not timed; then each call sits between two clock reads.
    assert events[:2] == [("call", "q1"), ("call", "q2")]
    timed = events[2:]
    assert [e[0] for e in timed] == ["clock", "call", "clock"] * 4
    assert [e[1] for e in timed if e[0] == "call"] == ["q1", "q2", "q3", "q4"]


def test_time_pipeline_needs_queries():
    with pytest.raises(ValueError, match="at least one query"):
        time_pipeline(lambda q: q, [], clock=lambda: 0.0)


# ---------------------------------------------------------------------------------------------
# Size
# ---------------------------------------------------------------------------------------------


def small_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 2))


def test_state_dict_size_matches_a_hand_saved_file(tmp_path):
    model = small_model()
    # torch.save names the zip's records after the file ("model/data.pkl"), so the byte count
    # depends on the file name: save under the same name the library uses.
    path = tmp_path / "model.pt"
    torch.save(model.state_dict(), path)
    assert state_dict_size_bytes(model) == os.path.getsize(path)


def test_compute_size_in_mebibytes(tmp_path):
    model = small_model()
    path = tmp_path / "model.pt"
    torch.save(model.state_dict(), path)
    predictor = TorchPredictor(model, tokenizer=None, labels=["neg", "pos"], device="cpu")
    size = compute_size(predictor)
    assert size["size_bytes"] == path.stat().st_size
    assert size["size_mb"] == path.stat().st_size / 2**20
    assert size["num_parameters"] == (4 * 3 + 3) + (3 * 2 + 2)  # 23


def test_a_list_instead_of_a_dataset_is_a_clear_type_error():
    class Constant(Predictor):
        labels = ["a"]

    with pytest.raises(TypeError, match="data must be a datasets.DatasetDict .* got list"):
        PerformanceBenchmark(Constant(), ["some text"], "x")


# ---------------------------------------------------------------------------------------------
# PerformanceBenchmark: one options object, one result, no side effects
# ---------------------------------------------------------------------------------------------

NAMES = ["alarm", "balance", "weather", "oos"]


class LookupPredictor(Predictor):
    """Logits and features looked up by text: a model whose outputs the test controls exactly."""

    exposes_features = True

    def __init__(self, rows: dict[str, tuple[np.ndarray, np.ndarray]]) -> None:
        self.labels, self.rows = list(NAMES), rows

    def logits(self, texts):
        return np.stack([self.rows[t][0] for t in texts])

    def logits_and_features(self, texts):
        return self.logits(texts), np.stack([self.rows[t][1] for t in texts])

    def size_bytes(self):
        return 1


def lookup_data() -> tuple[LookupPredictor, DatasetDict]:
    """A predictor and train / validation / test splits with an OOS label, features shaped by intent."""
    rng = np.random.default_rng(3)
    centres = rng.normal(size=(4, 5)) * 3
    rows, splits = {}, {}
    features = Features({"text": Value("string"), "label": ClassLabel(names=NAMES)})
    for split, n in (("train", 60), ("validation", 40), ("test", 60)):
        gold = np.arange(n) % 4
        texts = [f"{split} {i}" for i in range(n)]
        for text, label in zip(texts, gold, strict=True):
            logits = rng.normal(size=4)
            logits[label] += 2.0
            rows[text] = (logits, centres[label] + rng.normal(size=5) * (1.0 if label != 3 else 4.0))
        splits[split] = Dataset.from_dict({"text": texts, "label": list(gold)}, features)
    return LookupPredictor(rows), DatasetDict(splits)


def test_benchmark_options_default_to_the_run_configuration():
    defaults, options = RunConfig(), BenchmarkOptions()
    assert options == BenchmarkOptions.from_config(defaults)
    assert (options.oos_score, options.n_latency_queries, options.threads) == (
        defaults.oos_score, defaults.n_latency_queries, defaults.threads
    )
    assert options.threshold == ThresholdRule.from_config(defaults)
    run = RunConfig(oos_score="msp", n_latency_queries=7, threads=2, threshold_rule="flag_rate", flag_rate=0.1)
    chosen = BenchmarkOptions.from_config(run)
    assert (chosen.oos_score, chosen.n_latency_queries, chosen.threads) == ("msp", 7, 2)
    assert chosen.threshold == ThresholdRule("flag_rate", flag_rate=0.1)


@pytest.mark.parametrize(("bad", "message"), [
    ({"oos_score": "maha"}, "oos_score must be one of"),
    ({"n_latency_queries": 0}, "n_latency_queries must be a whole number >= 1, got 0"),
    ({"warmup": -1}, "warmup must be a whole number >= 0"),
    ({"batch_size": 2.5}, "batch_size must be a whole number"),
    ({"throughput_batch_size": True}, "throughput_batch_size must be a whole number"),
    ({"threads": 0}, "threads must be a whole number >= 1"),
    ({"threshold": "in_scope_drop"}, "threshold must be a kdlib.ThresholdRule"),
    ({"clock": 3.0}, "clock must be a function"),
])
def test_a_bad_option_is_refused_when_the_options_are_built(bad, message):
    with pytest.raises((ValueError, TypeError), match=f"BenchmarkOptions.{message}"):
        BenchmarkOptions(**bad)


def test_the_benchmark_refuses_bad_arguments_before_any_work():
    class Untouchable(LookupPredictor):
        def logits(self, texts):
            raise AssertionError("the model ran before the arguments were checked")

    _, data = lookup_data()
    with pytest.raises(TypeError, match="options must be a kdlib.BenchmarkOptions .* got dict"):
        PerformanceBenchmark(Untouchable({}), data, "m", {"n_latency_queries": 5})
    with pytest.raises(TypeError, match="got Dataset: pass the whole DatasetDict"):
        PerformanceBenchmark(Untouchable({}), data["test"], "m")
    with pytest.raises(ValueError, match="data has no 'test' split"):
        PerformanceBenchmark(Untouchable({}), DatasetDict({"validation": data["validation"]}), "m")
    with pytest.raises(ValueError, match="oos_score='mahalanobis' is fit on the training split"):
        PerformanceBenchmark(Untouchable({}), DatasetDict({"test": data["test"]}), "m")
    with pytest.raises(TypeError, match="name must be the variant's name"):
        PerformanceBenchmark(Untouchable({}), data, None)


def test_run_benchmark_returns_one_result_and_changes_nothing(tmp_path):
    predictor, data = lookup_data()
    bench = PerformanceBenchmark(predictor, data, "m", BenchmarkOptions(n_latency_queries=3, warmup=0, threads=1))
    before, threads = dict(vars(bench)), torch.get_num_threads()
    first, second = bench.run_benchmark(), bench.run_benchmark()
    assert vars(bench).keys() == before.keys() and all(vars(bench)[k] is v for k, v in before.items())
    assert torch.get_num_threads() == threads
    assert first["m"]["env"]["threads"] == 1  # measured at the options' thread count
    # Equal quality figures from both calls, and the test OOS scores carried by the result itself.
    pd.testing.assert_frame_equal(summary_frame(first), summary_frame(second))
    assert first["m"]["oos_score"] == "mahalanobis" and first["m"]["threshold"] is not None
    np.testing.assert_array_equal(first.oos_detail["scores"], second.oos_detail["scores"])
    assert first.oos_detail["threshold"] == first["m"]["threshold"]
    assert first.oos_detail["is_oos"].sum() == 15 and first["m"]["test_rows"] == 60
    # {name: metrics} like the reference: saved, shown and combined as a dict would be.
    assert isinstance(first, Mapping) and list(first) == ["m"] and first == {"m": first["m"]}
    (path,) = save_benchmark(tmp_path, "r", first, model_ref="models/m")
    record = json.loads(path.read_text())
    assert record["model_ref"] == "models/m" and record["accuracy"] == first["m"]["accuracy"]
    combined = dict(first)
    combined.update(PerformanceBenchmark(predictor, data, "n", bench.options).run_benchmark())
    assert list(combined) == ["m", "n"] and combined["n"]["accuracy"] == first["m"]["accuracy"]


def test_other_processes_share_subtracts_this_process_and_divides_by_cores(monkeypatch):
    from kdlib import benchmark

    readings = iter([(100.0, 1.0), (103.0, 2.0)])  # (all processes busy, this process) CPU seconds
    clock = iter([50.0, 52.0])
    monkeypatch.setattr(benchmark.OtherProcesses, "_cpu_seconds", staticmethod(lambda: next(readings)))
    monkeypatch.setattr(benchmark.time, "monotonic", lambda: next(clock))
    monkeypatch.setattr(benchmark.os, "cpu_count", lambda: 2)
    with benchmark.OtherProcesses() as busy:
        pass
    assert busy.share == pytest.approx((3.0 - 1.0) / (2.0 * 2))  # 2 s of others' CPU over 2 s on 2 cores


def test_other_processes_sees_a_process_that_holds_a_core():
    import subprocess
    import sys

    from kdlib.benchmark import OtherProcesses

    with OtherProcesses() as busy:
        subprocess.run([sys.executable, "-c", "import time\nend = time.time() + 1.5\nwhile time.time() < end: pass"],
                       check=True)
    assert busy.share >= 0.4 / (os.cpu_count() or 1)  # the child held one core for most of the block
