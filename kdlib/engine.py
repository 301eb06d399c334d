"""The papermill engine the headless runner executes notebooks with.

papermill's own ``NBClientEngine`` builds its ``PapermillNotebookClient`` inside
``execute_managed_notebook`` and keeps it to itself. :class:`KdlibEngine` builds the client the same way
and first hands it to the ``on_client`` engine argument, so the runner can set nbclient's
``on_cell_start`` hook (the "which cell is running" lines) and reach the kernel that a Ctrl-C interrupts.
Without ``on_client`` it is papermill's engine. It is registered as ``kdlib`` in papermill's engine
registry when this module is imported, and through the ``papermill.engine`` entry point in
``pyproject.toml``, so ``papermill --engine kdlib in.ipynb out.ipynb`` uses it too.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from papermill.clientwrap import PapermillNotebookClient
from papermill.engines import NBClientEngine, NotebookExecutionManager, papermill_engines
from papermill.log import logger
from papermill.utils import merge_kwargs, remove_args

ENGINE_NAME = "kdlib"


class KdlibEngine(NBClientEngine):
    """papermill's nbclient engine with an ``on_client`` engine argument: a callable that receives the
    notebook client before its kernel starts."""

    @classmethod
    def execute_managed_notebook(
        cls,
        nb_man: NotebookExecutionManager,
        kernel_name: str,
        log_output: bool = False,
        stdout_file: Any = None,
        stderr_file: Any = None,
        start_timeout: int = 60,
        execution_timeout: int | None = None,
        on_client: Callable[[PapermillNotebookClient], None] | None = None,
        **kwargs: Any,
    ) -> Any:
        """Execute the parameterised notebook as ``NBClientEngine`` does (the same client arguments),
        calling ``on_client(client)`` first."""
        kwargs = remove_args(["input_path"], **kwargs)  # unused downstream
        safe_kwargs = remove_args(["timeout", "startup_timeout"], **kwargs)  # named differently downstream
        final_kwargs = merge_kwargs(
            safe_kwargs,
            timeout=execution_timeout if execution_timeout else kwargs.get("timeout"),
            startup_timeout=start_timeout,
            kernel_name=kernel_name,
            log=logger,
            log_output=log_output,
            stdout_file=stdout_file,
            stderr_file=stderr_file,
        )
        client = PapermillNotebookClient(nb_man, **final_kwargs)
        if on_client is not None:
            on_client(client)
        return client.execute()


papermill_engines.register(ENGINE_NAME, KdlibEngine)
