"""faiss indexes over embeddings: build, save with the image paths, update as a collection changes, search.

An index file is a faiss ``IndexIDMap2`` (``faiss.read_index`` opens it) whose IDs are stable: each image keeps
its ID while its file is unchanged, a removed or changed file's ID is removed from the index (so that it never
comes back as a hit) and new files get new IDs. ``<index>.json`` beside it holds, in the index's storage order,
each vector's ID, image path and file stamp (size and mtime_ns, from the embeddings file), with the index kind
and parameters and the embeddings' metadata (model fingerprint, precision). Once loaded, an index answers with
positions into its list of paths, whatever the IDs.

Inner product on L2-normalised embeddings is cosine similarity: scores lie in [-1, 1], higher is more similar.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Sequence

import numpy as np

from .embeddings import load_embeddings, same_meta
from .errors import InputError, MissingPath
from .rundir import atomic_write

log = logging.getLogger("udml")

INDEX_FORMAT = "udml-index-2"  # udml-index-1: no IDs and stamps (read; updated by rebuilding)
INDEX_KINDS = ("flat", "ivf", "hnsw")


def _empty_index(x: np.ndarray, kind: str, nlist, nprobe, hnsw_m, ef_search, seed):
    import faiss

    n, d = x.shape
    if kind == "flat":
        return faiss.IndexFlatIP(d)
    if kind == "ivf":
        nlist = nlist or int(max(1, min(4 * np.sqrt(n), n // 39)))
        if not 1 <= nlist <= n:
            raise InputError(f"build_index: nlist={nlist} must lie in [1, {n}] (the number of embeddings)")
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, nlist, faiss.METRIC_INNER_PRODUCT)
        index.cp.seed = seed
        index.train(x)
        index.nprobe = min(nprobe, nlist)
        return index
    if kind == "hnsw":
        index = faiss.IndexHNSWFlat(d, hnsw_m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efSearch = ef_search
        return index
    raise InputError(f"build_index: unknown kind {kind!r}; valid kinds: {', '.join(INDEX_KINDS)}")


def build_index(
    embeddings: np.ndarray,
    kind: str = "flat",
    *,
    nlist: int | None = None,
    nprobe: int = 16,
    hnsw_m: int = 32,
    ef_search: int = 128,
    seed: int = 0,
    ids: np.ndarray | None = None,
):
    """A faiss inner-product index over ``embeddings``; with ``ids`` an ``IndexIDMap2`` holding those IDs.

    ``flat``: exact search (IndexFlatIP). ``ivf``: inverted lists (IndexIVFFlat), ``nlist`` cells
    (default 4 sqrt(N), at most N / 39 so that every cell has training points), ``nprobe`` visited per
    query. ``hnsw``: a graph (IndexHNSWFlat) with ``hnsw_m`` links per node, ``ef_search`` candidates.
    Both approximate kinds trade a little recall for speed on large collections.
    """
    import faiss

    x = np.ascontiguousarray(embeddings, dtype=np.float32)
    if x.ndim != 2 or len(x) == 0:
        raise InputError(f"build_index: expected a non-empty [N, D] array of embeddings, got shape {x.shape}")
    index = _empty_index(x, kind, nlist, nprobe, hnsw_m, ef_search, seed)
    if ids is None:
        index.add(x)
        return index
    mapped = faiss.IndexIDMap2(index)
    mapped.add_with_ids(x, np.asarray(ids, dtype=np.int64))
    return mapped


def _params(index) -> dict:
    """The parameters a kind was built with, as recorded in the sidecar (an update keeps them)."""
    import faiss

    sub = faiss.downcast_index(index.index) if isinstance(index, faiss.IndexIDMap2) else index
    if isinstance(sub, faiss.IndexIVFFlat):
        return {"nlist": int(sub.nlist), "nprobe": int(sub.nprobe)}
    if isinstance(sub, faiss.IndexHNSWFlat):
        return {"hnsw_m": int(sub.hnsw.nb_neighbors(1)), "ef_search": int(sub.hnsw.efSearch)}
    return {}


def save_index(path: str | Path, index, emb, kind: str, ids: np.ndarray | None = None, next_id: int = 0) -> Path:
    """Write ``index`` (from :func:`build_index`) to ``path``, and to ``<path>.json`` its IDs in storage order
    (``ids``; none: a plain index, whose IDs are its positions), the paths, stamps and metadata of ``emb``
    (udml.retrieval.Embeddings, in the same order) and the next free ID (IDs are never reused); returns the
    sidecar's path. Each file is replaced atomically, the index first."""
    import faiss

    if index.ntotal != len(emb.paths):
        raise InputError(f"the index holds {index.ntotal} vectors but {len(emb.paths)} paths were given")
    ids = np.arange(len(emb.paths), dtype=np.int64) if ids is None else np.asarray(ids, dtype=np.int64)
    path, sidecar = Path(path), Path(f"{path}.json")
    refined = getattr(emb, "refined", None)
    info = {
        "format": INDEX_FORMAT,
        "kind": kind,
        "params": _params(index),
        "meta": emb.meta,
        "ids": ids.tolist(),
        "paths": list(emb.paths),
        "stamps": None if emb.stamps is None else np.asarray(emb.stamps).tolist(),
        "next_id": max(next_id, int(ids.max()) + 1 if len(ids) else 0),
        # a refined collection's vectors change when their neighbours change: an update compares them by digest
        "digests": None if refined is None else digests(refined),
    }
    # faiss writes through the file object (streamed, no copy of the index in memory) into atomic_write's temporary
    atomic_write(path, lambda f: faiss.write_index(index, faiss.PyCallbackIOWriter(f.write)), what="index")
    text = json.dumps(info).encode()
    atomic_write(sidecar, lambda f: f.write(text), what="index paths file")
    return sidecar


