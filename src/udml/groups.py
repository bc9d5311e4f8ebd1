"""Groups and near-duplicates in a collection's embeddings (``udml cluster``).

Scores are cosine similarities of L2-normalised embeddings, in [-1, 1] (1: the same embedding). Two ways to
group, both plain functions returning labels and a per-image score, as DeepCluster's clustering does:

- :func:`kmeans_groups`: K groups (spherical k-means, as training's pseudo-labels); the score is each image's
  similarity to its group's centre.
- :func:`threshold_groups`: images linked when one is among the other's ``neighbours`` nearest and their
  similarity is at least ``threshold``; groups are the connected sets, an image linked to none is in no group
  (-1). The score is the similarity to the nearest member. :func:`near_duplicates` is this with a high
  threshold (copies, resized or recompressed versions of one photo).
"""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path

import numpy as np
import torch

from .clustering import kmeans
from .config import default_num_clusters
from .errors import InputError, MissingPath
from .evaluation import knn
from .rundir import atomic_write

DUPLICATE_THRESHOLD = (
    0.9  # Lite0 on CUB photos: copies (resized 3/4, JPEG q50) >= 0.92, distinct photos of a species <= 0.81
)
NEIGHBOURS = 16


def _check(embeddings) -> torch.Tensor:
    x = torch.as_tensor(np.asarray(embeddings, dtype=np.float32))
    if x.ndim != 2 or len(x) < 2:
        raise InputError(f"grouping needs at least 2 embeddings as an [N, D] array, got shape {tuple(x.shape)}")
    return torch.nn.functional.normalize(x, dim=1)


def kmeans_groups(
    embeddings, k: int | None = None, *, seed: int = 0, two_level: bool = False
) -> tuple[np.ndarray, np.ndarray, int]:
    """(group of each image in 0..K-1, similarity to its group's centre, K); K by default as training chooses
    it (about 50 images a group: :func:`udml.config.default_num_clusters`). Groups are numbered by size,
    largest first. ``two_level``: :func:`two_level_kmeans` instead of one k-means over all K centres (what
    ``udml cluster`` does above EXACT_UP_TO images)."""
    x = _check(embeddings)
    k = default_num_clusters(len(x)) if k is None else int(k)
    if not 2 <= k <= len(x):
        raise InputError(f"udml cluster: k={k} groups for {len(x)} images; choose k between 2 and {len(x)}")
    if two_level:
        labels, centres = two_level_kmeans(x, k, seed=seed)
    else:
        result = kmeans(x, k, seed=seed, spherical=True)
        labels, centres = result.labels, result.centroids
    centres = torch.nn.functional.normalize(centres, dim=1)
    score = (x * centres[labels]).sum(1)
    return _by_size(labels.numpy()), score.numpy(), k


