"""Reports of a run: its result records (``<results_dir>/<run>/<variant>.json``, written atomically), the
comparison table built from them, and the model card, built with huggingface_hub's ``ModelCard`` so that its
front matter is what the Hub expects."""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
from huggingface_hub import EvalResult, ModelCard, ModelCardData

from kdlib.config import SLUG, SLUG_RULE
from kdlib.data import EMBEDDED_SOURCE, resolve_data_source
from kdlib.io import atomic_write_text, project_root
from kdlib.oos import NOT_APPLICABLE, OOS_KEYS
from kdlib.session import library_versions

# Columns of the comparison table, in order (comparison_table defines the ratios).
TABLE_COLUMNS = [
    "run", "variant", "accuracy", "in_scope_accuracy", "oos_recall", "oos_precision", "oos_score", *OOS_KEYS,
    "loses_more_oos", "size_mb", "num_parameters", "time_avg_ms", "time_std_ms", "time_p50_ms", "time_p95_ms",
    "throughput_qps", "speedup_vs_baseline", "throughput_vs_baseline", "size_ratio_vs_baseline", "threads", "test_rows",
]


def _check_name(value: str, what: str) -> str:
    """``value``, refused unless it is a plain name (the run parameters' rule): it becomes a file name."""
    if not SLUG.match(value or ""):
        raise ValueError(f"{what} {value!r} {SLUG_RULE} (it becomes a file name).")
    return value


def _json_safe(value):
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    return None if isinstance(value, float) and not math.isfinite(value) else value


def portable_ref(ref: str | None) -> str | None:
    """A model path inside the project, relative to it (records are committed and shared)."""
    if not ref or not os.path.isabs(ref):
        return ref
    path, root = Path(ref).resolve(), project_root()
    return str(path.relative_to(root)) if path.is_relative_to(root) else ref


def save_record(results_dir: str | os.PathLike, run: str, variant: str, metrics: dict, **identity: str | None) -> Path:
    """Save one variant's metrics as ``<run>/<variant>.json``; ``identity`` (``model_ref``, ``fingerprint``,
    the weight digests) names the model they belong to, so :func:`check_lineage` can refuse mixed runs."""
    record = {**_json_safe(metrics), **identity, "run": run, "variant": variant}
    if "model_ref" in record:
        record["model_ref"] = portable_ref(record["model_ref"])
    text = json.dumps(record, indent=2, sort_keys=True, default=str)
    path = Path(results_dir) / _check_name(run, "Run name") / f"{_check_name(variant, 'Variant name')}.json"
    return atomic_write_text(path, text + "\n")


def save_benchmark(results_dir: str | os.PathLike, run: str, result: Mapping[str, dict],
                   **identity: str | None) -> list[Path]:
    """Save every ``{variant: metrics}`` entry of a benchmark result, as :func:`save_record` does."""
    return [save_record(results_dir, run, variant, metrics, **identity) for variant, metrics in result.items()]


def load_run(results_dir: str | os.PathLike, run: str) -> list[dict]:
    """All records of one run, sorted by variant name; a clear error when the run has none."""
    folder = Path(results_dir) / _check_name(run, "Run name")
    files = sorted(folder.glob("*.json"), key=lambda p: p.stem)
    if not files:
        raise FileNotFoundError(f"No result records in {folder}. Run notebooks 01 and 02 with run_name={run!r} first.")
    records = []
    for file in files:
        try:
            records.append(json.loads(file.read_text(encoding="utf-8")))
        except json.JSONDecodeError as err:
            raise ValueError(f"{file} is not a valid result record ({err}).") from None
    return records


def load_runs(results_dir: str | os.PathLike, runs: Iterable[str]) -> list[dict]:
    """The records of several runs, run by run, for one table."""
    return [record for run in runs for record in load_run(results_dir, run)]


