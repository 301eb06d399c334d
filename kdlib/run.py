"""Run the study headless: notebooks 01 -> 02 -> 03 with papermill on one profile.

    python -m kdlib.run --profile minilm            # what `make run` does
    python -m kdlib.run --profile smoke --only 01   # one notebook
    python -m kdlib.run -p epochs 2 -p alpha 0.7    # override parameters
    python -m kdlib.run --help-params               # every parameter, its default and meaning

The parameters are validated (kdlib.config), then :func:`check_run` checks what can be known before
any work (``output_dir`` can be written, the data has at least two labels, ``keep_layers`` fits the
teacher's depth); a refusal names the parameter or file and the fix. Notebooks run with papermill's
engine ``kdlib`` (:mod:`kdlib.engine`). Relative paths given with ``-p`` or ``$KDLIB_DATA`` are taken
from the directory the command runs in. Executed notebooks go to ``<output_dir>/notebooks/<run_name>/``;
a failing cell stops the run with the notebook, cell and error named, and the partly executed notebook
stays there to inspect. A rerun resumes training from the last checkpoint of the same settings.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import sys
import threading
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout

from kdlib.config import (
    DEFAULT_PROFILE,
    OVERRIDES,
    ConfigError,
    RunConfig,
    default_keep_layers,
    kept_count,
    load_config,
    parameter_help,
    parse_cli_value,
    profile_path,
)
from kdlib.io import project_root, write_problem
from kdlib.paths import RunPaths

NOTEBOOKS = ("01_baseline_benchmark", "02_distill", "03_compare")


def notebook_parameters(notebook: Path, params: dict) -> dict:
    """What papermill injects into ``notebook``: the entries of ``params`` its ``parameters`` cell declares and,
    when it declares ``overrides``, every other entry in that one mapping, so no parameter is left out."""
    import papermill  # seconds to import: a refused command answers without it

    declared = papermill.inspect_notebook(str(notebook))
    passed = {key: value for key, value in params.items() if key in declared}
    rest = {key: value for key, value in params.items() if key not in declared}
    return {**passed, OVERRIDES: rest} if rest and OVERRIDES in declared else passed


class _CtrlC:
    """Ctrl-C while a notebook runs: the first interrupts the kernel's running cell (papermill saves the partly
    executed notebook) or, between cells, stops the run before the next one; a second stops this process.
    An interrupt that arrives after a cell ended but before it replied is lost, so without a reply within
    ``grace`` seconds the second Ctrl-C is sent for the user. Only in a main thread that handles SIGINT (a
    background process inherits it ignored)."""

    grace = 60.0

    def __init__(self) -> None:
        self.client: Any = None  # the notebook client, set by the engine's on_client
        self.requested = False
        self._previous: Any = None
        self._second: threading.Timer | None = None

    def __enter__(self) -> _CtrlC:
        main_thread = threading.current_thread() is threading.main_thread()
        if main_thread and signal.getsignal(signal.SIGINT) is signal.default_int_handler:
            self._previous = signal.signal(signal.SIGINT, self._interrupt)
        return self

    def __exit__(self, *exc: object) -> None:
        self.replied()
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)

    def _interrupt(self, signum: int, frame: object) -> None:
        self.requested = True
        signal.signal(signal.SIGINT, self._previous)
        process = getattr(getattr(getattr(self.client, "km", None), "provisioner", None), "process", None)
        if process is None:
            raise KeyboardInterrupt  # no kernel yet
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(process.pid, signal.SIGINT)  # the kernel alone: jupyter_client's process group can be ours
        self._second = threading.Timer(self.grace, os.kill, (os.getpid(), signal.SIGINT))
        self._second.daemon = True
        self._second.start()

    def replied(self, **_: object) -> None:
        """nbclient's ``on_cell_executed`` hook: the kernel answered, so the interrupt was not lost."""
        if self._second is not None:
            self._second.cancel()
            self._second = None

    def stop_if_requested(self) -> None:
        """Raise KeyboardInterrupt when a Ctrl-C came while no cell was running (an idle kernel ignores it)."""
        if self.requested:
            raise KeyboardInterrupt


