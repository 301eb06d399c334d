"""The run configuration: one schema with every default, profiles that only override, validation before
any work, and the fingerprint that keys checkpoints and records."""

from __future__ import annotations

import json
from pathlib import Path

import papermill
import pytest

from kdlib.config import (
    OVERRIDES,
    STUDENT_FIELDS,
    TEACHER_FIELDS,
    ConfigError,
    RunConfig,
    config_from_notebook,
    default_keep_layers,
    load_config,
    load_profile,
    parse_cli_value,
)
from kdlib.io import project_root
from kdlib.paths import RunPaths
from kdlib.session import prepare_session

REPO = Path(__file__).resolve().parent.parent
NOTEBOOK_DIR = REPO / "notebooks"
PROFILES = sorted(p.stem for p in (REPO / "configs").glob("*.yaml"))


def declared_parameters(notebook: Path) -> dict:
    return papermill.inspect_notebook(str(notebook))


def test_the_three_profiles_exist():
    assert {"minilm", "book", "smoke"} <= set(PROFILES)


@pytest.mark.parametrize("profile", PROFILES)
def test_every_profile_is_a_valid_configuration(profile):
    config = load_config(profile)
    assert config.run_name == profile


@pytest.mark.parametrize("notebook", sorted(NOTEBOOK_DIR.glob("*.ipynb")), ids=lambda p: p.stem)
def test_notebook_parameters_are_config_fields_left_to_the_profile(notebook):
    """One source of defaults: a parameters cell names fields, it does not repeat their values. It holds
    what a reader of that notebook would change (at most 12 names, each with a comment, no '|' for
    papermill to trip on); ``overrides`` carries every other parameter."""
    declared = declared_parameters(notebook)
    assert declared["profile"]["default"] == '"minilm"'
    others = {name: p["default"] for name, p in declared.items() if name != "profile"}
    assert OVERRIDES in others, f"{notebook.name}: no `{OVERRIDES}` for the parameters the cell leaves out"
    fields = set(others) - {OVERRIDES}
    assert fields <= set(RunConfig.model_fields), fields - set(RunConfig.model_fields)
    assert set(others.values()) == {"None"}, others
    assert len(declared) <= 12, f"{notebook.name}: {len(declared)} names in its parameters cell"
    assert all(p["help"] for p in declared.values()), [n for n, p in declared.items() if not p["help"]]
    cell = next(c for c in json.loads(notebook.read_text(encoding="utf-8"))["cells"]
                if "parameters" in c["metadata"].get("tags", []))
    assert "|" not in "".join(cell["source"]), f"{notebook.name}: a '|' in its parameters cell"


def test_the_default_profile_is_the_schema_defaults_with_its_students_layers():
    # A count, not a list of indices: the profile fits a teacher of any depth (layers 1, 2, 3, 5 of 6).
    assert load_profile("minilm") == {"run_name": "minilm", "keep_layers": 4}
    assert load_config("minilm") == RunConfig(keep_layers=4)
    assert RunConfig().keep_layers is None
    assert load_config("minilm", keep_layers=[0, 5]).keep_layers == [0, 5]  # a list names the layers instead


def test_book_profile_is_the_reference_setup():
    book = load_config("book")
    assert book.teacher == "transformersbook/bert-base-uncased-finetuned-clinc"
    assert book.student_init == "pretrained" and book.student == "distilbert-base-uncased"
    assert (book.learning_rate, book.batch_size, book.epochs, book.seed) == (2e-5, 48, 5, 42)
    assert book.data_source == "clinc_oos:plus"  # the reference's data, from the Hub


def test_default_profile_works_offline():
    minilm = load_config("minilm")
    assert minilm.teacher == "all-MiniLM-L6-v2" and minilm.student_init == "teacher_layers"
    assert minilm.data_source is None  # $KDLIB_DATA, else the embedded CLINC150


