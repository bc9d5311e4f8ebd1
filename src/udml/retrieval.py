"""Using a trained model: embed images and folders, index the embeddings with faiss, search by image.

Embeddings are L2-normalised, so inner product is cosine similarity: scores lie in [-1, 1], higher
is more similar. Files:

- embeddings ``.npz``: ``embeddings`` (float32 [N, D]), ``paths`` (the absolute image paths, in
  order) and ``meta`` (JSON text: the model file and the fingerprint of its network, the folder, the
  image size).
- index: a faiss index file (``faiss.read_index`` opens it) plus ``<index>.json`` beside it with
  the image paths and the metadata, in the index's order.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from .data import test_transform
from .devices import precision_for, resolve_device
from .errors import ModelMismatch
from .images import open_rgb, report_unreadable

log = logging.getLogger("udml")

EMBEDDINGS_FORMAT = "udml-embeddings-1"
INDEX_FORMAT = "udml-index-1"
INDEX_KINDS = ("flat", "ivf", "hnsw")


PRETRAINED = "pretrained:"


def pretrained_backbone(name: str) -> torch.nn.Module:
    """A backbone's pretrained pooled features, L2-normalised, as the embedding: no training at all. What a CPU
    user gets when training does not beat the start (``udml embed pretrained:efficientnet_lite0 DIR``)."""
    from .models import UDMLNet, create_backbone

    return UDMLNet(create_backbone(name, pretrained=True), embedding_dim=None).eval()


class Embedder:
    """A trained network with its test transform: embeds PIL images or image paths.

    ``udml.load("runs/x/model.pt").embed(["a.jpg", pil_image])`` -> float32 array [2, D], one
    L2-normalised row per image. Images are resized and centre-cropped exactly as at test time.
    """

    def __init__(
        self, model: torch.nn.Module, device: str | torch.device = "cpu", source: str | None = None, amp: bool = True
    ):
        """``amp``: the device's fast path (bfloat16 where native, channels_last; see udml.devices); False:
        float32, for bit-stable embeddings."""
        self.device = resolve_device(device)
        self.amp, self.precision = amp, precision_for(self.device, amp)
        self.model = self.precision.prepare(model.to(self.device).eval())
        self.image = model.image  # crop and resize sizes, normalisation: the model's own
        self.image_size = model.image.crop_size
        self.transform = test_transform(model.image.crop_size, resize_size=model.image.resize_size)
        self.source = source
        self._fingerprint = None

    @property
    def fingerprint(self) -> str:
        """:func:`model_fingerprint` of the network (computed once)."""
        if self._fingerprint is None:
            self._fingerprint = model_fingerprint(self.model)
        return self._fingerprint

    @classmethod
    def from_file(cls, path: str | Path, device: str | torch.device = "cpu", amp: bool = True) -> "Embedder":
        """From model.pt, checkpoint.pt or a run folder (see :func:`udml.inference.load_model`), or
        ``pretrained:NAME``: the pretrained backbone NAME alone (see :func:`pretrained_backbone`)."""
        from .inference import load_model

        if str(path).startswith(PRETRAINED):
            return cls(pretrained_backbone(str(path)[len(PRETRAINED) :]), device, source=str(path), amp=amp)
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"no model at {path}; give a model.pt, a checkpoint.pt or a run folder")
        model = load_model(path, "cpu")
        return cls(model, device, source=str(path.resolve()), amp=amp)

    @property
    def dim(self) -> int:
        return int(self.model.embedding_dim)

    def _tensor(self, item) -> torch.Tensor:
        try:
            return self.transform(open_rgb(item))
        except Exception as e:  # noqa: BLE001 - any decoder failure: say which image
            where = item if isinstance(item, (str, Path)) else f"image of type {type(item).__name__}"
            raise ValueError(
                f"cannot read {where} ({type(e).__name__}: {e}); pass a PIL image or the path of an image file"
            ) from e

    def embed_tensors(self, x: torch.Tensor) -> np.ndarray:
        """Embeddings of a uint8 batch [B, 3, H, W] already transformed to ``image_size``: the one embedding
        pass of the package (inference.extract), in this embedder's precision."""
        from .inference import extract

        return extract(self.model, x, batch_size=max(1, len(x)), amp=self.amp, pooled=False)[1].cpu().numpy()

    def embed(self, images, batch_size: int = 64) -> np.ndarray:
        """Float32 [N, D] embeddings of a list of PIL images or paths (or of one of them: [1, D])."""
        if isinstance(images, (str, Path)) or not isinstance(images, Sequence):
            images = [images]
        if len(images) == 0:
            return np.zeros((0, self.dim), dtype=np.float32)
        out = []
        for i in range(0, len(images), batch_size):
            out.append(self.embed_tensors(torch.stack([self._tensor(im) for im in images[i : i + batch_size]])))
        return np.concatenate(out)

    __call__ = embed


