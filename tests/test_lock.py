"""The drift guard of `make test` (scripts/check_lock.py): silent on the locked environment, one line
naming the packages that differ otherwise."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
GUARD = REPO / "scripts" / "check_lock.py"


def _guard(*args: str, pythonpath: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ}
    if pythonpath is not None:
        env["PYTHONPATH"] = f"{pythonpath}{os.pathsep}{env.get('PYTHONPATH', '')}"
    return subprocess.run([sys.executable, str(GUARD), *args], capture_output=True, text=True, env=env)


def _fake_install(folder: Path, name: str, version: str) -> Path:
    """A distribution's metadata, found first on sys.path: what a stray `pip install name==version` leaves."""
    info = folder / f"{name}-{version}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    return folder


def test_the_locked_environment_passes_silently():
    result = _guard()
    assert result.returncode == 0, result.stderr
    assert result.stdout == result.stderr == ""


def test_a_different_installed_version_stops_with_one_line(tmp_path):
    result = _guard(pythonpath=_fake_install(tmp_path, "PyYAML", "5.0.0"))
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1
    assert "pyyaml 5.0.0 (lock 6." in lines[0] and "make sync" in lines[0] and "make lock" in lines[0]


def test_a_missing_package_is_named(tmp_path):
    lock = tmp_path / "requirements.lock"
    lock.write_text((REPO / "requirements.lock").read_text() + "no-such-package==1.0 \\\n    --hash=sha256:00\n")
    result = _guard("--lock", str(lock))
    assert result.returncode == 1 and "no-such-package missing (lock 1.0)" in result.stderr


def test_a_skipped_package_is_not_compared(tmp_path):
    assert _guard("--skip", "pyyaml", pythonpath=_fake_install(tmp_path, "PyYAML", "5.0.0")).returncode == 0


def test_the_lock_without_torch_keeps_every_other_entry_whole():
    text = _guard("--without", "torch").stdout
    original = (REPO / "requirements.lock").read_text()
    torch_entry = next(e for e in re.split(r"\n(?=\S)", original) if e.startswith("torch=="))
    assert "torch==" not in text and "\ntransformers==" in text
    assert text.count("==") == original.count("==") - 1
    assert text.count("--hash=") == original.count("--hash=") - torch_entry.count("--hash=")