def _watch_cells(client: Any, label: str, log: Callable[[str], None] | None, ctrl_c: _CtrlC,
                 before: Callable[[], None]) -> None:
    """The engine's ``on_client``: before each cell, stop after a Ctrl-C, call ``before``, log the cell's line."""
    ctrl_c.client = client
    code_cells = [i for i, c in enumerate(client.nb.cells) if c.cell_type == "code"]

    def on_cell_start(cell: Any, cell_index: int) -> None:
        ctrl_c.stop_if_requested()
        before()
        if log is not None and cell_index in code_cells:
            first = next((line for line in cell.source.splitlines() if line.strip()), "")
            log(f"{label} · cell {code_cells.index(cell_index) + 1}/{len(code_cells)}: {first[:70]}")

    client.on_cell_start = on_cell_start
    client.on_cell_executed = ctrl_c.replied


@contextlib.contextmanager
def _training_progress(path: Path, log: Callable[[str], None] | None):
    """Prints, twice a second, the progress lines training writes to ``path`` (``$KDLIB_PROGRESS_FILE``): they reach
    the terminal, not the stored notebook. Yields ``flush``, which prints the complete lines written so far."""
    os.environ.setdefault("KDLIB_PROGRESS", "console")
    path.write_text("")
    os.environ["KDLIB_PROGRESS_FILE"] = str(path)
    stop, lock = threading.Event(), threading.Lock()
    offset = 0

    def flush() -> None:
        nonlocal offset
        with lock:
            try:
                text = path.read_text(encoding="utf-8")
            except OSError:
                return
            end = text.rfind("\n") + 1
            if log is not None:
                for line in text[offset:end].splitlines():
                    log(line)
            offset = max(offset, end)

    def tail() -> None:
        while not stop.wait(0.5):
            flush()

    tailer = threading.Thread(target=tail, name=f"progress-{path.stem}", daemon=True)
    if log is not None:
        tailer.start()
    try:
        yield flush
    finally:
        stop.set()
        if tailer.is_alive():
            tailer.join()
        flush()
        path.unlink(missing_ok=True)
        os.environ.pop("KDLIB_PROGRESS_FILE", None)


def run_notebook(notebook: Path, output: Path, params: dict, *, kernel: str | None = None,
                 log: Callable[[str], None] | None = None) -> float:
    """Execute one notebook with papermill and the ``kdlib`` engine; returns wall seconds. Raises on a failing
    cell, and KeyboardInterrupt (after the kernel stopped and the notebook was saved) on Ctrl-C."""
    # papermill's import takes seconds: a refused command and --help-params answer without it.
    import papermill
    from traitlets.config import Config

    from kdlib.engine import ENGINE_NAME

    output.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with _CtrlC() as ctrl_c, _training_progress(output.parent / f".{output.stem}.progress", log) as flush:
        try:
            papermill.execute_notebook(
                str(notebook), str(output), parameters=notebook_parameters(notebook, params), engine_name=ENGINE_NAME,
                kernel_name=kernel or "python3", cwd=str(project_root()), progress_bar=False, log_output=False,
                request_save_on_cell_execute=True,
                # IPC sockets: the kernel talks over local files, not TCP (no "without encryption" warning).
                config=Config({"KernelManager": {"transport": "ipc"}}),
                on_client=lambda client: _watch_cells(client, notebook.stem, log, ctrl_c, flush),
            )
        except papermill.PapermillExecutionError:
            if ctrl_c.requested:
                raise KeyboardInterrupt from None  # the interrupted cell, recorded in the saved notebook
            raise
        ctrl_c.stop_if_requested()
    return time.perf_counter() - start


class NotebookFailed(RuntimeError):
    """A cell of a notebook failed; names the notebook, the cell and the error."""

    def __init__(self, notebook: str, cell, ename: str, evalue: str, output: Path):
        self.notebook, self.cell, self.ename, self.evalue, self.output = notebook, cell, ename, evalue, output
        super().__init__(f"{notebook}, cell [{cell}]: {ename}: {evalue}\n"
                         f"The partly executed notebook is kept at {output} for inspection.")


class Interrupted(RuntimeError):
    """Ctrl-C during a notebook: where the partly executed notebook is and that a rerun resumes."""

    def __init__(self, notebook: str, output: Path):
        super().__init__(f"Interrupted in {notebook}; the partly executed notebook is at {output}. "
                         "Run the same command again to resume: training continues from its last checkpoint.")


def run_notebooks(notebooks: list[Path], executed_dir: Path, params: dict, *, kernel: str | None = None, log=print,
                  progress: bool = False) -> dict[str, float]:
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
            ename, evalue = getattr(err, "ename", type(err).__name__), getattr(err, "evalue", str(err))
            raise NotebookFailed(source.stem, getattr(err, "exec_count", None), ename, evalue, output) from err
        log(f"{source.stem}: {timings[source.stem]:.1f} s")
    return timings


