"""Intent-classification data from every source kdlib supports, in one shape.

Every loader returns a ``DatasetDict`` with ``train`` / ``validation`` / ``test`` splits, a ``text``
column and a ``label`` ``ClassLabel`` column named by intent: a new source needs a new loader here only.

The source is the ``source`` argument (run parameter ``data_source``), else ``$KDLIB_DATA``, else the
embedded CLINC150 ``plus`` (``kdlib/clinc150/``, CC BY 3.0, offline). A source is

* :data:`EMBEDDED_SOURCE` (``embedded:clinc150-plus``): the embedded release file;
* a file: a CLINC150 release file (``data_oos_plus.json`` ...), plain or gzip-compressed;
* a directory: your own ``train`` / ``validation`` / ``test`` files in CSV or JSON Lines;
* anything else: a Hub dataset id, optionally ``name:config`` (``clinc_oos:plus``).
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import json
import numbers
import os
import random
import warnings
import zlib
from collections.abc import Sequence
from pathlib import Path

import datasets
import pandas as pd
from datasets import ClassLabel, Dataset, DatasetDict, Features, Value

DATA_ENV_VAR = "KDLIB_DATA"
EMBEDDED_SOURCE = "embedded:clinc150-plus"
EMBEDDED_FILE = Path(__file__).resolve().parent / "clinc150" / "data_oos_plus.json.gz"
OOS_LABEL = "oos"
SPLITS = ("train", "validation", "test")
# CLINC150 release files: our split name -> (in-scope key, out-of-scope key).
CLINC_RELEASE_KEYS = {"train": ("train", "oos_train"), "validation": ("val", "oos_val"), "test": ("test", "oos_test")}


class DataError(ValueError):
    """Input data that kdlib cannot use; the message names the file and how to fix it."""


class DuplicateTextWarning(UserWarning):
    """The same text appears in more than one split, so test accuracy partly measures memory."""


def resolve_data_source(source: str | os.PathLike | None = None) -> str:
    """The explicit source, else ``$KDLIB_DATA``, else the embedded CLINC150."""
    return str(source) if source not in (None, "") else os.environ.get(DATA_ENV_VAR) or EMBEDDED_SOURCE


def load_intent_data(
    source: str | os.PathLike | None = None, *, text_column: str = "text", label_column: str = "label",
    validation_fraction: float = 0.1, seed: int = 42, drop_duplicates: bool = False,
    base_dir: str | os.PathLike | None = None, warn_duplicates: bool = True,
) -> DatasetDict:
    """Load intent data from the embedded CLINC150, a release file, a folder of CSV/JSONL files or the Hub.

    ``text_column`` / ``label_column`` name the columns of a folder or Hub dataset (the Hub's
    ``clinc_oos`` uses ``intent`` for labels and is recognised automatically). Texts found in more
    than one split are reported with a :class:`DuplicateTextWarning` (``warn_duplicates=False``: not
    reported here, for a caller that shows :func:`describe`'s ``duplicates`` counts instead);
    ``drop_duplicates`` drops them from train and validation (never from test). Relative paths are
    taken from ``base_dir``.
    """
    resolved = resolve_data_source(source)
    if resolved == EMBEDDED_SOURCE:
        data = load_clinc_release(EMBEDDED_FILE)
    else:
        # Relative to base_dir, else to the working directory.
        path = (Path(base_dir or ".").expanduser() / Path(resolved).expanduser()).absolute()
        if path.is_dir():
            data = load_folder(path, text_column=text_column, label_column=label_column,
                               validation_fraction=validation_fraction, seed=seed)
        elif path.is_file() and path.suffix.lower() in (".csv", ".jsonl"):
            raise DataError(f"Data source {path} is a single {path.suffix} file; kdlib reads a folder holding "
                            f"train, validation (optional) and test files. Point the `data_source` parameter or "
                            f"${DATA_ENV_VAR} at that folder (here {path.parent}, if this file is one of them).")
        elif path.is_file() or path.name.lower().endswith((".json", ".json.gz")):
            data = load_clinc_release(path)
        elif looks_like_path(resolved):
            raise DataError(f"Data source {resolved!r}: {path} does not exist. Point the `data_source` parameter "
                            f"or ${DATA_ENV_VAR} at a CLINC150 release .json file or a folder of "
                            "train/validation/test files.")
        else:
            data = load_hub(resolved, text_column=text_column, label_column=label_column,
                            tried_path=None if ":" in resolved else path)
    return check_duplicates(data, drop=drop_duplicates, warn=warn_duplicates)


def looks_like_path(source: str) -> bool:
    """A local path rather than a Hub id (``name``, ``owner/name`` or ``owner/name:config``)."""
    return (source.startswith((".", "/", "~")) or source.split(":", 1)[0].count("/") > 1
            or source.lower().endswith((".json", ".jsonl", ".csv", ".gz")) or (os.sep != "/" and os.sep in source))


def load_clinc_release(path: str | os.PathLike) -> DatasetDict:
    """Read an original CLINC150 release file (``data_oos_plus.json``, ``data_full.json`` ...), plain or gzip."""
    path = Path(path).absolute()
    if not path.is_file():
        raise DataError(f"CLINC150 file {path} not found. Download the release files (e.g. data_oos_plus.json) "
                        f"and pass their path as `data_source` or ${DATA_ENV_VAR}.")
    gzipped = False
    try:
        # gzip is recognised by its magic bytes, not the suffix; utf-8-sig drops a byte-order mark.
        with path.open("rb") as handle:
            gzipped = handle.read(2) == b"\x1f\x8b"
        with (gzip.open if gzipped else open)(path, "rt", encoding="utf-8-sig") as handle:
            raw = json.load(handle)
    except (json.JSONDecodeError, UnicodeDecodeError, OSError, EOFError, zlib.error) as err:
        kind = "gzip-compressed JSON" if gzipped else "JSON"
        raise DataError(f"{path} is not readable {kind} ({type(err).__name__}: {err}). Expected a CLINC150 "
                        "release file (plain or gzip-compressed).") from None
    if not isinstance(raw, dict):
        raise DataError(f"{path}: expected a JSON object with keys train/val/test/oos_*, got {type(raw).__name__}.")
    needed = [key for pair in CLINC_RELEASE_KEYS.values() for key in pair]
    missing = [key for key in needed if key not in raw]
    if missing:
        raise DataError(f"{path}: missing key(s) {missing}. A CLINC150 release file has the keys {needed}, "
                        "each a list of [text, intent] pairs.")
    for key in needed:
        if not isinstance(raw[key], list):
            raise DataError(f"{path}: key {key!r} must be a list of [text, intent] pairs.")
        for i, row in enumerate(raw[key]):
            if not (isinstance(row, list | tuple) and len(row) == 2 and all(isinstance(v, str) for v in row)):
                raise DataError(f"{path}: {key}[{i}] is {row!r}, expected a [text, intent] pair of strings.")
            if not row[0].strip():
                raise DataError(f"{path}: {key}[{i}] has empty text (intent {row[1]!r}). Remove or fill it.")
    rows = {split: [row for key in keys for row in raw[key]] for split, keys in CLINC_RELEASE_KEYS.items()}
    splits = {split: ([text for text, _ in pairs], [intent for _, intent in pairs]) for split, pairs in rows.items()}
    return build_dataset_dict(splits, origin=str(path))


def _find_split_file(folder: Path, split: str) -> Path | None:
    """The split's first existing file; validation may also be named ``val`` or ``dev``."""
    stems = ("validation", "val", "dev") if split == "validation" else (split,)
    candidates = (folder / f"{stem}{suffix}" for stem in stems for suffix in (".csv", ".jsonl", ".json"))
    return next((path for path in candidates if path.is_file()), None)


def _read_rows(path: Path) -> list[dict]:
    """Rows of a CSV or JSON Lines file as dicts; errors name the file and line."""
    # Read by hand rather than with datasets' loaders, for errors that name the file and row;
    # utf-8-sig drops a byte-order mark (Excel writes one) instead of gluing it to the first column's name.
    if path.suffix.lower() == ".csv":
        try:
            with path.open(encoding="utf-8-sig", newline="") as handle:
                return list(csv.DictReader(handle))
        except (csv.Error, UnicodeDecodeError) as err:
            raise DataError(f"{path} is not a readable CSV file ({err}).") from None
    try:
        lines = path.read_text(encoding="utf-8-sig").splitlines()
    except UnicodeDecodeError as err:
        raise DataError(f"{path} is not UTF-8 text ({err}). Save it as UTF-8 JSON Lines.") from None
    rows = []
    for line_number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"{path}, line {line_number}: not valid JSON ({err.msg}). "
                            "Expected JSON Lines: one object per line.") from None
        if not isinstance(row, dict):
            raise DataError(f"{path}, line {line_number}: expected a JSON object, got {type(row).__name__}.")
        rows.append(row)
    return rows


