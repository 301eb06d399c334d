"""Width against depth: students cut in depth beside students pruned in width, chosen on validation.

Each candidate is written ``LxFxH``: the student keeps ``L`` of the teacher's layers (kdlib's default
choice of them, ``default_keep_layers``), is distilled as notebook 02 distils (the run's settings),
then keeps the share ``F`` of every layer's FFN neurons and ``H`` of its attention heads and is
distilled again for ``prune_epochs`` epochs (``kdlib.prune.prune_and_recover``). A candidate with
the teacher's depth starts from the teacher's own weights, so it has no first distillation. ``L``
alone means no pruning. For every candidate the record holds the validation and test accuracy and
the thresholded accuracy of the PyTorch student and of its fused ONNX int8 variant; each student is
saved under ``outputs/models/<run>/width_depth/<candidate>/`` so that ``benchmarks/latency.py`` times
them all in one process (each with its fused ONNX int8 variant):

    .venv/bin/python scripts/width_depth.py --run minilm 2 3 4 3x0.5x0.5 6x0.5x0.5
    .venv/bin/python -m benchmarks.latency --run minilm --student 2=outputs/models/minilm/width_depth/2 ...

Trainings resume from their checkpoints and the record is rewritten after each candidate, so an
interrupted run loses at most one candidate's work. Writes ``outputs/benchmarks/<run>/width_depth.json``
(``--out``: another record, e.g. for candidates of other settings such as ``-p prune_epochs 6``).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from kdlib.config import ConfigError, kept_count, load_config, parse_cli_value
from kdlib.io import atomic_write_text, project_root, write_problem
from kdlib.paths import RunPaths, missing_model_files
from kdlib.run import absolute_paths

DEFAULT_CANDIDATES = ("2", "3", "4", "3x0.5x0.5", "4x0.5x0.5", "6x0.5x0.5", "6x0.25x0.5")


def parse_candidate(text: str, depth: int, heads: int) -> tuple[int, float, float]:
    """``LxFxH`` (or ``L``) as ``(layers, ffn_keep, heads_keep)``, checked against the teacher's depth and heads."""
    parts = text.split("x")
    try:
        layers = int(parts[0])
        ffn, head = (float(parts[1]), float(parts[2])) if len(parts) == 3 else (1.0, 1.0)
    except ValueError:
        raise ConfigError(f"candidate {text!r}: write LxFxH (e.g. 6x0.5x0.5) or L (e.g. 3).") from None
    if len(parts) not in (1, 3) or not 1 <= layers <= depth or not (0 < ffn <= 1 and 0 < head <= 1):
        raise ConfigError(f"candidate {text!r}: L must be 1 to {depth} (the teacher's depth) and F, H shares in "
                          "(0, 1], e.g. 6x0.5x0.5.")
    try:
        kept_count(head, heads, "H")
    except ValueError:
        raise ConfigError(f"candidate {text!r}: H = {head} keeps none of a layer's {heads} heads; use at least "
                          f"{1 / heads:.3g}.") from None
    return layers, ffn, head


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("candidates", nargs="*", default=list(DEFAULT_CANDIDATES), metavar="LxFxH")
    parser.add_argument("--run", default="minilm", help="the profile and run whose teacher (notebook 01) is used")
    parser.add_argument("-p", "--param", nargs=2, action="append", default=[], metavar=("NAME", "VALUE"))
    parser.add_argument("--out", type=Path, help="the record to write (and resume); default "
                        "outputs/benchmarks/<run>/width_depth.json")
    args = parser.parse_args(argv)
    try:
        overrides = absolute_paths({name: parse_cli_value(name, value) for name, value in args.param}, Path.cwd())
        config = load_config(args.run, **overrides)
        paths = RunPaths.for_config(config)
        if missing_model_files(paths.teacher_dir):
            raise ConfigError(f"{paths.teacher_dir} has no saved teacher: run notebook 01 first (make run).")
        from kdlib.models import reference_num_heads, reference_num_layers

        depth = reference_num_layers(paths.teacher_dir)
        heads = reference_num_heads(paths.teacher_dir)
        candidates = {text: parse_candidate(text, depth, heads) for text in args.candidates}
        record_path = args.out or project_root() / "outputs" / "benchmarks" / config.run_name / "width_depth.json"
        record = read_record(record_path)
    except ConfigError as err:
        parser.exit(2, f"error: {err}\n")
    return run(args.run, config, paths, candidates, depth, record_path, record)


