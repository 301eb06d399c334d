"""Multi-process smoke test of kdlib.train.train_model (DDP on CPU with the gloo backend).

    python -m torch.distributed.run --standalone --nproc_per_node 2 scripts/ddp_smoke.py --output-dir /tmp/ddp

Builds a tiny BERT teacher, a half-depth student copied from it and seeded synthetic keyword data,
distils for one epoch (alpha = 0.5, cached teacher logits unless --online) and prints one line
``DDP_SMOKE {json}`` from rank 0: world size, global step, eval accuracy and loss, and whether every
rank ends with the same weights. Run it without torchrun for the single-process equivalent:
with ``--sequential --no-dropout`` two processes of batch B and one process of batch 2B take the
same optimizer steps on the same examples, so ``--save-weights`` lets a test compare the two.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
from dataclasses import replace

import torch
import torch.distributed as dist

from kdlib.config import RunConfig
from kdlib.data import build_dataset_dict
from kdlib.models import make_tiny_model, make_tiny_tokenizer, student_from_teacher
from kdlib.testing import synthetic_intents
from kdlib.train import student_arguments, train_model

DROPOUT_FIELDS = ("hidden_dropout_prob", "attention_probs_dropout_prob", "classifier_dropout", "dropout",
                  "attention_dropout", "seq_classif_dropout", "qa_dropout")


def without_dropout(model):
    config = copy.deepcopy(model.config)
    for name in DROPOUT_FIELDS:
        if hasattr(config, name):
            setattr(config, name, 0.0)
    clone = type(model)(config)
    clone.load_state_dict(model.state_dict())
    return clone


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output-dir", required=True)
    parser.add_argument("--epochs", type=float, default=1)
    parser.add_argument("--batch-size", type=int, default=8, help="per process")
    parser.add_argument("--grad-accum", type=int, default=1, help="gradient accumulation steps")
    parser.add_argument("--per-label", type=int, default=32, help="training examples per label")
    parser.add_argument("--online", action="store_true", help="run the teacher at every step, no cache")
    parser.add_argument("--sequential", action="store_true", help="sequential sampler (same data order)")
    parser.add_argument("--no-dropout", action="store_true", help="dropout off (deterministic steps)")
    parser.add_argument("--save-weights", help="rank 0 saves the final state_dict here (torch.save)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--no-use-cpu", action="store_true",
        help="do not pass use_cpu=True on a machine without CUDA (accelerate then does not set up DDP)",
    )
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    torch.set_num_threads(1)
    training_overrides = {}
    if int(os.environ.get("WORLD_SIZE", 1)) > 1:
        # (a ddp_backend in a single process makes accelerate look for a process group that does not exist)
        training_overrides.update(ddp_backend="gloo", ddp_find_unused_parameters=False)
        if not torch.cuda.is_available() and not args.no_use_cpu:
            # Without use_cpu, accelerate only sets up DDP for an accelerator: on a CPU-only machine each
            # process would train on its own, unsynchronised (see tests/test_ddp.py).
            training_overrides["use_cpu"] = True
    if args.sequential:
        training_overrides["train_sampling_strategy"] = "sequential"

    data = build_dataset_dict(
        {
            "train": synthetic_intents(args.per_label, 0),
            "validation": synthetic_intents(8, 1),
            "test": synthetic_intents(8, 2),
        },
        origin="synthetic",
    )
    labels = data["train"].features["label"].names
    tokenizer = make_tiny_tokenizer()
    teacher = make_tiny_model("tiny-bert", labels, seed=args.seed)
    if args.no_dropout:
        teacher = without_dropout(teacher)
    student = student_from_teacher(teacher)
    config = RunConfig(
        alpha=0.5, temperature=2.0, learning_rate=3e-3, batch_size=args.batch_size, seed=args.seed,
        cache_teacher_logits=not args.online, gradient_accumulation_steps=args.grad_accum,
    )
    train_args = replace(student_arguments(config, args.output_dir), num_train_epochs=args.epochs, resume=False,
                         **training_overrides)
    result = train_model(student, tokenizer, data, train_args, teacher=teacher)

    world_size = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    rank = dist.get_rank() if world_size > 1 else 0
    # every rank must end with the same weights: compare a checksum across processes
    checksum = torch.stack([p.detach().double().sum() for p in result.model.parameters()]).sum().reshape(1)
    checksums = [torch.zeros_like(checksum) for _ in range(world_size)]
    if world_size > 1:
        dist.all_gather(checksums, checksum)
    else:
        checksums = [checksum]
    last_eval = [e for e in result.log_history if "eval_accuracy" in e][-1]
    if rank == 0:
        global_batch = args.batch_size * args.grad_accum * world_size
        report = {
            "world_size": world_size,
            "env_world_size": int(os.environ.get("WORLD_SIZE", 1)),
            "parallel_mode": str(result.trainer.args.parallel_mode),
            "wrapped_model": type(result.trainer.model_wrapped).__name__,
            "global_step": result.trainer.state.global_step,
            "expected_steps": math.ceil(len(data["train"]) / global_batch) * math.ceil(args.epochs),
            "eval_accuracy": last_eval["eval_accuracy"],
            "eval_loss": last_eval["eval_loss"],
            "params_in_sync": all(torch.equal(c, checksums[0]) for c in checksums),
        }
        if args.save_weights:
            torch.save({k: v.detach().cpu() for k, v in result.model.state_dict().items()}, args.save_weights)
        print("DDP_SMOKE " + json.dumps(report), flush=True)
    if world_size > 1:
        dist.barrier()


if __name__ == "__main__":
    main()
