"""Tests for kdlib.data: CLINC150 release files, own folders, the Hub path and every bad input."""

from __future__ import annotations

import csv
import gzip
import json
import warnings
from collections import Counter
from pathlib import Path

import datasets
import pytest
from datasets import ClassLabel, Dataset, DatasetDict, Features, Value

from kdlib.data import (
    EMBEDDED_FILE,
    EMBEDDED_SOURCE,
    DataError,
    DuplicateTextWarning,
    data_digest,
    describe,
    label_names,
    load_intent_data,
    oos_label,
    resolve_data_source,
    stratified_holdout,
    subsample,
)

# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------


def write_csv(path: Path, rows, header=("text", "label")) -> Path:
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def write_jsonl(path: Path, rows, keys=("text", "label")) -> Path:
    lines = (json.dumps(dict(zip(keys, row, strict=True))) + "\n" for row in rows)
    path.write_text("".join(lines), encoding="utf-8")
    return path


def write_split(folder: Path, stem: str, fmt: str, rows, columns=("text", "label")) -> Path:
    if fmt == "csv":
        return write_csv(folder / f"{stem}.csv", rows, columns)
    return write_jsonl(folder / f"{stem}.{fmt}", rows, columns)


TRAIN = [(f"please {label} number {i}", label) for label in ("greet", "bye", "thanks") for i in range(6)]
VALID = [("hello there", "greet"), ("see you", "bye")]
TEST = [("hi", "greet"), ("thank you", "thanks"), ("goodbye", "bye")]


def make_folder(
    folder: Path,
    fmt="csv",
    *,
    train=TRAIN,
    validation=VALID,
    test=TEST,
    columns=("text", "label"),
    stems=("train", "validation", "test"),
) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for stem, rows in zip(stems, (train, validation, test), strict=True):
        if rows is not None:
            write_split(folder, stem, fmt, rows, columns)
    return folder


def rows_of(ds: Dataset) -> list[tuple[str, str]]:
    names = ds.features["label"].names
    return [(row["text"], names[row["label"]]) for row in ds]


def release_dict() -> dict:
    return {
        "train": [["book a flight to paris", "book_flight"], ["play some jazz", "play_music"]],
        "oos_train": [["what is love", "oos"]],
        "val": [["fly me to rome", "book_flight"]],
        "oos_val": [["how tall is the sky", "oos"]],
        "test": [["put on music", "play_music"]],
        "oos_test": [["tell me a secret", "oos"]],
    }


def write_release(path: Path, raw) -> Path:
    path.write_text(raw if isinstance(raw, str) else json.dumps(raw), encoding="utf-8")
    return path


# ---------------------------------------------------------------------------------------------
# the real CLINC150 data_oos_plus.json
# ---------------------------------------------------------------------------------------------


def test_real_clinc_plus_sizes(clinc_plus):
    assert {split: len(clinc_plus[split]) for split in clinc_plus} == {
        "train": 15_250,
        "validation": 3_100,
        "test": 5_500,
    }


def test_real_clinc_plus_labels(clinc_plus):
    names = label_names(clinc_plus)
    assert len(names) == 151
    assert names == sorted(names)
    assert "oos" in names
    assert oos_label(clinc_plus) == "oos"
    for split in ("train", "validation", "test"):
        features = clinc_plus[split].features
        assert list(features) == ["text", "label"]
        assert features["text"] == Value("string")
        assert isinstance(features["label"], ClassLabel)
        assert features["label"].names == names
    # every split uses every label (CLINC150 is balanced)
    assert set(clinc_plus["test"]["label"]) == set(range(151))


def test_real_clinc_plus_known_rows(clinc_plus, clinc_plus_path):
    raw = json.loads(clinc_plus_path.read_text(encoding="utf-8"))
    names = label_names(clinc_plus)
    first = clinc_plus["train"][0]
    assert first["text"] == "what expression would i use to say i love you if i were an italian"
    assert names[first["label"]] == "translate"
    # in-scope rows come first, then the oos rows of the same split
    oos_row = clinc_plus["validation"][len(raw["val"])]
    assert [oos_row["text"], names[oos_row["label"]]] == raw["oos_val"][0]
    assert names[oos_row["label"]] == "oos"
    # spot-check the mapping against the JSON for several rows of every split
    for split, key in (("train", "train"), ("validation", "val"), ("test", "test")):
        for i in (1, 777, len(raw[key]) - 1):
            row = clinc_plus[split][i]
            assert [row["text"], names[row["label"]]] == raw[key][i]
    assert Counter(names[i] for i in clinc_plus["train"]["label"])["oos"] == 250


def test_describe_real_data(clinc_plus):
    assert describe(clinc_plus) == {
        "train_rows": 15_250,
        "validation_rows": 3_100,
        "test_rows": 5_500,
        "labels": 151,
        "oos_label": "oos",
    }


def test_describe_without_oos(tmp_path):
    data = load_intent_data(make_folder(tmp_path / "d"))
    assert describe(data) == {
        "train_rows": len(TRAIN),
        "validation_rows": len(VALID),
        "test_rows": len(TEST),
        "labels": 3,
        "oos_label": None,
    }
    assert oos_label(data) is None
    assert oos_label(data["test"]) is None


