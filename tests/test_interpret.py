"""The generated interpretations: each sentence carries the figures of the records it was written from."""

from __future__ import annotations

from kdlib.interpret import interpret_baseline, interpret_comparison, interpret_distillation
from kdlib.report import comparison_table

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
    throughput_qps=1000.0,
    threshold_oos_recall=0.72,
    threshold_in_scope_accuracy=0.949,
)
ONNX = _variant(
    "student-onnx",
    accuracy=0.8624,
    size_mb=66.0,
    time_avg_ms=0.9,
    throughput_qps=1000.0,
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
            {**record, "run": "r", "variant": "teacher", "time_avg_ms": 2.0, "size_mb": 1.0},
            {**record, "run": "r", "variant": "student", "time_avg_ms": 1.0, "size_mb": 1.0},
        ]
    )
    assert "OOS figures are n/a" in interpret_comparison(table)


def test_distillation_sentences_and_int8_above_fp32():
    text = interpret_distillation(TEACHER, {"student": STUDENT, "student-int8": INT8})
    assert "1.3× smaller" in text and "86.2 %" in text and "-1.2 points against the teacher" in text
    assert "OOS recall -3.2 points" in text
    assert "int8 (student-int8 against student) moves accuracy +0.5 points" in text
    assert "not a better model" in text and "a net 30 of 5,500" in text  # 0.0054 * 5500 queries


def test_comparison_picks_the_fastest_variant_within_a_point_and_explains_latency_vs_throughput():
    table = comparison_table([TEACHER, STUDENT, INT8, ONNX])
    text = interpret_comparison(table)
    # student-onnx is fastest (6.7x) but 1.25 points below; student-int8 is within a point.
    assert "within 1 point of the teacher is **student-int8**" in text and "3.0× faster" in text
    assert "3.3× faster per query but 1.11× in throughput" in text and "fixed costs per call" in text
    assert "78.1 % of OOS queries" in text
    assert "student, student-int8, student-onnx" in text  # each lost more OOS recall than in-scope accuracy
    assert "scored by" not in text  # every variant used the teacher's score
    mixed = [{**r, "oos_score": "mahalanobis"} for r in (TEACHER, STUDENT, INT8)] + [ONNX]
    assert "student-onnx cannot expose the features of the mahalanobis score and is scored by energy instead" in (
        interpret_comparison(comparison_table(mixed))
    )
    # No variant within a point: the nearest is named instead.
    far = comparison_table([TEACHER, {**STUDENT, "accuracy": 0.80}])
    assert "No variant stays within 1 point" in interpret_comparison(far) and "-7.5 points" in interpret_comparison(far)


def test_comparison_table_keeps_the_test_size_and_tiny_differences_keep_two_decimals():
    onnx_int8 = _variant("student-onnx-int8", accuracy=0.8628, size_mb=17.0, time_avg_ms=0.4, throughput_qps=2000.0)
    text = interpret_comparison(comparison_table([TEACHER, STUDENT, ONNX, onnx_int8]))
    assert "moves accuracy +0.04 points" in text and "a net 2 of 5,500 test queries" in text
