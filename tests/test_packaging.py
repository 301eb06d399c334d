"""The project's set-up files agree with each other: pyproject, environment.yml, Makefile, CI, README."""

from __future__ import annotations

import re
from pathlib import Path

import tomllib
import yaml

REPO = Path(__file__).resolve().parent.parent


def _name(requirement: str) -> str:
    return re.split(r"[<>=!~\[ ;]", requirement.strip(), maxsplit=1)[0].lower().replace("_", "-")


def _pyproject_requirements() -> dict[str, str]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    requirements = project["dependencies"] + project["optional-dependencies"]["dev"]
    return {_name(r): r.replace(" ", "") for r in requirements}


def _conda_pip_requirements() -> dict[str, str]:
    env = yaml.safe_load((REPO / "environment.yml").read_text())
    pip_section = next(item["pip"] for item in env["dependencies"] if isinstance(item, dict) and "pip" in item)
    return {_name(r): r.replace(" ", "") for r in pip_section if not r.startswith("-e")}


def test_environment_yml_lists_the_same_packages_as_pyproject():
    pyproject, conda = _pyproject_requirements(), _conda_pip_requirements()
    assert set(pyproject) == set(conda), (
        f"only in pyproject: {sorted(set(pyproject) - set(conda))}; only in environment.yml: "
        f"{sorted(set(conda) - set(pyproject))}"
    )
    differing = {n: (pyproject[n], conda[n]) for n in pyproject if n != "torch" and pyproject[n] != conda[n]}
    assert not differing, f"version specifiers differ: {differing}"


def test_environment_yml_installs_kdlib_itself():
    env = yaml.safe_load((REPO / "environment.yml").read_text())
    pip_section = next(item["pip"] for item in env["dependencies"] if isinstance(item, dict) and "pip" in item)
    assert "-e ." in pip_section


def test_torch_pin_is_the_same_in_makefile_and_environment_yml():
    makefile = (REPO / "Makefile").read_text()
    pin = re.search(r"^TORCH_SPEC\s*\?=\s*(\S+)", makefile, re.M).group(1)
    assert _conda_pip_requirements()["torch"] == pin == "torch==2.13.0"


def test_ci_runs_exactly_the_readme_test_command():
    readme = (REPO / "README.md").read_text()
    ci_lines = [
        line.strip()
        for line in (REPO / ".ci" / "run").read_text().splitlines()
        if line.strip() and not line.startswith(("#", "set ", "cd "))
    ]
    assert ci_lines == ["make test"]
    assert re.search(r"^make test$", readme, re.M), "README must show `make test` as the test command"
    assert re.search(r"^make run$", readme, re.M), "README must show `make run` as the main command"
