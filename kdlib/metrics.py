"""Classification metrics of predicted label names, shared by :mod:`kdlib.oos` and :mod:`kdlib.benchmark`."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from sklearn.metrics import f1_score

from kdlib.data import OOS_LABEL


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
