"""Which variant to deploy: one stated rule, read from a comparison table.

The rule (:data:`RULE`): take the **Pareto front** of each variant's accuracy with its validation OOS
threshold (``threshold_accuracy``; plain ``accuracy`` when the data has no OOS label) against its median
single-query latency (``time_p50_ms``), and recommend the **fastest variant on that front within**
``within`` (one accuracy point) **of the front's best**, so a variant several times faster is not lost to
one a few test queries more accurate. Notebook 03's figure and closing sentence and README's marked row
all come from :func:`recommendation`, so they cannot disagree.
"""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd

WITHIN = 0.01  # one accuracy point, as a fraction
LATENCY = "time_p50_ms"
RULE = (
    "the fastest variant on the Pareto front of accuracy with the OOS threshold against p50 latency, "
    "within {points:g} point of the best accuracy on that front"
)


def pareto_front(table: pd.DataFrame, accuracy: str = "accuracy", latency: str = "time_avg_ms") -> pd.DataFrame:
    """Rows no other row beats (as fast or faster and at least as accurate, strictly better in one), sorted by
    latency; exact duplicates both stay. Compare rows of one run only: latencies of different runs are not
    comparable."""
    missing = [c for c in (accuracy, latency) if c not in table.columns]
    if missing:
        raise ValueError(f"pareto_front needs columns {missing} (a comparison_table()).")
    rows = table.dropna(subset=[accuracy, latency])
    time = rows[latency].astype(float).to_numpy()
    acc = rows[accuracy].astype(float).to_numpy()
    # [i, j]: row j is no slower and no less accurate than row i, and better in one of them
    no_worse = (time[None, :] <= time[:, None]) & (acc[None, :] >= acc[:, None])
    better = (time[None, :] < time[:, None]) | (acc[None, :] > acc[:, None])
    front = rows[~(no_worse & better).any(axis=1)]
    return front.sort_values([latency, accuracy], ascending=[True, False], kind="stable")


def fastest_within(front: pd.DataFrame, accuracy: str, latency: str, within: float = WITHIN) -> pd.Series:
    """The row of a Pareto front the rule keeps: the fastest whose ``accuracy`` is within ``within`` of the
    front's best (the earlier row on a tie). The comparison table, the search and its narration all pick so."""
    close = front[front[accuracy] >= front[accuracy].max() - within - 1e-12]  # 1e-12: one point exactly counts
    return close.sort_values(latency, kind="stable").iloc[0]


@dataclass(frozen=True)
class Recommendation:
    """The variant the rule picks in one run, and the columns and tolerance it was picked on."""

    run: str
    variant: str
    accuracy: str  # the column the rule read: threshold_accuracy, or accuracy without an OOS label
    latency: str
    within: float
    best: str  # the most accurate variant on the front
    front: tuple[str, ...]  # the front's variants, fastest first

    @property
    def rule(self) -> str:
        """The rule in words, as the notebooks and README state it."""
        text = RULE.format(points=100 * self.within)
        return text if self.accuracy == "threshold_accuracy" else text.replace(" with the OOS threshold", "")


def recommendation(table: pd.DataFrame, within: float = WITHIN, *, run: str | None = None) -> Recommendation:
    """The rule of this module applied to one ``run`` (default: the first) of a
    :func:`kdlib.report.comparison_table`. It reads ``threshold_accuracy`` when every variant of the run has
    one, else ``accuracy``."""
    if not 0 <= within < 1:
        raise ValueError(f"within = {within!r}: give the tolerance as a fraction in [0, 1) (0.01 is one point).")
    missing = [c for c in ("variant", "accuracy", LATENCY) if c not in table.columns]
    if missing:
        raise ValueError(f"recommendation needs columns {missing}; pass a kdlib.report.comparison_table().")
    runs = table["run"].astype(str) if "run" in table.columns else pd.Series("", index=table.index)
    chosen_run = runs.iloc[0] if run is None and len(table) else run
    rows = table[runs == chosen_run]
    if rows.empty:
        raise ValueError(f"run={run!r} is not in the table; it holds the runs {sorted(set(runs))}.")
    accuracy = "accuracy"
    if "threshold_accuracy" in rows and pd.to_numeric(rows["threshold_accuracy"], errors="coerce").notna().all():
        accuracy = "threshold_accuracy"
    numeric = rows.assign(**{c: pd.to_numeric(rows[c], errors="coerce") for c in (accuracy, LATENCY)})
    front = pareto_front(numeric, accuracy, LATENCY)
    if front.empty:
        raise ValueError(f"run {chosen_run!r}: no variant has both {accuracy} and {LATENCY}.")
    best = front.loc[front[accuracy].idxmax()]
    pick = fastest_within(front, accuracy, LATENCY, within)
    return Recommendation(
        run=str(chosen_run), variant=str(pick["variant"]), accuracy=accuracy, latency=LATENCY,
        within=within, best=str(best["variant"]), front=tuple(front["variant"].astype(str)),
    )


def recommend_variant(table: pd.DataFrame, within: float = WITHIN, *, run: str | None = None) -> str:
    """The name of the variant :func:`recommendation` picks (the rule is :data:`RULE`)."""
    return recommendation(table, within, run=run).variant
