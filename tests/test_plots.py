"""The figures: what is drawn where, read back from the axes, and the files written."""

from __future__ import annotations

import os
import xml.etree.ElementTree as ET

import matplotlib

matplotlib.use("Agg")

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402
from matplotlib.collections import PathCollection  # noqa: E402
from matplotlib.container import BarContainer  # noqa: E402

from kdlib import plots  # noqa: E402
from kdlib.plots import (  # noqa: E402
    pareto_front,
    plot_metrics,
    plot_soft_targets,
    plot_training_curves,
    save_figure,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def table() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "run": ["cpu2"] * 5,
            "variant": ["teacher", "student", "student-int8", "student-onnx", "student-onnx-int8"],
            "accuracy": [0.87, 0.86, 0.858, 0.86, 0.857],
            "time_avg_ms": [14.0, 7.0, 4.0, 3.0, 2.0],
            "size_mb": [87.0, 66.0, 25.0, 66.0, 17.0],
        }
    )


def scatter_points(fig) -> dict[str, tuple[np.ndarray, PathCollection]]:
    """{legend label: (offsets, collection)} of every scatter in the first axes."""
    ax = fig.axes[0]
    scatters = [c for c in ax.collections if isinstance(c, PathCollection)]
    return {c.get_label(): (np.asarray(c.get_offsets()), c) for c in scatters}


def is_dashed(collection: PathCollection) -> bool:
    return any(dashes is not None and len(dashes) > 0 for _, dashes in collection.get_linestyle())


# ---------------------------------------------------------------------------------------------
# plot_metrics
# ---------------------------------------------------------------------------------------------


def test_plot_metrics_writes_png_and_svg(tmp_path, table):
    stem = tmp_path / "figures" / "sub" / "metrics"  # parent folders do not exist yet
    plot_metrics(table, highlight="student", out_stem=stem)
    png, svg = stem.parent / "metrics.png", stem.parent / "metrics.svg"
    assert png.read_bytes()[:8] == PNG_MAGIC
    root = ET.parse(svg).getroot()
    assert root.tag.endswith("svg")
    texts = " ".join(t for element in root.iter() for t in (element.text, element.tail) if t)
    assert "Average latency (ms)" in texts and "Accuracy (%)" in texts
    assert sorted(p.name for p in stem.parent.iterdir()) == ["metrics.png", "metrics.svg"]  # no temp files


def test_plot_metrics_axes_and_points(table):
    fig = plot_metrics(table)
    ax = fig.axes[0]
    assert ax.get_xlabel() == "Average latency (ms)"
    assert ax.get_ylabel() == "Accuracy (%)"
    points = scatter_points(fig)
    assert set(points) == set(table["variant"])  # one run: labels are the bare variant names
    for row in table.itertuples():
        offsets, _ = points[row.variant]
        np.testing.assert_allclose(offsets, [[row.time_avg_ms, row.accuracy * 100]])


def test_bubble_area_is_proportional_to_size(table):
    points = scatter_points(plot_metrics(table))
    pairs = zip(table["variant"], table["size_mb"], strict=True)
    area_per_mb = [points[v][1].get_sizes()[0] / size for v, size in pairs]
    np.testing.assert_allclose(area_per_mb, area_per_mb[0])


def test_highlighted_variant_is_filled_on_top_with_an_outline_and_its_name(table):
    fig = plot_metrics(table, highlight="student-int8")
    points = scatter_points(fig)
    highlighted = points["student-int8"][1]
    assert highlighted.get_facecolor()[0][3] > 0.8  # filled, not the reference's invisible outline
    assert np.allclose(highlighted.get_edgecolor()[0][:3], 0)  # black outline
    assert highlighted.get_zorder() > max(c.get_zorder() for v, (_, c) in points.items() if v != "student-int8")
    assert [t.get_text() for t in fig.axes[0].texts] == ["student-int8"]
    assert not any(len(c.get_edgecolor()) and c.get_edgecolor()[0][3] > 0 for v, (_, c) in points.items()
                   if v != "student-int8")


