"""K-means clustering for pseudo-labels (faiss on CPU, plain PyTorch anywhere).

Plain functions in the style of DeepCluster's ``clustering.py``: :func:`kmeans` returns a
:class:`KMeansResult` whose ``labels`` are the pseudo-labels and whose ``centroids`` can warm-start
the next clustering through ``init_centroids``.

Initialisation when ``init_centroids`` is not given (same rule for both backends): k-means++ for
``k <= 1024``; for larger ``k`` a uniform random sample of ``k`` distinct points, because
k-means++ needs ``k`` sequential passes over the data and would cost more than the whole
clustering at e.g. ``k = 10,000``.
"""

from __future__ import annotations

import functools
import math
import warnings
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .config import KMEANS_BACKENDS
from .errors import InputError, InvalidType, MissingPackage

__all__ = ["KMeansResult", "assignment_nmi", "faiss_available", "kmeans"]

KMEANS_PLUS_PLUS_MAX_K = 1024
# Upper bound on the [rows, K] distance block built during assignment.
_CHUNK_BYTES = 256 * 2**20
_CANDIDATES = 8  # nearest centroids by the bfloat16 matmul, re-ranked in float32


@dataclass
class KMeansResult:
    """Output of :func:`kmeans`; all tensors live on the CPU."""

    labels: torch.Tensor  # int64 [N]
    centroids: torch.Tensor  # float32 [K, D]
    inertia: float  # sum of squared distances of the points to their assigned centroid
    backend: str  # "faiss" or "torch"
    n_reseeded: int  # empty clusters re-seeded (torch) or split (faiss), summed over iterations
    iterations: int | None = None  # Lloyd iterations run (both backends stop early once nothing changes)

    def sizes(self) -> torch.Tensor:
        """Number of points in each cluster, int64 [K]."""
        return torch.bincount(self.labels, minlength=self.centroids.shape[0])

    def stats(self) -> dict:
        """Summary of the cluster sizes and the run, for logging."""
        sizes = self.sizes()
        return {
            "k": int(self.centroids.shape[0]),
            "empty": int((sizes == 0).sum()),
            "min": int(sizes.min()),
            "median": float(np.median(sizes.numpy())),
            "max": int(sizes.max()),
            "inertia": float(self.inertia),
            "backend": self.backend,
            "n_reseeded": int(self.n_reseeded),
            "iterations": self.iterations,
        }


@functools.lru_cache(maxsize=1)
def faiss_available() -> bool:
    """True when ``import faiss`` works."""
    try:
        import faiss  # noqa: F401
    except ImportError:
        return False
    return True


