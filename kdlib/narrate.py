"""The notebooks' conclusions, written from a run's benchmark records (or comparison table) rather than typed
into markdown, so every rerun gets sentences that match its own figures. Each function returns Markdown (an
empty string when there is nothing to say, so a notebook shows no empty section)."""

from __future__ import annotations

from collections.abc import Mapping

import pandas as pd

from kdlib.plots import finished_latency_trials
from kdlib.recommend import WITHIN, fastest_within, recommendation

INT8_PAIRS = (
    ("student", "student-int8"), ("student-onnx", "student-onnx-int8"), ("student-onnx", "student-onnx-fused-int8"),
)


def _pct(value: float) -> str:
    return f"{100 * value:.1f} %"


def _points(delta: float) -> str:
    """A signed difference of two fractions, in percentage points (two decimals below 0.1 point)."""
    return f"{100 * delta:+.2f} points" if 0 < abs(delta) < 0.001 else f"{100 * delta:+.1f} points"


def _has(record: Mapping, *keys: str) -> bool:
    return all(pd.notna(record.get(k)) for k in keys)


def _threshold_sentence(record: Mapping) -> str:
    if not _has(record, "threshold_oos_recall"):
        return ""
    if record.get("threshold") is None:
        why = record.get("threshold_missed") or "the rule admits no threshold"
        return f" No OOS threshold is applied: under the rule ({record.get('threshold_rule')}), {why}."
    return (
        f" Flagging queries whose {record.get('oos_score')} score passes a threshold chosen on validation "
        f"({record.get('threshold_rule')}) raises OOS recall to {_pct(record['threshold_oos_recall'])} at in-scope "
        f"accuracy {_pct(record['threshold_in_scope_accuracy'])}; overall accuracy becomes "
        f"{_pct(record['threshold_accuracy'])} ({_points(record['threshold_accuracy'] - record['accuracy'])})."
    )


def interpret_baseline(record: Mapping) -> str:
    """What notebook 01's teacher figures say: accuracy, and what it hides about out-of-scope queries."""
    rows = int(record.get("test_rows") or 0)
    text = f"The teacher answers {_pct(record['accuracy'])} of the {rows:,} test queries correctly."
    if not _has(record, "oos_recall"):
        return text + " The data has no out-of-scope label, so OOS detection does not apply (n/a)."
    text += (
        f" That figure mixes two tasks: on in-scope queries it is right {_pct(record['in_scope_accuracy'])} of the "
        f"time, but it recognises only {_pct(record['oos_recall'])} of the out-of-scope ones; the others are "
        "answered with an intent the user never asked for."
    )
    if _has(record, "oos_auroc"):
        text += (
            f" Its {record.get('oos_score')} score separates the two groups with AUROC {record['oos_auroc']:.3f}; "
            f"catching 95 % of OOS queries by score alone would also flag {_pct(record['oos_fpr95'])} of in-scope ones."
        )
    return text + _threshold_sentence(record)


def interpret_distillation(teacher: Mapping, results: Mapping[str, Mapping]) -> str:
    """What notebook 02's student and its variants gained and lost against the teacher."""
    student = results.get("student")
    if student is None:
        return "No student result to interpret."
    size = student["size_mb"] / teacher["size_mb"]
    lines = [
        f"The student is {1 / size:.1f}× smaller than the teacher "
        f"({student['size_mb']:.3g} MB vs {teacher['size_mb']:.3g} MB) with test accuracy {_pct(student['accuracy'])} "
        f"({_points(student['accuracy'] - teacher['accuracy'])} against the teacher)."
    ]
    if _has(student, "oos_recall") and _has(teacher, "oos_recall"):
        lines.append(
            f"In scope it moves {_points(student['in_scope_accuracy'] - teacher['in_scope_accuracy'])}, "
            f"OOS recall {_points(student['oos_recall'] - teacher['oos_recall'])}."
        )
    if _has(student, "threshold_accuracy") and _has(teacher, "threshold_accuracy"):
        lines.append(
            f"With its own validation threshold the student reaches overall {_pct(student['threshold_accuracy'])} "
            f"(teacher {_pct(teacher['threshold_accuracy'])}, "
            f"{_points(student['threshold_accuracy'] - teacher['threshold_accuracy'])})."
        )
    lines += _int8_sentences(results)
    return " ".join(lines)