def model_fingerprint(model: torch.nn.Module) -> str:
    """SHA-256 of a network's weights (names, dtypes, shapes and values, in order) and input settings.

    It identifies the network, not the file: a run folder, its model.pt and its last checkpoint.pt give the same
    fingerprint, and any other network a different one. The rotation head is left out: it takes no part in
    the embeddings."""
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        if name.startswith("rotation."):
            continue
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    h.update(json.dumps(model.image.to_dict(), sort_keys=True).encode())
    return h.hexdigest()


class _Files(torch.utils.data.Dataset):
    """Transformed images by path; an unreadable file yields a blank image and its error message."""

    def __init__(self, paths: list[str], transform, size: int):
        self.paths, self.transform, self.size = paths, transform, size

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i):
        try:
            return self.transform(open_rgb(self.paths[i])), ""
        except Exception as e:  # noqa: BLE001 - reported and skipped by embed_folder
            return torch.zeros(3, self.size, self.size, dtype=torch.uint8), f"{type(e).__name__}: {e}"


@dataclass
class Embeddings:
    embeddings: np.ndarray  # float32 [N, D], L2-normalised rows
    paths: list[str]  # absolute image paths, one per row
    meta: dict = field(default_factory=dict)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, error) of unreadable files


def list_images(root: str | Path) -> list[str]:
    """Every image under ``root`` (any nesting), as sorted absolute paths."""
    from .datasets import load_folder

    return [os.path.abspath(p) for p in load_folder(root, "train").images]


def embed_folder(
    embedder: Embedder, root: str | Path, *, batch_size: int = 64, num_workers: int = 0, progress: bool = False
) -> Embeddings:
    """Embed every image under ``root``; unreadable files are logged and left out (see ``.skipped``)."""
    from tqdm import tqdm

    paths = list_images(root)
    files = _Files(paths, embedder.transform, embedder.image_size)
    loader = torch.utils.data.DataLoader(files, batch_size=batch_size, num_workers=num_workers, shuffle=False)
    rows, errors = [], []
    with tqdm(total=len(paths), desc="embed", unit="img", disable=not progress, mininterval=2.0) as bar:
        for x, err in loader:
            rows.append(embedder.embed_tensors(x))
            errors += list(err)
            bar.update(len(x))
    emb = np.concatenate(rows)
    ok = np.array([e == "" for e in errors])
    skipped = [(p, e) for p, e in zip(paths, errors) if e]
    report_unreadable(root, skipped)
    if not ok.any():
        raise ValueError(f"none of the {len(paths)} images under {root} could be read")
    meta = {
        "format": EMBEDDINGS_FORMAT,
        "root": os.path.abspath(root),
        "dim": int(emb.shape[1]),
        "image_size": embedder.image_size,
        "model": embedder.source,
        "model_fingerprint": embedder.fingerprint,
        "precision": str(embedder.precision),
    }
    return Embeddings(
        np.ascontiguousarray(emb[ok], dtype=np.float32), [p for p, k in zip(paths, ok) if k], meta, skipped
    )