def _columns(path: Path, rows: list[dict], text_column: str, label_column: str) -> tuple[list[str], list[str]]:
    """The (texts, labels) of a file's rows; errors name the file, the row and the column."""
    if not rows:
        raise DataError(f"{path} has no rows. Each split needs at least one example.")
    for i, row in enumerate(rows):
        if None in row:  # csv.DictReader's key for fields beyond the header
            raise DataError(f"{path}: data row {i + 1} has more fields than the header; "
                            "quote text that contains commas.")
    seen = set().union(*(row.keys() for row in rows))
    missing = [c for c in (text_column, label_column) if c not in seen]
    if missing:
        raise DataError(f"{path}: missing column(s) {missing}; found {sorted(seen)}. Pass `text_column=` / "
                        "`label_column=` to name your columns.")
    texts, labels = [], []
    for i, row in enumerate(rows):
        text, label = row.get(text_column), row.get(label_column)
        if label is None or str(label).strip() == "":
            raise DataError(f"{path}: row {i + 1} has no label in column {label_column!r}.")
        if text is None or not str(text).strip():
            raise DataError(f"{path}: row {i + 1} has empty text in column {text_column!r} (label {label!r}). "
                            "Remove the row or fill in its text.")
        texts.append(str(text))
        labels.append(str(label))
    return texts, labels


