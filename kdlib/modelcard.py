"""The Hugging Face model card (``README.md``) of a trained student or fine-tuned teacher.

It follows the card the reference's distilled model shipped with (YAML front matter, description,
training hyperparameters, the per-epoch table, framework versions) and fills the ``model-index``
with the test results kdlib measured, which the reference card left empty.
"""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd
import yaml

from kdlib.results import atomic_write_text, to_markdown


def model_index(
    model_name: str, dataset_name: str, dataset_config: str | None, metrics: dict[str, float]
) -> list:
    """The ``model-index`` block: one text-classification result with the measured metrics."""
    dataset = {"name": dataset_name, "type": dataset_name, "split": "test"}
    if dataset_config:
        dataset["config"] = dataset_config
    return [
        {
            "name": model_name,
            "results": [
                {
                    "task": {"type": "text-classification", "name": "Text Classification"},
                    "dataset": dataset,
                    "metrics": [
                        {"type": key, "value": round(float(value), 4), "name": key.replace("_", " ").title()}
                        for key, value in metrics.items()
                    ],
                }
            ],
        }
    ]


def framework_versions() -> dict[str, str]:
    import datasets
    import tokenizers
    import torch
    import transformers

    return {
        "Transformers": transformers.__version__,
        "Pytorch": torch.__version__,
        "Datasets": datasets.__version__,
        "Tokenizers": tokenizers.__version__,
    }


def render_model_card(
    *,
    model_name: str,
    base_model: str,
    description: str,
    hyperparameters: dict,
    epoch_table: pd.DataFrame,
    test_metrics: dict[str, float],
    dataset_name: str = "clinc_oos",
    dataset_config: str | None = "plus",
    teacher: str | None = None,
    license: str = "apache-2.0",
) -> str:
    """The card's text: YAML front matter, then Markdown sections."""
    front = {
        "license": license,
        "base_model": base_model,
        "tags": ["generated_from_trainer", "knowledge-distillation", "kdlib"]
        if teacher
        else ["generated_from_trainer", "kdlib"],
        "datasets": [dataset_name],
        "metrics": ["accuracy"],
        "pipeline_tag": "text-classification",
        "model-index": model_index(model_name, dataset_name, dataset_config, test_metrics),
    }
    results = "\n".join(
        f"- {key.replace('_', ' ').title()}: {value:.4f}" for key, value in test_metrics.items()
    )
    params = "\n".join(f"- {key}: {value}" for key, value in hyperparameters.items())
    versions = "\n".join(f"- {key} {value}" for key, value in framework_versions().items())
    origin = f"distilled from [{teacher}]({teacher}) " if teacher else ""
    return (
        "---\n"
        + yaml.safe_dump(front, sort_keys=False, allow_unicode=True)
        + "---\n\n"
        + f"# {model_name}\n\n"
        + f"This model is {origin}starting from {base_model}, on the {dataset_name} dataset"
        + (f" ({dataset_config})" if dataset_config else "")
        + ". It achieves the following results on the test set:\n"
        + results
        + "\n\n## Model description\n\n"
        + description.strip()
        + "\n\n## Training procedure\n\n### Training hyperparameters\n\nThe following hyperparameters were used "
        + "during training:\n"
        + params
        + "\n\n### Training results\n\n"
        + to_markdown(epoch_table)
        + "\n### Framework versions\n\n"
        + versions
        + "\n"
    )


def write_model_card(out_dir: str | os.PathLike, **card) -> Path:
    """Write ``README.md`` (the model card) into a saved model directory, atomically."""
    return atomic_write_text(Path(out_dir) / "README.md", render_model_card(**card))


def read_front_matter(path: str | os.PathLike) -> dict:
    """Parse a card's YAML front matter (used by tests and by anyone checking a saved card)."""
    text = Path(path).read_text(encoding="utf-8")
    if not text.startswith("---\n"):
        raise ValueError(f"{path} has no YAML front matter.")
    return yaml.safe_load(text.split("---\n", 2)[1])
