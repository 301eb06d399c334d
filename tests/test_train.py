"""Tests of kdlib.train: the loss by hand, validation, cache = online, gradient accumulation,
the epoch table, and train_model end to end (reproducibility, resume) on tiny models."""

from __future__ import annotations

import copy
import inspect
import math
from collections import Counter
from dataclasses import replace

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from datasets import DatasetDict
from transformers import DataCollatorWithPadding, TrainerCallback, TrainingArguments

from kdlib import train as training
from kdlib.config import RunConfig
from kdlib.data import build_dataset_dict
from kdlib.models import forward_inputs, make_tiny_model, make_tiny_tokenizer, num_layers, student_from_teacher
from kdlib.testing import SYNTHETIC_KEYWORDS, synthetic_intents
from kdlib.train import (
    EPOCH_TABLE_COLUMNS,
    NO_LOG,
    STUDENT_SETTINGS,
    TEACHER_LOGITS,
    DistillationTrainer,
    DistillationTrainingArguments,
    add_noisy_copies,
    add_teacher_logits,
    distillation_loss,
    epoch_table,
    hidden_state_loss,
    layer_map,
    prepare_datasets,
    student_arguments,
    teacher_arguments,
    tokenize_dataset,
    train_model,
)

# ---------------------------------------------------------------------------------------------
# Shared fixtures: synthetic keyword data, a tiny tokenizer, a fine-tuned tiny teacher
# ---------------------------------------------------------------------------------------------

LABELS = sorted(SYNTHETIC_KEYWORDS)
N_TRAIN_PER_LABEL = 30  # 120 training examples
BATCH = 16
STEPS_PER_EPOCH = math.ceil(len(LABELS) * N_TRAIN_PER_LABEL / BATCH)  # 8


_split = synthetic_intents


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def data():
    return build_dataset_dict(
        {"train": _split(N_TRAIN_PER_LABEL, 0), "validation": _split(8, 1), "test": _split(8, 2)},
        origin="synthetic",
    )


@pytest.fixture(scope="module")
def tok():
    return make_tiny_tokenizer()


@pytest.fixture(scope="module")
def tokenized(data, tok):
    return tokenize_dataset(data, tok)


@pytest.fixture(scope="module")
def teacher_run(data, tok, tmp_path_factory):
    """alpha = 1: plain fine-tuning of a tiny BERT, as notebook 01 does with the same code."""
    teacher = make_tiny_model("tiny-bert", LABELS, seed=0)
    args = training_args(tmp_path_factory.mktemp("teacher"), alpha=1.0, learning_rate=5e-3, batch_size=BATCH,
                         epochs=6, seed=0)
    return train_model(teacher, tok, data, args)


@pytest.fixture(scope="module")
def teacher(teacher_run):
    return teacher_run.model.eval()


def without_dropout(model):
    """The same weights with every dropout probability at 0 (deterministic in train mode)."""
    config = copy.deepcopy(model.config)
    for name in ("hidden_dropout_prob", "attention_probs_dropout_prob", "classifier_dropout", "dropout",
                 "attention_dropout", "seq_classif_dropout", "qa_dropout"):
        if hasattr(config, name):
            setattr(config, name, 0.0)
    clone = type(model)(config)
    clone.load_state_dict(model.state_dict())
    return clone


def make_args(tmp_path, **kwargs) -> DistillationTrainingArguments:
    """Arguments for a DistillationTrainer built by hand (the run parameters' defaults for alpha, T ...)."""
    return DistillationTrainingArguments(**{"output_dir": str(tmp_path), "report_to": "none", "disable_tqdm": True,
                                            **kwargs})


def training_args(output_dir, **settings) -> DistillationTrainingArguments:
    """The student's arguments of a run with these run parameters, and any other arguments given."""
    run = {k: settings.pop(k) for k in list(settings) if k in STUDENT_SETTINGS}
    return replace(student_arguments(RunConfig(), output_dir, **run), **settings)


def state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def accuracy(model, dataset, tok) -> float:
    model.eval()
    batch = DataCollatorWithPadding(tok)([{k: row[k] for k in ("input_ids", "attention_mask", "label")}
                                          for row in dataset])
    with torch.no_grad():
        logits = model(**forward_inputs(model, batch)).logits
    return float((logits.argmax(-1) == batch["labels"]).float().mean())


# ---------------------------------------------------------------------------------------------
# The loss against a hand computation
# ---------------------------------------------------------------------------------------------

STUDENT = [[1.0, 2.0, 0.5], [0.1, -1.0, 3.0]]
TEACHER = [[2.0, 1.0, 0.0], [0.0, 0.5, 2.5]]
TARGETS = [1, 0]


def _hand_terms(temperature: float):
    """Per-example CE and KL(p_teacher || p_student), written out in float64 numpy."""
    s, t, y = np.array(STUDENT), np.array(TEACHER), np.array(TARGETS)

    def log_softmax(x):
        shifted = x - x.max(axis=-1, keepdims=True)
        return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))

    ce = -log_softmax(s)[np.arange(len(y)), y]
    log_p_teacher = log_softmax(t / temperature)
    log_p_student = log_softmax(s / temperature)
    kl = (np.exp(log_p_teacher) * (log_p_teacher - log_p_student)).sum(axis=-1)
    return ce, kl


def _tensors():
    return torch.tensor(STUDENT), torch.tensor(TEACHER), torch.tensor(TARGETS)


def test_hand_terms_are_right():
    """Pin the hand computation itself on one value worked out on paper (example 0, T = 1)."""
    ce, kl = _hand_terms(1.0)
    z = math.exp(1.0) + math.exp(2.0) + math.exp(0.5)
    assert ce[0] == pytest.approx(math.log(z) - 2.0, abs=1e-12)
    p = [math.exp(v) / sum(math.exp(u) for u in TEACHER[0]) for v in TEACHER[0]]
    q = [math.exp(v) / z for v in STUDENT[0]]
    assert kl[0] == pytest.approx(sum(pi * math.log(pi / qi) for pi, qi in zip(p, q, strict=True)), abs=1e-12)


@pytest.mark.parametrize("alpha, temperature", [(0.3, 2.0), (0.5, 1.0), (0.9, 4.0)])
def test_loss_matches_hand_computation(alpha, temperature):
    ce, kl = _hand_terms(temperature)
    batch = len(TARGETS)
    expected = alpha * ce.mean() + (1 - alpha) * temperature**2 * kl.sum() / batch  # CE mean, KL batchmean
    s, t, y = _tensors()
    got = distillation_loss(s, t, y, alpha=alpha, temperature=temperature)
    assert got.item() == pytest.approx(expected, abs=1e-6)
    # The reference's own formulation (nn.KLDivLoss(reduction="batchmean")) agrees.
    kl_ref = torch.nn.KLDivLoss(reduction="batchmean")(
        F.log_softmax(s / temperature, dim=-1), F.softmax(t / temperature, dim=-1)
    )
    reference = alpha * F.cross_entropy(s, y) + (1 - alpha) * temperature**2 * kl_ref
    assert got.item() == pytest.approx(reference.item(), abs=1e-6)