def test_subsample_keeps_labels_and_is_deterministic(clinc_plus):
    sizes = {"train": 40, "validation": None, "test": 15}
    small = subsample(clinc_plus, sizes, seed=3)
    assert {s: len(small[s]) for s in small} == {"train": 40, "validation": 3_100, "test": 15}
    for split in small:
        assert small[split].features["label"].names == label_names(clinc_plus)
    again = subsample(clinc_plus, sizes, seed=3)
    assert small["train"]["text"] == again["train"]["text"]
    assert small["test"]["label"] == again["test"]["label"]
    other = subsample(clinc_plus, sizes, seed=4)
    assert other["train"]["text"] != small["train"]["text"]
    # a random slice, not the first rows, and rows are real rows of the split
    assert small["train"]["text"] != clinc_plus["train"]["text"][:40]
    assert set(small["train"]["text"]) <= set(clinc_plus["train"]["text"])


def test_subsample_size_larger_than_split_keeps_split(tmp_path):
    data = load_intent_data(make_folder(tmp_path / "d"))
    small = subsample(data, {"train": 10_000, "test": 2})
    assert small["train"]["text"] == data["train"]["text"]
    assert len(small["test"]) == 2
    assert len(small["validation"]) == len(VALID)


# ---------------------------------------------------------------------------------------------
# choosing the source
# ---------------------------------------------------------------------------------------------


def test_resolve_data_source(monkeypatch, tmp_path):
    monkeypatch.delenv("KDLIB_DATA", raising=False)
    assert resolve_data_source() == EMBEDDED_SOURCE == "embedded:clinc150-plus"
    assert resolve_data_source("") == EMBEDDED_SOURCE
    monkeypatch.setenv("KDLIB_DATA", str(tmp_path / "env.json"))
    assert resolve_data_source(None) == str(tmp_path / "env.json")
    assert resolve_data_source("") == str(tmp_path / "env.json")
    assert resolve_data_source("mine.json") == "mine.json"
    assert resolve_data_source(tmp_path / "p") == str(tmp_path / "p")


def _no_hub(*args, **kwargs):
    raise AssertionError(f"the Hub must not be used here (load_dataset{args})")


def test_env_var_used_when_source_is_none(monkeypatch, tmp_path):
    monkeypatch.setattr(datasets, "load_dataset", _no_hub)
    folder = make_folder(tmp_path / "env_data")
    monkeypatch.setenv("KDLIB_DATA", str(folder))
    data = load_intent_data()
    assert rows_of(data["test"]) == TEST


def test_explicit_source_beats_env_var(monkeypatch, tmp_path):
    monkeypatch.setattr(datasets, "load_dataset", _no_hub)
    monkeypatch.setenv("KDLIB_DATA", str(make_folder(tmp_path / "env_data")))
    path = write_release(tmp_path / "mine.json", release_dict())
    data = load_intent_data(path)
    assert label_names(data) == ["book_flight", "oos", "play_music"]


def test_env_var_pointing_nowhere_is_a_data_error(monkeypatch, tmp_path):
    monkeypatch.setattr(datasets, "load_dataset", _no_hub)
    monkeypatch.setenv("KDLIB_DATA", str(tmp_path / "missing" / "data_oos_plus.json"))
    with pytest.raises(DataError, match="data_oos_plus.json"):
        load_intent_data()


def test_missing_folder_path_is_a_data_error(monkeypatch, tmp_path):
    monkeypatch.setattr(datasets, "load_dataset", _no_hub)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError, match="does not exist") as err:
        load_intent_data("./no/such/folder")
    assert str(tmp_path / "no" / "such" / "folder") in str(err.value)  # the absolute path it tried


# ---------------------------------------------------------------------------------------------
# Hub path (load_dataset monkeypatched)
# ---------------------------------------------------------------------------------------------

HUB_NAMES = ["weather", "oos", "book_flight", "play_music", "never_used"]  # not sorted: the Hub's order
HUB_ROWS = {
    "train": [
        ("is it raining", "weather"),
        ("fly to oslo", "book_flight"),
        ("blah", "oos"),
        ("jazz", "play_music"),
    ],
    "validation": [("sunny tomorrow?", "weather"), ("gibberish", "oos")],
    "test": [("book a seat", "book_flight"), ("play rock", "play_music"), ("hot today", "weather")],
}


def fake_hub_dataset(splits=HUB_ROWS, names=HUB_NAMES, label_key="intent") -> DatasetDict:
    features = Features({"text": Value("string"), label_key: ClassLabel(names=names)})
    return DatasetDict(
        {
            split: Dataset.from_dict(
                {"text": [t for t, _ in rows], label_key: [names.index(lab) for _, lab in rows]},
                features=features,
            )
            for split, rows in splits.items()
        }
    )


def test_hub_default_keeps_classlabel_order(monkeypatch):
    calls = []

    def fake_load_dataset(path, name=None, **kwargs):
        calls.append((path, name))
        return fake_hub_dataset()

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    monkeypatch.delenv("KDLIB_DATA", raising=False)
    data = load_intent_data("clinc_oos:plus")
    assert calls == [("clinc_oos", "plus")]
    assert label_names(data) == HUB_NAMES
    for split, rows in HUB_ROWS.items():
        assert data[split].column_names == ["text", "label"]
        assert rows_of(data[split]) == rows
        # ids are the Hub's ids, not re-numbered by sorted names
        assert data[split]["label"] == [HUB_NAMES.index(lab) for _, lab in rows]
    assert oos_label(data) == "oos"


def test_hub_custom_id_and_columns(monkeypatch):
    calls = []

    def fake_load_dataset(path, name=None, **kwargs):
        calls.append((path, name))
        ds = fake_hub_dataset(label_key="category")
        return DatasetDict({"train": ds["train"], "val": ds["validation"], "test": ds["test"]})

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    data = load_intent_data("my_intents", label_column="category")
    assert calls == [("my_intents", None)]
    assert rows_of(data["validation"]) == HUB_ROWS["validation"]
    assert label_names(data) == HUB_NAMES


