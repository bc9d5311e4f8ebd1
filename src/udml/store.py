"""Decoded images in a compact uint8 store on disk (``cache_images: disk``), for collections larger than memory.

A store is one folder under the store directory (``store_dir``; by default ``$XDG_CACHE_HOME/udml/stores``,
else ``~/.cache/udml/stores``):

- ``pixels.u8``: the RGB bytes (height x width x 3) of every readable image, back to back, each decoded and
  shrunk to ``short_side`` exactly as the in-memory cache does (``images.decode_one``): the same pixels.
- ``index.npy``: int64 (N, 3), byte offset, height and width of each image of the list; height 0: unreadable.
- ``manifest.json``: format, short side, data set name, every file's path, size and mtime_ns, the unreadable
  files with their errors, the byte count.

The folder's name is ``<data set>-<folder hash>-<short side>px-<key>``, where the key hashes the format, the
short side and every file's absolute path, size and mtime_ns: an unchanged collection reuses its store (no
decoding), and a changed, added or removed file gives a new key, hence a new store, built in place of the
superseded one (same data set, folder and short side), which is removed.

Building decodes with threads (Pillow releases the GIL) a bounded window of images at a time and appends them to
``pixels.u8``: memory during a build is a few dozen images, whatever N. It writes into a temporary folder that
is renamed into place at the end, so a killed build never leaves a store that a later run would trust; builds of
one data set, folder and short side take a lock file first (processes started together, torchrun's included,
build once: the others wait and then open the result), and the lock holder removes temporaries of killed builds.
Without working file locks the atomic rename still makes concurrent builds safe: the first one renamed wins.

Images are read with ``os.pread`` from a file descriptor opened once per process, not memory-mapped: pages of a
mapping that a pass has touched count in the process's resident set (all of the store after an embedding pass
of a large collection), while pread copies each image out of the page cache, which the kernel shrinks as it
needs. A store pickles (for DataLoader workers) as its path and index only.

This module imports no torch, so that ``udml train`` can check the store directory before loading it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import secrets
import shutil
import socket
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from . import images
from .errors import InputError, PathProblem, StoreError
from .rundir import fsync_dir

try:
    import fcntl
except ImportError:  # not on Windows: builds are then made safe by the atomic rename alone
    fcntl = None

log = logging.getLogger("udml")

FORMAT = 1
PIXELS, INDEX, MANIFEST = "pixels.u8", "index.npy", "manifest.json"
BUILD_PREFIX, DELETE_PREFIX = ".build-", ".delete-"
STALE_SECONDS = 24 * 3600  # without locks, a temporary folder untouched this long belongs to a dead build


def default_store_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "udml" / "stores"


def resolve_store_dir(store_dir: str | os.PathLike | None) -> Path:
    return Path(store_dir).expanduser() if store_dir else default_store_dir()


def check_store_dir(store_dir: str | os.PathLike | None, key: str = "store_dir") -> Path:
    """The store directory, created if needed; a clear error when it cannot be written."""
    path = resolve_store_dir(store_dir)
    hint = (
        f"set {key} to a writable folder with room for the decoded images (about height x width x 3 bytes "
        "per image at the training resolution)"
    )
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise PathProblem(f"{key}: cannot create the image store directory {path} ({e}); {hint}") from None
    if not path.is_dir() or not os.access(path, os.W_OK | os.X_OK):
        raise PathProblem(f"{key}: the image store directory {path} is not a writable folder; {hint}")
    return path


def _stat(path: str) -> tuple[int, int]:
    try:
        st = os.stat(path)
        return st.st_size, st.st_mtime_ns
    except OSError:  # a missing file: it is reported as unreadable when decoded
        return -1, -1


def describe_files(items: list) -> list[list]:
    """[absolute path, size, mtime_ns] of every file (-1, -1 for one that cannot be stat'ed)."""
    paths = [os.path.abspath(os.fspath(p)) for p in items]
    if len(paths) < 2000:
        return [[p, *_stat(p)] for p in paths]
    with ThreadPoolExecutor(8) as pool:  # a network file system answers stat calls in parallel
        return [[p, *s] for p, s in zip(paths, pool.map(_stat, paths, chunksize=256))]


def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, separators=(",", ":")).encode()).hexdigest()


def store_names(name: str, files: list[list], short_side: int | None) -> tuple[str, str]:
    """(prefix, folder name): the prefix names the data set, its folder and the short side; the folder name adds
    the key of the file list, so that any change to a file gives another folder."""
    slug = re.sub(r"[^A-Za-z0-9]+", "_", name).strip("_") or "images"
    dirs = sorted({os.path.dirname(f[0]) for f in files})
    root = os.path.commonpath(dirs) if dirs else ""
    prefix = f"{slug}-{_digest(root)[:8]}-{short_side or 'full'}px"
    return prefix, f"{prefix}-{_digest([FORMAT, short_side, files])[:20]}"