@pytest.mark.parametrize("n", [2, 5, torch.tensor(8)])
def test_loss_with_num_items_in_batch_is_sum_over_n(n):
    alpha, temperature = 0.3, 2.0
    ce, kl = _hand_terms(temperature)
    expected = (alpha * ce + (1 - alpha) * temperature**2 * kl).sum() / int(n)
    got = distillation_loss(*_tensors(), alpha=alpha, temperature=temperature, num_items_in_batch=n)
    assert got.item() == pytest.approx(expected, abs=1e-6)


def test_alpha_one_is_cross_entropy_and_needs_no_teacher():
    s, _, y = _tensors()
    ce, _ = _hand_terms(1.0)
    got = distillation_loss(s, None, y, alpha=1.0, temperature=2.0)
    assert got.item() == pytest.approx(ce.mean(), abs=1e-6)
    assert torch.allclose(got, F.cross_entropy(s, y), atol=1e-7)


def test_alpha_zero_is_pure_kl_term():
    s, t, y = _tensors()
    temperature = 3.0
    _, kl = _hand_terms(temperature)
    got = distillation_loss(s, t, y, alpha=0.0, temperature=temperature)
    assert got.item() == pytest.approx(temperature**2 * kl.mean(), abs=1e-6)
    # The labels play no part.
    relabelled = distillation_loss(s, t, 2 - y, alpha=0.0, temperature=temperature)
    assert relabelled.item() == pytest.approx(got.item())
    # Teacher = student: nothing to learn.
    same = distillation_loss(s, s, y, alpha=0.0, temperature=temperature)
    assert same.item() == pytest.approx(0.0, abs=1e-7)


def test_gradient_flows_to_student_only():
    s, t, y = _tensors()
    s.requires_grad_(True)
    t.requires_grad_(True)
    distillation_loss(s, t, y, alpha=0.5, temperature=2.0).backward()
    assert s.grad is not None and s.grad.abs().sum() > 0
    # the teacher is a constant target; a gradient through it would be harmless but wasteful
    assert t.grad is None or torch.isfinite(t.grad).all()


def test_wrong_teacher_shape_is_a_clear_error():
    s, _, y = _tensors()
    with pytest.raises(ValueError, match=r"\(2, 4\).*\(2, 3\).*shape"):
        distillation_loss(s, torch.zeros(2, 4), y, alpha=0.5, temperature=2.0)
    with pytest.raises(ValueError, match="shape"):
        distillation_loss(s, torch.zeros(3, 3), y, alpha=0.5, temperature=2.0)


def test_alpha_below_one_without_teacher_logits_is_a_clear_error():
    s, _, y = _tensors()
    with pytest.raises(ValueError, match="teacher"):
        distillation_loss(s, None, y, alpha=0.5, temperature=2.0)


# ---------------------------------------------------------------------------------------------
# Invalid alpha / temperature: the same clear error from every entry point, checked once (not per step)
# ---------------------------------------------------------------------------------------------

BAD = [
    ("alpha", -0.1, r"alpha must be in \[0, 1\]"),
    ("alpha", 1.5, r"alpha must be in \[0, 1\]"),
    ("alpha", float("nan"), r"alpha must be in \[0, 1\]"),
    ("temperature", 0, r"temperature must be > 0"),
    ("temperature", 0.0, r"temperature must be > 0"),
    ("temperature", -1, r"temperature must be > 0"),
    ("temperature", float("nan"), r"temperature must be > 0"),
]


@pytest.mark.parametrize("name, value, message", BAD)
def test_invalid_alpha_temperature_in_the_arguments(name, value, message, tmp_path):
    with pytest.raises(ValueError, match=message):
        DistillationTrainingArguments(output_dir=str(tmp_path), **{name: value})


@pytest.mark.parametrize("name, value, message", BAD)
def test_invalid_alpha_temperature_in_a_copy_of_the_arguments(name, value, message, tmp_path):
    """``dataclasses.replace`` (how a search trial or a caller changes one setting) checks again."""
    with pytest.raises(ValueError, match=message):
        replace(make_args(tmp_path), **{name: value})


@pytest.mark.parametrize("name, value, message", BAD)
def test_invalid_alpha_temperature_in_the_run_parameters(name, value, message, tmp_path):
    """The run parameters of a training are validated as the run's own, naming the parameter."""
    with pytest.raises(ValueError, match=f"{name} = "):
        student_arguments(RunConfig(), tmp_path, **{name: value})


@pytest.mark.parametrize("alpha, temperature", [(0, 1), (1, 0.5), (0.5, 20.0)])
def test_valid_edges_are_accepted(alpha, temperature, tmp_path):
    assert make_args(tmp_path, alpha=alpha, temperature=temperature).temperature == temperature
    assert torch.isfinite(distillation_loss(*_tensors(), alpha=alpha, temperature=temperature))


def test_train_model_refuses_distillation_without_teacher(data, tok, tmp_path):
    with pytest.raises(ValueError, match="teacher"):
        train_model(make_tiny_model("tiny-bert", LABELS), tok, data, make_args(tmp_path, alpha=0.5))


def test_trainer_takes_its_loss_settings_from_its_arguments(tmp_path):
    plain = TrainingArguments(output_dir=str(tmp_path), report_to="none")
    with pytest.raises(TypeError, match="DistillationTrainingArguments"):
        DistillationTrainer(model=make_tiny_model("tiny-bert", LABELS), args=plain)
    with pytest.raises(TypeError, match="DistillationTrainingArguments"):  # positional, as Trainer allows
        DistillationTrainer(make_tiny_model("tiny-bert", LABELS), plain)


def test_train_model_refuses_other_arguments_before_any_work(data, tok, tmp_path):
    with pytest.raises(TypeError, match="args must be a kdlib DistillationTrainingArguments"):
        train_model(make_tiny_model("tiny-bert", LABELS), tok, data, TrainingArguments(output_dir=str(tmp_path)))
    assert not list(tmp_path.iterdir())


def test_train_model_takes_its_trainer_as_a_parameter_within_eight():
    parameters = inspect.signature(train_model).parameters
    assert parameters["trainer_class"].default is DistillationTrainer  # a subclass or a partial replaces it
    assert len(parameters) <= 8


def test_run_parameters_that_are_not_a_trainings_are_refused(tmp_path):
    with pytest.raises(ValueError, match="keep_layers: not a setting of this training"):
        student_arguments(RunConfig(), tmp_path, keep_layers=[0])
    with pytest.raises(ValueError, match="alpha: not a setting of this training"):
        teacher_arguments(RunConfig(), tmp_path, alpha=0.5)  # the teacher's loss is cross-entropy only
    with pytest.raises(ValueError, match="epoch: not a setting of this training; it reads alpha, .*epochs"):
        student_arguments(RunConfig(), tmp_path, epoch=2)