def _int8_sentences(records: Mapping[str, Mapping]) -> list[str]:
    out = []
    for fp32, int8 in INT8_PAIRS:
        a, b = records.get(fp32), records.get(int8)
        if a is None or b is None:
            continue
        gain = b["accuracy"] - a["accuracy"]
        sentence = f"int8 ({int8} against {fp32}) moves accuracy {_points(gain)}"
        if _has(a, "threshold_oos_recall") and _has(b, "threshold_oos_recall"):
            recall = b["threshold_oos_recall"] - a["threshold_oos_recall"]
            sentence += f" and OOS recall with threshold {_points(recall)}"
        sentence += "."
        if b["accuracy"] > a["accuracy"]:
            rows = int(b.get("test_rows") or 0)
            net = f", here a net {round(gain * rows)} of {rows:,} test queries" if rows else ""
            sentence += (
                " Scoring above fp32 is not a better model: rounding the weights moves queries near a decision "
                f"boundary either way{net}, and the int8 kernels differ between CPUs (the 3rd decimal changes "
                "from AMD to Intel)."
            )
        out.append(sentence)
    return out


def interpret_comparison(table: pd.DataFrame, baseline: str = "teacher", within: float = WITHIN) -> str:
    """Notebook 03's closing: the recommended variant (:func:`kdlib.recommend.recommendation`), int8, latency vs
    throughput, OOS."""
    paragraphs = []
    for run, group in table.groupby("run", sort=False):
        rows = {r["variant"]: r for r in group.to_dict("records")}
        base = rows.get(baseline)
        if base is None:
            continue
        lines = [f"**{run}**:"] if table["run"].nunique() > 1 else []
        lines.append(_recommendation_sentence(recommendation(table, within, run=run), rows, baseline))
        lines += [*_int8_sentences(rows), *_latency_sentences(rows), *_oos_sentences(rows, base, baseline)]
        paragraphs.append(" ".join(lines))
    return "\n\n".join(paragraphs)


def _recommendation_sentence(choice, rows: Mapping[str, Mapping], baseline: str) -> str:
    """The recommended variant, the rule that chose it, and what it gives up and gains against the baseline."""
    points = f"{100 * choice.within:g} point"
    measure = "accuracy with its OOS threshold" if choice.accuracy == "threshold_accuracy" else "accuracy"
    best, pick, base = rows[choice.best], rows[choice.variant], rows[baseline]
    text = f"The rule: recommend {choice.rule}. "
    if choice.variant == baseline:
        return text + (f"No faster variant comes within {points} of the {baseline}'s {measure} "
                       f"({_pct(base[choice.accuracy])}), so the recommendation is the **{baseline}** itself.")
    text += f"Recommended: **{choice.variant}**, {measure} {_pct(pick[choice.accuracy])}"
    if choice.best != choice.variant:
        text += f" against the front's best, {choice.best}, at {_pct(best[choice.accuracy])}"
    text += f" ({_points(pick[choice.accuracy] - base[choice.accuracy])} against the {baseline}"
    if choice.accuracy != "accuracy":
        text += f"; plain accuracy {_pct(pick['accuracy'])}, {_points(pick['accuracy'] - base['accuracy'])}"
    speed = base[choice.latency] / pick[choice.latency]
    text += (f"), {speed:.1f}× faster per query at the median ({pick[choice.latency]:.2f} ms against "
             f"{base[choice.latency]:.2f} ms)")
    if _has(pick, "size_ratio_vs_baseline"):
        text += f" and {1 / pick['size_ratio_vs_baseline']:.1f}× smaller"
    return text + "."