def test_unknown_profile_names_the_available_ones():
    with pytest.raises(ConfigError, match="profile 'no-such-profile' not found.*minilm"):
        load_profile("no-such-profile")


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        ({"alpah": 0.3}, "alpah: unknown parameter; did you mean 'alpha'?"),
        ({"epochs": "two"}, "epochs = 'two': Input should be a valid integer"),
        ({"epochs": 0}, "epochs = 0: Input should be greater than or equal to 1"),
        ({"epochs": True}, "epochs = True: expected a number, got a boolean"),
        ({"alpha": 1.5}, "alpha = 1.5: Input should be less than or equal to 1"),
        ({"temperature": -1}, "temperature = -1: Input should be greater than 0"),
        ({"temperature": 0}, "temperature = 0: Input should be greater than 0"),
        ({"temperature": float("inf")}, "temperature = inf: Input should be a finite number"),
        ({"hidden_weight": -0.5}, "hidden_weight = -0.5: Input should be greater than or equal to 0"),
        ({"augment_copies": -1}, "augment_copies = -1: Input should be greater than or equal to 0"),
        ({"augment_copies": 0.5}, "augment_copies = 0.5: Input should be a valid integer"),
        ({"learning_rate": "fast"}, "learning_rate = 'fast'"),
        ({"batch_size": 0}, "batch_size = 0: Input should be greater than or equal to 1"),
        ({"max_train_rows": 0}, "max_train_rows = 0: Input should be greater than or equal to 1"),
        ({"keep_layers": [1, 1]}, "keep_layers = [1, 1]: must be a layer count >= 1 (e.g. 4) or a list of distinct"),
        ({"keep_layers": []}, "keep_layers = []: must be a layer count"),
        ({"keep_layers": 0}, "keep_layers = 0: must be a layer count"),
        ({"keep_layers": True}, "keep_layers = True: must be a layer count"),
        ({"keep_layers": 2.5}, "keep_layers = 2.5: must be a layer count"),
        ({"keep_layers": ["one", "three"]}, "keep_layers = ['one', 'three']: must be a layer count"),
        ({"variants": ["onnx", "tflite"]}, "variants.1"),
        ({"run_name": "../../x"}, "run_name = '../../x': must be a plain name: letters, digits"),
        ({"run_name": ""}, "run_name = '': must be a plain name"),
        ({"student_init": "pretrained"}, "needs a `student` model reference"),
        ({"validation_fraction": 1.0}, "validation_fraction = 1.0: Input should be less than 1"),
        ({"variants": ["onnx"], "highlight": "student-onnx-int8"}, "is not a variant this run builds"),
    ],
)
def test_bad_parameters_are_refused_by_name(overrides, expected):
    with pytest.raises(ConfigError) as error:
        load_config("smoke", **overrides)
    assert expected in str(error.value)


def test_every_problem_is_listed_at_once():
    with pytest.raises(ConfigError) as error:
        load_config("smoke", alpah=0.3, epochs=0)
    assert "alpah" in str(error.value) and "epochs = 0" in str(error.value)


def test_command_line_values_are_typed_by_the_parameter():
    assert parse_cli_value("learning_rate", "1e-3") == 0.001  # YAML alone reads this as text
    assert load_config("smoke", learning_rate=parse_cli_value("learning_rate", "1e-3")).learning_rate == 0.001
    assert parse_cli_value("epochs", "2") == 2 and parse_cli_value("alpha", "0.7") == 0.7
    assert parse_cli_value("variants", "[int8, onnx]") == ["int8", "onnx"]
    assert parse_cli_value("data_source", "null") is None
    assert parse_cli_value("run_name", "2024") == "2024"  # a name stays text
    assert parse_cli_value("epochs", "two") == "two"  # refused later, by name
    assert parse_cli_value("text_column", "query") == "query"


def test_only_the_parameters_cells_names_are_parameters():
    """In JupyterLab the set-up cell may run again after later cells defined `data`, `model` ..."""
    history = ["", 'profile = "smoke"\nalpha = None\nepochs = 3', "data = load()\nteacher_epochs = None",
               '# Parameters\nrun_name = "exp"\n']
    namespace = {"In": history, "profile": "smoke", "alpha": None, "epochs": 3, "run_name": "exp",
                 "data": object(), "teacher_epochs": None, "labels": ["a"]}
    config = config_from_notebook(namespace)
    assert (config.epochs, config.run_name, config.alpha) == (3, "exp", load_config("smoke").alpha)
    history[-1] = "# Parameters\nalpah = 0.3\n"
    with pytest.raises(ConfigError, match="alpah: unknown parameter; did you mean 'alpha'"):
        config_from_notebook({**namespace, "alpah": 0.3})


def test_notebook_namespace_becomes_a_config_and_typos_are_refused():
    namespace = {"profile": "smoke", "alpha": 0.7, "epochs": None, "In": [], "_oh": {}, "pd": pytest}
    config = config_from_notebook(namespace)
    assert config.alpha == 0.7 and config.epochs == load_config("smoke").epochs and config.run_name == "smoke"
    with pytest.raises(ConfigError, match="alpah: unknown parameter; did you mean 'alpha'"):
        config_from_notebook({"profile": "smoke", "alpah": 0.3})


def test_fingerprint_changes_with_what_shapes_the_model():
    base = load_config("smoke")
    fp = base.fingerprint(STUDENT_FIELDS, "data-a", teacher="t1")
    assert fp == load_config("smoke").fingerprint(STUDENT_FIELDS, "data-a", teacher="t1")
    assert fp != load_config("smoke", alpha=0.7).fingerprint(STUDENT_FIELDS, "data-a", teacher="t1")
    assert fp != base.fingerprint(STUDENT_FIELDS, "data-b", teacher="t1")
    assert fp != base.fingerprint(STUDENT_FIELDS, "data-a", teacher="t2")
    # what does not shape the student does not change its key
    assert fp == load_config("smoke", n_latency_queries=7).fingerprint(STUDENT_FIELDS, "data-a", teacher="t1")
    teacher_fp = base.fingerprint(TEACHER_FIELDS, "data-a")
    assert teacher_fp == load_config("smoke", alpha=0.7).fingerprint(TEACHER_FIELDS, "data-a")