def check_lineage(records: list[dict], baseline: str = "teacher") -> None:
    """Refuse records of one run that come from different models: its students must share one ``fingerprint``
    and have been distilled from its baseline (``teacher_weights_digest`` equal to its ``weights_digest``)."""
    for run in dict.fromkeys(r.get("run") for r in records):
        own = [r for r in records if r.get("run") == run]
        base = next((r for r in own if r.get("variant") == baseline), None)
        students = [r for r in own if r.get("variant") != baseline]
        problems = []
        if len(fingerprints := {r.get("fingerprint") for r in students}) > 1 or None in fingerprints:
            listed = ", ".join(f"{r.get('variant')} ({r.get('fingerprint')})" for r in students)
            problems.append(f"its student records come from different trainings: {listed}")
        if base is not None and students:
            teacher = base.get("weights_digest")
            stale = [r.get("variant") for r in students if r.get("teacher_weights_digest") != teacher]
            if stale or teacher is None:
                problems.append(f"{', '.join(stale) or 'the students'} were not distilled from this {baseline}")
        if problems:
            raise ValueError(
                f"Run {run!r} mixes results of different models: " + "; ".join(problems) + ". Rerun notebook 02 "
                f"with the variants you want to compare, or delete the stale records under results/{run}/."
            )


def comparison_table(records: list[dict], baseline: str = "teacher") -> pd.DataFrame:
    """One row per (run, variant) with the :data:`TABLE_COLUMNS`.

    ``speedup_vs_baseline`` = baseline mean latency / variant mean latency,
    ``throughput_vs_baseline`` = variant batch throughput / baseline's and
    ``size_ratio_vs_baseline`` = variant size / baseline size, all within the same run, since
    speed is only comparable between figures measured in one run on one machine.
    ``loses_more_oos``: the variant's OOS recall with threshold fell further below the baseline's
    than its in-scope accuracy with threshold did (None without OOS figures).
    """
    rows = [{**{c: r.get(c) for c in TABLE_COLUMNS}, "threads": (r.get("env") or {}).get("threads")} for r in records]
    table = pd.DataFrame(rows, columns=TABLE_COLUMNS)
    numeric = [c for c in TABLE_COLUMNS if c not in ("run", "variant", "oos_score", "loses_more_oos")]
    table[numeric] = table[numeric].apply(pd.to_numeric, errors="coerce").astype(float)
    table["loses_more_oos"] = table["loses_more_oos"].astype(object)
    for _run, group in table.groupby("run", sort=False):
        base = group[group["variant"] == baseline]
        if base.empty:
            continue
        first = base.iloc[0]
        table.loc[group.index, "speedup_vs_baseline"] = first["time_avg_ms"] / group["time_avg_ms"]
        table.loc[group.index, "throughput_vs_baseline"] = group["throughput_qps"] / first["throughput_qps"]
        table.loc[group.index, "size_ratio_vs_baseline"] = group["size_mb"] / first["size_mb"]
        recall_lost = first["threshold_oos_recall"] - group["threshold_oos_recall"]
        in_scope_lost = first["threshold_in_scope_accuracy"] - group["threshold_in_scope_accuracy"]
        known = recall_lost.notna() & in_scope_lost.notna() & (group["variant"] != baseline)
        for i in known[known].index:
            table.at[i, "loses_more_oos"] = bool(recall_lost[i] > in_scope_lost[i])
    # The baseline first in each run, then the other variants in record order.
    run_order = {run: i for i, run in enumerate(dict.fromkeys(table["run"]))}
    sort_key = table["run"].map(run_order) * 2 + (table["variant"] != baseline)
    return table.loc[sort_key.sort_values(kind="stable").index].reset_index(drop=True)


def oos_table(table: pd.DataFrame) -> pd.DataFrame:
    """:func:`comparison_table`'s OOS columns: "n/a" without an OOS label, threshold "none" if none fit the rule."""
    columns = ["run", "variant", "in_scope_accuracy", "oos_recall", "oos_precision", "oos_score", *OOS_KEYS,
               "loses_more_oos"]
    view = table[columns].astype(object)
    view.loc[view["oos_auroc"].notna() & view["threshold"].isna(), "threshold"] = "none"
    return view.where(view.notna(), NOT_APPLICABLE)


