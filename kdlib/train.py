"""Knowledge distillation with the ``transformers`` Trainer, as in *NLP with Transformers* ch. 8.

The student minimises

    loss = alpha * CE(student, labels) + (1 - alpha) * T**2 * KL(softmax(teacher / T) || softmax(student / T))

plus ``hidden_weight *`` :func:`hidden_state_loss` (TinyBERT / PKD). ``T**2`` keeps the KL term's gradients
on the CE term's scale (Hinton et al., 2015); ``alpha = 1`` is plain fine-tuning. As in the book, the
settings are fields of :class:`DistillationTrainingArguments`, read by :class:`DistillationTrainer`;
:func:`train_model` trains (checkpoints keyed by the settings, resumed, locked). Beyond the book: teacher
logits cached once, a loss exact under gradient accumulation and several processes, noisy copies of the
training queries and students of another vocabulary.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import numbers
import os
import random
import shutil
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from datasets import Dataset, DatasetDict, concatenate_datasets
from filelock import FileLock, Timeout
from safetensors import safe_open
from transformers import (
    DataCollatorWithPadding,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PrinterCallback,
    Trainer,
    TrainerCallback,
    TrainingArguments,
    set_seed,
)
from transformers.modelcard import parse_log_history
from transformers.trainer_utils import get_last_checkpoint
from transformers.utils import is_in_notebook

from kdlib.config import MAX_LENGTH, RunConfig, validate
from kdlib.models import (
    MODEL_INPUT_NAMES,
    check_tokenizers_compatible,
    forward_inputs,
    share_vocabulary,
    weights_digest,
)

TEACHER_LOGITS = "teacher_logits"
NO_LOG = "No log"
EPOCH_TABLE_COLUMNS = ["Training Loss", "Epoch", "Step", "Validation Loss", "Accuracy"]

# A rule per setting: the kind of value, its valid range and the message's words for it.
_TRAINS = (numbers.Real, lambda v: 0 < v < math.inf, "must be a finite number > 0 (or nothing is trained)")
_AT_LEAST_ONE = (numbers.Integral, lambda v: v >= 1, "must be a whole number >= 1")
_FLAG = (bool, lambda v: True, "must be True or False")
SETTING_RULES = {
    "alpha": (numbers.Real, lambda v: 0 <= v <= 1, "must be in [0, 1] (the weight of the hard-label cross-entropy)"),
    "temperature": (numbers.Real, lambda v: 0 < v < math.inf, "must be > 0 and finite (it divides the logits)"),
    "hidden_weight": (numbers.Real, lambda v: 0 <= v < math.inf, "must be a finite number >= 0 (0 turns the term off)"),
    "augment_copies": (numbers.Integral, lambda v: v >= 0, "must be a whole number >= 0"),
    "max_length": _AT_LEAST_ONE, "cache_teacher_logits": _FLAG, "resume": _FLAG,
    "learning_rate": _TRAINS, "num_train_epochs": _TRAINS,
    "per_device_train_batch_size": _AT_LEAST_ONE, "gradient_accumulation_steps": _AT_LEAST_ONE,
}


def check_setting(name: str, value, rule: tuple | None = None) -> None:
    """Refuse ``value`` for ``name`` unless it follows ``rule`` (default: its :data:`SETTING_RULES` entry);
    a bool is not a number, NaN is in no range."""
    kind, valid, text = rule or SETTING_RULES[name]
    if (isinstance(value, bool) and kind is not bool) or not isinstance(value, kind) or not valid(value):
        raise ValueError(f"{name} {text}; got {value!r}.")


def check_loss_weight(name: str, weight: float) -> None:
    """Refuse a negative or non-finite weight of a term added to the loss (``hidden_weight``'s rule)."""
    check_setting(name, weight, SETTING_RULES["hidden_weight"])


def distillation_loss(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor | None, labels: torch.Tensor, *, alpha: float,
    temperature: float, num_items_in_batch: int | torch.Tensor | None = None, hidden_weight: float = 0.0,
    hidden_states: tuple[Sequence[torch.Tensor], Sequence[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """The reference loss: a batch mean, or with ``num_items_in_batch`` the per-example sum divided by it
    (exact under gradient accumulation). ``hidden_states`` = (student's, teacher's, attention mask)."""
    per_example = alpha * F.cross_entropy(student_logits, labels, reduction="none")
    if alpha < 1.0:
        if teacher_logits is None:
            raise ValueError("alpha < 1 needs teacher logits: add a cached `teacher_logits` column "
                             "(add_teacher_logits) or pass `teacher_model=` to DistillationTrainer.")
        if teacher_logits.shape != student_logits.shape:
            raise ValueError(f"Teacher logits {tuple(teacher_logits.shape)} and student logits "
                             f"{tuple(student_logits.shape)} differ in shape: teacher and student must share the "
                             "label set.")
        log_p_student = F.log_softmax(student_logits / temperature, dim=-1)
        p_teacher = F.softmax(teacher_logits.float() / temperature, dim=-1)
        kl = F.kl_div(log_p_student, p_teacher, reduction="none").sum(dim=-1)
        per_example = per_example + (1.0 - alpha) * temperature**2 * kl
    if hidden_weight > 0:
        if hidden_states is None:
            raise ValueError("hidden_weight > 0 needs the student's and the teacher's hidden states: "
                             "pass `teacher_model=`.")
        per_example = per_example + hidden_weight * hidden_state_loss(*hidden_states)
    if num_items_in_batch is None:
        return per_example.mean()
    return per_example.sum() / num_items_in_batch


def layer_map(student_layers: int, teacher_layers: int) -> list[int]:
    """The teacher hidden state each student hidden state (embeddings, then layers) is pulled towards:
    evenly spaced depths ending at the last (PKD-Skip; 3 of 6 -> [0, 2, 4, 6])."""
    return [0] + [round((j + 1) * teacher_layers / student_layers) for j in range(student_layers)]


def hidden_state_loss(
    student_hidden: Sequence[torch.Tensor], teacher_hidden: Sequence[torch.Tensor], attention_mask: torch.Tensor
) -> torch.Tensor:
    """Per-example MSE between the student's hidden states and the teacher's at :func:`layer_map`'s depths, over
    real tokens and hidden units: it passes on how the teacher reaches its answer (PKD; TinyBERT)."""
    depths = layer_map(len(student_hidden) - 1, len(teacher_hidden) - 1)
    mask = attention_mask.unsqueeze(-1).to(student_hidden[0].dtype)  # (batch, tokens, 1)
    per_state = []
    for student_state, teacher_state in zip(student_hidden, [teacher_hidden[d] for d in depths], strict=True):
        if student_state.shape != teacher_state.shape:
            raise ValueError(f"hidden_weight > 0 needs student and teacher hidden states of one shape; got "
                             f"{tuple(student_state.shape)} and {tuple(teacher_state.shape)}. Use a student of the "
                             "teacher's width.")
        squared = (student_state - teacher_state.to(student_state.dtype)) ** 2 * mask
        per_state.append(squared.sum(dim=(1, 2)) / (mask.sum(dim=(1, 2)) * student_state.shape[-1]))
    return torch.stack(per_state).mean(dim=0)


class TrainingDivergedError(RuntimeError):
    """The loss became NaN or infinite: training stops before anything of it is saved."""


def _run_field(name: str):
    """A dataclass field with the run parameter's default and description."""
    run_field = RunConfig.model_fields[name]
    return field(default=run_field.default, metadata={"help": run_field.description})


@dataclass
class DistillationTrainingArguments(TrainingArguments):
    """``TrainingArguments`` plus the distillation's settings (the book's ``alpha`` and ``temperature``, and
    kdlib's), each checked when the arguments are built (``dataclasses.replace`` too), never at a step."""

    alpha: float = _run_field("alpha")
    temperature: float = _run_field("temperature")
    hidden_weight: float = _run_field("hidden_weight")
    augment_copies: int = _run_field("augment_copies")
    cache_teacher_logits: bool = _run_field("cache_teacher_logits")
    max_length: int = field(default=MAX_LENGTH, metadata={"help": "tokens kept of each query"})
    resume: bool = field(default=True, metadata={"help": "resume from the last good checkpoint of the same key"})

    def __post_init__(self):
        for name in SETTING_RULES:
            check_setting(name, getattr(self, name))
        super().__post_init__()

    def settings(self) -> dict:
        """The settings that tell one training from another, under the run parameters' names where they
        have one (``batch_size``, ``epochs``)."""
        warmup = "warmup_ratio" if self.warmup_steps < 1 else "warmup_steps"
        return {
            "alpha": self.alpha, "temperature": self.temperature, "hidden_weight": self.hidden_weight,
            "augment_copies": self.augment_copies, "learning_rate": self.learning_rate,
            "batch_size": self.per_device_train_batch_size, "epochs": self.num_train_epochs, "seed": self.seed,
            "gradient_accumulation_steps": self.gradient_accumulation_steps, "weight_decay": self.weight_decay,
            warmup: self.warmup_steps, "max_length": self.max_length, "cache_teacher_logits": self.cache_teacher_logits,
            "group_by_length": self.train_sampling_strategy == "group_by_length", "max_steps": self.max_steps,
        }


def _check_arguments(args, teacher, *, name: str, cached: bool) -> None:
    """Refuse arguments of another kind, and settings that need the teacher (parameter ``name``) without one
    (``cached``: its logits may be in the data)."""
    if not isinstance(args, DistillationTrainingArguments):
        raise TypeError(f"args must be a kdlib DistillationTrainingArguments (alpha, temperature, hidden_weight), not "
                        f"{type(args).__name__}: build them with student_arguments(config, output_dir) or "
                        "teacher_arguments.")
    if args.hidden_weight > 0 and teacher is None:
        raise ValueError(f"hidden_weight={args.hidden_weight} > 0 matches the teacher's hidden states, which cached "
                         f"logits do not hold: pass `{name}=`.")
    if args.alpha < 1.0 and teacher is None and not cached:
        raise ValueError(f"alpha={args.alpha} < 1 distils from a teacher: pass `{name}=`.")


class DistillationTrainer(Trainer):
    """A ``Trainer`` whose loss is :func:`distillation_loss` with the settings of its ``args``, a
    :class:`DistillationTrainingArguments`. The teacher's logits come from a cached ``teacher_logits``
    column, or from ``teacher_model`` run on each batch (the reference's way) when that is given."""

    def __init__(self, *args, teacher_model: PreTrainedModel | None = None, **kwargs):
        arguments = kwargs.get("args", args[1] if len(args) > 1 else None)
        _check_arguments(arguments, teacher_model, name="teacher_model", cached=True)
        super().__init__(*args, **kwargs)
        self.teacher = teacher_model
        if self.teacher is not None:
            self.teacher.to(self.args.device).eval().requires_grad_(False)
        self.model_accepts_loss_kwargs = True  # the Trainer then counts num_items_in_batch for every model type

    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        if TEACHER_LOGITS not in self._signature_columns:
            self._signature_columns.append(TEACHER_LOGITS)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        inputs = dict(inputs)
        labels, teacher_logits, hidden_states = inputs.pop("labels"), inputs.pop(TEACHER_LOGITS, None), None
        with_hidden = self.args.hidden_weight > 0
        outputs = model(**inputs, output_hidden_states=with_hidden)
        if self.teacher is not None and (self.args.alpha < 1.0 or with_hidden):
            with torch.no_grad():
                teacher_outputs = self.teacher(**forward_inputs(self.teacher, inputs), output_hidden_states=with_hidden)
            teacher_logits = teacher_outputs.logits
            if with_hidden:
                hidden_states = (outputs.hidden_states, teacher_outputs.hidden_states, inputs["attention_mask"])
        if torch.is_tensor(num_items_in_batch):
            num_items_in_batch = num_items_in_batch.to(outputs.logits.device)
        loss = distillation_loss(
            outputs.logits, teacher_logits, labels, alpha=self.args.alpha, temperature=self.args.temperature,
            num_items_in_batch=num_items_in_batch, hidden_weight=self.args.hidden_weight, hidden_states=hidden_states)
        if num_items_in_batch is not None and self.args.average_tokens_across_devices:
            loss = loss * self.accelerator.num_processes  # num_items_in_batch is summed over processes, DDP averages
        if model.training and not torch.isfinite(loss.detach()).all():
            args = self.args  # raised before the backward pass: no diverged weights reach a checkpoint
            raise TrainingDivergedError(
                f"The training loss became {loss.item()} at step {self.state.global_step + 1} (alpha={args.alpha}, "
                f"temperature={args.temperature}, learning_rate={args.learning_rate:g}). Nothing was saved "
                "from this step on; lower the learning rate or the temperature.")
        return (loss, outputs) if return_outputs else loss


def tokenize_dataset(
    data: DatasetDict | Dataset, tokenizer: PreTrainedTokenizerBase, *, max_length: int = MAX_LENGTH
) -> DatasetDict | Dataset:
    """Token ids (unpadded: batches are padded dynamically) and ``label``, text dropped (splits or one split)."""
    return data.map(lambda batch: tokenizer(batch["text"], truncation=True, max_length=max_length), batched=True,
                    remove_columns=["text"], desc="Tokenising")


def _word_dropout(text: str, rng: random.Random, drop: float, swap: float) -> str:
    words = text.split()
    if not words:
        return text
    kept = [word for word in words if rng.random() >= drop] or [rng.choice(words)]
    if len(kept) > 2 and rng.random() < swap:
        i = rng.randrange(len(kept) - 1)
        kept[i], kept[i + 1] = kept[i + 1], kept[i]
    return " ".join(kept)


def add_noisy_copies(
    data: DatasetDict, copies: int, *, seed: int, drop: float = 0.15, swap: float = 0.3
) -> DatasetDict:
    """``data`` with ``copies`` seeded noisy copies of every training query appended to its train split (after
    TinyBERT): each word dropped with probability ``drop`` (one kept if all would go) and, in copies of 3+
    words, one adjacent pair swapped with probability ``swap``. A copy keeps its query's label."""
    check_setting("augment_copies", copies)
    if copies == 0:
        return data
    rng, train = random.Random(seed), data["train"]
    columns = train.to_dict()  # the label and any other column, kept with each copy
    extra = [Dataset.from_dict({**columns, "text": [_word_dropout(t, rng, drop, swap) for t in columns["text"]]},
                               features=train.features) for _ in range(copies)]
    return DatasetDict({**data, "train": concatenate_datasets([train, *extra])})


@torch.inference_mode()
def teacher_logits_for(
    teacher: PreTrainedModel, dataset: Dataset, tokenizer: PreTrainedTokenizerBase, *, batch_size: int = 128
) -> np.ndarray:
    """The teacher's logits for every row of a tokenised dataset, batched and in eval mode."""
    teacher.eval()
    device = next(teacher.parameters()).device
    collator = DataCollatorWithPadding(tokenizer)
    inputs = dataset.select_columns([c for c in MODEL_INPUT_NAMES if c in dataset.column_names])
    order = np.argsort([len(ids) for ids in dataset["input_ids"]], kind="stable")
    out = np.zeros((len(dataset), teacher.config.num_labels), dtype=np.float32)
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        batch = collator([inputs[int(i)] for i in rows])
        logits = teacher(**forward_inputs(teacher, {k: v.to(device) for k, v in batch.items()})).logits
        out[rows] = logits.float().cpu().numpy()
    return out


def add_teacher_logits(
    data: DatasetDict | Dataset, teacher: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, *,
    splits: tuple[str, ...] = ("train", "validation"), batch_size: int = 128,
    texts: DatasetDict | Dataset | None = None, max_length: int = MAX_LENGTH,
) -> DatasetDict | Dataset:
    """Add a ``teacher_logits`` column (computed once) to tokenised splits; ``tokenizer`` is the teacher's.
    ``texts``, the rows untokenised, is for ``data`` tokenised by a student of another vocabulary: the
    teacher then runs on its own tokens of each text and the column lands beside the student's tokens."""
    if isinstance(data, Dataset):
        source = data
        if texts is not None:
            if len(texts) != len(data):
                raise ValueError(f"`texts` has {len(texts)} rows, the tokenised split {len(data)}: pass the splits "
                                 "it was tokenised from.")
            source = tokenize_dataset(texts, tokenizer, max_length=max_length)
        logits = teacher_logits_for(teacher, source, tokenizer, batch_size=batch_size)
        return data.add_column(TEACHER_LOGITS, logits.tolist())
    return DatasetDict({
        name: add_teacher_logits(ds, teacher, tokenizer, batch_size=batch_size, max_length=max_length,
                                 texts=None if texts is None else texts[name]) if name in splits else ds
        for name, ds in data.items()
    })


def prepare_datasets(
    data: DatasetDict, tokenizer: PreTrainedTokenizerBase, *, teacher: PreTrainedModel | None = None,
    max_length: int = MAX_LENGTH, augment_copies: int = 0, seed: int = 42,
    teacher_tokenizer: PreTrainedTokenizerBase | None = None,
) -> DatasetDict:
    """Tokenise ``data`` with ``augment_copies`` noisy copies and, given a teacher, add its cached logits
    (of its own tokens when ``teacher_tokenizer`` is another vocabulary): the work runs on the same data
    share. The logits are raw (T is applied in the loss), so one preparation serves any alpha and T."""
    data = add_noisy_copies(data, augment_copies, seed=seed)
    tokenized = tokenize_dataset(data, tokenizer, max_length=max_length)
    if teacher is None:
        return tokenized
    return _with_teacher_logits(tokenized, data, teacher, tokenizer, teacher_tokenizer, max_length=max_length)


def _with_teacher_logits(
    tokenized: DatasetDict, data: DatasetDict, teacher: PreTrainedModel, tokenizer: PreTrainedTokenizerBase,
    teacher_tokenizer: PreTrainedTokenizerBase | None, *, max_length: int, augment_copies: int = 0, seed: int = 0,
) -> DatasetDict:
    """``tokenized`` (``data`` with ``augment_copies`` noisy copies, tokenised) with the teacher's cached logits:
    of the same tokens when ``teacher_tokenizer`` is None or shares the vocabulary, else of its own tokens of
    each text (the copies made again only then: seeded, they are the same)."""
    if teacher_tokenizer is None or share_vocabulary(teacher_tokenizer, tokenizer):
        return add_teacher_logits(tokenized, teacher, tokenizer)
    texts = add_noisy_copies(data, augment_copies, seed=seed)
    return add_teacher_logits(tokenized, teacher, teacher_tokenizer, texts=texts, max_length=max_length)


def epoch_table(log_history: list[dict]) -> pd.DataFrame:
    """The Hugging Face model card's per-epoch table (``parse_log_history``), rounded: one row per
    evaluation, with the training loss logged before it ("No log" before the first)."""
    if not any("train_runtime" in entry for entry in log_history):
        # parse_log_history reads the logs before the end-of-training entry, which an unfinished run lacks
        log_history = [*log_history, {"train_runtime": 0.0}]
    _, lines, _ = parse_log_history(log_history)
    rows = [{"Training Loss": NO_LOG if line["Training Loss"] == NO_LOG else round(line["Training Loss"], 4),
             "Epoch": round(float(line["Epoch"]), 2), "Step": int(line["Step"]),
             "Validation Loss": round(float(line["Validation Loss"]), 4),
             "Accuracy": round(float(line.get("Accuracy", math.nan)), 4)} for line in lines]
    return pd.DataFrame(rows, columns=EPOCH_TABLE_COLUMNS)


def compute_accuracy_metric(eval_pred) -> dict:
    """``compute_metrics`` for the Trainer: accuracy of the argmax."""
    logits, labels = eval_pred
    logits = logits[0] if isinstance(logits, tuple) else logits
    return {"accuracy": float((np.argmax(logits, axis=-1) == labels).mean())}


# The run parameters the student's training reads.
STUDENT_SETTINGS = ("alpha", "temperature", "hidden_weight", "augment_copies", "learning_rate", "batch_size", "epochs",
                    "gradient_accumulation_steps", "cache_teacher_logits", "seed")


def teacher_arguments(config: RunConfig, output_dir: str | Path, **changes) -> DistillationTrainingArguments:
    """The teacher's fine-tuning (alpha = 1) with the run's ``finetune_*`` parameters and seed; ``changes``
    to them are validated as the run's own are."""
    config = _changed(config, changes, ("finetune_learning_rate", "finetune_batch_size", "finetune_epochs",
                                        "finetune_warmup_ratio", "seed"))
    return _arguments(output_dir, config.seed, config.finetune_batch_size, alpha=1.0,
                      learning_rate=config.finetune_learning_rate, num_train_epochs=config.finetune_epochs,
                      warmup_steps=config.finetune_warmup_ratio)


def student_arguments(config: RunConfig, output_dir: str | Path, **changes) -> DistillationTrainingArguments:
    """The student's distillation with the run's :data:`STUDENT_SETTINGS`; ``changes`` to them (a search's
    choice) are validated as the run's own are."""
    config = _changed(config, changes, STUDENT_SETTINGS)
    return _arguments(output_dir, config.seed, config.batch_size, alpha=config.alpha, temperature=config.temperature,
                      hidden_weight=config.hidden_weight, augment_copies=config.augment_copies,
                      cache_teacher_logits=config.cache_teacher_logits, learning_rate=config.learning_rate,
                      num_train_epochs=config.epochs, gradient_accumulation_steps=config.gradient_accumulation_steps,
                      warmup_steps=0.0)


def _changed(config: RunConfig, changes: dict, settings: tuple[str, ...]) -> RunConfig:
    """``config`` with ``changes`` to the run parameters ``settings``, validated as the run's are."""
    unknown = sorted(set(changes) - set(settings))
    if unknown:
        raise ValueError(f"{', '.join(unknown)}: not a setting of this training; it reads {', '.join(settings)}.")
    if not changes:
        return config
    return validate({**config.model_dump(exclude_defaults=True), **changes}, source="training settings")


def _arguments(output_dir: str | Path, seed: int, batch_size: int, **settings) -> DistillationTrainingArguments:
    """What both roles share: AdamW on a linear schedule (a ``warmup_steps`` below 1 is a ratio), batches of
    similar lengths, the seed for the data order too, one evaluation, log line and kept checkpoint per epoch."""
    kwargs = dict(
        output_dir=str(output_dir), per_device_train_batch_size=batch_size,
        per_device_eval_batch_size=max(batch_size, 64), weight_decay=0.01, adam_beta1=0.9, adam_beta2=0.999,
        adam_epsilon=1e-8, lr_scheduler_type="linear", eval_strategy="epoch", logging_strategy="epoch",
        save_strategy="epoch", save_total_limit=1, seed=seed, data_seed=seed, report_to="none", disable_tqdm=True,
        train_sampling_strategy="group_by_length", dataloader_num_workers=0,
        dataloader_pin_memory=torch.cuda.is_available(),
    )
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available():
        kwargs.update(use_cpu=True, ddp_backend="gloo")  # several CPU processes: else accelerate skips DDP
    return DistillationTrainingArguments(**kwargs, **settings)


@dataclass
class TrainResult:
    """What a training returns: the model, its trainer and per-epoch table, the checkpoint it resumed from,
    training seconds, the log and the checkpoint folder."""

    model: PreTrainedModel
    trainer: DistillationTrainer
    epoch_table: pd.DataFrame
    resumed_from: str | None = None
    train_seconds: float = 0.0
    log_history: list = field(default_factory=list)
    checkpoint_dir: Path | None = None

    @property
    def args(self) -> DistillationTrainingArguments:
        """The arguments the trainer used (``output_dir``: the checkpoint folder)."""
        return self.trainer.args


def checkpoint_key(args: DistillationTrainingArguments, student: PreTrainedModel, fingerprint: str | None) -> str:
    """The folder name of a run's checkpoints: a hash of the run's fingerprint, every argument but those
    saying where and how it runs, and the student's starting weights. Only a run of the same key resumes."""
    where_and_how = {"output_dir", "resume", "disable_tqdm", "report_to", "use_cpu", "ddp_backend",
                     "dataloader_num_workers", "dataloader_pin_memory", "local_rank"}
    settings = {name: value for name, value in args.to_dict().items() if name not in where_and_how}
    text = json.dumps({"run": fingerprint, "args": settings, "initial_weights": weights_digest(student)},
                      sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _checkpoint_problem(folder: Path) -> str | None:
    """Why a checkpoint folder cannot be resumed from (killed or disk full during a save), or None."""
    try:
        json.loads((folder / "trainer_state.json").read_text())
    except (OSError, ValueError) as err:
        return f"trainer_state.json unreadable ({type(err).__name__})"
    weights = folder / "model.safetensors"
    if not weights.is_file():
        return "no model.safetensors"
    try:
        with safe_open(str(weights), framework="pt") as handle:
            handle.keys()
    except Exception as err:  # safetensors raises its own error types on a truncated header
        return f"model.safetensors unreadable ({type(err).__name__})"
    for name in ("optimizer.pt", "scheduler.pt"):
        if (folder / name).is_file():
            try:
                torch.load(folder / name, map_location="cpu", weights_only=True)
            except Exception as err:  # EOFError, RuntimeError ... on a truncated file
                return f"{name} unreadable ({type(err).__name__})"
    return None


def last_good_checkpoint(output_dir: str | Path) -> str | None:
    """The newest checkpoint that can be resumed from; a torn one is renamed ``torn-<name>`` with a
    warning and the next older one is checked."""
    output_dir = Path(output_dir)
    while output_dir.is_dir() and (newest := get_last_checkpoint(str(output_dir))) is not None:
        folder = Path(newest)
        problem = _checkpoint_problem(folder)
        if problem is None:
            return str(folder)
        torn = folder.with_name("torn-" + folder.name)  # outside the Trainer's checkpoint-* rotation
        shutil.rmtree(torn, ignore_errors=True)
        os.replace(folder, torn)
        warnings.warn(f"Checkpoint {folder} cannot be resumed from ({problem}); moved to {torn.name} and skipped.",
                      RuntimeWarning, stacklevel=2)
    return None


def train_model(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, data: DatasetDict, args: DistillationTrainingArguments,
    *, teacher: PreTrainedModel | tuple[PreTrainedModel, PreTrainedTokenizerBase] | None = None,
    fingerprint: str | None = None, prepared: DatasetDict | None = None,
    trainer_class: Callable[..., DistillationTrainer] = DistillationTrainer,
) -> TrainResult:
    """Train the classifier ``model`` on ``data`` (text + ClassLabel label): fine-tuning with ``alpha=1`` and
    no ``teacher``, distillation otherwise. Checkpoints go every epoch to ``args.output_dir/<key>``
    (:func:`checkpoint_key`), resumed with ``args.resume``, locked against a second process. ``prepared``
    (:func:`prepare_datasets` of ``data``) lets runs share the tokenising and the logit cache;
    ``teacher=(teacher, teacher_tokenizer)`` serves a student of another vocabulary."""
    teacher_tokenizer = None
    if isinstance(teacher, tuple):
        if len(teacher) != 2:
            raise TypeError(f"teacher must be a model or a (model, tokenizer) pair; got a tuple of {len(teacher)} "
                            "items.")
        teacher, teacher_tokenizer = teacher
    _check_training(args, data, model, tokenizer, teacher, teacher_tokenizer, prepared)
    set_seed(args.seed)
    output_dir = Path(args.output_dir) / checkpoint_key(args, model, fingerprint)
    output_dir.mkdir(parents=True, exist_ok=True)
    with _training_lock(output_dir):
        last_checkpoint = last_good_checkpoint(output_dir) if args.resume else None
        if not args.resume:  # start over: the folder's earlier checkpoints go
            for checkpoint in output_dir.glob("checkpoint-*"):
                shutil.rmtree(checkpoint)
        datasets, online_teacher = _training_data(args, data, tokenizer, teacher, prepared, teacher_tokenizer)
        mode = progress_mode()
        trainer = trainer_class(
            model=model, args=replace(args, output_dir=str(output_dir), disable_tqdm=mode != "notebook"),
            teacher_model=online_teacher, train_dataset=datasets["train"], eval_dataset=datasets["validation"],
            processing_class=tokenizer, data_collator=DataCollatorWithPadding(tokenizer),
            compute_metrics=compute_accuracy_metric,
        )
        trainer.remove_callback(PrinterCallback)  # the epoch table says it once, readably
        if mode == "console":
            trainer.add_callback(ProgressLines())
        start = time.perf_counter()
        trainer.train(resume_from_checkpoint=last_checkpoint)
        elapsed = time.perf_counter() - start
    history = list(trainer.state.log_history)
    return TrainResult(trainer.model, trainer, epoch_table(history), resumed_from=last_checkpoint,
                       train_seconds=elapsed, log_history=history, checkpoint_dir=output_dir)


def _check_training(
    args, data: DatasetDict, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase,
    teacher: PreTrainedModel | None, teacher_tokenizer: PreTrainedTokenizerBase | None, prepared: DatasetDict | None,
) -> None:
    """What :func:`train_model` refuses before any folder is touched."""
    _check_arguments(args, teacher, name="teacher", cached=False)
    if teacher is not None and teacher_tokenizer is not None:
        check_tokenizers_compatible(teacher_tokenizer, tokenizer, args)
    elif teacher is not None and (args.alpha < 1.0 or args.hidden_weight > 0):
        sizes = (_embedded_tokens(teacher), _embedded_tokens(model))
        if None not in sizes and sizes[0] != sizes[1]:
            raise ValueError(
                f"The teacher embeds {sizes[0]} token ids and the student {sizes[1]}: they do not share a vocabulary, "
                "so the teacher cannot read the student's tokens. Pass the teacher with its own tokenizer: "
                "teacher=(teacher, teacher_tokenizer).")
    if prepared is None:
        return
    columns = prepared["train"].column_names if "train" in prepared else []
    if not {"train", "validation"} <= set(prepared) or "input_ids" not in columns:
        raise ValueError("`prepared` must come from prepare_datasets(data, tokenizer): tokenised train and validation "
                         f"splits; got splits {sorted(prepared)}, train columns {columns}.")
    expected = len(data["train"]) * (1 + args.augment_copies)
    if len(prepared["train"]) != expected:
        raise ValueError(f"`prepared` has {len(prepared['train'])} training rows, augment_copies={args.augment_copies} "
                         f"needs {expected}: pass augment_copies={args.augment_copies} to prepare_datasets.")


def _training_lock(output_dir: Path) -> contextlib.AbstractContextManager:
    """The checkpoint folder's lock, held until the ``with`` ends; only rank 0 of a DDP run takes it."""
    if int(os.environ.get("RANK", "0")) != 0:
        return contextlib.nullcontext()
    try:
        return FileLock(output_dir / ".training.lock", blocking=False).acquire()
    except Timeout:
        raise RuntimeError(f"Another process is training into {output_dir}: wait for it to finish (its checkpoints "
                           "will be resumed), or use another run_name.") from None


def _embedded_tokens(model: torch.nn.Module) -> int | None:
    """How many token ids a model's input embedding holds (None without one)."""
    try:
        return model.get_input_embeddings().num_embeddings
    except (AttributeError, NotImplementedError):
        return None


def _training_data(
    args: DistillationTrainingArguments, data: DatasetDict, tokenizer: PreTrainedTokenizerBase,
    teacher: PreTrainedModel | None, prepared: DatasetDict | None, teacher_tokenizer: PreTrainedTokenizerBase | None,
) -> tuple[DatasetDict, PreTrainedModel | None]:
    """The tokenised splits (with cached teacher logits when the loss uses them) and the teacher to run at
    every step, if any (hidden states are too large to cache)."""
    online = args.hidden_weight > 0 or (args.alpha < 1.0 and not args.cache_teacher_logits)
    cached = args.alpha < 1.0 and not online
    if prepared is None:
        prepared = prepare_datasets(data, tokenizer, teacher=teacher if cached else None, max_length=args.max_length,
                                    augment_copies=args.augment_copies, seed=args.seed,
                                    teacher_tokenizer=teacher_tokenizer)
    elif cached and TEACHER_LOGITS not in prepared["train"].column_names:
        prepared = _with_teacher_logits(prepared, data, teacher, tokenizer, teacher_tokenizer,
                                        max_length=args.max_length, augment_copies=args.augment_copies, seed=args.seed)
    return prepared, teacher if online else None


def progress_mode() -> str:
    """How training reports progress: ``$KDLIB_PROGRESS`` (notebook | console | off), else a bar in a
    notebook kernel and :class:`ProgressLines` anywhere else."""
    mode = os.environ.get("KDLIB_PROGRESS", "").strip().lower()
    if mode in {"notebook", "console", "off"}:
        return mode
    return "notebook" if is_in_notebook() else "console"


def _duration(seconds: float) -> str:
    minutes, secs = divmod(int(round(seconds)), 60)
    return f"{minutes} min {secs} s" if minutes else f"{secs} s"


class ProgressLines(TrainerCallback):
    """One line at most every ``every`` seconds and at each epoch's end, no bar to spam a CI log:
    ``[train] epoch 2.0/5 · step 640/1590 · 3 min 10 s elapsed · ~4 min 40 s left``. Written to
    ``$KDLIB_PROGRESS_FILE`` when the runner set one, else to the process's stderr."""

    def __init__(self, every: float = 30.0, clock=None, stream=None) -> None:
        self.every, self.clock, self.stream = every, clock or time.monotonic, stream
        self.start = self.last = None
        self.first_step = 0

    def _write(self, state, args) -> None:
        now = self.clock()
        done, left = state.global_step - self.first_step, state.max_steps - state.global_step
        eta = f" · ~{_duration((now - self.start) / done * left)} left" if done > 0 and left > 0 else ""
        line = (f"[train] epoch {state.epoch or 0:.1f}/{args.num_train_epochs:g} · step {state.global_step}/"
                f"{state.max_steps} · {_duration(now - self.start)} elapsed{eta}")
        target = os.environ.get("KDLIB_PROGRESS_FILE")  # set by the runner: a kernel's own stderr reaches the notebook
        if self.stream is None and target:
            with open(target, "a", encoding="utf-8") as handle:
                print(line, file=handle, flush=True)
        elif (stream := self.stream or sys.__stderr__) is not None:
            print(line, file=stream, flush=True)
        self.last = now

    def on_train_begin(self, args, state, control, **kwargs):
        self.start = self.last = self.clock()
        self.first_step = state.global_step

    def on_step_end(self, args, state, control, **kwargs):
        if self.clock() - self.last >= self.every:
            self._write(state, args)

    def on_epoch_end(self, args, state, control, **kwargs):
        self._write(state, args)


@torch.inference_mode()
def soft_targets(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, text: str, temperatures: list[float]
) -> dict[float, np.ndarray]:
    """The model's class probabilities for ``text`` at each temperature: softmax(logits / T)."""
    model.eval()
    device = next(model.parameters()).device
    encoded = tokenizer(text, return_tensors="pt").to(device)
    logits = model(**forward_inputs(model, encoded)).logits[0].float()
    return {float(t): F.softmax(logits / t, dim=-1).cpu().numpy() for t in temperatures}
