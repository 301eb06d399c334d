"""Profiles (plain YAML files of papermill parameters) and where a run keeps its files.

A profile is one flat mapping of notebook parameters in ``configs/<name>.yaml``; each notebook
receives the ones its ``parameters`` cell declares. :class:`RunPaths` derives every path of a run
from ``output_dir`` and ``run_name``, so notebooks 01, 02 and 03 agree without repeating it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import yaml

CONFIG_DIR_NAME = "configs"
DEFAULT_PROFILE = "minilm"


def project_root(start: str | os.PathLike | None = None) -> Path:
    """The folder holding ``pyproject.toml`` and ``configs/``: found upwards from ``start`` (or the
    working directory), so a notebook opened from ``notebooks/`` and a papermill run started at the
    top both write to the same ``outputs/``. Falls back to the installed package's parent."""
    here = Path(start or Path.cwd()).resolve()
    for folder in (here, *here.parents):
        if (folder / "pyproject.toml").is_file() and (folder / "kdlib").is_dir():
            return folder
    return Path(__file__).resolve().parent.parent


def profile_path(name_or_path: str | os.PathLike) -> Path:
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml"):
        return path
    return project_root() / CONFIG_DIR_NAME / f"{name_or_path}.yaml"


def load_profile(name_or_path: str | os.PathLike = DEFAULT_PROFILE) -> dict:
    """The parameters of a profile (``minilm``, ``book``, ``smoke`` or a path to a YAML file)."""
    path = profile_path(name_or_path)
    if not path.is_file():
        available = sorted(p.stem for p in (project_root() / CONFIG_DIR_NAME).glob("*.yaml"))
        raise FileNotFoundError(
            f"Profile {name_or_path!r} not found at {path}; available profiles: {available}."
        )
    params = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    if not isinstance(params, dict):
        raise ValueError(f"{path} must be a mapping of parameter names to values.")
    return params


@dataclass(frozen=True)
class RunPaths:
    """Every path of one run, derived from ``output_dir`` and ``run_name``."""

    output_dir: Path
    run_name: str

    @classmethod
    def of(cls, output_dir: str | os.PathLike, run_name: str) -> RunPaths:
        out = Path(output_dir)
        if not out.is_absolute():
            out = project_root() / out
        return cls(out, run_name)

    @property
    def results_dir(self) -> Path:
        """Parent of the per-run result folders (``results/<run>/<variant>.json``)."""
        return self.output_dir / "results"

    @property
    def run_results(self) -> Path:
        return self.results_dir / self.run_name

    @property
    def models_dir(self) -> Path:
        return self.output_dir / "models" / self.run_name

    @property
    def teacher_dir(self) -> Path:
        return self.models_dir / "teacher"

    @property
    def student_dir(self) -> Path:
        return self.models_dir / "student"

    @property
    def onnx_dir(self) -> Path:
        return self.models_dir / "onnx"

    @property
    def checkpoints_dir(self) -> Path:
        return self.output_dir / "checkpoints" / self.run_name

    @property
    def tables_dir(self) -> Path:
        return self.output_dir / "tables" / self.run_name

    @property
    def figures_dir(self) -> Path:
        return self.output_dir / "figures" / self.run_name

    @property
    def optuna_db(self) -> Path:
        return self.checkpoints_dir / "optuna.db"

    def ensure(self) -> RunPaths:
        for folder in (self.run_results, self.models_dir, self.tables_dir, self.figures_dir):
            folder.mkdir(parents=True, exist_ok=True)
        return self


def data_limits(max_train_rows=None, max_validation_rows=None, max_test_rows=None) -> dict[str, int | None]:
    """Row limits per split for :func:`kdlib.data.subsample` (``None`` keeps a split whole)."""
    return {"train": max_train_rows, "validation": max_validation_rows, "test": max_test_rows}


def prepare_session(seed: int = 42, threads: int | None = None) -> dict:
    """Seeds everywhere, the thread count, and quiet library logs: the first call of every notebook.

    Returns the facts worth printing (threads actually used, device), so a reader sees them.
    """
    import warnings

    import datasets
    import torch
    import transformers

    # Harmless on a CPU, but it would print at every training run.
    warnings.filterwarnings("ignore", message=".*pin_memory.*")
    if threads:
        torch.set_num_threads(int(threads))
    transformers.set_seed(seed)
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    return {
        "seed": seed,
        "threads": torch.get_num_threads(),
        "device": "cuda" if torch.cuda.is_available() else "cpu",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }
