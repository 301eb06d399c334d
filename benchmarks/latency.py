"""Single-query latency of every student variant against the teacher measured the reference way.

In one process: the teacher as the book timed it (fp32 ``transformers`` pipeline, one query per
call), and the student in PyTorch fp32, PyTorch int8, ONNX Runtime and ONNX Runtime int8
(kdlib predictors). Latency is timed over the first 100 test queries after a warm-up; each
variant's p50 is the median over ``--repeats`` rounds, interleaved so that changes in machine load
hit every variant alike. Also prints test accuracy of each variant and every file size.
Targets: best variant p50 >= 20x lower than the teacher's at accuracy >= teacher - 1 point; ONNX
int8 file <= 30 % of the fp32 ONNX file. Writes ``outputs/benchmarks/<run>/latency.json``, unless the
machine was busy: if other processes used more than a quarter of the CPU while timing (from
/proc/stat minus this process's own CPU time), the figures are printed with a warning and not
stored, since torch's threads slow down many times over when another process holds the cores.

    .venv/bin/python -m benchmarks.latency --run minilm [--repeats 5] [--threads 2]

``--student NAME=DIR`` (repeatable) adds another saved student to the same process, in PyTorch fp32
(its accuracy before quantisation) and as its fastest variant, fused ONNX int8: how a shallower
student trades accuracy for speed, against the same teacher timings. Give those figures their own
file with ``--out`` so that the run's ``latency.json`` keeps describing the run.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from benchmarks.run_cli import load_run_models, run_parser, run_paths, write_unless_busy
from kdlib.benchmark import OtherProcesses, compute_size, measure_quality, time_pipeline
from kdlib.inference import PipelinePredictor, TorchPredictor, build_variants
from kdlib.models import load_classifier, load_tokenizer
from kdlib.paths import missing_model_files
from kdlib.session import env_fingerprint


def parse_students(specs: list[str], parser: argparse.ArgumentParser) -> dict[str, Path]:
    """``NAME=DIR`` pairs of ``--student``, each a saved model folder, checked before any work."""
    students: dict[str, Path] = {}
    for spec in specs:
        name, sep, folder = spec.partition("=")
        if not sep or not name or not folder:
            parser.error(f"--student {spec!r}: expected NAME=DIR, e.g. 2-layers=outputs/models/minilm/student-2")
        if name in students or name.startswith(("teacher", "student")):
            parser.error(f"--student {spec!r}: NAME must be new and not start with 'teacher' or 'student'")
        missing = missing_model_files(folder)
        if missing:
            parser.error(f"--student {spec!r}: {folder} has no {' or '.join(missing)}; give a folder saved by "
                         "kdlib.save_model (scripts/recipe.py student --save DIR)")
        students[name] = Path(folder)
    return students


def main(argv: list[str] | None = None) -> dict:
    parser = run_parser(__doc__)
    parser.add_argument("--student", action="append", default=[], metavar="NAME=DIR",
                        help="another saved student to time beside the run's (repeatable)")
    args = parser.parse_args(argv)
    extra_students = parse_students(args.student, parser)
    paths = run_paths(args, parser)

    session, data, labels, (teacher, teacher_tok), (student, student_tok) = load_run_models(args, paths)

    predictors = {"teacher (pipeline, fp32)": PipelinePredictor(teacher, teacher_tok)}
    predictors["student"] = TorchPredictor(student, student_tok)
    predictors.update(build_variants(student, student_tok, paths.onnx_dir / "latency", threads=args.threads))
    for name, folder in extra_students.items():
        model, tokenizer = load_classifier(folder, labels), load_tokenizer(folder)
        predictors[name] = TorchPredictor(model, tokenizer)
        predictors.update(build_variants(model, tokenizer, paths.onnx_dir / "latency" / name, threads=args.threads,
                                         variants=["onnx-fused-int8"], prefix=name))

    queries = data["test"]["text"][: args.queries]
    p50s: dict[str, list[float]] = {name: [] for name in predictors}
    with OtherProcesses() as busy:
        for _ in range(args.repeats):
            for name, predictor in predictors.items():
                p50s[name].append(time_pipeline(predictor, queries)["time_p50_ms"])
    others = busy.share
    teacher_p50 = float(np.median(p50s["teacher (pipeline, fp32)"]))
    rows = {}
    for name, predictor in predictors.items():
        scoring = TorchPredictor(teacher, teacher_tok) if name.startswith("teacher") else predictor
        accuracy, _ = measure_quality(scoring, data["test"], oos_score="energy")  # accuracy only: no score fit
        p50 = float(np.median(p50s[name]))
        rows[name] = {
            "p50_ms": p50,
            "speedup_vs_teacher": teacher_p50 / p50,
            "accuracy": accuracy["accuracy"],
            "in_scope_accuracy": accuracy.get("in_scope_accuracy"),
            "oos_recall": accuracy.get("oos_recall"),
            "size_mb": compute_size(predictor)["size_mb"],
            "p50_all_repeats_ms": p50s[name],
        }
    onnx_ratio = rows["student-onnx-int8"]["size_mb"] / rows["student-onnx"]["size_mb"]
    teacher_accuracy = rows["teacher (pipeline, fp32)"]["accuracy"]
    report = {
        "teacher_accuracy": teacher_accuracy,
        "rows": [{"variant": name, "speedup": r["speedup_vs_teacher"], **r} for name, r in rows.items()],
        "onnx_int8_over_fp32_size": onnx_ratio,
        "repeats": args.repeats,
        "queries": len(queries),
        "cpu_share_of_other_processes": others,
        "session": session,
        "env": env_fingerprint(),
    }
    print(json.dumps(report, indent=2))
    print(f"\nmedian p50 over {args.repeats} rounds of {len(queries)} single queries, threads={session['threads']}")
    print(f"{'variant':<26} {'p50 ms':>8} {'speed-up':>9} {'accuracy':>9} {'OOS rec.':>9} {'MB':>8}")
    for name, row in rows.items():
        print(f"{name:<26} {row['p50_ms']:8.2f} {row['speedup_vs_teacher']:8.1f}x {row['accuracy']:9.4f} "
              f"{row['oos_recall']:9.4f} {row['size_mb']:8.1f}")
    print(f"ONNX int8 file / fp32 ONNX file: {onnx_ratio:.1%}")
    write_unless_busy(report, args, paths, "latency", others)
    return report


if __name__ == "__main__":
    main(sys.argv[1:])
