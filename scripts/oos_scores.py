"""Compare the OOS scores of a saved model: validation AUROC / FPR95 (what the default is chosen by), then test.

For every score in kdlib.oos.OOS_SCORES: how well it separates OOS from in-scope queries on the
validation split, and the test figures of the threshold chosen on validation (the rule and target
are the run parameters ``threshold_rule`` / ``in_scope_target``). The ``oos_score`` default is chosen
with it, run for the teacher and for the student:

    .venv/bin/python scripts/oos_scores.py outputs/models/minilm/teacher

Data and parameters as in ``make run`` (``-p NAME VALUE`` for any run parameter).
"""

from __future__ import annotations

import argparse
import json

from kdlib import TorchPredictor, label_names, load_classifier, load_tokenizer, measure_quality
from kdlib.config import ConfigError, load_config, parse_cli_value
from kdlib.models import ModelReferenceError, resolve_model_ref
from kdlib.oos import OOS_SCORES, oos_options
from kdlib.session import prepare_session


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="a saved classifier folder, e.g. outputs/models/minilm/teacher")
    parser.add_argument("--profile", default="minilm")
    parser.add_argument("-p", "--param", nargs=2, action="append", default=[], metavar=("NAME", "VALUE"))
    args = parser.parse_args(argv)
    try:
        config = load_config(args.profile, **{name: parse_cli_value(name, value) for name, value in args.param})
        resolve_model_ref(args.model, param="model")
    except (ConfigError, ModelReferenceError) as err:
        parser.exit(2, f"error: {err}\n")
    prepare_session(config.seed, config.threads)
    data = config.load_data()
    predictor = TorchPredictor(load_classifier(args.model, label_names(data)), load_tokenizer(args.model))
    rows = {}
    for score in OOS_SCORES:
        options = {**oos_options(config), "oos_score": score}
        on_validation, _ = measure_quality(predictor, data["validation"], train=data["train"], **options)
        on_test, _ = measure_quality(predictor, data["test"], validation=data["validation"], train=data["train"],
                                     **options)
        rows[score] = {
            "validation_auroc": on_validation["oos_auroc"],
            "validation_fpr95": on_validation["oos_fpr95"],
            **{
                f"test_{k}": on_test[k]
                for k in (
                    "oos_auroc",
                    "oos_fpr95",
                    "threshold_accuracy",
                    "threshold_in_scope_accuracy",
                    "threshold_oos_recall",
                )
            },
        }
    print(json.dumps({"model": args.model, "threshold_rule": on_test["threshold_rule"], "scores": rows}, indent=2))
    return rows


if __name__ == "__main__":
    main()