def test_project_root_is_found_from_the_notebooks_folder():
    assert project_root(NOTEBOOK_DIR) == REPO
    assert project_root(REPO / "tests") == REPO


def test_run_paths_derive_everything_from_output_dir_and_run_name(tmp_path):
    paths = RunPaths.of(tmp_path / "out", "exp1")
    assert paths.run_results == tmp_path / "out" / "results" / "exp1"
    assert paths.teacher_dir == tmp_path / "out" / "models" / "exp1" / "teacher"
    assert paths.student_dir.parent == paths.teacher_dir.parent
    assert RunPaths.of("outputs", "x").output_dir == project_root() / "outputs"
    paths.ensure()
    assert paths.run_results.is_dir() and paths.figures_dir.is_dir()
    with pytest.raises(ConfigError, match="run_name"):
        RunPaths.of(tmp_path, "../escape")


def test_prepare_session_sets_threads_and_seeds():
    import torch

    before = torch.get_num_threads()
    try:
        info = prepare_session(seed=7, threads=1)
        first = torch.rand(3)
        prepare_session(seed=7, threads=1)
        assert torch.equal(first, torch.rand(3))
        assert info == {"seed": 7, "threads": 1, "device": "cpu"}
    finally:
        torch.set_num_threads(before)


def test_the_highlighted_variant_defaults_to_the_recommended_one():
    import pandas as pd

    # teacher most accurate; the fused int8 variant fastest and within a point of it; onnx beaten by it.
    table = pd.DataFrame({"run": "r", "variant": ["teacher", "student-onnx", "student-onnx-fused-int8"],
                          "accuracy": [0.87, 0.86, 0.86], "threshold_accuracy": [0.92, 0.905, 0.915],
                          "time_p50_ms": [10.0, 3.0, 1.0]})
    assert load_config("smoke").highlighted_variant(table) == "student-onnx-fused-int8"
    assert load_config("smoke", highlight="teacher").highlighted_variant(table) == "teacher"
    with pytest.raises(ConfigError, match="highlight='student-onnx-fused-int8' is not a variant this run builds"):
        load_config("smoke", variants=["onnx"], highlight="student-onnx-fused-int8")


def test_every_default_run_builds_the_fastest_variant():
    assert "onnx-fused-int8" in load_config().variants and "onnx-fused-int8" in load_config("smoke").variants


def test_a_parameters_cell_reaches_every_other_parameter_through_overrides():
    history = ["", 'profile = "smoke"\nalpha = None\noverrides = None',
               '# Parameters\nprofile = "smoke"\noverrides = {"n_latency_queries": 7, "alpha": 0.3}\n']
    namespace = {"In": history, "profile": "smoke", "alpha": None,
                 "overrides": {"n_latency_queries": 7, "alpha": 0.3}}
    config = config_from_notebook(namespace)
    assert (config.n_latency_queries, config.alpha) == (7, 0.3)
    # a name the cell lists wins over the same name in overrides
    assert config_from_notebook({**namespace, "alpha": 0.9}).alpha == 0.9
    with pytest.raises(ConfigError, match="n_latency_querys: unknown parameter; did you mean 'n_latency_queries'"):
        config_from_notebook({**namespace, "overrides": {"n_latency_querys": 7}})
    with pytest.raises(ConfigError, match="overrides = 'epochs=2': must be a mapping"):
        config_from_notebook({**namespace, "overrides": "epochs=2"})


def test_search_storage_is_a_journal_path_or_a_database_url():
    assert load_config(search_storage="runs/search.journal").search_storage == "runs/search.journal"
    assert load_config(search_storage="sqlite:///search.db").search_storage == "sqlite:///search.db"
    with pytest.raises(ConfigError, match="search_storage.*scheme 'redis'"):
        load_config(search_storage="redis://localhost/0")


def test_default_keep_layers():
    assert default_keep_layers(6) == [1, 3, 5]
    assert default_keep_layers(12) == [1, 3, 5, 7, 9, 11]
    assert default_keep_layers(4) == [1, 3]
    assert default_keep_layers(1) == [0]
    assert default_keep_layers(6, 2) == [2, 5]
    # the last layer, which the classification head was trained on, is always kept
    assert all(default_keep_layers(n, k)[-1] == n - 1 for n in range(1, 13) for k in range(1, n + 1))
    assert all(len(default_keep_layers(n, k)) == k for n in range(1, 13) for k in range(1, n + 1))
    assert default_keep_layers(6, 4) == [1, 2, 3, 5]  # the minilm profile's student
    for too_many in (7, -1):
        with pytest.raises(ValueError, match=f"keep_layers = {too_many}: a student keeps 1 to 6"):
            default_keep_layers(6, too_many)
