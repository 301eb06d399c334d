"""scripts/width_depth.py's record: what ``--out`` may name is checked before any training."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kdlib.config import ConfigError


@pytest.fixture
def width_depth(load_script):
    return load_script("scripts/width_depth.py")


def test_a_new_record_starts_empty_and_an_existing_one_is_resumed(width_depth, tmp_path):
    assert width_depth.read_record(tmp_path / "new" / "record.json") == {"candidates": {}}
    path = tmp_path / "record.json"
    record = {"prune_epochs": 6, "candidates": {"3x0.5x1": {"layers": 3}}}
    path.write_text(json.dumps(record))
    assert width_depth.read_record(path) == record


@pytest.mark.parametrize("text", ["not json", json.dumps({"rows": []}), json.dumps([1, 2])])
def test_a_file_that_is_not_a_record_is_refused_and_left_as_it_was(width_depth, tmp_path, text):
    path = tmp_path / "notes.json"
    path.write_text(text)
    with pytest.raises(ConfigError, match=f"--out {path}: not a record of this script"):
        width_depth.read_record(path)
    assert path.read_text() == text


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux's /proc, where nothing can be created")
def test_a_folder_that_cannot_be_written_is_refused(width_depth):
    with pytest.raises(ConfigError, match="--out /proc/kdlib/record.json: cannot write into /proc"):
        width_depth.read_record(Path("/proc/kdlib/record.json"))