@pytest.mark.parametrize(("name", "value"), [("cache_teacher_logits", "no"), ("resume", 1), ("max_length", 0)])
def test_the_other_settings_are_checked_when_built(name, value, tmp_path):
    with pytest.raises(ValueError, match=f"{name} must be"):
        make_args(tmp_path, **{name: value})


# ---------------------------------------------------------------------------------------------
# Cached teacher logits = online teacher
# ---------------------------------------------------------------------------------------------


def test_add_teacher_logits_equals_teacher_on_each_example_alone(teacher, tokenized, tok):
    # a small batch size so that batches mix lengths and are padded
    cached = add_teacher_logits(tokenized, teacher, tok, batch_size=7)
    assert TEACHER_LOGITS in cached["train"].column_names
    assert TEACHER_LOGITS in cached["validation"].column_names
    assert TEACHER_LOGITS not in cached["test"].column_names  # only the splits asked for
    ds = cached["validation"]
    lengths = {len(ids) for ids in ds["input_ids"]}
    assert len(lengths) > 3, "the check is only meaningful when batches need padding"
    teacher.eval()
    for row in ds:
        inputs = {k: torch.tensor([row[k]]) for k in ("input_ids", "attention_mask", "token_type_ids")}
        with torch.no_grad():
            alone = teacher(**inputs).logits[0]
        assert torch.allclose(torch.tensor(row[TEACHER_LOGITS]), alone, atol=1e-5), row
    # a single Dataset works too, and gives the same numbers
    single = add_teacher_logits(tokenized["validation"], teacher, tok)
    np.testing.assert_allclose(np.array(single[TEACHER_LOGITS]), np.array(ds[TEACHER_LOGITS]), atol=1e-5)


@pytest.mark.parametrize("student_kind", ["bert", "distilbert"])
def test_compute_loss_cached_equals_online(student_kind, teacher, tokenized, tok, tmp_path):
    cached = add_teacher_logits(tokenized, teacher, tok)
    if student_kind == "bert":
        student = student_from_teacher(teacher)
    else:
        student = make_tiny_model("tiny-distilbert", LABELS, seed=1)
    student.eval()
    args = make_args(tmp_path, per_device_eval_batch_size=12, alpha=0.3, temperature=3.0)
    collator = DataCollatorWithPadding(tok)
    with_cache = DistillationTrainer(model=student, args=args, eval_dataset=cached["validation"],
                                     data_collator=collator)
    online = DistillationTrainer(model=student, args=args, teacher_model=teacher, data_collator=collator)
    # The batch exactly as the Trainer builds it (unused columns such as DistilBERT's token_type_ids removed).
    batch = with_cache._prepare_inputs(next(iter(with_cache.get_eval_dataloader())))
    assert TEACHER_LOGITS in batch and batch["input_ids"].shape[0] == 12
    assert (batch["attention_mask"] == 0).any(), "the batch should be padded"
    without_cache = {k: v for k, v in batch.items() if k != TEACHER_LOGITS}
    for n in (None, 24):
        loss_cached = with_cache.compute_loss(student, batch, num_items_in_batch=n)
        loss_online = online.compute_loss(student, without_cache, num_items_in_batch=n)
        assert loss_cached.item() == pytest.approx(loss_online.item(), abs=1e-6)
    # compute_loss must not consume the caller's batch
    assert TEACHER_LOGITS in batch and "labels" in batch
    # ... and the cached column is really what the loss uses
    confident = 10.0 * F.one_hot((batch["labels"] + 1) % len(LABELS), len(LABELS)).float()
    other = dict(batch, **{TEACHER_LOGITS: confident})
    baseline = with_cache.compute_loss(student, batch).item()
    assert abs(with_cache.compute_loss(student, other).item() - baseline) > 0.1
    # return_outputs gives the student's logits
    loss, outputs = with_cache.compute_loss(student, batch, return_outputs=True)
    assert outputs.logits.shape == (12, len(LABELS))


# ---------------------------------------------------------------------------------------------
# The hidden-state term (TinyBERT / PKD style) against a hand computation
# ---------------------------------------------------------------------------------------------


def test_layer_map_is_evenly_spaced_and_ends_at_the_last_layer():
    assert layer_map(3, 6) == [0, 2, 4, 6]  # the depths of default_keep_layers(6) = [1, 3, 5]
    assert layer_map(2, 12) == [0, 6, 12]
    assert layer_map(4, 4) == [0, 1, 2, 3, 4]


def test_hidden_state_loss_matches_hand_computation():
    rng = np.random.default_rng(0)
    student = [rng.normal(size=(2, 3, 4)) for _ in range(3)]  # embeddings + 2 layers
    teacher = [rng.normal(size=(2, 3, 4)) for _ in range(5)]  # embeddings + 4 layers
    mask = np.array([[1, 1, 0], [1, 1, 1]])
    expected = np.zeros(2)
    for s_index, t_index in enumerate([0, 2, 4]):  # 2 of 4 layers: depths 2 and 4
        for example in range(2):
            tokens = mask[example].sum()
            diff = (student[s_index][example] - teacher[t_index][example])[: tokens]
            expected[example] += (diff**2).sum() / (tokens * 4) / 3
    as_torch = [torch.tensor(x, dtype=torch.float32) for x in student]
    got = hidden_state_loss(as_torch, [torch.tensor(x, dtype=torch.float32) for x in teacher], torch.tensor(mask))
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-5)
    # padded positions do not count: changing them changes nothing
    as_torch[1][0, 2] += 100.0
    changed = hidden_state_loss(as_torch, [torch.tensor(x, dtype=torch.float32) for x in teacher], torch.tensor(mask))
    np.testing.assert_allclose(changed.numpy(), expected, rtol=1e-5)


def test_hidden_weight_adds_its_term_to_the_loss():
    s, t, y = _tensors()
    hidden = ([torch.ones(2, 3, 4)] * 2, [torch.zeros(2, 3, 4)] * 3, torch.ones(2, 3))  # MSE 1 per example
    base = distillation_loss(s, t, y, alpha=0.5, temperature=2.0)
    with_hidden = distillation_loss(s, t, y, alpha=0.5, temperature=2.0, hidden_weight=0.7, hidden_states=hidden)
    assert with_hidden.item() == pytest.approx(base.item() + 0.7)
    # 0 is today's loss, whatever hidden states are passed
    assert distillation_loss(s, t, y, alpha=0.5, temperature=2.0, hidden_states=hidden).item() == base.item()
    with pytest.raises(ValueError, match="hidden states"):
        distillation_loss(s, t, y, alpha=0.5, temperature=2.0, hidden_weight=1.0)
    with pytest.raises(ValueError, match="one shape"):
        hidden_state_loss([torch.ones(2, 3, 4)] * 2, [torch.zeros(2, 3, 8)] * 2, torch.ones(2, 3))


@pytest.mark.parametrize("value", [-0.1, float("nan"), float("inf")])
def test_invalid_hidden_weight_is_refused(value, tmp_path):
    with pytest.raises(ValueError, match="hidden_weight"):
        make_args(tmp_path, hidden_weight=value)