def strip_local_paths(notebook: Path, *, drop_injected: bool = False) -> None:
    """Drop papermill's local paths from a notebook to commit and, for notebooks/, the injected-parameters cell (so
    edits to the ``parameters`` cell take effect), numbering the executed cells 1, 2, 3 ... as a reader sees them."""
    import nbformat

    nb = nbformat.read(notebook, as_version=4)
    for key in ("input_path", "output_path"):
        nb.metadata.get("papermill", {}).pop(key, None)
    if drop_injected:
        nb.cells = [c for c in nb.cells if "injected-parameters" not in c.metadata.get("tags", [])]
        executed = [c for c in nb.cells if c.cell_type == "code" and c.get("execution_count") is not None]
        for count, cell in enumerate(executed, start=1):
            cell.execution_count = count
            for output in (o for o in cell.get("outputs", []) if "execution_count" in o):
                output["execution_count"] = count
    nbformat.write(nb, notebook)


def absolute_paths(overrides: dict[str, Any], cwd: Path) -> dict[str, Any]:
    """Relative local paths among ``overrides`` taken from ``cwd``, since the notebooks run elsewhere. A value is
    local when it exists below ``cwd`` or starts with ``.`` or ``~``; anything else (``owner/model``) is the Hub's."""
    out = dict(overrides)
    for name in ("data_source", "teacher", "teacher_model", "student", "search_storage"):
        value = out.get(name)
        if isinstance(value, str) and value and not (path := Path(value).expanduser()).is_absolute():
            if (cwd / path).exists() or value.startswith((".", "~")):
                out[name] = str((cwd / path).resolve())
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", default=os.environ.get("KDLIB_PROFILE", DEFAULT_PROFILE))
    parser.add_argument("--only", nargs="*", help="notebook prefixes to run, e.g. 01 02")
    parser.add_argument("-p", "--param", nargs=2, action="append", default=[], metavar=("NAME", "VALUE"))
    parser.add_argument("--help-params", action="store_true", help="list every parameter with its default")
    parser.add_argument("--kernel", help="Jupyter kernel name (default: python3)")
    parser.add_argument("--into", help="folder for the executed notebooks (default: <output_dir>/notebooks/<run_name>)")
    parser.add_argument("--update-notebooks", action="store_true", help="copy the executed notebooks over notebooks/ "
                        "(to commit a real run's outputs as course material)")
    args = parser.parse_args(argv)
    profile = str(profile_path(args.profile)) if args.profile.endswith((".yaml", ".yml")) else args.profile
    try:
        if args.help_params:
            print(parameter_help(profile))
            return 0
        overrides = absolute_paths({name: parse_cli_value(name, value) for name, value in args.param}, Path.cwd())
        config = load_config(profile, **overrides)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    data_env = os.environ.get("KDLIB_DATA")
    if data_env and not Path(data_env).expanduser().is_absolute():
        # Notebooks run with the project root as working directory: pass an absolute path on.
        os.environ["KDLIB_DATA"] = str((Path.cwd() / Path(data_env).expanduser()).resolve())
    if data_env and not config.data_source:
        print(f"data: $KDLIB_DATA = {os.environ['KDLIB_DATA']}")
    return execute(config, profile, overrides, args)


def _check_writable(folder: Path, *, param: str, given: object) -> None:
    """Raise :class:`ConfigError` unless a probe folder can be made (and is removed at once) in ``folder`` or,
    when it does not exist yet, its nearest existing parent."""
    existing, problem = write_problem(folder)
    if problem:
        raise ConfigError(f"{param} = {given!r}: cannot write into {existing} ({problem}). Choose a folder you can "
                          f"write to with -p {param} PATH.")


