"""Run the study headless: notebooks 01 -> 02 -> 03 with papermill on one profile.

    python -m kdlib.run --profile minilm            # what `make run` does
    python -m kdlib.run --profile smoke --only 01   # one notebook
    python -m kdlib.run -p epochs 2 -p alpha 0.7    # override parameters
    python -m kdlib.run --help-params               # every parameter, its default and meaning

The parameters are validated before anything runs (kdlib.config). Relative paths given with
``-p`` or ``$KDLIB_DATA`` are taken from the directory the command runs in. Executed notebooks go to
``<output_dir>/notebooks/<run_name>/``; a failing cell stops the run with the notebook, cell and
error named, and the partly executed notebook stays there to inspect. A rerun resumes training
from the last checkpoint of the same settings.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kdlib.config import (
    DEFAULT_PROFILE,
    ConfigError,
    RunConfig,
    RunPaths,
    load_config,
    parameter_help,
    parse_cli_value,
    profile_path,
    project_root,
)

NOTEBOOKS = ("01_baseline_benchmark", "02_distill", "03_compare")
PATH_PARAMETERS = ("data_source", "teacher", "teacher_model", "student", "search_storage")


def notebook_parameters(notebook: Path, params: dict) -> dict:
    """The subset of ``params`` that the notebook's ``parameters`` cell declares."""
    import papermill

    declared = papermill.inspect_notebook(str(notebook))
    return {key: value for key, value in params.items() if key in declared}


_RUNNING: dict[str, Any] = {}  # the notebook client at work, so that Ctrl-C can interrupt its kernel


def _progress_engine(log: Callable[[str], None] | None, label: str):
    """A papermill engine that says which cell is running (and its first line) as it starts, and
    remembers its notebook client (whose kernel a Ctrl-C interrupts)."""
    from unittest import mock

    from papermill.clientwrap import PapermillNotebookClient
    from papermill.engines import NBClientEngine

    class Client(PapermillNotebookClient):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            _RUNNING["client"] = self

    class ProgressEngine(NBClientEngine):
        @classmethod
        def execute_managed_notebook(cls, nb_man, kernel_name, **kwargs):
            code_cells = [i for i, c in enumerate(nb_man.nb.cells) if c.cell_type == "code"]
            original = nb_man.cell_start

            def cell_start(cell, cell_index=None, **kw):
                if log is not None and cell.cell_type == "code" and cell_index in code_cells:
                    first = next((line for line in cell.source.splitlines() if line.strip()), "")
                    position = code_cells.index(cell_index) + 1
                    log(f"{label} · cell {position}/{len(code_cells)}: {first[:70]}")
                return original(cell, cell_index, **kw)

            nb_man.cell_start = cell_start
            with mock.patch("papermill.engines.PapermillNotebookClient", Client):
                return super().execute_managed_notebook(nb_man, kernel_name, **kwargs)

    return ProgressEngine


def _interrupt_kernel() -> None:
    """Send SIGINT to the running kernel: its cell stops with KeyboardInterrupt and papermill saves
    the partly executed notebook. (The kernel runs in a session of its own, so the terminal's Ctrl-C
    reaches only this process; jupyter_client's recorded process group can be ours, so the signal
    goes to the kernel's pid alone.)"""
    import signal

    client = _RUNNING.get("client")
    process = getattr(getattr(getattr(client, "km", None), "provisioner", None), "process", None)
    if process is not None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(process.pid, signal.SIGINT)


