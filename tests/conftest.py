"""Shared fixtures: the real CLINC150 data (embedded in kdlib, and the release file beside the project)."""

from __future__ import annotations

import importlib.util
import os
import warnings
from pathlib import Path
from types import ModuleType

import pytest

REPO = Path(__file__).resolve().parent.parent
CLINC_PLUS_NAME = "data_oos_plus.json"
SHARED_CLINC_PLUS = REPO.parent / "shared" / "data" / "clinc150" / CLINC_PLUS_NAME

# The tests never reach the Hub; notebooks executed by nbval or papermill (child processes that
# inherit this environment) use kdlib's default data, the embedded CLINC150, and report no progress.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("KDLIB_PROGRESS", "off")
os.environ.pop("KDLIB_DATA", None)


@pytest.fixture(scope="session")
def clinc_plus_path() -> Path:
    """The real data_oos_plus.json release file beside the project (``../shared/data/clinc150``)."""
    if not SHARED_CLINC_PLUS.is_file():
        pytest.fail(f"CLINC150 release file not found at {SHARED_CLINC_PLUS}: clone the project beside shared/.")
    return SHARED_CLINC_PLUS


@pytest.fixture(scope="session")
def clinc_plus():
    """CLINC150 plus as kdlib loads it by default (the embedded release file), once per session.

    Its 5 texts shared between splits are asserted by test_data; their warning is not repeated here.
    """
    from kdlib.data import DuplicateTextWarning, load_intent_data

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DuplicateTextWarning)
        return load_intent_data()


def _import_script(relative_path: str) -> ModuleType:
    """A fresh module from a file of the repo's ``scripts/`` or ``benchmarks/`` (loaded by path, anew)."""
    path = REPO / relative_path
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def load_script():
    """``load_script("scripts/recipe.py")``: the script as a module, loaded anew on each call, so the
    scripts' tests call their ``main`` and helpers in-process (monkeypatching one copy leaves the others)."""
    return _import_script


@pytest.fixture
def tiny_labels() -> list[str]:
    return ["book_flight", "oos", "play_music", "weather"]


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models gain nothing from threads, and on a busy 2-core machine they make torch ~30x slower.
    Modules of tiny-model tests use it with ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture()
def intent_csv_folder(tmp_path) -> Path:
    """A data folder of train / validation / test CSVs: three easy intents (``oos`` one of them), 12
    queries each, the same in every split. The scripts' tests run on it with tiny models."""
    words = {"alarm": "wake me up at", "music": "play a song by", "oos": "how tall is"}
    rows = [f"{text} {i},{label}" for i in range(12) for label, text in words.items()]
    folder = tmp_path / "data"
    folder.mkdir()
    for split in ("train", "validation", "test"):
        (folder / f"{split}.csv").write_text("text,label\n" + "\n".join(rows))
    return folder
