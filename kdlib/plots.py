"""Figures of the study: accuracy vs latency, training curves, a teacher's soft targets, one layer's
weights, OOS scores and the search's trials, one idea each.

Every function builds its own :class:`~matplotlib.figure.Figure` (no global ``pyplot`` state), so it
works headless and displays in a notebook as a cell's last value. With ``out_stem`` the figure is also
saved as ``<stem>.png`` (for the README) and ``<stem>.svg`` (for print), each written atomically.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib as mpl
import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.legend import Legend
from matplotlib.lines import Line2D
from matplotlib.patches import Rectangle
from matplotlib.ticker import MaxNLocator

from kdlib.io import atomic_open
from kdlib.recommend import pareto_front

LATENCY_LABEL = "Average latency (ms)"
AXIS_LABELS = {  # the columns plot_metrics can draw, as its axes name them
    "time_avg_ms": LATENCY_LABEL,
    "time_p50_ms": "Median latency, p50 (ms)",
    "accuracy": "Accuracy (%)",
    "threshold_accuracy": "Accuracy with the OOS threshold (%)",
}

# One marker shape per run, one colour per variant: overlaid runs stay readable in print.
RUN_MARKERS = ["o", "s", "^", "D", "v", "P", "X", "p", "h", "*"]
PARETO_LINESTYLES = ["-", ":", "-.", (0, (5, 1)), (0, (3, 1, 1, 1, 1, 1))]
MAX_BUBBLE_AREA = 1500.0  # points**2 of the largest model's bubble
LEGEND_MARKER_AREA = 60.0  # uniform legend markers: bubble sizes would make them huge
PNG_DPI = 150


def new_figure(**kwargs) -> Figure:
    """A figure outside ``pyplot`` with an Agg canvas: never shown twice or leaked, drawable headless."""
    fig = Figure(layout="constrained", **kwargs)
    FigureCanvasAgg(fig)
    return fig


def _axes(figsize: tuple[float, float]) -> tuple[Figure, Axes]:
    fig = new_figure(figsize=figsize)
    return fig, fig.add_subplot()


def save_figure(fig: Figure, out_stem: str | os.PathLike) -> tuple[Path, Path]:
    """Write ``<stem>.png`` and ``<stem>.svg`` atomically; returns both paths. SVG text stays text and the
    date is left out, so re-rendering an unchanged figure gives an unchanged file."""
    stem = Path(out_stem)
    if stem.suffix.lower() in {".png", ".svg"}:  # tolerate "fig.png" given as the stem
        stem = stem.with_suffix("")
    paths = stem.parent / f"{stem.name}.png", stem.parent / f"{stem.name}.svg"
    with mpl.rc_context({"svg.fonttype": "none", "svg.hashsalt": "kdlib"}):  # only the SVG reads these
        for path, options in zip(paths, ({"dpi": PNG_DPI}, {"metadata": {"Date": None}}), strict=True):
            with atomic_open(path, "wb") as handle:
                fig.savefig(handle, format=path.suffix[1:], bbox_inches="tight", **options)
    return paths


def _finish(fig: Figure, out_stem: str | os.PathLike | None) -> Figure:
    """The figure, saved first when ``out_stem`` is given."""
    if out_stem is not None:
        save_figure(fig, out_stem)
    return fig


def _check_metric_table(table: pd.DataFrame, accuracy: str = "accuracy", latency: str = "time_avg_ms") -> pd.DataFrame:
    missing = [c for c in ("variant", accuracy, latency, "size_mb") if c not in table.columns]
    if missing:
        raise ValueError(f"plot_metrics needs columns {missing}; pass a kdlib.report.comparison_table().")
    table = table.copy()
    table["run"] = table["run"].fillna("").astype(str) if "run" in table.columns else ""
    table["variant"] = table["variant"].astype(str)
    for column in (accuracy, latency, "size_mb"):
        table[column] = pd.to_numeric(table[column], errors="coerce")
    return table.dropna(subset=[accuracy, latency]).reset_index(drop=True)


def plot_metrics(table: pd.DataFrame, highlight: str | None = None, *, out_stem: str | os.PathLike | None = None,
                 runs_as_markers: bool = True, accuracy: str = "accuracy", latency: str = "time_avg_ms") -> Figure:
    """Accuracy (%) against latency, bubble area proportional to model size.

    ``accuracy`` and ``latency`` name the table's columns on the axes: plain accuracy against mean
    latency by default; notebook 03 draws the recommendation's own axes (threshold accuracy against
    p50, :func:`kdlib.recommend.recommendation`), so the front and the highlight are the ones the rule reads.
    One point per (run, variant): a colour per variant and, with ``runs_as_markers``, a marker shape
    per run. ``highlight`` (a variant name) is drawn filled, on top, with a thick black outline and
    its name, so it stays visible behind overlapping bubbles. Each run's Pareto front is a step line
    (the best accuracy reachable within a given latency). The legend, right of the axes, ends with a
    key of bubble sizes in MB.
    """
    table = _check_metric_table(table, accuracy, latency)
    if table.empty:
        raise ValueError(f"plot_metrics: no row has both {accuracy} and {latency}.")
    variants = list(dict.fromkeys(table["variant"]))
    runs = list(dict.fromkeys(table["run"]))
    if highlight is not None and highlight not in variants:
        raise ValueError(f"highlight={highlight!r} is not one of the variants {variants}.")
    colours = mpl.colormaps["tab10"].colors
    colour_of = {v: colours[i % len(colours)] for i, v in enumerate(variants)}
    markers = RUN_MARKERS if runs_as_markers else ["o"]
    marker_of = {r: markers[i % len(markers)] for i, r in enumerate(runs)}
    max_size = table["size_mb"].max()
    scale = MAX_BUBBLE_AREA / max_size if pd.notna(max_size) and max_size > 0 else 0.0

    fig, ax = _axes((8, 5))
    for (run, variant), rows in table.groupby(["run", "variant"], sort=False):
        sizes = rows["size_mb"]  # area proportional to MB; unknown sizes get a small default bubble
        areas = sizes.fillna(0).to_numpy(dtype=float) * scale + np.where(sizes.isna(), 40.0, 0.0)
        bold = variant == highlight
        if bold:
            for x, y in zip(rows[latency], rows[accuracy] * 100, strict=True):
                ax.annotate(variant, (x, y), xytext=(8, 8), textcoords="offset points", fontweight="bold")
        style = (dict(alpha=0.9, edgecolors="black", linewidths=2.0, zorder=3) if bold
                 else dict(alpha=0.5, edgecolors="none", zorder=2))
        ax.scatter(rows[latency], rows[accuracy] * 100, marker=marker_of[run], s=areas, color=colour_of[variant],
                   label=f"{run}/{variant}" if len(runs) > 1 else variant, **style)
    for i, run in enumerate(runs):
        front = pareto_front(table[table["run"] == run], accuracy, latency)
        ax.step(front[latency], front[accuracy] * 100, where="post", color="0.35", linewidth=1, zorder=0,
                linestyle=PARETO_LINESTYLES[i % len(PARETO_LINESTYLES)],
                label=f"Pareto front ({run})" if len(runs) > 1 else "Pareto front")
    _finish_axes(ax, AXIS_LABELS.get(latency, latency), AXIS_LABELS.get(accuracy, accuracy))
    if scale > 0:
        _size_key(ax, max_size, scale)
    return _finish(fig, out_stem)


def _finish_axes(ax: Axes, xlabel: str, ylabel: str) -> None:
    """Axis labels, margins, a light grid and the legend right of the axes, its markers all one size."""
    ax.set(xlabel=xlabel, ylabel=ylabel)
    ax.margins(0.15)
    ax.grid(True, alpha=0.3)
    legend = ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0, frameon=False)
    for handle in legend.legend_handles:
        if hasattr(handle, "set_sizes"):
            handle.set_sizes([LEGEND_MARKER_AREA])


def _size_key(ax: Axes, max_size: float, scale: float) -> None:
    """A second legend under the first: grey bubbles of three sizes in MB, at the plot's scale."""
    steps = [v for v in (max_size / 10, max_size / 3, max_size) if v > 0]
    handles = [  # Line2D markersize is a diameter in points; scatter's s an area in points**2
        Line2D([], [], marker="o", linestyle="none", markersize=float(np.sqrt(v * scale)), color="0.6", alpha=0.5)
        for v in steps
    ]
    key = Legend(ax, handles, [f"{v:.3g} MB" for v in steps], title="Size (bubble area)", loc="lower left",
                 bbox_to_anchor=(1.02, 0.0), borderaxespad=0.0, frameon=False, labelspacing=1.6, borderpad=1.0)
    ax.add_artist(key)  # beside ax.get_legend(), which stays the variants' legend


