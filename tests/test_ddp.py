"""train_model in several processes (DDP on CPU, gloo): scripts/ddp_smoke.py under torchrun.

Two processes of batch 8 (and 2 x 4 x 2 accumulation steps) must take exactly the optimizer steps
of one process with batch 16: the loss is a sum over the examples divided by the number of
examples in the whole (all-process, all-micro-batch) batch.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "scripts" / "ddp_smoke.py"
TIMEOUT = 300
# same data order and no dropout, so that runs with different process counts are comparable
COMPARABLE = ["--sequential", "--no-dropout"]


def run_smoke(tmp_path: Path, name: str, *args: str, nproc: int = 2) -> dict:
    out = tmp_path / name
    weights = tmp_path / f"{name}.pt"
    launcher = [sys.executable]
    if nproc > 1:
        launcher += ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    env.pop("KDLIB_DATA", None)
    proc = subprocess.run(
        [*launcher, str(SCRIPT), "--output-dir", str(out), "--save-weights", str(weights), *args],
        capture_output=True, text=True, timeout=TIMEOUT, cwd=REPO, env=env,
    )
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    lines = [line for line in proc.stdout.splitlines() if line.startswith("DDP_SMOKE ")]
    assert len(lines) == 1, f"expected one report from rank 0, got {lines}\n{proc.stderr[-3000:]}"
    report = json.loads(lines[0].removeprefix("DDP_SMOKE "))
    report["weights"] = torch.load(weights)
    return report


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    return run_smoke(tmp_path_factory.mktemp("single"), "single", *COMPARABLE, "--batch-size", "16", nproc=1)


@pytest.fixture(scope="module")
def ddp(tmp_path_factory):
    return run_smoke(tmp_path_factory.mktemp("ddp"), "ddp", *COMPARABLE, "--batch-size", "8")


def assert_same_training(report: dict, reference: dict) -> None:
    assert report["global_step"] == reference["global_step"]
    assert report["eval_loss"] == pytest.approx(reference["eval_loss"], abs=1e-5)
    assert report["eval_accuracy"] == pytest.approx(reference["eval_accuracy"], abs=1e-9)
    for key, value in reference["weights"].items():
        torch.testing.assert_close(report["weights"][key], value, atol=1e-6, rtol=1e-5, msg=key)


def test_two_processes_train_with_ddp(ddp):
    assert ddp["world_size"] == 2 and ddp["env_world_size"] == 2
    assert ddp["parallel_mode"] == "ParallelMode.DISTRIBUTED"
    assert ddp["wrapped_model"] == "DistributedDataParallel"
    assert ddp["params_in_sync"], "the ranks ended with different weights"
    # 128 examples, 2 processes x batch 8 -> 8 optimizer steps in the epoch
    assert ddp["global_step"] == ddp["expected_steps"] == 8
    assert 0.0 <= ddp["eval_accuracy"] <= 1.0


def test_two_processes_equal_one_process_with_the_global_batch(ddp, single):
    assert single["world_size"] == 1 and single["global_step"] == 8
    assert_same_training(ddp, single)


@pytest.mark.slow
def test_two_processes_with_gradient_accumulation_equal_one_process(single, tmp_path):
    report = run_smoke(tmp_path, "ddp_ga", *COMPARABLE, "--batch-size", "4", "--grad-accum", "2")
    assert report["world_size"] == 2 and report["params_in_sync"]
    assert_same_training(report, single)


@pytest.mark.slow
def test_cpu_ddp_without_explicit_use_cpu(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("only meaningful without CUDA")
    report = run_smoke(tmp_path, "ddp_no_use_cpu", "--no-use-cpu")
    assert report["parallel_mode"] == "ParallelMode.DISTRIBUTED"
    assert report["params_in_sync"]