def read_record(path: Path) -> dict:
    """The record to resume (empty when ``path`` does not exist yet), checked before any training: an
    existing file must be a record of this script, and its folder (or nearest existing parent) writable."""
    folder, problem = write_problem(path.parent)
    if problem:
        raise ConfigError(f"--out {path}: cannot write into {folder} ({problem}); choose a file in a folder you can "
                          "write to.")
    if not path.exists():
        return {"candidates": {}}
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ConfigError(f"--out {path}: not a record of this script ({err}); choose a new file.") from None
    if not isinstance(record, dict) or not isinstance(record.get("candidates"), dict):
        raise ConfigError(f"--out {path}: not a record of this script (no 'candidates' mapping); choose a new file.")
    return record


def run(profile: str, config, paths: RunPaths, candidates: dict[str, tuple[int, float, float]], depth: int,
        record_path: Path, record: dict) -> dict:
    """Train, prune and measure every candidate; returns (and writes) the record."""
    from kdlib import (
        STUDENT_FIELDS,
        TorchPredictor,
        build_variants,
        data_digest,
        label_names,
        load_classifier,
        load_tokenizer,
        measure_quality,
        oos_options,
        prepare_session,
        save_model,
        student_arguments,
        train_model,
        weights_digest,
    )
    from kdlib.models import student_from_teacher
    from kdlib.prune import is_pruning, prune_and_recover
    from kdlib.session import env_fingerprint

    prepare_session(config.seed, config.threads)
    data = config.load_data(base_dir=project_root())
    labels = label_names(data)
    teacher = load_classifier(paths.teacher_dir, labels, param="teacher_model")
    tokenizer = load_tokenizer(paths.teacher_dir, param="teacher_model")
    digest = weights_digest(teacher)
    for name, (layers, ffn, head) in candidates.items():
        start = time.perf_counter()
        candidate = load_config(profile, **{**config.model_dump(exclude_defaults=True), "keep_layers": layers,
                                                    "ffn_keep": ffn, "heads_keep": head})
        fingerprint = candidate.fingerprint(STUDENT_FIELDS, data_digest(data), teacher=digest)
        train_args = student_arguments(candidate, paths.checkpoints_dir / "student")
        model = student_from_teacher(teacher, layers)
        if layers < depth:
            model = train_model(model, tokenizer, data, train_args, teacher=teacher, fingerprint=fingerprint).model
        pruning = is_pruning(candidate)
        if pruning:
            model = prune_and_recover(model, tokenizer, data, train_args, candidate, teacher=teacher,
                                      fingerprint=fingerprint).training.model
        save_model(model, tokenizer, paths.models_dir / "width_depth" / name)
        with tempfile.TemporaryDirectory(prefix="kdlib-width-depth-") as work:
            fused = build_variants(model, tokenizer, work, threads=config.threads, variants=("onnx-fused-int8",))
            predictors = {"torch": TorchPredictor(model, tokenizer), **fused}
            measured = {kind: measure(predictor, data, oos_options(candidate), measure_quality)
                        for kind, predictor in predictors.items()}
        record["candidates"][name] = {
            "layers": layers, "ffn_keep": ffn, "heads_keep": head, "parameters": model.num_parameters(),
            "intermediate_size": model.config.intermediate_size,
            "attention_heads": getattr(model.config, "pruned_attention_heads", model.config.num_attention_heads),
            **measured, "seconds": round(time.perf_counter() - start, 1),
            **({"prune_epochs": config.prune_epochs} if pruning else {}),
        }
        record.update(run=config.run_name, epochs=config.epochs,
                      machine={k: env_fingerprint()[k] for k in ("threads", "cpu", "torch_version")})
        atomic_write_text(record_path, json.dumps(record, indent=2, sort_keys=True) + "\n")
        print(name, json.dumps(record["candidates"][name]), flush=True)
    return record


def measure(predictor, data, options: dict, measure_quality) -> dict:
    """Validation and test accuracy, and test accuracy with the OOS threshold chosen on validation."""
    test = measure_quality(predictor, data["test"], validation=data["validation"], train=data["train"],
                           **options).metrics
    validation = measure_quality(predictor, data["validation"], oos_label=None).metrics
    return {"validation_accuracy": round(validation["accuracy"], 4), "test_accuracy": round(test["accuracy"], 4),
            "test_threshold_accuracy": round(test["threshold_accuracy"], 4)}


if __name__ == "__main__":
    main(sys.argv[1:])