def test_hub_dataset_without_a_train_split_is_refused_by_name(monkeypatch):
    hub = fake_hub_dataset()
    monkeypatch.setattr(datasets, "load_dataset",
                        lambda path, name=None, **kwargs: DatasetDict({"validation": hub["validation"],
                                                                       "test": hub["test"]}))
    with pytest.raises(DataError, match=r"'my_intents' has no 'train' split; it has \['validation', 'test'\]"):
        load_intent_data("my_intents")


@pytest.mark.parametrize("ref", ["DeepPavlov/clinc_oos", "someone/intents:plus"])
def test_hub_owner_slash_name_reaches_hub(monkeypatch, tmp_path, ref):
    calls = []

    def fake_load_dataset(path, name=None, **kwargs):
        calls.append((path, name))
        return fake_hub_dataset()

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    monkeypatch.chdir(tmp_path)
    data = load_intent_data(ref)
    assert calls == [tuple(ref.split(":")) if ":" in ref else (ref, None)]
    assert label_names(data) == HUB_NAMES


def test_hub_missing_split_and_column(monkeypatch):
    monkeypatch.setattr(
        datasets, "load_dataset", lambda *a, **k: DatasetDict({"train": fake_hub_dataset()["train"]})
    )
    with pytest.raises(DataError, match="no 'validation' split"):
        load_intent_data("clinc_oos:plus")
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: fake_hub_dataset(label_key="category"))
    with pytest.raises(DataError) as err:
        load_intent_data("clinc_oos:plus")
    assert "['label']" in str(err.value) and "category" in str(err.value)


def test_hub_failure_is_data_error_mentioning_env_var(monkeypatch):
    def offline(*args, **kwargs):
        raise ConnectionError("no network here")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    monkeypatch.delenv("KDLIB_DATA", raising=False)
    with pytest.raises(DataError) as err:
        load_intent_data("clinc_oos:plus")
    message = str(err.value)
    assert "KDLIB_DATA" in message
    assert "clinc_oos:plus" in message
    assert "ConnectionError" in message and "no network here" in message


# ---------------------------------------------------------------------------------------------
# CLINC150 release files
# ---------------------------------------------------------------------------------------------


def test_small_release_file(tmp_path):
    data = load_intent_data(write_release(tmp_path / "small.json", release_dict()))
    assert label_names(data) == ["book_flight", "oos", "play_music"]
    assert rows_of(data["train"]) == [
        ("book a flight to paris", "book_flight"),
        ("play some jazz", "play_music"),
        ("what is love", "oos"),
    ]
    assert rows_of(data["validation"]) == [("fly me to rome", "book_flight"), ("how tall is the sky", "oos")]
    assert rows_of(data["test"]) == [("put on music", "play_music"), ("tell me a secret", "oos")]


def test_release_file_with_other_suffix_is_read_as_release(tmp_path):
    data = load_intent_data(write_release(tmp_path / "clinc.txt", release_dict()))
    assert len(data["train"]) == 3


def _release_case(mutate):
    raw = release_dict()
    mutate(raw)
    return raw


def _drop(*keys):
    return lambda raw: [raw.pop(k) for k in keys]


RELEASE_ERRORS = {
    "unreadable_json": ("{not json", ["not readable JSON"]),
    "not_utf8": (None, ["not readable JSON"]),
    "not_an_object": ("[1, 2]", ["expected a JSON object", "list"]),
    "missing_keys": (_release_case(_drop("val", "oos_test")), ["missing key", "['val', 'oos_test']"]),
    "key_not_list": (_release_case(lambda r: r.update(train="oops")), ["'train'", "must be a list"]),
    "short_pair": (_release_case(lambda r: r["train"].append(["only text"])), ["train[2]", "only text"]),
    "non_string": (_release_case(lambda r: r["oos_val"].append(["x", 3])), ["oos_val[1]", "[text, intent]"]),
    "empty_text": (
        _release_case(lambda r: r["train"].insert(1, ["   ", "play_music"])),
        ["empty text", "train[1]", "play_music"],
    ),
    "unseen_label_test": (
        _release_case(lambda r: r["test"].append(["will it snow", "get_weather"])),
        ["['get_weather']", "test", "never in train"],
    ),
    "unseen_label_validation": (
        _release_case(lambda r: r["oos_val"].append(["hi", "greeting"])),
        ["['greeting']", "validation"],
    ),
}


@pytest.mark.parametrize("case", sorted(RELEASE_ERRORS))
def test_release_file_errors_name_the_file(tmp_path, case):
    content, fragments = RELEASE_ERRORS[case]
    path = tmp_path / f"{case}.json"
    if content is None:
        path.write_bytes(b'{"train": "\xff\xfe"}')
    else:
        write_release(path, content)
    with pytest.raises(DataError) as err:
        load_intent_data(path)
    message = str(err.value)
    assert str(path) in message
    for fragment in fragments:
        assert fragment in message


def test_missing_release_file(tmp_path):
    path = tmp_path / "nowhere" / "data_oos_plus.json"
    with pytest.raises(DataError, match="not found") as err:
        load_intent_data(path)
    assert str(path) in str(err.value)


# ---------------------------------------------------------------------------------------------
# own folders: CSV / JSON Lines
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["csv", "jsonl", "json"])
def test_folder_formats(tmp_path, fmt):
    data = load_intent_data(make_folder(tmp_path / "d", fmt))
    assert label_names(data) == ["bye", "greet", "thanks"]
    assert rows_of(data["train"]) == TRAIN
    assert rows_of(data["validation"]) == VALID
    assert rows_of(data["test"]) == TEST
    assert data["train"].features["label"] == ClassLabel(names=["bye", "greet", "thanks"])


