"""The project root every relative path is taken from, and the atomic writes every output goes through.

kdlib's lowest layer: no other kdlib module and no heavy library, so the run configuration stays light.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import IO


def project_root(start: str | os.PathLike | None = None) -> Path:
    """The folder holding ``pyproject.toml`` and ``kdlib/`` upwards from ``start`` (or the working directory),
    so notebooks run from anywhere share ``outputs/``; else the installed package's parent."""
    here = Path(start or Path.cwd()).resolve()
    for folder in (here, *here.parents):
        if (folder / "pyproject.toml").is_file() and (folder / "kdlib").is_dir():
            return folder
    return Path(__file__).resolve().parent.parent


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = ".tmp", *, directory: bool = False) -> Iterator[Path]:
    """A temporary path beside ``path`` (a file, or a folder with ``directory=True``) that replaces
    ``path`` only if the block succeeds; on any error it is removed and ``path`` keeps its content.

    It is created with the default modes, so the umask gives the usual permissions (mkstemp's 0600 would
    survive the rename).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}{suffix}")
    if directory:
        tmp.mkdir()
    else:
        tmp.touch(exist_ok=False)  # O_CREAT | O_EXCL, mode 0o666 less the umask
    try:
        yield tmp
        if directory:
            _normal_modes(tmp)
            _swap_dir(tmp, path)
        else:
            os.replace(tmp, path)
    finally:
        if directory:
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)


def _normal_modes(folder: Path) -> None:
    """Give every file in ``folder`` the mode a fresh file gets here (read off a probe file, not the umask):
    some libraries write through mkstemp, whose 0600 would otherwise survive."""
    probe = folder / f".probe.{uuid.uuid4().hex[:8]}"
    probe.touch(exist_ok=False)
    mode = probe.stat().st_mode & 0o777
    probe.unlink()
    for file in folder.rglob("*"):
        if file.is_file():
            file.chmod(mode)


def _swap_dir(new: Path, target: Path) -> None:
    """Rename ``new`` to ``target``; an old ``target`` steps aside first (a folder cannot be renamed over
    a non-empty one) and is put back if the swap fails."""
    if not target.exists():
        os.replace(new, target)
        return
    backup = target.with_name(f".{target.name}.old")
    shutil.rmtree(backup, ignore_errors=True)
    os.replace(target, backup)
    try:
        os.replace(new, target)
    except BaseException:
        os.rename(backup, target)
        raise
    shutil.rmtree(backup, ignore_errors=True)


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "w") -> Iterator[IO]:
    """Open a temporary file beside ``path`` for writing; on success it replaces ``path``."""
    encoding = {} if "b" in mode else {"encoding": "utf-8"}
    with atomic_path(path) as tmp, open(tmp, mode, **encoding) as handle:
        yield handle
        handle.flush()
        os.fsync(handle.fileno())


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` through a temporary file in the same folder, then rename."""
    with atomic_open(path, "w") as handle:
        handle.write(text)
    return Path(path)


def write_problem(folder: Path) -> tuple[Path, str | None]:
    """The nearest existing folder of ``folder`` (itself when it exists) and why nothing can be created in it,
    or None when a probe folder could be made there (and was removed at once)."""
    existing = next(p for p in (folder, *folder.parents) if p.exists() or p == p.parent)
    if not existing.is_dir():
        return existing, f"{existing} is a file, not a folder"
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".kdlib-probe-", dir=existing))  # as root, os.access says yes to /proc
    except OSError as err:
        return existing, str(err.strerror or err)
    return existing, None
