"""SOP-scale clustering and evaluation on synthetic embeddings: time and peak memory of udml's k-means,
exact evaluation and faiss approximate search at N = 6k, 60k and 600k.

    python -m benchmarks.scale --sizes 6000 60000 600000

The data are SYNTHETIC, not SOP: N L2-normalised float32 embeddings of dimension 512 drawn around
C = round(N / 5.3) random class centres (SOP's test split: 60,502 images of 11,316 classes). Every class
gets at least 2 points, the rest are spread uniformly over the classes; a point is
normalise(centre + noise * g / sqrt(dim)), g standard normal, noise 2.2 by default: exact Recall@1 is
93% at 6k, 87% at 20k and falls further with N (more classes, more confusers). The noise dominates the
centre, so the data are close to isotropic: hard for IVF, and torch's k-means may stop after an
iteration or two. Labels are the classes. Fixed seed.

On a few CPU cores, cap the k-means iterations at 600k (its NMI k-means has K = 113k clusters):

    python -m benchmarks.scale --sizes 600000 --kmeans-iters 2

For each N, in a fresh subprocess so that peak memory is per size:

- k-means with K = min(10000, N // 5) (pseudo-labels), ``udml.clustering.kmeans``, each backend of
  ``--backends`` (faiss: CPU only; torch: on ``--device``), ``config.kmeans_iters`` iterations, or
  ``--kmeans-iters`` and a linear extrapolation to the default count.
- exact evaluation, ``udml.evaluation``, in its parts: kNN (``knn``, k = max(recall_ks, largest R), the
  query itself excluded, chunk by chunk of queries as ``evaluate`` does: the largest block is
  chunk x N similarities, never N x N), Recall@K and MAP@R from the neighbours (``recall_at_k``,
  ``map_at_r``), NMI (``kmeans`` with K = number of classes + ``assignment_nmi``, i.e. ``nmi``). When
  N <= ``--exact-query-limit`` the whole ``evaluate(..., compute_nmi=False)`` call is timed too and must
  agree with the parts; above it, a random subset of Q queries is searched in the full database and the
  times are extrapolated linearly to all N queries.
- approximate search with faiss (when installed), built by ``udml.index.build_index``: IndexFlatIP
  (exact reference), IndexIVFFlat (inner product, nlist = 4 sqrt(N) at most N / 39) at each ``--nprobe``,
  IndexHNSWFlat (M = 32) at each ``--ef-search``. Build time, search time of the Q queries (k = 2, the query
  itself dropped), Recall@1 by class against exact search on the same queries (the loss in points), and
  the share of queries whose approximate nearest neighbour is the exact one.
- peak memory of every step: the resident-set high-water mark (VmHWM, = getrusage ru_maxrss), reset
  before each step through /proc/self/clear_refs where Linux allows it (else the high-water mark of the
  size's process so far), and torch.cuda.max_memory_allocated on CUDA.

Rows marked EXTRAPOLATED in the table (``"extrapolated": true`` in the JSON) were not measured.
Writes ``--results`` (default benchmarks/results/scale_<cpu|cuda>.json) with the machine information.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import inspect
import json
import subprocess
import sys
import tempfile
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .harness import (
    RESULTS,
    add_synthetic_options,
    base_parser,
    command_line,
    machine,
    maxrss_mb,
    peak_rss_mb,
    python_env,
    python_module,
    reset_peak,
    rss_mb,
    sync,
    synthetic_embeddings,
    write_results,
)

STEPS = ["kmeans", "knn", "evaluate", "nmi", "approx"]

# ---------------------------------------------------------------------------------------------------------
# memory and time


@contextmanager
def measure(device: torch.device):
    """Wall time (device synchronised) and peak memory of the enclosed block, into the yielded dict."""
    gc.collect()
    m = {"rss_before_mb": rss_mb(), "peak_reset": reset_peak()}
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    sync()
    t0 = time.perf_counter()
    yield m
    sync()
    m["seconds"] = time.perf_counter() - t0
    m["peak_rss_mb"] = peak_rss_mb()
    m["ru_maxrss_mb"] = maxrss_mb()
    if device.type == "cuda":
        m["peak_cuda_mb"] = torch.cuda.max_memory_allocated(device) / 2**20


# ---------------------------------------------------------------------------------------------------------
# one size, in its own process


class Rows:
    def __init__(self, n: int):
        self.n, self.rows = n, []

    def add(
        self,
        step: str,
        m: dict | None = None,
        *,
        seconds: float | None = None,
        notes: str = "",
        extrapolated: bool = False,
        **extra,
    ) -> dict:
        row = {
            "n": self.n,
            "step": step,
            "seconds": seconds if m is None else m["seconds"],
            "extrapolated": extrapolated,
            "notes": notes,
        }
        if m is not None:
            row.update({k: v for k, v in m.items() if k != "seconds"})
        row.update(extra)
        self.rows.append(row)
        tag = " (EXTRAPOLATED)" if extrapolated else ""
        mem = f", peak RSS {fmt_mb(row)} MB" if "peak_rss_mb" in row else ""
        print(f"  [N={self.n}] {step}{tag}: {row['seconds']:.2f} s{mem}  {notes}", flush=True)
        return row


def default_iters() -> tuple[int, int]:
    """(config.kmeans_iters: pseudo-label k-means, kmeans()'s default niter: what evaluation.nmi uses)."""
    from udml.clustering import kmeans
    from udml.config import Config

    cfg = {f.name: f.default for f in dataclasses.fields(Config)}["kmeans_iters"]
    return int(cfg), int(inspect.signature(kmeans).parameters["niter"].default)


def timed_kmeans(
    rows: Rows,
    step: str,
    src,
    k: int,
    iters: int,
    default: int,
    backend: str,
    device: torch.device,
    seed: int,
    *,
    nmi_of=None,
    short: str | None = None,
):
    """Run and time udml.clustering.kmeans (plus assignment_nmi when nmi_of is given); add its rows: the
    measured one and, when iters is not the default count, the extrapolated one. Returns the result and the
    seconds of the default count of iterations."""
    from udml.clustering import assignment_nmi, kmeans

    with measure(device) as m, warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        res = kmeans(src, k, niter=iters, seed=seed, backend=backend, device=device if backend == "torch" else None)
        res.nmi = None if nmi_of is None else assignment_nmi(res.labels, nmi_of)
    ran = res.iterations  # both backends stop once nothing changes
    converged = ran < iters
    per = m["seconds"] / (ran + 1)  # assignment passes: one per iteration + the first/last
    rows.add(
        step,
        m,
        notes=kmeans_note(res, k, iters, default, device, per),
        k=k,
        iters=iters,
        iters_run=ran,
        converged=converged,
        backend=res.backend,
        seconds_per_iter=per,
        stats=res.stats(),
        nmi=res.nmi,
    )
    if iters == default and not converged:
        return res, m["seconds"]
    # The synthetic data converge in a few iterations; real embeddings usually run all of them, so the
    # figure to compare with a target is the time of `default` full iterations.
    why = f"stopped (converged) after {ran} of {iters} iters on this synthetic data; " if converged else ""
    full = per * (default + 1)
    notes = f"K={k}: {why}{per:.3f} s per assignment pass x ({default}+1) passes"
    kwargs = {"k": k, "iters": default, "backend": res.backend, "notes": notes}
    rows.add(f"{short or step}, {default} iters", seconds=full, extrapolated=True, **kwargs)
    return res, full


def kmeans_note(res, k: int, iters: int, default: int, device: torch.device, per: float) -> str:
    from udml.clustering import KMEANS_PLUS_PLUS_MAX_K

    converged = res.iterations < iters
    st = res.stats()
    where = "cpu" if res.backend == "faiss" else device.type
    note = (
        f"K={k}, {res.backend} on {where}, {res.iterations} of {iters} iters"
        f"{' (converged)' if converged else ''}, {per:.3f} s/iter; cluster sizes {st['min']}-{st['max']}, "
        f"{st['empty']} empty"
    )
    if res.nmi is not None:
        note += f"; NMI {100 * res.nmi:.1f}"
    if iters != default and k <= KMEANS_PLUS_PLUS_MAX_K and not converged:
        note += "; includes k-means++ init, so the extrapolation is an upper bound"
    return note


@dataclass
class Size:
    """One size's data, and what its steps record."""

    n: int
    args: argparse.Namespace
    device: torch.device
    x: torch.Tensor
    labels: torch.Tensor
    classes: int
    counts: torch.Tensor
    rows: Rows
    info: dict
    metrics: dict = field(default_factory=dict)

    def __post_init__(self):
        self.x_dev, self.labels_dev = self.x.to(self.device), self.labels.to(self.device)  # the same on the CPU


@dataclass
class Queries:
    """Which queries exact search runs, and for what."""

    ks: list[int]  # the Recall@K of the evaluation (R@1 always: the approximate-search reference)
    relevant: torch.Tensor  # relevant items per query, itself excluded
    k_max: int
    qidx: torch.Tensor
    subset: bool  # a random subset of the queries, the times extrapolated to all
    scale: float  # N / queries

    @property
    def nq(self) -> int:
        return int(self.qidx.numel())


@dataclass
class Exact:
    """Exact search of the queries: metrics, each query's nearest neighbour, seconds of the kNN and the metrics."""

    metrics: dict
    nearest: torch.Tensor
    knn_s: float
    metrics_s: float


def run_size(n: int, args) -> dict:
    from udml.clustering import faiss_available

    import_outside_steps(args)
    s = make_size(n, args)
    cfg_iters, nmi_default_iters = default_iters()
    if "kmeans" in args.steps:
        kmeans_step(s, cfg_iters)
    q = plan_queries(s)
    exact = exact_search(s, q) if {"knn", "evaluate", "approx"} & set(args.steps) else None
    eval_seconds = evaluate_step(s, q, exact)
    nmi_seconds = nmi_step(s, nmi_default_iters) if "nmi" in args.steps else None
    if eval_seconds is not None and nmi_seconds is not None:
        extra = q.subset or (args.kmeans_iters not in (None, nmi_default_iters))
        s.rows.add(
            "exact evaluation total (kNN + metrics + NMI)",
            seconds=eval_seconds + nmi_seconds,
            extrapolated=extra,
            notes="sum of the rows above" + (", partly extrapolated" if extra else ""),
        )
    if "approx" in args.steps:
        if not faiss_available():
            print(f"  [N={n}] approximate search: skipped, faiss is not installed", flush=True)
        else:
            approx_search(s, q, exact)
    s.info["metrics"] = s.metrics
    return {"info": s.info, "rows": s.rows.rows}


def import_outside_steps(args) -> None:
    """Import here what the steps use, so that no measured step pays for an import."""
    import sklearn.metrics  # noqa: F401 - assignment_nmi

    from udml.clustering import faiss_available

    if "approx" in args.steps and faiss_available():
        import udml.retrieval  # noqa: F401 - it imports torchvision


def make_size(n: int, args) -> Size:
    """The synthetic data of size n (timed), and the size's description."""
    from udml.clustering import faiss_available

    device = torch.device(args.device)
    rows = Rows(n)
    info = {"n": n, "device": str(device), "torch_threads": torch.get_num_threads()}
    if faiss_available():
        import faiss

        info["faiss_threads"] = faiss.omp_get_max_threads()
    with measure(device) as m:
        x, labels, classes = synthetic_embeddings(n, args.dim, args.points_per_class, args.noise, args.seed)
    counts = torch.bincount(labels, minlength=classes)
    lo, hi = int(counts.min()), int(counts.max())
    info.update(classes=classes, class_size_min=lo, class_size_max=hi, data_mb=x.numel() * 4 / 2**20)
    notes = f"{classes} classes, {n / classes:.2f} per class ({lo}-{hi}), dim {args.dim}"
    rows.add("synthetic data", m, notes=notes)
    return Size(n, args, device, x, labels, classes, counts, rows, info)


def kmeans_step(s: Size, cfg_iters: int) -> None:
    """k-means for pseudo-labels, with each backend asked for."""
    from udml.clustering import faiss_available

    k = min(s.args.kmeans_k, s.n // 5)
    iters = s.args.kmeans_iters or cfg_iters
    s.info.update(kmeans_k=k, kmeans_iters=iters, kmeans_default_iters=cfg_iters)
    for backend in s.args.backends:
        if backend == "faiss" and not faiss_available():
            print(f"  [N={s.n}] k-means faiss: skipped, faiss is not installed", flush=True)
            continue
        src = s.x if backend == "faiss" else s.x_dev
        timed_kmeans(s.rows, f"k-means {backend}", src, k, iters, cfg_iters, backend, s.device, s.args.seed)


def plan_queries(s: Size) -> Queries:
    """All N queries, or above --exact-query-limit a random subset of them."""
    args, n = s.args, s.n
    ks = sorted({1} | {kk for kk in args.recall_ks if kk <= n - 1})
    if len(ks) < len(set(args.recall_ks)):
        print(f"  [N={n}] recall_ks above N-1={n - 1} dropped: now {ks}", flush=True)
    relevant = s.counts[s.labels] - 1  # >= 1: every class has >= 2 points
    subset = n > args.exact_query_limit
    if subset:
        g = torch.Generator().manual_seed(args.seed + 1)
        qidx = torch.randperm(n, generator=g)[: args.exact_query_limit].sort().values
    else:
        qidx = torch.arange(n)
    q = Queries(ks, relevant, max(ks[-1], int(relevant.max())), qidx, subset, n / qidx.numel())
    s.info.update(
        queries=q.nq,
        exact_query_subset=subset,
        recall_ks=ks,
        knn_k=q.k_max,
        chunk_size=args.chunk_size,
        largest_similarity_block_mb=min(args.chunk_size, q.nq) * n * 4 / 2**20,
    )
    return q


def exact_search(s: Size, q: Queries) -> Exact:
    """evaluation.knn chunk by chunk of queries, then Recall@K and MAP@R of each chunk, timed apart."""
    from udml.evaluation import knn, map_at_r, recall_at_k

    chunk = s.args.chunk_size
    x_dev, labels_dev = s.x_dev, s.labels_dev
    qidx_dev, r_dev = q.qidx.to(s.device), q.relevant.to(s.device)
    hits = {kk: 0.0 for kk in q.ks}
    ap_sum, ap_count, knn_s, metrics_s = 0.0, 0, 0.0, 0.0
    nearest = torch.empty(q.nq, dtype=torch.int64)
    with measure(s.device) as m:
        for start in range(0, q.nq, chunk):
            end = min(q.nq, start + chunk)
            qi = qidx_dev[start:end]
            sync()
            t0 = time.perf_counter()
            _, idx = knn(x_dev[qi], x_dev, q.k_max, exclude=qi, chunk_size=chunk)
            sync()
            t1 = time.perf_counter()
            nl, ql, rc = labels_dev[idx], labels_dev[qi], r_dev[qi]
            for kk, v in recall_at_k(nl, ql, q.ks).items():
                hits[kk] += v * (end - start)
            valid = int((rc > 0).sum())
            if valid:
                ap_sum += map_at_r(nl, ql, rc) * valid
                ap_count += valid
            sync()
            metrics_s += time.perf_counter() - t1
            knn_s += t1 - t0
            nearest[start:end] = idx[:, 0].cpu()
            del idx, nl
    metrics = {f"recall@{kk}": hits[kk] / q.nq for kk in q.ks}
    metrics["map@r"] = ap_sum / ap_count
    s.metrics.update(metrics)
    exact = Exact(metrics, nearest, knn_s, metrics_s)
    add_exact_rows(s, q, exact, {kk: v for kk, v in m.items() if kk != "seconds"})
    return exact


def add_exact_rows(s: Size, q: Queries, exact: Exact, memory: dict) -> None:
    nq, n, metrics = q.nq, s.n, exact.metrics
    q_note = f"{nq} of {n} queries" if q.subset else f"all {n} queries"
    shown = ", ".join(f"R@{kk} {100 * metrics[f'recall@{kk}']:.1f}" for kk in q.ks)
    s.rows.add(
        "exact kNN (evaluation.knn)",
        {**memory, "seconds": exact.knn_s},
        queries=nq,
        notes=f"k={q.k_max}, {q_note}, chunks of {s.args.chunk_size} queries; peak RSS of kNN + metrics",
    )
    s.rows.add(
        "Recall@K + MAP@R from the kNN",
        seconds=exact.metrics_s,
        queries=nq,
        notes=f"{shown}, MAP@R {100 * metrics['map@r']:.1f} ({q_note})",
        metrics=metrics,
    )
    if q.subset:
        note = f"{nq}-query time x {q.scale:.1f}"
        s.rows.add("exact kNN, all queries", seconds=exact.knn_s * q.scale, extrapolated=True, queries=n, notes=note)
        s.rows.add(
            "exact evaluation w/o NMI, all queries",
            seconds=(exact.knn_s + exact.metrics_s) * q.scale,
            extrapolated=True,
            queries=n,
            notes=f"kNN + Recall + MAP@R, {note}",
        )


def evaluate_step(s: Size, q: Queries, exact: Exact | None) -> float | None:
    """The whole evaluate(compute_nmi=False) call, timed, up to the query limit; the seconds of exact evaluation
    (above the limit: extrapolated from the parts; None when exact search did not run)."""
    from udml.evaluation import evaluate

    if "evaluate" not in s.args.steps or q.subset:
        return None if exact is None else (exact.knn_s + exact.metrics_s) * q.scale
    args = s.args
    with measure(s.device) as m:
        out = evaluate(
            s.x_dev, s.labels_dev, recall_ks=q.ks, compute_nmi=False, chunk_size=args.chunk_size, seed=args.seed
        )
    agree = all(abs(out[key] - s.metrics[key]) < 1e-6 for key in out) if s.metrics else None
    s.rows.add(
        "evaluate(compute_nmi=False)",
        m,
        metrics=out,
        agrees_with_parts=agree,
        notes=f"whole call: kNN + Recall@{q.ks} + MAP@R; agrees with the parts: {agree}",
    )
    return m["seconds"]


def nmi_step(s: Size, default: int) -> float:
    """NMI as evaluation.nmi computes it: k-means with K = classes and assignment_nmi; its seconds at the default
    count of iterations."""
    iters = s.args.kmeans_iters or default
    step = "NMI (k-means K=classes + assignment_nmi)"
    backend, seed = s.args.nmi_backend, s.args.seed
    res, seconds = timed_kmeans(
        s.rows, step, s.x_dev, s.classes, iters, default, backend, s.device, seed, nmi_of=s.labels, short="NMI"
    )
    s.metrics["nmi"] = res.nmi
    return seconds


def approx_search(s: Size, q: Queries, exact: Exact) -> None:
    """faiss indexes built by udml.index.build_index: Flat (the reference), IVF at each nprobe, HNSW at each
    efSearch; each searched with the queries and compared with exact search."""
    from udml.index import build_index

    args, xn = s.args, s.x.numpy()
    search = IndexSearch(s, q, exact)
    with measure(torch.device("cpu")) as m:
        index = build_index(xn, "flat")
    s.rows.add("faiss Flat build", m, index="flat", notes="IndexFlatIP, exact (reference for the approximate ones)")
    search(index, "faiss Flat", "")
    del index

    with measure(torch.device("cpu")) as m:
        index = build_index(xn, "ivf", nprobe=args.nprobe[0], seed=args.seed)
    nlist = int(index.nlist)
    s.info["ivf_nlist"] = nlist
    s.rows.add("faiss IVF build", m, index="ivf", nlist=nlist, notes=f"IndexIVFFlat IP, nlist={nlist}: train + add")
    for p in args.nprobe:
        index.nprobe = min(p, nlist)
        search(index, "faiss IVF", f"nprobe={index.nprobe}")
    del index

    with measure(torch.device("cpu")) as m:
        index = build_index(xn, "hnsw", hnsw_m=args.hnsw_m, ef_search=args.ef_search[0])
    s.rows.add("faiss HNSW build", m, index="hnsw", hnsw_m=args.hnsw_m, notes=f"IndexHNSWFlat IP, M={args.hnsw_m}")
    for ef in args.ef_search:
        index.hnsw.efSearch = ef
        search(index, "faiss HNSW", f"efSearch={ef}")
    del index


class IndexSearch:
    """Searches an index with the queries (k = 2, the query itself dropped) and adds the row: time, Recall@1
    against exact search's, the share of queries with the same nearest neighbour."""

    def __init__(self, s: Size, q: Queries, exact: Exact):
        self.rows, self.n, self.nq = s.rows, s.n, q.nq
        self.queries = np.ascontiguousarray(s.x.numpy()[q.qidx.numpy()])
        self.q, self.labels, self.nearest = q.qidx.numpy(), s.labels.numpy(), exact.nearest.numpy()
        self.exact_r1 = exact.metrics["recall@1"]

    def __call__(self, index, name: str, setting: str) -> None:
        n, nq, exact_r1 = self.n, self.nq, self.exact_r1
        with measure(torch.device("cpu")) as m:
            _, ids = index.search(self.queries, 2)
        top = np.where(ids[:, 0] == self.q, ids[:, 1], ids[:, 0])  # drop the query itself
        r1 = float(np.mean((top >= 0) & (self.labels[np.maximum(top, 0)] == self.labels[self.q])))
        same = float(np.mean(top == self.nearest))
        loss = 100 * (exact_r1 - r1)
        extra = f"; all {n} queries ~{m['seconds'] * n / nq:.1f} s (extrapolated)" if nq < n else ""
        self.rows.add(
            f"{name} search {setting}".strip(),
            m,
            queries=nq,
            recall_at_1=r1,
            recall_at_1_exact=exact_r1,
            recall_at_1_loss_points=loss,
            same_nn_as_exact=same,
            index=name,
            setting=setting,
            search_seconds_all_queries_extrapolated=m["seconds"] * n / nq if nq < n else None,
            notes=f"{nq} queries, k=2: R@1 {100 * r1:.2f} vs exact {100 * exact_r1:.2f} "
            f"(loss {loss:.2f} pts), same NN as exact {100 * same:.1f}%{extra}",
        )


# ---------------------------------------------------------------------------------------------------------
# driver


def fmt_mb(row: dict) -> str:
    """Peak RSS of the step, and in brackets its rise over the resident set when the step began."""
    if row.get("peak_rss_mb") is None:
        return "-"
    if row.get("rss_before_mb") is None or not row.get("peak_reset"):
        return f"{row['peak_rss_mb']:.0f}"
    return f"{row['peak_rss_mb']:.0f} (+{row['peak_rss_mb'] - row['rss_before_mb']:.0f})"


def print_table(results: list[dict]) -> None:
    print("| N | step | seconds | peak RSS MB (+ over step start) | notes |")
    print("|---|---|---|---|---|")
    for res in results:
        for row in res["rows"]:
            step = row["step"] + (" **(EXTRAPOLATED)**" if row["extrapolated"] else "")
            notes = row["notes"]
            if row.get("peak_cuda_mb") is not None:
                notes += f"; peak CUDA {row['peak_cuda_mb']:.0f} MB"
            print(f"| {row['n']} | {step} | {row['seconds']:.2f} | {fmt_mb(row)} | {notes} |")


def parser() -> argparse.ArgumentParser:
    p = base_parser(__doc__, results=True)
    p.add_argument("--sizes", type=int, nargs="+", default=[6000, 60000, 600000])
    add_synthetic_options(p, points_per_class=5.3)
    p.add_argument("--kmeans-k", type=int, default=10000, help="K of the pseudo-label k-means (at most N // 5)")
    p.add_argument(
        "--kmeans-iters",
        type=int,
        default=None,
        help="cap the k-means iterations (both k-means runs) and extrapolate to the default count",
    )
    p.add_argument("--backends", nargs="+", default=["faiss", "torch"], choices=["faiss", "torch"])
    p.add_argument(
        "--nmi-backend",
        default="auto",
        choices=["auto", "faiss", "torch"],
        help="k-means backend of the NMI step (evaluation.nmi's default: auto)",
    )
    p.add_argument(
        "--exact-query-limit",
        type=int,
        default=20000,
        help="above this N, exact search runs for this many random queries and is extrapolated",
    )
    p.add_argument("--recall-ks", type=int, nargs="+", default=[1, 10, 100, 1000])
    p.add_argument("--chunk-size", type=int, default=1024, help="queries per kNN block (evaluate's default)")
    p.add_argument("--nprobe", type=int, nargs="+", default=[16, 64])
    p.add_argument("--ef-search", type=int, nargs="+", default=[64, 256])
    p.add_argument("--hnsw-m", type=int, default=32)
    p.add_argument("--steps", nargs="+", default=STEPS, choices=STEPS)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--threads", type=int, default=None, help="torch and faiss threads; default: as given")
    p.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--child-out", default=None, help=argparse.SUPPRESS)
    return p


def set_threads(threads: int) -> None:
    torch.set_num_threads(threads)
    try:
        import faiss

        faiss.omp_set_num_threads(threads)
    except ImportError:
        pass


def faiss_info() -> dict | None:
    from udml.clustering import faiss_available

    if not faiss_available():
        return None
    import faiss

    return {"version": faiss.__version__, "threads": faiss.omp_get_max_threads()}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parser().parse_args(argv)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.threads:
        set_threads(args.threads)
    if args.child is not None:  # one size, in a fresh process
        Path(args.child_out).write_text(json.dumps(run_size(args.child, args)))
        return 0
    defaults = default_iters()
    print_header(args, machine(), faiss_info(), defaults)
    results = [run_in_child(n, args, argv) for n in args.sizes]
    path = Path(args.results or RESULTS / f"scale_{args.device}.json")
    info = write_results(path, results_doc(args, argv, results, defaults), block="flat")
    print(
        f"\nScale benchmark, synthetic data | {args.device} ({info['card']}), torch threads "
        f"{torch.get_num_threads()} | commit {info['commit']}"
    )
    print_table(results)
    print(
        f"\nkNN is chunked: the largest block is {args.chunk_size} queries x N similarities, never N x N. "
        f"Rows marked EXTRAPOLATED were not measured.\nwrote {path}"
    )
    return 0


def print_header(args, info: dict, faiss_about: dict | None, defaults: tuple[int, int]) -> None:
    cfg_iters, nmi_iters = defaults
    print(
        f"scale benchmark | synthetic clustered data (not SOP images): dim {args.dim}, "
        f"{args.points_per_class} points per class, noise {args.noise}, seed {args.seed}"
    )
    print(
        f"device {args.device} ({info['card']}) | torch {torch.__version__}, torch.get_num_threads() = "
        f"{torch.get_num_threads()} | faiss {faiss_about or 'not installed'} | commit {info['commit']}"
    )
    print(
        f"k-means: K = min({args.kmeans_k}, N // 5), iterations {args.kmeans_iters or cfg_iters} "
        f"(config.kmeans_iters = {cfg_iters}, nmi's kmeans default = {nmi_iters}) | exact query limit "
        f"{args.exact_query_limit} | recall_ks {args.recall_ks}",
        flush=True,
    )


def run_in_child(n: int, args, argv: list[str]) -> dict:
    """One size in a fresh process, so that its peak memory is its own."""
    classes = max(2, min(n // 2, round(n / args.points_per_class)))
    print(f"N = {n}: K = {min(args.kmeans_k, n // 5)}, classes = {classes}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "size.json"
        cmd = python_module("benchmarks.scale", *argv, "--device", args.device, "--child", n, "--child-out", out)
        proc = subprocess.run(cmd, env=python_env())
        if proc.returncode != 0 or not out.is_file():
            print(f"N = {n}: the run failed (exit code {proc.returncode})", flush=True)
            return {"info": {"n": n, "failed": True, "returncode": proc.returncode}, "rows": []}
        return json.loads(out.read_text())


def results_doc(args, argv: list[str], results: list[dict], defaults: tuple[int, int]) -> dict:
    cfg_iters, nmi_iters = defaults
    return {
        "benchmark": "scale",
        "command": command_line(__file__, argv),
        "args": {k: v for k, v in vars(args).items() if not k.startswith("child")},
        "device": args.device,
        "faiss": faiss_info(),
        "data": {
            "kind": "synthetic",
            "description": "L2-normalised float32 points drawn around random unit "
            "class centres: normalise(centre + noise * N(0, I) / sqrt(dim)); every class >= 2 points",
            "dim": args.dim,
            "points_per_class": args.points_per_class,
            "noise": args.noise,
            "seed": args.seed,
        },
        "defaults": {"config_kmeans_iters": cfg_iters, "nmi_kmeans_niter": nmi_iters},
        "memory": "peak_rss_mb: VmHWM (= ru_maxrss) after resetting it through /proc/self/clear_refs before "
        "the step (peak_reset true); else the high-water mark of the size's process so far. "
        "rss_before_mb: resident set when the step began. Each size runs in its own process.",
        "extrapolated": "rows with extrapolated=true were not measured: linear in queries (N / Q) or in "
        "k-means assignment passes ((default iters + 1) / (iters + 1))",
        "sizes": [r["info"] for r in results],
        "rows": [row for r in results for row in r["rows"]],
    }


if __name__ == "__main__":
    raise SystemExit(main())