def two_level_kmeans(x: torch.Tensor, k: int, *, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(labels [N] in 0..k-1, centres [k, D]) of spherical k-means in two levels: about sqrt(k) coarse clusters
    of all rows, then each coarse cluster split by its own k-means into a share of the k groups proportional to
    its size. A pass costs about 2 N sqrt(k) D against N k D for one level, and since the default K grows with N
    (about 50 images a group, up to 10,000) one level is quadratic in N; the price is that a group never spans two
    coarse clusters.
    The scheme of faiss.contrib.clustering.two_level_clustering, which returns centres only: here each row keeps
    the group it was placed in. ``x``: L2-normalised rows."""
    n = len(x)
    coarse = kmeans(x, max(2, min(k, round(math.sqrt(k)))), seed=seed, spherical=True)
    sizes = torch.bincount(coarse.labels, minlength=len(coarse.centroids))
    shares = _shares(sizes, k)
    order = torch.argsort(coarse.labels, stable=True)
    labels = torch.empty(n, dtype=torch.long)
    centres, start, first = [], 0, 0
    for c, (size, share) in enumerate(zip(sizes.tolist(), shares.tolist())):
        rows = order[start : start + size]
        start += size
        if share == 0:
            continue
        if share == 1:
            labels[rows] = first
            centres.append(x[rows].mean(0, keepdim=True))
        elif share == size:  # as many groups as rows: one each
            labels[rows] = first + torch.arange(size)
            centres.append(x[rows])
        else:
            fine = kmeans(x[rows], share, seed=seed + 1 + c, spherical=True)
            labels[rows] = first + fine.labels
            centres.append(fine.centroids)
        first += share
    return labels, torch.cat(centres)


def _shares(sizes: torch.Tensor, k: int) -> torch.Tensor:
    """k split over clusters of these sizes in proportion (largest remainders), each non-empty cluster at least
    1 and at most its size; sums to k when k is between the non-empty count and sizes.sum()."""
    exact = sizes.double() * k / sizes.sum()
    shares = torch.minimum(torch.maximum(exact.floor().long(), (sizes > 0).long()), sizes)
    while int(shares.sum()) != k:
        if int(shares.sum()) < k:  # one more where the proportion is furthest above what it has
            gap = torch.where(shares < sizes, exact - shares, torch.tensor(-float("inf"), dtype=torch.double))
            shares[int(gap.argmax())] += 1
        else:  # one fewer where it is furthest below
            gap = torch.where(shares > 1, shares - exact, torch.tensor(-float("inf"), dtype=torch.double))
            shares[int(gap.argmax())] -= 1
    return shares


def nearest_neighbours(
    embeddings, neighbours: int = NEIGHBOURS, *, exact: bool | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(similarities, indices) [N, k] of each image's ``neighbours`` nearest other images, best first. Compute once,
    pass as ``near`` to the functions below.

    ``exact``: True, every pair compared (udml.evaluation.knn, N x N similarities in chunks: quadratic in N);
    False, faiss's HNSW graph (:func:`approximate_neighbours`: about N log N, may miss a neighbour); None (default):
    exact up to EXACT_UP_TO images, approximate above where faiss is installed. Similarities are the true ones
    either way, so a pair found is a true pair: the approximation can only miss pairs, never invent them."""
    x = _check(embeddings)
    k = min(neighbours, len(x) - 1)
    if approximate(len(x), exact):
        return approximate_neighbours(x, k)
    return knn(x, x, k, exclude=torch.arange(len(x)))


def approximate(n: int, exact: bool | None = None, *, neighbours: bool = True) -> bool:
    """Whether ``udml cluster`` of ``n`` images takes the approximate path: faiss's HNSW graph for the neighbours
    (:func:`nearest_neighbours`; exact where faiss is missing) or, with ``neighbours=False``, two-level k-means."""
    from .clustering import faiss_available

    return not exact and (exact is False or n > EXACT_UP_TO) and (faiss_available() or not neighbours)


# udml cluster's exact pass up to here: at 100,000 x 512-d on 2 cores it took 84 s against the HNSW graph's 137 s
# (whole commands, RESULTS.md, issue #30); quadratic against N log N, they cross near 200,000 (udml index's choice too)
EXACT_UP_TO = 200_000
HNSW_M, HNSW_EF_CONSTRUCTION, HNSW_EF_SEARCH = 32, 80, 128


def approximate_neighbours(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's ``k`` nearest other rows by inner product from faiss's HNSW graph (IndexHNSWFlat, M 32,
    efConstruction 80, efSearch 128): found by walking the graph, so a true neighbour may be missed, but every
    similarity returned is computed exactly. The row itself is dropped (it is found first; where several rows are
    identical, by position)."""
    import faiss

    data = np.ascontiguousarray(x.numpy(), dtype=np.float32)
    index = faiss.IndexHNSWFlat(data.shape[1], HNSW_M, faiss.METRIC_INNER_PRODUCT)
    index.hnsw.efConstruction = HNSW_EF_CONSTRUCTION
    index.add(data)
    index.hnsw.efSearch = max(HNSW_EF_SEARCH, k + 1)
    sims, ids = index.search(data, k + 1)
    own = ids == np.arange(len(data))[:, None]
    drop = np.where(own.any(1), own.argmax(1), k)  # the row itself, else the last (the (k+1)-th) candidate
    keep = np.ones_like(own)
    keep[np.arange(len(data)), drop] = False
    sims, ids = sims[keep].reshape(len(data), k), ids[keep].reshape(len(data), k)
    missing = ids < 0  # fewer than k found (tiny graphs): marked with similarity -inf, pointing at the row itself
    ids = np.where(missing, np.arange(len(data))[:, None], ids)
    sims = np.where(missing, -np.inf, sims)
    return torch.from_numpy(sims.astype(np.float32)), torch.from_numpy(ids.astype(np.int64))


def threshold_groups(
    embeddings, threshold: float, *, neighbours: int = NEIGHBOURS, near: tuple | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """(group of each image, or -1 for one linked to none; similarity to its nearest other image). Groups are
    numbered by size, largest first. ``near``: :func:`nearest_neighbours` of ``embeddings``, if already computed."""
    if not -1 <= threshold <= 1:
        raise InputError(f"a cosine-similarity threshold lies in [-1, 1], got {threshold}")
    x = _check(embeddings)
    sims, idx = near if near is not None else nearest_neighbours(x, neighbours)
    parent = np.arange(len(x))

    def root(i):
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    rows, cols = torch.nonzero(sims >= threshold, as_tuple=True)
    for a, b in zip(rows.tolist(), idx[rows, cols].tolist()):
        ra, rb = root(a), root(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    labels = np.array([root(i) for i in range(len(x))])
    linked = np.zeros(len(x), dtype=bool)
    linked[rows.numpy()] = True
    linked[idx[rows, cols].numpy()] = True
    labels[~linked] = -1
    return _by_size(labels), sims[:, 0].numpy()


def near_duplicates(embeddings, threshold: float = DUPLICATE_THRESHOLD, **kw) -> tuple[np.ndarray, np.ndarray]:
    """:func:`threshold_groups` at a high threshold: sets of copies of one photo (exact, resized, recompressed)."""
    return threshold_groups(embeddings, threshold, **kw)


def _by_size(labels: np.ndarray) -> np.ndarray:
    """Relabel groups 0, 1, ... from the largest (ties: first appearance); -1 stays -1."""
    out = np.full(len(labels), -1, dtype=np.int64)
    grouped = labels >= 0
    if grouped.any():
        values, first, counts = np.unique(labels[grouped], return_index=True, return_counts=True)
        order = np.lexsort((first, -counts))
        rank = np.empty(len(values), dtype=np.int64)
        rank[order] = np.arange(len(values))
        out[grouped] = rank[np.searchsorted(values, labels[grouped])]
    return out


def nearest_neighbour_quantiles(embeddings, qs=(0.5, 0.9, 0.99, 0.999), *, near: tuple | None = None) -> dict:
    """Quantiles of each image's similarity to its nearest other image: the collection's own scale, from which
    to pick a threshold (duplicates sit in the top tail). ``near`` as in :func:`threshold_groups`."""
    sims, _ = near if near is not None else nearest_neighbours(embeddings, 1)
    return {f"q{q:g}": float(np.quantile(sims[:, 0].numpy(), q)) for q in qs}


GROUP_COLUMNS = ("path", "group", "group_score", "duplicate_group", "duplicate_score")


def group_rows(paths, group, group_score, duplicate, duplicate_score) -> list[dict]:
    return [
        {
            "path": p,
            "group": int(g),
            "group_score": round(float(s), 6),
            "duplicate_group": int(d),
            "duplicate_score": round(float(t), 6),
        }
        for p, g, s, d, t in zip(paths, group, group_score, duplicate, duplicate_score)
    ]


def write_groups(path, rows: list[dict], summary: dict) -> None:
    """``rows`` as CSV (a ``.csv`` path: one row per image, GROUP_COLUMNS) or JSON (``summary`` and ``images``)."""
    path = Path(path)
    if path.suffix.lower() == ".csv":
        text = io.StringIO()
        writer = csv.DictWriter(text, fieldnames=GROUP_COLUMNS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        data = text.getvalue().encode()
    elif path.suffix.lower() == ".json":
        data = json.dumps({**summary, "images": rows}, indent=1).encode()
    else:
        raise InputError(f"udml cluster: write groups to a .csv or a .json file, not {path.name}")
    atomic_write(path, lambda f: f.write(data), what="groups file", durable=False)


def read_groups(path) -> dict[str, dict]:
    """{image path: its row} from a file :func:`write_groups` wrote (CSV or JSON)."""
    path = Path(path)
    if not path.is_file():
        raise MissingPath(f"no groups file at {path}; write one with: udml cluster EMBEDDINGS -o {path}")
    try:
        if path.suffix.lower() == ".json":
            rows = json.loads(path.read_text())["images"]
        else:
            with open(path, newline="") as f:
                rows = list(csv.DictReader(f))
        out = {}
        for r in rows:
            out[r["path"]] = {
                "group": int(r["group"]),
                "group_score": float(r["group_score"]),
                "duplicate_group": int(r["duplicate_group"]),
                "duplicate_score": float(r["duplicate_score"]),
            }
        return out
    except (KeyError, ValueError, TypeError) as e:
        raise InputError(f"{path} is not a groups file from udml cluster ({type(e).__name__}: {e})") from e


def contact_sheet(path, paths, labels, scores, *, groups: int = 8, per_group: int = 8, cell: int = 96, title=None):
    """A PNG with one row per group, the largest first: its members by decreasing score (``labels`` numbered by
    size, -1 left out). Returns the path, or None when there is no group."""
    from .plots import retrieval_grid

    shown = min(groups, int(labels.max()) + 1)  # labels run 0, 1, ... by size; all -1: no group
    if shown < 1:
        return None
    queries, results, captions, heads = [], [], [], []
    for g in range(shown):
        members = np.flatnonzero(labels == g)
        members = members[np.argsort(-scores[members], kind="stable")][:per_group]
        queries.append(paths[members[0]])
        results.append([paths[i] for i in members[1:]])
        captions.append([f"{scores[i]:.3f}" for i in members[1:]])
        heads.append(f"group {g}: {int((labels == g).sum())}")
    return retrieval_grid(queries, results, path, captions=captions, query_captions=heads, cell=cell, title=title)
