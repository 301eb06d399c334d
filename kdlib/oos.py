"""Out-of-scope (OOS) detection: a score per query, how well it separates OOS queries, and a threshold.

A classifier's ``oos`` class catches only part of CLINC150's out-of-scope queries; a score flags more. We
report how well it separates OOS from in-scope test queries (AUROC; FPR95, the share of in-scope queries
flagged when 95 % of OOS ones are), then the metrics of the rule

    predicted OOS  <=>  argmax is ``oos``  or  score >= threshold

with the threshold chosen on the **validation** split only (:func:`choose_threshold`), as a deployed model
must. Scores (higher = more out of scope) read the in-scope logits only (the ``oos`` logit acts via the argmax):

* ``msp``: 1 - maximum softmax probability (Hendrycks & Gimpel, 2017);
* ``energy``: -logsumexp of the logits (Liu et al., 2020), which keeps the scale softmax normalises away;
* ``mahalanobis``: the distance of a query's features (mean of the last layer's token states) to the
  nearest in-scope intent's mean on the training split, under one shared covariance (Lee et al., 2018;
  the strongest detector on CLINC150 per Podolskiy et al., 2021). A variant that exposes no features (an
  ONNX file exported outside kdlib) is scored by ``energy`` instead, and its record says so.
"""

from __future__ import annotations

import typing
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy.special import logsumexp
from sklearn.covariance import EmpiricalCovariance
from sklearn.metrics import roc_auc_score, roc_curve

from kdlib.config import RunConfig
from kdlib.metrics import classification_metrics

OOS_SCORES = ("msp", "energy", "mahalanobis")
FEATURE_SCORE = "mahalanobis"  # the score that needs features and a training split
FALLBACK_SCORE = "energy"  # what a variant without features is scored by instead
NOT_APPLICABLE = "n/a"  # how tables show OOS figures of data without an OOS label

# The keys every benchmark record carries (None when the data has no OOS label).
OOS_KEYS = (
    "oos_auroc", "oos_fpr95", "threshold", "threshold_in_scope_accuracy", "threshold_oos_recall",
    "threshold_oos_precision", "threshold_accuracy",
)


def oos_scores(logits: np.ndarray, method: str = FALLBACK_SCORE, oos_index: int | None = None) -> np.ndarray:
    """One OOS score per row of ``logits`` (higher = more out of scope), over the in-scope columns."""
    if method == FEATURE_SCORE:
        raise ValueError("oos_score='mahalanobis' is computed from features: use MahalanobisScore.")
    if method not in OOS_SCORES:
        raise ValueError(f"oos_score must be one of {OOS_SCORES}, got {method!r}.")
    logits = np.asarray(logits, dtype=np.float64)
    if logits.ndim != 2 or logits.shape[1] < 2:
        raise ValueError(f"logits must be a (queries, labels) array with 2+ labels, got shape {logits.shape}.")
    if oos_index is not None:
        logits = np.delete(logits, oos_index, axis=1)
    log_sum_exp = logsumexp(logits, axis=1)
    if method == "energy":
        return -log_sum_exp
    return 1.0 - np.exp(logits.max(axis=1) - log_sum_exp)  # 1 - max softmax


class MahalanobisScore:
    """The ``mahalanobis`` score, fit on the training split's features: one mean per in-scope intent and one
    covariance around them shared by all intents. A query's score is its smallest squared distance to an
    intent mean, computed in whitened coordinates (one matrix product for all queries and intents)."""

    def __init__(self, features: np.ndarray, labels: Sequence[int], oos_index: int | None = None) -> None:
        features, labels = np.asarray(features, dtype=np.float64), np.asarray(labels)
        if features.ndim != 2 or len(features) != len(labels):
            raise ValueError(
                f"features must be a (queries, dims) array with one label per row; got {features.shape} and "
                f"{len(labels)} labels."
            )
        in_scope = labels != oos_index if oos_index is not None else np.ones(len(labels), dtype=bool)
        features, labels = features[in_scope], labels[in_scope]
        intents, position = np.unique(labels, return_inverse=True)
        if len(intents) < 2:
            raise ValueError(f"MahalanobisScore needs features of 2+ in-scope intents, got {len(intents)}.")
        self.means = np.stack([features[position == i].mean(axis=0) for i in range(len(intents))])
        covariance = EmpiricalCovariance(assume_centered=True).fit(features - self.means[position])
        eigenvalues, eigenvectors = np.linalg.eigh(covariance.get_precision())
        self.whiten = eigenvectors * np.sqrt(np.clip(eigenvalues, 0.0, None))  # precision = whiten @ whiten.T

    def __call__(self, features: np.ndarray) -> np.ndarray:
        """One score per row of ``features`` (higher = farther from every in-scope intent)."""
        queries, means = np.asarray(features, dtype=np.float64) @ self.whiten, self.means @ self.whiten
        squared = (queries**2).sum(1)[:, None] - 2.0 * queries @ means.T + (means**2).sum(1)[None, :]
        return np.clip(squared.min(axis=1), 0.0, None)


