"""The model card: Hugging Face front matter with a filled model-index, and the per-epoch table."""

from __future__ import annotations

import pandas as pd
import pytest

from kdlib.distill import EPOCH_TABLE_COLUMNS
from kdlib.modelcard import read_front_matter, render_model_card, write_model_card

EPOCHS = pd.DataFrame(
    [["No log", 1.0, 318, 3.2, 0.75], [1.234, 2.0, 636, 1.1, 0.9]], columns=EPOCH_TABLE_COLUMNS
)
CARD = dict(
    model_name="minilm-distilled-student",
    base_model="all-MiniLM-L6-v2",
    teacher="outputs/models/minilm/teacher",
    description="A 3-layer student.",
    hyperparameters={"learning_rate": 2e-05, "train_batch_size": 48, "seed": 42, "alpha": 0.5},
    epoch_table=EPOCHS,
    test_metrics={"accuracy": 0.87654, "oos_recall": 0.5},
)


def test_front_matter_has_the_hub_fields_and_measured_results(tmp_path):
    path = write_model_card(tmp_path, **CARD)
    front = read_front_matter(path)
    assert front["license"] == "apache-2.0" and front["base_model"] == "all-MiniLM-L6-v2"
    assert front["pipeline_tag"] == "text-classification" and front["datasets"] == ["clinc_oos"]
    assert "knowledge-distillation" in front["tags"] and front["metrics"] == ["accuracy"]
    result = front["model-index"][0]["results"][0]
    assert front["model-index"][0]["name"] == "minilm-distilled-student"
    assert result["dataset"] == {"name": "clinc_oos", "type": "clinc_oos", "split": "test", "config": "plus"}
    assert {m["type"]: m["value"] for m in result["metrics"]} == {"accuracy": 0.8765, "oos_recall": 0.5}


def test_body_has_hyperparameters_epoch_table_and_versions():
    text = render_model_card(**CARD)
    body = text.split("---\n", 2)[2]
    assert "- learning_rate: 2e-05" in body and "- train_batch_size: 48" in body
    assert "| Training Loss | Epoch | Step | Validation Loss | Accuracy |" in body
    assert "| No log | 1 | 318 | 3.2 | 0.75 |" in body
    assert "- Transformers " in body and "- Pytorch " in body
    assert "distilled from [outputs/models/minilm/teacher]" in body


def test_a_card_without_teacher_is_a_fine_tuning_card():
    front = read_front_matter_text(render_model_card(**{**CARD, "teacher": None}))
    assert "knowledge-distillation" not in front["tags"]


def read_front_matter_text(text: str) -> dict:
    import yaml

    return yaml.safe_load(text.split("---\n", 2)[1])


def test_reading_a_file_without_front_matter_is_a_clear_error(tmp_path):
    path = tmp_path / "README.md"
    path.write_text("# no front matter\n")
    with pytest.raises(ValueError, match="no YAML front matter"):
        read_front_matter(path)


def test_writing_replaces_the_card_atomically(tmp_path, monkeypatch):
    path = write_model_card(tmp_path, **CARD)
    before = path.read_text()

    def broken_dump(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr("kdlib.modelcard.render_model_card", broken_dump)
    with pytest.raises(RuntimeError):
        write_model_card(tmp_path, **CARD)
    assert path.read_text() == before
    assert [p.name for p in tmp_path.iterdir()] == ["README.md"]