@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
def test_folder_custom_columns(tmp_path, fmt):
    folder = make_folder(tmp_path / "d", fmt, columns=("utterance", "intent"))
    data = load_intent_data(folder, text_column="utterance", label_column="intent")
    assert data["train"].column_names == ["text", "label"]
    assert rows_of(data["test"]) == TEST


def test_folder_extra_columns_are_ignored(tmp_path):
    folder = tmp_path / "d"
    folder.mkdir()
    write_csv(folder / "train.csv", [(t, lab, "x") for t, lab in TRAIN], ("text", "label", "note"))
    write_csv(folder / "validation.csv", VALID)
    write_jsonl(folder / "test.jsonl", [(t, lab, 1) for t, lab in TEST], ("text", "label", "id"))
    data = load_intent_data(folder)
    assert rows_of(data["train"]) == TRAIN
    assert rows_of(data["test"]) == TEST


@pytest.mark.parametrize(("stem", "fmt"), [("val", "csv"), ("dev", "jsonl"), ("validation", "jsonl")])
def test_folder_validation_file_names(tmp_path, stem, fmt):
    folder = make_folder(tmp_path / "d", fmt, stems=("train", stem, "test"))
    data = load_intent_data(folder)
    assert rows_of(data["validation"]) == VALID
    assert rows_of(data["train"]) == TRAIN  # a validation file means no hold-out


def test_folder_mixed_formats(tmp_path):
    folder = tmp_path / "d"
    folder.mkdir()
    write_csv(folder / "train.csv", TRAIN)
    write_jsonl(folder / "dev.jsonl", VALID)
    write_jsonl(folder / "test.jsonl", TEST)
    data = load_intent_data(folder)
    assert rows_of(data["validation"]) == VALID


def test_folder_text_with_commas_and_quotes(tmp_path):
    train = TRAIN + [('say "hi", then, "bye"', "greet")]
    data = load_intent_data(make_folder(tmp_path / "d", "csv", train=train))
    assert rows_of(data["train"])[-1] == ('say "hi", then, "bye"', "greet")


# ---------------------------------------------------------------------------------------------
# hold-out when there is no validation file
# ---------------------------------------------------------------------------------------------

HOLDOUT_COUNTS = {"a": 10, "b": 20, "c": 7, "d": 2, "e": 1, "f": 41}
HOLDOUT_TRAIN = [(f"{label} text {i}", label) for label, n in HOLDOUT_COUNTS.items() for i in range(n)]


def holdout_folder(tmp_path, fmt="csv"):
    return make_folder(tmp_path / "h", fmt, train=HOLDOUT_TRAIN, validation=None, test=[("a text", "a")])


@pytest.mark.parametrize("fraction", [0.1, 0.25, 0.4])
def test_holdout_is_stratified(tmp_path, fraction):
    data = load_intent_data(holdout_folder(tmp_path), validation_fraction=fraction, seed=7)
    train, held = rows_of(data["train"]), rows_of(data["validation"])
    # a partition of the train file: nothing lost, nothing duplicated
    assert sorted(train + held) == sorted(HOLDOUT_TRAIN)
    assert not set(train) & set(held)
    held_counts = Counter(lab for _, lab in held)
    train_counts = Counter(lab for _, lab in train)
    for label, n in HOLDOUT_COUNTS.items():
        if n >= 2:
            assert train_counts[label] >= 1 and held_counts[label] >= 1, label
            assert abs(held_counts[label] - n * fraction) <= 1, (label, held_counts[label])
        else:
            assert held_counts[label] == 0 and train_counts[label] == 1
    total = len(HOLDOUT_TRAIN)
    assert abs(len(held) / total - fraction) < 0.05
    # label names come from the whole train file
    assert label_names(data) == sorted(HOLDOUT_COUNTS)


def test_holdout_deterministic_for_a_seed(tmp_path):
    folder = holdout_folder(tmp_path, "jsonl")
    first = load_intent_data(folder, validation_fraction=0.2, seed=1)
    second = load_intent_data(folder, validation_fraction=0.2, seed=1)
    other = load_intent_data(folder, validation_fraction=0.2, seed=2)
    assert first["validation"]["text"] == second["validation"]["text"]
    assert first["train"]["text"] == second["train"]["text"]
    assert set(other["validation"]["text"]) != set(first["validation"]["text"])
    # train keeps the file's order
    order = {text: i for i, (text, _) in enumerate(HOLDOUT_TRAIN)}
    assert [order[t] for t in first["train"]["text"]] == sorted(order[t] for t in first["train"]["text"])


def test_stratified_holdout_direct():
    texts = [t for t, _ in HOLDOUT_TRAIN]
    labels = [lab for _, lab in HOLDOUT_TRAIN]
    (tr_t, tr_l), (va_t, va_l) = stratified_holdout(texts, labels, 0.3, seed=5)
    assert stratified_holdout(texts, labels, 0.3, seed=5) == ((tr_t, tr_l), (va_t, va_l))
    assert sorted(zip(tr_t + va_t, tr_l + va_l, strict=True)) == sorted(HOLDOUT_TRAIN)
    assert set(va_l) == {lab for lab, n in HOLDOUT_COUNTS.items() if n >= 2}


@pytest.mark.parametrize("fraction", [0.8, 0.9])
def test_holdout_keeps_each_label_in_train_for_large_fractions(fraction):
    texts = ["w", "x", "y", "z", "p", "q", "r"]
    labels = ["two", "two", "three", "three", "three", "one_more", "one_more"]
    (_, tr_l), (_, va_l) = stratified_holdout(texts, labels, fraction, seed=0)
    assert set(tr_l) == set(labels)
    assert set(va_l) == set(labels)