def _print_new_lines(path: Path, offset: int, log: Callable[[str], None] | None) -> int:
    """Print the complete lines written to ``path`` since ``offset``; returns the new offset."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError:
        return offset
    end = text.rfind("\n") + 1
    if log is not None and end > offset:
        for line in text[offset:end].splitlines():
            log(line)
    return max(offset, end)


def run_notebook(
    notebook: Path, output: Path, params: dict, *, kernel: str | None = None, log: Callable[[str], None] | None = None
) -> float:
    """Execute one notebook with papermill; returns wall seconds. Raises on a failing cell, and
    KeyboardInterrupt (after the kernel stopped and the notebook was saved) on Ctrl-C."""
    import papermill
    from papermill.engines import papermill_engines
    from traitlets.config import Config

    output.parent.mkdir(parents=True, exist_ok=True)
    engine = f"kdlib-{notebook.stem}"
    papermill_engines.register(engine, _progress_engine(log, notebook.stem))
    # Headless: training writes progress lines to a file that this process prints, so they reach the
    # terminal and never the stored notebook (a kernel's own stderr is captured into the notebook).
    os.environ.setdefault("KDLIB_PROGRESS", "console")
    progress = output.parent / f".{output.stem}.progress"
    progress.write_text("")
    os.environ["KDLIB_PROGRESS_FILE"] = str(progress)
    outcome: dict[str, BaseException] = {}

    def execute() -> None:
        try:
            papermill.execute_notebook(
                str(notebook),
                str(output),
                parameters=notebook_parameters(notebook, params),
                engine_name=engine,
                kernel_name=kernel or "python3",
                cwd=str(project_root()),
                progress_bar=False,
                log_output=False,
                request_save_on_cell_execute=True,
                # IPC sockets: the kernel talks over local files, not TCP (no "without encryption" warning).
                config=Config({"KernelManager": {"transport": "ipc"}}),
            )
        except BaseException as err:  # handed to the main thread
            outcome["error"] = err
        finally:
            done.set()

    # papermill runs in a worker thread so that Ctrl-C reaches this (main) thread promptly. The wait
    # is an Event, not Thread.join: a join interrupted by Ctrl-C reports the thread as finished (3.11).
    start = time.perf_counter()
    done = threading.Event()
    threading.Thread(target=execute, name=f"papermill-{notebook.stem}", daemon=True).start()
    printed = 0
    try:
        while not done.wait(0.5):
            printed = _print_new_lines(progress, printed, log)
    except KeyboardInterrupt:
        _interrupt_kernel()
        done.wait(60)  # papermill records the interrupted cell, saves the notebook, stops the kernel
        raise
    finally:
        _RUNNING.clear()
        _print_new_lines(progress, printed, log)
        progress.unlink(missing_ok=True)
        os.environ.pop("KDLIB_PROGRESS_FILE", None)
    if "error" in outcome:
        raise outcome["error"]
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
    notebooks: list[Path], executed_dir: Path, params: dict, *, kernel: str | None = None, log=print,
    progress: bool = False,
) -> dict[str, float]:
    """Execute notebooks in order; wall seconds per notebook. Stops at the first failing cell."""
    timings: dict[str, float] = {}
    for source in notebooks:
        output = executed_dir / source.name
        log(f"running {source.stem} -> {output}")
        try:
            timings[source.stem] = run_notebook(source, output, params, kernel=kernel, log=log if progress else None)
        except KeyboardInterrupt:
            raise Interrupted(source.stem, output) from None
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


class Interrupted(RuntimeError):
    """Ctrl-C during a notebook: where the partly executed notebook is and that a rerun resumes."""

    def __init__(self, notebook: str, output: Path):
        super().__init__(
            f"Interrupted in {notebook}; the partly executed notebook is at {output}. "
            "Run the same command again to resume: training continues from its last checkpoint."
        )


def strip_local_paths(notebook: Path, *, drop_injected: bool = False) -> None:
    """Drop papermill's absolute input/output paths from a notebook meant to be committed, and
    (for notebooks/) its injected-parameters cell, so that a reader's edits to the one
    ``parameters`` cell take effect in JupyterLab."""
    import nbformat

    nb = nbformat.read(notebook, as_version=4)
    for key in ("input_path", "output_path"):
        nb.metadata.get("papermill", {}).pop(key, None)
    if drop_injected:
        nb.cells = [c for c in nb.cells if "injected-parameters" not in c.metadata.get("tags", [])]
    nbformat.write(nb, notebook)


def absolute_paths(overrides: dict[str, Any], cwd: Path) -> dict[str, Any]:
    """Relative local paths among ``overrides`` taken from ``cwd``: the notebooks run elsewhere.

    A value is a local path when it exists below ``cwd`` or starts with ``.`` or ``~``; anything
    else (``clinc_oos:plus``, ``owner/model``) is left for the Hub.
    """
    out = dict(overrides)
    for name in PATH_PARAMETERS:
        value = out.get(name)
        if isinstance(value, str) and value and not Path(value).expanduser().is_absolute():
            candidate = cwd / Path(value).expanduser()
            if candidate.exists() or value.startswith((".", "~")):
                out[name] = str(candidate.expanduser().resolve())
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--profile", default=os.environ.get("KDLIB_PROFILE", DEFAULT_PROFILE))
    parser.add_argument("--only", nargs="*", help="notebook prefixes to run, e.g. 01 02")
    parser.add_argument("-p", "--param", nargs=2, action="append", default=[], metavar=("NAME", "VALUE"))
    parser.add_argument("--help-params", action="store_true", help="list every parameter with its default")
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
    if args.help_params:
        print(parameter_help())
        return 0

    cwd = Path.cwd()
    data_env = os.environ.get("KDLIB_DATA")
    if data_env and not Path(data_env).expanduser().is_absolute():
        # Notebooks run with the project root as working directory: pass an absolute path on.
        os.environ["KDLIB_DATA"] = str((cwd / Path(data_env).expanduser()).resolve())
    try:
        overrides = absolute_paths({name: parse_cli_value(name, value) for name, value in args.param}, cwd)
        profile = str(profile_path(args.profile)) if args.profile.endswith((".yaml", ".yml")) else args.profile
        config = load_config(profile, **overrides)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if data_env and not config.data_source:
        print(f"data: $KDLIB_DATA = {os.environ['KDLIB_DATA']}")
    return execute(config, profile, overrides, args)


def execute(config: RunConfig, profile: str, overrides: dict[str, Any], args: argparse.Namespace) -> int:
    """Run the selected notebooks on a validated configuration, holding the run's lock."""
    from filelock import FileLock, Timeout

    paths = RunPaths.for_config(config)
    executed_dir = Path(args.into).resolve() if args.into else paths.notebooks_dir
    root = project_root()
    selected = [
        root / "notebooks" / f"{nb}.ipynb"
        for nb in NOTEBOOKS
        if not args.only or any(nb.startswith(p) for p in args.only)
    ]
    paths.output_dir.mkdir(parents=True, exist_ok=True)
    lock = FileLock(paths.lock_file, blocking=False)  # an OS lock: a crashed run leaves none behind
    try:
        lock.acquire()
    except Timeout:
        print(
            f"error: another run is writing into run {config.run_name!r} ({paths.lock_file} is locked). Wait for it "
            "to finish, or choose another run_name with -p run_name NAME.",
            file=sys.stderr,
        )
        return 3
    label = Path(args.profile).stem
    params = {"profile": profile, **overrides}
    try:
        timings = run_notebooks(
            selected, executed_dir, params, kernel=args.kernel,
            log=lambda msg: print(f"[{label}] {msg}", flush=True), progress=True,
        )
    except (NotebookFailed, Interrupted) as failure:
        print(f"\n{'FAILED' if isinstance(failure, NotebookFailed) else 'STOPPED'}: {failure}", file=sys.stderr)
        return 1 if isinstance(failure, NotebookFailed) else 130
    finally:
        lock.release()

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
            strip_local_paths(root / "notebooks" / f"{name}.ipynb", drop_injected=True)
        print("notebooks/ updated with the executed notebooks.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