def digests(x: np.ndarray) -> list[int]:
    """A CRC-32 of each row's bytes: whether a stored vector is still the collection's."""
    import zlib

    x = np.ascontiguousarray(x, dtype=np.float32)
    return [zlib.crc32(row.tobytes()) for row in x]


def _read(path: Path):
    """(faiss index as stored, sidecar dict), checked to belong together."""
    import faiss

    sidecar = Path(f"{path}.json")
    if not sidecar.is_file():
        raise MissingPath(
            f"{sidecar} is missing: it holds the image paths of {path}. Keep the two files "
            "together, or rebuild both with udml index"
        )
    try:
        index = faiss.read_index(str(path))
    except RuntimeError as e:
        raise InputError(f"{path} cannot be read as a faiss index ({e})") from e
    info = json.loads(sidecar.read_text())
    stored_ids = (
        faiss.vector_to_array(index.id_map) if isinstance(index, faiss.IndexIDMap2) else np.arange(index.ntotal)
    )
    ids = info.get("ids", list(range(len(info["paths"]))))
    if index.ntotal != len(info["paths"]) or not np.array_equal(stored_ids, np.asarray(ids, dtype=np.int64)):
        raise InputError(
            f"{path} holds {index.ntotal} vectors whose IDs do not match the {len(info['paths'])} paths of "
            f"{sidecar}; they were not written together (a run stopped between the two?). Rebuild both with "
            "udml index EMBEDDINGS -o INDEX --rebuild"
        )
    return index, info