@pytest.mark.parametrize("fraction", [0, 1, 1.5, -0.1])
def test_holdout_bad_fraction(tmp_path, fraction):
    with pytest.raises(DataError, match="validation_fraction"):
        load_intent_data(holdout_folder(tmp_path), validation_fraction=fraction)


# ---------------------------------------------------------------------------------------------
# bad folders: every problem is a DataError naming the file (and row / line)
# ---------------------------------------------------------------------------------------------


def test_no_test_file(tmp_path):
    folder = make_folder(tmp_path / "d", test=None)
    with pytest.raises(DataError, match="no test file") as err:
        load_intent_data(folder)
    assert str(folder) in str(err.value)


def test_no_train_file(tmp_path):
    folder = make_folder(tmp_path / "d", train=None)
    with pytest.raises(DataError, match="no train file") as err:
        load_intent_data(folder)
    assert str(folder) in str(err.value)


@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
def test_missing_columns_listed_with_found_columns(tmp_path, fmt):
    folder = make_folder(tmp_path / "d", fmt, columns=("sentence", "intent"))
    with pytest.raises(DataError) as err:
        load_intent_data(folder)
    message = str(err.value)
    assert f"train.{fmt}" in message
    assert "['text', 'label']" in message
    assert "found ['intent', 'sentence']" in message
    assert "text_column=" in message


def test_one_missing_column_listed(tmp_path):
    folder = make_folder(tmp_path / "d", "jsonl", columns=("text", "intent"))
    with pytest.raises(DataError) as err:
        load_intent_data(folder)
    assert "['label']" in str(err.value) and "'text']" not in str(err.value).split("found")[0]


@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
def test_empty_text_names_file_and_row(tmp_path, fmt):
    train = TRAIN[:2] + [("", "greet")] + TRAIN[2:]
    folder = make_folder(tmp_path / "d", fmt, train=train)
    with pytest.raises(DataError) as err:
        load_intent_data(folder)
    message = str(err.value)
    assert f"train.{fmt}" in message
    assert "row 3" in message and "empty text" in message


def test_whitespace_text_in_test_names_test_file(tmp_path):
    folder = make_folder(tmp_path / "d", "csv", test=TEST + [("   ", "bye")])
    with pytest.raises(DataError, match="empty text") as err:
        load_intent_data(folder)
    assert "test.csv" in str(err.value) and "row 4" in str(err.value)


def test_jsonl_null_text_is_empty_text(tmp_path):
    folder = make_folder(tmp_path / "d", "jsonl")
    with (folder / "test.jsonl").open("a", encoding="utf-8") as handle:
        handle.write('{"text": null, "label": "bye"}\n')
    with pytest.raises(DataError, match="empty text") as err:
        load_intent_data(folder)
    assert "test.jsonl" in str(err.value)


@pytest.mark.parametrize("seed", [0, 2])  # 0: "train row 19", 2: "<folder>: validation row 3"
def test_empty_text_with_holdout_names_train_file_and_row(tmp_path, seed):
    train = HOLDOUT_TRAIN[:20] + [("", "f")] + HOLDOUT_TRAIN[20:]
    folder = make_folder(tmp_path / "d", "csv", train=train, validation=None, test=[("a text", "a")])
    with pytest.raises(DataError) as err:
        load_intent_data(folder, seed=seed)
    assert "train.csv" in str(err.value) and "row 21" in str(err.value)


@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
def test_missing_label_names_file_and_row(tmp_path, fmt):
    folder = make_folder(tmp_path / "d", fmt, validation=[("hello", "greet"), ("no label here", "")])
    with pytest.raises(DataError) as err:
        load_intent_data(folder)
    message = str(err.value)
    assert f"validation.{fmt}" in message and "row 2" in message and "no label" in message


@pytest.mark.parametrize("split", ["validation", "test"])
def test_unseen_label_named(tmp_path, split):
    rows = {"validation": VALID, "test": TEST}[split] + [("set an alarm", "alarm")]
    folder = make_folder(tmp_path / "d", "csv", **{split: rows})
    with pytest.raises(DataError) as err:
        load_intent_data(folder)
    message = str(err.value)
    assert f"{split}.csv" in message
    assert "['alarm']" in message and "never in train" in message


@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
def test_a_single_label_is_refused_naming_the_file(tmp_path, fmt):
    """One label gives a one-class classifier: refused when the data loads, not when 02 distils it."""
    greet = [(text, "greet") for text, label in TRAIN if label == "greet"]
    folder = make_folder(tmp_path / "d", fmt, train=greet, validation=None, test=[("hi", "greet")])
    with pytest.raises(DataError) as err:
        load_intent_data(folder)
    message = str(err.value)
    assert f"train.{fmt}" in message and "'greet'" in message
    assert "at least two labels" in message and "label_column" in message


@pytest.mark.parametrize("split", ["train", "validation", "test"])
def test_header_only_csv_has_no_rows(tmp_path, split):
    folder = make_folder(tmp_path / "d", "csv", **{split: []})
    with pytest.raises(DataError, match="has no rows") as err:
        load_intent_data(folder)
    assert f"{split}.csv" in str(err.value)


@pytest.mark.parametrize("content", ["", "\n\n  \n"])
def test_empty_jsonl_has_no_rows(tmp_path, content):
    folder = make_folder(tmp_path / "d", "jsonl")
    (folder / "test.jsonl").write_text(content, encoding="utf-8")
    with pytest.raises(DataError, match="has no rows") as err:
        load_intent_data(folder)
    assert "test.jsonl" in str(err.value)


