"""Where udml's messages go: the console (through tqdm, so that a line never tears a progress bar) for the
command line, and the run folder's train.log for a training run. The library itself adds no console handler."""

from __future__ import annotations

import logging
import os
import sys
from datetime import datetime
from pathlib import Path

from tqdm import tqdm

from .rundir import LOG

log = logging.getLogger("udml")


class _ConsoleHandler(logging.Handler):
    """Prints through tqdm, so that a line never tears a progress bar; progress lines (``extra={"progress":
    True}``) only when no bar is drawn (not a terminal): the bar shows the same."""

    def __init__(self):
        super().__init__()
        self.bar_drawn = False

    def emit(self, record):
        if getattr(record, "progress", False) and self.bar_drawn:
            return
        try:
            tqdm.write(self.format(record), file=sys.stdout)
        except Exception:  # noqa: BLE001 - logging must not raise
            self.handleError(record)


_console = _ConsoleHandler()


def progress_bar_drawn(drawn: bool) -> None:
    """Whether a training progress bar is on screen (progress lines are then left to it)."""
    _console.bar_drawn = drawn


def log_to_console() -> None:
    """udml's messages on stdout, for the command line. A program that imports udml configures logging itself:
    the library adds no console handler of its own and leaves the root logger alone."""
    if _console not in log.handlers:
        log.addHandler(_console)
    log.setLevel(logging.INFO)


def setup_logging(run_dir: Path | None, quiet: bool = False, resume: bool = False) -> None:
    """run_dir/train.log gets every message of the run, after a line that marks where this start or resume
    begins; ``quiet``: warnings only, for the non-main processes of a torchrun job."""
    log.setLevel(logging.WARNING if quiet else logging.INFO)
    _console.setFormatter(logging.Formatter("%(message)s"))
    _console.bar_drawn = False
    for h in [h for h in log.handlers if isinstance(h, logging.FileHandler)]:  # an earlier run in this process
        log.removeHandler(h)
        h.close()
    if run_dir is not None:
        handler = logging.FileHandler(run_dir / LOG)
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
        log.addHandler(handler)
        if handler.stream.tell() > 0:  # a folder reused after a kill, or resumed
            handler.stream.write("\n")
        handler.stream.write(
            f"{datetime.now():%Y-%m-%d %H:%M:%S} ===== udml train "
            f"{'--resume' if resume else 'started'} (pid {os.getpid()}) =====\n"
        )
        handler.flush()
