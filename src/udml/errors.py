"""The errors a user can cause or fix. Each message says what is wrong, where, and how to fix it.

The command line prints a ``UdmlError`` as one line, and so an ``OSError`` about a path (missing, unreadable, a
full disk: :func:`is_user_error`); anything else is a bug in udml and keeps its traceback (``UDML_DEBUG=1`` shows
the traceback of every error). Each class also derives from the built-in exception that describes it, so that
``except ValueError`` and the like keep working."""

from __future__ import annotations


class UdmlError(Exception):
    """Base of udml's own errors: bad input, an unreachable download, a damaged file, a diverging run."""


class UnknownKey(UdmlError, KeyError):
    """A configuration key that udml does not know (a KeyError whose text is the plain message)."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class PretrainedWeightsUnavailable(UdmlError, RuntimeError):
    """A backbone's pretrained weights could not be downloaded (offline machine) and are not cached."""


class NonFiniteError(UdmlError, RuntimeError):
    """The loss, the weights or the network's outputs became NaN or infinite."""


class StoreError(UdmlError, ValueError):
    """A store folder that is incomplete or damaged."""


class ModelMismatch(UdmlError, ValueError):
    """The query model is not the network that embedded the collection."""


class ServeError(UdmlError):
    """An error answered as ``{"detail": message}`` with an HTTP status."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


class InputError(UdmlError, ValueError):
    """A bad argument, setting or value, or data that does not hold what it should."""


class InvalidType(UdmlError, TypeError):
    """An argument of the wrong type given to udml's Python API."""


class MissingPath(UdmlError, FileNotFoundError):
    """A file or folder that the command or the configuration names does not exist."""


class PathProblem(UdmlError, OSError):
    """A path that exists but cannot be used as asked (not a folder, not writable, a store in use)."""


class PortUnavailable(UdmlError, OSError):
    """udml serve cannot listen on the host and port asked for."""


class MissingPackage(UdmlError, ImportError):
    """A package that an optional feature needs is not installed."""


class IncompatiblePackage(UdmlError, RuntimeError):
    """An installed package's version does not fit (for example weights that another timm lays out otherwise)."""


# OSError numbers that concern a path the user gave (missing, unreadable, a full disk, ...), not a bug
import errno as _errno  # noqa: E402

PATH_ERRNOS = {
    _errno.ENOENT,
    _errno.EACCES,
    _errno.EPERM,
    _errno.ENOSPC,
    _errno.EDQUOT,
    _errno.EROFS,
    _errno.EISDIR,
    _errno.ENOTDIR,
    _errno.ENAMETOOLONG,
    _errno.EEXIST,
    _errno.ENOTEMPTY,
}


def is_user_error(e: BaseException) -> bool:
    """Whether the command line prints ``e`` as one line: a UdmlError, or an OSError about a path the user gave
    (missing, unreadable, disk full). Everything else is a bug in udml or in a dependency's use by udml."""
    if isinstance(e, UdmlError):
        return True
    return isinstance(e, OSError) and e.errno in PATH_ERRNOS
