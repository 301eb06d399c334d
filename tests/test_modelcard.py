"""The model card: built with huggingface_hub, a model-index of the measured results, the data named as
what was loaded, base_model only when it is a Hub id, and the per-epoch table."""

from __future__ import annotations

import pandas as pd
import pytest
from huggingface_hub import ModelCard
from transformers import TrainingArguments

from kdlib.data import EMBEDDED_SOURCE
from kdlib.report import (
    CardDataset,
    CardTraining,
    build_model_card,
    card_dataset,
    optimizer_description,
    write_model_card,
)
from kdlib.train import EPOCH_TABLE_COLUMNS

EPOCHS = pd.DataFrame(
    [["No log", 1.0, 318, 3.2, 0.75], [1.234, 2.0, 636, 1.1, 0.9]], columns=EPOCH_TABLE_COLUMNS
)
CARD = dict(
    model_name="minilm-distilled-student",
    dataset=CardDataset("clinc_oos", "clinc_oos", "plus", "clinc_oos"),
    base_model="sentence-transformers/all-MiniLM-L6-v2",
    teacher="transformersbook/bert-base-uncased-finetuned-clinc",
    description="A 3-layer student.",
    hyperparameters={"learning_rate": 2e-05, "train_batch_size": 48, "seed": 42, "alpha": 0.5},
    epoch_table=EPOCHS,
    test_metrics={"accuracy": 0.87654, "oos_recall": 0.5},
)


def built(**changes) -> ModelCard:
    """:func:`build_model_card` of ``CARD`` (with ``changes``): its hyperparameters and epochs as a CardTraining."""
    card = {**CARD, **changes}
    training = CardTraining(card.pop("hyperparameters"), card.pop("epoch_table"))
    return build_model_card(training=training, **card)


def reparsed(card: ModelCard) -> ModelCard:
    """huggingface_hub's own parser (model-index included) on the written text: it raises on a bad card."""
    return ModelCard(str(card), ignore_metadata_errors=False)


def test_front_matter_has_the_hub_fields_and_measured_results(tmp_path):
    path = write_model_card(tmp_path, **CARD)
    data = ModelCard.load(path, ignore_metadata_errors=False).data
    assert data.license == "apache-2.0" and data.base_model == "sentence-transformers/all-MiniLM-L6-v2"
    assert data.pipeline_tag == "text-classification" and data.datasets == ["clinc_oos"]
    assert "knowledge-distillation" in data.tags
    results = {r.metric_type: (r.metric_value, r.metric_name) for r in data.eval_results}
    assert results == {"accuracy": (0.8765, "Accuracy"), "oos_recall": (0.5, "OOS recall")}
    assert {(r.dataset_type, r.dataset_config, r.dataset_split) for r in data.eval_results} == {
        ("clinc_oos", "plus", "test")
    }


def test_body_has_hyperparameters_epoch_table_versions_and_a_working_link():
    body = built().text
    assert "- learning_rate: 2e-05" in body and "- train_batch_size: 48" in body
    assert "| Training Loss | Epoch | Step | Validation Loss | Accuracy |" in body
    assert "| No log | 1 | 318 | 3.2 | 0.75 |" in body
    assert "- transformers " in body and "- torch " in body
    link = "[transformersbook/bert-base-uncased-finetuned-clinc](https://huggingface.co/transformersbook/"
    assert link in body and "Oos Recall" not in body and "- OOS recall: 0.5000" in body


def test_a_local_teacher_and_base_are_named_not_linked_or_claimed():
    local = {"teacher": "outputs/models/minilm/teacher", "base_model": "teacher layers"}
    card = reparsed(built(**local))
    assert card.data.base_model is None
    assert "`outputs/models/minilm/teacher`" in card.text and "](outputs" not in card.text


def test_a_csv_folder_run_names_that_folder_and_no_hub_dataset(tmp_path):
    folder = tmp_path / "bank_intents"
    folder.mkdir()
    dataset = card_dataset(str(folder))
    card = reparsed(built(dataset=dataset, teacher=str(tmp_path / "teacher")))
    assert card.data.datasets is None
    assert {r.dataset_name for r in card.data.eval_results} == {"bank_intents (local CSV/JSONL folder)"}
    assert "trained on bank_intents (local CSV/JSONL folder)" in card.text
    assert "clinc" not in str(card).lower()  # never a dataset that was not used


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        (EMBEDDED_SOURCE, ("clinc150", "plus", None)),
        ("../shared/data/clinc150/data_full.json", ("clinc150", "full", None)),
        ("clinc_oos:plus", ("clinc_oos", "plus", "clinc_oos")),
    ],
)
def test_card_dataset_names_the_source_used(source, expected):
    dataset = card_dataset(source)
    assert (dataset.type, dataset.config, dataset.hub_id) == expected


def test_a_card_without_teacher_is_a_fine_tuning_card():
    card = built(teacher=None)
    assert "knowledge-distillation" not in card.data.tags
    assert "fine-tuned from sentence-transformers/all-MiniLM-L6-v2" in card.text


def test_the_optimizer_is_described_as_used(tmp_path):
    args = TrainingArguments(output_dir=str(tmp_path), weight_decay=0.01, report_to="none")
    assert optimizer_description(args).startswith("AdamW with betas=(0.9,0.999), epsilon=1e-08")
    assert "weight_decay=0.01" in optimizer_description(args)


def test_writing_replaces_the_card_atomically(tmp_path, monkeypatch):
    path = write_model_card(tmp_path, **CARD)
    before = path.read_text()

    def broken(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr("kdlib.report.build_model_card", broken)
    with pytest.raises(RuntimeError):
        write_model_card(tmp_path, **CARD)
    assert path.read_text() == before
    assert [p.name for p in tmp_path.iterdir()] == ["README.md"]