def test_compute_loss_with_hidden_weight_pulls_the_student_to_the_teacher(teacher, tokenized, tok, tmp_path):
    """The Trainer's loss = the logit loss + weight x hidden_state_loss of the models' own hidden states;
    a student copied from the teacher's layers starts close to it, a random one far."""
    collator = DataCollatorWithPadding(tok)
    batch = collator([{k: row[k] for k in ("input_ids", "attention_mask", "label")}
                      for row in tokenized["validation"]])
    batch = dict(batch)
    copied = student_from_teacher(teacher).eval()
    terms = {}
    for name, student in {"copied": copied, "random": make_tiny_model("tiny-bert", LABELS, seed=9).eval()}.items():
        plain = DistillationTrainer(model=student, args=make_args(tmp_path), teacher_model=teacher,
                                    data_collator=collator)
        weighted = DistillationTrainer(model=student, args=make_args(tmp_path, hidden_weight=2.0),
                                       teacher_model=teacher, data_collator=collator)
        with torch.no_grad():
            s_out = student(**forward_inputs(student, batch), output_hidden_states=True)
            t_out = teacher(**forward_inputs(teacher, batch), output_hidden_states=True)
            hand = hidden_state_loss(s_out.hidden_states, t_out.hidden_states, batch["attention_mask"]).mean()
            difference = weighted.compute_loss(student, batch) - plain.compute_loss(student, batch)
        assert difference.item() == pytest.approx(2.0 * hand.item(), rel=1e-5)
        terms[name] = hand.item()
    assert terms["copied"] < terms["random"]
    # without a teacher model there are no hidden states: refused when the trainer is built, before any step
    with pytest.raises(ValueError, match="teacher_model"):
        DistillationTrainer(model=copied, args=make_args(tmp_path, hidden_weight=2.0), data_collator=collator)


def test_train_model_with_hidden_weight_needs_a_teacher_and_trains(teacher, data, tok, tmp_path):
    args = training_args(tmp_path, alpha=0.5, hidden_weight=1.0, learning_rate=5e-3, batch_size=BATCH, epochs=1, seed=0)
    alone = replace(args, alpha=1.0)  # no KL term: the hidden-state term alone needs the teacher
    with pytest.raises(ValueError, match="hidden_weight=1.0 > 0"):
        train_model(student_from_teacher(teacher), tok, data, alone)
    student = student_from_teacher(teacher)
    result = train_model(student, tok, data, args, teacher=teacher)
    assert result.trainer.args.hidden_weight == 1.0 and result.trainer.teacher is teacher
    assert np.isfinite(result.epoch_table["Training Loss"].iloc[-1])


# ---------------------------------------------------------------------------------------------
# Noisy copies of the training queries
# ---------------------------------------------------------------------------------------------


def test_noisy_copies_are_fragments_of_their_query_the_same_every_run(data, tmp_path):
    copied = add_noisy_copies(data, 2, seed=0)
    train, n = copied["train"], len(data["train"])
    assert len(train) == 3 * n and copied["validation"] is data["validation"] and copied["test"] is data["test"]
    assert train.features["label"] == data["train"].features["label"]
    texts, originals = list(train["text"]), list(data["train"]["text"])
    assert texts[:n] == originals and list(train["label"]) == list(data["train"]["label"]) * 3
    for i, text in enumerate(texts[n:]):  # a copy keeps some of its query's words, none added
        assert text and Counter(text.split()) <= Counter(originals[i % n].split())
    assert sum(text != originals[i % n] for i, text in enumerate(texts[n:])) > n // 2  # most differ
    assert list(add_noisy_copies(data, 2, seed=0)["train"]["text"]) == texts
    assert list(add_noisy_copies(data, 2, seed=1)["train"]["text"]) != texts
    assert add_noisy_copies(data, 0, seed=0) is data
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="augment_copies"):
            add_noisy_copies(data, bad, seed=0)
        with pytest.raises(ValueError, match="augment_copies"):
            make_args(tmp_path, augment_copies=bad)


def test_training_with_copies_trains_on_them_with_the_teachers_logits(teacher, data, tok, tmp_path):
    args = training_args(tmp_path, alpha=0.5, augment_copies=1, learning_rate=5e-3, batch_size=BATCH, epochs=1, seed=0)
    result = train_model(student_from_teacher(teacher), tok, data, args, teacher=teacher)
    n = len(data["train"])
    assert len(result.trainer.train_dataset) == 2 * n
    assert result.trainer.state.global_step == math.ceil(2 * n / BATCH)
    copies = add_noisy_copies(data, 1, seed=0)["train"].select(range(n, 2 * n))
    expected = add_teacher_logits(tokenize_dataset(DatasetDict({"train": copies}), tok), teacher, tok)["train"]
    cached = result.trainer.train_dataset.select(range(n, 2 * n))
    assert list(cached["input_ids"]) == list(expected["input_ids"])  # the copies of the same seed
    np.testing.assert_allclose(np.array(cached[TEACHER_LOGITS]), np.array(expected[TEACHER_LOGITS]), atol=1e-5)
    # the search's shared preparation must hold the same copies: refused before the checkpoints are touched
    before = sorted(str(path) for path in tmp_path.rglob("*"))
    with pytest.raises(ValueError, match="pass augment_copies=1 to prepare_datasets"):
        train_model(student_from_teacher(teacher), tok, data, replace(args, resume=False), teacher=teacher,
                    prepared=prepare_datasets(data, tok, teacher=teacher))
    assert sorted(str(path) for path in tmp_path.rglob("*")) == before
    prepared = prepare_datasets(data, tok, teacher=teacher, augment_copies=1, seed=0)
    assert list(prepared["train"]["input_ids"]) == list(result.trainer.train_dataset["input_ids"])


# ---------------------------------------------------------------------------------------------
# Gradient accumulation: one batch of 8 = two accumulated batches of 4
# ---------------------------------------------------------------------------------------------


