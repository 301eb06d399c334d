"""Compare OOS threshold rules on a finished run: every variant, each rule chosen on validation, applied to test.

For the teacher, the student and each of its variants (rebuilt from the saved student), the script
scores the validation and test splits once, then, for every candidate rule of
:class:`kdlib.oos.ThresholdRule`, chooses the threshold on validation and reports validation and
test figures: the threshold-free separation (AUROC, FPR95), the threshold, in-scope accuracy,
OOS recall / precision and overall accuracy. It writes one record (``--out``, default
``outputs/oos/<run_name>/threshold_rules.json``) that the recipe page is generated from.

    .venv/bin/python scripts/oos_rules.py --profile minilm
    .venv/bin/python scripts/oos_rules.py --profile minilm -p run_name small -p max_train_rows 1500

Data and parameters as in ``make run`` (``-p NAME VALUE`` for any run parameter); the run's teacher
and student must have been saved (notebooks 01 and 02).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from kdlib.config import ConfigError, load_config, parse_cli_value
from kdlib.paths import RunPaths
from kdlib.run import absolute_paths

CANDIDATES = (
    ("in_scope_accuracy", (0.95,)),
    ("accuracy", (None,)),
    ("in_scope_drop", (0.005, 0.01, 0.015, 0.02, 0.03)),
    ("flag_rate", (0.02, 0.03, 0.05, 0.075, 0.1)),
)


def candidate_rules():
    """Every rule and setting compared, the absolute rule at its old default first."""
    from kdlib.oos import ThresholdRule

    for name, values in CANDIDATES:
        for value in values:
            setting = {"in_scope_accuracy": "in_scope_target"}.get(name, name)
            yield ThresholdRule(name, **({} if value is None else {setting: value}))


def rule_rows(scored, rule) -> dict:
    """Validation and test figures of ``rule``'s threshold, chosen on validation."""
    from kdlib import oos

    val, test = scored.outputs["validation"], scored.outputs["test"]
    choice = oos.choose_threshold(val.scores, val.predicted, val.gold, scored.oos_index, rule)
    row = {"rule": rule.name, "setting": getattr(rule, rule.setting) if rule.setting else None,
           "described": choice.rule, "threshold": choice.threshold, "missed": choice.missed}
    for what, split in (("validation", val), ("test", test)):
        found = oos.threshold_metrics(split.scores, split.predicted, split.gold, scored.oos_index, choice.threshold)
        row.update({f"{what}_{key.removeprefix('threshold_')}": value for key, value in found.items()
                    if key != "threshold"})
    return row


def variant_table(config, paths: RunPaths, data) -> dict[str, dict]:
    """Per variant: plain test accuracy, the score's separation and every candidate rule's figures."""
    from kdlib import TorchPredictor, build_variants, load_classifier, load_tokenizer, oos
    from kdlib.benchmark import score_splits
    from kdlib.data import label_names
    from kdlib.metrics import classification_metrics

    labels = label_names(data)
    teacher = load_classifier(paths.teacher_dir, labels, param="teacher_model")
    student = load_classifier(paths.student_dir, labels, param="student")
    tokenizer = load_tokenizer(paths.student_dir)
    table = {}
    with tempfile.TemporaryDirectory(prefix="kdlib-oos-rules-") as onnx_dir:
        predictors = {"teacher": TorchPredictor(teacher, load_tokenizer(paths.teacher_dir)),
                      "student": TorchPredictor(student, tokenizer),
                      **build_variants(student, tokenizer, onnx_dir, threads=config.threads)}
        for name, predictor in predictors.items():
            scored = score_splits(predictor, {"validation": data["validation"], "test": data["test"]},
                                  train=data["train"], oos_score=config.oos_score)
            test = scored.outputs["test"]
            plain = classification_metrics(test.gold, test.predicted, oos_label=scored.oos_index)
            separation = {
                f"{what}_{key}": value
                for what, split in scored.outputs.items()
                for key, value in oos.detection_metrics(split.scores, split.gold == scored.oos_index).items()
            }
            table[name] = {
                "oos_score": scored.method,
                "test_accuracy": plain["accuracy"],
                "test_in_scope_accuracy": plain["in_scope_accuracy"],
                "test_oos_recall": plain["oos_recall"],
                **separation,
                "rules": [rule_rows(scored, rule) for rule in candidate_rules()],
            }
            print(f"{name}: AUROC {table[name]['test_oos_auroc']:.4f}", flush=True)
    return table


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", default="minilm")
    parser.add_argument("-p", "--param", nargs=2, action="append", default=[], metavar=("NAME", "VALUE"))
    parser.add_argument("--out", type=Path, help="record path (default outputs/oos/<run_name>/threshold_rules.json)")
    args = parser.parse_args(argv)
    try:
        params = absolute_paths({name: parse_cli_value(name, value) for name, value in args.param}, Path.cwd())
        config = load_config(args.profile, **params)
        paths = RunPaths.for_config(config).require_models("teacher", "student")
    except ConfigError as err:
        parser.exit(2, f"error: {err}\n")
    out = args.out or paths.output_dir / "oos" / config.run_name / "threshold_rules.json"

    from kdlib.io import atomic_write_text
    from kdlib.session import env_fingerprint, prepare_session

    prepare_session(config.seed, config.threads)
    data = config.load_data()
    record = {
        # output_dir only says where the run's models are: left out, the record names no local folder.
        "command": " ".join(["scripts/oos_rules.py", "--profile", args.profile,
                             *(f"-p {n} {v}" for n, v in args.param if n != "output_dir")]),
        "run_name": config.run_name,
        "data": {split: len(data[split]) for split in data},
        "variants": variant_table(config, paths, data),
        "env": env_fingerprint(),
    }
    atomic_write_text(out, json.dumps(record, indent=1, default=float) + "\n")
    print(f"wrote {out}")
    return record


if __name__ == "__main__":
    main()
