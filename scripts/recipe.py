"""Try one training recipe: fine-tune a teacher, distil a student from a saved teacher, or search.

Prints the per-epoch table (validation accuracy is what a recipe is chosen by), then the test
metrics, the wall time and the machine. Parameters are the run parameters of kdlib.config (the
same names, defaults and checks as ``make run``: ``--help-params`` lists them); ``teacher`` mode
uses the ``finetune_*`` ones, ``student`` mode distils from ``teacher_model``. The training defaults
are chosen with this script, on validation, e.g.

    .venv/bin/python scripts/recipe.py teacher -p threads 1
    .venv/bin/python scripts/recipe.py student -p teacher_model outputs/models/minilm/teacher \
        -p keep_layers "[1, 3, 5]" -p threads 1

``search`` mode runs the Optuna search of notebook 02 (``kdlib.search``: the book's alpha, T and epochs
plus ``hidden_weight``, pruned, validation accuracy) on a saved teacher and prints its trials. Its
study lives in ``search_storage``, so several processes given the same file share one search:

    .venv/bin/python scripts/recipe.py search -p teacher_model outputs/models/minilm/teacher \
        -p n_trials 8 -p search_storage outputs/search/minilm.journal -p threads 1   # in 2 shells

With ``-p search_latency true`` it is notebook 02's accuracy + latency search instead (the student's
depth searched too, each trial's latency measured on ``n_latency_queries`` validation queries), and
``--save DIR`` writes its trials table and the accuracy-latency figure of notebook 03 there.

Nothing is written under outputs/ unless ``--save DIR`` (or a ``search_storage`` there) is given.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from kdlib.config import ConfigError, load_config, parameter_help, parse_cli_value
from kdlib.run import absolute_paths
from kdlib.session import prepare_session

if TYPE_CHECKING:
    from kdlib.train import DistillationTrainer


def main(argv: list[str] | None = None, *, trainer_class: Callable[..., DistillationTrainer] | None = None) -> dict:
    """Run the mode ``argv`` names and return its summary. ``trainer_class`` builds the Trainer of the teacher
    and student modes (``kdlib.train.train_model``'s; None: ``DistillationTrainer``), e.g. a subclass with
    another loss term (``scripts/attention_probe.py``)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", choices=["teacher", "student", "search"], nargs="?")
    parser.add_argument("--profile", default="minilm")
    parser.add_argument("-p", "--param", nargs=2, action="append", default=[], metavar=("NAME", "VALUE"))
    parser.add_argument("--help-params", action="store_true", help="list every parameter with its default")
    parser.add_argument("--save", default=None, help="directory to save the trained model in (search mode: its "
                        "trials table, and with search_latency the accuracy-latency figure)")
    args = parser.parse_args(argv)
    if args.help_params or not args.mode:
        print(parameter_help())
        return {}
    from kdlib.models import ModelReferenceError, resolve_model_ref

    try:
        overrides = absolute_paths({name: parse_cli_value(name, value) for name, value in args.param}, Path.cwd())
        config = load_config(args.profile, **overrides)
        if args.mode != "teacher" and not config.teacher_model:
            raise ConfigError(f"{args.mode} mode distils from a saved teacher: pass -p teacher_model DIR.")
        if args.mode != "teacher" and config.student_init != "teacher_layers":
            raise ConfigError(f"{args.mode} mode starts the student from the teacher's layers: student_init must be "
                              f"'teacher_layers', not {config.student_init!r} (notebook 02 runs the other inits).")
        if args.mode == "search" and (config.n_trials <= 0 or not config.search_storage):
            raise ConfigError("search mode needs -p n_trials N (> 0) and -p search_storage FILE_OR_URL "
                              "(the study that several worker processes share).")
        if args.mode == "teacher":
            resolve_model_ref(config.teacher, param="teacher")
        else:
            resolve_model_ref(config.teacher_model, param="teacher_model")
    except (ConfigError, ModelReferenceError) as err:
        parser.exit(2, f"error: {err}\n")

    from kdlib import (
        DistillationTrainer,
        TorchPredictor,
        label_names,
        load_classifier,
        load_tokenizer,
        measure_quality,
        oos_options,
        save_model,
        student_arguments,
        student_factory,
        teacher_arguments,
        train_model,
    )

    prepare_session(config.seed, config.threads)
    data = config.load_data()
    labels = label_names(data)
    if args.mode == "teacher":
        tokenizer = load_tokenizer(config.teacher, param="teacher")
        teacher, model = None, load_classifier(config.teacher, labels, seed=config.seed, param="teacher")
        arguments = teacher_arguments
        recipe = {k: getattr(config, k) for k in ("teacher", "finetune_epochs", "finetune_learning_rate",
                                                   "finetune_batch_size", "finetune_warmup_ratio", "seed")}
    else:
        tokenizer = load_tokenizer(config.teacher_model, param="teacher_model")
        teacher = load_classifier(config.teacher_model, labels, param="teacher_model")
        make_student = student_factory(config, teacher, labels)
        if args.mode == "search":
            return search(config, tokenizer, data, teacher, make_student, args.save)
        arguments = student_arguments
        model = make_student()
        recipe = {k: getattr(config, k) for k in ("teacher_model", "keep_layers", "alpha", "temperature",
                                                   "hidden_weight", "augment_copies", "learning_rate", "batch_size",
                                                   "epochs", "seed")}

    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="kdlib-recipe-") as checkpoints:
        train_args = replace(arguments(config, checkpoints), resume=False)
        result = train_model(model, tokenizer, data, train_args, teacher=teacher,
                             trainer_class=trainer_class or DistillationTrainer)
    metrics, _ = measure_quality(
        TorchPredictor(result.model, tokenizer), data["test"], validation=data["validation"], train=data["train"],
        **oos_options(config)
    )
    seconds = time.perf_counter() - start
    if args.save:
        save_model(result.model, tokenizer, args.save)

    print(result.epoch_table.to_string(index=False))
    summary = {
        "recipe": recipe,
        "validation_accuracy": float(result.epoch_table["Accuracy"].iloc[-1]),
        "test": {k: round(v, 4) if isinstance(v, float) else v for k, v in metrics.items()},
        "seconds": round(seconds, 1),
        "machine": machine(),
    }
    print(json.dumps(summary, indent=2))
    return summary


def machine() -> dict:
    """Where the figures were measured: threads, torch, CPU and commit."""
    from kdlib.session import env_fingerprint

    found = env_fingerprint()
    return {k: found[k] for k in ("threads", "torch_version", "cpu", "git_commit")}


def search(config, tokenizer, data, teacher, make_student, save: str | None) -> dict:
    """Run this process's share of the search in ``config.search_storage``; print every worker's trials
    (and with ``save``, write them, plus the accuracy-latency figure for a latency search)."""
    from kdlib import plot_search, search_from_config, search_trials, write_table

    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="kdlib-search-") as checkpoints:
        best = search_from_config(config, make_student, tokenizer, data, teacher=teacher,
                                  storage=config.search_storage, output_dir=checkpoints)
    seconds = time.perf_counter() - start
    trials = search_trials(config.search_storage, latency=config.search_latency)
    print(trials.to_string(index=False))
    if save:
        write_table(trials, Path(save) / "trials")
        if config.search_latency:
            plot_search(trials, out_stem=Path(save) / "trials")
    summary = {"best": best, "trials": trials.to_dict("records"), "seconds": round(seconds, 1), "machine": machine()}
    print(json.dumps(summary, indent=2, default=str))
    return summary


if __name__ == "__main__":
    main(sys.argv[1:])