def kmeans(
    x: torch.Tensor | np.ndarray,
    k: int,
    *,
    niter: int = 20,
    init_centroids: torch.Tensor | np.ndarray | None = None,
    seed: int = 0,
    backend: str = "auto",
    device: str | torch.device | None = None,
    spherical: bool = False,
) -> KMeansResult:
    """Cluster the rows of ``x`` [N, D] into ``k`` clusters with Lloyd's k-means.

    ``spherical``: cosine k-means, the geometry of L2-normalised embeddings: the rows and the initial
    centroids are L2-normalised, and so is every centroid after its update, so that each point goes to
    the centroid of highest cosine similarity (faiss' ``spherical`` option; the same rule in PyTorch).

    ``backend``: ``"faiss"`` (faiss-cpu, runs on the CPU), ``"torch"`` (runs on ``device``,
    default ``x``'s device) or ``"auto"`` (faiss when it is installed and the work is on the CPU,
    else torch). ``init_centroids`` [k, D] warm-starts the clustering, e.g. from the previous
    round's centroids. The returned labels are the assignment to the returned centroids.
    """
    x = _as_float_matrix(x)
    n, d = x.shape
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
        raise InputError(f"kmeans: k must be an int, got {type(k).__name__} ({k!r})")
    k = int(k)
    if not 2 <= k <= n:
        raise InputError(
            f"kmeans: need 2 <= k <= N, got k={k} clusters for N={n} points; "
            f"choose k between 2 and {n} (or cluster more points)"
        )
    if isinstance(niter, bool) or not isinstance(niter, (int, np.integer)) or niter < 1:
        raise InputError(f"kmeans: niter must be a positive int, got {niter!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= seed < 2**31:
        raise InputError(f"kmeans: seed must be an int in [0, 2**31), got {seed!r}")
    if init_centroids is not None:
        init_centroids = _as_float_matrix(init_centroids, name="init_centroids")
        if tuple(init_centroids.shape) != (k, d):
            raise InputError(
                f"kmeans: init_centroids must have shape [k, D] = [{k}, {d}], got "
                f"{list(init_centroids.shape)}; pass one centroid per cluster with the data's "
                "dimension"
            )

    if spherical:
        x = torch.nn.functional.normalize(x, dim=1)
        if init_centroids is not None:
            init_centroids = torch.nn.functional.normalize(init_centroids, dim=1)
    backend = _resolve_backend(backend, x, device)
    if backend == "faiss":
        result = _kmeans_faiss(x, k, niter=niter, init_centroids=init_centroids, seed=int(seed), spherical=spherical)
    else:
        dev = torch.device(device) if device is not None else x.device
        result = _kmeans_torch(
            x.to(dev),
            k,
            niter=niter,
            init_centroids=init_centroids,
            seed=int(seed),
            spherical=spherical,
        )
    n_empty = int((result.sizes() == 0).sum())
    if n_empty:
        warnings.warn(
            f"kmeans: {n_empty} of {k} clusters are empty after re-seeding; the data probably "
            f"has fewer than k={k} distinct points",
            RuntimeWarning,
            stacklevel=2,
        )
    return result


def confident_members(
    features: torch.Tensor, labels: torch.Tensor, centroids: torch.Tensor, fraction: float, at_least: int = 1
) -> torch.Tensor:
    """Bool mask [N]: in each cluster the ``fraction`` of its members most similar to its centre (cosine; the
    features L2-normalised), at least ``at_least`` of them (or all when the cluster is smaller).

    The pseudo-labels of images far from their centre are the likeliest to be wrong; leaving them out of a round's
    batches is the simplest form of the confidence selection of ROUL and STML. ``fraction=1`` keeps every image."""
    labels = torch.as_tensor(labels, dtype=torch.long)
    if fraction >= 1:
        return torch.ones(len(labels), dtype=torch.bool)
    if not 0 < fraction:
        raise InputError(f"confident_fraction must be in (0, 1], got {fraction}")
    f = F.normalize(torch.as_tensor(features, dtype=torch.float32), dim=1)
    c = F.normalize(torch.as_tensor(centroids, dtype=torch.float32), dim=1)
    similarity = (f * c[labels]).sum(1)
    keep = torch.zeros(len(labels), dtype=torch.bool)
    order = torch.argsort(labels.double() * 4 - similarity.double(), stable=True)  # by cluster, most similar first
    sorted_labels = labels[order]
    sizes = torch.bincount(labels, minlength=len(c))
    starts = torch.cumsum(sizes, 0) - sizes
    rank = torch.arange(len(labels)) - starts[sorted_labels]  # position inside its cluster
    quota = torch.clamp(torch.ceil(sizes.float() * fraction).long(), min=at_least)
    keep[order] = rank < quota[sorted_labels]
    return keep


def assignment_nmi(a: torch.Tensor | np.ndarray, b: torch.Tensor | np.ndarray) -> float:
    """Normalized mutual information (sklearn, arithmetic mean) between two labelings."""
    from sklearn.metrics import normalized_mutual_info_score

    a_np, b_np = _as_label_array(a, "a"), _as_label_array(b, "b")
    if a_np.shape != b_np.shape:
        raise InputError(
            f"assignment_nmi: labelings must have the same length, got {a_np.shape[0]} and {b_np.shape[0]}"
        )
    return float(normalized_mutual_info_score(a_np, b_np))


# --------------------------------------------------------------------------------------------
# helpers


def _as_float_matrix(x: torch.Tensor | np.ndarray, name: str = "x") -> torch.Tensor:
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(x)
    if not isinstance(x, torch.Tensor):
        raise InvalidType(f"kmeans: {name} must be a torch.Tensor or numpy array, got {type(x)}")
    if x.dim() != 2:
        raise InputError(f"kmeans: {name} must be 2-D [N, D], got shape {list(x.shape)}")
    if not (x.is_floating_point() or x.dtype in (torch.int32, torch.int64, torch.uint8)):
        raise InputError(f"kmeans: {name} must hold real numbers, got dtype {x.dtype}")
    x = x.detach().to(torch.float32)
    if not bool(torch.isfinite(x).all()):
        raise InputError(f"kmeans: {name} contains NaN or Inf values; remove or fix those rows first")
    return x


def _as_label_array(a: torch.Tensor | np.ndarray, name: str) -> np.ndarray:
    if isinstance(a, torch.Tensor):
        a = a.detach().cpu().numpy()
    a = np.asarray(a)
    if a.ndim != 1:
        raise InputError(f"assignment_nmi: {name} must be 1-D, got shape {list(a.shape)}")
    return a


def _resolve_backend(backend: str, x: torch.Tensor, device: str | torch.device | None) -> str:
    if backend not in KMEANS_BACKENDS:
        raise InputError(f"kmeans: backend must be 'auto', 'faiss' or 'torch', got {backend!r}")
    on_cpu = (torch.device(device) if device is not None else x.device).type == "cpu"
    if backend == "auto":
        return "faiss" if on_cpu and faiss_available() else "torch"
    if backend == "faiss":
        if not faiss_available():
            raise MissingPackage(
                "kmeans: backend='faiss' needs the faiss package; `pip install faiss-cpu` or use backend='torch'"
            )
        if device is not None and not on_cpu:
            raise InputError(
                f"kmeans: backend='faiss' runs on the CPU but device={device!r}; use "
                "backend='torch' to cluster on that device"
            )
    return backend


def _kmeans_faiss(
    x: torch.Tensor,
    k: int,
    *,
    niter: int,
    init_centroids: torch.Tensor | None,
    seed: int,
    spherical: bool = False,
) -> KMeansResult:
    import faiss

    xn = np.ascontiguousarray(x.cpu().numpy(), dtype=np.float32)
    n, d = xn.shape
    params = dict(
        niter=niter,
        seed=seed,
        spherical=spherical,
        verbose=False,
        # faiss otherwise trains on a random subsample of k * 256 points.
        max_points_per_centroid=math.ceil(n / k) + 1,
        min_points_per_centroid=1,  # silences faiss' "please provide more points" warning
    )
    if init_centroids is None and k <= KMEANS_PLUS_PLUS_MAX_K:
        method = getattr(faiss, "ClusteringInitMethod_KMEANS_PLUS_PLUS", None)
        if method is not None:  # faiss < 1.12 only has random init
            params["init_method"] = method
    km = faiss.Kmeans(d, k, **params)
    init = None
    if init_centroids is not None:
        init = np.ascontiguousarray(init_centroids.cpu().numpy(), dtype=np.float32)
    km.train(xn, init_centroids=init)
    dist, labels = km.assign(xn)  # the last training assignment used the previous centroids
    return KMeansResult(
        labels=torch.from_numpy(labels.astype(np.int64)),
        centroids=torch.from_numpy(np.array(km.centroids, dtype=np.float32)),
        inertia=float(dist.astype(np.float64).sum()),
        backend="faiss",
        n_reseeded=int(sum(s["nsplit"] for s in km.iteration_stats)),
        iterations=len(km.iteration_stats),
    )


def _kmeans_torch(
    x: torch.Tensor,
    k: int,
    *,
    niter: int,
    init_centroids: torch.Tensor | None,
    seed: int,
    spherical: bool = False,
) -> KMeansResult:
    x = x.contiguous()
    gen = torch.Generator(device=x.device).manual_seed(seed)
    x_sq = (x * x).sum(1)
    if init_centroids is not None:
        centroids = init_centroids.to(x.device).clone()
    elif k <= KMEANS_PLUS_PLUS_MAX_K:
        centroids = _kmeans_plus_plus(x, x_sq, k, gen)
    else:
        idx = torch.randperm(x.shape[0], generator=gen, device=x.device)[:k]
        centroids = x[idx].clone()

    x_low = x.bfloat16() if _bf16_matmul_is_fast(x) and k > _CANDIDATES else None
    labels, d2 = _assign(x, centroids, x_sq, x_low=x_low)
    n_reseeded = iterations = 0
    for iterations in range(1, niter + 1):
        centroids, n_new = _update(x, labels, d2, centroids)
        if spherical:
            centroids = torch.nn.functional.normalize(centroids, dim=1)
        n_reseeded += n_new
        new_labels, d2 = _assign(x, centroids, x_sq, x_low=x_low)
        changed = bool((new_labels != labels).any())
        labels = new_labels
        if not changed and n_new == 0:
            break
    return KMeansResult(
        labels=labels.cpu(),
        centroids=centroids.cpu(),
        inertia=float(d2.double().sum()),
        backend="torch",
        n_reseeded=n_reseeded,
        iterations=iterations,
    )


def _kmeans_plus_plus(x: torch.Tensor, x_sq: torch.Tensor, k: int, gen: torch.Generator) -> torch.Tensor:
    """k-means++ seeding (Arthur & Vassilvitskii 2007): one distance update per new centre."""
    n = x.shape[0]
    centroids = torch.empty(k, x.shape[1], dtype=x.dtype, device=x.device)
    first = torch.randint(n, (1,), generator=gen, device=x.device)
    centroids[0] = x[first[0]]
    d2 = (x_sq - 2 * (x @ centroids[0]) + x_sq[first[0]]).clamp_min_(0)
    for i in range(1, k):
        # Inverse-CDF sampling in float64: no category limit (unlike multinomial) and exact
        # zero-width intervals for points already chosen.
        cdf = torch.cumsum(d2, 0, dtype=torch.float64)
        total = cdf[-1]
        u = torch.rand(1, generator=gen, device=x.device, dtype=torch.float64)
        if bool(total > 0):
            idx = torch.searchsorted(cdf, u * total, right=True).clamp_max_(n - 1)[0]
        else:  # every point coincides with a chosen centre
            idx = (u * n).long().clamp_max_(n - 1)[0]
        centroids[i] = x[idx]
        d2 = torch.minimum(d2, (x_sq - 2 * (x @ centroids[i]) + x_sq[idx]).clamp_min_(0))
    return centroids


def _bf16_matmul_is_fast(x: torch.Tensor) -> bool:
    """CPUs with oneDNN bfloat16 kernels (AVX512-BF16, AMX) multiply about 3x faster in bfloat16."""
    if x.device.type != "cpu" or x.dtype != torch.float32:
        return False
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def _assign(
    x: torch.Tensor,
    centroids: torch.Tensor,
    x_sq: torch.Tensor | None = None,
    chunk_rows: int | None = None,
    x_low: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest centroid of every row and its squared distance, chunk by chunk of rows.

    Uses ||x||^2 - 2 x.c + ||c||^2, so the work is one matmul per chunk; a chunk of the
    [N, K] distance matrix is at most ~256 MB. With ``x_low`` (x in bfloat16) the matmul runs in
    bfloat16 and only picks each row's _CANDIDATES nearest centroids; their distances are then
    recomputed in float32, so the result is the float32 one unless more than _CANDIDATES centroids
    lie within bfloat16 rounding (~1e-2) of the nearest.
    """
    n, k = x.shape[0], centroids.shape[0]
    if x_sq is None:
        x_sq = (x * x).sum(1)
    if chunk_rows is None:
        chunk_rows = max(1, _CHUNK_BYTES // (4 * k))
    c_sq = (centroids * centroids).sum(1)
    ct = centroids.t()
    labels = torch.empty(n, dtype=torch.int64, device=x.device)
    d2 = torch.empty(n, dtype=x.dtype, device=x.device)
    if x_low is not None:
        c_sq_low, ct_low = c_sq.bfloat16(), ct.bfloat16()
    for start in range(0, n, chunk_rows):
        end = min(start + chunk_rows, n)
        # ||c||^2 - 2 x.c: the per-row constant ||x||^2 does not change the argmin.
        if x_low is None:
            partial = torch.addmm(c_sq, x[start:end], ct, alpha=-2)
            vals, idx = partial.min(dim=1)
        else:
            partial = torch.addmm(c_sq_low, x_low[start:end], ct_low, alpha=-2)
            cand = partial.topk(_CANDIDATES, dim=1, largest=False, sorted=False).indices
            exact = c_sq[cand] - 2 * torch.bmm(centroids[cand], x[start:end, :, None]).squeeze(2)
            vals, j = exact.min(dim=1)
            idx = cand.gather(1, j[:, None]).squeeze(1)
        labels[start:end] = idx
        d2[start:end] = (vals + x_sq[start:end]).clamp_min_(0)
    return labels, d2


def _update(
    x: torch.Tensor, labels: torch.Tensor, d2: torch.Tensor, centroids: torch.Tensor
) -> tuple[torch.Tensor, int]:
    """New centroids as cluster means; empty clusters re-seeded with the farthest points.

    A point used as a new seed leaves its old cluster (as in scikit-learn), so the donor's mean
    is computed without it. Returns the centroids and the number of re-seeded clusters.
    """
    k = centroids.shape[0]
    counts = torch.bincount(labels, minlength=k)
    sums = torch.zeros_like(centroids).index_add_(0, labels, x)
    empty = torch.nonzero(counts == 0).flatten()
    n_empty = int(empty.numel())
    if n_empty:
        # Only take points whose cluster keeps at least one other member.
        score = torch.where(counts[labels] > 1, d2, torch.full_like(d2, -1.0))
        far = torch.topk(score, min(n_empty, x.shape[0]), sorted=True).indices
        far = far[score[far] >= 0]
        empty = empty[: far.numel()]
        donors = labels[far]
        sums.index_add_(0, donors, -x[far])
        counts = counts.index_add(0, donors, -torch.ones_like(donors))
        sums[empty] = x[far]
        counts[empty] = 1
    new = sums / counts.clamp_min(1).unsqueeze(1).to(sums.dtype)
    # A donor emptied by the moves above keeps its old centre and is re-seeded next round.
    still_empty = counts == 0
    new[still_empty] = centroids[still_empty]
    return new, int(empty.numel())