def to_markdown(table: pd.DataFrame, floatfmt: str = ".4g") -> str:
    """A GitHub-flavoured Markdown table (no extra dependency)."""

    def cell(value) -> str:
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return ""
        return format(value, floatfmt) if isinstance(value, float) else str(value)

    header = "| " + " | ".join(map(str, table.columns)) + " |"
    rule = "|" + "|".join("---" for _ in table.columns) + "|"
    body = ["| " + " | ".join(cell(v) for v in row) + " |" for row in table.itertuples(index=False)]
    return "\n".join([header, rule, *body]) + "\n"


def write_table(table: pd.DataFrame, path_stem: str | os.PathLike) -> tuple[Path, Path]:
    """Write ``<stem>.csv`` and ``<stem>.md`` atomically."""
    stem = Path(path_stem)
    return (atomic_write_text(stem.parent / f"{stem.name}.csv", table.to_csv(index=False)),
            atomic_write_text(stem.parent / f"{stem.name}.md", to_markdown(table)))


# Quality figures are deterministic for a fixed model and data; speed figures vary (nbval ignores them).
QUALITY_COLUMNS = ["accuracy", "in_scope_accuracy", "oos_recall", "oos_precision", "macro_f1", *OOS_KEYS, "size_mb",
                   "num_parameters"]
SPEED_COLUMNS = ["time_avg_ms", "time_std_ms", "time_p50_ms", "time_p95_ms", "time_p99_ms", "throughput_qps", "threads",
                 "cpu", "torch_version"]


def summary_frame(result: Mapping[str, dict], kind: str = "quality") -> pd.DataFrame:
    """A one-row-per-variant view of benchmark results (or records) for display: ``kind="quality"``
    (:data:`QUALITY_COLUMNS`) or ``"speed"`` (:data:`SPEED_COLUMNS`)."""
    columns = {"quality": QUALITY_COLUMNS, "speed": SPEED_COLUMNS}.get(kind)
    if columns is None:
        raise ValueError(f"kind must be 'quality' or 'speed', got {kind!r}.")
    rows = {}
    for name, metrics in result.items():
        flat = {**(metrics.get("env") or {}), **metrics}
        if kind == "quality" and flat.get("oos_score") is None:  # no OOS label: not applicable
            flat.update(dict.fromkeys(("in_scope_accuracy", "oos_recall", "oos_precision", *OOS_KEYS), NOT_APPLICABLE))
        rows[name] = {column: flat.get(column) for column in columns}
    return pd.DataFrame.from_dict(rows, orient="index", columns=columns)


# What people write for kdlib's metric keys (the model-index keeps the keys as metric types).
METRIC_NAMES = {
    "accuracy": "Accuracy", "in_scope_accuracy": "In-scope accuracy", "oos_recall": "OOS recall",
    "oos_precision": "OOS precision", "macro_f1": "Macro F1", "oos_auroc": "OOS AUROC",
    "threshold_accuracy": "Accuracy with OOS threshold", "threshold_oos_recall": "OOS recall with threshold",
}
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
CLINC_RELEASE = re.compile(r"data_(oos_plus|full|small|imbalanced)\.json(\.gz)?$")

TEMPLATE = """---
{{ card_data }}
---

# {{ model_name }}

This model is {{ origin }}, trained on {{ dataset_text }}. It achieves the following results on the test set:

{{ results }}

## Model description

{{ description }}

## Training procedure

### Training hyperparameters

The following hyperparameters were used during training:

{{ hyperparameters }}

### Training results

{{ epoch_table }}
### Framework versions

{{ versions }}
"""


@dataclass(frozen=True)
class CardDataset:
    """How a card names the data a model was trained on: ``hub_id`` only for Hub datasets."""

    name: str
    type: str
    config: str | None = None
    hub_id: str | None = None