def load_folder(
    folder: str | os.PathLike, *, text_column: str = "text", label_column: str = "label",
    validation_fraction: float = 0.1, seed: int = 42,
) -> DatasetDict:
    """Read ``train`` / ``validation`` / ``test`` (.csv, .jsonl or .json lines) from a folder.

    Without a validation file, a stratified ``validation_fraction`` of train is held out, so model
    selection never peeks at the test split.
    """
    folder = Path(folder).absolute()
    files = {split: _find_split_file(folder, split) for split in SPLITS}
    if files["train"] is None:
        raise DataError(f"{folder}: no train file. Add train.csv or train.jsonl "
                        f"(columns {text_column!r}, {label_column!r}).")
    if files["test"] is None:
        raise DataError(f"{folder}: no test file. kdlib measures accuracy on a held-out test split: add test.csv or "
                        "test.jsonl with the same columns as train.")
    splits = {
        split: _columns(path, _read_rows(path), text_column, label_column)
        for split, path in files.items() if path is not None
    }
    if "validation" not in splits:
        splits["train"], splits["validation"] = stratified_holdout(*splits["train"], validation_fraction, seed)
    return build_dataset_dict(splits, origin=str(folder), files=files)


def stratified_holdout(
    texts: Sequence[str], labels: Sequence[str], fraction: float, seed: int
) -> tuple[tuple[list[str], list[str]], tuple[list[str], list[str]]]:
    """Split (texts, labels) into train and held-out parts with the same label proportions.

    Not ``Dataset.train_test_split(stratify_by_column=...)``: that refuses a label seen once (kept in
    train here) and a hold-out smaller than the number of labels."""
    if not 0 < fraction < 1:
        raise DataError(f"validation_fraction must be between 0 and 1, got {fraction}.")
    by_label: dict[str, list[int]] = {}
    for i, label in enumerate(labels):
        by_label.setdefault(label, []).append(i)
    rng = random.Random(seed)
    held: set[int] = set()
    for label in sorted(by_label):
        indices = by_label[label]
        rng.shuffle(indices)
        if len(indices) > 1:  # a label seen once stays in train
            n_held = min(max(round(len(indices) * fraction), 1), len(indices) - 1)
            held.update(indices[:n_held])
    keep = [i for i in range(len(texts)) if i not in held]
    return tuple(([texts[i] for i in part], [labels[i] for i in part]) for part in (keep, sorted(held)))


