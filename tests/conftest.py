"""Shared fixtures: the real CLINC150 release file and a tiny label set."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
CLINC_PLUS_NAME = "data_oos_plus.json"
SHARED_CLINC_PLUS = REPO.parent / "shared" / "data" / "clinc150" / CLINC_PLUS_NAME

# The tests never reach the Hub, and notebooks executed by nbval or papermill (child processes
# that inherit this environment) read the real CLINC150 file from beside the project.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
if SHARED_CLINC_PLUS.is_file():
    os.environ.setdefault("KDLIB_DATA", str(SHARED_CLINC_PLUS))


@pytest.fixture(scope="session")
def clinc_plus_path() -> Path:
    """The real data_oos_plus.json: ``$KDLIB_DATA`` when it points at one, else ``../shared/data``."""
    env = os.environ.get("KDLIB_DATA")
    if env and Path(env).name == CLINC_PLUS_NAME and Path(env).is_file():
        return Path(env)
    path = SHARED_CLINC_PLUS
    if not path.is_file():
        pytest.fail(
            f"CLINC150 release file not found: set KDLIB_DATA to a {CLINC_PLUS_NAME} or put it at {path}."
        )
    return path


@pytest.fixture(scope="session")
def clinc_plus(clinc_plus_path):
    """data_oos_plus.json loaded once per session with ``load_intent_data``."""
    from kdlib.data import load_intent_data

    return load_intent_data(clinc_plus_path)


@pytest.fixture
def tiny_labels() -> list[str]:
    return ["book_flight", "oos", "play_music", "weather"]