def card_dataset(source: str, *, base_dir: str | os.PathLike | None = None) -> CardDataset:
    """Name the data actually loaded (a resolved ``data_source``): a Hub id, a CLINC150 release file or the
    user's own folder. Relative paths are taken from ``base_dir`` (default: the working directory)."""
    if source == EMBEDDED_SOURCE:
        return CardDataset("CLINC150 plus (release file data_oos_plus.json, embedded in kdlib)", "clinc150", "plus")
    path = Path(base_dir or Path.cwd()) / Path(source).expanduser()
    if match := CLINC_RELEASE.search(path.name):
        config = match.group(1).removeprefix("oos_")
        return CardDataset(f"CLINC150 {config} (release file {path.name})", "clinc150", config)
    if path.is_dir():
        return CardDataset(f"{path.name} (local CSV/JSONL folder)", path.name)
    hub_id, _, config = source.removeprefix("hub:").partition(":")
    return CardDataset(hub_id, hub_id, config or None, hub_id)


def base_model_id(ref: str | os.PathLike | None) -> str | None:
    """The Hub id a model reference stands for, or None for local folders and in-code tiny models."""
    # models loads torch, and notebook 03 imports report before its parameter check
    from kdlib.models import MINILM_ALIASES, MPNET_ALIASES, TINY_REFS

    ref = None if ref is None else str(ref)
    if ref in MINILM_ALIASES or ref in MPNET_ALIASES:
        return (MINILM_ALIASES if ref in MINILM_ALIASES else MPNET_ALIASES)[-1]
    if not ref or ref in TINY_REFS or Path(ref).expanduser().exists() or not HUB_ID.match(ref):
        return None
    return ref


def training_hyperparameters(result) -> dict:
    """A :class:`kdlib.train.TrainResult`'s hyperparameters as a model card lists them, with alpha and temperature."""
    # transformers.modelcard imports torch, which the records and tables of this module do not need
    from transformers.modelcard import extract_hyperparameters_from_trainer

    args = result.trainer.args
    # the library's optimizer line leaves out weight_decay, which kdlib's training arguments set
    return {**extract_hyperparameters_from_trainer(result.trainer), "optimizer": optimizer_description(args),
            "alpha": args.alpha, "temperature": args.temperature}


def optimizer_description(args) -> str:
    """The optimiser as the Trainer used it (``TrainingArguments``), e.g. AdamW with weight decay."""
    optim = str(getattr(args.optim, "value", args.optim))
    name = {"adamw_torch": "AdamW", "adamw_torch_fused": "AdamW"}.get(optim, optim)
    return (f"{name} with betas=({args.adam_beta1},{args.adam_beta2}), epsilon={args.adam_epsilon} "
            f"and weight_decay={args.weight_decay}")


@dataclass(frozen=True)
class CardTraining:
    """How a model was trained, as its card shows it: hyperparameter lines and the per-epoch table."""

    hyperparameters: dict
    epoch_table: pd.DataFrame