def _grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("online", [False, True], ids=["cached", "online"])
def test_gradient_accumulation_is_exact(online, teacher, tokenized, tok, tmp_path):
    cached = add_teacher_logits(tokenized, teacher, tok)
    student = without_dropout(student_from_teacher(teacher))
    student.train()
    args = make_args(tmp_path, gradient_accumulation_steps=2, per_device_train_batch_size=4, alpha=0.5, temperature=2.0)
    trainer = DistillationTrainer(model=student, args=args, teacher_model=teacher if online else None)
    collator = DataCollatorWithPadding(tok)
    # rows of very different lengths, so the two halves are padded differently from the whole
    ds = cached["train"]
    order = np.argsort([len(ids) for ids in ds["input_ids"]])
    rows = [ds[int(i)] for i in (*order[:3], *order[-1:], *order[3:4], *order[-3:])]
    assert len({len(r["input_ids"]) for r in rows}) >= 4

    def batch(part):
        b = collator([dict(r) for r in part])
        return {k: v for k, v in b.items() if not (online and k == TEACHER_LOGITS)}

    whole, first, second = batch(rows), batch(rows[:4]), batch(rows[4:])
    # dropout is off, so train mode is deterministic
    with torch.no_grad():
        assert torch.equal(student(**forward_inputs(student, whole)).logits,
                           student(**forward_inputs(student, whole)).logits)

    student.zero_grad()
    loss_whole = trainer.training_step(student, whole, num_items_in_batch=8)
    grads_whole = _grads(student)
    student.zero_grad()
    loss_1 = trainer.training_step(student, first, num_items_in_batch=8)
    loss_2 = trainer.training_step(student, second, num_items_in_batch=8)
    grads_accumulated = _grads(student)

    assert grads_whole.keys() == grads_accumulated.keys() and len(grads_whole) > 10
    for name, g in grads_whole.items():
        torch.testing.assert_close(grads_accumulated[name], g, atol=1e-6, rtol=1e-5, msg=name)
    # The loss is already normalised by num_items_in_batch, so training_step does not divide it again:
    # the two returned half-losses add up to the mean loss of the whole batch ...
    assert (loss_1 + loss_2).item() == pytest.approx(loss_whole.item(), abs=1e-6)
    # ... which is the batch-mean distillation loss (num_items_in_batch=None).
    with torch.no_grad():
        assert loss_whole.item() == pytest.approx(trainer.compute_loss(student, whole).item(), abs=1e-6)

    # Without num_items_in_batch, training_step divides each batch mean by the accumulation steps:
    # equal halves then give the same gradient too.
    trainer.current_gradient_accumulation_steps = 2
    student.zero_grad()
    mean_1 = trainer.training_step(student, first)
    mean_2 = trainer.training_step(student, second)
    for name, g in grads_whole.items():
        torch.testing.assert_close(student.get_parameter(name).grad, g, atol=1e-6, rtol=1e-5, msg=name)
    assert (mean_1 + mean_2).item() == pytest.approx(loss_whole.item(), abs=1e-6)


def test_gradient_accumulation_with_unequal_batches(teacher, tokenized, tok, tmp_path):
    """3 + 5 examples: only the num_items_in_batch form is exact, the per-batch mean is not."""
    cached = add_teacher_logits(tokenized, teacher, tok)
    student = without_dropout(student_from_teacher(teacher))
    # A model that does not advertise loss kwargs: the Trainer would then treat the loss as a per-batch
    # mean and divide it by the accumulation steps; DistillationTrainer must still count examples.
    student.accepts_loss_kwargs = False
    trainer = DistillationTrainer(model=student, args=make_args(tmp_path, gradient_accumulation_steps=2))
    assert trainer.model_accepts_loss_kwargs
    collator = DataCollatorWithPadding(tok)
    rows = [dict(cached["train"][i]) for i in range(0, 120, 15)]
    student.zero_grad()
    trainer.training_step(student, collator(rows), num_items_in_batch=8)
    reference = _grads(student)
    student.zero_grad()
    trainer.training_step(student, collator(rows[:3]), num_items_in_batch=torch.tensor(8))
    trainer.training_step(student, collator(rows[3:]), num_items_in_batch=torch.tensor(8))
    for name, g in reference.items():
        torch.testing.assert_close(student.get_parameter(name).grad, g, atol=1e-6, rtol=1e-5, msg=name)


# ---------------------------------------------------------------------------------------------
# The epoch table
# ---------------------------------------------------------------------------------------------


def test_epoch_table_from_hand_written_log_history():
    history = [
        # no training-loss log before the first evaluation (fewer steps than logging_steps)
        {"eval_loss": 1.23456, "eval_accuracy": 0.25, "epoch": 1.0, "step": 8},
        {"loss": 1.5, "grad_norm": 3.0, "learning_rate": 1e-5, "epoch": 1.5, "step": 12},
        {"loss": 0.987654, "grad_norm": 2.0, "learning_rate": 1e-5, "epoch": 2.0, "step": 16},
        {"eval_loss": 0.876543, "eval_accuracy": 0.56789, "epoch": 2.0, "step": 16},
        {"loss": 0.5, "epoch": 2.3333333, "step": 20},
        {"eval_loss": 0.5, "eval_accuracy": 0.75, "epoch": 2.3333333, "step": 20},
        {"train_runtime": 1.0, "train_loss": 0.9, "epoch": 2.3333333, "step": 20},
    ]
    table = epoch_table(history)
    assert list(table.columns) == EPOCH_TABLE_COLUMNS
    expected = pd.DataFrame(
        [
            [NO_LOG, 1.0, 8, 1.2346, 0.25],
            [0.9877, 2.0, 16, 0.8765, 0.5679],  # the last training loss logged before this evaluation
            [0.5, 2.33, 20, 0.5, 0.75],
        ],
        columns=EPOCH_TABLE_COLUMNS,
    )
    pd.testing.assert_frame_equal(table, expected)
    assert NO_LOG == "No log"


def test_epoch_table_empty_and_without_accuracy():
    empty = epoch_table([])
    assert list(empty.columns) == EPOCH_TABLE_COLUMNS and len(empty) == 0
    table = epoch_table([{"loss": 2.0, "epoch": 1.0, "step": 3}, {"eval_loss": 1.0, "epoch": 1.0, "step": 3}])
    assert table["Training Loss"].tolist() == [2.0]
    assert math.isnan(table["Accuracy"].iloc[0])


def test_epoch_table_reads_the_log_as_the_hugging_face_model_cards_do():
    """transformers.modelcard.parse_log_history: a loss logged once stands for every later evaluation."""
    from transformers.modelcard import parse_log_history

    history = [
        {"loss": 2.0, "epoch": 0.5, "step": 4},
        {"eval_loss": 1.5, "eval_accuracy": 0.5, "epoch": 0.5, "step": 4},
        {"eval_loss": 1.25, "eval_accuracy": 0.6, "epoch": 1.0, "step": 8},
        {"train_runtime": 1.0, "train_loss": 2.0, "epoch": 1.0, "step": 8},
    ]
    assert epoch_table(history)["Training Loss"].tolist() == [2.0, 2.0]
    _, lines, _ = parse_log_history(history)
    assert [line["Training Loss"] for line in lines] == [2.0, 2.0]


# ---------------------------------------------------------------------------------------------
# train_model end to end
# ---------------------------------------------------------------------------------------------


def _distil_args(output_dir, **kwargs) -> DistillationTrainingArguments:
    defaults = dict(alpha=0.5, temperature=2.0, learning_rate=3e-3, batch_size=BATCH, epochs=2, seed=7)
    return training_args(output_dir, **{**defaults, **kwargs})


