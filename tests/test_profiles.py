"""Profiles are papermill parameter sets the notebooks understand; RunPaths ties the notebooks together."""

from __future__ import annotations

from pathlib import Path

import papermill
import pytest

from kdlib.profiles import RunPaths, load_profile, prepare_session, project_root

REPO = Path(__file__).resolve().parent.parent
NOTEBOOK_DIR = REPO / "notebooks"
PROFILES = sorted(p.stem for p in (REPO / "configs").glob("*.yaml"))


def declared_parameters() -> set[str]:
    names: set[str] = set()
    for notebook in NOTEBOOK_DIR.glob("*.ipynb"):
        names |= set(papermill.inspect_notebook(str(notebook)))
    return names


def test_the_three_profiles_exist():
    assert {"minilm", "book", "smoke"} <= set(PROFILES)


@pytest.mark.parametrize("profile", PROFILES)
def test_every_profile_key_is_a_notebook_parameter(profile):
    unknown = set(load_profile(profile)) - declared_parameters()
    assert not unknown, f"{profile}.yaml sets parameters no notebook declares (typo?): {sorted(unknown)}"


def test_book_profile_is_the_reference_setup():
    book = load_profile("book")
    assert book["teacher"] == "transformersbook/bert-base-uncased-finetuned-clinc"
    assert book["student_init"] == "pretrained" and book["student"] == "distilbert-base-uncased"
    assert (book["learning_rate"], book["batch_size"], book["epochs"], book["seed"]) == (2e-5, 48, 5, 42)
    assert book["data_source"] is None  # the Hub's clinc_oos/plus unless $KDLIB_DATA says otherwise


def test_default_profile_works_offline():
    minilm = load_profile("minilm")
    assert minilm["teacher"] == "all-MiniLM-L6-v2" and minilm["student_init"] == "teacher_layers"


def test_unknown_profile_names_the_available_ones():
    with pytest.raises(FileNotFoundError, match="available profiles.*minilm"):
        load_profile("no-such-profile")


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


def test_prepare_session_sets_threads_and_seeds():
    import torch

    before = torch.get_num_threads()
    try:
        info = prepare_session(seed=7, threads=1)
        first = torch.rand(3)
        prepare_session(seed=7, threads=1)
        assert torch.equal(first, torch.rand(3))
        assert info["threads"] == torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