def save_embeddings(path: str | Path, emb: Embeddings) -> None:
    if len(emb.paths) != len(emb.embeddings):
        raise ValueError(f"{len(emb.embeddings)} embeddings but {len(emb.paths)} paths; they must match one to one")
    with open(path, "wb") as f:  # a file object: np.savez would otherwise append .npz to other names
        np.savez(
            f,
            embeddings=emb.embeddings.astype(np.float32),
            paths=np.array(emb.paths, dtype=str),
            meta=np.array(json.dumps(emb.meta)),
        )


def load_embeddings(path: str | Path) -> Embeddings:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no embeddings file at {path}; write one with: udml embed MODEL DIR -o {path}")
    try:
        with np.load(path, allow_pickle=False) as z:
            emb, paths, meta = z["embeddings"], z["paths"].tolist(), json.loads(str(z["meta"]))
    except (KeyError, ValueError, OSError) as e:
        raise ValueError(f"{path} is not a udml embeddings file (from udml embed): {e}") from e
    if emb.ndim != 2 or len(paths) != len(emb):
        raise ValueError(f"{path}: embeddings of shape {emb.shape} do not match its {len(paths)} paths")
    return Embeddings(np.ascontiguousarray(emb, dtype=np.float32), paths, meta)


def build_index(
    embeddings: np.ndarray,
    kind: str = "flat",
    *,
    nlist: int | None = None,
    nprobe: int = 16,
    hnsw_m: int = 32,
    ef_search: int = 128,
    seed: int = 0,
):
    """A faiss inner-product index over ``embeddings``.

    ``flat``: exact search (IndexFlatIP). ``ivf``: inverted lists (IndexIVFFlat), ``nlist`` cells
    (default 4 sqrt(N), at most N / 39 so that every cell has training points), ``nprobe`` visited per
    query. ``hnsw``: a graph (IndexHNSWFlat) with ``hnsw_m`` links per node, ``ef_search`` candidates.
    Both approximate kinds trade a little recall for speed on large collections.
    """
    import faiss

    x = np.ascontiguousarray(embeddings, dtype=np.float32)
    if x.ndim != 2 or len(x) == 0:
        raise ValueError(f"build_index: expected a non-empty [N, D] array of embeddings, got shape {x.shape}")
    n, d = x.shape
    if kind == "flat":
        index = faiss.IndexFlatIP(d)
    elif kind == "ivf":
        nlist = nlist or int(max(1, min(4 * np.sqrt(n), n // 39)))
        if not 1 <= nlist <= n:
            raise ValueError(f"build_index: nlist={nlist} must lie in [1, {n}] (the number of embeddings)")
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, nlist, faiss.METRIC_INNER_PRODUCT)
        index.cp.seed = seed
        index.train(x)
        index.nprobe = min(nprobe, nlist)
    elif kind == "hnsw":
        index = faiss.IndexHNSWFlat(d, hnsw_m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efSearch = ef_search
    else:
        raise ValueError(f"build_index: unknown kind {kind!r}; valid kinds: {', '.join(INDEX_KINDS)}")
    index.add(x)
    return index


def save_index(path: str | Path, index, emb: Embeddings, kind: str) -> Path:
    """Write the faiss index to ``path`` and the paths and metadata to ``<path>.json``; returns the latter."""
    import faiss

    if index.ntotal != len(emb.paths):
        raise ValueError(f"the index holds {index.ntotal} vectors but {len(emb.paths)} paths were given")
    faiss.write_index(index, str(path))
    sidecar = Path(f"{path}.json")
    sidecar.write_text(json.dumps({"format": INDEX_FORMAT, "kind": kind, "meta": emb.meta, "paths": emb.paths}))
    return sidecar


def load_index(path: str | Path):
    """(faiss index, paths, meta) from an index written by :func:`save_index`, or an exact index built
    on the fly from an embeddings ``.npz``."""
    import faiss

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no index or embeddings file at {path}; make one with udml embed / udml index")
    if path.suffix == ".npz":
        emb = load_embeddings(path)
        return build_index(emb.embeddings, "flat"), emb.paths, emb.meta
    sidecar = Path(f"{path}.json")
    if not sidecar.is_file():
        raise FileNotFoundError(
            f"{sidecar} is missing: it holds the image paths of {path}. Keep the two files "
            "together, or rebuild both with udml index"
        )
    try:
        index = faiss.read_index(str(path))
    except RuntimeError as e:
        raise ValueError(f"{path} cannot be read as a faiss index ({e})") from e
    info = json.loads(sidecar.read_text())
    if index.ntotal != len(info["paths"]):
        raise ValueError(
            f"{path} holds {index.ntotal} vectors but {sidecar} lists {len(info['paths'])} paths; "
            "they were not written together. Rebuild both with udml index"
        )
    return index, info["paths"], info.get("meta", {})


def _same_file(a: str, b: str) -> bool:
    return os.path.realpath(a) == os.path.realpath(b)


def search(
    index,
    paths: list[str],
    queries: np.ndarray,
    k: int = 10,
    *,
    query_paths: Sequence | None = None,
    keep_self: bool = False,
) -> list[list[dict]]:
    """Top-``k`` results per query row: ``[[{"rank", "path", "score"}, ...], ...]``, best first.

    When ``query_paths`` is given, a result that is the query's own file is dropped (unless
    ``keep_self``), so that a query taken from the indexed folder does not find itself first.
    """
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    if queries.ndim != 2 or queries.shape[1] != index.d:
        raise ValueError(
            f"search: queries have dimension {queries.shape[-1]} but the index {index.d}; embed the "
            "queries with the model that embedded the indexed images"
        )
    if k < 1:
        raise ValueError(f"search: k must be at least 1, got {k}")
    k = min(k, index.ntotal)
    extra = 0 if keep_self or query_paths is None else 1
    scores, ids = index.search(queries, min(k + extra, index.ntotal))
    out = []
    for qi in range(len(queries)):
        rows = []
        for s, i in zip(scores[qi], ids[qi]):
            if i < 0:  # approximate indexes may return fewer than asked
                continue
            if extra and isinstance(query_paths[qi], (str, Path)) and _same_file(str(query_paths[qi]), paths[i]):
                continue
            rows.append({"rank": len(rows) + 1, "path": paths[i], "score": float(s)})
        out.append(rows[:k])
    return out


def check_model_matches(embedder: Embedder, meta: dict, where: str, allow_other: bool = False) -> None:
    """The query model must be the network that embedded the collection (same :func:`model_fingerprint`):
    another network's embeddings live in another space, and its neighbours would look plausible but be wrong.
    ``allow_other`` turns the error into a warning (dimensions must still agree)."""
    dim = meta.get("dim")
    if dim is not None and dim != embedder.dim:
        raise ModelMismatch(
            f"{where} holds {dim}-d embeddings but the model {embedder.source} makes "
            f"{embedder.dim}-d ones; search with the model that embedded the images "
            f"({meta.get('model')})"
        )
    expected = meta.get("model_fingerprint")
    if expected is None:  # written before udml fingerprinted models
        log.warning(
            "%s records no model fingerprint, so the query model cannot be checked against the one that "
            "embedded it; re-embed the collection (udml embed) to record one",
            where,
        )
        return
    if expected != embedder.fingerprint:
        message = (
            f"{where} was embedded by another network ({meta.get('model')}, fingerprint {expected[:12]}) "
            f"than the query model {embedder.source} (fingerprint {embedder.fingerprint[:12]}); its "
            "neighbours would be meaningless"
        )
        if not allow_other:
            raise ModelMismatch(
                f"{message}. Search with the model that embedded the collection (drop --model), "
                "re-embed the collection with this model, or pass --allow-other-model to search "
                "anyway"
            )
        log.warning("%s (--allow-other-model given)", message)
