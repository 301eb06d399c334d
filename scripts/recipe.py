"""Try one training recipe: fine-tune a teacher, or distil a student from a saved teacher.

Prints the per-epoch table (validation accuracy is what a recipe is chosen by), then the test
metrics, the wall time and the machine. The README's "How the default recipe was chosen"
figures come from this script, e.g.

    export KDLIB_DATA=../shared/data/clinc150/data_oos_plus.json
    .venv/bin/python scripts/recipe.py teacher --learning-rate 1e-4 --batch-size 16 --warmup-ratio 0.1 --threads 1
    .venv/bin/python scripts/recipe.py student --teacher outputs/models/minilm/teacher --keep-layers 1,3,5 --threads 1

Nothing is written under outputs/ unless ``--save DIR`` is given.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

from kdlib.benchmark import compute_accuracy, env_fingerprint
from kdlib.data import label_names, load_intent_data, subsample
from kdlib.distill import TrainConfig, train_student
from kdlib.models import init_student, load_classifier, load_tokenizer, save_model
from kdlib.predictors import TorchPredictor
from kdlib.profiles import prepare_session


def parse_layers(text: str | None) -> list[int] | None:
    """``"1,3,5"`` -> ``[1, 3, 5]``; anything else is a usage error that says what is expected."""
    if not text:
        return None
    try:
        return [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--keep-layers takes comma-separated layer indices such as 1,3,5, got {text!r}"
        ) from None


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", choices=["teacher", "student"])
    parser.add_argument("--teacher", default="all-MiniLM-L6-v2",
                        help="teacher: the encoder to fine-tune; student: the fine-tuned teacher to distil from")
    parser.add_argument("--data", default=None, help="CLINC150 file, folder or Hub id (default: $KDLIB_DATA)")
    parser.add_argument("--learning-rate", type=float, default=2e-4)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--epochs", type=float, default=5)
    parser.add_argument("--warmup-ratio", type=float, default=0.0)
    parser.add_argument("--alpha", type=float, default=0.5, help="student only")
    parser.add_argument("--temperature", type=float, default=2.0, help="student only")
    parser.add_argument("--keep-layers", type=parse_layers, default=None,
                        help="student only, e.g. 1,3,5 (default: kdlib's)")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--max-rows", type=int, default=None, help="rows per split (a quick look)")
    parser.add_argument("--save", default=None, help="directory to save the trained model in")
    args = parser.parse_args(argv)

    prepare_session(args.seed, args.threads)
    data = load_intent_data(args.data, seed=args.seed)
    if args.max_rows:
        data = subsample(data, dict.fromkeys(data, args.max_rows), seed=args.seed)
    labels = label_names(data)
    tokenizer = load_tokenizer(args.teacher)
    common = dict(learning_rate=args.learning_rate, batch_size=args.batch_size, epochs=args.epochs,
                  warmup_ratio=args.warmup_ratio, seed=args.seed)
    if args.mode == "teacher":
        teacher, model = None, load_classifier(args.teacher, labels, seed=args.seed)
        config = TrainConfig(alpha=1.0, **common)
    else:
        teacher = load_classifier(args.teacher, labels)
        model = init_student("teacher_layers", teacher=teacher, labels=labels,
                             keep_layers=args.keep_layers, seed=args.seed)
        config = TrainConfig(alpha=args.alpha, temperature=args.temperature, **common)

    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="kdlib-recipe-") as checkpoints:
        result = train_student(model, tokenizer, data, teacher=teacher, config=config, output_dir=checkpoints,
                               resume=False)
    metrics = compute_accuracy(TorchPredictor(result.model, tokenizer), data["test"])
    seconds = time.perf_counter() - start
    if args.save:
        save_model(result.model, tokenizer, args.save)

    print(result.epoch_table.to_string(index=False))
    machine = env_fingerprint()
    summary = {
        "recipe": {k: v for k, v in vars(args).items() if k not in {"save", "data"}},
        "validation_accuracy": float(result.epoch_table["Accuracy"].iloc[-1]),
        "test": {k: round(v, 4) for k, v in metrics.items()},
        "seconds": round(seconds, 1),
        "machine": {k: machine[k] for k in ("threads", "torch_version", "cpu", "git_commit")},
    }
    print(json.dumps(summary, indent=2))
    return summary


if __name__ == "__main__":
    main()
