"""Where one query's time goes, for the fastest student variant, against the teacher's.

In one process, over the first ``--queries`` test queries (after a warm-up), ``--repeats`` rounds:

- the fused ONNX int8 student (``onnx-fused-int8``, kdlib's fastest variant) step by step: the
  ``tokenizers`` encoder into numpy, ``session.run``, softmax and label, and the whole call as
  ``benchmarks.latency`` times it;
- the same queries through an ONNX Runtime session with its profiler on: kernel time per operator
  type, and how much of ``session.run`` is spent outside the kernels (the profiler adds its own cost
  to every node, so read its figures as shares, and the timed steps above as the milliseconds);
- the teacher as the speed-up's denominator: through ``pipeline`` (the book's way) and as a bare
  tokenizer call plus forward pass.

It also prints the arithmetic floor: 2 FLOPs per weight of the encoder's matrix products per token.
Figures are medians over rounds of each round's p50. Writes
``outputs/benchmarks/<run>/profile_query.json`` unless other processes used more than a quarter of
the CPU while it ran (then it warns and exits 3); ``--out`` writes elsewhere.

    .venv/bin/python -m benchmarks.profile_query --run minilm [--threads 2] [--queries 100] [--repeats 5]
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
from scipy.special import softmax

from benchmarks.run_cli import load_run_models, run_parser, run_paths, write_unless_busy
from kdlib.benchmark import OtherProcesses, time_pipeline
from kdlib.inference import (
    OnnxPredictor,
    PipelinePredictor,
    TorchPredictor,
    build_variants,
    session_options,
)
from kdlib.session import env_fingerprint

VARIANT = "onnx-fused-int8"
STEPS = ("encode", "session.run", "softmax + label", "whole call")


def step_p50s(predictor: OnnxPredictor, queries: list[str]) -> dict[str, float]:
    """p50 (ms) of each step of a single-query call, and of the whole call, over ``queries``."""
    times: dict[str, list[float]] = defaultdict(list)
    clock = time.perf_counter
    for query in queries:
        start = clock()
        feed = predictor.feed([query])
        encoded = clock()
        logits = predictor.session.run([predictor.output_name], feed)[0]
        ran = clock()
        probs = softmax(np.asarray(logits, dtype=np.float32), axis=-1)
        predictor.labels[int(probs[0].argmax())]
        done = clock()
        predictor(query)
        whole = clock() - done
        for step, seconds in zip(STEPS, (encoded - start, ran - encoded, done - ran, whole), strict=True):
            times[step].append(seconds * 1000)
    return {step: float(np.median(values)) for step, values in times.items()}


def onnx_runtime_profile(predictor: OnnxPredictor, queries: list[str], warmup: int = 10) -> dict:
    """Kernel time per operator type (µs per query) from ONNX Runtime's profiler, and the time of
    ``session.run`` it spends outside the kernels, for ``predictor``'s file and thread count."""
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as folder:
        options = session_options(predictor.threads)  # the predictor's own, plus the profiler
        options.enable_profiling = True
        options.profile_file_prefix = str(Path(folder) / "ort")
        session = ort.InferenceSession(str(predictor.path), options, providers=["CPUExecutionProvider"])
        for query in queries[:warmup] + queries:
            session.run([predictor.output_name], predictor.feed([query]))
        events = json.loads(Path(session.end_profiling()).read_text())
    runs = sorted((e for e in events if e.get("name") == "model_run"), key=lambda e: e["ts"])[warmup:]
    first = runs[0]["ts"]
    per_op: dict[str, float] = defaultdict(float)
    nodes: dict[str, int] = defaultdict(int)
    for event in events:
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time") and event["ts"] >= first:
            per_op[event["args"]["op_name"]] += event["dur"] / len(runs)
            nodes[event["args"]["op_name"]] += 1
    kernels = sum(per_op.values())
    model_run = float(np.mean([e["dur"] for e in runs]))
    return {
        "kernel_us_by_op": dict(sorted(per_op.items(), key=lambda item: -item[1])),
        "nodes_by_op": {op: count // len(runs) for op, count in nodes.items()},
        "kernel_us": kernels,
        "model_run_us": model_run,
        "outside_kernels_us": model_run - kernels,
    }


def encoder_flops_per_token(model) -> int:
    """2 FLOPs per weight of the encoder layers' matrix products (attention and feed-forward) per token."""
    return 2 * sum(
        param.numel() for name, param in model.named_parameters() if ".layer." in name and name.endswith("weight")
        and param.dim() == 2
    )


def main(argv: list[str] | None = None) -> dict:
    parser = run_parser(__doc__)
    args = parser.parse_args(argv)
    paths = run_paths(args, parser)

    session, data, _, (teacher, teacher_tok), (student, student_tok) = load_run_models(args, paths)
    fastest = build_variants(student, student_tok, paths.onnx_dir / "latency", threads=args.threads,
                             variants=[VARIANT])[f"student-{VARIANT}"]
    teacher_pipeline, teacher_forward = PipelinePredictor(teacher, teacher_tok), TorchPredictor(teacher, teacher_tok)
    queries = list(data["test"]["text"][: args.queries])

    rounds: dict[str, list[float]] = defaultdict(list)
    with OtherProcesses() as busy:
        for _ in range(args.repeats):
            for step, p50 in step_p50s(fastest, queries[:10] + queries).items():
                rounds[step].append(p50)
            rounds["teacher pipeline"].append(time_pipeline(teacher_pipeline, queries)["time_p50_ms"])
            rounds["teacher tokenizer + forward"].append(time_pipeline(teacher_forward, queries)["time_p50_ms"])
        profile = onnx_runtime_profile(fastest, queries)
    p50 = {name: float(np.median(values)) for name, values in rounds.items()}
    tokens = float(np.mean([len(fastest.feed([q])["input_ids"][0]) for q in queries]))
    flops = encoder_flops_per_token(student) * tokens
    report = {
        "variant": f"student-{VARIANT}",
        "p50_ms": p50,
        "p50_all_repeats_ms": dict(rounds),
        "speedup": p50["teacher pipeline"] / p50["whole call"],
        "onnx_runtime_profile": profile,
        "mean_tokens_per_query": tokens,
        "student_gflop_per_query": flops / 1e9,
        "repeats": args.repeats,
        "queries": len(queries),
        "cpu_share_of_other_processes": busy.share,
        "session": session,
        "env": env_fingerprint(),
    }
    print(json.dumps(report, indent=2))
    print(f"\n{report['variant']}, threads={session['threads']}, median p50 over {args.repeats} rounds of "
          f"{len(queries)} single queries ({tokens:.1f} tokens each on average)")
    for name, value in p50.items():
        print(f"  {name:<30} {value:8.3f} ms")
    print(f"  speed-up of the whole call over the teacher pipeline: {report['speedup']:.1f}x")
    print(f"ONNX Runtime profile, µs per query: session.run's model_run {profile['model_run_us']:.0f}, kernels "
          f"{profile['kernel_us']:.0f}, outside kernels {profile['outside_kernels_us']:.0f}")
    for op, micros in profile["kernel_us_by_op"].items():
        print(f"  {op:<30} {micros:8.1f} µs  ({profile['nodes_by_op'][op]} nodes)")
    print(f"arithmetic: {report['student_gflop_per_query']:.3f} GFLOP per query in the encoder's matrix products")
    write_unless_busy(report, args, paths, "profile_query", busy.share)
    return report


if __name__ == "__main__":
    main(sys.argv[1:])
