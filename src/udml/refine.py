"""The collection's own neighbours: database-side augmentation (DBA) and query expansion (QE), without torch.

DBA replaces every embedding of a collection by the weighted mean of itself and its ``k`` nearest neighbours in the
collection, weights ``max(0, s)^alpha`` for a neighbour at cosine similarity ``s`` (1 for itself), L2-normalised
again (Arandjelovic and Zisserman 2012; Radenovic, Tolias and Chum 2018 for the weighting). A query from outside the
collection gets the same treatment against the collection (QE): its refined embedding is the one DBA would give it
as a member. Neighbourhoods that are mostly right pull each image towards its own kind; clustering and ranking
beyond the first hit improve most. It is transductive: it uses the unlabelled collection being searched, so its
figures are reported apart from the protocol's (benchmarks/RESULTS.md), and where nearest neighbours are often
wrong it can lower Recall@1.

The neighbour graph is exact (faiss's flat inner-product search, the query itself left out by position) and is
kept beside the refined vectors, so that a collection that changes is refined again in proportion to what changed
(:func:`update_graph`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .errors import InputError

# Chosen on CUB's val classes by the rule written before the sweep (pretrained Lite0; the highest MAP@R among the
# settings that do not lower Recall@1: benchmarks/RESULTS.md, issue #28, "The collection's own neighbours").
DEFAULT_K = 10
DEFAULT_ALPHA = 0.0
CHUNK = 4096  # queries a time in exact searches


@dataclass(frozen=True)
class Refinement:
    k: int = DEFAULT_K
    alpha: float = DEFAULT_ALPHA

    def __post_init__(self):
        if int(self.k) != self.k or self.k < 1:
            raise InputError(f"refine: k (neighbours averaged in) must be a positive whole number, got {self.k}")
        if not self.alpha >= 0:
            raise InputError(f"refine: alpha (the weights' power) must be 0 or more, got {self.alpha}")

    def to_dict(self) -> dict:
        return {"kind": "dba", "k": int(self.k), "alpha": float(self.alpha)}

    @classmethod
    def from_dict(cls, d: dict) -> "Refinement":
        return cls(int(d["k"]), float(d["alpha"]))

    def __str__(self) -> str:
        return f"each embedding averaged with its {self.k} nearest neighbours (weights similarity^{self.alpha:g})"


def _index(x: np.ndarray):
    import faiss

    index = faiss.IndexFlatIP(x.shape[1])
    index.add(np.ascontiguousarray(x, dtype=np.float32))
    return index


def nearest(queries: np.ndarray, gallery: np.ndarray, k: int, exclude: np.ndarray | None = None):
    """(similarities float32 [Nq, k], gallery rows int64 [Nq, k]), nearest first, exact. ``exclude``: one gallery
    row per query to leave out (-1: none), e.g. the query's own row."""
    k = min(k, len(gallery) - (0 if exclude is None else 1))
    index = _index(gallery)
    sims, ids = [], []
    extra = 0 if exclude is None else 1
    for start in range(0, len(queries), CHUNK):
        q = np.ascontiguousarray(queries[start : start + CHUNK], dtype=np.float32)
        s, i = index.search(q, k + extra)
        if extra:
            own = exclude[start : start + CHUNK, None]
            hit = i == own
            # keep the first k that are not the excluded row (the last one goes when it was not found)
            drop = np.where(hit.any(1), hit.argmax(1), k)
            keep = np.ones_like(hit)
            keep[np.arange(len(i)), drop] = False
            s, i = s[keep].reshape(len(i), k), i[keep].reshape(len(i), k)
        sims.append(s)
        ids.append(i)
    return np.concatenate(sims), np.concatenate(ids).astype(np.int64)


def neighbour_graph(x: np.ndarray, k: int):
    """Every row's ``k`` nearest other rows: (similarities [N, k], rows [N, k])."""
    return nearest(x, x, k, exclude=np.arange(len(x)))


def augment(x: np.ndarray, sims: np.ndarray, rows: np.ndarray, alpha: float, gallery: np.ndarray | None = None):
    """normalise(x_i + sum_j max(0, s_ij)^alpha g_j) over each row's neighbours ``rows`` in ``gallery`` (default
    ``x`` itself: DBA), with their similarities ``sims``."""
    gallery = x if gallery is None else gallery
    w = np.maximum(sims, 0).astype(np.float64) ** alpha
    out = x.astype(np.float64) + np.einsum("nk,nkd->nd", w, gallery[rows].astype(np.float64))
    out /= np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)
    return out.astype(np.float32)


def refine(x: np.ndarray, r: Refinement):
    """DBA of a collection: (refined [N, D], similarities [N, k], neighbour rows [N, k])."""
    sims, rows = neighbour_graph(x, r.k)
    return augment(x, sims, rows, r.alpha), sims, rows


