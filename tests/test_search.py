"""Optuna hyperparameter search: maximises validation accuracy, lives in a journal or a database, resumes, shares."""

from __future__ import annotations

import os
import socket

import optuna
import pytest
import torch

from kdlib.data import build_dataset_dict
from kdlib.distill import TrainConfig, hyperparameter_search, open_study, suggest_hyperparameters, train_student
from kdlib.models import student_from_teacher
from kdlib.testing import make_tiny_model, make_tiny_tokenizer

LABELS = ["alarm", "music", "weather"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    torch.set_num_threads(1)
    words = {"alarm": "wake me up at", "music": "play a song by", "weather": "will it rain in"}
    rows = [(f"{words[label]} {i}", label) for i in range(20) for label in LABELS]
    split = ([t for t, _ in rows], [lab for _, lab in rows])
    data = build_dataset_dict({"train": split, "validation": split, "test": split}, origin="synthetic")
    tokenizer = make_tiny_tokenizer()
    teacher = train_student(
        make_tiny_model("tiny-bert", LABELS), tokenizer, data, output_dir=tmp_path_factory.mktemp("teacher"),
        config=TrainConfig(alpha=1.0, epochs=2, learning_rate=5e-3, batch_size=16), resume=False,
        save_strategy="no",
    ).model
    return data, tokenizer, teacher


def tiny_space(trial) -> dict:
    return {"alpha": trial.suggest_float("alpha", 0.0, 1.0), "temperature": trial.suggest_int("temperature", 2, 20)}


def test_the_reference_search_space():
    trial = optuna.trial.FixedTrial({"epochs": 7, "alpha": 0.3, "temperature": 11})
    assert suggest_hyperparameters(trial) == {"epochs": 7, "alpha": 0.3, "temperature": 11}


@pytest.mark.parametrize("kind", ["journal", "sqlite"])
def test_search_resumes_from_its_study(setup, tmp_path, kind):
    data, tokenizer, teacher = setup
    journal = tmp_path / "search.journal"
    storage = journal if kind == "journal" else f"sqlite:///{tmp_path / 'optuna.db'}"
    kwargs = dict(
        teacher=teacher, base_config=TrainConfig(epochs=1, batch_size=16, learning_rate=5e-3),
        storage=storage, output_dir=tmp_path / "trials", space=tiny_space,
    )
    best = hyperparameter_search(lambda: student_from_teacher(teacher), tokenizer, data, n_trials=2, **kwargs)
    assert set(best) == {"alpha", "temperature"} and 0 <= best["alpha"] <= 1
    assert journal.exists() == (kind == "journal")  # a path is a journal file, a URL a database
    study = open_study(storage)
    assert len(study.trials) == 2
    assert best == study.best_params
    # An "interrupted" search asked for 3 trials runs only the one that is missing.
    hyperparameter_search(lambda: student_from_teacher(teacher), tokenizer, data, n_trials=3, **kwargs)
    study = open_study(storage)
    assert len(study.trials) == 3
    assert {t.user_attrs["worker"] for t in study.trials} == {f"{socket.gethostname()}:{os.getpid()}"}
    assert not list((tmp_path / "trials").glob("trial-*")), "trial checkpoints are cleaned up"


def test_zero_trials_skips_the_search(setup, tmp_path):
    data, tokenizer, teacher = setup
    best = hyperparameter_search(
        lambda: student_from_teacher(teacher), tokenizer, data, teacher=teacher, base_config=TrainConfig(),
        n_trials=0, storage=tmp_path / "search.journal", output_dir=tmp_path,
    )
    assert best == {} and not (tmp_path / "search.journal").exists()


def test_search_prepares_the_data_and_the_teacher_logits_once(setup, tmp_path, monkeypatch):
    import kdlib.distill as distill

    data, tokenizer, teacher = setup
    calls = {"tokenise": 0, "logits": 0}
    tokenize, logits_for = distill.tokenize_dataset, distill.teacher_logits_for

    def counting_tokenize(*args, **kwargs):
        calls["tokenise"] += 1
        return tokenize(*args, **kwargs)

    def counting_logits(*args, **kwargs):
        calls["logits"] += 1
        return logits_for(*args, **kwargs)

    monkeypatch.setattr(distill, "tokenize_dataset", counting_tokenize)
    monkeypatch.setattr(distill, "teacher_logits_for", counting_logits)
    hyperparameter_search(
        lambda: student_from_teacher(teacher), tokenizer, data, n_trials=3, teacher=teacher,
        base_config=TrainConfig(epochs=1, batch_size=16, learning_rate=5e-3),
        storage=tmp_path / "search.journal", output_dir=tmp_path / "trials",
        space=lambda trial: {"alpha": trial.suggest_float("alpha", 0.0, 0.9)},
    )
    # one tokenisation; one logit pass per cached split (train, validation), not per trial
    assert calls == {"tokenise": 1, "logits": 2}


def test_prepared_data_trains_like_raw_data(setup, tmp_path):
    from kdlib.distill import prepare_datasets

    data, tokenizer, teacher = setup
    config = TrainConfig(alpha=0.5, temperature=3, epochs=1, batch_size=16, learning_rate=5e-3)
    kwargs = dict(teacher=teacher, config=config, resume=False, save_strategy="no")
    raw = train_student(student_from_teacher(teacher), tokenizer, data, output_dir=tmp_path / "raw", **kwargs)
    prepared = prepare_datasets(data, tokenizer, teacher=teacher)
    again = train_student(student_from_teacher(teacher), tokenizer, data, output_dir=tmp_path / "prepared",
                          prepared=prepared, **kwargs)
    for (name, a), (_, b) in zip(raw.model.state_dict().items(), again.model.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    with pytest.raises(ValueError, match="prepare_datasets"):
        train_student(student_from_teacher(teacher), tokenizer, data, output_dir=tmp_path / "bad",
                      prepared=data, **kwargs)
