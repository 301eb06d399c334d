"""Batched accuracy (kdlib) against the reference's one-query-at-a-time pipeline loop.

Same model, same test split, same process: both prediction lists must be identical, and the
batched evaluation should be at least 10x faster. Prints both wall times (median of repeats),
their ratio, and the machine they were measured on.

    .venv/bin/python -m benchmarks.eval_speed --run minilm [--repeats 3] [--threads 2]
"""

from __future__ import annotations

import argparse
import json

import torch

from kdlib.benchmark import median_of_repeats, predict_labels
from kdlib.config import ConfigError
from kdlib.data import label_names, load_intent_data, oos_label
from kdlib.inference import PipelinePredictor, TorchPredictor
from kdlib.metrics import classification_metrics
from kdlib.models import load_classifier, load_tokenizer
from kdlib.paths import RunPaths
from kdlib.session import env_fingerprint, prepare_session


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", default="minilm", help="run whose teacher to load (outputs/models/<run>/teacher)")
    parser.add_argument("--model", default=None, help="model directory or reference (overrides --run)")
    parser.add_argument("--data", default=None, help="data source (default: $KDLIB_DATA, else embedded CLINC150)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--limit", type=int, default=None, help="first N test queries only (quick check)")
    args = parser.parse_args()
    try:
        model_ref = args.model or RunPaths.of("outputs", args.run).require_models("teacher").teacher_dir
    except ConfigError as err:
        parser.error(f"--run {args.run}: {err} Or pass --model DIR.")

    prepare_session(42, args.threads)
    data = load_intent_data(args.data)
    test = data["test"] if args.limit is None else data["test"].select(range(args.limit))
    model = load_classifier(model_ref, label_names(data))
    tokenizer = load_tokenizer(model_ref)
    texts, names = test["text"], test.features["label"].names
    gold = [names[i] for i in test["label"]]

    batched = TorchPredictor(model, tokenizer)
    reference = PipelinePredictor(model, tokenizer)
    with torch.inference_mode():
        fast = median_of_repeats(lambda: predict_labels(batched, texts, args.batch_size), args.repeats)
        slow = median_of_repeats(lambda: reference.predict(texts), args.repeats)
    same = fast["result"] == slow["result"]
    summary = {
        "model": str(model_ref),
        "queries": len(texts),
        "repeats": args.repeats,
        "kdlib_batched_s": fast["median_s"],
        "reference_pipeline_s": slow["median_s"],
        "speedup": slow["median_s"] / fast["median_s"],
        "identical_predictions": same,
        "accuracy_kdlib": classification_metrics(gold, fast["result"], oos_label(data))["accuracy"],
        "accuracy_reference": classification_metrics(gold, slow["result"], oos_label(data))["accuracy"],
        "all_runs_s": {"kdlib": fast["all_s"], "reference": slow["all_s"]},
        "env": env_fingerprint(),
    }
    print(json.dumps(summary, indent=2))
    print(
        f"\nkdlib batched: {summary['kdlib_batched_s']:.1f} s | reference pipeline loop: "
        f"{summary['reference_pipeline_s']:.1f} s | {summary['speedup']:.1f}x faster | identical predictions: {same}"
    )
    if not same:
        raise SystemExit("Predictions differ between batched and one-at-a-time inference.")


if __name__ == "__main__":
    main()
