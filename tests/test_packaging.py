"""The project's set-up files agree with each other: pyproject, requirements.lock, environment.yml,
Makefile, CI, README."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parent.parent
PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)(?:\[[A-Za-z0-9,_-]+\])?==([^\s\\;]+)")  # name[extras]==version


def _pyproject_requirements() -> dict[str, Requirement]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    requirements = [Requirement(r) for r in project["dependencies"] + extras["dev"] + extras["postgres"]]
    return {canonicalize_name(r.name): r for r in requirements}


def _lock() -> dict[str, str]:
    lines = (REPO / "requirements.lock").read_text().splitlines()
    return {canonicalize_name(m.group(1)): m.group(2) for line in lines if (m := PIN.match(line))}


def _conda_pip_section() -> list[str]:
    env = yaml.safe_load((REPO / "environment.yml").read_text())
    return next(item["pip"] for item in env["dependencies"] if isinstance(item, dict) and "pip" in item)


def _conda_pins() -> dict[str, str]:
    pins = [PIN.match(r) for r in _conda_pip_section() if not r.startswith("-")]
    assert all(pins), "every environment.yml pip requirement is an exact `==` pin"
    return {canonicalize_name(m.group(1)): m.group(2) for m in pins}


def test_every_dependency_is_locked_at_a_version_pyproject_allows():
    lock = _lock()
    for name, requirement in _pyproject_requirements().items():
        assert name in lock, f"{name} is in pyproject.toml but not in requirements.lock: run `make lock`"
        assert requirement.specifier.contains(lock[name], prereleases=True), (
            f"requirements.lock pins {name}=={lock[name]}, outside pyproject's {requirement.specifier}: run `make lock`"
        )


def test_every_locked_package_has_a_hash():
    entries = [e for e in re.split(r"\n(?=\S)", (REPO / "requirements.lock").read_text()) if PIN.match(e)]
    assert len(entries) == len(_lock()) > 100
    assert all("--hash=sha256:" in entry for entry in entries), "pip install --require-hashes needs every hash"


def test_the_lock_holds_the_cpu_torch_build_and_the_installers():
    lock = _lock()
    assert lock["torch"] == "2.13.0+cpu"
    assert {"pip", "setuptools", "pip-tools"} <= set(lock)


def test_environment_yml_pins_the_same_packages_at_the_locked_versions():
    pyproject, conda, lock = _pyproject_requirements(), _conda_pins(), _lock()
    assert set(pyproject) == set(conda), (
        f"only in pyproject: {sorted(set(pyproject) - set(conda))}; only in environment.yml: "
        f"{sorted(set(conda) - set(pyproject))}"
    )
    differing = {name: (conda[name], lock[name]) for name in conda if conda[name] != lock[name]}
    assert not differing, f"environment.yml pins differ from requirements.lock: {differing}"


def test_environment_yml_installs_kdlib_itself():
    assert "-e ." in _conda_pip_section()


def test_the_makefile_installs_the_lock_with_hashes_and_guards_it():
    makefile = (REPO / "Makefile").read_text()
    assert "--require-hashes --no-deps -r $(LOCK)" in makefile
    assert re.search(r"^TORCH_SPEC\s*\?=\s*$", makefile, re.M), "the CPU torch of the lock is the default"
    test_recipe = re.search(r"^test: setup\n((?:\t.*\n)+)", makefile, re.M).group(1)
    assert test_recipe.index("scripts/check_lock.py") < test_recipe.index("pytest"), "guard before the tests"


def test_pyproject_license_is_an_spdx_string():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert project["license"] == "Apache-2.0"  # a TOML table makes setuptools print ~45 deprecation lines


def test_ci_runs_exactly_the_readme_test_command():
    readme = (REPO / "README.md").read_text()
    ci_lines = [
        line.strip()
        for line in (REPO / ".ci" / "run").read_text().splitlines()
        if line.strip() and not line.startswith(("#", "set ", "cd "))
    ]
    assert ci_lines[-1] == "make test" and ci_lines.count("make test") == 1
    # before it, only the browser the JupyterLab test drives (Debian's packages, installed when missing)
    browser_setup = ci_lines[:-1]
    assert browser_setup == [] or (
        browser_setup[0].startswith("if [ ! -x /usr/bin/chromium ]") and browser_setup[-1] == "fi"
        and "apt-get install -y -qq chromium chromium-driver > /dev/null" in browser_setup
        and not any(word in line for line in browser_setup for word in ("make", "pytest", "python"))
    ), browser_setup
    assert re.search(r"^make test$", readme, re.M), "README must show `make test` as the test command"
    assert re.search(r"^make run$", readme, re.M), "README must show `make run` as the main command"
