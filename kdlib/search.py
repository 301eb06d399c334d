"""The book's Optuna search over the distillation's hyperparameters, made cheap and shareable: trials train
on data tokenised and teacher logits cached once, the median pruner stops a trial below the median of earlier
ones at an epoch, and the study lives in a journal file or a database URL that workers share. A latency search
adds measured latency as a second objective; :func:`choose_from_front` picks from the Pareto front.
"""

from __future__ import annotations

import functools
import os
import shutil
import signal
import socket
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path

import optuna
import pandas as pd
from datasets import DatasetDict
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend
from optuna.study import MaxTrialsCallback
from transformers import PreTrainedModel, PreTrainedTokenizerBase, TrainerCallback

from kdlib.benchmark import time_pipeline
from kdlib.config import RunConfig
from kdlib.inference import TorchPredictor
from kdlib.models import init_student, num_layers
from kdlib.paths import RunPaths
from kdlib.recommend import WITHIN, fastest_within
from kdlib.report import write_table
from kdlib.train import (
    STUDENT_SETTINGS,
    DistillationTrainer,
    DistillationTrainingArguments,
    prepare_datasets,
    student_arguments,
    train_model,
)

STUDY_NAME = "distillation"  # the study of a search in its storage (``-latency`` added for a latency search)


def suggest_hyperparameters(trial) -> dict:
    """The reference's search space (epochs 5-10, alpha 0-1, temperature 2-20) plus the hidden-state term's
    weight, 0-10 (a student copied from its teacher starts with a small MSE, so weights above 1 count)."""
    return {
        "epochs": trial.suggest_int("epochs", 5, 10),
        "alpha": trial.suggest_float("alpha", 0.0, 1.0),
        "temperature": trial.suggest_int("temperature", 2, 20),
        "hidden_weight": trial.suggest_float("hidden_weight", 0.0, 10.0),
    }


class _TrialSeededTPE(optuna.samplers.BaseSampler):
    """Optuna's TPE sampler seeded by ``seed + trial number``: workers given the same seed then draw
    distinct, reproducible start-up trials, whichever worker runs a trial."""

    def __init__(self, seed: int) -> None:
        self._seed, self._by_trial = seed, {}  # one TPESampler per running trial

    def _tpe(self, trial) -> optuna.samplers.TPESampler:
        return self._by_trial.setdefault(trial.number, optuna.samplers.TPESampler(seed=self._seed + trial.number))

    def infer_relative_search_space(self, study, trial):
        return self._tpe(trial).infer_relative_search_space(study, trial)

    def sample_relative(self, study, trial, search_space):
        return self._tpe(trial).sample_relative(study, trial, search_space)

    def sample_independent(self, study, trial, param_name, param_distribution):
        return self._tpe(trial).sample_independent(study, trial, param_name, param_distribution)

    def before_trial(self, study, trial) -> None:
        self._tpe(trial).before_trial(study, trial)

    def after_trial(self, study, trial, state, values) -> None:
        self._tpe(trial).after_trial(study, trial, state, values)
        self._by_trial.pop(trial.number, None)


def open_study(storage: str | os.PathLike, *, study_name: str = STUDY_NAME, seed: int = 42,
               directions: Sequence[str] = ("maximize",)):
    """The Optuna study every worker opening the same ``storage`` and ``study_name`` shares. ``storage`` is
    a database URL (``postgresql+psycopg://...`` for many machines, ``sqlite:///...`` for one process) or a
    file path: a JournalStorage file, appended to under a file lock, so several processes on one machine or
    a shared disk can search together (Optuna documents SQLite as unsafe for parallel workers)."""
    text = os.fspath(storage)
    if "://" not in text:
        Path(text).parent.mkdir(parents=True, exist_ok=True)
        storage = JournalStorage(JournalFileBackend(text))
    # the median pruner starts after 3 complete trials; Optuna cannot prune multi-objective studies
    pruner, sampler = optuna.pruners.MedianPruner(n_startup_trials=3), _TrialSeededTPE(seed)
    for attempt in range(5):
        try:
            return optuna.create_study(study_name=study_name, storage=storage, directions=list(directions),
                                       load_if_exists=True, sampler=sampler, pruner=pruner)
        except Exception as err:  # workers starting together race to create a new database's tables
            if attempt == 4 or type(err).__module__.split(".")[0] != "sqlalchemy":
                raise
            time.sleep(0.5 * (attempt + 1))


