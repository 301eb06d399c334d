"""Structured pruning: remove a student's least important attention heads and FFN neurons, then recover.

Distillation makes a model shallower; structured pruning makes every layer narrower. Whole heads and FFN
neurons go, so every matrix product is smaller, which is what makes a CPU faster (zeroing single weights
leaves the matrices their size). An importance is the first-order Taylor estimate of the loss change on
removal (Michel et al., 2019): the absolute gradient of the cross-entropy with respect to a gate of 1 on
the output, summed over the training batches. Every layer keeps the same share of its highest-scoring
heads and neurons, and a short distillation from the teacher recovers what the cut lost.
"""

from __future__ import annotations

import copy
import hashlib
import json
from dataclasses import dataclass, replace

import torch
from datasets import Dataset, DatasetDict
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from kdlib.config import MAX_LENGTH, RunConfig, kept_count
from kdlib.models import attention_heads, bert_layers, forward_inputs, shrink_layers
from kdlib.train import DistillationTrainingArguments, TrainResult, train_model


@dataclass(frozen=True)
class Importance:
    """Taylor importance of every attention head ``(layers, heads)`` and FFN neuron ``(layers, neurons)``."""

    heads: torch.Tensor
    neurons: torch.Tensor


def importance_scores(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, dataset: Dataset, *, batch_size: int = 32,
    max_length: int = MAX_LENGTH,
) -> Importance:
    """The Taylor importance of ``model``'s heads and FFN neurons on ``dataset`` (``text`` and ``label``):
    length-sorted batches in eval mode, so the same model and data give the same scores. The weights are
    unchanged and their gradients cleared afterwards."""
    layers = bert_layers(model)
    head_size = layers[0].attention.self.attention_head_size
    heads = torch.ones(len(layers), attention_heads(model.config), requires_grad=True)
    neurons = torch.ones(len(layers), layers[0].intermediate.dense.out_features, requires_grad=True)
    head_scores, neuron_scores = torch.zeros_like(heads), torch.zeros_like(neurons)

    def gate(values: torch.Tensor, repeat: int = 1):
        """A pre-hook multiplying the input of the projection after the heads (or neurons) by their gates."""
        return lambda module, args: (args[0] * values.repeat_interleave(repeat),)

    hooks = [hook for i, layer in enumerate(layers) for hook in (
        layer.attention.output.dense.register_forward_pre_hook(gate(heads[i], head_size)),
        layer.output.dense.register_forward_pre_hook(gate(neurons[i])),
    )]
    texts, labels = dataset["text"], dataset["label"]
    order = sorted(range(len(texts)), key=lambda i: (len(texts[i]), i))
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(order), batch_size):
            rows = order[start : start + batch_size]
            inputs = tokenizer([texts[i] for i in rows], padding=True, truncation=True, max_length=max_length,
                               return_tensors="pt")
            logits = model(**forward_inputs(model, inputs)).logits
            loss = torch.nn.functional.cross_entropy(logits, torch.tensor([labels[i] for i in rows]))
            loss.backward()
            head_scores += heads.grad.abs()
            neuron_scores += neurons.grad.abs()
            heads.grad, neurons.grad = None, None
    finally:
        for hook in hooks:
            hook.remove()
        model.zero_grad(set_to_none=True)
        model.train(was_training)
    return Importance(heads=head_scores, neurons=neuron_scores)


def _top(scores: torch.Tensor, kept: int) -> list[int]:
    """The ``kept`` highest scores' indices in order; the stable sort gives ties to the lower index on any kernel."""
    return sorted(torch.argsort(scores, descending=True, stable=True)[:kept].tolist())


def choose_kept(
    importance: Importance, *, ffn_keep: float, heads_keep: float
) -> tuple[list[list[int]], list[list[int]]]:
    """The heads and FFN neurons every layer keeps: its ``heads_keep`` and ``ffn_keep`` shares of the most
    important ones, in index order."""
    n_heads = kept_count(heads_keep, importance.heads.shape[1], "heads_keep")
    n_neurons = kept_count(ffn_keep, importance.neurons.shape[1], "ffn_keep")
    return ([_top(scores, n_heads) for scores in importance.heads],
            [_top(scores, n_neurons) for scores in importance.neurons])


def prune_model(
    model: PreTrainedModel, importance: Importance, *, ffn_keep: float, heads_keep: float
) -> PreTrainedModel:
    """A copy of ``model`` whose every layer keeps the :func:`choose_kept` heads and FFN neurons."""
    heads, neurons = choose_kept(importance, ffn_keep=ffn_keep, heads_keep=heads_keep)
    return shrink_layers(copy.deepcopy(model), heads, neurons)


def is_pruning(config: RunConfig) -> bool:
    """True when the run prunes: a share below 1 of heads or FFN neurons."""
    return config.ffn_keep < 1 or config.heads_keep < 1


@dataclass
class PruningResult:
    """A pruning step: the scores it cut by, the recovery training (its ``model`` is the pruned student), the
    pruned student's fingerprint (the distilled one's plus the pruning settings) and the heads kept."""

    importance: Importance
    training: TrainResult
    fingerprint: str
    kept_heads: list[list[int]]


def prune_and_recover(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, data: DatasetDict, args: DistillationTrainingArguments,
    config: RunConfig, *, teacher: PreTrainedModel | tuple[PreTrainedModel, PreTrainedTokenizerBase],
    fingerprint: str | None = None,
) -> PruningResult:
    """Prune the distilled ``model`` to ``config``'s shares (importance measured on the training split), then
    distil it again from ``teacher`` for ``config.prune_epochs`` epochs with the distillation's own ``args``
    (its loss, learning rate and checkpoints: an interrupted recovery resumes)."""
    bert_layers(model)  # refuse an unprunable model or share before measuring anything
    kept_count(config.heads_keep, attention_heads(model.config), "heads_keep")
    importance = importance_scores(model, tokenizer, data["train"], max_length=args.max_length)
    shares = {"ffn_keep": config.ffn_keep, "heads_keep": config.heads_keep}
    settings = json.dumps([fingerprint, {**shares, "prune_epochs": config.prune_epochs}])
    pruned_fingerprint = hashlib.sha256(settings.encode()).hexdigest()[:16]
    heads, neurons = choose_kept(importance, **shares)  # once: the pruned model and the record share the choice
    training = train_model(shrink_layers(copy.deepcopy(model), heads, neurons), tokenizer, data,
                           replace(args, num_train_epochs=config.prune_epochs), teacher=teacher,
                           fingerprint=pruned_fingerprint)
    return PruningResult(importance, training, pruned_fingerprint, kept_heads=heads)