def test_size_key_shows_bubbles_at_the_plot_scale(table):
    fig = plot_metrics(table)
    fig.canvas.draw()
    ax = fig.axes[0]
    keys = [a for a in ax.artists if isinstance(a, matplotlib.legend.Legend)]
    assert len(keys) == 1 and keys[0].get_title().get_text() == "Size (bubble area)"
    labels = [t.get_text() for t in keys[0].get_texts()]
    assert labels == ["8.7 MB", "29 MB", "87 MB"]  # a tenth, a third and all of the largest model
    area_per_mb = plots.MAX_BUBBLE_AREA / 87.0
    diameters = [h.get_markersize() for h in keys[0].legend_handles]
    np.testing.assert_allclose(np.square(diameters), [8.7 * area_per_mb, 29 * area_per_mb, 87 * area_per_mb])
    assert keys[0].get_window_extent().x0 >= ax.get_window_extent().x1  # outside the axes, like the legend


def test_unknown_highlight_is_a_clear_error(table):
    with pytest.raises(ValueError, match="not one of the variants"):
        plot_metrics(table, highlight="nope")


def test_legend_is_outside_the_axes_with_uniform_markers(table):
    fig = plot_metrics(table, highlight="student")
    fig.canvas.draw()
    ax = fig.axes[0]
    legend = ax.get_legend()
    assert legend.get_window_extent().x0 >= ax.get_window_extent().x1
    labels = [t.get_text() for t in legend.get_texts()]
    assert labels[-1] == "Pareto front" and set(labels[:-1]) == set(table["variant"])
    sizes = {float(h.get_sizes()[0]) for h in legend.legend_handles if isinstance(h, PathCollection)}
    assert sizes == {plots.LEGEND_MARKER_AREA}


def test_pareto_front_on_a_hand_made_table():
    # a: fastest; b: slower than a and more accurate; c: slower than b and less accurate (beaten
    # by b); d: slowest and most accurate. Front = a, b, d, in latency order.
    table = pd.DataFrame(
        {
            "variant": ["d", "c", "b", "a"],
            "accuracy": [0.9, 0.8, 0.85, 0.7],
            "time_avg_ms": [10.0, 6.0, 5.0, 1.0],
        }
    )
    assert pareto_front(table)["variant"].tolist() == ["a", "b", "d"]


def test_pareto_front_ties():
    # "same" is as fast as "best" but less accurate: beaten. Equal rows both stay.
    table = pd.DataFrame(
        {
            "variant": ["best", "same", "dup1", "dup2"],
            "accuracy": [0.9, 0.8, 0.7, 0.7],
            "time_avg_ms": [5.0, 5.0, 1.0, 1.0],
        }
    )
    assert pareto_front(table)["variant"].tolist() == ["dup1", "dup2", "best"]


def test_pareto_front_is_drawn_as_a_step_line(table):
    fig = plot_metrics(table)
    (line,) = [line for line in fig.axes[0].get_lines() if line.get_label() == "Pareto front"]
    assert line.get_drawstyle() == "steps-post"
    front = pareto_front(table)
    np.testing.assert_allclose(line.get_xdata(), front["time_avg_ms"])
    np.testing.assert_allclose(line.get_ydata(), front["accuracy"] * 100)
    assert front["variant"].tolist() == ["student-onnx-int8", "student-onnx", "teacher"]


