"""Optuna hyperparameter search: maximises validation accuracy, lives in SQLite, resumes."""

from __future__ import annotations

import optuna
import pytest
import torch

from kdlib.data import build_dataset_dict
from kdlib.distill import TrainConfig, hyperparameter_search, suggest_hyperparameters, train_student
from kdlib.models import make_tiny_model, make_tiny_tokenizer, student_from_teacher

LABELS = ["alarm", "music", "weather"]


def tmp_teacher_dir():
    import tempfile

    return tempfile.mkdtemp(prefix="kdlib-search-teacher-")


@pytest.fixture(scope="module")
def setup():
    torch.set_num_threads(1)
    words = {"alarm": "wake me up at", "music": "play a song by", "weather": "will it rain in"}
    rows = [(f"{words[label]} {i}", label) for i in range(20) for label in LABELS]
    split = ([t for t, _ in rows], [lab for _, lab in rows])
    data = build_dataset_dict({"train": split, "validation": split, "test": split}, origin="synthetic")
    tokenizer = make_tiny_tokenizer()
    teacher = train_student(
        make_tiny_model("tiny-bert", LABELS), tokenizer, data, output_dir=tmp_teacher_dir(),
        config=TrainConfig(alpha=1.0, epochs=2, learning_rate=5e-3, batch_size=16), resume=False,
        save_strategy="no",
    ).model
    return data, tokenizer, teacher


def tiny_space(trial) -> dict:
    return {"alpha": trial.suggest_float("alpha", 0.0, 1.0), "temperature": trial.suggest_int("temperature", 2, 20)}


def test_the_reference_search_space():
    trial = optuna.trial.FixedTrial({"epochs": 7, "alpha": 0.3, "temperature": 11})
    assert suggest_hyperparameters(trial) == {"epochs": 7, "alpha": 0.3, "temperature": 11}


def test_search_resumes_from_its_sqlite_study(setup, tmp_path):
    data, tokenizer, teacher = setup
    kwargs = dict(
        teacher=teacher, base_config=TrainConfig(epochs=1, batch_size=16, learning_rate=5e-3),
        storage_path=tmp_path / "optuna.db", output_dir=tmp_path / "trials", space=tiny_space,
    )
    best = hyperparameter_search(lambda: student_from_teacher(teacher), tokenizer, data, n_trials=2, **kwargs)
    assert set(best) == {"alpha", "temperature"} and 0 <= best["alpha"] <= 1
    study = optuna.load_study(study_name="distillation", storage=f"sqlite:///{tmp_path / 'optuna.db'}")
    assert len(study.trials) == 2
    assert best == study.best_params
    # An "interrupted" search asked for 3 trials runs only the one that is missing.
    hyperparameter_search(lambda: student_from_teacher(teacher), tokenizer, data, n_trials=3, **kwargs)
    study = optuna.load_study(study_name="distillation", storage=f"sqlite:///{tmp_path / 'optuna.db'}")
    assert len(study.trials) == 3
    assert not list((tmp_path / "trials").glob("trial-*")), "trial checkpoints are cleaned up"


def test_zero_trials_skips_the_search(setup, tmp_path):
    data, tokenizer, teacher = setup
    best = hyperparameter_search(
        lambda: student_from_teacher(teacher), tokenizer, data, teacher=teacher, base_config=TrainConfig(),
        n_trials=0, storage_path=tmp_path / "optuna.db", output_dir=tmp_path,
    )
    assert best == {} and not (tmp_path / "optuna.db").exists()
