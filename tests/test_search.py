"""Optuna hyperparameter search: maximises validation accuracy, lives in a journal or a database, resumes, shares."""

from __future__ import annotations

import os
import socket
from dataclasses import replace

import optuna
import pytest
import torch

from kdlib.config import RunConfig
from kdlib.data import build_dataset_dict
from kdlib.models import make_tiny_model, make_tiny_tokenizer, student_from_teacher
from kdlib.search import hyperparameter_search, open_study, search_trials, suggest_hyperparameters
from kdlib.train import student_arguments, train_model

LABELS = ["alarm", "music", "weather"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    torch.set_num_threads(1)
    words = {"alarm": "wake me up at", "music": "play a song by", "weather": "will it rain in"}
    rows = [(f"{words[label]} {i}", label) for i in range(20) for label in LABELS]
    split = ([t for t, _ in rows], [lab for _, lab in rows])
    data = build_dataset_dict({"train": split, "validation": split, "test": split}, origin="synthetic")
    tokenizer = make_tiny_tokenizer()
    args = student_arguments(RunConfig(alpha=1.0, epochs=2, learning_rate=5e-3, batch_size=16),
                             tmp_path_factory.mktemp("teacher"))
    teacher = train_model(make_tiny_model("tiny-bert", LABELS), tokenizer, data,
                          replace(args, resume=False, save_strategy="no")).model
    return data, tokenizer, teacher


def tiny_space(trial) -> dict:
    return {"alpha": trial.suggest_float("alpha", 0.0, 1.0), "temperature": trial.suggest_int("temperature", 2, 20)}


def test_the_reference_search_space_and_the_hidden_weight():
    params = {"epochs": 7, "alpha": 0.3, "temperature": 11, "hidden_weight": 2.5}
    assert suggest_hyperparameters(optuna.trial.FixedTrial(params)) == params
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    study.optimize(lambda trial: suggest_hyperparameters(trial)["alpha"], n_trials=1)
    ranges = {name: (d.low, d.high) for name, d in study.trials[0].distributions.items()}
    assert ranges == {"epochs": (5, 10), "alpha": (0.0, 1.0), "temperature": (2, 20), "hidden_weight": (0.0, 10.0)}


@pytest.mark.parametrize("kind", ["journal", "sqlite"])
def test_search_resumes_from_its_study(setup, tmp_path, kind):
    data, tokenizer, teacher = setup
    journal = tmp_path / "search.journal"
    storage = journal if kind == "journal" else f"sqlite:///{tmp_path / 'optuna.db'}"
    kwargs = dict(
        teacher=teacher, config=RunConfig(epochs=1, batch_size=16, learning_rate=5e-3),
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
        lambda: student_from_teacher(teacher), tokenizer, data, teacher=teacher, config=RunConfig(),
        n_trials=0, storage=tmp_path / "search.journal", output_dir=tmp_path,
    )
    assert best == {} and not (tmp_path / "search.journal").exists()


def test_search_prepares_the_data_and_the_teacher_logits_once(setup, tmp_path, monkeypatch):
    import kdlib.train as training

    data, tokenizer, teacher = setup
    calls = {"tokenise": 0, "logits": 0}
    tokenize, logits_for = training.tokenize_dataset, training.teacher_logits_for

    def counting_tokenize(*args, **kwargs):
        calls["tokenise"] += 1
        return tokenize(*args, **kwargs)

    def counting_logits(*args, **kwargs):
        calls["logits"] += 1
        return logits_for(*args, **kwargs)

    monkeypatch.setattr(training, "tokenize_dataset", counting_tokenize)
    monkeypatch.setattr(training, "teacher_logits_for", counting_logits)
    hyperparameter_search(
        lambda: student_from_teacher(teacher), tokenizer, data, n_trials=3, teacher=teacher,
        config=RunConfig(epochs=1, batch_size=16, learning_rate=5e-3),
        storage=tmp_path / "search.journal", output_dir=tmp_path / "trials",
        space=lambda trial: {"alpha": trial.suggest_float("alpha", 0.0, 0.9)},
    )
    # one tokenisation; one logit pass per cached split (train, validation), not per trial
    assert calls == {"tokenise": 1, "logits": 2}


def test_prepared_data_trains_like_raw_data(setup, tmp_path):
    from kdlib.train import prepare_datasets

    data, tokenizer, teacher = setup
    config = RunConfig(alpha=0.5, temperature=3, epochs=1, batch_size=16, learning_rate=5e-3)

    def args(folder):
        return replace(student_arguments(config, tmp_path / folder), resume=False, save_strategy="no")

    raw = train_model(student_from_teacher(teacher), tokenizer, data, args("raw"), teacher=teacher)
    prepared = prepare_datasets(data, tokenizer, teacher=teacher)
    again = train_model(student_from_teacher(teacher), tokenizer, data, args("prepared"), teacher=teacher,
                        prepared=prepared)
    for (name, a), (_, b) in zip(raw.model.state_dict().items(), again.model.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    with pytest.raises(ValueError, match="prepare_datasets"):
        train_model(student_from_teacher(teacher), tokenizer, data, args("bad"), teacher=teacher, prepared=data)


def test_a_hopeless_trial_is_pruned_after_its_first_epoch(setup, tmp_path):
    """Optuna's median pruner, fed each epoch's validation accuracy: a trial that cannot learn
    (learning rate 1e-9) stops at epoch 2 of 4, the first where it falls below the median of the 3
    completed ones (all at 0.33 after epoch 1, at 1.0 after epoch 2)."""
    data, tokenizer, teacher = setup
    storage = tmp_path / "search.journal"
    study = open_study(storage)
    for rate in (2e-2, 2e-2, 2e-2, 1e-9):
        study.enqueue_trial({"learning_rate": rate})
    hyperparameter_search(
        lambda: make_tiny_model("tiny-bert", LABELS, seed=5), tokenizer, data, n_trials=4, teacher=teacher,
        config=RunConfig(alpha=1.0, epochs=4, batch_size=16), storage=storage, output_dir=tmp_path / "trials",
        space=lambda trial: {"learning_rate": trial.suggest_float("learning_rate", 1e-9, 1e-1, log=True)},
    )
    trials = open_study(storage).get_trials()
    states = [t.state for t in trials]
    assert states == [optuna.trial.TrialState.COMPLETE] * 3 + [optuna.trial.TrialState.PRUNED], states
    assert list(trials[3].intermediate_values) == [1, 2]  # stopped after its second epoch
    assert all(list(t.intermediate_values) == [1, 2, 3, 4] for t in trials[:3])
    assert trials[3].intermediate_values[2] < trials[0].intermediate_values[2]
    assert not any((tmp_path / "trials").glob("trial-*"))  # no trial's checkpoints are left behind
    table = search_trials(storage)
    assert table["epochs_reported"].tolist() == [4, 4, 4, 2] and (table["minutes"] > 0).all()


def test_accuracy_and_latency_search_keeps_the_pareto_front(setup, tmp_path):
    """Two objectives: validation accuracy up, latency down, over the student's depth too. The latency
    here is a stand-in clock (the student's layer count), so the front can be checked by hand."""
    from kdlib.config import default_keep_layers
    from kdlib.models import num_layers
    from kdlib.search import choose_from_front, search_layers, search_trials

    data, tokenizer, teacher = setup
    depth = num_layers(teacher)
    storage = tmp_path / "search.journal"
    best = hyperparameter_search(
        lambda student_layers: student_from_teacher(teacher, default_keep_layers(depth, student_layers)),
        tokenizer, data, n_trials=5, teacher=teacher, config=RunConfig(epochs=1, batch_size=16),
        storage=storage, output_dir=tmp_path / "trials", space=search_layers(depth),
        latency=lambda model: float(num_layers(model)),
    )
    study = open_study(storage, study_name="distillation-latency", directions=("maximize", "minimize"))
    trials = search_trials(storage, latency=True)
    assert len(trials) == 5 and (trials["state"] == "COMPLETE").all()
    assert (trials["latency_ms"] == trials["student_layers"]).all()  # each trial's student had its depth
    assert trials["worker"].notna().all() and (trials["minutes"] > 0).all()
    assert (trials["epochs_reported"] == 0).all()  # a two-objective study is never pruned: nothing reported

    def dominated(row) -> bool:
        better = (trials["accuracy"] >= row["accuracy"]) & (trials["latency_ms"] <= row["latency_ms"])
        strictly = (trials["accuracy"] > row["accuracy"]) | (trials["latency_ms"] < row["latency_ms"])
        return bool((better & strictly).any())

    assert trials["pareto"].tolist() == [not dominated(row) for _, row in trials.iterrows()]
    front = trials[trials["pareto"]]
    near = front[front["accuracy"] >= front["accuracy"].max() - 0.01]
    assert best == choose_from_front(study) and best["student_layers"] == near["latency_ms"].min()
    # the single-objective study of the same storage is another study, untouched
    assert search_trials(storage).empty


def test_student_factory_keeps_the_runs_layers_or_a_drawn_depth():
    """Without a depth the student keeps the run's ``keep_layers``; a depth that the latency search draws
    keeps that many teacher layers, spaced as the default spaces them (notebook 02 and recipe.py share it)."""
    from kdlib.config import default_keep_layers, load_config
    from kdlib.models import num_layers
    from kdlib.search import student_factory

    teacher = make_tiny_model("tiny-bert", LABELS, num_layers=4)
    make_student = student_factory(load_config("smoke", keep_layers=[0, 3]), teacher, LABELS)

    def kept(student) -> list[int]:
        """The teacher layer each student layer is a copy of (random layers: each one's weights are its own)."""
        query = [layer.attention.self.query.weight for layer in teacher.bert.encoder.layer]
        return [next(j for j, weight in enumerate(query) if torch.equal(layer.attention.self.query.weight, weight))
                for layer in student.bert.encoder.layer]

    assert kept(make_student()) == [0, 3]
    assert kept(make_student(3)) == default_keep_layers(4, 3) == [0, 2, 3]
    assert kept(make_student(1)) == [3] and num_layers(make_student(4)) == 4


def test_choose_from_front_prefers_the_fastest_trial_within_the_tolerance():
    from types import SimpleNamespace

    from kdlib.search import choose_from_front

    front = [SimpleNamespace(values=v, params={"n": i}) for i, v in enumerate([(0.95, 5.0), (0.945, 3.0), (0.92, 1.0)])]
    study = SimpleNamespace(best_trials=front)
    assert choose_from_front(study) == {"n": 1}  # 0.945 is within 1 point of 0.95, and faster
    assert choose_from_front(study, tolerance=0.001) == {"n": 0}
    assert choose_from_front(study, tolerance=0.05) == {"n": 2}


def test_a_trial_draws_the_same_values_whichever_study_or_process_runs_it(tmp_path):
    """Trial n's draw comes from seed + n: a rerun of the search repeats it, another seed changes it."""

    def draws(storage, seed):
        study = open_study(storage, seed=seed)
        study.optimize(lambda trial: suggest_hyperparameters(trial)["alpha"], n_trials=4)
        return [t.params for t in study.trials]

    first = draws(tmp_path / "a.journal", 42)
    assert draws(tmp_path / "b.journal", 42) == first
    assert draws(tmp_path / "c.journal", 7) != first
    assert len({params["alpha"] for params in first}) == 4


def test_plan_distillation_without_a_search_uses_the_run_settings_and_clears_stale_trials(setup, tmp_path):
    """Notebook 02's one set-up call: n_trials = 0 trains the given student with the run's settings, and an
    earlier run's trials table is removed so that notebook 03 never shows it as this run's."""
    from kdlib.config import load_config
    from kdlib.paths import RunPaths
    from kdlib.search import plan_distillation

    data, tokenizer, teacher = setup
    config = load_config("smoke", output_dir=str(tmp_path), alpha=0.3)
    paths = RunPaths.for_config(config).ensure()
    stale = [paths.tables_dir / "search_trials.csv", paths.tables_dir / "search_trials.md"]
    for path in stale:
        path.write_text("trial\n0\n")
    student = student_from_teacher(teacher)
    chosen, arguments = plan_distillation(config, paths, lambda: student_from_teacher(teacher), tokenizer, data,
                                          teacher=teacher, student=student)
    assert chosen is student and arguments.alpha == 0.3 and arguments.temperature == config.temperature
    assert not any(path.exists() for path in stale)
    assert not paths.search_journal.exists()  # no study was opened


def test_plan_distillation_with_a_search_writes_its_trials_for_notebook_03(setup, tmp_path):
    from kdlib import search
    from kdlib.config import load_config
    from kdlib.paths import RunPaths

    data, tokenizer, teacher = setup
    config = load_config("smoke", output_dir=str(tmp_path), n_trials=2, epochs=1)
    paths = RunPaths.for_config(config).ensure()
    student = student_from_teacher(teacher)
    chosen, arguments = search.plan_distillation(config, paths, lambda: student_from_teacher(teacher), tokenizer,
                                                 data, teacher=teacher, student=student)
    trials = (paths.tables_dir / "search_trials.csv").read_text().splitlines()
    assert len(trials) == 3 and trials[0].startswith("trial,state")
    best = open_study(paths.search_journal).best_params
    assert chosen is student and (arguments.alpha, arguments.temperature) == (best["alpha"], best["temperature"])
