"""Retrieval metrics for class-disjoint test sets: Recall@K, MAP@R and NMI.

Embeddings are compared by inner product, so pass L2-normalised embeddings to get cosine
similarity. Everything runs on the embeddings' device, chunk by chunk of queries, so memory
stays bounded by ``chunk_size x gallery size``.

``evaluate`` ranks neighbours exactly as float64 inner products do (items with exactly equal
similarities in any order), whatever precision it computes in: see ``_exact_neighbours``.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from udml.clustering import assignment_nmi, kmeans

from .errors import InputError, InvalidType

__all__ = ["evaluate", "knn", "map_at_r", "nmi", "recall_at_k"]


def knn(
    query: Tensor,
    gallery: Tensor,
    k: int,
    *,
    exclude: Tensor | None = None,
    chunk_size: int = 1024,
) -> tuple[Tensor, Tensor]:
    """Exact ``k`` nearest gallery items of every query by inner-product similarity.

    ``exclude`` (int64 [Nq]) names one gallery index per query to leave out (``-1``: none), e.g.
    ``arange(N)`` when the queries are the gallery. Exclusion is by index, so an exact duplicate
    of the query at another index is still found. Returns ``(similarities, indices)``, both
    [Nq, k], sorted by decreasing similarity.
    """
    _check_embeddings(query, "query")
    _check_embeddings(gallery, "gallery")
    if query.shape[1] != gallery.shape[1]:
        raise InputError(
            f"knn: query and gallery dimensions differ ({query.shape[1]} vs {gallery.shape[1]}); "
            "embed both with the same model"
        )
    if query.device != gallery.device:
        raise InputError(f"knn: query is on {query.device} but gallery on {gallery.device}; move both to one device")
    k = _check_positive_int(k, "knn: k")
    chunk_size = _check_positive_int(chunk_size, "knn: chunk_size")
    nq, ng = query.shape[0], gallery.shape[0]
    usable = ng
    if exclude is not None:
        exclude = _check_exclude(exclude, nq, ng).to(query.device)
        if bool((exclude >= 0).any()):
            usable = ng - 1
    if k > usable:
        raise InputError(
            f"knn: k={k} neighbours requested but only {usable} gallery items are usable "
            f"(gallery size {ng}{', minus the excluded item' if usable < ng else ''}); "
            f"use k <= {usable}"
        )
    dtype = torch.promote_types(query.dtype, gallery.dtype)
    if dtype in (torch.float16, torch.bfloat16) and query.device.type == "cpu":
        dtype = torch.float32
    query, gallery_t = query.to(dtype), gallery.to(dtype).t()

    sims = torch.empty(nq, k, dtype=dtype, device=query.device)
    idx = torch.empty(nq, k, dtype=torch.int64, device=query.device)
    for start in range(0, nq, chunk_size):
        end = min(start + chunk_size, nq)
        s = query[start:end] @ gallery_t
        if exclude is not None:
            ex = exclude[start:end]
            rows = torch.nonzero(ex >= 0).flatten()
            s[rows, ex[rows]] = float("-inf")
        sims[start:end], idx[start:end] = torch.topk(s, k, dim=1, largest=True, sorted=True)
    return sims, idx


def recall_at_k(neighbor_labels: Tensor, query_labels: Tensor, ks: Sequence[int]) -> dict[int, float]:
    """Fraction (0-1) of queries with a same-label item among their first ``k`` neighbours.

    ``neighbor_labels`` [Nq, M] holds the labels of each query's neighbours, nearest first.
    """
    neighbor_labels, query_labels = _check_neighbor_labels(neighbor_labels, query_labels)
    ks = _check_ks(ks, neighbor_labels.shape[1], "recall_at_k")
    hits = _recall_hits(neighbor_labels, query_labels, ks)
    return {k: float(h.double().mean()) for k, h in hits.items()}


def map_at_r(neighbor_labels: Tensor, query_labels: Tensor, r: Tensor) -> float:
    """MAP@R (Musgrave et al., "A Metric Learning Reality Check", 2020).

    For a query with R relevant gallery items (``r[i]``, the query itself not counted),
    AP@R = (1/R) * sum_{i<=R} P(i) * rel(i), with P(i) the precision among the first i
    neighbours. Queries with R = 0 are skipped; the result is the mean over the rest.
    """
    neighbor_labels, query_labels = _check_neighbor_labels(neighbor_labels, query_labels)
    r = _check_r(r, query_labels.shape[0]).to(neighbor_labels.device)
    valid = r > 0
    if not bool(valid.any()):
        raise InputError("map_at_r: no query has a relevant gallery item (all r are 0); MAP@R is undefined")
    max_r = int(r.max())
    if max_r > neighbor_labels.shape[1]:
        raise InputError(
            f"map_at_r: a query has r={max_r} relevant items but only "
            f"{neighbor_labels.shape[1]} neighbours were given; retrieve at least max(r) "
            "neighbours"
        )
    ap = _average_precision_at_r(neighbor_labels, query_labels, r)
    return float(ap[valid].mean())


def nmi(embeddings: Tensor, labels: Tensor, *, seed: int = 0, backend: str = "auto") -> float:
    """NMI between ``labels`` and k-means on ``embeddings`` with K = number of distinct labels."""
    _check_embeddings(embeddings, "embeddings")
    labels = _check_labels(labels, embeddings.shape[0], "labels")
    n_classes = int(torch.unique(labels).numel())
    if n_classes < 2:
        raise InputError(f"nmi: labels hold {n_classes} distinct class; NMI needs at least 2 classes")
    result = kmeans(embeddings, n_classes, seed=seed, backend=backend)
    return assignment_nmi(result.labels, labels.cpu())


def evaluate(
    embeddings: Tensor,
    labels: Tensor,
    *,
    recall_ks: Sequence[int] = (1, 2, 4, 8),
    compute_nmi: bool = True,
    compute_map_at_r: bool = True,
    query: Tensor | None = None,
    query_labels: Tensor | None = None,
    chunk_size: int = 1024,
    seed: int = 0,
) -> dict[str, float]:
    """Recall@K, MAP@R and NMI of a class-disjoint test set, as fractions in 0-1.

    Default: every item is a query against all the others. With ``query``/``query_labels``
    (In-Shop style) those queries are searched in the gallery ``embeddings`` with nothing
    excluded; NMI is then computed on the gallery. Returns e.g.
    ``{"recall@1": 0.55, "recall@2": ..., "map@r": 0.2, "nmi": 0.6}``.
    """
    _check_embeddings(embeddings, "embeddings")
    n = embeddings.shape[0]
    device = embeddings.device
    labels = _check_labels(labels, n, "labels").to(device)
    chunk_size = _check_positive_int(chunk_size, "evaluate: chunk_size")
    if (query is None) != (query_labels is None):
        raise InputError("evaluate: pass both query and query_labels, or neither")

    if query is None:
        queries, q_labels = embeddings, labels
        exclude = torch.arange(n, device=device)
        usable, where = n - 1, f"the gallery has {n} items minus the query itself"
    else:
        _check_embeddings(query, "query")
        if query.shape[1] != embeddings.shape[1]:
            raise InputError(
                f"evaluate: query dimension {query.shape[1]} differs from the gallery's "
                f"{embeddings.shape[1]}; embed both with the same model"
            )
        queries = query.to(device)
        q_labels = _check_labels(query_labels, query.shape[0], "query_labels").to(device)
        exclude = None
        usable, where = n, f"the gallery has {n} items"

    ks = check_recall_ks(recall_ks, usable, f"{where}, so at most {usable} neighbours exist", "evaluate: ")

    # R for each query: relevant gallery items, the query itself not counted.
    classes, counts = torch.unique(labels, return_counts=True)
    pos = torch.searchsorted(classes, q_labels).clamp_max_(classes.numel() - 1)
    r = torch.where(classes[pos] == q_labels, counts[pos], torch.zeros_like(counts[pos]))
    if exclude is not None:
        r = r - 1
    if compute_map_at_r and not bool((r > 0).any()):
        raise InputError(
            "evaluate: no query has another item of its class in the gallery, so MAP@R is "
            "undefined; pass compute_map_at_r=False"
        )
    k_max = max(ks[-1] if ks else 0, int(r.max()) if compute_map_at_r else 0)

    hit_counts = {k: 0 for k in ks}
    ap_sum, ap_count = 0.0, 0
    if k_max > 0:
        idx = _exact_neighbours(
            queries,
            embeddings,
            k_max,
            self_search=exclude is not None,
            chunk_size=chunk_size,
            labels=labels,
            query_labels=q_labels,
        )
        nl = labels[idx]
        for k, h in _recall_hits(nl, q_labels, ks).items():
            hit_counts[k] = int(h.sum())
        if compute_map_at_r:
            valid = r > 0
            ap_sum = float(_average_precision_at_r(nl, q_labels, r)[valid].sum())
            ap_count = int(valid.sum())

    out = {f"recall@{k}": hit_counts[k] / queries.shape[0] for k in ks}
    if compute_map_at_r:
        out["map@r"] = ap_sum / ap_count
    if compute_nmi:
        out["nmi"] = nmi(embeddings, labels, seed=seed)
    return {key: float(v) for key, v in out.items()}


# --------------------------------------------------------------------------------------------
# exact neighbours for evaluate

# Float32 candidates fetched per query beyond the k needed, max(8, k / 8): they let
# _exact_neighbours prove that its float64 re-ranking of near-ties saw every item that can be in
# the float64 top k.
_EXTRA_CANDIDATES = 8
# Largest side of _self_knn's tiles: per similarity, 4096 was faster than 2048 and 1024 (less
# Python and numpy overhead per tile, better floors from the diagonal tiles) on 2 CPU cores.
_MAX_TILE = 4096


def _exact_neighbours(
    query: Tensor,
    gallery: Tensor,
    k: int,
    *,
    self_search: bool,
    chunk_size: int,
    labels: Tensor | None = None,
    query_labels: Tensor | None = None,
) -> Tensor:
    """Indices [Nq, k] of each query's ``k`` most similar gallery items, nearest first, in the
    order of float64 inner products (exactly equal ones in any order). ``self_search``: the
    queries are the gallery, each left out of its own list by index. With ``labels`` (of the
    gallery) and ``query_labels``, only up to swaps of items that are equally relevant to the
    query (of its label or not), which leave Recall@K and MAP@R unchanged.

    Similarities are computed in float32 (float64 for float64 inputs): on the CPU all against
    all with each pair once (``_self_knn``) where that pays (``_tiled``), else chunk by chunk of
    queries (``knn``), with max(8, k / 8) extra candidates per query. Float32 rounding can only
    swap items whose similarities lie within ``tol`` of each other (``_float32_tolerance``), so
    only runs of such near-ties (that mix relevant and other items, given labels) are recomputed
    in float64 and re-sorted in place. A query whose last candidate is within ``tol`` of its k-th
    (so that an item not fetched might belong to its top k) is searched again in float64 in full.
    """
    dtype = torch.float64 if torch.float64 in (query.dtype, gallery.dtype) else torch.float32
    usable = gallery.shape[0] - int(self_search)
    kk = k if dtype == torch.float64 else min(usable, k + max(_EXTRA_CANDIDATES, k // 8))
    q, g = query.to(dtype), gallery.to(dtype)
    tile = max(chunk_size, min(_MAX_TILE, math.isqrt(chunk_size * q.shape[0])))  # <= chunk_size x N
    if self_search and q.device.type == "cpu" and _tiled(q.shape[0], kk, tile):
        sims, idx = _self_knn(q, kk, tile)
    else:
        exclude = torch.arange(q.shape[0], device=q.device) if self_search else None
        sims, idx = knn(q, g, kk, exclude=exclude, chunk_size=chunk_size)
    if dtype == torch.float64:
        return idx
    out = idx[:, :k].clone()
    if kk == 1:
        return out

    # in float32: differences of float32 values are exact to far below the margin of 2 in tol
    tol = _float32_tolerance(query, gallery).to(sims.dtype).unsqueeze(1)
    tie = (sims[:, :-1] - sims[:, 1:]) <= tol
    covered = (sims[:, k - 1] - sims[:, -1] > tol[:, 0]) | (kk == usable)
    rows = (tie[:, :k].any(dim=1) & covered).nonzero().flatten()  # a near-tie in or at the top k
    if rows.numel():
        tie, idx_r = tie[rows], idx[rows]
        run = torch.cat([torch.zeros_like(idx_r[:, :1]), (~tie).cumsum(dim=1)], dim=1)  # runs of near-ties
        near = torch.zeros(idx_r.shape, dtype=torch.bool, device=idx.device)  # in a run of two or more
        near[:, :-1] |= tie
        near[:, 1:] |= tie
        near &= run <= run[:, k - 1 : k]  # the top k come from these runs
        if labels is not None:  # runs whose items are all relevant, or none, need no float64
            relevant = (labels[idx_r] == query_labels[rows].unsqueeze(1)).long()
            n_relevant = torch.zeros_like(run).scatter_add_(1, run, relevant)
            size = torch.zeros_like(run).scatter_add_(1, run, torch.ones_like(run))
            near &= ((n_relevant > 0) & (n_relevant < size)).gather(1, run)
        some = near.any(dim=1).nonzero().flatten()
        rows, near, run, idx_r = rows[some], near[some], run[some], idx_r[some]
        r, c = near.nonzero(as_tuple=True)
        value = sims[rows].double()
        value[r, c] = _float64_dots(query, rows[r], gallery, idx_r[r, c])
        order = value.argsort(dim=1, descending=True, stable=True)  # each run re-sorted in place
        order = order.gather(1, run.gather(1, order).argsort(dim=1, stable=True))
        out[rows] = idx_r.gather(1, order[:, :k])
    redo = (~covered).nonzero().flatten()
    if redo.numel():
        g64 = gallery.double()
        for start in range(0, redo.numel(), chunk_size):
            r = redo[start : start + chunk_size]
            _, out[r] = knn(query[r].double(), g64, k, exclude=r if self_search else None, chunk_size=chunk_size)
    return out


def _float64_dots(a: Tensor, i: Tensor, b: Tensor, j: Tensor) -> Tensor:
    """float64 inner products of rows ``a[i]`` and ``b[j]`` (float64 [len(i)]), in blocks: fresh
    large arrays cost page faults. On the CPU with numpy, measured 2-3 times faster than torch's
    small operations on a busy 2-core machine."""
    out = torch.empty(i.numel(), dtype=torch.float64, device=a.device)
    on_cpu = a.device.type == "cpu"
    if on_cpu:
        a, b, i, j, out = a.detach().numpy(), b.detach().numpy(), i.numpy(), j.numpy(), out.numpy()
    for s in range(0, len(out), 4096):
        x, y = a[i[s : s + 4096]], b[j[s : s + 4096]]
        if on_cpu:
            out[s : s + 4096] = np.einsum("ij,ij->i", x.astype(np.float64), y.astype(np.float64))
        else:
            out[s : s + 4096] = torch.linalg.vecdot(x.double(), y.double())
    return torch.from_numpy(out) if on_cpu else out


def _tiled(n: int, k: int, tile: int) -> bool:
    """Whether ``_self_knn`` is worth it over ``knn`` on N x N with k neighbours: measured on 2
    cores, with at least 4 tiles a side (it skips 3/8 to 1/2 of the products) and k small against
    a tile (its merges and the diagonal tiles' top k grow with k)."""
    return n >= 4 * tile and 16 * k <= tile


def _float32_tolerance(query: Tensor, gallery: Tensor) -> Tensor:
    """Per query (float64 [Nq]): two float32 inner products of it that differ by more than this
    are in the order of the exact (and float64) ones. It is 4 x gamma_D ||q|| max ||g||, gamma_D =
    D u / (1 - D u), u = 2^-24: the bound on a float32 dot product's error in any summation order
    (Higham, Accuracy and Stability of Numerical Algorithms, 3.1), for either of the two, with a
    margin for the float64 reference's own rounding and the norms'; plus the rounding of the
    inputs where torch lets float32 matrix products use TF32 or bfloat16."""
    d = query.shape[1]
    u = 2.0**-24
    gamma = d * u / (1 - d * u)
    u_in = {"highest": 0.0, "high": 2.0**-11}.get(torch.get_float32_matmul_precision(), 2.0**-8)
    if query.device.type == "cuda" and torch.backends.cuda.matmul.allow_tf32:
        u_in = max(u_in, 2.0**-11)
    norms = torch.linalg.vector_norm(query.float(), dim=1).double()  # relative error ~ gamma_D
    largest = norms.max() if gallery is query else torch.linalg.vector_norm(gallery.float(), dim=1).max()
    return 4 * (gamma + 2 * u_in + u_in**2) * norms * float(largest)


def _self_knn(x: Tensor, k: int, tile: int) -> tuple[Tensor, Tensor]:
    """``knn(x, x, k, exclude=arange(N))`` for x on the CPU, computing each similarity once: tile
    by tile of the upper triangle of x x^T, each tile serving its rows and, transposed, its
    columns. Every row keeps its k best so far, sorted; its k-th best is its floor. The diagonal
    tiles come first and give the first floors; of every other tile, only the entries above the
    floor of their row or of their column (a few per row) are merged into the lists, which
    raises the floors for the next tiles. The entries are selected and merged with numpy, whose
    single-threaded comparisons and flatnonzero were measured 4 and 15 times faster than torch's
    on a busy 2-core machine. Returns (similarities, indices) [N, k] as ``knn``."""
    x = x.detach().contiguous()
    n = x.shape[0]
    tile = min(tile, n)
    vals_t = x.new_full((n, k), float("-inf"))
    idx_t = torch.zeros(n, k, dtype=torch.int64)
    for a in range(0, n, tile):
        e = min(a + tile, n)
        m = min(k, e - a - 1)
        if m > 0:
            s = x[a:e] @ x[a:e].t()
            s.fill_diagonal_(float("-inf"))
            vals_t[a:e, :m], j = s.topk(m, dim=1)
            idx_t[a:e, :m] = j + a
    vals, idx = vals_t.numpy(), idx_t.numpy()
    floor = vals[:, -1]  # a view: follows the merges
    s_buf = torch.empty(tile * tile, dtype=x.dtype).numpy()  # reused: a new one costs page faults
    above = np.empty(tile * tile, dtype=bool)
    for a in range(0, n - tile, tile):
        for b in range(a + tile, n, tile):
            width = min(b + tile, n) - b
            s = s_buf[: tile * width].reshape(tile, width)
            torch.mm(x[a : a + tile], x[b : b + width].t(), out=torch.from_numpy(s))
            mask = above[: s.size].reshape(s.shape)
            r, c = np.divmod(np.flatnonzero(np.greater(s, floor[a : a + tile, None], out=mask)), width)
            _merge(vals[a : a + tile], idx[a : a + tile], r, c + b, s[r, c])
            r, c = np.divmod(np.flatnonzero(np.greater(s, floor[b : b + width], out=mask)), width)
            by_column = np.argsort(c, kind="stable")
            r, c = r[by_column], c[by_column]
            _merge(vals[b : b + width], idx[b : b + width], c, r + a, s[r, c])
    return vals_t, idx_t


def _merge(vals: np.ndarray, idx: np.ndarray, rows: np.ndarray, items: np.ndarray, v: np.ndarray) -> None:
    """Merge candidates (similarity ``v`` of row ``rows`` to item ``items``; ``rows`` ascending)
    into the k-best lists ``vals``/``idx`` [R, k] of the rows, sorted by decreasing similarity."""
    if rows.size == 0:
        return
    k = vals.shape[1]
    counts = np.bincount(rows, minlength=vals.shape[0])
    rank = np.arange(rows.size) - (np.cumsum(counts) - counts)[rows]
    both_v = np.full((vals.shape[0], k + counts.max()), -np.inf, dtype=vals.dtype)
    both_i = np.zeros(both_v.shape, dtype=idx.dtype)
    both_v[:, :k], both_i[:, :k] = vals, idx
    both_v[rows, k + rank], both_i[rows, k + rank] = v, items
    best = np.argsort(-both_v, axis=1, kind="stable")[:, :k]
    vals[:] = np.take_along_axis(both_v, best, axis=1)
    idx[:] = np.take_along_axis(both_i, best, axis=1)


# --------------------------------------------------------------------------------------------
# helpers


def _recall_hits(nl: Tensor, ql: Tensor, ks: Sequence[int]) -> dict[int, Tensor]:
    match = nl == ql.unsqueeze(1)
    return {k: match[:, :k].any(dim=1) for k in ks}


def _average_precision_at_r(nl: Tensor, ql: Tensor, r: Tensor) -> Tensor:
    """AP@R per query (float64 [Nq]); 0 where r == 0. Needs nl.shape[1] >= max(r)."""
    max_r = int(r.max()) if r.numel() else 0
    if max_r == 0:
        return torch.zeros(nl.shape[0], dtype=torch.float64, device=nl.device)
    ranks = torch.arange(1, max_r + 1, device=nl.device)
    rel = (nl[:, :max_r] == ql.unsqueeze(1)) & (ranks.unsqueeze(0) <= r.unsqueeze(1))
    precision = rel.cumsum(dim=1).double() / ranks.double()
    return (precision * rel).sum(dim=1) / r.clamp_min(1).double()


def _check_embeddings(x: Tensor, name: str) -> None:
    if not isinstance(x, Tensor):
        raise InvalidType(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 2 or x.shape[0] == 0:
        raise InputError(f"{name} must be a non-empty 2-D tensor [N, D], got {list(x.shape)}")
    if not x.is_floating_point():
        raise InputError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")


def _check_labels(labels: Tensor, n: int, name: str) -> Tensor:
    if not isinstance(labels, Tensor):
        raise InvalidType(f"{name} must be a torch.Tensor, got {type(labels).__name__}")
    if labels.dim() != 1 or labels.shape[0] != n:
        raise InputError(f"{name} must be 1-D with one label per embedding ({n}), got shape {list(labels.shape)}")
    if labels.is_floating_point() or labels.is_complex():
        raise InputError(f"{name} must hold integer class ids, got dtype {labels.dtype}")
    return labels.long()


def _check_neighbor_labels(nl: Tensor, ql: Tensor) -> tuple[Tensor, Tensor]:
    if not isinstance(nl, Tensor) or nl.dim() != 2:
        raise InputError(
            "neighbor_labels must be a 2-D tensor [Nq, M] of neighbour labels, got "
            f"{list(nl.shape) if isinstance(nl, Tensor) else type(nl).__name__}"
        )
    ql = _check_labels(ql, nl.shape[0], "query_labels").to(nl.device)
    return nl.long(), ql


def _check_r(r: Tensor, nq: int) -> Tensor:
    if not isinstance(r, Tensor) or r.dim() != 1 or r.shape[0] != nq:
        raise InputError(f"r must be a 1-D tensor with one count per query ({nq})")
    if r.is_floating_point() or bool((r < 0).any()):
        raise InputError("r must hold non-negative integer counts of relevant gallery items")
    return r.long()


def check_recall_ks(recall_ks: Sequence[int], usable: int, where: str, prefix: str = "") -> list[int]:
    """The sorted Ks, each at most ``usable`` (the neighbours a query has; ``where`` says why, for the
    message)."""
    ks = _check_ks(recall_ks, None, prefix.rstrip(": ") or "recall_ks")
    if ks and ks[-1] > usable:
        raise InputError(f"{prefix}recall_ks asks for Recall@{ks[-1]} but {where}; use recall_ks values <= {usable}")
    return ks


def _check_ks(ks: Sequence[int], available: int | None, where: str) -> list[int]:
    if isinstance(ks, int):
        ks = [ks]
    ks = list(ks)
    ks = sorted({_check_positive_int(k, f"{where}: each K in ks") for k in ks})
    if available is not None and ks and ks[-1] > available:
        raise InputError(
            f"{where}: K={ks[-1]} but only {available} neighbours per query were given; "
            f"retrieve at least {ks[-1]} neighbours or use K <= {available}"
        )
    return ks


def _check_exclude(exclude: Tensor, nq: int, ng: int) -> Tensor:
    if not isinstance(exclude, Tensor) or exclude.dim() != 1 or exclude.shape[0] != nq:
        raise InputError(f"knn: exclude must be a 1-D int64 tensor with one gallery index per query ({nq})")
    if exclude.is_floating_point():
        raise InputError(f"knn: exclude must hold integer indices, got dtype {exclude.dtype}")
    exclude = exclude.long()
    if bool(((exclude < -1) | (exclude >= ng)).any()):
        raise InputError(
            f"knn: exclude values must be -1 (none) or a gallery index in [0, {ng}); got "
            f"min {int(exclude.min())}, max {int(exclude.max())}"
        )
    return exclude


def _check_positive_int(value: int, name: str) -> int:
    try:
        as_int = operator.index(value)
    except TypeError:
        as_int = None
    if isinstance(value, bool) or as_int is None or as_int < 1:
        raise InputError(f"{name} must be a positive int, got {value!r}")
    return as_int
