"""Library chatter (progress bars, warnings, INFO logs) would bury the tool's own display: it goes to the study
folder's `libraries.log` instead, or stays on the terminal with `--verbose`. The tool's own lines go to stdout."""

from __future__ import annotations

import logging
import os
import sys
import warnings
from pathlib import Path
from typing import IO

from rich.console import Console
from rich.file_proxy import FileProxy

LIBRARY_LOG = "libraries.log"  # in the study folder: what third-party code wrote to stderr during a command


class _Verbosity:
    """Set once per command line by the global `--verbose` flag (search/cli.py)."""

    verbose = False
    saved_stderr: int | None = None  # the terminal's fd 2 while it is routed to a log
    saved_sys_stderr: IO[str] | None = None


STATE = _Verbosity()


def set_verbose(verbose: bool) -> None:
    STATE.verbose = verbose
    if verbose:  # undo the import-time silencing of search/__init__.py (heretic is imported later)
        logging.getLogger("bitsandbytes").setLevel(logging.NOTSET)


def quiet_libraries(log: Path | None = None) -> None:
    """Silence the libraries' progress bars and INFO logs; with `log`, send file descriptor 2 (warnings, log records,
    progress bars, C libraries' prints) there until `restore_stderr` (the CLI calls it when the command ends, before
    a traceback is printed). Nothing under `--verbose`."""
    if STATE.verbose:
        return
    if log is not None:
        _stderr_to_log(log)
    os.environ.setdefault("TQDM_DISABLE", "1")
    os.environ.setdefault("LLM_COMPRESSOR_LOG_LEVEL", "ERROR")  # read when llmcompressor is first imported
    # MLflow prints a "View run ... at" link for every run ended on a tracking server: two lines per trial.
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    # ...and INFO lines when it creates or migrates a store ("Creating initial MLflow database tables...")
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    logging.getLogger("mlflow").setLevel(logging.WARNING)  # in case MLflow was imported already
    import optuna
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)


def _stderr_to_log(log: Path) -> None:
    if STATE.saved_stderr is not None:  # already routed (a command calls this once, the runner again)
        return
    log.parent.mkdir(parents=True, exist_ok=True)
    sys.stderr.flush()
    STATE.saved_stderr, STATE.saved_sys_stderr = os.dup(2), sys.stderr
    with log.open("a") as f:
        os.dup2(f.fileno(), 2)
    sys.stderr = _Unproxied(sys.stderr)


class _Unproxied(FileProxy):
    """sys.stderr while it is routed. The study's live displays (progress bar, status spinners) would wrap sys.stderr
    to print its lines above themselves, on the terminal, unless it is a rich FileProxy already: this one is, and
    passes every write on to fd 2, the log."""

    def __init__(self, file: IO[str]) -> None:
        super().__init__(Console(file=file), file)

    def write(self, text: str) -> int:
        return self.rich_proxied_file.write(text)

    def flush(self) -> None:
        self.rich_proxied_file.flush()


def restore_stderr() -> None:
    """fd 2 back to the terminal, if a command routed it to a log."""
    if STATE.saved_stderr is None:
        return
    sys.stderr.flush()
    sys.stderr = STATE.saved_sys_stderr or sys.__stderr__
    os.dup2(STATE.saved_stderr, 2)
    os.close(STATE.saved_stderr)
    STATE.saved_stderr = STATE.saved_sys_stderr = None