def test_several_runs_overlay_with_one_marker_per_run(table):
    other = table.assign(run="laptop", time_avg_ms=table["time_avg_ms"] / 2)
    fig = plot_metrics(pd.concat([table, other], ignore_index=True), highlight="teacher")
    points = scatter_points(fig)
    assert set(points) == {f"{r}/{v}" for r in ("cpu2", "laptop") for v in table["variant"]}
    np.testing.assert_allclose(points["laptop/student"][0], [[3.5, 86.0]])

    def marker_shapes(run: str) -> set:
        return {tuple(map(tuple, points[f"{run}/{v}"][1].get_paths()[0].vertices)) for v in table["variant"]}

    marker_paths = {r: marker_shapes(r) for r in ("cpu2", "laptop")}
    assert len(marker_paths["cpu2"]) == len(marker_paths["laptop"]) == 1  # one shape per run
    assert marker_paths["cpu2"] != marker_paths["laptop"]
    colours = {r: points[f"{r}/student"][1].get_facecolor()[0][:3].tolist() for r in ("cpu2", "laptop")}
    assert colours["cpu2"] == colours["laptop"]  # one colour per variant
    fronts = [line.get_label() for line in fig.axes[0].get_lines()]
    assert fronts == ["Pareto front (cpu2)", "Pareto front (laptop)"]


def test_plot_metrics_rejects_a_table_without_the_columns():
    with pytest.raises(ValueError, match="time_avg_ms"):
        plot_metrics(pd.DataFrame({"variant": ["a"], "accuracy": [0.5], "size_mb": [1.0]}))


# ---------------------------------------------------------------------------------------------
# Other figures and saving
# ---------------------------------------------------------------------------------------------


def test_training_curves_skip_no_log(tmp_path):
    epochs = pd.DataFrame(
        {
            "Training Loss": ["No log", "1.2", 0.8],
            "Epoch": [1, 2, 3],
            "Step": [10, 20, 30],
            "Validation Loss": [2.0, 1.1, 0.9],
            "Accuracy": [0.5, 0.7, 0.8],
        }
    )
    fig = plot_training_curves(epochs, out_stem=tmp_path / "curves")
    loss_ax, acc_ax = fig.axes
    lines = {line.get_label(): line for line in loss_ax.get_lines()}
    np.testing.assert_allclose(lines["Training loss"].get_xdata(), [2, 3])
    np.testing.assert_allclose(lines["Training loss"].get_ydata(), [1.2, 0.8])
    np.testing.assert_allclose(lines["Validation loss"].get_ydata(), [2.0, 1.1, 0.9])
    np.testing.assert_allclose(acc_ax.get_lines()[0].get_ydata(), [0.5, 0.7, 0.8])
    assert (tmp_path / "curves.png").exists() and (tmp_path / "curves.svg").exists()


def test_training_curves_with_no_training_loss_at_all():
    epochs = pd.DataFrame(
        {"Training Loss": ["No log"], "Epoch": [1], "Step": [5], "Validation Loss": [1.0], "Accuracy": [0.6]}
    )
    fig = plot_training_curves(epochs)
    assert [line.get_label() for line in fig.axes[0].get_lines()] == ["Validation loss"]


def softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max())
    return e / e.sum()


def test_soft_targets_one_bar_container_per_temperature():
    labels = [f"intent_{i}" for i in range(20)]
    logits = np.linspace(0, 6, 20)[::-1].copy()
    probs = {1.0: softmax(logits), 4.0: softmax(logits / 4)}
    fig = plot_soft_targets(probs, labels, top_k=5, query="transfer $100 to savings")
    ax = fig.axes[0]
    containers = [c for c in ax.containers if isinstance(c, BarContainer)]
    assert len(containers) == 2
    assert all(len(c.patches) == 5 for c in containers)
    heights = [p.get_height() for p in containers[0].patches]
    np.testing.assert_allclose(heights, np.sort(probs[1.0])[::-1][:5])
    assert [t.get_text() for t in ax.get_xticklabels()] == labels[:5]
    assert "transfer $100 to savings" in ax.get_title()
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["T = 1", "T = 4"]
    # A log axis: the runners-up, orders of magnitude below the top class, stay visible.
    assert ax.get_yscale() == "log"
    assert ax.get_ylim()[0] <= min(probs[t][np.argsort(-probs[1.0])[:5]].min() for t in probs)