def interpret_search(trials: pd.DataFrame | None, within: float = WITHIN) -> str:
    """Notebook 03's section on an accuracy + latency search (:func:`kdlib.search.search_trials`) and the trial
    it kept (:func:`kdlib.recommend.fastest_within`). Empty without such a search."""
    done = finished_latency_trials(trials)
    if done is None:
        return ""
    front = done[done["pareto"].astype(bool)]
    kept = fastest_within(front, "accuracy", "latency_ms", within)
    depth = f"{int(kept['student_layers'])} layers, " if pd.notna(kept.get("student_layers")) else ""
    return (
        "## The search's trade-off: accuracy against latency\n\n"
        "Notebook 02's search trained students of different depths and measured each one's latency, so it "
        "shows what the variants above cannot: how much validation accuracy each millisecond buys. Every dot is "
        "one finished trial (colour: the student's layers); the dashed line joins the Pareto front, the trials no "
        f"other trial beats on both. Of {len(trials)} trials, {len(done)} finished and {len(front)} are on the "
        f"front. Kept: trial {int(kept['trial'])} ({depth}validation accuracy {_pct(kept['accuracy'])}, "
        f"{kept['latency_ms']:.2f} ms), the fastest on the front within {100 * within:g} point of its best "
        f"({_pct(front['accuracy'].max())})."
    )


def _latency_sentences(rows: Mapping[str, Mapping]) -> list[str]:
    a, b = rows.get("student"), rows.get("student-onnx")
    if a is None or b is None or not _has(a, "throughput_qps") or not _has(b, "throughput_qps"):
        return []
    per_query = a["time_avg_ms"] / b["time_avg_ms"]
    batched = b["throughput_qps"] / a["throughput_qps"]
    sentence = (
        f"ONNX Runtime runs the same fp32 student {per_query:.1f}× faster per query but {batched:.2f}× in "
        f"throughput (batches of {int(b.get('throughput_batch_size') or 32)})."
    )
    if per_query > 1.3 * batched:
        sentence += (
            " A single short query spends much of its time on fixed costs per call (Python dispatch of every "
            "PyTorch operator, tensor allocation) that ONNX Runtime's prepared graph avoids; a batch spends it "
            "in matrix multiplications, which both runtimes do with similar kernels."
        )
    return [sentence]


def _oos_sentences(rows: Mapping[str, Mapping], base: Mapping, baseline: str) -> list[str]:
    if not _has(base, "threshold_oos_recall"):
        return ["The data has no out-of-scope label: OOS figures are n/a."]
    flagged = [v for v, r in rows.items() if r.get("loses_more_oos") is True]
    sentence = (
        f"Out of scope, with each model's validation threshold, the {baseline} catches "
        f"{_pct(base['threshold_oos_recall'])} of OOS queries at in-scope accuracy "
        f"{_pct(base['threshold_in_scope_accuracy'])}. "
    )
    if flagged:
        sentence += (
            f"Compression costs OOS detection more than in-scope accuracy for {', '.join(flagged)}: check OOS "
            "recall, not only accuracy, before shipping one of them."
        )
    else:
        sentence += "No variant loses more OOS recall than in-scope accuracy."
    if _has(base, "oos_auroc"):
        aurocs = {v: r["oos_auroc"] for v, r in rows.items() if v != baseline and _has(r, "oos_auroc")}
        if aurocs:
            low, high = min(aurocs.values()), max(aurocs.values())
            spread = f"{low:.3f}" if f"{low:.3f}" == f"{high:.3f}" else f"{low:.3f} to {high:.3f}"
            sentence += (
                f" Apart from any threshold, the score separates OOS from in-scope queries with AUROC {spread} "
                f"for the compressed variants against {base['oos_auroc']:.3f} for the {baseline}."
            )
    others = sorted({v for v, r in rows.items() if r.get("oos_score") not in (None, base.get("oos_score"))})
    if others:
        sentence += (
            f" {', '.join(others)} cannot expose the features of the {base.get('oos_score')} score and "
            f"{'is' if len(others) == 1 else 'are'} scored by {rows[others[0]].get('oos_score')} instead."
        )
    return [sentence]