def test_teacher_fine_tuning_learns(teacher_run, tokenized, tok):
    table = teacher_run.epoch_table
    assert list(table.columns) == EPOCH_TABLE_COLUMNS
    assert table["Step"].tolist() == [STEPS_PER_EPOCH * e for e in range(1, 7)]
    assert table["Epoch"].tolist() == [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]
    assert NO_LOG not in table["Training Loss"].tolist()  # logging_strategy="epoch"
    assert table["Validation Loss"].iloc[-1] < table["Validation Loss"].iloc[0]
    # chance is 0.25; keyword data is easy
    assert table["Accuracy"].iloc[-1] >= 0.6
    # the table's accuracy is that of the returned model
    assert accuracy(teacher_run.model, tokenized["validation"], tok) == pytest.approx(
        table["Accuracy"].iloc[-1], abs=1e-4)
    assert teacher_run.resumed_from is None and teacher_run.train_seconds > 0


@pytest.fixture(scope="module")
def distil_runs(teacher, data, tok, tmp_path_factory):
    """The same cached distillation twice (same seed), plus one with another seed."""
    runs = {}
    for name, seed in (("a", 7), ("b", 7), ("other_seed", 8)):
        student = student_from_teacher(teacher)
        initial = state(student)
        result = train_model(student, tok, data, _distil_args(tmp_path_factory.mktemp(f"distil_{name}"), seed=seed),
                             teacher=teacher)
        runs[name] = (student, initial, result)
    return runs


def test_distillation_trains_the_returned_model(distil_runs, tokenized, tok):
    student, initial, result = distil_runs["a"]
    assert result.model is student
    final = state(result.model)
    changed = [k for k in initial if not torch.equal(initial[k], final[k])]
    assert "classifier.weight" in changed and len(changed) > len(initial) // 2
    table = result.epoch_table
    assert table["Step"].tolist() == [STEPS_PER_EPOCH, 2 * STEPS_PER_EPOCH]
    assert table["Epoch"].tolist() == [1.0, 2.0]
    assert result.trainer.state.global_step == 2 * STEPS_PER_EPOCH
    assert accuracy(result.model, tokenized["validation"], tok) == pytest.approx(
        table["Accuracy"].iloc[-1], abs=1e-4)
    assert result.args.alpha == 0.5 and result.log_history == result.trainer.state.log_history


def test_same_seed_reproduces_exactly(distil_runs):
    _, _, a = distil_runs["a"]
    _, _, b = distil_runs["b"]
    pd.testing.assert_frame_equal(a.epoch_table, b.epoch_table)
    wa, wb = state(a.model), state(b.model)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    # ... and the check can fail: another seed (another data order) gives other weights
    _, _, other = distil_runs["other_seed"]
    wo = state(other.model)
    assert not all(torch.equal(wa[k], wo[k]) for k in wa)


def test_distilbert_student_with_bert_teacher_cache_and_online(teacher, data, tok, tmp_path):
    results = {}
    for cache in (True, False):
        student = make_tiny_model("tiny-distilbert", LABELS, seed=3)
        args = _distil_args(tmp_path / str(cache), cache_teacher_logits=cache)
        results[cache] = train_model(student, tok, data, args, teacher=teacher)
    cached, online = results[True], results[False]
    assert TEACHER_LOGITS in cached.trainer.train_dataset.column_names
    assert online.trainer.teacher is teacher
    assert TEACHER_LOGITS not in online.trainer.train_dataset.column_names
    for result in (cached, online):
        assert result.epoch_table["Step"].tolist() == [STEPS_PER_EPOCH, 2 * STEPS_PER_EPOCH]
        assert np.isfinite(result.epoch_table["Validation Loss"]).all()
    # the teacher's logits are the same either way, so the two runs train alike
    np.testing.assert_allclose(cached.epoch_table["Validation Loss"], online.epoch_table["Validation Loss"],
                               atol=1e-3)
    wc, wo = state(cached.model), state(online.model)
    for k in wc:
        torch.testing.assert_close(wc[k], wo[k], atol=1e-4, rtol=1e-4, msg=k)
    # the teacher stays frozen and unchanged
    assert not any(p.requires_grad for p in teacher.parameters())


# ---------------------------------------------------------------------------------------------
# Resume
# ---------------------------------------------------------------------------------------------


class Interrupted(Exception):
    pass


class _InterruptAfterFirstCheckpoint(TrainerCallback):
    def on_save(self, args, state, control, **kwargs):
        if state.global_step == STEPS_PER_EPOCH:
            raise Interrupted(f"killed after saving step {state.global_step}")


class _CountSteps(TrainerCallback):
    def __init__(self):
        self.steps = []

    def on_step_end(self, args, state, control, **kwargs):
        self.steps.append(state.global_step)


class _InterruptingTrainer(DistillationTrainer):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.add_callback(_InterruptAfterFirstCheckpoint())


class _CountingTrainer(DistillationTrainer):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.add_callback(_CountSteps())


def test_resume_continues_an_interrupted_run(teacher, data, tok, tmp_path):
    def run(output_dir, trainer_class=DistillationTrainer, **kwargs):
        student = student_from_teacher(teacher)
        return train_model(student, tok, data, _distil_args(output_dir, epochs=2, **kwargs), teacher=teacher,
                           trainer_class=trainer_class)

    reference = run(tmp_path / "uninterrupted")

    folder = tmp_path / "interrupted"
    with pytest.raises(Interrupted):
        run(folder, trainer_class=_InterruptingTrainer)
    assert sorted(p.name for p in folder.glob("*/checkpoint-*")) == [f"checkpoint-{STEPS_PER_EPOCH}"]

    resumed = run(folder, trainer_class=_CountingTrainer)
    # only the second epoch was trained by this call
    counter = next(c for c in resumed.trainer.callback_handler.callbacks if isinstance(c, _CountSteps))
    assert counter.steps == list(range(STEPS_PER_EPOCH + 1, 2 * STEPS_PER_EPOCH + 1))
    assert resumed.resumed_from is not None
    assert resumed.resumed_from.endswith(f"checkpoint-{STEPS_PER_EPOCH}")
    assert resumed.trainer.state.global_step == 2 * STEPS_PER_EPOCH
    assert resumed.epoch_table["Step"].tolist() == [STEPS_PER_EPOCH, 2 * STEPS_PER_EPOCH]
    # the checkpoint's RNG and data-order state are restored: the result is the uninterrupted one
    pd.testing.assert_frame_equal(resumed.epoch_table, reference.epoch_table, atol=1e-4)
    w_ref, w_res = state(reference.model), state(resumed.model)
    for k in w_ref:
        torch.testing.assert_close(w_res[k], w_ref[k], atol=1e-5, rtol=1e-5, msg=k)

    # other settings: never the older run's checkpoints, a fresh training in its own folder
    other = train_model(student_from_teacher(teacher), tok, data, _distil_args(folder, epochs=1, learning_rate=1e-3),
                        teacher=teacher)
    assert other.resumed_from is None and other.checkpoint_dir != resumed.checkpoint_dir
    assert (resumed.checkpoint_dir / f"checkpoint-{2 * STEPS_PER_EPOCH}").is_dir()  # the older run is kept

    # resume=False starts over (its own checkpoints deleted)
    fresh = run(folder, resume=False)
    assert fresh.resumed_from is None and fresh.checkpoint_dir == resumed.checkpoint_dir
    assert fresh.trainer.state.global_step == 2 * STEPS_PER_EPOCH


