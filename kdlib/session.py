"""The session a notebook or script runs in (seeds, threads, device, quiet logs) and the machine facts a
figure depends on (:func:`env_fingerprint`).

torch, transformers and datasets load inside the functions that use them, so a notebook's parameter
check (:func:`kdlib.config_from_notebook`, imported with :func:`prepare_session`) runs before they load.
"""

from __future__ import annotations

import datetime as dt
import os
import platform
import subprocess
import warnings
from importlib.metadata import version
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kdlib import __version__
from kdlib.flops import CPUINFO, parse_cpuinfo

if TYPE_CHECKING:
    import torch


def library_versions() -> dict[str, str]:
    """Versions of the libraries a figure depends on."""
    return {name: version(name) for name in ("torch", "transformers", "datasets", "tokenizers", "onnxruntime")}


def cpu_model() -> str:
    """The CPU's model name (latency figures mean little without it)."""
    try:
        text = CPUINFO.read_text(errors="replace")
    except OSError:
        text = ""
    return parse_cpuinfo(text)["model_name"] or platform.processor() or platform.machine()


def git_commit(cwd: str | os.PathLike | None = None) -> str | None:
    """The short commit of the checkout that produced a figure, or None outside git."""
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=cwd or Path(__file__).resolve().parent)
    except (OSError, subprocess.SubprocessError):
        return None
    return (out.stdout.strip() or None) if out.returncode == 0 else None


def env_fingerprint(device: str | None = None) -> dict:
    """Versions, hardware and threads: recorded with every result so figures can be compared fairly."""
    import torch  # loads at first use (see the module docstring)

    versions = library_versions()
    return {
        "torch_version": versions["torch"],
        "transformers_version": versions["transformers"],
        "onnxruntime_version": versions["onnxruntime"],
        "kdlib_version": __version__,
        "git_commit": git_commit(),
        "python_version": platform.python_version(),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "device": str(pick_device(device)),
        "timestamp": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    }


def pick_device(device: str | None = None) -> torch.device:
    """The requested device, else CUDA when present, else CPU."""
    import torch  # loads at first use (see the module docstring)

    return torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))


def prepare_session(seed: int = 42, threads: int | None = None) -> dict[str, Any]:
    """Seeds everywhere, the thread count, quiet library logs and readable floats: every notebook's first
    call. Returns the facts worth showing (seed, threads actually used, device)."""
    import datasets  # these load at first use (see the module docstring)
    import pandas as pd
    import torch
    import transformers

    # Harmless on a CPU, but it would print at every training run.
    warnings.filterwarnings("ignore", message=".*pin_memory.*")
    # A warning reads "DuplicateTextWarning: ..." in a notebook, without the machine's file paths.
    warnings.formatwarning = lambda message, category, *args, **kwargs: f"{category.__name__}: {message}\n"
    if threads:
        torch.set_num_threads(int(threads))
    transformers.set_seed(seed)
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()  # download / shard-writing bars (not the Trainer's)
    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    # Four significant digits: what a reader needs, and what stays the same across CPU families.
    pd.set_option("display.float_format", "{:.4g}".format)
    # One line per row in plain text (no wrapped column blocks): a row is recognisable by its name.
    pd.set_option("display.expand_frame_repr", False)
    return {"seed": seed, "threads": torch.get_num_threads(), "device": str(pick_device())}
