"""The generated conclusions: each sentence carries the figures of the records it was written from, and
notebook 03's recommendation, its highlighted bubble and README's marked row follow one rule."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import pandas as pd  # noqa: E402

from kdlib.config import load_config  # noqa: E402
from kdlib.narrate import interpret_baseline, interpret_comparison, interpret_distillation, interpret_search  # noqa: E402
from kdlib.plots import plot_metrics  # noqa: E402
from kdlib.recommend import recommend_variant, recommendation  # noqa: E402
from kdlib.report import comparison_table  # noqa: E402

TEACHER = {
    "run": "r",
    "variant": "teacher",
    "accuracy": 0.8749,
    "in_scope_accuracy": 0.9589,
    "oos_recall": 0.497,
    "test_rows": 5500,
    "oos_score": "energy",
    "oos_auroc": 0.9612,
    "oos_fpr95": 0.2311,
    "threshold": -3.2,
    "threshold_rule": "validation in-scope accuracy >= 0.95",
    "threshold_accuracy": 0.9231,
    "threshold_in_scope_accuracy": 0.9502,
    "threshold_oos_recall": 0.7810,
    "size_mb": 86.9,
    "time_avg_ms": 6.0,
    "time_p50_ms": 6.0,
    "throughput_qps": 450.0,
    "throughput_batch_size": 32,
}


def _variant(name, **changes):
    return {**TEACHER, "variant": name, **changes}


STUDENT = _variant(
    "student",
    accuracy=0.8624,
    in_scope_accuracy=0.95,
    oos_recall=0.465,
    size_mb=66.0,
    time_avg_ms=3.0,
    time_p50_ms=3.0,
    throughput_qps=900.0,
    threshold_accuracy=0.915,
    threshold_oos_recall=0.70,
    threshold_in_scope_accuracy=0.948,
)
INT8 = _variant(
    "student-int8",
    accuracy=0.8678,
    size_mb=25.0,
    time_avg_ms=2.0,
    time_p50_ms=2.0,
    throughput_qps=1000.0,
    threshold_accuracy=0.918,
    threshold_oos_recall=0.72,
    threshold_in_scope_accuracy=0.949,
)
ONNX = _variant(
    "student-onnx",
    accuracy=0.8624,
    size_mb=66.0,
    time_avg_ms=0.9,
    time_p50_ms=0.9,
    throughput_qps=1000.0,
    threshold_accuracy=0.910,
    threshold_oos_recall=0.70,
    threshold_in_scope_accuracy=0.948,
)


def test_baseline_sentences_carry_the_record_figures():
    text = interpret_baseline(TEACHER)
    assert "87.5 % of the 5,500 test queries" in text
    assert "95.9 %" in text and "only 49.7 %" in text
    assert "AUROC 0.961" in text and "23.1 % of in-scope" in text
    assert "OOS recall to 78.1 % at in-scope accuracy 95.0 %" in text and "92.3 % (+4.8 points)" in text


def test_no_oos_label_reads_not_applicable():
    record = {"accuracy": 0.9, "test_rows": 100, "oos_recall": None, "threshold_oos_recall": None}
    assert "does not apply (n/a)" in interpret_baseline(record)
    table = comparison_table(
        [
            {**record, "run": "r", "variant": "teacher", "time_avg_ms": 2.0, "time_p50_ms": 2.0, "size_mb": 1.0},
            {**record, "run": "r", "variant": "student", "time_avg_ms": 1.0, "time_p50_ms": 1.0, "size_mb": 1.0},
        ]
    )
    text = interpret_comparison(table)
    assert "OOS figures are n/a" in text
    # Without thresholded accuracy the rule reads plain accuracy, and says so.
    assert "Pareto front of accuracy against p50 latency" in text and "Recommended: **student**" in text


def test_distillation_sentences_and_int8_above_fp32():
    text = interpret_distillation(TEACHER, {"student": STUDENT, "student-int8": INT8})
    assert "1.3× smaller" in text and "86.2 %" in text and "-1.2 points against the teacher" in text
    assert "OOS recall -3.2 points" in text
    assert "int8 (student-int8 against student) moves accuracy +0.5 points" in text
    assert "not a better model" in text and "a net 30 of 5,500" in text  # 0.0054 * 5500 queries


def test_comparison_recommends_by_the_rule_and_explains_latency_vs_throughput():
    table = comparison_table([TEACHER, STUDENT, INT8, ONNX])
    text = interpret_comparison(table)
    # student-onnx is fastest but 1.31 thresholded points below the front's best; student-int8 is within a point.
    assert "Recommended: **student-int8**, accuracy with its OOS threshold 91.8 %" in text
    assert "3.0× faster per query at the median (2.00 ms against 6.00 ms)" in text
    assert "3.3× faster per query but 1.11× in throughput" in text and "fixed costs per call" in text
    assert "78.1 % of OOS queries" in text
    assert "student, student-int8, student-onnx" in text  # each lost more OOS recall than in-scope accuracy
    assert "scored by" not in text  # every variant used the teacher's score
    mixed = [{**r, "oos_score": "mahalanobis"} for r in (TEACHER, STUDENT, INT8)] + [ONNX]
    assert "student-onnx cannot expose the features of the mahalanobis score and is scored by energy instead" in (
        interpret_comparison(comparison_table(mixed))
    )
    # No faster variant within a point of the front's best: the teacher itself is recommended.
    far = comparison_table([TEACHER, {**STUDENT, "accuracy": 0.80, "threshold_accuracy": 0.85}])
    assert "No faster variant comes within 1 point" in interpret_comparison(far)
    assert "the recommendation is the **teacher** itself" in interpret_comparison(far)


def test_comparison_table_keeps_the_test_size_and_tiny_differences_keep_two_decimals():
    onnx_int8 = _variant("student-onnx-int8", accuracy=0.8628, size_mb=17.0, time_avg_ms=0.4, time_p50_ms=0.4,
                         throughput_qps=2000.0)
    text = interpret_comparison(comparison_table([TEACHER, STUDENT, ONNX, onnx_int8]))
    assert "moves accuracy +0.04 points" in text and "a net 2 of 5,500 test queries" in text


# The default run's figures: a hard 1-point cut-off on plain accuracy against the teacher keeps only
# student-int8 (0.8660, 2.2x); the rule (thresholded accuracy, the Pareto front, p50) picks student-onnx-int8.
DEFAULT_RUN = [
    ("teacher", 0.8749, 0.9244, 17.81, 86.9),
    ("student", 0.8624, 0.9147, 13.81, 66.6),
    ("student-int8", 0.8660, 0.9136, 8.25, 50.8),
    ("student-onnx", 0.8624, 0.9147, 3.96, 66.6),
    ("student-onnx-int8", 0.8647, 0.9182, 2.49, 16.8),
]


def _default_run_table():
    return comparison_table([
        _variant(name, accuracy=acc, threshold_accuracy=thr, time_p50_ms=p50, time_avg_ms=p50 * 1.01, size_mb=mb)
        for name, acc, thr, p50, mb in DEFAULT_RUN
    ])


def test_the_sentence_and_the_highlight_follow_the_rule_where_a_hard_cut_off_disagrees():
    table = _default_run_table()
    base = table.iloc[0]
    hard_cut = table[(table["variant"] != "teacher") & (table["accuracy"] >= base["accuracy"] - 0.01)]
    assert hard_cut.sort_values("time_p50_ms")["variant"].iloc[0] == "student-int8"  # the cut-off's choice
    choice = recommendation(table)
    assert (choice.variant, choice.accuracy, choice.latency) == ("student-onnx-int8", "threshold_accuracy",
                                                                  "time_p50_ms")
    assert choice.front == ("student-onnx-int8", "teacher") and choice.best == "teacher"
    text = interpret_comparison(table)
    assert "Recommended: **student-onnx-int8**" in text and "**student-int8**" not in text
    assert "against the front's best, teacher, at 92.4 %" in text and "7.2× faster per query" in text
    # The highlight notebook 03 draws: RunConfig.highlight None gives the recommended variant.
    highlight = load_config("smoke").highlighted_variant(table)
    assert highlight == "student-onnx-int8"
    fig = plot_metrics(table, highlight=highlight, accuracy=choice.accuracy, latency=choice.latency)
    assert [t.get_text() for t in fig.axes[0].texts] == ["student-onnx-int8"]
    assert fig.axes[0].get_ylabel() == "Accuracy with the OOS threshold (%)"
    assert load_config("smoke", highlight="teacher").highlighted_variant(table) == "teacher"
    # A tighter tolerance moves the recommendation: the rule, not a fixed name.
    assert recommend_variant(table, within=0.005) == "teacher"


def test_search_section_only_with_a_latency_search():
    assert interpret_search(None) == ""
    accuracy_only = pd.DataFrame({"trial": [0], "state": ["COMPLETE"], "accuracy": [0.9], "pareto": [False]})
    assert interpret_search(accuracy_only) == ""
    trials = pd.DataFrame({
        "trial": [0, 1, 2, 3], "state": ["COMPLETE", "COMPLETE", "COMPLETE", "PRUNED"],
        "student_layers": [3, 2, 3, 1], "accuracy": [0.95, 0.945, 0.94, None],
        "latency_ms": [3.0, 2.0, 3.5, None], "pareto": [True, True, False, False],
    })
    text = interpret_search(trials)
    assert text.startswith("## The search's trade-off")
    assert "Of 4 trials, 3 finished and 2 are on the front" in text
    assert "Kept: trial 1 (2 layers, validation accuracy 94.5 %, 2.00 ms)" in text


def test_no_threshold_is_explained_with_the_rule_the_shortfall_and_the_parameter():
    missed = ("the model's own validation in-scope accuracy, 0.8100, is already below in_scope_target = 0.95, so "
              "no threshold can keep it: lower in_scope_target, or use threshold_rule = 'in_scope_drop' (relative "
              "to the model)")
    record = {**TEACHER, "threshold": None, "threshold_rule": "validation in-scope accuracy >= 0.95",
              "threshold_missed": missed, "threshold_accuracy": TEACHER["accuracy"]}
    text = interpret_baseline(record)
    assert "No OOS threshold is applied: under the rule (validation in-scope accuracy >= 0.95)" in text
    assert missed in text and "raises OOS recall" not in text
    assert "raises OOS recall" in interpret_baseline(TEACHER)