def run_study(study, objective, n_trials: int) -> None:
    """Run trials until the study holds ``n_trials`` finished ones, counting every worker's: a rerun runs
    only the missing ones. Each trial records its worker (``host:pid``). SIGTERM marks the running trial
    FAIL, as Ctrl-C does (background workers of a non-interactive shell ignore SIGINT)."""
    finished = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    remaining = n_trials - len(study.get_trials(deepcopy=False, states=finished))
    if remaining <= 0:
        return
    worker = f"{socket.gethostname()}:{os.getpid()}"

    def tagged(trial):
        trial.set_user_attr("worker", worker)
        return objective(trial)

    def stop(signum, frame):
        raise KeyboardInterrupt(f"worker {worker} stopped by signal {signum}")  # Optuna marks the trial FAIL

    in_main_thread = threading.current_thread() is threading.main_thread()  # only there can handlers be set
    previous = signal.signal(signal.SIGTERM, stop) if in_main_thread else None
    try:
        study.optimize(tagged, n_trials=remaining, callbacks=[MaxTrialsCallback(n_trials, states=finished)])
    finally:
        if in_main_thread:
            signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)


class PruneTrial(TrainerCallback):
    """Reports each epoch's validation accuracy to an Optuna trial and stops a trial its pruner judges
    hopeless (``optuna.TrialPruned`` ends ``trainer.train``)."""

    def __init__(self, trial) -> None:
        self.trial = trial

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        if metrics and "eval_accuracy" in metrics:
            self.trial.report(float(metrics["eval_accuracy"]), step=round(state.epoch or 0))
            if self.trial.should_prune():
                raise optuna.TrialPruned(f"validation accuracy {metrics['eval_accuracy']:.4f} at epoch {state.epoch:g}")


def search_layers(max_layers: int):
    """:func:`suggest_hyperparameters` plus the student's depth (``student_layers``, 1 to ``max_layers``,
    passed to ``make_student``): with latency as a second objective, depth trades accuracy for speed."""

    def space(trial) -> dict:
        return {**suggest_hyperparameters(trial), "student_layers": trial.suggest_int("student_layers", 1, max_layers)}

    return space


def latency_objective(tokenizer: PreTrainedTokenizerBase, queries: Sequence[str]) -> Callable[[PreTrainedModel], float]:
    """A latency search's second objective: a trained student's median single-query latency (ms,
    tokenisation included) through :class:`kdlib.inference.TorchPredictor` on validation ``queries``."""
    queries = list(queries)
    if not queries:
        raise ValueError("latency_objective needs at least one query to time (n_latency_queries > 0).")

    def latency(model: PreTrainedModel) -> float:
        return float(time_pipeline(TorchPredictor(model, tokenizer), queries)["time_p50_ms"])

    return latency


def hyperparameter_search(
    make_student, tokenizer: PreTrainedTokenizerBase, data: DatasetDict, *, teacher: PreTrainedModel,
    config: RunConfig, n_trials: int, storage: str | os.PathLike, output_dir: str | Path,
    space=suggest_hyperparameters, latency=None,
) -> dict:
    """Maximise validation accuracy over ``space`` in ``storage``'s study (resumed, shared by workers); returns
    the chosen parameters (``{}`` when ``n_trials`` is 0). :data:`kdlib.train.STUDENT_SETTINGS` among them
    change ``config``'s training, the others go to ``make_student``; ``latency(model) -> ms`` is a second
    objective, to minimise (no pruning)."""
    if n_trials <= 0:
        return {}
    study = _search_study(storage, STUDY_NAME, latency is not None, config.seed)
    prepared = None

    def objective(trial):
        nonlocal prepared
        params = space(trial)
        folder = Path(output_dir) / f"trial-{trial.number}"
        settings = {k: v for k, v in params.items() if k in STUDENT_SETTINGS}
        args = replace(student_arguments(config, folder, **settings), save_strategy="no", resume=False)
        if prepared is None:  # tokenise and compute the teacher's logits once for all trials
            prepared = prepare_datasets(data, tokenizer, teacher=teacher if args.cache_teacher_logits else None,
                                        max_length=args.max_length, augment_copies=args.augment_copies, seed=args.seed)
        student = make_student(**{k: v for k, v in params.items() if k not in STUDENT_SETTINGS})
        pruned = [PruneTrial(trial)] if latency is None else []
        try:
            result = train_model(student, tokenizer, data, args, teacher=teacher, prepared=prepared,
                                 trainer_class=functools.partial(DistillationTrainer, callbacks=pruned))
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        evaluations = [entry for entry in result.log_history if "eval_accuracy" in entry]
        if not evaluations or evaluations[-1].get("step") != result.trainer.state.global_step:
            evaluations.append(result.trainer.evaluate())  # a fractional last epoch has no evaluation of its own
        accuracy = float(evaluations[-1]["eval_accuracy"])
        return accuracy if latency is None else (accuracy, latency(result.model.eval()))

    run_study(study, objective, n_trials)
    return choose_from_front(study) if latency is not None else dict(study.best_params)