def plot_training_curves(epoch_table: pd.DataFrame, *, out_stem: str | os.PathLike | None = None) -> Figure:
    """Losses and validation accuracy per epoch, from the Trainer's per-epoch table. Epochs whose training
    loss is "No log" (fewer than ``logging_steps`` steps ran) are left out of the training-loss line."""
    needed = ("Epoch", "Training Loss", "Validation Loss", "Accuracy")
    missing = [c for c in needed if c not in epoch_table.columns]
    if missing:
        raise ValueError(f"plot_training_curves needs columns {missing}.")
    epoch, train, valid, accuracy = (pd.to_numeric(epoch_table[c], errors="coerce") for c in needed)

    fig = new_figure(figsize=(10, 4))
    loss_ax, acc_ax = fig.subplots(1, 2)
    if train.notna().any():
        loss_ax.plot(epoch[train.notna()], train.dropna(), marker="o", label="Training loss")
    loss_ax.plot(epoch, valid, marker="o", label="Validation loss")
    loss_ax.set(xlabel="Epoch", ylabel="Loss", title="Loss")
    loss_ax.legend()
    acc_ax.plot(epoch, accuracy, marker="o", color="C2")
    acc_ax.set(xlabel="Epoch", ylabel="Accuracy", title="Validation accuracy")
    for ax in (loss_ax, acc_ax):
        ax.grid(True, alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    return _finish(fig, out_stem)


def _as_probabilities(temperature: float, probs: np.ndarray, n_labels: int) -> np.ndarray:
    values = np.asarray(probs, dtype=float).squeeze()
    if values.shape != (n_labels,):
        raise ValueError(f"Probabilities at T={temperature} have shape {values.shape}, not ({n_labels},).")
    if (values < 0).any() or not np.isclose(values.sum(), 1.0, atol=1e-3):
        raise ValueError(f"Values at T={temperature} are not probabilities (softmax(logits / T) expected).")
    return values


def plot_soft_targets(probs_by_temperature: Mapping[float, np.ndarray], labels: Sequence[str], *, top_k: int = 10,
                      query: str | None = None, out_stem: str | os.PathLike | None = None) -> Figure:
    """The teacher's ``top_k`` classes for one query (by probability at T = 1, else at the lowest T) at
    several temperatures, on a log axis: a higher T lifts the runners-up, the "dark knowledge" the student
    learns from, which a linear axis would show as zero."""
    if not probs_by_temperature:
        raise ValueError("plot_soft_targets needs at least one temperature.")
    temperatures = sorted(probs_by_temperature)
    probs = {t: _as_probabilities(t, probs_by_temperature[t], len(labels)) for t in temperatures}
    reference = 1.0 if 1.0 in probs else temperatures[0]
    order = np.argsort(-probs[reference], kind="stable")[: max(1, top_k)]
    names = [str(labels[i]) for i in order]

    fig, ax = _axes((max(6.0, 0.7 * len(names) + 2), 4.5))
    x = np.arange(len(names))
    width = 0.8 / len(temperatures)
    for j, t in enumerate(temperatures):
        ax.bar(x + (j - (len(temperatures) - 1) / 2) * width, probs[t][order], width, label=f"T = {t:g}")
    ax.set_xticks(x, names, rotation=45, ha="right")
    ax.set(ylabel="Probability (log scale)", yscale="log")
    lowest = min(float(probs[t][order].min()) for t in temperatures)
    ax.set_ylim(max(lowest / 2, 1e-12), 1.5)
    title = "Teacher's soft targets"
    if query:
        shown = query if len(query) <= 60 else query[:57] + "..."
        title += f' for "{shown}"'
    ax.set_title(title)
    ax.set_xlabel(f"Top {len(names)} classes by probability at T = {reference:g}")
    ax.legend()
    ax.grid(True, axis="y", which="both", alpha=0.3)
    return _finish(fig, out_stem)


def plot_weight_histogram(weights: np.ndarray, *, name: str | None = None, scale: float | None = None,
                          zero_point: int | None = None, out_stem: str | os.PathLike | None = None) -> Figure:
    """The values of one layer's fp32 weights: a narrow band around zero, so 256 evenly spaced int8 levels
    lose little. With ``scale`` and ``zero_point`` (:func:`kdlib.quantize.quantize_by_hand`) the ends of
    the int8 range are marked."""
    values = np.asarray(weights, dtype=float).ravel()
    if values.size == 0:
        raise ValueError("plot_weight_histogram needs at least one weight.")
    fig, ax = _axes((8, 4))
    ax.hist(values, bins=250, color="C0", alpha=0.8)
    if scale is not None and zero_point is not None:
        for end in (-128, 127):
            x = (end - zero_point) * scale
            ax.axvline(x, color="black", linestyle="--", linewidth=1)
            ax.annotate(f"int8 {end}", (x, 1), xycoords=("data", "axes fraction"), xytext=(4, -14),
                        textcoords="offset points")
    ax.set(xlabel="weight value" + (f" ({name})" if name else ""), ylabel="weights",
           title=f"{values.size:,} fp32 weights of one layer")
    ax.grid(True, alpha=0.3)
    return _finish(fig, out_stem)


def plot_head_importance(importance: np.ndarray, kept: Sequence[Sequence[int]], *,
                         out_stem: str | os.PathLike | None = None) -> Figure:
    """Every attention head's share of its layer's importance (layers x heads), the heads structured
    pruning keeps outlined."""
    scores = np.asarray(importance, dtype=float)
    if scores.ndim != 2 or len(kept) != len(scores):
        raise ValueError(f"plot_head_importance needs (layers, heads) scores and kept heads per layer; got shape "
                         f"{scores.shape} and {len(kept)} layers kept.")
    shares = scores / np.maximum(scores.sum(axis=1, keepdims=True), np.finfo(float).tiny)
    fig, ax = _axes((max(5.0, 0.55 * scores.shape[1] + 2), 0.6 * len(scores) + 1.8))
    image = ax.imshow(shares, cmap="viridis", aspect="auto", vmin=0)
    for layer, heads in enumerate(kept):
        for head in heads:
            ax.add_patch(Rectangle((head - 0.5, layer - 0.5), 1, 1, fill=False, edgecolor="red", linewidth=2))
    ax.set(xticks=range(scores.shape[1]), yticks=range(len(scores)), xlabel="attention head", ylabel="layer",
           title="Head importance (share of its layer); outlined: kept")
    fig.colorbar(image, ax=ax, label="share of the layer's importance")
    return _finish(fig, out_stem)


def _not_applicable(ax: Axes) -> None:
    """What an OOS figure shows for data without an OOS label: a sentence, not an error or zeros."""
    ax.text(0.5, 0.5, "Not applicable: the data has no out-of-scope label", ha="center", va="center")
    ax.set_axis_off()


SCORE_NAMES = {
    "energy": "Energy score (-logsumexp of the in-scope logits)",
    "msp": "1 - max softmax probability",
    "mahalanobis": "Squared Mahalanobis distance to the nearest intent",
}


def plot_oos_scores(detail: Mapping | None, *, out_stem: str | os.PathLike | None = None) -> Figure:
    """Histograms (counts, so the groups keep their sizes) of the OOS score of in-scope and out-of-scope
    test queries, the threshold marked; Mahalanobis distances, long-tailed, as log10. ``detail`` is a
    benchmark result's ``oos_detail``; None (no OOS label) gives a figure saying OOS detection does not apply."""
    fig, ax = _axes((8, 4))
    if detail is None:
        _not_applicable(ax)
        return _finish(fig, out_stem)
    scores, is_oos = np.asarray(detail["scores"], dtype=float), np.asarray(detail["is_oos"], dtype=bool)
    threshold = detail.get("threshold")
    name = SCORE_NAMES.get(detail.get("method"), "OOS score")
    positive = scores.min() > 0 and (threshold is None or threshold > 0)
    if detail.get("method") == "mahalanobis" and positive:
        scores = np.log10(scores)
        threshold = None if threshold is None else float(np.log10(threshold))
        name = f"log10 of the {name[0].lower()}{name[1:]}"
    bins = np.histogram_bin_edges(scores, bins=50)
    ax.hist(scores[~is_oos], bins=bins, alpha=0.6, label=f"in scope ({(~is_oos).sum():,})")
    ax.hist(scores[is_oos], bins=bins, alpha=0.6, label=f"out of scope ({is_oos.sum():,})")
    if threshold is not None:
        ax.axvline(threshold, color="black", linestyle="--", label="threshold (from validation)")
    ax.set(xlabel=name + "; higher = more out of scope", ylabel="Test queries")
    ax.legend()
    ax.grid(True, alpha=0.3)
    return _finish(fig, out_stem)


def plot_oos_vs_latency(table: pd.DataFrame, highlight: str | None = None, *,
                        out_stem: str | os.PathLike | None = None) -> Figure:
    """Each variant's OOS recall with the validation threshold against its latency; a red ring marks a
    variant that loses more OOS recall than in-scope accuracy relative to the baseline (``loses_more_oos``)."""
    table = _check_metric_table(table)
    recall = pd.to_numeric(table.get("threshold_oos_recall", pd.Series(np.nan, index=table.index)), errors="coerce")
    fig, ax = _axes((8, 4.5))
    if recall.isna().all():
        _not_applicable(ax)
        return _finish(fig, out_stem)
    colours = mpl.colormaps["tab10"].colors
    flagged = table.get("loses_more_oos", pd.Series(False, index=table.index)).fillna(False).astype(bool)
    for i, (variant, rows) in enumerate(table.groupby("variant", sort=False)):
        y = recall[rows.index] * 100
        bold = variant == highlight
        ax.scatter(rows["time_avg_ms"], y, s=120 if bold else 70, color=colours[i % len(colours)],
                   edgecolors="black" if bold else "none", linewidths=2.0, label=variant, zorder=3)
        ring = flagged[rows.index]
        if ring.any():
            ax.scatter(rows["time_avg_ms"][ring], y[ring], s=320, facecolors="none", edgecolors="red",
                       linewidths=1.5, zorder=2)
    if flagged.any():
        ax.scatter([], [], s=120, facecolors="none", edgecolors="red",
                   label="loses more OOS recall\nthan in-scope acc.")
    _finish_axes(ax, LATENCY_LABEL, "OOS recall with threshold (%)")
    return _finish(fig, out_stem)


def finished_latency_trials(trials: pd.DataFrame | None) -> pd.DataFrame | None:
    """The finished trials of an accuracy + latency search (:func:`kdlib.search.search_trials`), or None
    when the run has none to show."""
    if trials is None or "latency_ms" not in trials or "state" not in trials:
        return None
    done = trials[trials["state"] == "COMPLETE"]
    return None if done.empty else done


def plot_search(trials: pd.DataFrame | None, *, out_stem: str | os.PathLike | None = None) -> Figure | None:
    """Each finished search trial's validation accuracy against its latency, coloured by the student's depth,
    with the Pareto front joined; None without an accuracy + latency search, so a notebook shows no empty panel."""
    done = finished_latency_trials(trials)
    if done is None:
        return None
    fig, ax = _axes((8, 4.5))
    depth = done["student_layers"] if "student_layers" in done else pd.Series(0, index=done.index)
    points = ax.scatter(done["latency_ms"], done["accuracy"] * 100, c=depth, cmap="viridis", s=60, zorder=3)
    if "student_layers" in done:
        fig.colorbar(points, ax=ax, label="student layers", ticks=sorted(depth.unique()))  # whole layers only
    front = done[done["pareto"].astype(bool)].sort_values("latency_ms")
    ax.plot(front["latency_ms"], front["accuracy"] * 100, "--", color="black", label="Pareto front", zorder=2)
    ax.set(xlabel="student latency, one query (ms)", ylabel="validation accuracy (%)")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="lower right")
    return _finish(fig, out_stem)
