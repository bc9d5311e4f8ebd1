"""The errors a user can cause or fix. Each message says what is wrong, where, and how to fix it; the command
line prints any ``UdmlError`` as one line (with ValueError, OSError and ImportError), whatever was imported."""

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
