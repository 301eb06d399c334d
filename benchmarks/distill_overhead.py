"""What distillation costs on top of plain fine-tuning, with the online teacher and with cached logits.

Same student initialisation, same slice of CLINC150 train, same process: one epoch each of
plain fine-tuning (alpha = 1), distillation running the teacher at every step (the reference's
way), and distillation reading cached teacher logits (kdlib's default). Prints the median epoch
time of each over a few repeats and the ratios to plain fine-tuning. Target: cached <= 1.10x.

    .venv/bin/python -m benchmarks.distill_overhead --run minilm [--rows 3000] [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from dataclasses import replace

from kdlib.config import ConfigError, RunConfig
from kdlib.data import label_names, load_intent_data, subsample
from kdlib.models import load_classifier, load_tokenizer, student_from_teacher
from kdlib.paths import RunPaths
from kdlib.session import env_fingerprint, prepare_session
from kdlib.train import add_teacher_logits, student_arguments, tokenize_dataset, train_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", default="minilm", help="run whose teacher to load (outputs/models/<run>/teacher)")
    parser.add_argument("--teacher", default=None, help="teacher directory or reference (overrides --run)")
    parser.add_argument("--data", default=None)
    parser.add_argument("--rows", type=int, default=3000, help="training rows in the slice")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    try:
        teacher_ref = args.teacher or RunPaths.of("outputs", args.run).require_models("teacher").teacher_dir
    except ConfigError as err:
        parser.error(f"--run {args.run}: {err} Or pass --teacher DIR.")

    prepare_session(42, args.threads)
    data = subsample(load_intent_data(args.data), {"train": args.rows, "validation": 64, "test": 64})
    teacher = load_classifier(teacher_ref, label_names(data))
    tokenizer = load_tokenizer(teacher_ref)

    start = time.perf_counter()
    add_teacher_logits(tokenize_dataset(data, tokenizer), teacher, tokenizer, splits=("train",))
    cache_seconds = time.perf_counter() - start

    modes = {
        "plain fine-tuning": dict(alpha=1.0),
        "online teacher": dict(alpha=0.5, cache_teacher_logits=False),
        "cached logits": dict(alpha=0.5, cache_teacher_logits=True),
    }
    seconds: dict[str, list[float]] = {name: [] for name in modes}
    for _ in range(args.repeats):
        for name, mode in modes.items():  # interleaved, so drift in machine load hits every mode alike
            config = RunConfig(epochs=1, batch_size=args.batch_size, learning_rate=1e-4, **mode)
            with tempfile.TemporaryDirectory() as out:
                train_args = replace(student_arguments(config, out), resume=False, save_strategy="no",
                                     eval_strategy="no")
                result = train_model(student_from_teacher(teacher), tokenizer, data, train_args, teacher=teacher)
            seconds[name].append(result.train_seconds)

    def median(values):
        return sorted(values)[len(values) // 2]

    plain = median(seconds["plain fine-tuning"])
    summary = {
        "rows": len(data["train"]),
        "repeats": args.repeats,
        "epoch_seconds_median": {name: median(v) for name, v in seconds.items()},
        "ratio_to_plain": {name: median(v) / plain for name, v in seconds.items()},
        "teacher_logit_cache_seconds": cache_seconds,
        "all_runs_s": seconds,
        "env": env_fingerprint(),
    }
    print(json.dumps(summary, indent=2))
    print("\nOne epoch, median of", args.repeats)
    for name, ratio in summary["ratio_to_plain"].items():
        print(f"  {name:<18} {summary['epoch_seconds_median'][name]:7.1f} s   {ratio:5.2f}x plain")
    print(f"  (building the logit cache once: {cache_seconds:.1f} s)")


if __name__ == "__main__":
    main()