def test_bad_json_line_names_line(tmp_path):
    folder = make_folder(tmp_path / "d", "jsonl")
    (folder / "train.jsonl").write_text(
        '{"text": "hi", "label": "greet"}\n\n{"text": "oops", "label": \n{"text": "x", "label": "bye"}\n',
        encoding="utf-8",
    )
    with pytest.raises(DataError) as err:
        load_intent_data(folder)
    message = str(err.value)
    assert "train.jsonl" in message and "line 3" in message and "not valid JSON" in message


def test_json_line_not_an_object(tmp_path):
    folder = make_folder(tmp_path / "d", "jsonl")
    (folder / "validation.jsonl").write_text('{"text": "hi", "label": "greet"}\n["hi", "greet"]\n')
    with pytest.raises(DataError) as err:
        load_intent_data(folder)
    assert "validation.jsonl" in str(err.value) and "line 2" in str(err.value) and "list" in str(err.value)


def test_csv_not_utf8(tmp_path):
    folder = make_folder(tmp_path / "d", "csv")
    (folder / "test.csv").write_bytes(b"text,label\n\xff\xfe caf\xe9,bye\n")
    with pytest.raises(DataError) as err:
        load_intent_data(folder)
    assert "test.csv" in str(err.value)


def test_jsonl_not_utf8(tmp_path):
    folder = make_folder(tmp_path / "d", "jsonl")
    (folder / "test.jsonl").write_bytes(b'{"text": "caf\xe9", "label": "bye"}\n')
    with pytest.raises(DataError) as err:
        load_intent_data(folder)
    assert "test.jsonl" in str(err.value)


@pytest.mark.parametrize("header", [("text", "label"), ("sentence", "intent")])
def test_csv_row_with_too_many_fields(tmp_path, header):
    folder = make_folder(tmp_path / "d", "csv", columns=header)
    with (folder / "train.csv").open("a", encoding="utf-8") as handle:
        handle.write("hello, world,greet\n")
    with pytest.raises(DataError) as err:
        load_intent_data(folder)
    assert "train.csv" in str(err.value) and f"row {len(TRAIN) + 1}" in str(err.value)


# ---------------------------------------------------------------------------------------------
# the embedded CLINC150, relative paths, BOMs, duplicates, the digest, row limits
# ---------------------------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore::kdlib.data.DuplicateTextWarning")  # asserted below
def test_embedded_clinc150_is_the_release_file_row_for_row(monkeypatch, clinc_plus_path):
    monkeypatch.setattr(datasets, "load_dataset", _no_hub)
    monkeypatch.delenv("KDLIB_DATA", raising=False)
    embedded, release = load_intent_data(), load_intent_data(clinc_plus_path)
    assert label_names(embedded) == label_names(release) and len(label_names(embedded)) == 151
    for split in ("train", "validation", "test"):
        assert embedded[split]["text"] == release[split]["text"]
        assert embedded[split]["label"] == release[split]["label"]
    assert [len(embedded[s]) for s in ("train", "validation", "test")] == [15250, 3100, 5500]
    assert load_intent_data(EMBEDDED_SOURCE)["test"]["text"] == release["test"]["text"]


def test_relative_paths_are_taken_from_base_dir(monkeypatch, tmp_path):
    monkeypatch.setattr(datasets, "load_dataset", _no_hub)
    make_folder(tmp_path / "project" / "mydata")
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    data = load_intent_data("mydata", base_dir=tmp_path / "project")
    assert rows_of(data["test"]) == TEST
    with pytest.raises(DataError) as err:
        load_intent_data("./mydata/missing.json", base_dir=tmp_path / "project")
    assert str(tmp_path / "project" / "mydata" / "missing.json") in str(err.value)


@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
def test_a_file_with_a_byte_order_mark_is_read(tmp_path, fmt):
    folder = make_folder(tmp_path / "bom", fmt)
    for split in ("train", "test"):
        path = folder / f"{split}.{fmt}"
        path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())  # what Excel's "CSV UTF-8" writes
    data = load_intent_data(folder)  # the header's first column is 'text', not '\ufefftext'
    assert rows_of(data["train"]) == TRAIN and rows_of(data["test"]) == TEST
    assert not any(text.startswith("\ufeff") for text in data["train"]["text"])


def test_a_release_file_with_a_byte_order_mark_is_read(tmp_path):
    path = tmp_path / "bom.json"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps(release_dict()).encode())
    assert rows_of(load_intent_data(path)["test"]) == [("put on music", "play_music"), ("tell me a secret", "oos")]


def _folder_with_duplicates(tmp_path):
    folder = tmp_path / "dups"
    folder.mkdir()
    header = "text,label\n"
    (folder / "train.csv").write_text(header + "Wake me up,alarm\nplay jazz,music\nset alarm,alarm\nsome song,music\n")
    (folder / "validation.csv").write_text(header + "set alarm ,alarm\nloud music,music\n")
    (folder / "test.csv").write_text(header + "wake me up,alarm\nloud music,music\nan alarm,alarm\n")
    return folder


def test_duplicate_texts_across_splits_are_counted_in_a_warning(tmp_path):
    with pytest.warns(DuplicateTextWarning) as record:
        data = load_intent_data(_folder_with_duplicates(tmp_path))
    message = str(record[0].message)
    assert "1 texts of test also in train" in message and "1 texts of test also in validation" in message
    assert "1 texts of validation also in train" in message and "drop_duplicates" in message
    assert len(data["train"]) == 4