def load_index(path: str | Path):
    """(faiss index, paths, meta) from an index written by :func:`save_index`, or an exact index built
    on the fly from an embeddings ``.npz``. The index answers with positions in ``paths``."""
    import faiss

    path = Path(path)
    if path.is_dir():  # a folder of embeddings shards (udml embed -o FOLDER)
        emb = load_embeddings(path)
        return build_index(emb.vectors, "flat"), emb.paths, emb.meta
    if not path.is_file():
        raise MissingPath(f"no index or embeddings file at {path}; make one with udml embed / udml index")
    if path.suffix == ".npz":
        emb = load_embeddings(path)
        return build_index(emb.vectors, "flat"), emb.paths, emb.meta
    index, info = _read(path)
    if isinstance(index, faiss.IndexIDMap2):  # storage order = the sidecar's order: positions, not IDs
        sub = faiss.downcast_index(index.index)
        sub.referenced_objects = [index]  # the map owns the sub-index: keep it alive as long as the sub-index
        index = sub
    return index, info["paths"], info.get("meta", {})


def update_index(
    path: str | Path,
    emb,
    kind: str = "flat",
    *,
    nlist: int | None = None,
    nprobe: int = 16,
    hnsw_m: int = 32,
    ef_search: int = 128,
    rebuild: bool = False,
) -> dict:
    """Bring the index at ``path`` in line with the embeddings ``emb`` (udml.retrieval.Embeddings) and write it;
    returns what changed: ``{"kept", "added", "removed", "count"}``, or ``{"rebuilt": reason, "count"}``.

    Vectors of files whose path and stamp (size, mtime_ns) are unchanged keep their IDs; those of removed or
    changed files are removed by ID, new and changed files are added under new IDs. The index is rebuilt when
    there is none at ``path``, with ``rebuild``, or when it cannot be updated: another kind, ``nlist`` or
    ``hnsw_m``; embeddings of another model or precision; an index or embeddings file without IDs or stamps
    (older udml). An HNSW graph cannot delete nodes, so removals rebuild it; an IVF index keeps its trained
    cells (the collection's first state) and re-adds the vectors it keeps. ``nprobe`` and ``ef_search`` are
    search settings: an update applies them."""
    import faiss

    path = Path(path)
    build = dict(nlist=nlist, nprobe=nprobe, hnsw_m=hnsw_m, ef_search=ef_search)
    reason = "--rebuild" if rebuild else None if path.exists() else "new index"
    if reason is None:
        index, info = _read(path)
        stored = info.get("params", {})
        if not isinstance(index, faiss.IndexIDMap2) or info.get("stamps") is None:
            reason = f"{path} holds no image IDs and file stamps (written by an older udml)"
        elif emb.stamps is None:
            reason = "the embeddings file records no file stamps (written by an older udml)"
        elif info.get("kind") != kind or (kind == "ivf" and nlist and nlist != stored.get("nlist")):
            reason = f"another kind or nlist than {path}'s ({info.get('kind')}, {stored})"
        elif kind == "hnsw" and hnsw_m != stored.get("hnsw_m"):
            reason = f"another HNSW M than {path}'s ({stored.get('hnsw_m')})"
        elif (why := same_meta(info.get("meta", {}), emb.meta)) is not None:
            reason = f"the embeddings differ from {path}'s: {why}"
        elif info.get("meta", {}).get("refine") != emb.meta.get("refine"):
            reason = f"the embeddings are refined otherwise than {path}'s ({emb.meta.get('refine')})"
    x = emb.vectors  # the refined embeddings where the file has them (udml.refine)
    if reason is not None:
        ids = np.arange(len(emb.paths), dtype=np.int64)
        save_index(path, build_index(x, kind, ids=ids, **build), emb, kind, ids)
        return {"rebuilt": reason, "count": len(ids)}

    # a row is kept when its file (path, stamp) and, for a refined collection, its vector are unchanged
    old_digests = info.get("digests") or [None] * len(info["ids"])
    new_digests = digests(x) if emb.refined is not None else [None] * len(emb.paths)
    have = {(p, tuple(st), d): i for p, st, d, i in zip(info["paths"], info["stamps"], old_digests, info["ids"])}
    stamps = np.asarray(emb.stamps).tolist()
    want = {(p, tuple(st), d): row for row, (p, st, d) in enumerate(zip(emb.paths, stamps, new_digests))}
    row_of_id = {i: want[key] for key, i in have.items() if key in want}
    removed = [i for i in info["ids"] if i not in row_of_id]
    added = [row for key, row in want.items() if key not in have]
    next_id = int(info["next_id"])
    new_ids = np.arange(next_id, next_id + len(added), dtype=np.int64)
    kept_ids = np.array([i for i in info["ids"] if i in row_of_id], dtype=np.int64)
    if removed and kind == "hnsw":  # faiss's HNSW graph cannot delete a node
        rows = [row_of_id[i] for i in kept_ids.tolist()] + added
        index = build_index(x[rows], kind, ids=np.concatenate([kept_ids, new_ids]), **build)
    else:
        if removed and kind == "ivf":  # removing by ID would leave the IVF's internal ids out of step with the map
            index.reset()  # keeps the trained cells
            if len(kept_ids):
                index.add_with_ids(x[[row_of_id[i] for i in kept_ids.tolist()]], kept_ids)
        elif removed:
            index.remove_ids(faiss.IDSelectorBatch(np.asarray(removed, dtype=np.int64)))
        if added:
            index.add_with_ids(np.ascontiguousarray(x[added]), new_ids)
        _set_search_params(index, nprobe, ef_search)
    row_of_id.update(zip(new_ids.tolist(), added))
    ids = faiss.vector_to_array(index.id_map)
    rows = [row_of_id[i] for i in ids.tolist()]
    order = type(emb)(
        emb.embeddings[rows],
        [emb.paths[r] for r in rows],
        emb.meta,
        stamps=np.asarray(emb.stamps)[rows],
        refined=None if emb.refined is None else emb.refined[rows],
    )
    save_index(path, index, order, kind, ids, next_id + len(added))
    return {"kept": len(kept_ids), "added": len(added), "removed": len(removed), "count": len(ids)}


