"""Distillation across vocabularies: a tiny MPNet teacher on one vocabulary, a tiny BERT student on another.

The teacher's logits are cached from the teacher's own tokens of each text, the student trains on its own
tokens; what needs one sequence of tokens in both models (the hidden-state term, the online teacher) is
refused before any work; with one vocabulary, training is exactly what it was."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pandas as pd
import pytest
import torch
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    BertTokenizerFast,
    MPNetConfig,
    MPNetForSequenceClassification,
)

from kdlib.config import RunConfig
from kdlib.data import build_dataset_dict
from kdlib.models import (
    TINY_CHARS,
    TINY_SPECIAL_TOKENS,
    TokenizerMismatchError,
    check_tokenizers_compatible,
    forward_inputs,
    make_tiny_tokenizer,
    share_vocabulary,
    student_from_teacher,
)
from kdlib.testing import SYNTHETIC_FILLERS, SYNTHETIC_KEYWORDS, synthetic_intents
from kdlib.train import (
    TEACHER_LOGITS,
    add_noisy_copies,
    add_teacher_logits,
    prepare_datasets,
    student_arguments,
    tokenize_dataset,
    train_model,
)

LABELS = sorted(SYNTHETIC_KEYWORDS)
BATCH = 16
STEPS_PER_EPOCH = math.ceil(len(LABELS) * 30 / BATCH)

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


def other_tokenizer() -> BertTokenizerFast:
    """Another lower-casing WordPiece vocabulary: the data's whole words first, then the characters in
    reverse order, so a text gets other ids, and fewer of them, than from the tiny tokenizer."""
    words = sorted({w for phrases in [*SYNTHETIC_KEYWORDS.values(), SYNTHETIC_FILLERS] for p in phrases
                    for w in p.split()})
    chars = list(reversed(TINY_CHARS))
    vocab = [*TINY_SPECIAL_TOKENS, *words, *chars, *(f"##{c}" for c in chars)]
    return BertTokenizerFast(vocab={t: i for i, t in enumerate(vocab)}, do_lower_case=True, model_max_length=128)


def label_maps() -> dict:
    return {"id2label": dict(enumerate(LABELS)), "label2id": {name: i for i, name in enumerate(LABELS)}}


def student_on(tokenizer, seed: int = 1) -> BertForSequenceClassification:
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=128, **label_maps())
    torch.manual_seed(seed)
    return BertForSequenceClassification(config)


def args_for(output_dir, **settings):
    run = {k: settings.pop(k) for k in list(settings) if k in RunConfig.model_fields}
    defaults = dict(alpha=0.5, temperature=2.0, learning_rate=3e-3, batch_size=BATCH, epochs=2, seed=7)
    return replace(student_arguments(RunConfig(), output_dir, **{**defaults, **run}), **settings)


def state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def data():
    return build_dataset_dict({"train": synthetic_intents(30, 0), "validation": synthetic_intents(8, 1),
                               "test": synthetic_intents(8, 2)}, origin="synthetic")


@pytest.fixture(scope="module")
def teacher_tok():
    return make_tiny_tokenizer()


@pytest.fixture(scope="module")
def student_tok():
    return other_tokenizer()


@pytest.fixture(scope="module")
def teacher(data, teacher_tok, tmp_path_factory):
    """A tiny MPNet fine-tuned on the tiny tokenizer's tokens (alpha = 1), so its logits are far from uniform."""
    config = MPNetConfig(vocab_size=len(teacher_tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=130, pad_token_id=teacher_tok.pad_token_id,
                         **label_maps())
    torch.manual_seed(0)
    model = MPNetForSequenceClassification(config)
    args = args_for(tmp_path_factory.mktemp("teacher"), alpha=1.0, learning_rate=1e-2, epochs=8, seed=0)
    return train_model(model, teacher_tok, data, args).model.eval()


def test_the_two_tokenizers_give_other_ids_and_other_lengths(teacher_tok, student_tok, data):
    assert not share_vocabulary(teacher_tok, student_tok)
    assert check_tokenizers_compatible(teacher_tok, student_tok, RunConfig()) is False  # the defaults are allowed
    texts = list(data["train"]["text"])
    teacher_ids, student_ids = teacher_tok(texts)["input_ids"], student_tok(texts)["input_ids"]
    assert all(len(s) < len(t) for s, t in zip(student_ids, teacher_ids, strict=True))
    assert len(student_tok) > len(teacher_tok)  # the student's ids would not even fit the teacher's embedding


@torch.no_grad()
def teacher_alone(teacher, tokenizer, text: str) -> torch.Tensor:
    return teacher(**forward_inputs(teacher, tokenizer(text, return_tensors="pt"))).logits[0]


def test_logits_cached_with_the_teacher_tokenizer_equal_the_teacher_on_its_own_tokens(
    teacher, teacher_tok, student_tok, data
):
    prepared = prepare_datasets(data, student_tok, teacher=teacher, teacher_tokenizer=teacher_tok, augment_copies=1,
                                seed=3)
    texts = add_noisy_copies(data, 1, seed=3)  # the texts behind each row, the noisy copies included
    assert len(prepared["train"]) == 2 * len(data["train"])
    assert TEACHER_LOGITS not in prepared["test"].column_names
    for split in ("train", "validation"):
        rows, split_texts = prepared[split], list(texts[split]["text"])
        assert rows["input_ids"] == student_tok(split_texts, truncation=True, max_length=128)["input_ids"]
        for i in range(0, len(rows), 5):
            expected = teacher_alone(teacher, teacher_tok, split_texts[i])
            torch.testing.assert_close(torch.tensor(rows[i][TEACHER_LOGITS]), expected, atol=1e-5, rtol=0)
    # the cached soft targets are the teacher's: mostly right on the training queries
    logits = np.array(prepared["train"][TEACHER_LOGITS])[: len(data["train"])]
    assert (logits.argmax(-1) == np.array(data["train"]["label"])).mean() > 0.8


def test_add_teacher_logits_refuses_texts_of_other_rows(teacher, teacher_tok, student_tok, data):
    tokenized = tokenize_dataset(data, student_tok)
    with pytest.raises(ValueError, match="`texts` has 32 rows, the tokenised split 120"):
        add_teacher_logits(tokenized["train"], teacher, teacher_tok, texts=data["validation"])


def test_a_short_distillation_trains_the_student_on_its_own_tokens(teacher, teacher_tok, student_tok, data, tmp_path):
    student = student_on(student_tok)
    initial = state(student)
    result = train_model(student, student_tok, data, args_for(tmp_path), teacher=(teacher, teacher_tok))
    assert result.trainer.teacher is None  # the cached logits: the teacher never runs on a student batch
    train = result.trainer.train_dataset
    assert train["input_ids"] == student_tok(list(data["train"]["text"]), truncation=True, max_length=128)["input_ids"]
    expected = prepare_datasets(data, student_tok, teacher=teacher, teacher_tokenizer=teacher_tok)["train"]
    assert train[TEACHER_LOGITS] == expected[TEACHER_LOGITS]
    assert result.epoch_table["Step"].tolist() == [STEPS_PER_EPOCH, 2 * STEPS_PER_EPOCH]
    changed = [k for k, v in state(result.model).items() if not torch.equal(v, initial[k])]
    assert "bert.embeddings.word_embeddings.weight" in changed and "classifier.weight" in changed


@pytest.mark.parametrize(("settings", "message"), [
    ({"hidden_weight": 1.0}, r"hidden_weight=1.0 > 0 compares hidden states token by token: set hidden_weight=0"),
    ({"cache_teacher_logits": False}, r"cache_teacher_logits=False .* set cache_teacher_logits=True"),
])
def test_what_needs_shared_tokens_is_refused_before_any_work(
    settings, message, teacher, teacher_tok, student_tok, data, tmp_path
):
    with pytest.raises(TokenizerMismatchError, match=message) as err:
        train_model(student_on(student_tok), student_tok, data, args_for(tmp_path / "run", **settings),
                    teacher=(teacher, teacher_tok))
    assert f"vocab sizes {len(teacher_tok)} vs {len(student_tok)}" in str(err.value)
    assert not (tmp_path / "run").exists()


def test_a_student_of_another_vocabulary_without_the_teachers_tokenizer_is_refused(
    teacher, teacher_tok, student_tok, data, tmp_path
):
    sizes = f"teacher embeds {len(teacher_tok)} token ids and the student {len(student_tok)}"
    with pytest.raises(ValueError, match=sizes + r".*teacher=\(teacher, "):
        train_model(student_on(student_tok), student_tok, data, args_for(tmp_path / "run"), teacher=teacher)
    assert not (tmp_path / "run").exists()
    with pytest.raises(TypeError, match="a \\(model, tokenizer\\) pair; got a tuple of 3"):
        train_model(student_on(student_tok), student_tok, data, args_for(tmp_path / "run"),
                    teacher=(teacher, student_tok, student_tok))


def test_one_vocabulary_trains_exactly_as_before(teacher, teacher_tok, data, tmp_path):
    """The teacher given with a tokenizer of its own vocabulary (another object) changes nothing."""
    results = {}
    for name, given in (("alone", teacher), ("with_tokenizer", (teacher, make_tiny_tokenizer()))):
        student = student_from_teacher(teacher)
        results[name] = train_model(student, teacher_tok, data, args_for(tmp_path / name), teacher=given)
    pd.testing.assert_frame_equal(results["alone"].epoch_table, results["with_tokenizer"].epoch_table)
    alone, paired = state(results["alone"].model), state(results["with_tokenizer"].model)
    assert all(torch.equal(alone[k], paired[k]) for k in alone)
    assert (results["alone"].trainer.train_dataset[TEACHER_LOGITS]
            == results["with_tokenizer"].trainer.train_dataset[TEACHER_LOGITS])
    same = prepare_datasets(data, teacher_tok, teacher=teacher, teacher_tokenizer=make_tiny_tokenizer())["train"]
    assert same[TEACHER_LOGITS] == prepare_datasets(data, teacher_tok, teacher=teacher)["train"][TEACHER_LOGITS]