def test_duplicate_counts_become_rows_of_the_data_table_instead_of_a_warning(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("error", DuplicateTextWarning)  # warn_duplicates=False: no stderr in a notebook
        data = load_intent_data(_folder_with_duplicates(tmp_path), warn_duplicates=False)
    facts = describe(data, duplicates=True)
    assert {k: v for k, v in facts.items() if "also in" in k} == {
        "test texts also in train": 1, "test texts also in validation": 1, "validation texts also in train": 1,
    }
    assert describe(data) == {k: v for k, v in facts.items() if "also in" not in k}
    dropped = describe(load_intent_data(tmp_path / "dups", drop_duplicates=True), duplicates=True)
    assert dropped["test texts also in train"] == dropped["validation texts also in train"] == 0


def test_drop_duplicates_removes_them_from_train_and_validation_only(tmp_path, recwarn):
    data = load_intent_data(_folder_with_duplicates(tmp_path), drop_duplicates=True)
    assert data["train"]["text"] == ["play jazz", "some song"]
    assert data["validation"]["text"] == ["set alarm "]  # "loud music" is a test text
    assert len(data["test"]) == 3 and label_names(data) == ["alarm", "music"]
    assert not [w for w in recwarn if w.category is DuplicateTextWarning]


def test_data_digest_changes_with_what_a_run_uses(tmp_path):
    base = load_intent_data(make_folder(tmp_path / "a"))
    assert data_digest(base) == data_digest(load_intent_data(make_folder(tmp_path / "b")))
    changed = DatasetDict({**base, "test": base["test"].map(lambda r, i: {"text": r["text"] + "!" * (i == 0)},
                                                              with_indices=True)})
    dropped = DatasetDict({**base, "train": base["train"].select(range(len(base["train"]) - 1))})
    renamed = DatasetDict({s: ds.cast_column("label", ClassLabel(names=[n + "_x" for n in label_names(base)]))
                           for s, ds in base.items()})
    digests = {data_digest(d) for d in (base, changed, dropped, renamed)}
    assert len(digests) == 4


TINY_FOLDER_DIGEST = "180c3c8b4a2a5c20"  # make_folder()'s data
CLINC_PLUS_DIGEST = "a7944cd430385175"  # the embedded CLINC150 plus


def test_data_digest_is_stable_across_processes(tmp_path, clinc_plus):
    # Pinned values: checkpoints are stored under fingerprints built from this digest, so it must be the
    # same in every process, on every machine and after upgrades (no hash(), no pickles, no set order).
    digest = data_digest(load_intent_data(make_folder(tmp_path / "a")))
    assert len(digest) == 16 and int(digest, 16) >= 0
    assert digest == TINY_FOLDER_DIGEST
    assert data_digest(clinc_plus) == CLINC_PLUS_DIGEST


@pytest.mark.parametrize("split", ["train", "validation", "test"])
@pytest.mark.parametrize("limit", [0, -3, 2.5, True, "10"])
def test_row_limits_must_be_whole_numbers(limit, split, tmp_path):
    data = load_intent_data(make_folder(tmp_path / "f"))
    sizes = {"train": None, "validation": None, "test": None, split: limit}
    with pytest.raises(DataError, match=f"max_{split}_rows must be a whole number >= 1"):
        subsample(data, sizes)


def test_row_limits_accept_numpy_ints_and_refuse_unknown_splits(tmp_path):
    import numpy as np

    data = load_intent_data(make_folder(tmp_path / "f"))
    assert len(subsample(data, {"train": np.int64(4)})["train"]) == 4
    with pytest.raises(DataError, match=r"unknown split\(s\) \['val'\]"):
        subsample(data, {"val": 1})


# ---------------------------------------------------------------------------------------------
# paths: ~, base_dir, and the absolute path in every error
# ---------------------------------------------------------------------------------------------


def test_tilde_is_expanded_in_sources_and_base_dir(monkeypatch, tmp_path):
    monkeypatch.setattr(datasets, "load_dataset", _no_hub)
    monkeypatch.setenv("HOME", str(tmp_path))
    make_folder(tmp_path / "proj" / "mydata")
    assert rows_of(load_intent_data("~/proj/mydata")["test"]) == TEST
    assert rows_of(load_intent_data("mydata", base_dir="~/proj")["test"]) == TEST
    with pytest.raises(DataError) as err:
        load_intent_data("~/nowhere/data_oos_plus.json")
    assert str(tmp_path / "nowhere" / "data_oos_plus.json") in str(err.value)


@pytest.mark.parametrize("name", ["missing.json", "missing.json.gz", "sub/missing.csv", "./missing"])
def test_a_missing_relative_path_shows_the_absolute_path_under_base_dir(monkeypatch, tmp_path, name):
    monkeypatch.setattr(datasets, "load_dataset", _no_hub)
    monkeypatch.chdir(tmp_path)
    base = tmp_path / "project"
    with pytest.raises(DataError) as err:
        load_intent_data(name, base_dir=base)
    assert str((base / name).absolute()) in str(err.value)


def test_a_bare_name_that_is_neither_local_nor_on_the_hub_shows_the_local_path_tried(monkeypatch, tmp_path):
    def offline(*args, **kwargs):
        raise ConnectionError("no network here")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(DataError) as err:
        load_intent_data("my_intents", base_dir=tmp_path)
    message = str(err.value)
    assert "Hugging Face Hub" in message and f"no local file or folder {tmp_path / 'my_intents'}" in message


@pytest.mark.parametrize(
    ("folder_kwargs", "fragment"),
    [({"test": None}, "no test file"), ({"train": None}, "no train file")],
)
def test_folder_errors_show_the_absolute_folder(monkeypatch, tmp_path, folder_kwargs, fragment):
    make_folder(tmp_path / "project" / "d", **folder_kwargs)
    monkeypatch.chdir(tmp_path / "project")
    with pytest.raises(DataError, match=fragment) as err:
        load_intent_data("d")
    assert str(tmp_path / "project" / "d") in str(err.value)


def test_unreadable_file_errors_show_the_absolute_path(monkeypatch, tmp_path):
    folder = make_folder(tmp_path / "project" / "d")
    (folder / "test.csv").write_bytes(b"text,label\n\xff\xfe caf\xe9,bye\n")
    (tmp_path / "project" / "broken.json").write_text("{not json")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError, match="not a readable CSV") as err:
        load_intent_data("d", base_dir="project")
    assert str(folder / "test.csv") in str(err.value)
    with pytest.raises(DataError, match="not readable JSON") as err:
        load_intent_data("broken.json", base_dir="project")
    assert str(tmp_path / "project" / "broken.json") in str(err.value)


