"""The run folder: its file names, the one atomic-write routine, metrics.jsonl, and the checks that need no PyTorch."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import IO, Callable

from .errors import InputError, MissingPath, PathProblem

CONFIG = "config.yaml"  # the resolved configuration of the run
CHECKPOINT = "checkpoint.pt"  # resume state, after the last finished clustering round
MODEL = "model.pt"  # the final network for inference
METRICS = "metrics.jsonl"  # one JSON record per evaluation, clustering and training round
LOG = "train.log"  # everything that was printed


class RunDir:
    """Paths of one run folder."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def __truediv__(self, name: str) -> Path:
        return self.path / name

    def __str__(self) -> str:
        return str(self.path)

    config = property(lambda self: self.path / CONFIG)
    checkpoint = property(lambda self: self.path / CHECKPOINT)
    model = property(lambda self: self.path / MODEL)
    metrics = property(lambda self: self.path / METRICS)
    log = property(lambda self: self.path / LOG)

    def check_resumable(self) -> None:
        """A clear error when ``--resume`` is given something that is not a run folder with a checkpoint."""
        if not self.path.exists():
            raise MissingPath(
                f"--resume {self.path}: the folder does not exist; give the run folder of an "
                "earlier run (by default under runs/)"
            )
        if not self.path.is_dir():
            raise PathProblem(
                f"--resume {self.path}: not a folder; give the run folder of an earlier run, "
                f"the one holding {CHECKPOINT} and {CONFIG}"
            )
        if not self.checkpoint.exists():
            raise MissingPath(
                f"--resume {self.path}: no {CHECKPOINT} there; give the run folder of a run "
                "that wrote at least one checkpoint (one is written after each clustering "
                "round)"
            )


def default_run_name(dataset: str, backbone: str) -> str:
    """The run folder's name when none is given: data set, backbone and the local time."""
    return f"{dataset}-{backbone.replace(':', '_')}-{datetime.now():%Y%m%d-%H%M%S}"


def new_run_dir(out_dir: str | Path, run_name: str | None, default_name: str) -> Path:
    """A new run folder ``out_dir/run_name`` (or ``default_name``); refuses one that holds a checkpoint."""
    run_dir = Path(out_dir) / (run_name or default_name)
    if (run_dir / CHECKPOINT).exists():
        raise PathProblem(
            f"run folder {run_dir} already holds a checkpoint; continue it with "
            f"--resume {run_dir}, or choose another run_name"
        )
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


def check_same_configuration(now: dict, saved: dict, path: str | Path, ignore=()) -> None:
    """A resumed run must have the configuration its checkpoint was written with, except the keys ``ignore``
    (config.RUNTIME_FIELDS: those that do not change the result)."""
    diff = [
        f"{k}: {saved.get(k)!r} in the checkpoint, {now[k]!r} now"
        for k in now
        if k not in ignore and saved.get(k) != now[k]
    ]
    if diff:
        raise InputError(
            f"checkpoint {path} was written with a different configuration ("
            + "; ".join(diff)
            + "). Resume with the run folder's own config.yaml "
            "(udml train --resume RUN_DIR) or start a new run."
        )


def atomic_write(
    path: str | Path, write: Callable[[IO[bytes]], None], what: str = "file", durable: bool = True
) -> None:
    """Write a file so that ``path`` holds either the old or the new content, never a torn one: ``write(f)``
    fills a temporary file in the same folder, which is flushed to disk and renamed over ``path``. The one
    atomic-write routine of the package. ``durable=False`` (caches that can be remade) skips the fsyncs.

    On failure (full disk, unwritable folder) the temporary file is removed, the previous file at ``path`` is
    left as it was, and an OSError with the same errno says so."""
    path = Path(path)
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            if durable:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        if tmp is not None:
            try:
                os.unlink(tmp)
            except OSError:
                pass
        if isinstance(e, OSError):
            then = ", then continue with --resume" if what == "checkpoint" else ""
            raise PathProblem(
                e.errno,
                f"could not write {what} {path} ({e.strerror}); the previous {what} there is "
                f"intact. Free disk space or make the run folder writable{then}",
            ) from e
        raise
    if not durable:
        return
    fsync_dir(path.parent)  # make the rename itself durable


def fsync_dir(path: str | Path) -> None:
    """Flush a folder's entries (a rename into it) to disk, where the system allows: folders that cannot be opened
    (Windows) or synced (some file systems) are left to the system; the rename itself has already happened."""
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def remove_temporaries(path: str | Path) -> list[Path]:
    """Delete the temporary files that atomic_write left next to ``path`` when its process was killed."""
    path = Path(path)
    stale = list(path.parent.glob(f".{path.name}.*.tmp"))
    for tmp in stale:
        tmp.unlink(missing_ok=True)
    return stale


class MetricsFile:
    """Append-only JSON lines; on resume, lines of rounds that the checkpoint does not hold are dropped.
    With ``path=None`` (the non-main processes of a torchrun job) nothing is written. With ``started``, each record
    also says how many seconds after that time it was written (``elapsed_s``; a resumed run counts from its
    resumption)."""

    def __init__(self, path: Path | None, started: float | None = None):
        self.path = path
        self.started = started  # time.time() when this process started the run: records get elapsed_s

    def truncate_after(self, rounds_done: int) -> None:
        """Keep the records of rounds 1..rounds_done (and the start); drop later ones, the final evaluation
        (written after the last checkpoint) and a line torn by a kill in mid-write."""
        if self.path is None or not self.path.exists():
            return
        keep = []
        for line in self.path.read_text().splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if record.get("round", 0) <= rounds_done and not record.get("final"):
                keep.append(line)
        text = "".join(line + "\n" for line in keep).encode()
        atomic_write(self.path, lambda f: f.write(text), what="metrics file")

    def append(self, **record) -> None:
        if self.path is None:
            return
        if self.started is not None:
            record["elapsed_s"] = round(time.time() - self.started, 1)
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")

    def read(self) -> list[dict]:
        if self.path is None or not self.path.exists():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]
