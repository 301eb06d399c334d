"""The papermill engine the headless runner executes notebooks with: papermill's ``NBClientEngine``, which keeps
its notebook client to itself, plus an ``on_client`` argument that receives the client before its kernel starts,
so the runner can hook cell starts and reach the kernel a Ctrl-C interrupts. Registered as ``kdlib`` on import
and through the ``papermill.engine`` entry point (``papermill --engine kdlib in.ipynb out.ipynb``).
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
    """papermill's nbclient engine that first hands its notebook client to ``on_client``."""

    @classmethod
    def execute_managed_notebook(
        cls, nb_man: NotebookExecutionManager, kernel_name: str, log_output: bool = False, stdout_file: Any = None,
        stderr_file: Any = None, start_timeout: int = 60, execution_timeout: int | None = None,
        on_client: Callable[[PapermillNotebookClient], None] | None = None, **kwargs: Any,
    ) -> Any:
        """Execute the notebook as ``NBClientEngine`` does, calling ``on_client(client)`` first."""
        kwargs = remove_args(["input_path"], **kwargs)  # unused downstream
        safe_kwargs = remove_args(["timeout", "startup_timeout"], **kwargs)  # named differently downstream
        final_kwargs = merge_kwargs(
            safe_kwargs, timeout=execution_timeout if execution_timeout else kwargs.get("timeout"),
            startup_timeout=start_timeout, kernel_name=kernel_name, log=logger, log_output=log_output,
            stdout_file=stdout_file, stderr_file=stderr_file,
        )
        client = PapermillNotebookClient(nb_man, **final_kwargs)
        if on_client is not None:
            on_client(client)
        return client.execute()


papermill_engines.register(ENGINE_NAME, KdlibEngine)
