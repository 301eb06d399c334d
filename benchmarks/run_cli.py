"""What the benchmark scripts that time a run's teacher and student share: their command line, the
check that the run's models are there (before any work), loading them, and the rule that figures
timed beside another busy process are printed but never stored."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from kdlib.config import ConfigError
from kdlib.data import label_names, load_intent_data
from kdlib.io import atomic_write_text
from kdlib.models import load_classifier, load_tokenizer
from kdlib.paths import RunPaths
from kdlib.session import prepare_session

BUSY_SHARE = 0.25  # other processes' share of the CPU above which timings are not stored


def run_parser(doc: str) -> argparse.ArgumentParser:
    """A parser with the options every run benchmark takes; the script adds its own."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", default="minilm", help="run whose teacher and student to load")
    parser.add_argument("--outputs", default="outputs", help="the outputs folder of that run")
    parser.add_argument("--data", default=None, help="data source (default: kdlib's, the embedded CLINC150)")
    parser.add_argument("--queries", type=int, default=100, help="first test queries to time, one per call")
    parser.add_argument("--repeats", type=int, default=5, help="rounds; figures are medians over them")
    parser.add_argument("--threads", type=int, default=None, help="torch and ONNX Runtime threads")
    parser.add_argument("--out", default=None, help="file to write (default: <outputs>/benchmarks/<run>/<script>.json)")
    return parser


def run_paths(args: argparse.Namespace, parser: argparse.ArgumentParser) -> RunPaths:
    """The run's paths, its teacher and student checked before any work (exit 2 naming the fix)."""
    try:
        return RunPaths.of(args.outputs, args.run).require_models("teacher", "student")
    except ConfigError as err:
        parser.error(f"--run {args.run} --outputs {args.outputs}: {err}")


def load_run_models(args: argparse.Namespace, paths: RunPaths) -> tuple:
    """``(session, data, labels, (teacher, tokenizer), (student, tokenizer))``: seed 42, ``--threads``,
    ``--data``, and the run's two saved models with the data's labels."""
    session = prepare_session(42, args.threads)
    data = load_intent_data(args.data)
    labels = label_names(data)
    teacher, student = ((load_classifier(folder, labels), load_tokenizer(folder))
                        for folder in (paths.teacher_dir, paths.student_dir))
    return session, data, labels, teacher, student


def write_unless_busy(report: dict, args: argparse.Namespace, paths: RunPaths, name: str, busy_share: float) -> None:
    """Write ``report`` to ``--out`` or ``<outputs>/benchmarks/<run>/<name>.json``, or, if other processes
    used more than :data:`BUSY_SHARE` of the CPU while timing, warn and exit 3 leaving any earlier file."""
    if busy_share > BUSY_SHARE:
        print(f"WARNING: other processes used {busy_share:.0%} of the CPU while timing: these figures are not "
              "written. Rerun on a quiet machine.", file=sys.stderr)
        sys.exit(3)
    out = Path(args.out) if args.out else paths.output_dir / "benchmarks" / args.run / f"{name}.json"
    atomic_write_text(out, json.dumps(report, indent=2) + "\n")  # creates the folder too
    print(f"written: {out}")
