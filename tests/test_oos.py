"""OOS detection: scores by hand, AUROC / FPR95 against scikit-learn, a threshold from validation only, n/a data."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from datasets import ClassLabel, Dataset, DatasetDict, Features, Value
from scipy.special import logsumexp, softmax
from sklearn.metrics import roc_auc_score

from kdlib.benchmark import BenchmarkOptions, PerformanceBenchmark, measure_quality
from kdlib.inference import Predictor
from kdlib.metrics import classification_metrics
from kdlib.oos import (
    OOS_KEYS,
    MahalanobisScore,
    ThresholdRule,
    apply_threshold,
    choose_threshold,
    detection_metrics,
    oos_scores,
)
from kdlib.report import comparison_table, oos_table, summary_frame

RNG = np.random.default_rng(0)
ABSOLUTE_60 = ThresholdRule("in_scope_accuracy", in_scope_target=0.6)
LOGITS = RNG.normal(size=(40, 4)) * 3
OOS = 3


def test_scores_by_hand_leave_out_the_oos_column():
    energy = oos_scores(LOGITS, "energy", OOS)
    np.testing.assert_allclose(energy, -logsumexp(LOGITS[:, :3], axis=1))
    msp = oos_scores(LOGITS, "msp", OOS)
    np.testing.assert_allclose(msp, 1 - softmax(LOGITS[:, :3], axis=1).max(axis=1))
    np.testing.assert_allclose(oos_scores(LOGITS, "energy"), -logsumexp(LOGITS, axis=1))
    # Higher = more out of scope: a confident row scores lower than a flat one.
    confident, flat = np.array([[9.0, 0.0, 0.0, 0.0]]), np.array([[1.0, 1.0, 1.0, 0.0]])
    assert oos_scores(confident, "msp", OOS) < oos_scores(flat, "msp", OOS)
    with pytest.raises(ValueError, match="oos_score must be one of"):
        oos_scores(LOGITS, "entropy")
    with pytest.raises(ValueError, match="MahalanobisScore"):
        oos_scores(LOGITS, "mahalanobis")


def test_mahalanobis_score_matches_scipy_distance_to_the_nearest_intent():
    from scipy.spatial.distance import mahalanobis

    rng = np.random.default_rng(3)
    labels = np.repeat([0, 1, 2, OOS], 30)
    features = rng.normal(size=(120, 5)) + labels[:, None] * np.array([2.0, -1.0, 0.5, 0.0, 1.0])
    score = MahalanobisScore(features, labels, OOS)
    # By hand: intent means and the covariance around them, from in-scope rows only (OOS rows ignored).
    in_scope = labels != OOS
    means = np.stack([features[labels == c].mean(0) for c in (0, 1, 2)])
    centred = features[in_scope] - means[labels[in_scope]]
    inverse = np.linalg.inv(centred.T @ centred / len(centred))
    queries = rng.normal(size=(7, 5)) * 3
    expected = [min(mahalanobis(q, m, inverse) ** 2 for m in means) for q in queries]
    np.testing.assert_allclose(score(queries), expected, rtol=1e-6)
    # OOS training rows do not move the fit; a query far from every intent scores higher than a mean.
    wild = features.copy()
    wild[~in_scope] *= 100
    np.testing.assert_allclose(MahalanobisScore(wild, labels, OOS)(queries), expected, rtol=1e-6)
    assert score(means[:1] + 50)[0] > score(means[:1])[0]
    with pytest.raises(ValueError, match="2\\+ in-scope intents"):
        MahalanobisScore(features[:30], labels[:30], OOS)


def test_auroc_and_fpr95_against_scikit_learn_on_fixed_arrays():
    scores = np.array([0.1, 0.4, 0.35, 0.8, 0.7, 0.2, 0.9, 0.65, 0.3, 0.55])
    is_oos = np.array([0, 0, 1, 1, 0, 0, 1, 1, 0, 1], dtype=bool)
    found = detection_metrics(scores, is_oos)
    assert found["oos_auroc"] == pytest.approx(roc_auc_score(is_oos, scores))
    # FPR95 by brute force: flag scores >= t; the lowest in-scope share flagged with OOS recall >= 0.95.
    fprs = [np.mean(scores[~is_oos] >= t) for t in scores if np.mean(scores[is_oos] >= t) >= 0.95]
    assert found["oos_fpr95"] == pytest.approx(min(fprs))
    assert found["oos_fpr95"] == pytest.approx(0.4)  # t = 0.35 (lowest OOS score) flags in-scope 0.4 and 0.7 of 5
    big_scores, big_oos = RNG.normal(size=500), RNG.random(500) < 0.2
    big_scores[big_oos] += 1.0
    big = detection_metrics(big_scores, big_oos)
    fprs = [np.mean(big_scores[~big_oos] >= t) for t in big_scores if np.mean(big_scores[big_oos] >= t) >= 0.95]
    assert big == pytest.approx({"oos_auroc": roc_auc_score(big_oos, big_scores), "oos_fpr95": min(fprs)})


def _brute_force_threshold(scores, predicted, gold, rule: ThresholdRule):
    """The rule applied by trying every threshold, from the metrics of each."""
    untouched = classification_metrics(gold, predicted, oos_label=OOS)
    in_scope = gold != OOS
    best, best_value = None, None
    for t in [None, *sorted(set(scores), reverse=True)]:
        m = classification_metrics(gold, apply_threshold(predicted, scores, t, OOS), oos_label=OOS)
        flagged = 0.0 if t is None else float(np.mean(scores[in_scope] >= t))
        if rule.name == "accuracy":
            if best_value is None or m["accuracy"] > best_value:
                best, best_value = t, m["accuracy"]
        elif rule.name == "in_scope_accuracy" and m["in_scope_accuracy"] >= rule.in_scope_target:
            best = t
        elif rule.name == "in_scope_drop" and (
            untouched["in_scope_accuracy"] - m["in_scope_accuracy"] <= rule.in_scope_drop + 1e-12
        ):
            best = t
        elif rule.name == "flag_rate" and flagged <= rule.flag_rate + 1e-12:
            best = t
    return best


RULES = [
    ThresholdRule("in_scope_accuracy", in_scope_target=0.6),
    ThresholdRule("in_scope_accuracy", in_scope_target=0.5),
    ThresholdRule("accuracy"),
    ThresholdRule("in_scope_drop", in_scope_drop=0.05),
    ThresholdRule("in_scope_drop", in_scope_drop=0.2),
    ThresholdRule("flag_rate", flag_rate=0.1),
    ThresholdRule("flag_rate", flag_rate=0.3),
]


@pytest.mark.parametrize("rule", RULES, ids=lambda r: f"{r.name}-{r.setting and getattr(r, r.setting)}")
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_choose_threshold_matches_brute_force(rule, seed):
    rng = np.random.default_rng(seed)
    gold = rng.integers(0, 4, size=60)
    predicted = np.where(rng.random(60) < 0.7, gold, rng.integers(0, 4, size=60))
    scores = np.round(rng.random(60) + (gold == OOS) * 0.5, 1)  # rounding makes ties
    chosen = choose_threshold(scores, predicted, gold, OOS, rule)
    assert chosen.threshold == _brute_force_threshold(scores, predicted, gold, rule)
    assert chosen.rule == rule.describe() and (chosen.missed is None) == (chosen.threshold is not None)


def test_the_default_rule_is_relative_and_gives_a_weak_model_a_threshold():
    """A model whose own validation in-scope accuracy is below any sensible absolute target (here 0.5)
    gets no threshold from the absolute rule, with a message saying so, but one from the default rule."""
    rng = np.random.default_rng(5)
    gold = rng.integers(0, 4, size=400)
    predicted = np.where(rng.random(400) < 0.5, gold, (gold + 1) % 4)
    scores = rng.random(400) + (gold == OOS) * 1.0
    assert ThresholdRule().name == "in_scope_drop"
    absolute = choose_threshold(scores, predicted, gold, OOS, ThresholdRule("in_scope_accuracy", in_scope_target=0.8))
    assert absolute.threshold is None
    assert "already below in_scope_target = 0.8" in absolute.missed and "in_scope_drop" in absolute.missed
    relative = choose_threshold(scores, predicted, gold, OOS)
    assert relative.threshold is not None and relative.missed is None
    before = classification_metrics(gold, predicted, oos_label=OOS)
    after = classification_metrics(gold, apply_threshold(predicted, scores, relative.threshold, OOS), oos_label=OOS)
    assert after["accuracy"] > before["accuracy"] and after["oos_recall"] > before["oos_recall"]
    assert before["in_scope_accuracy"] - after["in_scope_accuracy"] <= ThresholdRule().in_scope_drop + 1e-12


def test_unreachable_rules_say_which_rule_by_how_much_and_what_to_change():
    gold, predicted = np.array([0, 1, OOS]), np.array([1, 1, 0])  # in-scope accuracy 0.5 before flagging
    scores = np.array([0.1, 0.9, 0.2])  # the correct in-scope query scores highest
    cases = {
        ThresholdRule("in_scope_accuracy", in_scope_target=0.9): "already below in_scope_target = 0.9",
        ThresholdRule("in_scope_drop", in_scope_drop=0.1): "costs 50.00 points of validation in-scope accuracy, "
        "more than in_scope_drop = 0.1: raise in_scope_drop",
        ThresholdRule("flag_rate", flag_rate=0.2): "flags 50.00 % of validation in-scope queries, more than "
        "flag_rate = 0.2: raise flag_rate",
    }
    for rule, message in cases.items():
        chosen = choose_threshold(scores, predicted, gold, OOS, rule)
        assert chosen.threshold is None and message in chosen.missed
    for bad in ({"name": "f1"}, {"in_scope_drop": 1.5}, {"flag_rate": True}):
        with pytest.raises(ValueError, match="threshold_rule|in_scope_drop|flag_rate"):
            ThresholdRule(**bad)


# ---------------------------------------------------------------------------------------------
# Through the benchmark: validation chooses, test only measures
# ---------------------------------------------------------------------------------------------

NAMES = ["alarm", "balance", "weather", "oos"]


class TableLookupPredictor(Predictor):
    """Logits looked up by text: a model whose outputs the test controls exactly."""

    def __init__(self, logits_by_text: dict[str, np.ndarray], labels=NAMES):
        self.labels, self.table = list(labels), logits_by_text

    def logits(self, texts):
        return np.stack([self.table[t] for t in texts])

    def size_bytes(self):
        return 1


def _split(prefix: str, labels: np.ndarray, names=NAMES) -> Dataset:
    features = Features({"text": Value("string"), "label": ClassLabel(names=names)})
    return Dataset.from_dict({"text": [f"{prefix} {i}" for i in range(len(labels))], "label": list(labels)}, features)


@pytest.fixture
def splits():
    rng = np.random.default_rng(7)
    table = {}
    out = {}
    for name, n in (("validation", 80), ("test", 120)):
        gold = rng.integers(0, 4, size=n)
        split = _split(name, gold)
        for text, g in zip(split["text"], gold, strict=True):
            logits = rng.normal(size=4)
            logits[g] += 2.0 if g != 3 else 0.5  # OOS queries are often taken for an intent
            table[text] = logits
        out[name] = split
    return TableLookupPredictor(table), out["validation"], out["test"]


@pytest.mark.parametrize("rule", [ABSOLUTE_60, ThresholdRule("in_scope_drop", in_scope_drop=0.1),
                                  ThresholdRule("flag_rate", flag_rate=0.2)], ids=lambda r: r.name)
def test_threshold_is_chosen_on_validation_and_never_reads_test_labels(splits, rule):
    predictor, validation, test = splits
    metrics, detail = measure_quality(predictor, test, validation=validation, threshold=rule, oos_score="energy")
    assert set(OOS_KEYS) <= set(metrics) and metrics["threshold"] is not None
    # The same test texts with shuffled labels: every test figure may change, the threshold may not.
    shuffled = test.cast_column("label", ClassLabel(names=NAMES)).map(
        lambda row, i: {"label": (row["label"] + 1 + i) % 4}, with_indices=True
    )
    again, _ = measure_quality(predictor, shuffled, validation=validation, threshold=rule, oos_score="energy")
    assert again["threshold"] == metrics["threshold"]
    assert again["threshold_accuracy"] != metrics["threshold_accuracy"]
    # ... while validation labels do decide it (the check above could fail).
    other_validation = validation.map(lambda row, i: {"label": (row["label"] + i) % 4}, with_indices=True)
    moved, _ = measure_quality(predictor, test, validation=other_validation, threshold=rule, oos_score="energy")
    assert moved["threshold"] != metrics["threshold"]
    # The test figures are those of the validation threshold applied to test.
    logits = predictor.logits(test["text"])
    expected = apply_threshold(logits.argmax(1), oos_scores(logits, "energy", 3), metrics["threshold"], 3)
    by_hand = classification_metrics(np.array(test["label"]), expected, oos_label=3)
    assert metrics["threshold_accuracy"] == pytest.approx(by_hand["accuracy"])
    assert metrics["threshold_oos_recall"] == pytest.approx(by_hand["oos_recall"])
    assert detail["threshold"] == metrics["threshold"] and detail["is_oos"].sum() == np.sum(
        np.array(test["label"]) == 3
    )


class FeatureLookupPredictor(TableLookupPredictor):
    """Logits and features looked up by text: the Mahalanobis score's inputs under the test's control."""

    exposes_features = True

    def __init__(self, logits_by_text, features_by_text):
        super().__init__(logits_by_text)
        self.features = features_by_text

    def logits_and_features(self, texts):
        return self.logits(texts), np.stack([self.features[t] for t in texts])


@pytest.fixture
def feature_splits(splits):
    """The ``splits`` predictor with features (intent-shaped for in-scope texts), plus a train split."""
    predictor, validation, test = splits
    rng = np.random.default_rng(11)
    centres = rng.normal(size=(4, 6)) * 3
    train = _split("train", np.repeat([0, 1, 2, 3], 25))
    table, features = dict(predictor.table), {}
    for split in (train, validation, test):
        for text, gold in zip(split["text"], split["label"], strict=True):
            features[text] = centres[gold] + rng.normal(size=6) * (1.0 if gold != 3 else 4.0)
            table.setdefault(text, rng.normal(size=4))
    return FeatureLookupPredictor(table, features), train, validation, test


def test_mahalanobis_is_fit_on_train_and_its_threshold_chosen_on_validation(feature_splits):
    predictor, train, validation, test = feature_splits
    metrics, detail = measure_quality(predictor, test, validation=validation, train=train, oos_score="mahalanobis",
                               threshold=ABSOLUTE_60)
    assert metrics["oos_score"] == detail["method"] == "mahalanobis" and metrics["threshold"] is not None
    fit = MahalanobisScore(np.stack([predictor.features[t] for t in train["text"]]), np.array(train["label"]), 3)
    test_features = np.stack([predictor.features[t] for t in test["text"]])
    np.testing.assert_allclose(detail["scores"], fit(test_features), rtol=1e-5)  # features pass through float32
    assert metrics["oos_auroc"] > 0.9  # OOS features are spread away from the intent centres
    # Test labels never choose; train labels do (they decide the intent means).
    shuffled = test.map(lambda row, i: {"label": (row["label"] + 1 + i) % 4}, with_indices=True)
    again, _ = measure_quality(predictor, shuffled, validation=validation, train=train, oos_score="mahalanobis",
                        threshold=ABSOLUTE_60)
    assert again["threshold"] == metrics["threshold"]
    relabelled = train.map(lambda row, i: {"label": (row["label"] + i) % 4}, with_indices=True)
    moved, _ = measure_quality(predictor, test, validation=validation, train=relabelled, oos_score="mahalanobis",
                        threshold=ABSOLUTE_60)
    assert moved["oos_auroc"] != metrics["oos_auroc"]


def test_mahalanobis_needs_a_train_split_before_any_work_and_falls_back_without_features(splits):
    predictor, validation, test = splits

    class Untouchable(TableLookupPredictor):
        def logits(self, texts):
            raise AssertionError("the model ran before the arguments were checked")

    with pytest.raises(ValueError, match="pass `train=`"):
        measure_quality(Untouchable({}), test, validation=validation, oos_score="mahalanobis")
    with pytest.raises(ValueError, match="data has no 'train' split .*pass data with its 'train' split"):
        PerformanceBenchmark(Untouchable({}), DatasetDict({"test": test, "validation": validation}), "m",
                             BenchmarkOptions(oos_score="mahalanobis"))
    # A validation or train split with an intent the model does not know: refused before any pass.
    for split in ("validation", "train"):
        unknown = _split("v", [0, 1, 2, 3], NAMES[:3] + ["lost_card"])
        with pytest.raises(ValueError, match=f"label\\(s\\) \\['lost_card'\\] of the {split}"):
            measure_quality(Untouchable({}), test, **{"validation": validation, "train": validation, split: unknown})
    # A variant without features (ONNX Runtime's) is scored by energy, and its record says so.
    fallback, _ = measure_quality(predictor, test, validation=validation, train=validation, oos_score="mahalanobis")
    energy, _ = measure_quality(predictor, test, validation=validation, oos_score="energy")
    assert fallback["oos_score"] == "energy" and fallback == energy


def test_without_validation_the_score_is_measured_but_no_threshold_applied(splits):
    predictor, _, test = splits
    metrics, _ = measure_quality(predictor, test, oos_score="energy")
    assert metrics["oos_auroc"] is not None and metrics["threshold"] is None
    assert metrics["threshold_accuracy"] is None


def test_data_without_an_oos_label_is_not_applicable_never_zero(splits):
    names = ["alarm", "balance", "weather"]
    predictor = TableLookupPredictor({f"q {i}": np.eye(3)[i % 3] * 2 for i in range(9)}, labels=names)
    test = _split("q", np.arange(9) % 3, names)
    bench = PerformanceBenchmark(predictor, DatasetDict({"test": test, "validation": test}), "m",
                                 BenchmarkOptions(n_latency_queries=2, warmup=0))
    result = bench.run_benchmark()
    assert all(result["m"][key] is None for key in OOS_KEYS) and result.oos_detail is None
    shown = summary_frame(result)
    assert (shown.loc["m", list(OOS_KEYS)] == "n/a").all() and shown.loc["m", "oos_recall"] == "n/a"
    assert shown.loc["m", "accuracy"] == 1.0
    record = {**result["m"], "run": "r", "variant": "teacher"}
    view = oos_table(comparison_table([record, {**record, "variant": "student"}]))
    assert (view[list(OOS_KEYS)] == "n/a").all().all()


def test_loses_more_oos_compares_the_drops_against_the_baseline():
    base = {
        "run": "r",
        "variant": "teacher",
        "accuracy": 0.9,
        "time_avg_ms": 10.0,
        "size_mb": 80.0,
        "throughput_qps": 100.0,
        "threshold_oos_recall": 0.80,
        "threshold_in_scope_accuracy": 0.95,
    }
    records = [
        base,
        {**base, "variant": "a", "threshold_oos_recall": 0.70, "threshold_in_scope_accuracy": 0.94},  # -10 vs -1
        {**base, "variant": "b", "threshold_oos_recall": 0.79, "threshold_in_scope_accuracy": 0.90},  # -1 vs -5
        {**base, "variant": "c", "throughput_qps": 150.0, "time_avg_ms": 2.0},
    ]
    table = comparison_table(records).set_index("variant")
    assert table.loc["a", "loses_more_oos"] is True and table.loc["b", "loses_more_oos"] is False
    assert pd.isna(table.loc["teacher", "loses_more_oos"])
    assert table.loc["c", "throughput_vs_baseline"] == pytest.approx(1.5)
    assert table.loc["c", "speedup_vs_baseline"] == pytest.approx(5.0)


def test_oos_table_says_none_for_a_threshold_that_met_no_rule():
    base = {
        "run": "r",
        "variant": "teacher",
        "accuracy": 0.5,
        "time_avg_ms": 1.0,
        "size_mb": 1.0,
        "oos_auroc": 0.7,
        "threshold": None,
        "threshold_accuracy": 0.5,
    }
    view = oos_table(comparison_table([base, {**base, "variant": "student", "threshold": -2.5}]))
    assert list(view["threshold"]) == ["none", -2.5]
    assert view.loc[0, "oos_auroc"] == 0.7 and view.loc[0, "oos_fpr95"] == "n/a"