def expand(queries: np.ndarray, gallery: np.ndarray, r: Refinement) -> np.ndarray:
    """QE: each query averaged with its ``k`` nearest items of ``gallery`` (the collection's raw embeddings), as
    DBA averages a member with its neighbours."""
    sims, rows = nearest(queries, gallery, r.k)
    return augment(np.asarray(queries, dtype=np.float32), sims, rows, r.alpha, gallery)


def update_graph(x: np.ndarray, sims: np.ndarray, rows: np.ndarray, old_to_new: np.ndarray, k: int):
    """The exact neighbour graph of ``x`` (the changed collection's rows) from that of an earlier state of it, with
    work in proportion to the change: ``old_to_new[i]`` is old row i's row in ``x``, or -1 for a row that was removed
    (or whose file changed: it is removed and embedded again). A kept row whose neighbours are all kept needs only
    its similarities to the new rows (merged into its list); a kept row that lost a neighbour, and every new row,
    is searched against the whole collection. Returns (similarities, rows, the rows of ``x`` whose list changed)."""
    n = len(x)
    new_sims = np.zeros((n, k), dtype=np.float32)
    new_rows = np.zeros((n, k), dtype=np.int64)
    kept_old = np.flatnonzero(old_to_new >= 0)
    kept_new = old_to_new[kept_old]
    fresh = np.setdiff1d(np.arange(n), kept_new)
    mapped = old_to_new[rows[kept_old]]  # neighbours in the new numbering (-1: gone)
    whole = np.ones(n, dtype=bool)
    intact = (mapped >= 0).all(1) & (rows.shape[1] >= k)
    if len(fresh) and intact.any():
        s_new, r_new = nearest(x[kept_new[intact]], x[fresh], min(k, len(fresh)))
        cand_s = np.concatenate([sims[kept_old[intact], :k], s_new], 1)
        cand_r = np.concatenate([mapped[intact, :k], fresh[r_new]], 1)
        order = np.argsort(-cand_s, axis=1, kind="stable")[:, :k]
        new_sims[kept_new[intact]] = np.take_along_axis(cand_s, order, 1)
        new_rows[kept_new[intact]] = np.take_along_axis(cand_r, order, 1)
    elif intact.any():
        new_sims[kept_new[intact]] = sims[kept_old[intact], :k]
        new_rows[kept_new[intact]] = mapped[intact, :k]
    whole[kept_new[intact]] = False
    redo = np.flatnonzero(whole)
    if len(redo):
        s, r = nearest(x[redo], x, k, exclude=redo)
        new_sims[redo], new_rows[redo] = s, r
    changed = np.ones(n, dtype=bool)
    same = kept_new[intact]
    changed[same] = (new_rows[same] != mapped[intact, :k]).any(1)
    return new_sims, new_rows, np.flatnonzero(changed)


def refine_collection(emb, r: Refinement, previous=None):
    """``emb`` (udml.embeddings.Embeddings) with its refined embeddings and neighbour graph, and ``meta["refine"]``.
    ``previous``: the same collection's earlier refined file (same model, same k and alpha): its rows whose file is
    unchanged (same path and stamp) keep their refined vector unless their neighbour list changed
    (:func:`update_graph`); otherwise everything is computed anew. The result is the same either way."""
    import dataclasses

    x = emb.embeddings
    if len(x) < 2:
        raise InputError("refine: a collection of fewer than 2 images has no neighbours to average with")
    r = Refinement(min(r.k, len(x) - 1), r.alpha)
    usable = (
        previous is not None
        and previous.refined is not None
        and previous.meta.get("refine") == r.to_dict()
        and previous.stamps is not None
        and emb.stamps is not None
        and previous.neighbour_rows.shape[1] == r.k
    )
    if usable:
        row_of = {(p, tuple(st)): i for i, (p, st) in enumerate(zip(emb.paths, np.asarray(emb.stamps).tolist()))}
        old_to_new = np.array(
            [row_of.get((p, tuple(st)), -1) for p, st in zip(previous.paths, np.asarray(previous.stamps).tolist())],
            dtype=np.int64,
        )
        sims, rows, changed = update_graph(x, previous.neighbour_sims, previous.neighbour_rows, old_to_new, r.k)
        refined = np.empty_like(x)
        kept = old_to_new >= 0
        refined[old_to_new[kept]] = previous.refined[kept]
        refined[changed] = augment(x[changed], sims[changed], rows[changed], r.alpha, x)
        done = {"refined_again": int(len(changed))}
    else:
        refined, sims, rows = refine(x, r)
        done = {"refined_again": len(x)}
    meta = {**emb.meta, "refine": r.to_dict()}
    changes = {**emb.changes, **done}
    return dataclasses.replace(
        emb, refined=refined, neighbour_sims=sims, neighbour_rows=rows, meta=meta, changes=changes
    )


def unrefined(emb):
    """``emb`` without its refinement (``udml embed --no-refine``)."""
    import dataclasses

    meta = {k: v for k, v in emb.meta.items() if k != "refine"}
    return dataclasses.replace(emb, refined=None, neighbour_sims=None, neighbour_rows=None, meta=meta)