def student_factory(config: RunConfig, teacher: PreTrainedModel,
                    labels: Sequence[str]) -> Callable[..., PreTrainedModel]:
    """``make_student(student_layers=None)``: a fresh student of the run's ``student_init`` per call, keeping
    the run's ``keep_layers`` or, given a depth, that many teacher layers."""

    def make_student(student_layers: int | None = None) -> PreTrainedModel:
        keep = config.keep_layers if student_layers is None else student_layers
        return init_student(config.student_init, teacher=teacher, labels=labels, student_ref=config.student,
                            keep_layers=keep, seed=config.seed)

    return make_student


def search_from_config(
    config: RunConfig, make_student: Callable[..., PreTrainedModel], tokenizer: PreTrainedTokenizerBase,
    data: DatasetDict, *, teacher: PreTrainedModel, storage: str | os.PathLike, output_dir: str | Path,
) -> dict:
    """:func:`hyperparameter_search` as a run configuration sets it: with ``search_latency`` the space adds
    the student's depth and the second objective is the latency on the first ``n_latency_queries``
    validation queries (never test queries)."""
    latency_options = {}
    if config.search_latency:
        queries = data["validation"]["text"][: config.n_latency_queries]
        latency_options = dict(space=search_layers(num_layers(teacher)), latency=latency_objective(tokenizer, queries))
    return hyperparameter_search(make_student, tokenizer, data, teacher=teacher, config=config,
                                 n_trials=config.n_trials, storage=storage, output_dir=output_dir, **latency_options)


def choose_from_front(study, tolerance: float = WITHIN) -> dict:
    """The parameters of the trial :func:`kdlib.recommend.fastest_within` keeps from an (accuracy, latency)
    study's Pareto front."""
    front = study.best_trials
    values = pd.DataFrame([trial.values for trial in front], columns=["accuracy", "latency"])
    return dict(front[fastest_within(values, "accuracy", "latency", tolerance).name].params)


def _search_study(storage: str | os.PathLike, study_name: str, latency: bool, seed: int = 42):
    """The study of an accuracy search, or of an accuracy + latency one (its own name in the storage)."""
    name, directions = (f"{study_name}-latency", ("maximize", "minimize")) if latency else (study_name, ("maximize",))
    return open_study(storage, study_name=name, seed=seed, directions=directions)


def search_trials(storage: str | os.PathLike, *, latency: bool = False, study_name: str = STUDY_NAME) -> pd.DataFrame:
    """The search's trials, one row each: number, state, parameters, objective values, whether it is on the
    Pareto front, the epochs it reported to the pruner, its wall time in minutes and its worker."""
    study = _search_study(storage, study_name, latency)
    front = {t.number for t in study.best_trials} if len(study.directions) > 1 else set()
    names = ["accuracy", "latency_ms"][: len(study.directions)]
    rows = []
    for trial in study.get_trials(deepcopy=False):
        values = trial.values or [None] * len(names)
        ended = trial.datetime_complete
        minutes = (ended - trial.datetime_start).total_seconds() / 60 if ended and trial.datetime_start else None
        rows.append({"trial": trial.number, "state": trial.state.name, **trial.params,
                     **dict(zip(names, values, strict=True)), "pareto": trial.number in front,
                     "epochs_reported": len(trial.intermediate_values), "minutes": minutes,
                     "worker": trial.user_attrs.get("worker")})
    return pd.DataFrame(rows)


def plan_distillation(
    config: RunConfig, paths: RunPaths, make_student: Callable[..., PreTrainedModel],
    tokenizer: PreTrainedTokenizerBase, data: DatasetDict, *, teacher: PreTrainedModel, student: PreTrainedModel,
) -> tuple[PreTrainedModel, DistillationTrainingArguments]:
    """Notebook 02's student and its training arguments: with ``n_trials`` the search's choice (a latency
    search's depth: a fresh student) and its trials in ``tables/<run>/search_trials``; without, ``student``
    and the run's settings, and an earlier run's trials table is removed so that 03 never shows it as this run's."""
    storage = config.search_storage or paths.search_journal
    best = search_from_config(config, make_student, tokenizer, data, teacher=teacher, storage=storage,
                              output_dir=paths.checkpoints_dir / "search")
    table = paths.tables_dir / "search_trials"
    if config.n_trials:
        write_table(search_trials(storage, latency=config.search_latency), table)
        if "student_layers" in best:
            student = make_student(best.pop("student_layers"))
    else:
        for suffix in (".csv", ".md"):
            table.with_suffix(suffix).unlink(missing_ok=True)
    return student, student_arguments(config, paths.checkpoints_dir / "student", **best)
