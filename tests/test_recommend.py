"""The recommendation rule: the Pareto front of thresholded accuracy against p50, the fastest within a point."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from kdlib.recommend import pareto_front, recommend_variant, recommendation


def _table(rows, run="r"):
    return pd.DataFrame(
        [{"run": run, "variant": v, "accuracy": a, "threshold_accuracy": t, "time_p50_ms": p} for v, a, t, p in rows]
    )


def test_the_fastest_on_the_front_within_one_point_of_its_best():
    table = _table([
        ("teacher", 0.87, 0.925, 10.0),
        ("slow-but-close", 0.869, 0.924, 5.0),
        ("fast", 0.86, 0.9151, 1.0),  # 0.9099 points below the best: within one point
        ("dominated", 0.86, 0.91, 2.0),  # slower and less accurate than "fast"
    ])
    choice = recommendation(table)
    assert choice.front == ("fast", "slow-but-close", "teacher") and choice.best == "teacher"
    assert choice.variant == "fast" and recommend_variant(table) == "fast"
    assert recommend_variant(table, within=0.005) == "slow-but-close"
    assert recommend_variant(table, within=0.0) == "teacher"
    assert "within 1 point" in choice.rule and "with the OOS threshold" in choice.rule


def test_exactly_one_point_below_still_counts():
    table = _table([("teacher", 0.9, 0.925, 10.0), ("fast", 0.9, 0.915, 1.0)])
    assert recommend_variant(table) == "fast"
    table.loc[1, "threshold_accuracy"] = 0.9149
    assert recommend_variant(table) == "teacher"


def test_plain_accuracy_without_an_oos_label():
    table = _table([("teacher", 0.90, None, 10.0), ("fast", 0.895, None, 1.0)])
    choice = recommendation(table)
    assert (choice.accuracy, choice.variant) == ("accuracy", "fast")
    assert "OOS" not in choice.rule
    assert recommendation(table.drop(columns=["threshold_accuracy"])).variant == "fast"


def test_each_run_on_its_own():
    first = _table([("teacher", 0.9, 0.92, 10.0), ("fast", 0.9, 0.915, 1.0)], run="a")
    second = _table([("teacher", 0.9, 0.92, 1.0), ("fast", 0.9, 0.915, 10.0)], run="b")  # another machine
    table = pd.concat([first, second], ignore_index=True)
    assert recommend_variant(table) == "fast"  # the first run by default
    assert recommend_variant(table, run="b") == "teacher"
    with pytest.raises(ValueError, match="run='c' is not in the table"):
        recommendation(table, run="c")


def test_bad_input_is_refused_with_what_to_do():
    with pytest.raises(ValueError, match="time_p50_ms"):
        recommendation(pd.DataFrame({"variant": ["a"], "accuracy": [0.5]}))
    with pytest.raises(ValueError, match="fraction"):
        recommendation(_table([("a", 0.5, 0.5, 1.0)]), within=1.0)
    with pytest.raises(ValueError, match="no variant has both"):
        recommendation(_table([("a", 0.5, 0.5, np.nan)]))


def test_pareto_front_on_other_columns():
    table = _table([("a", 0.9, 0.8, 1.0), ("b", 0.8, 0.9, 2.0), ("c", 0.95, 0.85, 3.0)])
    assert pareto_front(table, "threshold_accuracy", "time_p50_ms")["variant"].tolist() == ["a", "b"]
    assert pareto_front(table, "accuracy", "time_p50_ms")["variant"].tolist() == ["a", "c"]