def test_a_single_csv_file_is_refused_naming_its_folder(tmp_path):
    folder = make_folder(tmp_path / "d")
    with pytest.raises(DataError, match="single .csv file") as err:
        load_intent_data(folder / "train.csv")
    assert str(folder / "train.csv") in str(err.value) and f"(here {folder}," in str(err.value)


# ---------------------------------------------------------------------------------------------
# gzip-compressed release files (the embedded one is one)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["small.json.gz", "SMALL.JSON.GZ", "small.json"])
def test_gzip_release_files_are_read_whatever_their_suffix(tmp_path, name):
    path = tmp_path / name
    path.write_bytes(gzip.compress(json.dumps(release_dict()).encode(), mtime=0))
    data = load_intent_data(path)
    assert rows_of(data["test"]) == [("put on music", "play_music"), ("tell me a secret", "oos")]


def test_a_truncated_gzip_file_is_a_data_error(tmp_path):
    path = tmp_path / "cut.json.gz"
    path.write_bytes(gzip.compress(json.dumps(release_dict()).encode())[:40])
    with pytest.raises(DataError, match="not readable gzip-compressed JSON") as err:
        load_intent_data(path)
    assert str(path) in str(err.value)


def test_the_embedded_file_is_the_release_file_gzip_compressed_reproducibly(clinc_plus_path):
    embedded = Path(EMBEDDED_FILE)
    assert embedded.parent.name == "clinc150" and embedded.name == "data_oos_plus.json.gz"
    packed = embedded.read_bytes()
    assert gzip.decompress(packed) == clinc_plus_path.read_bytes()  # unchanged content
    assert packed[3] & 0x08 == 0 and packed[4:8] == b"\0\0\0\0"  # no file name, mtime 0: reproducible
    assert len(packed) < 300_000
    for name in ("LICENSE", "README.md"):
        assert (embedded.parent / name).is_file()
    readme = (embedded.parent / "README.md").read_text(encoding="utf-8")
    assert "CC BY 3.0" in readme and "D19-1131" in readme and "Larson" in readme
    assert "Attribution 3.0" in (embedded.parent / "LICENSE").read_text(encoding="utf-8")


# ---------------------------------------------------------------------------------------------
# duplicates in the real CLINC150 plus
# ---------------------------------------------------------------------------------------------


def test_clinc_plus_duplicates_are_reported_and_dropped(monkeypatch):
    monkeypatch.delenv("KDLIB_DATA", raising=False)
    expected = "2 texts of test also in train, 3 texts of validation also in train."
    with pytest.warns(DuplicateTextWarning, match=expected):
        load_intent_data()
    with warnings.catch_warnings():
        warnings.simplefilter("error", DuplicateTextWarning)
        data = load_intent_data(drop_duplicates=True)
    assert [len(data[s]) for s in ("train", "validation", "test")] == [15_245, 3_100, 5_500]
    assert len(label_names(data)) == 151
    assert "where did you grow up" not in {t.lower() for t in data["train"]["text"]}


def test_drop_duplicates_refuses_to_empty_a_split(tmp_path):
    folder = make_folder(tmp_path / "d", validation=[TEST[0]])
    with pytest.raises(DataError, match="leave the validation split empty"):
        load_intent_data(folder, drop_duplicates=True)


def test_a_runs_data_is_its_source_read_with_its_options_and_cut_to_its_row_limits(tmp_path):
    """RunConfig.load_data, what every notebook and script reads: each data option reaches the loader."""
    from kdlib.config import RunConfig

    make_folder(tmp_path / "mine", train=HOLDOUT_TRAIN, validation=None, test=[("a text", "a")],
                columns=("utterance", "intent"))
    options = dict(text_column="utterance", label_column="intent", validation_fraction=0.25, seed=7)
    config = RunConfig(data_source="mine", max_train_rows=20, max_validation_rows=5, **options)
    data = config.load_data(base_dir=tmp_path)  # a relative source is taken from base_dir
    expected = subsample(load_intent_data(tmp_path / "mine", **options), {"train": 20, "validation": 5}, seed=7)
    for split in ("train", "validation", "test"):
        assert rows_of(data[split]) == rows_of(expected[split]), split
    assert (len(data["train"]), len(data["validation"])) == (20, 5)
    reseeded = RunConfig(data_source="mine", max_validation_rows=5, **{**options, "seed": 8})
    other_seed = reseeded.load_data(base_dir=tmp_path)
    assert rows_of(other_seed["validation"]) != rows_of(data["validation"])  # the hold-out follows the run's seed
