"""Run the study headless: notebooks 01 -> 02 -> 03 with papermill on one profile.

    python -m kdlib.run --profile minilm            # what `make run` does
    python -m kdlib.run --profile smoke --only 01   # one notebook
    python -m kdlib.run -p epochs 2 -p alpha 0.7    # override parameters

Executed notebooks go to ``<output_dir>/notebooks/<run_name>/``. A failing cell stops the run
with the notebook, cell and error named; the partly executed notebook stays there to inspect.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from pathlib import Path

import yaml

from kdlib.profiles import DEFAULT_PROFILE, RunPaths, load_profile, project_root

NOTEBOOKS = ("01_baseline_benchmark", "02_distill", "03_compare")


def notebook_parameters(notebook: Path, params: dict) -> dict:
    """The subset of ``params`` that the notebook's ``parameters`` cell declares."""
    import papermill

    declared = papermill.inspect_notebook(str(notebook))
    return {key: value for key, value in params.items() if key in declared}


def run_notebook(notebook: Path, output: Path, params: dict, *, kernel: str | None = None) -> float:
    """Execute one notebook with papermill; returns wall seconds. Raises on a failing cell."""
    import papermill

    output.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    papermill.execute_notebook(
        str(notebook),
        str(output),
        parameters=notebook_parameters(notebook, params),
        kernel_name=kernel or "python3",
        cwd=str(project_root()),
        progress_bar=False,
        log_output=False,
        request_save_on_cell_execute=True,
    )
    return time.perf_counter() - start


class NotebookFailed(RuntimeError):
    """A cell of a notebook failed; names the notebook, the cell and the error."""

    def __init__(self, notebook: str, cell, ename: str, evalue: str, output: Path):
        self.notebook, self.cell, self.ename, self.evalue, self.output = notebook, cell, ename, evalue, output
        super().__init__(
            f"{notebook}, cell [{cell}]: {ename}: {evalue}\n"
            f"The partly executed notebook is kept at {output} for inspection."
        )


def run_notebooks(
    notebooks: list[Path], executed_dir: Path, params: dict, *, kernel: str | None = None, log=print
) -> dict[str, float]:
    """Execute notebooks in order; wall seconds per notebook. Stops at the first failing cell."""
    timings: dict[str, float] = {}
    for source in notebooks:
        output = executed_dir / source.name
        log(f"running {source.stem} -> {output}")
        try:
            timings[source.stem] = run_notebook(source, output, params, kernel=kernel)
        except Exception as err:  # papermill's PapermillExecutionError carries the cell and error
            raise NotebookFailed(
                source.stem,
                getattr(err, "exec_count", None),
                getattr(err, "ename", type(err).__name__),
                getattr(err, "evalue", str(err)),
                output,
            ) from err
        log(f"{source.stem}: {timings[source.stem]:.1f} s")
    return timings


def strip_local_paths(notebook: Path) -> None:
    """Drop papermill's absolute input/output paths from a notebook meant to be committed."""
    import nbformat

    nb = nbformat.read(notebook, as_version=4)
    for key in ("input_path", "output_path"):
        nb.metadata.get("papermill", {}).pop(key, None)
    nbformat.write(nb, notebook)


def parse_value(text: str):
    """``-p key value`` values are YAML: numbers, booleans, null and lists work as expected."""
    return yaml.safe_load(text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--profile", default=os.environ.get("KDLIB_PROFILE", DEFAULT_PROFILE))
    parser.add_argument("--only", nargs="*", help="notebook prefixes to run, e.g. 01 02")
    parser.add_argument("-p", "--param", nargs=2, action="append", default=[], metavar=("NAME", "VALUE"))
    parser.add_argument("--kernel", default=None, help="Jupyter kernel name (default: python3)")
    parser.add_argument(
        "--into",
        default=None,
        help="folder for the executed notebooks (default: <output_dir>/notebooks/<run_name>)",
    )
    parser.add_argument(
        "--update-notebooks",
        action="store_true",
        help="copy the executed notebooks over notebooks/ (to commit a real run's outputs as course material)",
    )
    args = parser.parse_args(argv)

    params = load_profile(args.profile)
    params.update({name: parse_value(value) for name, value in args.param})
    data_env = os.environ.get("KDLIB_DATA")
    if data_env and Path(data_env).exists():
        # Notebooks run with the project root as working directory: pass an absolute path on.
        os.environ["KDLIB_DATA"] = str(Path(data_env).resolve())
    if data_env and not params.get("data_source"):
        print(f"data: $KDLIB_DATA = {os.environ['KDLIB_DATA']}")
    paths = RunPaths.of(params.get("output_dir", "outputs"), params["run_name"])
    executed_dir = (
        Path(args.into).resolve() if args.into else paths.output_dir / "notebooks" / params["run_name"]
    )
    root = project_root()
    selected = [
        root / "notebooks" / f"{nb}.ipynb"
        for nb in NOTEBOOKS
        if not args.only or any(nb.startswith(p) for p in args.only)
    ]

    try:
        timings = run_notebooks(
            selected,
            executed_dir,
            params,
            kernel=args.kernel,
            log=lambda msg: print(f"[{args.profile}] {msg}", flush=True),
        )
    except NotebookFailed as failure:
        print(f"\nFAILED: {failure}", file=sys.stderr)
        return 1

    print("\nWall time per notebook:")
    for name, seconds in timings.items():
        print(f"  {name:<24} {seconds / 60:6.1f} min ({seconds:.0f} s)")
    print(f"  {'total':<24} {sum(timings.values()) / 60:6.1f} min")
    if args.into:
        for name in timings:
            strip_local_paths(executed_dir / f"{name}.ipynb")
    if args.update_notebooks:
        for name in timings:
            shutil.copyfile(executed_dir / f"{name}.ipynb", root / "notebooks" / f"{name}.ipynb")
            strip_local_paths(root / "notebooks" / f"{name}.ipynb")
        print("notebooks/ updated with the executed notebooks.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
