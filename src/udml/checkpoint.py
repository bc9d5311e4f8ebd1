"""The two file formats of a run, written and read here only: atomically written, read as tensors and plain data.

- The **checkpoint** (checkpoint.pt, what ``--resume`` reads): the model's and the optimiser's state, the
  training method's own state (STML's teacher), the round's targets (pseudo-labels), the rounds and steps done, the
  configuration, the start metrics and the CPU thread count.
- The **model file** (model.pt, format ``MODEL_FORMAT``): the weights and what rebuilds the network (backbone,
  heads, image settings), without the training set-up.

Files are read with ``torch.load(weights_only=True)``: unpickling anything else could run code from a file
received from someone else.
"""

from __future__ import annotations

import pickle
import sys
from pathlib import Path

import torch

from .errors import InputError, MissingPath
from .rundir import atomic_write

# Saved by udml before 0.2 and never read back; they made the files need full unpickling.
OBSOLETE_KEYS = ("rng", "centroids")
MODEL_FORMAT = "udml-model-1"
CHECKPOINT_KEYS = ("model", "optimizer", "rounds_done", "step", "labels", "config", "start_metrics")


def atomic_save(obj, path: str | Path) -> None:
    """torch.save ``obj`` to ``path`` atomically (see :func:`udml.rundir.atomic_write`)."""
    atomic_write(path, lambda f: torch.save(obj, f), what="checkpoint")


def load(path: str | Path, map_location="cpu") -> dict:
    """A checkpoint or model file, as tensors and plain data; anything else is refused, not executed."""
    path = Path(path)
    if not path.is_file():
        raise MissingPath(
            f"no checkpoint at {path}; resume only a run folder that holds {path.name}, "
            "or start a new run without --resume"
        )
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        raise InputError(
            f"{path} holds Python objects other than tensors and plain data, so it is not loaded: unpickling them "
            "could run code hidden in the file. A checkpoint of an older udml holds random-number states of that "
            f"kind; if you trust the file (you made it), convert it once: python -m udml.checkpoint upgrade {path}"
        ) from e
    except Exception as e:  # noqa: BLE001
        raise InputError(
            f"checkpoint {path} cannot be read ({type(e).__name__}: {e}); it is damaged or not a udml checkpoint"
        ) from e


def save_checkpoint(
    path: str | Path,
    model,
    optimizer,
    *,
    rounds_done: int,
    step: int,
    labels,
    config: dict,
    start_metrics: dict,
    method_state: dict | None = None,
) -> None:
    """The checkpoint after ``rounds_done`` clustering rounds (``step`` steps): what a resumed run restores.
    ``method_state``: what the training method keeps beside the model (STML's teacher)."""
    atomic_save(
        {
            "model": model.state_dict(),
            "method_state": method_state or {},
            "optimizer": optimizer.state_dict(),
            "rounds_done": rounds_done,
            "step": step,
            "labels": labels,
            "config": config,
            "start_metrics": start_metrics,
            "cpu_threads": torch.get_num_threads(),
        },
        path,
    )


def read_checkpoint(path: str | Path, keys=CHECKPOINT_KEYS) -> dict:
    """A checkpoint's contents (see the module's text); a file without ``keys`` is refused with the reason."""
    state = load(path)
    check_checkpoint(state, path, keys)
    return state


def check_checkpoint(state: dict, path: str | Path, keys=CHECKPOINT_KEYS) -> None:
    missing = [k for k in keys if k not in state]
    if missing:
        raise InputError(
            f"{path} is not a udml training checkpoint (it has no {', '.join(missing)}); resume a run folder that "
            "udml train wrote, or start a new run without --resume"
        )


def save_model(model, cfg, path: str | Path) -> None:
    """The model file of ``model`` (a UDMLNet) trained with configuration ``cfg``."""
    atomic_save(
        {
            "format": MODEL_FORMAT,
            "state_dict": inference_weights(model.state_dict()),
            "arch": {
                "backbone": cfg.backbone,
                "embedding_dim": cfg.embedding_dim,
                "rotation_hidden": cfg.rotation_hidden,
                "image": model.image.to_dict(),
                "pooling": cfg.pooling,
            },
        },
        path,
    )


def inference_weights(state_dict: dict) -> dict:
    """A network's weights without the heads that only training uses (STML's wide head, UDMLNet.wide)."""
    return {k: v for k, v in state_dict.items() if not k.startswith("wide.")}


def read_model(path: str | Path) -> tuple[dict, dict]:
    """(arch, state_dict) of a model file or of a training checkpoint. ``arch`` holds ``backbone``,
    ``embedding_dim``, ``rotation_hidden`` and ``image`` (an ImageConfig's dict), or for files from before
    ImageConfig ``image_size`` and ``resize_size`` instead."""
    state = load(path)
    if state.get("format") == MODEL_FORMAT:
        return state["arch"], state["state_dict"]
    if "model" in state and "config" in state:
        from .config import Config

        cfg = Config(**state["config"])
        arch = {
            "backbone": cfg.backbone,
            "embedding_dim": cfg.embedding_dim,
            "rotation_hidden": cfg.rotation_hidden,
            "image_size": cfg.image_size,
            "resize_size": cfg.resize_size,
            "pooling": cfg.pooling,
        }
        return arch, inference_weights(state["model"])
    raise InputError(f"{path} is neither a udml model file nor a udml training checkpoint")


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


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] != "upgrade":
        sys.exit("usage: python -m udml.checkpoint upgrade CHECKPOINT_OR_MODEL_FILE")
    print(f"{sys.argv[2]}: removed {', '.join(upgrade(sys.argv[2])) or 'nothing'}; it now loads as plain data")