def test_resume_after_a_finished_run_trains_nothing_more(teacher, data, tok, tmp_path):
    args = _distil_args(tmp_path, epochs=1)
    first = train_model(student_from_teacher(teacher), tok, data, args, teacher=teacher)
    again = train_model(student_from_teacher(teacher), tok, data, args, teacher=teacher, trainer_class=_CountingTrainer)
    counter = next(c for c in again.trainer.callback_handler.callbacks if isinstance(c, _CountSteps))
    assert counter.steps == []
    assert again.resumed_from.endswith(f"checkpoint-{STEPS_PER_EPOCH}")
    pd.testing.assert_frame_equal(again.epoch_table, first.epoch_table)
    w1, w2 = state(first.model), state(again.model)
    assert all(torch.equal(w1[k], w2[k]) for k in w1)


# ---------------------------------------------------------------------------------------------
# Regression tests for bugs found in review
# ---------------------------------------------------------------------------------------------


def test_infinite_temperature_is_refused(tmp_path):
    with pytest.raises(ValueError, match="temperature"):
        make_args(tmp_path, alpha=0.5, temperature=float("inf"))


def test_warmup_ratio_is_used(tmp_path):
    args = teacher_arguments(RunConfig(finetune_warmup_ratio=0.1), tmp_path)
    assert args.get_warmup_steps(100) == 10


def test_other_training_overrides_never_resume(teacher, data, tok, tmp_path):
    first = train_model(student_from_teacher(teacher), tok, data,
                        _distil_args(tmp_path, epochs=1, lr_scheduler_type="constant"), teacher=teacher)
    second = train_model(student_from_teacher(teacher), tok, data,
                         _distil_args(tmp_path, epochs=1, lr_scheduler_type="linear"), teacher=teacher)
    assert second.resumed_from is None and second.checkpoint_dir != first.checkpoint_dir


def test_checkpoints_of_another_initialisation_are_never_resumed(teacher, data, tok, tmp_path):
    # Same settings, other starting weights (another choice of layers): resuming would silently
    # return the other student, so each initialisation has its own checkpoints.
    args = _distil_args(tmp_path, epochs=1)
    layers = num_layers(teacher)
    first = train_model(student_from_teacher(teacher, [0]), tok, data, args, teacher=teacher)
    other = train_model(student_from_teacher(teacher, [layers - 1]), tok, data, args, teacher=teacher)
    assert other.resumed_from is None and other.checkpoint_dir != first.checkpoint_dir
    # the same initialisation resumes (nothing left to train)
    again = train_model(student_from_teacher(teacher, [0]), tok, data, args, teacher=teacher)
    assert again.resumed_from is not None and again.checkpoint_dir == first.checkpoint_dir


def test_another_run_fingerprint_never_resumes(teacher, data, tok, tmp_path):
    """The run's fingerprint (its data digest, e.g. after changing data_source or max_train_rows) keys
    the checkpoints: the same training settings on other data start afresh."""
    args = _distil_args(tmp_path, epochs=1)
    first = train_model(student_from_teacher(teacher), tok, data, args, teacher=teacher, fingerprint="data-a")
    other = train_model(student_from_teacher(teacher), tok, data, args, teacher=teacher, fingerprint="data-b")
    same = train_model(student_from_teacher(teacher), tok, data, args, teacher=teacher, fingerprint="data-a")
    assert other.resumed_from is None and other.checkpoint_dir != first.checkpoint_dir
    assert same.resumed_from is not None and same.checkpoint_dir == first.checkpoint_dir


@pytest.mark.parametrize(
    ("name", "value", "changes_the_result"),
    [("alpha", 0.7, True), ("temperature", 4.0, True), ("hidden_weight", 1.0, True), ("augment_copies", 1, True),
     ("cache_teacher_logits", False, True), ("max_length", 64, True), ("num_train_epochs", 3, True),
     ("warmup_steps", 0.2, True), ("resume", False, False), ("disable_tqdm", False, False),
     ("dataloader_num_workers", 1, False)],
)
def test_the_checkpoint_key_follows_every_setting_that_changes_the_result(name, value, changes_the_result, tmp_path):
    student = make_tiny_model("tiny-bert", LABELS, seed=0)
    args = _distil_args(tmp_path)
    key = training.checkpoint_key(args, student, "run")
    assert (training.checkpoint_key(replace(args, **{name: value}), student, "run") != key) == changes_the_result
    assert training.checkpoint_key(replace(args, output_dir=str(tmp_path / "elsewhere")), student, "run") == key


def test_the_loss_checks_no_setting_at_a_step(teacher, tokenized, tok, tmp_path, monkeypatch):
    """Settings are checked when the arguments are built; a training step only computes."""
    cached = add_teacher_logits(tokenized, teacher, tok)
    trainer = DistillationTrainer(model=student_from_teacher(teacher), args=make_args(tmp_path, hidden_weight=1.0),
                                  teacher_model=teacher)
    batch = DataCollatorWithPadding(tok)([dict(cached["train"][i]) for i in range(4)])

    def refuse(*args, **kwargs):
        raise AssertionError("a setting was checked at a training step")

    monkeypatch.setattr(training, "check_setting", refuse)
    assert torch.isfinite(trainer.compute_loss(trainer.model, batch))


# ---------------------------------------------------------------------------------------------
# Guards: settings that cannot train, divergence, torn checkpoints, a second trainer
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value"),
    [("num_train_epochs", 0), ("num_train_epochs", -1), ("num_train_epochs", float("nan")),
     ("num_train_epochs", "two"), ("num_train_epochs", True), ("learning_rate", 0.0), ("learning_rate", float("inf")),
     ("learning_rate", "1e-3"), ("per_device_train_batch_size", 0), ("per_device_train_batch_size", 2.0),
     ("gradient_accumulation_steps", 0)],
)
def test_arguments_refuse_settings_that_cannot_train(field, value, tmp_path):
    with pytest.raises(ValueError, match=field):
        make_args(tmp_path, **{field: value})


@pytest.mark.parametrize(
    ("field", "value"),
    [("epochs", 0), ("epochs", "two"), ("epochs", True), ("learning_rate", 0.0), ("learning_rate", float("inf")),
     ("batch_size", 0), ("gradient_accumulation_steps", 0), ("finetune_warmup_ratio", 1.0)],
)
def test_run_parameters_that_cannot_train_are_refused_by_name(field, value, tmp_path):
    arguments = teacher_arguments if field.startswith("finetune_") else student_arguments
    with pytest.raises(ValueError, match=f"{field} = {value!r}"):
        arguments(RunConfig(), tmp_path, **{field: value})


