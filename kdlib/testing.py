"""Tiny models, a tiny tokenizer and synthetic intents: for the tests and the smoke profile.

``tiny-bert`` / ``tiny-distilbert`` are model references like any other (the smoke profile's teacher),
built in code from a fixed character vocabulary, so tests and CI need neither the Hub nor a download;
the synthetic intents are keyword data a tiny model learns in a few steps.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

import torch
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    BertTokenizerFast,
    DistilBertConfig,
    DistilBertForSequenceClassification,
    PreTrainedModel,
)

from kdlib.models import TINY_BERT, TINY_DISTILBERT, TINY_REFS, _label_maps

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
    kind: str, labels: Sequence[str], *, seed: int = 42, num_layers: int = 2
) -> PreTrainedModel:
    """A small random BERT (``tiny-bert``) or DistilBERT (``tiny-distilbert``) classifier."""
    if kind not in _TINY_ARCHITECTURES:
        raise ValueError(f"Unknown tiny model {kind!r}; use one of {TINY_REFS}.")
    config_class, model_class, size_names = _TINY_ARCHITECTURES[kind]
    sizes = dict(zip(size_names, (32, num_layers, 2, 64), strict=True))
    config = config_class(vocab_size=len(make_tiny_tokenizer()), max_position_embeddings=128, **sizes,
                          **_label_maps(labels))
    torch.manual_seed(seed)
    return model_class(config)


# Keyword intents that a tiny model learns in a few steps: for tests, demos and multi-process runs.
SYNTHETIC_KEYWORDS = {
    "alarm": ["alarm", "wake me", "set timer"],
    "balance": ["balance", "money left", "account total"],
    "music": ["music", "play song", "volume up"],
    "weather": ["weather", "rain today", "sunny"],
}
SYNTHETIC_FILLERS = ["please", "can you", "now", "for me", "quick", "thanks", "hey", "i need"]


def synthetic_intents(n_per_label: int, seed: int) -> tuple[list[str], list[str]]:
    """(texts, labels): each text one intent keyword among a few filler words, reproducible by seed."""
    rng = random.Random(seed)
    texts, labels = [], []
    for label, keywords in SYNTHETIC_KEYWORDS.items():
        for _ in range(n_per_label):
            words = [rng.choice(keywords), *rng.sample(SYNTHETIC_FILLERS, rng.randint(0, 3))]
            rng.shuffle(words)
            texts.append(" ".join(words))
            labels.append(label)
    return texts, labels