def load_hub(
    name: str, *, text_column: str = "text", label_column: str = "label", tried_path: Path | None = None
) -> DatasetDict:
    """Load a Hub dataset (``name`` or ``name:config``) in kdlib's shape.

    ``tried_path`` (the local path looked for first) is named when the Hub fails too, so a mistyped
    folder is not mistaken for a Hub problem.
    """
    dataset_id, _, config = name.partition(":")
    try:
        raw = datasets.load_dataset(dataset_id, config or None)
    except Exception as err:  # the Hub raises many types: connection, not found, gated ...
        local = f", and there is no local file or folder {tried_path}" if tried_path is not None else ""
        raise DataError(f"Could not load {name!r} from the Hugging Face Hub ({type(err).__name__}: {err}){local}. "
                        f"Without Hub access, point `data_source` or ${DATA_ENV_VAR} at a local CLINC150 .json file "
                        "or folder.") from err
    splits = {}
    for split in SPLITS:  # train first: its columns decide the label column
        source_split = split if split in raw else {"validation": "val"}.get(split, split)
        if source_split not in raw:
            raise DataError(f"Hub dataset {name!r} has no {split!r} split; it has {list(raw)}.")
        ds = raw[source_split]
        if split == "train" and label_column not in ds.column_names and "intent" in ds.column_names:
            label_column = "intent"  # clinc_oos names its label column `intent`
        missing = [c for c in (text_column, label_column) if c not in ds.column_names]
        if missing:
            raise DataError(f"Hub dataset {name!r} split {split!r}: missing column(s) {missing}; "
                            f"found {ds.column_names}. Pass `text_column=` / `label_column=`.")
        feature, labels = ds.features[label_column], ds[label_column]
        if isinstance(feature, ClassLabel):
            labels = [feature.int2str(int(i)) for i in labels]
        splits[split] = (list(ds[text_column]), [str(v) for v in labels])
    label_feature = raw["train"].features[label_column]
    names = list(label_feature.names) if isinstance(label_feature, ClassLabel) else None
    return build_dataset_dict(splits, origin=f"hub:{name}", label_names=names)


def build_dataset_dict(
    splits: dict[str, tuple[list[str], list[str]]], *, origin: str, label_names: Sequence[str] | None = None,
    files: dict[str, Path | None] | None = None,
) -> DatasetDict:
    """Validate raw (texts, labels) splits and build the ``DatasetDict`` every kdlib step expects.

    Label ids follow ``label_names`` when the source defines an order (a Hub ClassLabel; it must name every
    train label), else the sorted train labels, so the same data always gives the same ids.
    """
    where = {split: str((files or {}).get(split) or origin) for split in SPLITS}
    for split in SPLITS:
        texts, labels = splits[split]
        if not texts:
            raise DataError(f"{where[split]}: the {split} split has no rows.")
        for i, text in enumerate(texts):
            if not text or not text.strip():
                raise DataError(f"{where[split]}: {split} row {i + 1} has empty text (label {labels[i]!r}). "
                                "Remove the row or fill in its text.")
    train_labels = set(splits["train"][1])
    if len(train_labels) < 2:
        raise DataError(f"{where['train']}: every train row has the label {min(train_labels)!r}; a classifier "
                        "needs at least two labels (intents). Add rows of other intents, or name the column that "
                        "holds them with `label_column`.")
    for split in ("validation", "test"):
        unseen = sorted(set(splits[split][1]) - train_labels)
        if unseen:
            raise DataError(f"{where[split]}: label(s) {unseen} appear in {split} but never in train; a classifier "
                            "cannot learn them. Add training examples or remove those rows.")
    names = list(label_names) if label_names is not None else sorted(train_labels)
    features = Features({"text": Value("string"), "label": ClassLabel(names=names)})  # encodes names as ids
    return DatasetDict({
        split: Dataset.from_dict({"text": splits[split][0], "label": splits[split][1]}, features=features)
        for split in SPLITS
    })


def label_names(data: DatasetDict | Dataset) -> list[str]:
    """The intent names, in label-id order."""
    ds = data["train"] if isinstance(data, DatasetDict) else data
    return list(ds.features["label"].names)