def test_a_diverging_run_stops_before_anything_is_saved(teacher, data, tok, tmp_path):
    args = _distil_args(tmp_path, epochs=1, learning_rate=1e12)
    with pytest.raises(training.TrainingDivergedError, match=r"learning_rate=1e\+12.*lower the learning rate"):
        train_model(student_from_teacher(teacher), tok, data, args, teacher=teacher)
    assert not list(tmp_path.glob("*/checkpoint-*")), "no checkpoint of diverged weights"


def _one_epoch_run(teacher, data, tok, folder):
    return train_model(student_from_teacher(teacher), tok, data, _distil_args(folder, epochs=1), teacher=teacher)


@pytest.mark.parametrize("damage", ["truncate_weights", "drop_state", "truncate_optimizer"])
def test_a_torn_checkpoint_is_set_aside_with_a_warning(teacher, data, tok, tmp_path, damage):
    first = _one_epoch_run(teacher, data, tok, tmp_path)
    checkpoint = first.checkpoint_dir / f"checkpoint-{STEPS_PER_EPOCH}"
    if damage == "truncate_weights":
        (checkpoint / "model.safetensors").write_bytes((checkpoint / "model.safetensors").read_bytes()[:100])
    elif damage == "drop_state":
        (checkpoint / "trainer_state.json").unlink()
    else:
        (checkpoint / "optimizer.pt").write_bytes((checkpoint / "optimizer.pt").read_bytes()[:100])
    with pytest.warns(RuntimeWarning, match=f"Checkpoint {checkpoint} cannot be resumed from"):
        again = _one_epoch_run(teacher, data, tok, tmp_path)
    assert again.resumed_from is None and again.trainer.state.global_step == STEPS_PER_EPOCH
    assert (first.checkpoint_dir / f"torn-checkpoint-{STEPS_PER_EPOCH}").is_dir()  # kept for inspection
    assert training.last_good_checkpoint(first.checkpoint_dir) == str(checkpoint)  # the new one is whole


def test_a_second_trainer_on_the_same_checkpoints_is_refused(teacher, data, tok, tmp_path):
    from filelock import FileLock

    first = _one_epoch_run(teacher, data, tok, tmp_path)
    with FileLock(first.checkpoint_dir / ".training.lock"), pytest.raises(RuntimeError, match="Another process"):
        _one_epoch_run(teacher, data, tok, tmp_path)


# ---------------------------------------------------------------------------------------------
# Progress
# ---------------------------------------------------------------------------------------------


class _FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_progress_lines_are_rate_limited_and_estimate_the_time_left():
    import io
    from types import SimpleNamespace

    clock, out = _FakeClock(), io.StringIO()
    lines = training.ProgressLines(every=30, clock=clock, stream=out)
    args = SimpleNamespace(num_train_epochs=5)
    state = SimpleNamespace(global_step=0, max_steps=100, epoch=0.0)
    lines.on_train_begin(args, state, None)
    for step in range(1, 21):  # 20 steps, 2 s each: one line at 30 s
        clock.now, state.global_step, state.epoch = step * 2.0, step, step / 20
        lines.on_step_end(args, state, None)
    printed = out.getvalue().splitlines()
    assert printed == ["[train] epoch 0.8/5 · step 15/100 · 30 s elapsed · ~2 min 50 s left"]
    state.epoch = 1.0
    lines.on_epoch_end(args, state, None)
    assert out.getvalue().splitlines()[-1] == "[train] epoch 1.0/5 · step 20/100 · 40 s elapsed · ~2 min 40 s left"


@pytest.mark.parametrize(("env", "expected"), [("off", "off"), ("console", "console"), ("notebook", "notebook")])
def test_progress_mode_follows_the_environment(monkeypatch, env, expected):
    monkeypatch.setenv("KDLIB_PROGRESS", env)
    assert training.progress_mode() == expected


def test_progress_outside_a_notebook_is_lines(monkeypatch):
    monkeypatch.delenv("KDLIB_PROGRESS", raising=False)
    assert training.progress_mode() == "console"


def test_progress_off_prints_nothing(teacher, data, tok, tmp_path, monkeypatch, capfd):
    monkeypatch.setenv("KDLIB_PROGRESS", "off")
    _one_epoch_run(teacher, data, tok, tmp_path)
    captured = capfd.readouterr()
    assert "[train]" not in captured.out + captured.err


def test_arguments_defaults_are_the_default_profiles_and_follow_a_run(tmp_path):
    from kdlib.config import load_config

    profile = RunConfig()
    own = ("alpha", "temperature", "hidden_weight", "augment_copies", "cache_teacher_logits")
    assert {name: getattr(make_args(tmp_path), name) for name in own} == {name: getattr(profile, name) for name in own}
    shared = (*own, "learning_rate", "batch_size", "epochs", "seed", "gradient_accumulation_steps")
    defaults = student_arguments(profile, tmp_path).settings()
    assert {name: defaults[name] for name in shared} == {name: getattr(profile, name) for name in shared}
    run = load_config("minilm", alpha=0.2, temperature=7, hidden_weight=3.0, augment_copies=2, learning_rate=1e-3,
                      batch_size=8, epochs=2, seed=3, gradient_accumulation_steps=2, cache_teacher_logits=False,
                      finetune_learning_rate=5e-5, finetune_batch_size=4, finetune_epochs=1, finetune_warmup_ratio=0.2)
    assert student_arguments(run, tmp_path).settings() == {
        **defaults, "alpha": 0.2, "temperature": 7, "hidden_weight": 3.0, "augment_copies": 2, "learning_rate": 1e-3,
        "batch_size": 8, "epochs": 2, "seed": 3, "gradient_accumulation_steps": 2, "cache_teacher_logits": False}
    assert teacher_arguments(run, tmp_path).settings() == {
        **defaults, "alpha": 1.0, "learning_rate": 5e-5, "batch_size": 4, "epochs": 1, "warmup_ratio": 0.2, "seed": 3}
    # one call for the search's choice on top of the run's settings (notebook 02)
    assert student_arguments(run, tmp_path, alpha=0.9, epochs=4).settings() == {
        **student_arguments(run, tmp_path).settings(), "alpha": 0.9, "epochs": 4}


def test_training_hyperparameters_are_the_ones_the_trainer_used(teacher, data, tok, tmp_path):
    from kdlib.report import training_hyperparameters

    args = _distil_args(tmp_path, epochs=1, alpha=0.3, temperature=4.0)
    result = train_model(student_from_teacher(teacher), tok, data, args, teacher=teacher)
    params = training_hyperparameters(result)
    assert {k: params[k] for k in ("learning_rate", "train_batch_size", "seed", "num_epochs", "alpha", "temperature")} \
        == {"learning_rate": args.learning_rate, "train_batch_size": args.per_device_train_batch_size,
            "seed": args.seed, "num_epochs": args.num_train_epochs, "alpha": 0.3, "temperature": 4.0}
    assert params["optimizer"].startswith("AdamW") and "weight_decay=0.01" in params["optimizer"]