def build_model_card(*, model_name: str, dataset: CardDataset, description: str, training: CardTraining,
                     test_metrics: dict[str, float], base_model: str | None = None, teacher: str | None = None,
                     license: str = "apache-2.0") -> ModelCard:
    """A ``ModelCard``: ``base_model`` is kept only when it looks like a Hub id, ``teacher`` is linked
    only when it is one (a local folder is named as text)."""
    base_model = base_model if base_model and HUB_ID.match(base_model) else None
    eval_results = [
        EvalResult(task_type="text-classification", task_name="Text Classification", dataset_type=dataset.type,
                   dataset_name=dataset.name, dataset_config=dataset.config, dataset_split="test", metric_type=key,
                   metric_value=round(float(value), 4), metric_name=METRIC_NAMES.get(key, key))
        for key, value in test_metrics.items()
    ]
    data = ModelCardData(
        license=license, library_name="transformers", base_model=base_model, model_name=model_name,
        datasets=[dataset.hub_id] if dataset.hub_id else None, metrics=["accuracy"],
        pipeline_tag="text-classification", eval_results=eval_results,
        tags=["generated_from_trainer", "kdlib", *(["knowledge-distillation"] if teacher else [])],
    )
    if teacher:
        teacher_text = f"[{teacher}](https://huggingface.co/{teacher})" if HUB_ID.match(teacher) else f"`{teacher}`"
        origin = f"distilled from {teacher_text}" + (f", starting from {base_model}" if base_model else "")
    else:
        origin = f"fine-tuned from {base_model}" if base_model else "a fine-tuned text classifier"
    return ModelCard.from_template(
        data, template_str=TEMPLATE, model_name=model_name, origin=origin,
        dataset_text=dataset.name + (f" (config {dataset.config})" if dataset.config and dataset.hub_id else ""),
        results="\n".join(f"- {METRIC_NAMES.get(k, k)}: {v:.4f}" for k, v in test_metrics.items()),
        description=description.strip(), epoch_table=to_markdown(training.epoch_table),
        hyperparameters="\n".join(f"- {key}: {value}" for key, value in training.hyperparameters.items()),
        versions="\n".join(f"- {name} {version}" for name, version in library_versions().items()),
    )


def write_model_card(out_dir: str | os.PathLike, *, hyperparameters: dict, epoch_table: pd.DataFrame, **card) -> Path:
    """Write the model card to ``<out_dir>/README.md`` atomically; ``card``: :func:`build_model_card`'s keywords."""
    built = build_model_card(training=CardTraining(hyperparameters, epoch_table), **card)
    return atomic_write_text(Path(out_dir) / "README.md", str(built))


@dataclass(frozen=True)
class CardFile:
    """A written model card; a notebook shows its body (without the YAML front matter) as Markdown."""

    path: Path

    def _repr_markdown_(self) -> str:
        return self.path.read_text(encoding="utf-8").split("---", 2)[2]

    def __repr__(self) -> str:  # plain-text views name the card without this machine's folders
        path = Path(self.path).resolve()
        shown = path.relative_to(project_root()) if path.is_relative_to(project_root()) else Path(path.name)
        return f"model card: {shown.as_posix()}"


# The test results a student's card lists, in this order, when its record has them.
CARD_METRICS = ("accuracy", "in_scope_accuracy", "oos_recall", "oos_auroc", "threshold_accuracy",
                "threshold_oos_recall")


def write_student_card(config, distilled, record: dict, *, teacher: str | os.PathLike, out_dir: str | os.PathLike,
                       base_dir: str | os.PathLike | None = None) -> CardFile:
    """Notebook 02's model card of the distilled student (``distilled``, a :class:`kdlib.train.TrainResult`) with
    its benchmark ``record``'s test results; relative data paths are taken from ``base_dir`` (default: the project)."""
    # models and prune load torch, and notebook 03 imports report before its parameter check
    from kdlib.models import num_layers
    from kdlib.prune import is_pruning

    start = config.student if config.student_init != "teacher_layers" else (config.teacher_model or config.teacher)
    args = distilled.trainer.args
    pruning = (f" Then structurally pruned to {config.heads_keep:g} of each layer's attention heads and "
               f"{config.ffn_keep:g} of its FFN neurons and distilled again for {config.prune_epochs} epochs (the "
               "hyperparameters and table below are this recovery's); kdlib.load_classifier restores its pruned "
               "shapes.") if is_pruning(config) else ""
    return CardFile(write_model_card(
        out_dir, model_name=f"{config.run_name}-distilled-student",
        dataset=card_dataset(resolve_data_source(config.data_source), base_dir=base_dir or project_root()),
        base_model=base_model_id(start), teacher=portable_ref(str(teacher)),
        description=f"A {config.student_init} student with {num_layers(distilled.model)} layers, distilled with "
                    f"alpha={args.alpha}, T={args.temperature}." + pruning,
        hyperparameters=training_hyperparameters(distilled), epoch_table=distilled.epoch_table,
        test_metrics={key: record[key] for key in CARD_METRICS if record.get(key) is not None},
    ))