def oos_label(data: DatasetDict | Dataset) -> str | None:
    """The out-of-scope label name when the data has one (CLINC150's ``oos``), else ``None``."""
    return OOS_LABEL if OOS_LABEL in label_names(data) else None


def subsample(data: DatasetDict, sizes: dict[str, int | None], seed: int = 42) -> DatasetDict:
    """A reproducible random slice of each split; label names stay whole, so every intent keeps its id."""
    unknown = sorted(set(sizes) - set(data))
    if unknown:
        raise DataError(f"Row limits for unknown split(s) {unknown}; the data has the splits {list(data)}.")
    for split, n in sizes.items():
        # bool is an int to Python, but `max_train_rows=True` is a mistake, not one row.
        if n is not None and (isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 1):
            raise DataError(f"max_{split}_rows must be a whole number >= 1 or None (the whole split), got {n!r}.")
    out = {}
    for split, ds in data.items():
        n = sizes.get(split)
        out[split] = ds if n is None or n >= len(ds) else ds.shuffle(seed=seed).select(range(int(n)))
    return DatasetDict(out)


def _normalised(text: str) -> str:
    return text.strip().lower()


def _split_texts(data: DatasetDict) -> dict[str, set[str]]:
    return {split: {_normalised(t) for t in data[split]["text"]} for split in SPLITS}


def duplicate_counts(data: DatasetDict) -> dict[tuple[str, str], int]:
    """``{(split, other split): texts of split also in the other}``, ignoring case and surrounding space."""
    texts = _split_texts(data)
    pairs = (("test", "train"), ("test", "validation"), ("validation", "train"))
    return {(a, b): len(texts[a] & texts[b]) for a, b in pairs}


def check_duplicates(data: DatasetDict, *, drop: bool = False, warn: bool = True) -> DatasetDict:
    """Warn about texts in more than one split, or with ``drop`` remove them from train and validation."""
    counts = duplicate_counts(data)
    if not any(counts.values()) or not (drop or warn):
        return data
    listed = ", ".join(f"{n} texts of {a} also in {b}" for (a, b), n in counts.items() if n)
    if not drop:
        warnings.warn(f"Duplicate texts across splits: {listed}. Pass drop_duplicates=True (run parameter "
                      "`drop_duplicates`) to drop them from train and validation.", DuplicateTextWarning, stacklevel=3)
        return data
    texts = _split_texts(data)
    seen_later = {"validation": texts["test"], "train": texts["test"] | texts["validation"]}
    out = dict(data)
    for split, banned in seen_later.items():
        keep = [i for i, t in enumerate(data[split]["text"]) if _normalised(t) not in banned]
        if not keep:
            others = "test" if split == "validation" else "validation or test"
            raise DataError(f"drop_duplicates=True would leave the {split} split empty: every {split} text also "
                            f"appears in {others} ({listed}). Keep drop_duplicates=False or give {split} texts "
                            "of its own.")
        out[split] = data[split].select(keep)
    return DatasetDict(out)


def data_digest(data: DatasetDict) -> str:
    """A short digest of split names, label names and every (text, label id) row, in order: part of a
    run's fingerprint, so other data means other checkpoints."""
    digest = hashlib.sha256(json.dumps(label_names(data)).encode())
    for split in sorted(data):
        digest.update(split.encode())
        for text, label in zip(data[split]["text"], data[split]["label"], strict=True):
            digest.update(json.dumps([text, label]).encode())
    return digest.hexdigest()[:16]


def describe(data: DatasetDict, *, duplicates: bool = False) -> dict[str, object]:
    """Split sizes, label count and OOS label, plus with ``duplicates`` the :func:`duplicate_counts`."""
    facts = {
        **{f"{split}_rows": len(data[split]) for split in data},
        "labels": len(label_names(data)),
        "oos_label": oos_label(data),
    }
    if duplicates:
        facts.update({f"{a} texts also in {b}": n for (a, b), n in duplicate_counts(data).items()})
    return facts


def examples_frame(split: Dataset, n: int = 5, seed: int = 42):
    """A few random rows with label names, to show what the data looks like."""
    rows = split.shuffle(seed=seed).select(range(min(n, len(split))))
    names = split.features["label"].names
    return pd.DataFrame({"text": rows["text"], "intent": [names[i] for i in rows["label"]]})
