"""The run configuration: one validated schema, the single source of every default.

:class:`RunConfig` holds the defaults, ``configs/<profile>.yaml`` what a profile changes, and ``-p`` values or
notebook parameters override the profile. :func:`load_config` merges them and validates the result before any
work (and before torch loads), so papermill, ``make run`` and JupyterLab get the same checks.
"""

from __future__ import annotations

import ast
import contextlib
import difflib
import hashlib
import importlib.util
import json
import math
import os
import re
import types
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, field_validator, model_validator

from kdlib.io import project_root

if TYPE_CHECKING:
    from datasets import DatasetDict

CONFIG_DIR_NAME = "configs"
DEFAULT_PROFILE = "minilm"
OVERRIDES = "overrides"  # the parameters-cell name that carries every run parameter the cell does not list
SLUG = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
SLUG_RULE = "must be a plain name: letters, digits, '.', '_' or '-', at most 64 characters, no '/'"  # SLUG in words
MAX_LENGTH = 128  # tokens kept of each query, in training, inference and export alike
VARIANTS = ("int8", "onnx", "onnx-int8", "onnx-fused-int8")  # kdlib.inference.build_variants builds them


class ConfigError(ValueError):
    """Run parameters that cannot be used; the message names each parameter and the fix."""


def _not_bool(value: Any) -> Any:
    # pydantic reads True as 1: a flag given where a number belongs is a mistake, not a 1.
    if isinstance(value, bool):
        raise ValueError("expected a number, got a boolean")
    return value


def _text(value: Any) -> Any:
    # YAML reads `-p run_name 2024` as a number; a name is text whatever it looks like.
    return str(value) if isinstance(value, int | float) and not isinstance(value, bool) else value


def _layer_choice(value: Any) -> Any:
    # One message for either form of keep_layers, instead of one per branch of the union.
    if value is None or isinstance(value, int) and not isinstance(value, bool) and value >= 1:
        return value
    if isinstance(value, list) and value and all(isinstance(i, int) and not isinstance(i, bool) and i >= 0
                                                for i in value) and len(set(value)) == len(value):
        return value
    raise ValueError("must be a layer count >= 1 (e.g. 4) or a list of distinct layer indices >= 0 (e.g. [1, 3, 5])")


Int = Annotated[int, BeforeValidator(_not_bool)]
Float = Annotated[float, BeforeValidator(_not_bool)]
Text = Annotated[str, BeforeValidator(_text)]
Slug = Annotated[str, BeforeValidator(_text), Field(pattern=SLUG.pattern)]
Rows = Annotated[int | None, BeforeValidator(_not_bool), Field(ge=1)]