def _set_search_params(index, nprobe: int, ef_search: int) -> None:
    import faiss

    sub = faiss.downcast_index(index.index)
    if isinstance(sub, faiss.IndexIVFFlat):
        sub.nprobe = min(nprobe, sub.nlist)
    elif isinstance(sub, faiss.IndexHNSWFlat):
        sub.hnsw.efSearch = ef_search


def _same_file(a: str, b: str) -> bool:
    return os.path.realpath(a) == os.path.realpath(b)


def stored_vectors(index, positions: np.ndarray) -> np.ndarray:
    """The vectors an index (as load_index returns it) holds at ``positions`` [..., n] (-1: zeros)."""
    import faiss

    sub = faiss.downcast_index(index)
    if isinstance(sub, faiss.IndexIVF) and not sub.direct_map.type:
        sub.make_direct_map()
    flat = np.asarray(positions).reshape(-1)
    out = np.zeros((len(flat), index.d), dtype=np.float32)
    ok = flat >= 0
    if ok.any():
        out[ok] = index.reconstruct_batch(flat[ok].astype(np.int64))
    return out.reshape(*np.shape(positions), index.d)


def expand_queries(index, queries: np.ndarray, k: int, alpha: float) -> np.ndarray:
    """Query expansion (udml.refine): each query averaged with its ``k`` nearest indexed vectors, weights
    max(0, similarity)^alpha, L2-normalised; for a refined collection the same averaging its members had."""
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    k = min(k, index.ntotal)
    sims, pos = index.search(queries, k)
    near = stored_vectors(index, pos)
    w = np.maximum(sims, 0).astype(np.float64) ** alpha
    w[pos < 0] = 0  # approximate indexes may return fewer than k
    out = queries.astype(np.float64) + np.einsum("nk,nkd->nd", w, near.astype(np.float64))
    out /= np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)
    return out.astype(np.float32)


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
        raise InputError(
            f"search: queries have dimension {queries.shape[-1]} but the index {index.d}; embed the "
            "queries with the model that embedded the indexed images"
        )
    if k < 1:
        raise InputError(f"search: k must be at least 1, got {k}")
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