class ImageStore:
    """Read access to one built store: ``array(i)`` is image i of the list the store was built from."""

    def __init__(self, path: str | os.PathLike):
        self._fd = None
        self.path = Path(path)
        try:
            manifest = json.loads((self.path / MANIFEST).read_text())
            self.index = np.load(self.path / INDEX, allow_pickle=False)
            size = os.path.getsize(self.path / PIXELS)
        except (OSError, ValueError) as e:
            raise StoreError(f"image store {self.path} is incomplete or damaged ({type(e).__name__}: {e})") from None
        if manifest.get("format") != FORMAT:
            raise StoreError(f"image store {self.path} has format {manifest.get('format')}, not {FORMAT}")
        if size != manifest.get("bytes") or self.index.shape != (manifest.get("count"), 3):
            raise StoreError(f"image store {self.path}: {PIXELS} or {INDEX} does not match {MANIFEST}")
        self.short_side = manifest["short_side"]
        self.name = manifest["name"]
        self.nbytes = size
        self.unreadable = [(int(i), item, err) for i, item, err in manifest["unreadable"]]
        self._file()  # opened now, so that forked DataLoader workers inherit it

    def __len__(self) -> int:
        return len(self.index)

    def _file(self) -> int:
        if self._fd is None:
            self._fd = os.open(self.path / PIXELS, os.O_RDONLY)
        return self._fd

    def array(self, i: int) -> np.ndarray:
        """Image i as a read-only (height, width, 3) uint8 array."""
        offset, h, w = (int(v) for v in self.index[i])
        if h == 0:
            raise InputError(f"image {i} of the store {self.path} could not be read when the store was built")
        n = h * w * 3
        try:
            buf = os.pread(self._file(), n, offset)
        except OSError as e:
            raise PathProblem(
                f"cannot read image {i} from the image store {self.path} ({e}); delete that folder to rebuild it"
            ) from None
        if len(buf) != n:
            raise PathProblem(
                f"image store {self.path}: {PIXELS} is shorter than its index; delete that folder to rebuild it"
            )
        return np.frombuffer(buf, dtype=np.uint8).reshape(h, w, 3)

    def close(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = None

    def __del__(self):
        self.close()

    def __getstate__(self):  # a worker started by spawn (not fork) opens the file itself
        state = dict(self.__dict__)
        state["_fd"] = None
        return state


def _try_open(path: Path, warn: bool) -> ImageStore | None:
    if not (path / MANIFEST).is_file():
        return None
    try:
        return ImageStore(path)
    except StoreError as e:
        if warn:
            log.warning("%s; it is rebuilt", e)
        return None


@contextlib.contextmanager
def _locked(path: Path, what: str):
    """An exclusive lock on the file ``path`` (blocking); yields whether the lock is held (False where file
    locks do not work: the caller then relies on atomic renames alone)."""
    if fcntl is None:
        yield False
        return
    try:
        f = open(path, "a+b")  # noqa: SIM115 - closed below; closing releases the lock
    except OSError:
        yield False
        return
    try:
        try:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                log.info("waiting for another process that is building the image store of %s", what)
                fcntl.flock(f, fcntl.LOCK_EX)
            locked = True
        except OSError:  # a file system without flock
            locked = False
        yield locked
    finally:
        f.close()


def _remove(path: Path) -> None:
    """Remove a folder so that no reader ever sees half of it: renamed aside first, then deleted."""
    aside = path.parent / f"{DELETE_PREFIX}{path.name}-{os.getpid()}"
    try:
        os.rename(path, aside)
    except OSError:
        return
    shutil.rmtree(aside, ignore_errors=True)


def _tidy(root: Path, prefix: str, keep: str, locked: bool) -> None:
    """Temporaries of killed builds and removals, and stores superseded by ``keep`` (same prefix, files changed).
    Holding the prefix's lock, every temporary of the prefix is a dead one; without it only old ones are."""
    now = time.time()
    for entry in os.scandir(root):
        name = entry.name
        temporary = name.startswith((f"{BUILD_PREFIX}{prefix}-", f"{DELETE_PREFIX}{prefix}-"))
        if temporary:
            try:
                stale = locked or now - entry.stat(follow_symlinks=False).st_mtime > STALE_SECONDS
            except OSError:
                continue
            if stale:
                shutil.rmtree(entry.path, ignore_errors=True)
        elif locked and name.startswith(f"{prefix}-") and name != keep and entry.is_dir(follow_symlinks=False):
            log.info("removing the image store %s: its files have changed since it was built", entry.path)
            _remove(Path(entry.path))


def _decoded_in_order(items: list, short_side: int | None, workers: int):
    """(i, array or None, error or None) for every item in order, decoded by ``workers`` threads with at most
    ``4 * workers`` images decoded ahead of the consumer."""

    def load(i):
        try:
            return i, images.decode_one(items[i], short_side), None
        except Exception as e:  # noqa: BLE001 - any decoder failure means: skip and report this file
            return i, None, f"{type(e).__name__}: {e}"

    with ThreadPoolExecutor(workers) as pool:
        pending = deque()
        for i in range(len(items)):
            pending.append(pool.submit(load, i))
            if len(pending) >= 4 * workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def build(items: list, files: list[list], short_side: int | None, path: Path, name: str, workers: int | None = None):
    """Decode ``items`` into a new store at ``path``, through a temporary folder renamed into place at the end.
    Returns False when another build's store was renamed there first (then that one is used)."""
    workers = workers or min(16, os.cpu_count() or 1)
    tmp = path.parent / f"{BUILD_PREFIX}{path.name}-{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(4)}"
    tmp.mkdir()
    t0 = last = time.time()
    log.info("building the image store of %s (%d images, short side %s) in %s", name, len(items), short_side, path)
    done = offset = 0
    try:
        index = np.zeros((len(items), 3), dtype=np.int64)
        bad = []
        with open(tmp / PIXELS, "wb") as f:
            for i, arr, err in _decoded_in_order(items, short_side, workers):
                done = i + 1
                if arr is None:
                    bad.append([i, str(items[i]), err])
                    continue
                arr = np.ascontiguousarray(arr, dtype=np.uint8)
                f.write(memoryview(arr).cast("B"))
                index[i] = (offset, arr.shape[0], arr.shape[1])
                offset += arr.nbytes
                if time.time() - last > 30:
                    last = time.time()
                    log.info(
                        "  image store of %s: %d / %d images, %.1f GB, %.0f s",
                        name,
                        i + 1,
                        len(items),
                        offset / 1e9,
                        last - t0,
                    )
            f.flush()
            os.fsync(f.fileno())
        np.save(tmp / INDEX, index)
        manifest = {
            "format": FORMAT,
            "name": name,
            "short_side": short_side,
            "count": len(items),
            "bytes": offset,
            "build_seconds": round(time.time() - t0, 1),
            "unreadable": bad,
            "files": files,
        }
        with open(tmp / MANIFEST, "w") as f:
            json.dump(manifest, f, separators=(",", ":"))
            f.flush()
            os.fsync(f.fileno())
        try:
            os.rename(tmp, path)
        except OSError:
            if (path / MANIFEST).is_file():  # another build renamed its store there first
                shutil.rmtree(tmp, ignore_errors=True)
                return False
            raise
        fsync_dir(path.parent)
    except OSError as e:  # decoding errors are caught per image: this is the store's own disk (full, read-only)
        shutil.rmtree(tmp, ignore_errors=True)
        need = f"about {offset / done * len(items) / 1e9:.1f} GB" if offset else "height x width x 3 bytes an image"
        raise PathProblem(
            e.errno,
            f"cannot write the image store of {name} in {path.parent} ({e.strerror or e}); the store needs {need}: "
            "free space there, set store_dir to a folder with room, or set cache_images=false (decode at every "
            "read); nothing half-written was kept",
        ) from e
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info(
        "image store of %s built in %.0f s: %d images, %.2f GB",
        name,
        time.time() - t0,
        len(items) - len(bad),
        offset / 1e9,
    )
    return True


def open_or_build(
    items: list, short_side: int | None, store_dir=None, name: str = "images", workers: int | None = None
) -> ImageStore:
    """The store of the image files ``items`` at ``short_side``: reused when one was built for the same files
    (paths, sizes and modification times), otherwise built (see the module's docstring)."""
    root = check_store_dir(store_dir)
    files = describe_files(items)
    prefix, folder = store_names(name, files, short_side)
    path = root / folder
    store = _try_open(path, warn=False)
    if store is not None:
        log.info("image store of %s: %s (%.2f GB, reused)", name, path, store.nbytes / 1e9)
        return store
    with _locked(root / f".{prefix}.lock", name) as locked:
        store = _try_open(path, warn=True)  # built by the process this one waited for
        if store is not None:
            return store
        if (path / MANIFEST).exists() or path.exists():  # damaged, or a folder left by something else
            _remove(path)
        _tidy(root, prefix, keep=folder, locked=locked)
        build(items, files, short_side, path, name, workers)
    return ImageStore(path)