class RunConfig(BaseModel):
    """Every parameter of a run, with the values that hold for any teacher and data as defaults; the field
    descriptions are what ``--help-params`` prints."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=True)

    # the run
    run_name: Slug = Field("minilm", description="results go to outputs/results/<run_name>/ (letters, digits, . _ -)")
    output_dir: Text = Field("outputs", description="where a run writes, relative to the project root")
    seed: Int = Field(42, ge=0, description="seeds Python, NumPy, torch and the data order")
    threads: Int | None = Field(None, ge=1, description="CPU threads for torch; None: all cores")
    # data
    data_source: Text | None = Field(None, description="CLINC150 .json(.gz) file, CSV/JSONL folder or Hub id; None: "
                                     "$KDLIB_DATA, else the embedded CLINC150 plus")
    text_column: Text = Field("text", min_length=1, description="text column of a CSV/JSONL folder or Hub dataset")
    label_column: Text = Field("label", min_length=1, description="label column of a CSV/JSONL folder or Hub dataset")
    validation_fraction: Float = Field(0.1, gt=0, lt=1,
                                       description="share of train held out when the data has no validation split")
    drop_duplicates: bool = Field(False, description="drop train/validation texts that also appear in another split")
    max_train_rows: Rows = Field(None, description="row limit of the train split; None: whole split")
    max_validation_rows: Rows = Field(None, description="row limit of the validation split; None: whole split")
    max_test_rows: Rows = Field(None, description="row limit of the test split; None: whole split")
    # 01: the teacher
    teacher: Text = Field("all-MiniLM-L6-v2", min_length=1,
                          description="Hub id, local directory, all-MiniLM-L6-v2 (offline copy) or tiny-bert")
    finetune_epochs: Int = Field(5, ge=1, description="epochs of fine-tuning when the teacher is a base encoder")
    finetune_learning_rate: Float = Field(1e-4, gt=0, allow_inf_nan=False, description="teacher fine-tuning lr")
    finetune_batch_size: Int = Field(16, ge=1, description="teacher fine-tuning batch size")
    finetune_warmup_ratio: Float = Field(0.1, ge=0, lt=1, description="share of steps with a rising learning rate")
    # 02: the student
    teacher_model: Text | None = Field(None, description="teacher to distil from; None: the one notebook 01 saved "
                                       "under outputs/models/<run_name>/")
    student_init: Literal["teacher_layers", "pretrained", "config"] = Field(
        "teacher_layers", description="teacher_layers (DistilBERT-style) | pretrained | config")
    student: Text | None = Field(None, description="model reference for the pretrained / config inits")
    keep_layers: Annotated[list[int] | int | None, BeforeValidator(_layer_choice)] = Field(
        None, description="teacher layers the student keeps: how many (evenly spaced, ending with the last) or which "
        "(a list of indices); None: half of them")
    alpha: Float = Field(0.5, ge=0, le=1, description="weight of the hard-label cross-entropy, in [0, 1]")
    temperature: Float = Field(2.0, gt=0, allow_inf_nan=False, description="softmax temperature of the KL term, > 0")
    hidden_weight: Float = Field(0.0, ge=0, allow_inf_nan=False, description="weight of an MSE between student and "
                                 "teacher hidden states (TinyBERT style); 0: logits only")
    augment_copies: Int = Field(0, ge=0,
                                description="word-dropout copies of each training query for the student; 0: none")
    learning_rate: Float = Field(2e-4, gt=0, allow_inf_nan=False, description="student learning rate")
    batch_size: Int = Field(32, ge=1, description="student batch size")
    epochs: Int = Field(5, ge=1, description="student training epochs")
    gradient_accumulation_steps: Int = Field(1, ge=1, description="batches accumulated per optimiser step")
    cache_teacher_logits: bool = Field(True, description="compute the teacher's logits once, not at every step")
    n_trials: Int = Field(0, ge=0,
                          description="Optuna trials over epochs, alpha, T and hidden_weight; 0 skips the search")
    search_storage: Text | None = Field(
        None, description="the search's study: a journal file (several workers on one disk) or a database URL "
        "(postgresql+psycopg://…, workers on many machines); None: a journal under outputs/checkpoints/<run_name>/")
    search_latency: bool = Field(
        False, description="search validation accuracy and measured latency together (Optuna multi-objective, the "
        "student's depth searched too); the fastest Pareto trial within 1 point of the best is chosen")
    ffn_keep: Float = Field(1.0, gt=0, le=1, description="structured pruning: share of each layer's FFN neurons the "
                            "student keeps; 1: none")
    heads_keep: Float = Field(1.0, gt=0, le=1, description="structured pruning: share of each layer's attention "
                              "heads kept (at least one)")
    prune_epochs: Int = Field(3, ge=1, description="epochs of distillation that recover a pruned student")
    variants: list[Literal[VARIANTS]] = Field(list(VARIANTS), description="faster variants of the student to build "
                                              "and benchmark (onnx-fused-int8: the fastest)")
    n_latency_queries: Int = Field(100, ge=1, description="single-query calls timed, as in the reference")
    # 01 and 02: out-of-scope detection, a threshold on a score chosen on validation
    oos_score: Literal["mahalanobis", "energy", "msp"] = Field(
        "mahalanobis", description="OOS score: mahalanobis (distance of mean-pooled features to the nearest intent, "
        "fit on train; energy for a model without features) | energy (-logsumexp of in-scope logits) | msp (1 - max "
        "softmax)")
    threshold_rule: Literal["in_scope_drop", "flag_rate", "in_scope_accuracy", "accuracy"] = Field(
        "in_scope_drop", description="how the OOS threshold is chosen on validation: in_scope_drop (give up at most "
        "in_scope_drop of the model's own in-scope accuracy), flag_rate (flag at most flag_rate of in-scope queries), "
        "in_scope_accuracy (keep in-scope accuracy >= in_scope_target) or accuracy (maximise it)")
    in_scope_drop: Float = Field(0.01, ge=0, le=1, description="share of its own validation in-scope accuracy a model "
                                 "gives up to the threshold")
    flag_rate: Float = Field(0.05, ge=0, le=1, description="share of validation in-scope queries the threshold flags")
    in_scope_target: Float = Field(0.95, ge=0, le=1, description="validation in-scope accuracy the absolute rule keeps")
    # 03: the comparison
    runs: list[Slug] | None = Field(None, description="runs to overlay in 03; None: [run_name]")
    baseline: Slug = Field("teacher", description="speed-up and size ratios are measured against this variant")
    highlight: Slug | None = Field(None, description="variant drawn highlighted in 03's figures; None: the "
                                   "recommended one (kdlib.recommend)")

    @field_validator("variants")
    @classmethod
    def _distinct_variants(cls, value: list[str]) -> list[str]:
        if len(set(value)) != len(value):
            raise ValueError(f"lists a variant twice: {value}")
        return value

    @field_validator("search_storage")
    @classmethod
    def _storage_url(cls, value: str | None) -> str | None:
        if value and "://" in value:
            scheme = value.split("://", 1)[0].split("+", 1)[0]
            if scheme not in ("sqlite", "postgresql", "mysql"):
                raise ValueError(f"is a URL of scheme {scheme!r}; use a journal file path or a sqlite / postgresql URL")
            if scheme == "postgresql" and importlib.util.find_spec("psycopg") is None:
                raise ValueError("is a PostgreSQL URL but the psycopg driver is missing: pip install -e '.[postgres]'")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> RunConfig:
        if self.student_init != "teacher_layers" and not self.student:
            raise ValueError(f"student_init={self.student_init!r} needs a `student` model reference")
        if self.search_latency and self.student_init != "teacher_layers":
            raise ValueError("search_latency=True searches the student's depth: it needs student_init='teacher_layers'")
        built = ["teacher", "student", *(f"student-{v}" for v in self.variants)]
        if self.highlight and not self.runs and self.highlight not in built:
            raise ValueError(f"highlight={self.highlight!r} is not a variant this run builds; choose one of {built}")
        return self

    def highlighted_variant(self, table: Any) -> str:
        """The variant 03 highlights in a comparison table: ``highlight``, else the recommended one
        (:func:`kdlib.recommend.recommend_variant`), so the figure and the closing sentence agree."""
        from kdlib.recommend import recommend_variant  # pandas loads with the table, after the parameter check

        return self.highlight or recommend_variant(table)

    def fingerprint(self, fields: tuple[str, ...], data_digest: str, **extra: Any) -> str:
        """A short hash of ``fields``, the data digest and ``extra`` (e.g. a teacher's weights digest): two runs
        with the same fingerprint train the same model, so it keys checkpoints and result records."""
        settings = {name: getattr(self, name) for name in sorted(fields)}
        text = json.dumps({"settings": settings, "data": data_digest, **extra}, sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def load_data(self, base_dir: str | os.PathLike | None = None, *, warn_duplicates: bool = True) -> DatasetDict:
        """The run's data as every notebook and script reads it (a relative source taken from ``base_dir``), cut to
        the ``max_*_rows`` limits. ``warn_duplicates=False``: texts in several splits are left to the notebook."""
        from kdlib.data import load_intent_data, subsample  # datasets loads with the data, after the parameter check

        data = load_intent_data(self.data_source, text_column=self.text_column, label_column=self.label_column,
                                validation_fraction=self.validation_fraction, drop_duplicates=self.drop_duplicates,
                                seed=self.seed, base_dir=base_dir, warn_duplicates=warn_duplicates)
        limits = {"train": self.max_train_rows, "validation": self.max_validation_rows, "test": self.max_test_rows}
        return subsample(data, limits, seed=self.seed)


def default_keep_layers(num_layers: int, keep: int | None = None) -> list[int]:
    """Evenly spaced layer indices counted back from the last one, half of them by default (6 -> [1, 3, 5]).
    The last layer is always kept: the teacher's classifier is fine-tuned on its output (as in DistilBERT)."""
    keep = keep or max(1, num_layers // 2)
    if not 1 <= keep <= num_layers:
        raise ValueError(f"keep_layers = {keep}: a student keeps 1 to {num_layers} of the teacher's layers.")
    return sorted({num_layers - 1 - round(i * num_layers / keep) for i in range(keep)})


def layers_to_keep(num_layers: int, keep_layers: Sequence[int] | int | None) -> list[int]:
    """The layer indices ``keep_layers`` stands for: a list names them, a count or None spreads them
    (:func:`default_keep_layers`)."""
    if keep_layers is None or isinstance(keep_layers, int):
        return default_keep_layers(num_layers, keep_layers)
    return list(keep_layers)


def kept_count(share: float, total: int, param: str) -> int:
    """How many of ``total`` heads or neurons a layer keeps at ``share`` (``heads_keep``, ``ffn_keep``), or an error."""
    if isinstance(share, bool) or not 0 < share <= 1:
        raise ValueError(f"{param} must be a share in (0, 1], got {share!r}.")
    kept = round(share * total)
    if kept < 1:
        raise ValueError(f"{param}={share} keeps none of a layer's {total}: use at least {1 / total:.3g}.")
    return kept


# Settings that change what each stage trains (the data is covered by its digest).
TEACHER_FIELDS = ("teacher", "finetune_epochs", "finetune_learning_rate", "finetune_batch_size",
                  "finetune_warmup_ratio", "seed")
STUDENT_FIELDS = ("student_init", "student", "keep_layers", "alpha", "temperature", "hidden_weight",
                  "augment_copies", "learning_rate", "batch_size", "epochs", "gradient_accumulation_steps",
                  "cache_teacher_logits", "n_trials", "search_latency", "seed")


def profile_path(name_or_path: str | os.PathLike) -> Path:
    """``configs/<name>.yaml``, or the given file when it ends in .yaml / .yml."""
    path = Path(name_or_path).expanduser()
    if path.suffix in (".yaml", ".yml"):
        return path.resolve()
    return project_root() / CONFIG_DIR_NAME / f"{name_or_path}.yaml"


def load_profile(name_or_path: str | os.PathLike = DEFAULT_PROFILE) -> dict[str, Any]:
    """What a profile changes from the defaults: the mapping in its YAML file."""
    path = profile_path(name_or_path)
    if not path.is_file():
        available = sorted(p.stem for p in (project_root() / CONFIG_DIR_NAME).glob("*.yaml"))
        raise ConfigError(f"profile {str(name_or_path)!r} not found ({path}); available profiles: "
                          f"{', '.join(available)}, or a path to a .yaml file.")
    params = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    if not isinstance(params, dict):
        raise ConfigError(f"{path} must be a mapping of parameter names to values.")
    return params


def _describe_error(error: dict, given: dict[str, Any]) -> str:
    name = ".".join(str(part) for part in error["loc"]) or "(run configuration)"
    top = str(error["loc"][0]) if error["loc"] else ""
    if error["type"] == "extra_forbidden":
        close = difflib.get_close_matches(top, RunConfig.model_fields, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else "; `python -m kdlib.run --help-params` lists them"
        return f"{name}: unknown parameter{hint}"
    shown = f" = {given[top]!r}" if top in given else ""
    message = error["msg"].removeprefix("Value error, ")
    if error["type"] == "string_pattern_mismatch":  # every pattern here is SLUG
        message = SLUG_RULE
    return f"{name}{shown}: {message}"


def validate(params: dict[str, Any], *, source: str = "run parameters") -> RunConfig:
    """A :class:`RunConfig` from a flat mapping, or one :class:`ConfigError` listing every problem."""
    try:
        return RunConfig(**params)
    except ValidationError as err:
        lines = "\n  ".join(_describe_error(e, params) for e in err.errors())
        raise ConfigError(f"Invalid {source}:\n  {lines}") from None


def load_config(profile: str | os.PathLike = DEFAULT_PROFILE, **overrides: Any) -> RunConfig:
    """The defaults, then the profile's values, then ``overrides``; validated before any work."""
    return validate({**load_profile(profile), **overrides}, source=f"run parameters (profile {str(profile)!r})")


def config_from_notebook(namespace: dict[str, Any]) -> RunConfig:
    """A notebook run's configuration: ``profile``, then ``overrides``, then the names its ``parameters`` cell sets
    (``None``: the profile's value). Variables of other cells (run before, in JupyterLab) are not read."""
    names = _parameter_cell_names(namespace)
    extra = namespace.get(OVERRIDES) if OVERRIDES in names else None
    if extra is not None and not isinstance(extra, dict):
        raise ConfigError(f"{OVERRIDES} = {extra!r}: must be a mapping of parameter names to values, e.g. "
                          '{"n_latency_queries": 20}, or None.')
    overrides = {name: namespace[name] for name in names
                 if name not in ("profile", OVERRIDES) and name in namespace
                 and (namespace[name] is not None or name not in RunConfig.model_fields)}
    return load_config(namespace.get("profile") or DEFAULT_PROFILE, **{**(extra or {}), **overrides})


def _parameter_cell_names(namespace: dict[str, Any]) -> list[str]:
    """Names assigned by the parameters cell(s) this kernel ran (IPython's ``In`` history); without a
    history (a plain dict), every public name that is not a module or a function."""
    history = namespace.get("In")
    if not isinstance(history, list) or not history:
        return [n for n, v in namespace.items() if not n.startswith("_") and n not in ("In", "Out", "profile")
                and not callable(v) and not isinstance(v, types.ModuleType)]
    names: dict[str, None] = {}
    for source in history:
        if re.search(r"^profile\s*=", source, re.M) or source.lstrip().startswith("# Parameters"):
            with contextlib.suppress(SyntaxError):  # a cell that does not parse names nothing
                for node in ast.parse(source).body:
                    if isinstance(node, ast.Assign | ast.AnnAssign):
                        targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                        names.update(dict.fromkeys(t.id for t in targets if isinstance(t, ast.Name)))
    return list(names)


def parse_cli_value(name: str, text: str) -> Any:
    """``-p NAME VALUE``: YAML for numbers, booleans, null and lists; text fields stay text."""
    value = yaml.safe_load(text)
    if value is None or isinstance(value, list | dict | bool):
        return value
    if name in {"run_name", "output_dir", "data_source", "teacher", "teacher_model", "student"}:
        return text
    if isinstance(value, str):
        try:  # YAML 1.1 reads 1e-3 (no dot) as text; a number field wants the number
            number = float(value)
        except ValueError:
            return value
        return number if math.isfinite(number) or name not in RunConfig.model_fields else value
    return value


def parameter_help(profile: str | os.PathLike = DEFAULT_PROFILE) -> str:
    """Every parameter with its value in ``profile`` and its description, for ``--help-params``; a value
    the profile changes is marked with the default it replaces."""
    changes = load_profile(profile)
    lines = []
    for name, field in RunConfig.model_fields.items():
        changed = name in changes and changes[name] != field.default
        value = f"{changes[name]!r} (default {field.default!r})" if changed else repr(field.default)
        lines.append(f"  {name:<28} {value:<24} {field.description or ''}")
    return "\n".join(lines)
