"""Every path of one run, under ``<output_dir>/<kind>/<run_name>/``, and the lock a run holds on them.

Light like :mod:`kdlib.config`: scripts and the runner check these paths before torch loads.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from kdlib.config import SLUG, SLUG_RULE, ConfigError, RunConfig
from kdlib.io import project_root


def missing_model_files(folder: str | os.PathLike) -> list[str]:
    """The files of a model saved by :func:`kdlib.save_model` that ``folder`` lacks, checked without torch."""
    return [name for name in ("config.json", "model.safetensors") if not (Path(folder) / name).is_file()]


def _run_folder(kind: str, *inside: str, doc: str) -> property:
    """A :class:`RunPaths` property: ``<output_dir>/<kind>/<run_name>/<inside...>``."""
    return property(lambda paths: paths.output_dir.joinpath(kind, paths.run_name, *inside), doc=doc)


@dataclass(frozen=True)
class RunPaths:
    """Every path of one run, derived from ``output_dir`` and ``run_name``."""

    output_dir: Path
    run_name: str

    @classmethod
    def of(cls, output_dir: str | os.PathLike, run_name: str) -> RunPaths:
        """The folders of run ``run_name`` under ``output_dir`` (relative: to the project root)."""
        if not SLUG.match(run_name or ""):
            raise ConfigError(f"run_name = {run_name!r}: {SLUG_RULE} (a folder name).")
        out = Path(output_dir).expanduser()
        if not out.is_absolute():
            out = project_root() / out
        return cls(out, run_name)

    @classmethod
    def for_config(cls, config: RunConfig) -> RunPaths:
        """The folders of a run configuration's run."""
        return cls.of(config.output_dir, config.run_name)

    @property
    def results_dir(self) -> Path:
        """Parent of the per-run result folders (``results/<run>/<variant>.json``)."""
        return self.output_dir / "results"

    run_results = _run_folder("results", doc="This run's result records (``results/<run>``).")
    models_dir = _run_folder("models", doc="This run's saved models (``models/<run>``).")
    teacher_dir = _run_folder("models", "teacher", doc="The fine-tuned teacher 01 saves and 02 loads.")
    student_dir = _run_folder("models", "student", doc="The distilled student 02 saves.")
    onnx_dir = _run_folder("models", "onnx", doc="The ONNX files of the student's variants.")
    checkpoints_dir = _run_folder("checkpoints", doc="Training checkpoints, one folder per training key (resumable).")
    search_journal = _run_folder("checkpoints", "search.journal",
                                 doc="The search's Optuna journal when ``search_storage`` names none.")
    tables_dir = _run_folder("tables", doc="Markdown and CSV tables (``tables/<run>``).")
    figures_dir = _run_folder("figures", doc="PNG figures (``figures/<run>``).")
    notebooks_dir = _run_folder("notebooks", doc="Executed copies of the notebooks (``make run``).")

    @property
    def lock_file(self) -> Path:
        """Held while a run writes into this run's folders: a second run is refused, not mixed in."""
        return self.output_dir / f".{self.run_name}.lock"

    def require_models(self, *names: str) -> RunPaths:
        """Raise :class:`ConfigError` unless this run saved the models ``names``; returns self."""
        missing = [name for name in names if missing_model_files(self.models_dir / name)]
        if missing:
            raise ConfigError(
                f"run {self.run_name!r} has no saved {' or '.join(missing)} under {self.models_dir}: run it first "
                f"(`make run`, or notebooks 01 and 02 with run_name={self.run_name!r}), or name a run that did."
            )
        return self

    def ensure(self) -> RunPaths:
        """Create the run's result, model, table and figure folders; returns self."""
        for folder in (self.run_results, self.models_dir, self.tables_dir, self.figures_dir):
            folder.mkdir(parents=True, exist_ok=True)
        return self
