"""Knowledge distillation with the ``transformers`` Trainer, as in *NLP with Transformers* ch. 8.

The student minimises

    loss = alpha * CE(student, labels) + (1 - alpha) * T**2 * KL(softmax(teacher / T) || softmax(student / T))

plus, when ``hidden_weight`` > 0, ``hidden_weight * MSE`` between the student's hidden states and
the teacher's at mapped depths (TinyBERT / PKD style, :func:`hidden_state_loss`). The KL term uses
batch-mean reduction (``nn.KLDivLoss(reduction="batchmean")`` in the reference) and the ``T**2``
factor keeps its gradients on the same scale as the CE term's when the temperature changes (Hinton
et al., 2015). ``alpha = 1`` is plain fine-tuning, which is how notebook 01 fine-tunes the teacher
with the same code.

Two departures from the reference, both tested:

* **Cached teacher logits.** The teacher is frozen, so its logits for a training example never
  change. :func:`add_teacher_logits` computes them once, batched, in eval mode, and stores them as a
  ``teacher_logits`` column; the loss then reads them from the batch instead of running the
  teacher at every step of every epoch. Pass ``teacher_model=`` to keep the online teacher.
* **Exact under gradient accumulation and several processes.** With transformers 5 the Trainer
  passes ``num_items_in_batch`` (the number of labelled examples in the whole accumulated batch);
  the loss is then a sum over examples divided by it, so one batch of 8 and two accumulated
  batches of 4 give the same gradient.

One addition, off by default: ``augment_copies`` noisy copies of every training query (words dropped
and swapped, :func:`add_noisy_copies`), with the teacher's logits computed on them too, in the spirit of
TinyBERT's data augmentation.
"""

from __future__ import annotations

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
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from datasets import Dataset, DatasetDict, concatenate_datasets
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

from kdlib.config import RunConfig
from kdlib.models import MODEL_INPUT_NAMES, forward_inputs, weights_digest

TEACHER_LOGITS = "teacher_logits"
NO_LOG = "No log"
EPOCH_TABLE_COLUMNS = ["Training Loss", "Epoch", "Step", "Validation Loss", "Accuracy"]


def check_alpha_temperature(alpha: float, temperature: float) -> None:
    """Refuse values for which the loss is meaningless, with the valid range in the message."""
    if not _is_real(alpha) or math.isnan(alpha) or not 0.0 <= alpha <= 1.0:
        raise ValueError(
            f"alpha must be in [0, 1] (the weight of the hard-label cross-entropy); got {alpha!r}."
        )
    if not _is_real(temperature) or not math.isfinite(temperature) or temperature <= 0:
        raise ValueError(f"temperature must be > 0 and finite (it divides the logits); got {temperature!r}.")


def check_loss_weight(name: str, weight: float) -> None:
    """Refuse a negative or non-finite weight for a term added to the logit loss, naming the setting."""
    if not _is_real(weight) or not math.isfinite(weight) or weight < 0:
        raise ValueError(f"{name} must be a finite number >= 0 (0 turns the term off); got {weight!r}.")


def check_whole_number(name: str, value, least: int) -> None:
    """Refuse anything but a whole number >= ``least`` (bools too), naming the setting."""
    if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < least:
        raise ValueError(f"{name} must be a whole number >= {least}; got {value!r}.")


def _is_real(value) -> bool:
    """A real number (numpy scalars included), not a bool."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def distillation_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor | None,
    labels: torch.Tensor,
    *,
    alpha: float,
    temperature: float,
    num_items_in_batch: int | torch.Tensor | None = None,
    hidden_weight: float = 0.0,
    hidden_states: tuple[Sequence[torch.Tensor], Sequence[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """The reference loss. Without ``num_items_in_batch`` it is a batch mean (CE mean, KL batchmean);
    with it, per-example losses are summed and divided by it (exact under gradient accumulation).
    ``hidden_weight`` > 0 adds ``hidden_weight *`` :func:`hidden_state_loss` of ``hidden_states``
    = (student hidden states, teacher hidden states, attention mask)."""
    check_alpha_temperature(alpha, temperature)
    check_loss_weight("hidden_weight", hidden_weight)
    per_example = alpha * F.cross_entropy(student_logits, labels, reduction="none")
    if alpha < 1.0:
        if teacher_logits is None:
            raise ValueError(
                "alpha < 1 needs teacher logits: add a cached `teacher_logits` column (add_teacher_logits) "
                "or pass `teacher_model=` to DistillationTrainer."
            )
        if teacher_logits.shape != student_logits.shape:
            raise ValueError(
                f"Teacher logits {tuple(teacher_logits.shape)} and student logits {tuple(student_logits.shape)} "
                "differ in shape: teacher and student must share the label set."
            )
        log_p_student = F.log_softmax(student_logits / temperature, dim=-1)
        p_teacher = F.softmax(teacher_logits.float() / temperature, dim=-1)
        kl = F.kl_div(log_p_student, p_teacher, reduction="none").sum(dim=-1)
        per_example = per_example + (1.0 - alpha) * temperature**2 * kl
    if hidden_weight > 0:
        if hidden_states is None:
            raise ValueError(
                "hidden_weight > 0 needs the student's and the teacher's hidden states: pass `teacher_model=`."
            )
        per_example = per_example + hidden_weight * hidden_state_loss(*hidden_states)
    if num_items_in_batch is None:
        return per_example.mean()
    return per_example.sum() / num_items_in_batch


def layer_map(student_layers: int, teacher_layers: int) -> list[int]:
    """For each student hidden state (embeddings, then each layer) the teacher hidden state it is
    pulled towards: evenly spaced depths ending at the last (PKD-Skip; 3 of 6 -> [0, 2, 4, 6]), the
    depths of the layers :func:`kdlib.models.default_keep_layers` copies into the student."""
    return [0] + [round((j + 1) * teacher_layers / student_layers) for j in range(student_layers)]


def hidden_state_loss(
    student_hidden: Sequence[torch.Tensor],
    teacher_hidden: Sequence[torch.Tensor],
    attention_mask: torch.Tensor,
) -> torch.Tensor:
    """Per-example MSE between the student's hidden states and the teacher's at the depths of
    :func:`layer_map`, over real (unpadded) tokens and hidden units, averaged over the mapped states.

    Matching inner representations, not only outputs, passes on how the teacher gets to its answer
    (Sun et al. 2019, PKD; Jiao et al. 2020, TinyBERT). Both models must have the same hidden size.
    """
    depths = layer_map(len(student_hidden) - 1, len(teacher_hidden) - 1)
    mask = attention_mask.unsqueeze(-1).to(student_hidden[0].dtype)  # (batch, tokens, 1)
    per_state = []
    for student_state, depth in zip(student_hidden, depths, strict=True):
        teacher_state = teacher_hidden[depth]
        if student_state.shape != teacher_state.shape:
            raise ValueError(
                f"hidden_weight > 0 needs student and teacher hidden states of one shape; got "
                f"{tuple(student_state.shape)} and {tuple(teacher_state.shape)}. Use a student of the teacher's width."
            )
        squared = (student_state - teacher_state.to(student_state.dtype)) ** 2 * mask
        per_state.append(squared.sum(dim=(1, 2)) / (mask.sum(dim=(1, 2)) * student_state.shape[-1]))
    return torch.stack(per_state).mean(dim=0)


class TrainingDivergedError(RuntimeError):
    """The loss became NaN or infinite: training stops before anything of it is saved."""


class DistillationTrainer(Trainer):
    """A ``Trainer`` whose loss is :func:`distillation_loss`, with ``config``'s alpha, temperature and
    hidden_weight (:func:`train_classifier` builds the ``TrainingArguments`` from the same config).

    The teacher's logits come from a cached ``teacher_logits`` column, or from ``teacher_model``
    run on each batch (the reference's way) when that is given.
    """

    def __init__(self, *args, config: TrainConfig, teacher_model: PreTrainedModel | None = None, **kwargs):
        if not isinstance(config, TrainConfig):
            raise TypeError(f"config must be a kdlib TrainConfig (alpha, temperature), not {type(config).__name__}.")
        if config.hidden_weight > 0 and teacher_model is None:
            raise ValueError(
                f"hidden_weight={config.hidden_weight} > 0 matches the teacher's hidden states, which cached "
                "logits do not hold: pass `teacher_model=`."
            )
        super().__init__(*args, **kwargs)
        self.config = config
        self.teacher = teacher_model
        if self.teacher is not None:
            self.teacher.to(self.args.device).eval()
            for param in self.teacher.parameters():
                param.requires_grad_(False)
        # Ask the Trainer to count labelled examples per accumulated batch for every model type.
        self.model_accepts_loss_kwargs = True

    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        if TEACHER_LOGITS not in self._signature_columns:
            self._signature_columns.append(TEACHER_LOGITS)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        inputs = dict(inputs)
        labels = inputs.pop("labels")
        cached = inputs.pop(TEACHER_LOGITS, None)
        with_hidden = self.config.hidden_weight > 0
        outputs = model(**inputs, output_hidden_states=with_hidden)
        teacher_logits, hidden_states = cached, None
        if self.teacher is not None and (self.config.alpha < 1.0 or with_hidden):
            with torch.no_grad():
                teacher_outputs = self.teacher(**forward_inputs(self.teacher, inputs), output_hidden_states=with_hidden)
            teacher_logits = teacher_outputs.logits
            if with_hidden:
                hidden_states = (outputs.hidden_states, teacher_outputs.hidden_states, inputs["attention_mask"])
        if num_items_in_batch is not None:
            num_items_in_batch = (
                num_items_in_batch.to(outputs.logits.device)
                if torch.is_tensor(num_items_in_batch)
                else num_items_in_batch
            )
        loss = distillation_loss(
            outputs.logits,
            teacher_logits,
            labels,
            alpha=self.config.alpha,
            temperature=self.config.temperature,
            num_items_in_batch=num_items_in_batch,
            hidden_weight=self.config.hidden_weight,
            hidden_states=hidden_states,
        )
        if num_items_in_batch is not None and self.args.average_tokens_across_devices:
            # num_items_in_batch is summed over processes while DDP averages gradients.
            loss = loss * self.accelerator.num_processes
        if model.training and not torch.isfinite(loss.detach()).all():
            # Before the backward pass and the optimiser step: no diverged weights reach a checkpoint.
            config = self.config
            raise TrainingDivergedError(
                f"The training loss became {loss.item()} at step {self.state.global_step + 1} (alpha={config.alpha}, "
                f"temperature={config.temperature}, learning_rate={self.args.learning_rate:g}). Nothing was saved "
                "from this step on; lower the learning rate or the temperature."
            )
        return (loss, outputs) if return_outputs else loss


# ---------------------------------------------------------------------------------------------
# Data preparation
# ---------------------------------------------------------------------------------------------


def tokenize_dataset(
    data: DatasetDict, tokenizer: PreTrainedTokenizerBase, *, max_length: int = 128
) -> DatasetDict:
    """Token ids (no padding: batches are padded dynamically) and ``label``, text dropped."""

    def encode(batch):
        return tokenizer(batch["text"], truncation=True, max_length=max_length)

    return data.map(encode, batched=True, remove_columns=["text"], desc="Tokenising")


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
    """``data`` with ``copies`` noisy copies of every training query appended to its train split:
    each word dropped with probability ``drop`` (one kept if all would go) and, in copies of 3+ words,
    one adjacent pair swapped with probability ``swap`` (``random.Random(seed)``: the same copies every
    run). A copy keeps its query's label, and the teacher's cached logits are computed on it, so the
    student learns a fragment both ways (TinyBERT augments with masked-LM and GloVe word replacements and
    teacher labels only; here the teacher-only variant scored lower on validation, README's recipe tables).
    ``copies = 0`` returns ``data``."""
    check_whole_number("augment_copies", copies, 0)
    if copies == 0:
        return data
    rng = random.Random(seed)
    train = data["train"]
    columns = train.to_dict()  # the label and any other column, kept with each copy
    texts = columns["text"]
    extra = [
        Dataset.from_dict({**columns, "text": [_word_dropout(text, rng, drop, swap) for text in texts]},
                          features=train.features)
        for _ in range(copies)
    ]
    return DatasetDict({**data, "train": concatenate_datasets([train, *extra])})


@torch.inference_mode()
def teacher_logits_for(
    teacher: PreTrainedModel, dataset: Dataset, tokenizer: PreTrainedTokenizerBase, *, batch_size: int = 128
) -> np.ndarray:
    """The teacher's logits for every row of a tokenised dataset, batched and in eval mode."""
    teacher.eval()
    device = next(teacher.parameters()).device
    collator = DataCollatorWithPadding(tokenizer)
    model_inputs = [c for c in MODEL_INPUT_NAMES if c in dataset.column_names]
    order = np.argsort([len(ids) for ids in dataset["input_ids"]], kind="stable")
    out = np.zeros((len(dataset), teacher.config.num_labels), dtype=np.float32)
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        batch = collator([{c: dataset[int(i)][c] for c in model_inputs} for i in rows])
        logits = teacher(**forward_inputs(teacher, {k: v.to(device) for k, v in batch.items()})).logits
        out[rows] = logits.float().cpu().numpy()
    return out


def add_teacher_logits(
    data: DatasetDict | Dataset,
    teacher: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    *,
    splits: tuple[str, ...] = ("train", "validation"),
    batch_size: int = 128,
) -> DatasetDict | Dataset:
    """Add a ``teacher_logits`` column (computed once) to tokenised splits."""
    if isinstance(data, Dataset):
        logits = teacher_logits_for(teacher, data, tokenizer, batch_size=batch_size)
        return data.add_column(TEACHER_LOGITS, [row.tolist() for row in logits])
    return DatasetDict(
        {
            name: add_teacher_logits(ds, teacher, tokenizer, batch_size=batch_size) if name in splits else ds
            for name, ds in data.items()
        }
    )


def prepare_datasets(
    data: DatasetDict,
    tokenizer: PreTrainedTokenizerBase,
    *,
    teacher: PreTrainedModel | None = None,
    max_length: int = 128,
    augment_copies: int = 0,
    seed: int = 42,
) -> DatasetDict:
    """Tokenise ``data`` (with ``augment_copies`` noisy copies of the training queries,
    :func:`add_noisy_copies`) and, given a teacher, add its cached logits: the work every training run
    on the same data and teacher shares. The logits are raw (temperature is applied in the loss), so
    one preparation serves runs with any alpha and T, e.g. all trials of a hyperparameter search."""
    data = add_noisy_copies(data, augment_copies, seed=seed)
    tokenized = tokenize_dataset(data, tokenizer, max_length=max_length)
    return add_teacher_logits(tokenized, teacher, tokenizer) if teacher is not None else tokenized


# ---------------------------------------------------------------------------------------------
# The per-epoch table of the reference model card
# ---------------------------------------------------------------------------------------------


def epoch_table(log_history: list[dict]) -> pd.DataFrame:
    """Training Loss | Epoch | Step | Validation Loss | Accuracy, one row per evaluation.

    The training loss is the one logged since the previous evaluation ("No log" when none was,
    as in the Hugging Face model cards).
    """
    rows, last_eval_step = [], -1
    train_logs = [e for e in log_history if "loss" in e and "eval_loss" not in e]
    for entry in (e for e in log_history if "eval_loss" in e):
        step = entry["step"]
        since = [e for e in train_logs if last_eval_step < e["step"] <= step]
        rows.append(
            {
                "Training Loss": round(since[-1]["loss"], 4) if since else NO_LOG,
                "Epoch": round(float(entry["epoch"]), 2),
                "Step": int(step),
                "Validation Loss": round(float(entry["eval_loss"]), 4),
                "Accuracy": round(float(entry.get("eval_accuracy", float("nan"))), 4),
            }
        )
        last_eval_step = step
    return pd.DataFrame(rows, columns=EPOCH_TABLE_COLUMNS)


def compute_accuracy_metric(eval_pred) -> dict:
    """``compute_metrics`` for the Trainer: accuracy of the argmax."""
    logits, labels = eval_pred
    logits = logits[0] if isinstance(logits, tuple) else logits
    return {"accuracy": float((np.argmax(logits, axis=-1) == labels).mean())}


# ---------------------------------------------------------------------------------------------
# One call that trains: notebook 01 (alpha = 1) and notebook 02 use it
# ---------------------------------------------------------------------------------------------


def _profile_default(name: str):
    """The default profile's value of a run parameter (:class:`kdlib.config.RunConfig`): one source."""
    return RunConfig.model_fields[name].default


@dataclass
class TrainConfig:
    """Hyperparameters of one training run. The run parameters among them default to the default
    profile's values (:class:`kdlib.config.RunConfig`; the book's lr 2e-5 / batch 48 are the ``book``
    profile's); :meth:`for_teacher` and :meth:`for_student` build them from a run configuration."""

    alpha: float = _profile_default("alpha")
    temperature: float = _profile_default("temperature")
    hidden_weight: float = _profile_default("hidden_weight")
    augment_copies: int = _profile_default("augment_copies")
    learning_rate: float = _profile_default("learning_rate")
    batch_size: int = _profile_default("batch_size")
    epochs: float = _profile_default("epochs")
    seed: int = _profile_default("seed")
    gradient_accumulation_steps: int = _profile_default("gradient_accumulation_steps")
    weight_decay: float = 0.01
    warmup_ratio: float = 0.0
    max_length: int = 128
    cache_teacher_logits: bool = _profile_default("cache_teacher_logits")
    group_by_length: bool = True
    max_steps: int = -1

    @classmethod
    def for_teacher(cls, config: RunConfig) -> TrainConfig:
        """Notebook 01's fine-tuning of the teacher: cross-entropy only (alpha = 1), ``finetune_*``."""
        return cls(alpha=1.0, learning_rate=config.finetune_learning_rate, batch_size=config.finetune_batch_size,
                   epochs=config.finetune_epochs, warmup_ratio=config.finetune_warmup_ratio, seed=config.seed)

    @classmethod
    def for_student(cls, config: RunConfig) -> TrainConfig:
        """Notebook 02's distillation of the student: every field that is also a run parameter."""
        return cls(**{f.name: getattr(config, f.name) for f in fields(cls) if f.name in RunConfig.model_fields})

    def __post_init__(self):
        check_alpha_temperature(self.alpha, self.temperature)
        check_loss_weight("hidden_weight", self.hidden_weight)
        positive = {"epochs": self.epochs, "learning_rate": self.learning_rate}
        for name, value in positive.items():
            if not _is_real(value) or not math.isfinite(value) or value <= 0:
                raise ValueError(f"{name} must be a finite number > 0 (or nothing is trained); got {value!r}.")
        for name, least in (("batch_size", 1), ("gradient_accumulation_steps", 1), ("augment_copies", 0)):
            check_whole_number(name, getattr(self, name), least)
        if not _is_real(self.warmup_ratio) or not 0.0 <= self.warmup_ratio < 1.0:
            raise ValueError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio!r}.")


@dataclass
class TrainResult:
    """What a training returns: the trained model, its trainer, the per-epoch table, the settings
    used, the checkpoint it resumed from (if any), training seconds, the log and its checkpoint folder."""

    model: PreTrainedModel
    trainer: DistillationTrainer
    epoch_table: pd.DataFrame
    config: TrainConfig
    resumed_from: str | None = None
    train_seconds: float = 0.0
    log_history: list = field(default_factory=list)
    checkpoint_dir: Path | None = None


def training_arguments(config: TrainConfig, output_dir: str | Path, **overrides) -> TrainingArguments:
    """The ``TrainingArguments`` of ``config`` (AdamW 0.9/0.999/1e-8, linear schedule, eval every
    epoch); ``overrides`` are any other ``TrainingArguments`` fields."""
    steps_per_warmup = overrides.pop("warmup_steps", None)
    kwargs = dict(
        output_dir=str(output_dir),
        learning_rate=config.learning_rate,
        per_device_train_batch_size=config.batch_size,
        per_device_eval_batch_size=max(config.batch_size, 64),
        num_train_epochs=config.epochs,
        max_steps=config.max_steps,
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        weight_decay=config.weight_decay,
        adam_beta1=0.9,
        adam_beta2=0.999,
        adam_epsilon=1e-8,
        lr_scheduler_type="linear",
        # transformers 5 reads a warmup_steps value below 1 as a ratio of the total steps
        warmup_steps=steps_per_warmup if steps_per_warmup is not None else config.warmup_ratio,
        eval_strategy="epoch",
        logging_strategy="epoch",
        save_strategy="epoch",
        save_total_limit=1,
        seed=config.seed,
        data_seed=config.seed,
        report_to="none",
        disable_tqdm=True,
        train_sampling_strategy="group_by_length" if config.group_by_length else "random",
        dataloader_num_workers=0,
        dataloader_pin_memory=torch.cuda.is_available(),
    )
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available():
        # Several CPU processes (torchrun / accelerate launch): without use_cpu accelerate does not
        # wrap the model in DDP and each process would train on its own.
        kwargs.update(use_cpu=True, ddp_backend="gloo")
    kwargs.update(overrides)
    return TrainingArguments(**kwargs)


def checkpoint_key(config: TrainConfig, student: PreTrainedModel, fingerprint: str | None, overrides: dict) -> str:
    """The folder name of a training run's checkpoints: a hash of the run's fingerprint (settings and
    data, from :meth:`kdlib.config.RunConfig.fingerprint`), this call's training settings and the
    student's starting weights. The one resume mechanism: only a run of the same key resumes."""
    text = json.dumps(
        {"run": fingerprint, "config": asdict(config), "initial_weights": weights_digest(student),
         "overrides": overrides},
        sort_keys=True, default=str,
    )
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
    """The newest checkpoint that can be resumed from. A torn one (killed or disk full during a save)
    is renamed ``torn-<name>`` with a warning naming it, and the next older one is tried."""
    output_dir = Path(output_dir)
    candidates = sorted(
        (p for p in output_dir.glob("checkpoint-*") if p.is_dir() and p.name.split("-")[-1].isdigit()),
        key=lambda p: int(p.name.split("-")[-1]), reverse=True,
    )
    for folder in candidates:
        problem = _checkpoint_problem(folder)
        if problem is None:
            return str(folder)
        torn = folder.with_name("torn-" + folder.name)  # outside the Trainer's checkpoint-* rotation
        shutil.rmtree(torn, ignore_errors=True)
        os.replace(folder, torn)
        warnings.warn(
            f"Checkpoint {folder} cannot be resumed from ({problem}); moved to {torn.name} and skipped.",
            RuntimeWarning, stacklevel=2,
        )
    return None


def train_classifier(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    data: DatasetDict,
    *,
    output_dir: str | Path,
    config: TrainConfig,
    teacher: PreTrainedModel | None = None,
    resume: bool = True,
    fingerprint: str | None = None,
    prepared: DatasetDict | None = None,
    callbacks: Sequence[TrainerCallback] = (),
    **training_overrides,
) -> TrainResult:
    """Train the classifier ``model`` on ``data`` (text + ClassLabel label): fine-tuning with
    ``alpha=1`` and no ``teacher`` (notebook 01's teacher), distillation from ``teacher`` otherwise
    (the loss of :class:`DistillationTrainer`). Returns the trained model, the per-epoch table and
    the Trainer (:class:`TrainResult`).

    Checkpoints are written every epoch under ``output_dir/<key>`` (:func:`checkpoint_key`: the
    run's ``fingerprint``, the settings and the starting weights); calling again with the same
    arguments resumes from the last good one, anything else starts in a fresh folder. A second
    process training into the same folder is refused. ``prepared`` (from :func:`prepare_datasets` on
    the same ``data``) skips tokenising and the teacher-logit cache when several runs share them;
    ``callbacks`` are added to the Trainer's (the search's pruning, for one).
    """
    from filelock import FileLock, Timeout

    if config.alpha < 1.0 and teacher is None:
        raise ValueError(f"alpha={config.alpha} < 1 distils from a teacher: pass `teacher=`.")
    if config.hidden_weight > 0 and teacher is None:
        raise ValueError(
            f"hidden_weight={config.hidden_weight} > 0 matches a teacher's hidden states: pass `teacher=`."
        )
    if prepared is not None:  # checked before the checkpoint folder is touched
        columns = prepared["train"].column_names if "train" in prepared else []
        if not {"train", "validation"} <= set(prepared) or "input_ids" not in columns:
            raise ValueError(
                "`prepared` must come from prepare_datasets(data, tokenizer): tokenised train and validation "
                f"splits; got splits {sorted(prepared)}, train columns {columns}."
            )
        expected = len(data["train"]) * (1 + config.augment_copies)
        if len(prepared["train"]) != expected:
            raise ValueError(
                f"`prepared` has {len(prepared['train'])} training rows, augment_copies={config.augment_copies} "
                f"needs {expected}: pass augment_copies={config.augment_copies} to prepare_datasets."
            )
    set_seed(config.seed)
    runtime_only = {"use_cpu", "ddp_backend", "dataloader_num_workers", "report_to", "disable_tqdm"}
    overrides = {k: v for k, v in training_overrides.items() if k not in runtime_only}
    output_dir = Path(output_dir) / checkpoint_key(config, model, fingerprint, overrides)
    output_dir.mkdir(parents=True, exist_ok=True)
    # One lock per training: the ranks of one multi-process (DDP) run share it through rank 0.
    lock = FileLock(output_dir / ".training.lock", blocking=False)
    try:
        if int(os.environ.get("RANK", "0")) == 0:
            lock.acquire()
    except Timeout:
        raise RuntimeError(
            f"Another process is training into {output_dir}: wait for it to finish (its checkpoints will be "
            "resumed), or use another run_name."
        ) from None
    try:
        if resume:
            last_checkpoint = last_good_checkpoint(output_dir)
        else:
            last_checkpoint = None
            for checkpoint in output_dir.glob("checkpoint-*"):
                shutil.rmtree(checkpoint)

        if prepared is None:
            augmented = add_noisy_copies(data, config.augment_copies, seed=config.seed)
            tokenized = tokenize_dataset(augmented, tokenizer, max_length=config.max_length)
        else:
            tokenized = prepared
        online_teacher = None
        if config.hidden_weight > 0:
            online_teacher = teacher  # hidden states are too large to cache; the teacher runs at each step
        elif config.alpha < 1.0:
            if not config.cache_teacher_logits:
                online_teacher = teacher
            elif TEACHER_LOGITS not in tokenized["train"].column_names:
                tokenized = add_teacher_logits(tokenized, teacher, tokenizer)
        mode = progress_mode()
        args = training_arguments(config, output_dir, **{"disable_tqdm": mode != "notebook", **training_overrides})
        trainer = DistillationTrainer(
            model=model,
            args=args,
            config=config,
            teacher_model=online_teacher,
            train_dataset=tokenized["train"],
            eval_dataset=tokenized["validation"],
            data_collator=DataCollatorWithPadding(tokenizer),
            processing_class=tokenizer,
            compute_metrics=compute_accuracy_metric,
            callbacks=list(callbacks),
        )
        trainer.remove_callback(PrinterCallback)  # the epoch table below says it once, readably
        if mode == "console":
            trainer.add_callback(ProgressLines())
        start = time.perf_counter()
        trainer.train(resume_from_checkpoint=last_checkpoint)
        elapsed = time.perf_counter() - start
    finally:
        lock.release()
    history = list(trainer.state.log_history)
    return TrainResult(
        model=trainer.model,
        trainer=trainer,
        epoch_table=epoch_table(history),
        config=config,
        resumed_from=last_checkpoint,
        train_seconds=elapsed,
        log_history=history,
        checkpoint_dir=output_dir,
    )


# ---------------------------------------------------------------------------------------------
# Progress a person can follow
# ---------------------------------------------------------------------------------------------

PROGRESS_ENV = "KDLIB_PROGRESS"
PROGRESS_FILE_ENV = "KDLIB_PROGRESS_FILE"  # set by the runner: a kernel's own stderr ends up in the notebook


def progress_mode() -> str:
    """How training reports progress: ``$KDLIB_PROGRESS`` (notebook | console | off), else a bar in an
    interactive notebook and periodic lines anywhere else. The runner sets ``console`` for the
    notebooks it executes (their lines reach its terminal, not the stored notebook)."""
    mode = os.environ.get(PROGRESS_ENV, "").strip().lower()
    if mode in {"notebook", "console", "off"}:
        return mode
    try:
        from IPython import get_ipython

        shell = type(get_ipython()).__name__
    except ImportError:
        shell = ""
    return "notebook" if shell == "ZMQInteractiveShell" else "console"


def _duration(seconds: float) -> str:
    minutes, secs = divmod(int(round(seconds)), 60)
    return f"{minutes} min {secs} s" if minutes else f"{secs} s"


class ProgressLines(TrainerCallback):
    """One line at most every ``every`` seconds and at each epoch's end:
    ``[train] epoch 2.0/5 · step 640/1590 · 3 min 10 s elapsed · ~4 min 40 s left``, no bar to spam a
    CI log. Written to ``$KDLIB_PROGRESS_FILE`` when the runner set one (it prints the lines on its
    terminal; a kernel's stderr would end up in the stored notebook), else to the process's stderr."""

    def __init__(self, every: float = 30.0, clock=None, stream=None) -> None:
        self.every, self.clock = every, clock or time.monotonic
        self.stream = stream
        self.start = self.last = None
        self.first_step = 0

    def _write(self, state, args) -> None:
        now = self.clock()
        done = state.global_step - self.first_step
        left = state.max_steps - state.global_step
        eta = f" · ~{_duration((now - self.start) / done * left)} left" if done > 0 and left > 0 else ""
        epochs = args.num_train_epochs
        line = (f"[train] epoch {state.epoch or 0:.1f}/{epochs:g} · step {state.global_step}/{state.max_steps} · "
                f"{_duration(now - self.start)} elapsed{eta}")
        target = os.environ.get(PROGRESS_FILE_ENV)
        if self.stream is None and target:
            with open(target, "a", encoding="utf-8") as handle:
                print(line, file=handle, flush=True)
        elif (self.stream or sys.__stderr__) is not None:
            print(line, file=self.stream or sys.__stderr__, flush=True)
        self.last = now

    def on_train_begin(self, args, state, control, **kwargs):
        self.start = self.last = self.clock()
        self.first_step = state.global_step

    def on_step_end(self, args, state, control, **kwargs):
        if self.clock() - self.last >= self.every:
            self._write(state, args)

    def on_epoch_end(self, args, state, control, **kwargs):
        self._write(state, args)


# ---------------------------------------------------------------------------------------------
# Soft targets, for the figure that explains them
# ---------------------------------------------------------------------------------------------


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
