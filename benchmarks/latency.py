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

A peer engine, in the same process and timed in the same interleaved rounds: OpenVINO fp32 (the
student's fp32 ONNX file as an IR) and NNCF int8 (calibrated on 300 seeded training queries), each with
dynamic shapes and with static-shape buckets (``benchmarks/openvino_peer.py``); the record names the
faster mode of each precision (``openvino.kept``). These rows need the optional extra, which the main
lock does not install:

    make extras EXTRA=openvino    # i.e. .venv/bin/pip install --require-hashes --no-deps -r requirements-openvino.lock

Without it (or with ``--no-openvino``) the rows are skipped, and the output and the record say why.

Every row also carries the matrix-product FLOPs of one query (``kdlib.flops.matmul_flops``: every
Linear of the encoder and the attention score and context products, at the mean token count of the
timed queries, sizes read from the modules so a pruned model counts as it runs) and the share of the
machine's int8 peak it reached, FLOPs / p50 / peak. The peak comes from the CPU's ISA flags and clock
and the timing threads (``kdlib.flops.machine_int8_peak``); its assumption is printed beside the
figures and stored in the record (``int8_peak``). p50 includes tokenisation and Python, so the share is
that of the whole call.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from benchmarks.openvino_peer import build_openvino_peers, fastest_peers, peer_status
from benchmarks.run_cli import load_run_models, run_parser, run_paths, write_unless_busy
from kdlib.benchmark import OtherProcesses, compute_size, measure_quality, time_pipeline
from kdlib.flops import machine_int8_peak, matmul_flops, mean_tokens, share_of_peak
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
    parser.add_argument("--no-openvino", action="store_true",
                        help="leave out the OpenVINO peer rows even where openvino is installed")
    args = parser.parse_args(argv)
    if args.queries < 1 or args.repeats < 1:
        parser.error(f"--queries {args.queries} --repeats {args.repeats}: both must be >= 1")
    extra_students = parse_students(args.student, parser)
    paths = run_paths(args, parser)

    session, data, labels, (teacher, teacher_tok), (student, student_tok) = load_run_models(args, paths)

    predictors = {"teacher (pipeline, fp32)": PipelinePredictor(teacher, teacher_tok)}
    predictors["student"] = TorchPredictor(student, student_tok)
    predictors.update(build_variants(student, student_tok, paths.onnx_dir / "latency", threads=args.threads))
    source = dict.fromkeys(predictors, "student") | {"teacher (pipeline, fp32)": "teacher"}  # row -> its model
    models = {"teacher": (teacher, teacher_tok), "student": (student, student_tok)}
    if args.no_openvino:
        peers, peer = {}, {**peer_status(), "fp32_skipped": "--no-openvino", "int8_skipped": "--no-openvino"}
    else:
        peers, peer = build_openvino_peers(paths.onnx_dir / "latency" / "model.onnx", student_tok,
                                           paths.onnx_dir / "latency" / "openvino", threads=session["threads"],
                                           calibration_texts=data["train"]["text"], seed=session["seed"])
    predictors.update(peers)
    source.update(dict.fromkeys(peers, "student"))
    for name, folder in extra_students.items():
        model, tokenizer = load_classifier(folder, labels), load_tokenizer(folder)
        predictors[name] = TorchPredictor(model, tokenizer)
        predictors.update(build_variants(model, tokenizer, paths.onnx_dir / "latency" / name, threads=args.threads,
                                         variants=["onnx-fused-int8"], prefix=name))
        models[name] = (model, tokenizer)
        source.update({n: name for n in predictors if n not in source})
    for precision in ("fp32", "int8"):
        if peer[f"{precision}_skipped"]:
            print(f"OpenVINO {precision} rows skipped: {peer[f'{precision}_skipped']}")

    queries = data["test"]["text"][: args.queries]
    flops = {key: matmul_flops(model, mean_tokens(tokenizer, queries)) for key, (model, tokenizer) in models.items()}
    peak = machine_int8_peak(session["threads"])
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
            "matmul_gflops_per_query": flops[source[name]]["total"] / 1e9,
            "int8_peak_share": share_of_peak(flops[source[name]]["total"], p50, peak["peak_gops"]),
            "backend": predictor.describe(),
        }
    onnx_ratio = rows["student-onnx-int8"]["size_mb"] / rows["student-onnx"]["size_mb"]
    teacher_accuracy = rows["teacher (pipeline, fp32)"]["accuracy"]
    peer["kept"] = fastest_peers({name: rows[name]["p50_ms"] for name in peers})
    report = {
        "teacher_accuracy": teacher_accuracy,
        "rows": [{"variant": name, "speedup": r["speedup_vs_teacher"], **r} for name, r in rows.items()],
        "onnx_int8_over_fp32_size": onnx_ratio,
        "repeats": args.repeats,
        "queries": len(queries),
        "cpu_share_of_other_processes": others,
        "matmul_flops": flops,
        "int8_peak": peak,
        "openvino": peer,
        "session": session,
        "env": env_fingerprint(),
    }
    print(json.dumps(report, indent=2))
    print(f"\nmedian p50 over {args.repeats} rounds of {len(queries)} single queries, threads={session['threads']}")
    print(f"{'variant':<26} {'p50 ms':>8} {'speed-up':>9} {'accuracy':>9} {'OOS rec.':>9} {'MB':>8} "
          f"{'GFLOP':>7} {'% peak':>7}")
    for name, row in rows.items():
        share = row["int8_peak_share"]
        print(f"{name:<26} {row['p50_ms']:8.2f} {row['speedup_vs_teacher']:8.1f}x {row['accuracy']:9.4f} "
              f"{row['oos_recall']:9.4f} {row['size_mb']:8.1f} {row['matmul_gflops_per_query']:7.3f} "
              f"{'n/a' if share is None else f'{share:.1%}':>7}")
    print(f"ONNX int8 file / fp32 ONNX file: {onnx_ratio:.1%}")
    tokens = ", ".join(f"{key} {f['tokens']:.1f}" for key, f in flops.items())
    print(f"GFLOP: matrix products of one query at the mean token count of the timed queries ({tokens})")
    peak_text = "no peak" if peak["peak_gops"] is None else f"{peak['peak_gops']:.0f} GOP/s"
    print(f"% peak: of the int8 peak, {peak_text} ({peak['isa']}): {peak['assumption']}")
    print_peer_verdict(rows, peer)
    write_unless_busy(report, args, paths, "latency", others)
    return report


def print_peer_verdict(rows: dict[str, dict], peer: dict) -> None:
    """One line per kept OpenVINO row against kdlib's fastest student variant on this machine."""
    ours = {name: row for name, row in rows.items() if name.startswith("student-")}
    if not peer["kept"] or not ours:
        return
    best = min(ours, key=lambda name: ours[name]["p50_ms"])
    for precision, name in peer["kept"].items():
        ratio = rows[name]["p50_ms"] / ours[best]["p50_ms"]
        verdict = "beats" if ratio < 1 else "trails"
        print(f"OpenVINO {precision} ({name}, {rows[name]['backend']['shapes']}): {rows[name]['p50_ms']:.2f} ms, "
              f"{verdict} kdlib's fastest ({best}, {ours[best]['p50_ms']:.2f} ms) by {max(ratio, 1 / ratio):.1f}x")


if __name__ == "__main__":
    main(sys.argv[1:])