def test_soft_targets_rejects_logits():
    with pytest.raises(ValueError, match="not probabilities"):
        plot_soft_targets({1.0: np.array([2.0, -1.0, 0.5])}, ["a", "b", "c"])


def test_save_figure_is_atomic(tmp_path, table, monkeypatch):
    fig = plot_metrics(table)
    png, svg = save_figure(fig, tmp_path / "fig")
    before = png.read_bytes(), svg.read_bytes()

    def broken_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(plots.os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk full"):
        save_figure(plot_metrics(table, highlight="teacher"), tmp_path / "fig")
    assert (png.read_bytes(), svg.read_bytes()) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fig.png", "fig.svg"]


def test_save_figure_is_reproducible_and_readable(tmp_path, table):
    png1, svg1 = save_figure(plot_metrics(table), tmp_path / "a")
    png2, svg2 = save_figure(plot_metrics(table), tmp_path / "b.svg")  # a suffix on the stem is tolerated
    assert (png2, svg2) == (tmp_path / "b.png", tmp_path / "b.svg")
    assert svg1.read_bytes() == svg2.read_bytes()  # no date or random ids: re-running changes nothing
    assert png1.read_bytes() == png2.read_bytes()
    mask = os.umask(0o022)
    os.umask(mask)
    assert svg1.stat().st_mode & 0o777 == 0o666 & ~mask  # like open(), not the 0600 of a bare mkstemp


# ---------------------------------------------------------------------------------------------
# Out-of-scope detection
# ---------------------------------------------------------------------------------------------


def test_oos_score_histograms_and_the_threshold_line():
    scores = np.array([0.1, 0.2, 0.3, 0.8, 0.9])
    is_oos = np.array([False, False, False, True, True])
    fig = plots.plot_oos_scores({"scores": scores, "is_oos": is_oos, "threshold": 0.55, "method": "energy"})
    ax = fig.axes[0]
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert labels == ["in scope (3)", "out of scope (2)", "threshold (from validation)"]
    line = next(line for line in ax.get_lines() if line.get_label().startswith("threshold"))
    assert list(line.get_xdata()) == [0.55, 0.55]
    assert ax.get_xlabel().startswith("Energy score") and ax.get_xscale() == "linear"
    assert ax.get_ylabel() == "Test queries"
    # Distances have a long right tail: log10(score) on even bins, bars counting queries (not densities).
    distances = {"scores": scores * 1000, "is_oos": is_oos, "threshold": 550.0, "method": "mahalanobis"}
    ax = plots.plot_oos_scores(distances).axes[0]
    assert ax.get_xscale() == "linear" and ax.get_xlabel().startswith("log10 of the squared Mahalanobis")
    counts = [sum(p.get_height() for p in c) for c in ax.containers]
    assert counts == [3, 2]  # every in-scope and every OOS query counted once, at its real size
    edges = [p.get_x() for c in ax.containers for p in c]
    assert min(edges) == pytest.approx(np.log10(100.0))
    line = next(line for line in ax.get_lines() if line.get_label().startswith("threshold"))
    assert list(line.get_xdata()) == pytest.approx([np.log10(550.0)] * 2)


def test_oos_figures_say_not_applicable_without_an_oos_label(table):
    assert "Not applicable" in plots.plot_oos_scores(None).axes[0].texts[0].get_text()
    no_oos = table.assign(threshold_oos_recall=np.nan)
    assert "Not applicable" in plots.plot_oos_vs_latency(no_oos).axes[0].texts[0].get_text()
    assert "Not applicable" in plots.plot_oos_vs_latency(table).axes[0].texts[0].get_text()  # no such column


def test_oos_recall_against_latency_rings_the_variants_that_lose_more_oos(table):
    with_oos = table.assign(
        threshold_oos_recall=[0.8, 0.7, 0.79, 0.7, 0.6],
        loses_more_oos=[None, True, False, True, True],
    )
    fig = plots.plot_oos_vs_latency(with_oos, highlight="student")
    points = scatter_points(fig)
    for row in with_oos.itertuples():
        np.testing.assert_allclose(points[row.variant][0], [[row.time_avg_ms, row.threshold_oos_recall * 100]])
    rings = [c for c in fig.axes[0].collections if c.get_label().startswith("_") and len(c.get_offsets())]
    ringed = sorted(tuple(c.get_offsets()[0]) for c in rings)
    assert ringed == sorted((t, r * 100) for t, r, f in zip(with_oos.time_avg_ms, with_oos.threshold_oos_recall,
                                                              with_oos.loses_more_oos, strict=True) if f)


def test_search_plot_joins_the_pareto_front_and_says_when_there_is_none():
    from kdlib.plots import plot_search

    trials = pd.DataFrame({
        "trial": [0, 1, 2, 3], "state": ["COMPLETE", "COMPLETE", "COMPLETE", "PRUNED"],
        "student_layers": [3, 2, 3, 1], "accuracy": [0.95, 0.93, 0.94, None],
        "latency_ms": [3.0, 2.0, 3.5, None], "pareto": [True, True, False, False],
    })
    fig = plot_search(trials)
    ax = fig.axes[0]
    points = [c for c in ax.collections if isinstance(c, PathCollection)][0]
    np.testing.assert_allclose(points.get_offsets(), [[3.0, 95.0], [2.0, 93.0], [3.5, 94.0]])  # pruned left out
    line = ax.get_lines()[0]
    np.testing.assert_allclose(line.get_xdata(), [2.0, 3.0])  # the front, fastest first
    np.testing.assert_allclose(line.get_ydata(), [93.0, 95.0])
    assert len(fig.axes) == 2  # the depth colour bar, ticked at the depths drawn (no half layers)
    np.testing.assert_allclose(fig.axes[1].get_yticks(), [2, 3])
    # No accuracy + latency search: nothing to draw, no empty panel.
    for nothing in (None, trials.drop(columns=["latency_ms"]), trials.assign(state="PRUNED")):
        assert plot_search(nothing) is None


def test_plot_metrics_draws_the_columns_it_is_given(table):
    with_rule = table.assign(threshold_accuracy=[0.92, 0.91, 0.9, 0.915, 0.918],
                             time_p50_ms=[13.0, 6.0, 3.5, 2.5, 1.5])
    fig = plot_metrics(with_rule, accuracy="threshold_accuracy", latency="time_p50_ms")
    ax = fig.axes[0]
    assert ax.get_xlabel() == "Median latency, p50 (ms)" and ax.get_ylabel() == "Accuracy with the OOS threshold (%)"
    np.testing.assert_allclose(scatter_points(fig)["student"][0], [[6.0, 91.0]])
    (line,) = [line for line in ax.get_lines() if line.get_label() == "Pareto front"]
    np.testing.assert_allclose(line.get_xdata(), [1.5, 13.0])  # onnx-int8 beats every student; then the teacher
    with pytest.raises(ValueError, match="threshold_accuracy"):
        plot_metrics(table, accuracy="threshold_accuracy")


def test_weight_histogram_marks_the_int8_range():
    weights = np.linspace(-0.5, 0.25, 1000)
    fig = plots.plot_weight_histogram(weights, name="layer.0", scale=0.75 / 255, zero_point=42)
    ax = fig.axes[0]
    assert sum(p.get_height() for p in ax.patches) == 1000
    ends = sorted(line.get_xdata()[0] for line in ax.get_lines())
    assert ends == pytest.approx([(-128 - 42) * 0.75 / 255, (127 - 42) * 0.75 / 255])
    assert "layer.0" in ax.get_xlabel() and "1,000 fp32 weights" in ax.get_title()
    assert not plots.plot_weight_histogram(weights).axes[0].get_lines()  # no scale: no range drawn
    with pytest.raises(ValueError, match="at least one weight"):
        plots.plot_weight_histogram(np.array([]))
