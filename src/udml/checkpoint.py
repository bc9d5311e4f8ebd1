"""Checkpoints and model files: written atomically, read as tensors and plain data only.

Files are read with ``torch.load(weights_only=True)``: unpickling anything else could run code from a file
received from someone else. A checkpoint holds the model's and the optimiser's state, the pseudo-labels, the
rounds and steps done, the configuration, the start metrics and the CPU thread count.
"""

from __future__ import annotations

import pickle
import random
import sys
from pathlib import Path

import numpy as np
import torch

from .rundir import atomic_write

# Saved by udml before 0.2 and never read back; they made the files need full unpickling.
OBSOLETE_KEYS = ("rng", "centroids")


def atomic_save(obj, path: str | Path) -> None:
    """torch.save ``obj`` to ``path`` atomically (see :func:`udml.rundir.atomic_write`)."""
    atomic_write(path, lambda f: torch.save(obj, f), what="checkpoint")


def load(path: str | Path, map_location="cpu") -> dict:
    """A checkpoint or model file, as tensors and plain data; anything else is refused, not executed."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"no checkpoint at {path}; resume only a run folder that holds {path.name}, "
            "or start a new run without --resume"
        )
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        raise ValueError(
            f"{path} holds Python objects other than tensors and plain data, so it is not loaded: unpickling them "
            "could run code hidden in the file. A checkpoint of an older udml holds random-number states of that "
            f"kind; if you trust the file (you made it), convert it once: python -m udml.checkpoint upgrade {path}"
        ) from e
    except Exception as e:  # noqa: BLE001
        raise ValueError(
            f"checkpoint {path} cannot be read ({type(e).__name__}: {e}); it is damaged or not a udml checkpoint"
        ) from e


def upgrade(path: str | Path) -> list[str]:
    """Rewrite a trusted checkpoint of an older udml without the entries that need full unpickling; returns the
    keys removed. Only for files you trust: this one reading is a full unpickling."""
    path = Path(path)
    state = torch.load(path, map_location="cpu", weights_only=False)
    removed = [k for k in OBSOLETE_KEYS if k in state]
    for k in removed:
        del state[k]
    atomic_save(state, path)
    load(path)  # now readable the safe way
    return removed


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] != "upgrade":
        sys.exit("usage: python -m udml.checkpoint upgrade CHECKPOINT_OR_MODEL_FILE")
    print(f"{sys.argv[2]}: removed {', '.join(upgrade(sys.argv[2])) or 'nothing'}; it now loads as plain data")
