"""The Hugging Face model card (``README.md``) of a trained student or fine-tuned teacher.

Built with huggingface_hub's ``ModelCard`` / ``ModelCardData`` / ``EvalResult`` (as setfit does), so
the front matter is what the Hub expects: a ``model-index`` with the test results kdlib measured,
``base_model`` only when it is a real Hub id, ``datasets`` only when the data came from the Hub. The
body follows the reference's card: description, hyperparameters, the per-epoch table, versions.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
from huggingface_hub import EvalResult, ModelCard, ModelCardData

from kdlib.config import library_versions
from kdlib.results import atomic_write_text, to_markdown

# What people write for kdlib's metric keys (the model-index keeps the keys as metric types).
METRIC_NAMES = {
    "accuracy": "Accuracy",
    "in_scope_accuracy": "In-scope accuracy",
    "oos_recall": "OOS recall",
    "oos_precision": "OOS precision",
    "macro_f1": "Macro F1",
    "oos_auroc": "OOS AUROC",
    "threshold_accuracy": "Accuracy with OOS threshold",
    "threshold_oos_recall": "OOS recall with threshold",
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
    """Name the data actually loaded (a resolved ``data_source``): a Hub id, a CLINC150 release file
    (the embedded one included) or the user's own folder; never a dataset that was not used.
    Relative paths are taken from ``base_dir`` (default: the working directory), as when loading."""
    from kdlib.data import EMBEDDED_SOURCE

    if source == EMBEDDED_SOURCE:
        return CardDataset("CLINC150 plus (release file data_oos_plus.json, embedded in kdlib)", "clinc150", "plus")
    path = Path(base_dir or Path.cwd()) / Path(source).expanduser()
    match = CLINC_RELEASE.search(path.name)
    if match:
        config = match.group(1).removeprefix("oos_")
        return CardDataset(f"CLINC150 {config} (release file {path.name})", "clinc150", config)
    if path.is_dir():
        return CardDataset(f"{path.name} (local CSV/JSONL folder)", path.name)
    hub_id, _, config = source.removeprefix("hub:").partition(":")
    return CardDataset(hub_id, hub_id, config or None, hub_id)


def base_model_id(ref: str | os.PathLike | None) -> str | None:
    """The Hub id a model reference stands for, or None for local folders and in-code tiny models."""
    from kdlib.models import MINILM_ALIASES, TINY_REFS

    ref = None if ref is None else str(ref)
    if ref in MINILM_ALIASES:
        return MINILM_ALIASES[-1]
    if not ref or ref in TINY_REFS or Path(ref).expanduser().exists() or not HUB_ID.match(ref):
        return None
    return ref


def training_hyperparameters(args) -> dict:
    """The hyperparameters of a run as the Trainer used them (``DistillationTrainingArguments``)."""
    params = {
        "learning_rate": args.learning_rate,
        "train_batch_size": args.per_device_train_batch_size,
        "eval_batch_size": args.per_device_eval_batch_size,
        "seed": args.seed,
        "gradient_accumulation_steps": args.gradient_accumulation_steps,
        "optimizer": optimizer_description(args),
        "lr_scheduler_type": str(getattr(args.lr_scheduler_type, "value", args.lr_scheduler_type)),
        "lr_scheduler_warmup": args.warmup_steps,
        "num_epochs": args.num_train_epochs,
    }
    for knob in ("alpha", "temperature"):
        if hasattr(args, knob):
            params[knob] = getattr(args, knob)
    return params


def optimizer_description(args) -> str:
    """The optimiser as the Trainer used it (``TrainingArguments``), e.g. AdamW with weight decay."""
    optim = str(getattr(args.optim, "value", args.optim))
    name = {"adamw_torch": "AdamW", "adamw_torch_fused": "AdamW"}.get(optim, optim)
    return (f"{name} with betas=({args.adam_beta1},{args.adam_beta2}), epsilon={args.adam_epsilon} "
            f"and weight_decay={args.weight_decay}")


def build_model_card(
    *,
    model_name: str,
    dataset: CardDataset,
    description: str,
    hyperparameters: dict,
    epoch_table: pd.DataFrame,
    test_metrics: dict[str, float],
    base_model: str | None = None,
    teacher: str | None = None,
    license: str = "apache-2.0",
) -> ModelCard:
    """A ``ModelCard``: ``base_model`` is kept only when it looks like a Hub id, ``teacher`` is linked
    only when it is one (a local folder is named as text)."""
    base_model = base_model if base_model and HUB_ID.match(base_model) else None
    eval_results = [
        EvalResult(
            task_type="text-classification", task_name="Text Classification", dataset_type=dataset.type,
            dataset_name=dataset.name, dataset_config=dataset.config, dataset_split="test", metric_type=key,
            metric_value=round(float(value), 4), metric_name=METRIC_NAMES.get(key, key),
        )
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
        data,
        template_str=TEMPLATE,
        model_name=model_name,
        origin=origin,
        dataset_text=dataset.name + (f" (config {dataset.config})" if dataset.config and dataset.hub_id else ""),
        results="\n".join(f"- {METRIC_NAMES.get(k, k)}: {v:.4f}" for k, v in test_metrics.items()),
        description=description.strip(),
        hyperparameters="\n".join(f"- {key}: {value}" for key, value in hyperparameters.items()),
        epoch_table=to_markdown(epoch_table),
        versions="\n".join(f"- {name} {version}" for name, version in library_versions().items()),
    )


def write_model_card(out_dir: str | os.PathLike, **card) -> Path:
    """Write ``README.md`` (the model card) into a saved model directory, atomically."""
    return atomic_write_text(Path(out_dir) / "README.md", str(build_model_card(**card)))