def detection_metrics(scores: np.ndarray, is_oos: np.ndarray) -> dict[str, float]:
    """AUROC of OOS vs in-scope, and FPR95: the share of in-scope queries flagged at 95 % OOS recall."""
    is_oos = np.asarray(is_oos, dtype=bool)
    if is_oos.all() or not is_oos.any():
        raise ValueError("detection_metrics needs both OOS and in-scope queries.")
    false_positive, true_positive, _ = roc_curve(is_oos, scores)
    return {
        "oos_auroc": float(roc_auc_score(is_oos, scores)),
        "oos_fpr95": float(false_positive[np.searchsorted(true_positive, 0.95, side="left")]),
    }


def apply_threshold(predicted: np.ndarray, scores: np.ndarray, threshold: float | None, oos_index: int) -> np.ndarray:
    """Predicted label ids with every query scoring ``>= threshold`` turned into ``oos_index``."""
    predicted = np.asarray(predicted).copy()
    if threshold is not None:
        predicted[np.asarray(scores) >= threshold] = oos_index
    return predicted


# The rules RunConfig.threshold_rule accepts: one list, read off the run configuration.
THRESHOLD_RULES = typing.get_args(RunConfig.model_fields["threshold_rule"].annotation)


@dataclass(frozen=True)
class ThresholdRule:
    """How the threshold is chosen on validation, and the one setting each rule reads.

    * ``in_scope_drop`` (relative to the model): flag as many queries as possible while giving up at
      most ``in_scope_drop`` of the model's **own** validation in-scope accuracy (0.01: one point).
      Every variant pays the same in-scope price, so their OOS recalls compare fairly, and a model
      whose in-scope accuracy is low still gets a threshold.
    * ``flag_rate`` (relative to the model): flag at most ``flag_rate`` of the validation in-scope
      queries (a target false-positive rate).
    * ``in_scope_accuracy`` (absolute): keep validation in-scope accuracy at or above
      ``in_scope_target``; a model already below the target gets no threshold.
    * ``accuracy``: maximise validation accuracy (it depends on the validation split's OOS share).
    """

    name: str = RunConfig.model_fields["threshold_rule"].default
    in_scope_drop: float = RunConfig.model_fields["in_scope_drop"].default
    flag_rate: float = RunConfig.model_fields["flag_rate"].default
    in_scope_target: float = RunConfig.model_fields["in_scope_target"].default

    @classmethod
    def from_config(cls, config: RunConfig) -> ThresholdRule:
        """The rule a run's parameters ask for."""
        return cls(config.threshold_rule, config.in_scope_drop, config.flag_rate, config.in_scope_target)

    def __post_init__(self) -> None:
        if self.name not in THRESHOLD_RULES:
            raise ValueError(f"threshold_rule must be one of {THRESHOLD_RULES}, got {self.name!r}.")
        for setting in ("in_scope_drop", "flag_rate", "in_scope_target"):
            value = getattr(self, setting)
            if isinstance(value, bool) or not isinstance(value, int | float) or not 0.0 <= value <= 1.0:
                raise ValueError(f"{setting} must be a number in [0, 1], got {value!r}.")

    @property
    def setting(self) -> str | None:
        """The run parameter this rule reads (None for ``accuracy``)."""
        return {"in_scope_drop": "in_scope_drop", "flag_rate": "flag_rate",
                "in_scope_accuracy": "in_scope_target"}.get(self.name)

    def describe(self) -> str:
        """The rule in words, for records and tables."""
        if self.name == "in_scope_drop":
            points = f"{100 * self.in_scope_drop:g} point" + ("" if 100 * self.in_scope_drop == 1 else "s")
            return f"validation in-scope accuracy at most {points} below the model's own"
        if self.name == "flag_rate":
            return f"at most {100 * self.flag_rate:g} % of validation in-scope queries flagged"
        if self.name == "in_scope_accuracy":
            return f"validation in-scope accuracy >= {self.in_scope_target:g}"
        return "max validation accuracy"


@dataclass(frozen=True)
class ThresholdChoice:
    """A threshold chosen on validation (None: flag nothing), the rule in words and, when the rule
    admits no threshold, why and which parameter to change."""

    threshold: float | None
    rule: str
    missed: str | None = None


def oos_options(config: RunConfig) -> dict:
    """The OOS keyword arguments of :func:`~kdlib.benchmark.measure_quality` for a run: its score and its
    threshold rule."""
    return {"oos_score": config.oos_score, "threshold": ThresholdRule.from_config(config)}


