"""Probe: MiniLM's self-attention transfer beside kdlib's distillation loss.

Adds ``--weight`` × (KL of the last layers' attention distributions + KL of their value relations,
softmax(V Vᵀ/√d) per head; Wang et al. 2020, MiniLM) to the loss of ``scripts/recipe.py student``,
whose other arguments it takes. Queries, keys and values are read by forward hooks on the last
layer's projections, so the models keep their fast attention. The teacher runs at every step (its
attention is not cached). It is a script, not a run parameter: an experiment to compare against the
default recipe on validation, run from the project root:

    .venv/bin/python -m scripts.attention_probe --weight 1 student -p teacher_model T \
        -p keep_layers "[2, 5]" -p threads 1
"""

from __future__ import annotations

import argparse
import functools
import sys

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel

from kdlib.train import DistillationTrainer, check_loss_weight
from scripts import recipe


def last_layer_projections(model: PreTrainedModel) -> tuple[dict[str, torch.Tensor], int]:
    """Hook the last layer's query/key/value projections (once); return the dict each forward pass
    fills and the number of heads. BERT-type models only (kdlib's students of teacher layers)."""
    attention = model.base_model.encoder.layer[-1].attention.self
    if not hasattr(model, "_probe_projections"):
        model._probe_projections = {}
        for name in ("query", "key", "value"):
            getattr(attention, name).register_forward_hook(
                lambda module, args, output, name=name: model._probe_projections.__setitem__(name, output))
    return model._probe_projections, attention.num_attention_heads


def relation_kl(teacher: tuple[torch.Tensor, torch.Tensor], student: tuple[torch.Tensor, torch.Tensor],
                heads: int, attention_mask: torch.Tensor) -> torch.Tensor:
    """Per example: KL(teacher || student) of softmax(a bᵀ/√d) per head, over real keys, averaged over
    heads and real query tokens. (query, key) gives the attention distributions, (value, value) the
    value relations."""

    keys = attention_mask[:, None, None, :].bool()  # (batch, 1, 1, key tokens)

    def log_relation(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        batch, tokens, width = a.shape
        a, b = (x.view(batch, tokens, heads, width // heads).transpose(1, 2) for x in (a, b))
        scores = (a @ b.transpose(-1, -2)).float() / (width // heads) ** 0.5
        return F.log_softmax(scores.masked_fill(~keys, torch.finfo(scores.dtype).min), dim=-1)

    log_teacher, log_student = log_relation(*teacher), log_relation(*student)
    kl = (log_teacher.exp() * (log_teacher - log_student) * keys).sum(-1)  # (batch, heads, query tokens)
    rows = attention_mask[:, None, :].float()
    return (kl * rows).sum(dim=(1, 2)) / (rows.sum(dim=(1, 2)) * heads)


def attention_transfer_loss(student: dict[str, torch.Tensor], teacher: dict[str, torch.Tensor], heads: int,
                            attention_mask: torch.Tensor) -> torch.Tensor:
    """MiniLM's loss per example: attention-distribution KL + value-relation KL."""
    attention = relation_kl((teacher["query"], teacher["key"]), (student["query"], student["key"]), heads,
                            attention_mask)
    values = relation_kl((teacher["value"],) * 2, (student["value"],) * 2, heads, attention_mask)
    return attention + values


class AttentionTransferTrainer(DistillationTrainer):
    """kdlib's :class:`DistillationTrainer` whose loss adds ``attention_weight`` × the batch mean of the
    MiniLM loss; it needs the online teacher (``teacher_model``), whose attention is not cached."""

    def __init__(self, *args, attention_weight: float, **kwargs):
        super().__init__(*args, **kwargs)
        self.attention_weight = attention_weight

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        student, heads = last_layer_projections(model)
        teacher, _ = last_layer_projections(self.teacher)
        result = super().compute_loss(model, inputs, return_outputs=return_outputs,
                                      num_items_in_batch=num_items_in_batch)
        term = attention_transfer_loss(student, teacher, heads, inputs["attention_mask"])
        extra = self.attention_weight * term.mean()
        return (result[0] + extra, result[1]) if return_outputs else result + extra


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weight", type=float, required=True, help="weight of the attention-transfer term")
    args, rest = parser.parse_known_args(argv)
    if not rest or rest[0] != "student":
        parser.error("give recipe.py's student mode and its parameters after --weight, e.g. `student -p ...`")
    try:
        check_loss_weight("--weight", args.weight)  # the rule of kdlib's hidden_weight
    except ValueError as error:
        parser.error(str(error))
    online_teacher = ["-p", "cache_teacher_logits", "false"]  # the teacher's attention is needed at each step
    summary = recipe.main(rest + online_teacher,
                          trainer_class=functools.partial(AttentionTransferTrainer, attention_weight=args.weight))
    summary["attention_weight"] = args.weight
    print(f"attention_weight: {args.weight}")
    return summary


if __name__ == "__main__":
    main(sys.argv[1:])
