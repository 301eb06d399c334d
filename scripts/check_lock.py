"""The drift guard of `make test`: are the installed packages exactly those of requirements.lock?

A test suite run against other versions than the locked ones fails in confusing ways (an nbval
diff of a version string, a changed tokenizer); this says it in one line instead, before the tests:

    python scripts/check_lock.py                 # exit 0 silently, or 1 with one line naming what differs
    python scripts/check_lock.py --skip torch    # a GPU build of torch was installed on purpose
    python scripts/check_lock.py --without torch # print the lock minus one package (the Makefile's GPU path)

Standard library only, so it runs before anything is installed.
"""

from __future__ import annotations

import argparse
import re
import sys
from importlib.metadata import distributions
from pathlib import Path

LOCK = Path(__file__).resolve().parent.parent / "requirements.lock"
PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s\\;]+)")


def normalise(name: str) -> str:
    """PEP 503 names: ``Jinja2``, ``jinja2`` and ``jinja_2`` are one package."""
    return re.sub(r"[-_.]+", "-", name).lower()


def locked_versions(lock: Path) -> dict[str, str]:
    return {normalise(m.group(1)): m.group(2) for line in lock.read_text().splitlines() if (m := PIN.match(line))}


def installed_versions() -> dict[str, str]:
    """What ``import`` would use: the first distribution of each name on sys.path."""
    versions: dict[str, str] = {}
    for dist in distributions():
        if dist.metadata["Name"]:
            versions.setdefault(normalise(dist.metadata["Name"]), dist.version)
    return versions


def drift(lock: Path, skip: set[str]) -> list[str]:
    """``name installed (lock X)`` or ``name missing (lock X)`` for every locked package that differs."""
    installed = installed_versions()
    return [
        f"{name} {installed[name]} (lock {version})" if name in installed else f"{name} missing (lock {version})"
        for name, version in sorted(locked_versions(lock).items())
        if name not in skip and installed.get(name) != version
    ]


def without(lock: Path, package: str) -> str:
    """The lock's text minus one package's entry (its pin, hashes and comments)."""
    out, skipping = [], False
    for line in lock.read_text().splitlines():
        match = PIN.match(line)
        if match or not line.startswith(" "):
            skipping = bool(match) and normalise(match.group(1)) == normalise(package)
        if not skipping:
            out.append(line)
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lock", type=Path, default=LOCK)
    parser.add_argument("--skip", action="append", default=[], help="a package not to compare (repeatable)")
    parser.add_argument("--without", default=None, help="print the lock without this package and exit")
    args = parser.parse_args(argv)
    if args.without:
        sys.stdout.write(without(args.lock, args.without))
        return 0
    differing = drift(args.lock, {normalise(name) for name in args.skip})
    if differing:
        print(
            f"Installed packages differ from {args.lock.name}: {', '.join(differing)}. Run `make sync` to install "
            "the lock, or `make lock` to update it on purpose.",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