def choose_threshold(
    scores: np.ndarray, predicted: np.ndarray, gold: np.ndarray, oos_index: int, rule: ThresholdRule | None = None
) -> ThresholdChoice:
    """The threshold, from one split's scores, predictions and gold labels (pass **validation**).

    Flagging the ``k`` highest-scoring queries turns right in-scope answers wrong and wrong OOS answers
    right; the rule picks the largest ``k`` it allows (``accuracy``: the best ``k``). Cuts fall only between
    different scores, so equal scores are flagged together.
    """
    rule = rule or ThresholdRule()
    scores, predicted, gold = (np.asarray(a) for a in (scores, predicted, gold))
    order = np.argsort(-scores, kind="stable")  # flagging the first k of this order
    scores, predicted, gold = scores[order], predicted[order], gold[order]
    in_scope = gold != oos_index
    correct = predicted == gold
    n_in_scope = max(int(in_scope.sum()), 1)
    in_scope_lost = np.cumsum(np.concatenate([[0], in_scope & correct]))  # after flagging the first k
    oos_gained = np.cumsum(np.concatenate([[0], ~in_scope & ~correct]))
    in_scope_flagged = np.cumsum(np.concatenate([[0], in_scope]))
    in_scope_correct = int(in_scope_lost[-1])  # flagging every query loses every right in-scope answer
    cuts = np.concatenate([[0], np.flatnonzero(np.diff(scores) != 0) + 1, [len(scores)]])
    if rule.name == "accuracy":
        accuracy = (correct.sum() - in_scope_lost + oos_gained) / len(gold)
        k = int(cuts[np.argmax(accuracy[cuts])])
    else:
        slack = 1e-9 * n_in_scope  # counts, not rounded fractions: 1 point of 3,000 queries allows exactly 30
        if rule.name == "in_scope_drop":
            allowed = in_scope_lost[cuts] <= rule.in_scope_drop * n_in_scope + slack
        elif rule.name == "flag_rate":
            allowed = in_scope_flagged[cuts] <= rule.flag_rate * n_in_scope + slack
        else:
            allowed = in_scope_correct - in_scope_lost[cuts] >= rule.in_scope_target * n_in_scope - slack
        k = int(cuts[allowed].max()) if allowed.any() else 0
    if k:
        return ThresholdChoice(float(scores[k - 1]), rule.describe())
    return ThresholdChoice(None, rule.describe(), _why_none(rule, cuts, in_scope_lost, in_scope_flagged, n_in_scope))


def _why_none(rule: ThresholdRule, cuts, in_scope_lost, in_scope_flagged, n_in_scope: int) -> str:
    """Why the rule admits no threshold, by how much, and the parameter to change."""
    if rule.name == "accuracy":
        return "no threshold raises validation accuracy, so none is applied"
    own = int(in_scope_lost[-1]) / n_in_scope  # the model's own validation in-scope accuracy
    first = int(cuts[1]) if len(cuts) > 1 else 0  # the smallest cut that flags anything
    if rule.name == "in_scope_accuracy" and own < rule.in_scope_target:
        return (f"the model's own validation in-scope accuracy, {own:.4f}, is already below in_scope_target = "
                f"{rule.in_scope_target:g}, so no threshold can keep it: lower in_scope_target, or use "
                "threshold_rule = 'in_scope_drop' (relative to the model)")
    if rule.name == "flag_rate":
        needed = in_scope_flagged[first] / n_in_scope
        return (f"flagging even the highest-scoring queries flags {100 * needed:.2f} % of validation in-scope "
                f"queries, more than flag_rate = {rule.flag_rate:g}: raise flag_rate")
    lost = in_scope_lost[first] / n_in_scope
    if rule.name == "in_scope_drop":
        return (f"flagging even the highest-scoring queries costs {100 * lost:.2f} points of validation in-scope "
                f"accuracy, more than in_scope_drop = {rule.in_scope_drop:g}: raise in_scope_drop")
    return (f"flagging even the highest-scoring queries brings validation in-scope accuracy to {own - lost:.4f}, "
            f"below in_scope_target = {rule.in_scope_target:g}: lower in_scope_target, or use "
            "threshold_rule = 'in_scope_drop'")


def threshold_metrics(
    scores: np.ndarray, predicted: np.ndarray, gold: Sequence[int], oos_index: int, threshold: float
) -> dict[str, float]:
    """The ``threshold_*`` keys of :data:`OOS_KEYS`: the metrics once ``threshold`` is applied."""
    found = classification_metrics(
        np.asarray(gold), apply_threshold(predicted, scores, threshold, oos_index), oos_label=oos_index
    )
    return {
        "threshold": threshold,
        **{f"threshold_{key}": found[key] for key in ("in_scope_accuracy", "oos_recall", "oos_precision")},
        "threshold_accuracy": found["accuracy"],
    }