def check_run(config: RunConfig, notebooks: Sequence[str] = NOTEBOOKS) -> None:
    """Check what the ``notebooks`` about to run need, before any work and writing nothing: ``output_dir`` can be
    written, the teacher has the layers ``keep_layers`` names, ``heads_keep`` leaves a head, the data has two labels
    or more. Raises ConfigError, DataError or ModelReferenceError naming the parameter or file and the fix."""
    _check_writable(RunPaths.for_config(config).output_dir, param="output_dir", given=config.output_dir)
    distils = any(name.startswith("02") for name in notebooks)
    # 02 distils from teacher_model, else from the copy of `teacher` that 01 fine-tunes (the same shape).
    param = "teacher_model" if config.teacher_model else "teacher"
    if distils and config.student_init == "teacher_layers" and config.keep_layers is not None:
        # kdlib.models imports torch and transformers (seconds): only a run that names its layers waits for them.
        from kdlib.models import reference_num_layers

        teacher, keep = getattr(config, param), config.keep_layers
        depth = reference_num_layers(teacher, param=param)
        if isinstance(keep, int) and keep > depth:
            raise ConfigError(f"keep_layers = {keep}: the teacher ({param} = {teacher!r}) has {depth} layers, so a "
                              f"student keeps at most {depth}. Choose a count from 1 to {depth}, or leave keep_layers "
                              "unset (half).")
        if isinstance(keep, list) and (missing := [i for i in keep if i >= depth]):
            raise ConfigError(f"keep_layers = {keep}: the teacher ({param} = {teacher!r}) has {depth} layers, numbered "
                              f"0 to {depth - 1}, so {missing} is not one of them. Choose indices below {depth} (e.g. "
                              f"-p keep_layers \"{default_keep_layers(depth)}\"), a count, or leave keep_layers unset.")
    if distils and config.heads_keep < 1:
        from kdlib.models import reference_num_heads  # torch and transformers: only a run that prunes waits

        # the heads of the model the student starts from: the teacher's layers, else the `student` config
        source = param if config.student_init == "teacher_layers" else "student"
        heads = reference_num_heads(getattr(config, source), param=source)
        try:
            kept_count(config.heads_keep, heads, "heads_keep")
        except ValueError:
            raise ConfigError(f"heads_keep = {config.heads_keep}: the student's layers have {heads} attention heads "
                              f"({source} = {getattr(config, source)!r}), so this keeps none. Use -p heads_keep "
                              f"{1 / heads:.3g} or more.") from None
    if any(name.startswith(("01", "02")) for name in notebooks):
        with warnings.catch_warnings(action="ignore"):  # a warning about the data (duplicates) is the notebook's
            config.load_data(base_dir=project_root())  # as the notebooks load it: DataError names the file and fix


def execute(config: RunConfig, profile: str, overrides: dict[str, Any], args: argparse.Namespace) -> int:
    """Run the selected notebooks on a validated configuration, holding the run's lock."""
    # kdlib.data imports datasets (a second or more): a command refused for its parameters answers without it
    from kdlib.data import DataError

    paths = RunPaths.for_config(config)
    executed_dir = Path(args.into).resolve() if args.into else paths.notebooks_dir
    notebooks_dir = project_root() / "notebooks"
    selected = [notebooks_dir / f"{nb}.ipynb" for nb in NOTEBOOKS if not args.only or nb.startswith(tuple(args.only))]
    try:
        check_run(config, [path.stem for path in selected])
    except (ConfigError, DataError, OSError) as err:  # OSError: ModelReferenceError, an unreadable file
        print(f"error: {err}", file=sys.stderr)
        return 2
    paths.output_dir.mkdir(parents=True, exist_ok=True)
    label = Path(args.profile).stem
    try:
        with FileLock(paths.lock_file, blocking=False):  # an OS lock: a crashed run leaves none behind
            timings = run_notebooks(selected, executed_dir, {"profile": profile, **overrides}, kernel=args.kernel,
                                    log=lambda msg: print(f"[{label}] {msg}", flush=True), progress=True)
    except Timeout:
        print(f"error: another run is writing into run {config.run_name!r} ({paths.lock_file} is locked). Wait for "
              "it to finish, or choose another run_name with -p run_name NAME.", file=sys.stderr)
        return 3
    except (NotebookFailed, Interrupted) as failure:
        print(f"\n{'FAILED' if isinstance(failure, NotebookFailed) else 'STOPPED'}: {failure}", file=sys.stderr)
        return 1 if isinstance(failure, NotebookFailed) else 130
    print("\nWall time per notebook:")
    for name, seconds in timings.items():
        print(f"  {name:<24} {seconds / 60:6.1f} min ({seconds:.0f} s)")
    print(f"  {'total':<24} {sum(timings.values()) / 60:6.1f} min")
    for name in timings:
        if args.into:
            strip_local_paths(executed_dir / f"{name}.ipynb")
        if args.update_notebooks:
            shutil.copyfile(executed_dir / f"{name}.ipynb", notebooks_dir / f"{name}.ipynb")
            strip_local_paths(notebooks_dir / f"{name}.ipynb", drop_injected=True)
    if args.update_notebooks:
        print("notebooks/ updated with the executed notebooks.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
