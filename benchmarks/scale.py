"""SOP-scale clustering and evaluation on synthetic embeddings: time and peak memory of udml's k-means,
exact evaluation and faiss approximate search at N = 6k, 60k and 600k.

    python benchmarks/scale.py --sizes 6000 60000 600000

The data are SYNTHETIC, not SOP: N L2-normalised float32 embeddings of dimension 512 drawn around
C = round(N / 5.3) random class centres (SOP's test split: 60,502 images of 11,316 classes). Every class
gets at least 2 points, the rest are spread uniformly over the classes; a point is
normalise(centre + noise * g / sqrt(dim)), g standard normal, noise 2.2 by default: exact Recall@1 is
93% at 6k, 87% at 20k and falls further with N (more classes, more confusers). The noise dominates the
centre, so the data are close to isotropic: hard for IVF, and torch's k-means may stop after an
iteration or two. Labels are the classes. Fixed seed.

On a few CPU cores, cap the k-means iterations at 600k (its NMI k-means has K = 113k clusters):

    python benchmarks/scale.py --sizes 600000 --kmeans-iters 2

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
import math
import os
import re
import resource
import subprocess
import sys
import tempfile
import time
import warnings
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from common import machine, sync

# ---------------------------------------------------------------------------------------------------------
# memory and time


def _status_kb(field: str) -> int | None:
    try:
        m = re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M)
    except OSError:
        return None
    return int(m.group(1)) if m else None


def _maxrss_mb() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r / 2**20 if sys.platform == "darwin" else r / 1024  # bytes on macOS, KiB on Linux


def _reset_peak() -> bool:
    """Reset the process's resident-set high-water mark (Linux >= 4.0); False where not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _rss_mb() -> float | None:
    kb = _status_kb("VmRSS")
    return None if kb is None else kb / 1024


def _peak_rss_mb() -> float:
    kb = _status_kb("VmHWM")
    return kb / 1024 if kb is not None else _maxrss_mb()


@contextmanager
def measure(device: torch.device):
    """Wall time (device synchronised) and peak memory of the enclosed block, into the yielded dict."""
    gc.collect()
    m = {"rss_before_mb": _rss_mb(), "peak_reset": _reset_peak()}
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    sync()
    t0 = time.perf_counter()
    yield m
    sync()
    m["seconds"] = time.perf_counter() - t0
    m["peak_rss_mb"] = _peak_rss_mb()
    m["ru_maxrss_mb"] = _maxrss_mb()
    if device.type == "cuda":
        m["peak_cuda_mb"] = torch.cuda.max_memory_allocated(device) / 2**20


# ---------------------------------------------------------------------------------------------------------
# data


def make_data(n: int, dim: int, points_per_class: float, noise: float, seed: int):
    """Synthetic SOP-like embeddings: float32 [n, dim] unit rows, int64 labels, number of classes."""
    classes = max(2, min(n // 2, round(n / points_per_class)))
    g = torch.Generator().manual_seed(seed)
    centres = torch.nn.functional.normalize(torch.randn(classes, dim, generator=g), dim=1)
    labels = torch.cat([torch.arange(classes).repeat(2), torch.randint(classes, (n - 2 * classes,), generator=g)])
    labels = labels[torch.randperm(n, generator=g)]
    x = torch.empty(n, dim)
    scale = noise / math.sqrt(dim)
    for s in range(0, n, 65536):  # in blocks: no float64 or N-sized temporaries beyond x itself
        e = min(n, s + 65536)
        x[s:e] = torch.nn.functional.normalize(
            centres[labels[s:e]] + scale * torch.randn(e - s, dim, generator=g), dim=1
        )
    return x, labels, classes


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
    rows: "Rows",
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
    return_default_seconds: bool = False,
):
    """Run and time udml.clustering.kmeans (plus assignment_nmi when nmi_of is given); add its rows: the
    measured one and, when iters is not the default count, the extrapolated one."""
    from udml.clustering import KMEANS_PLUS_PLUS_MAX_K, assignment_nmi, kmeans

    with measure(device) as m, warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        res = kmeans(src, k, niter=iters, seed=seed, backend=backend, device=device if backend == "torch" else None)
        res.nmi = None if nmi_of is None else assignment_nmi(res.labels, nmi_of)
    ran = res.iterations  # both backends stop once nothing changes
    converged = ran < iters
    passes = ran + 1  # assignment passes: one per iteration + the first/last
    per = m["seconds"] / passes
    st = res.stats()
    where = "cpu" if res.backend == "faiss" else device.type
    note = (
        f"K={k}, {res.backend} on {where}, {ran} of {iters} iters"
        f"{' (converged)' if converged else ''}, {per:.3f} s/iter; cluster sizes {st['min']}-{st['max']}, "
        f"{st['empty']} empty"
    )
    if res.nmi is not None:
        note += f"; NMI {100 * res.nmi:.1f}"
    if iters != default and k <= KMEANS_PLUS_PLUS_MAX_K and not converged:
        note += "; includes k-means++ init, so the extrapolation is an upper bound"
    rows.add(
        step,
        m,
        notes=note,
        k=k,
        iters=iters,
        iters_run=ran,
        converged=converged,
        backend=res.backend,
        seconds_per_iter=per,
        stats=st,
        nmi=res.nmi,
    )
    full = m["seconds"]
    if iters != default or converged:
        # The synthetic data converge in a few iterations; real embeddings usually run all of them, so the
        # figure to compare with a target is the time of `default` full iterations.
        full = per * (default + 1)
        why = f"stopped (converged) after {ran} of {iters} iters on this synthetic data; " if converged else ""
        how = f"{why}{per:.3f} s per assignment pass x ({default}+1) passes"
        rows.add(
            f"{short or step}, {default} iters",
            seconds=full,
            extrapolated=True,
            k=k,
            iters=default,
            backend=res.backend,
            notes=f"K={k}: {how}",
        )
    return (res, full) if return_default_seconds else res


def run_size(n: int, args) -> dict:
    import sklearn.metrics  # noqa: F401 - imported here, not inside a measured step (assignment_nmi)

    from udml.clustering import faiss_available
    from udml.evaluation import evaluate, knn, map_at_r, recall_at_k

    if "approx" in args.steps and faiss_available():
        import udml.retrieval  # noqa: F401 - idem (it imports torchvision)

    device = torch.device(args.device)
    rows = Rows(n)
    cfg_iters, nmi_default_iters = default_iters()
    info = {"n": n, "device": str(device), "torch_threads": torch.get_num_threads()}
    if faiss_available():
        import faiss

        info["faiss_threads"] = faiss.omp_get_max_threads()

    with measure(device) as m:
        x, labels, classes = make_data(n, args.dim, args.points_per_class, args.noise, args.seed)
    counts = torch.bincount(labels, minlength=classes)
    info.update(
        classes=classes,
        class_size_min=int(counts.min()),
        class_size_max=int(counts.max()),
        data_mb=x.numel() * 4 / 2**20,
    )
    rows.add(
        "synthetic data",
        m,
        notes=f"{classes} classes, {n / classes:.2f} per class "
        f"({int(counts.min())}-{int(counts.max())}), dim {args.dim}",
    )
    x_dev, labels_dev = x.to(device), labels.to(device)

    # --- k-means for pseudo-labels -------------------------------------------------------------------
    k = min(args.kmeans_k, n // 5)
    iters = args.kmeans_iters or cfg_iters
    info.update(kmeans_k=k, kmeans_iters=iters, kmeans_default_iters=cfg_iters)
    if "kmeans" in args.steps:
        for backend in args.backends:
            if backend == "faiss" and not faiss_available():
                print(f"  [N={n}] k-means faiss: skipped, faiss is not installed", flush=True)
                continue
            src = x if backend == "faiss" else x_dev
            res = timed_kmeans(rows, f"k-means {backend}", src, k, iters, cfg_iters, backend, device, args.seed)
            del res

    # --- exact evaluation ----------------------------------------------------------------------------
    ks = sorted({1} | {kk for kk in args.recall_ks if kk <= n - 1})  # R@1: the approximate-search reference
    if len(ks) < len(set(args.recall_ks)):
        print(f"  [N={n}] recall_ks above N-1={n - 1} dropped: now {ks}", flush=True)
    r = counts[labels] - 1  # relevant items per query, itself excluded (>= 1: every class has >= 2 points)
    k_max = max(ks[-1], int(r.max()))
    subset = n > args.exact_query_limit
    if subset:
        g = torch.Generator().manual_seed(args.seed + 1)
        qidx = torch.randperm(n, generator=g)[: args.exact_query_limit].sort().values
    else:
        qidx = torch.arange(n)
    nq = int(qidx.numel())
    scale = n / nq
    info.update(
        queries=nq,
        exact_query_subset=subset,
        recall_ks=ks,
        knn_k=k_max,
        chunk_size=args.chunk_size,
        largest_similarity_block_mb=min(args.chunk_size, nq) * n * 4 / 2**20,
    )
    q_note = f"{nq} of {n} queries" if subset else f"all {n} queries"
    metrics, exact_nn = {}, None
    knn_steps = {"knn", "evaluate", "approx"} & set(args.steps)
    if knn_steps:
        t_knn = t_metrics = 0.0
        hits = {kk: 0.0 for kk in ks}
        ap_sum, ap_count = 0.0, 0
        exact_nn = torch.empty(nq, dtype=torch.int64)
        qidx_dev, r_dev = qidx.to(device), r.to(device)
        with measure(device) as m:
            for s in range(0, nq, args.chunk_size):
                e = min(nq, s + args.chunk_size)
                qi = qidx_dev[s:e]
                sync()
                t0 = time.perf_counter()
                _, idx = knn(x_dev[qi], x_dev, k_max, exclude=qi, chunk_size=args.chunk_size)
                sync()
                t1 = time.perf_counter()
                nl, ql, rc = labels_dev[idx], labels_dev[qi], r_dev[qi]
                for kk, v in recall_at_k(nl, ql, ks).items():
                    hits[kk] += v * (e - s)
                valid = int((rc > 0).sum())
                if valid:
                    ap_sum += map_at_r(nl, ql, rc) * valid
                    ap_count += valid
                sync()
                t_metrics += time.perf_counter() - t1
                t_knn += t1 - t0
                exact_nn[s:e] = idx[:, 0].cpu()
                del idx, nl
        metrics = {f"recall@{kk}": hits[kk] / nq for kk in ks}
        metrics["map@r"] = ap_sum / ap_count
        shown = ", ".join(f"R@{kk} {100 * metrics[f'recall@{kk}']:.1f}" for kk in ks)
        mem = {kk: v for kk, v in m.items() if kk != "seconds"}
        rows.add(
            "exact kNN (evaluation.knn)",
            {**mem, "seconds": t_knn},
            queries=nq,
            notes=f"k={k_max}, {q_note}, chunks of {args.chunk_size} queries; peak RSS of kNN + metrics",
        )
        rows.add(
            "Recall@K + MAP@R from the kNN",
            seconds=t_metrics,
            queries=nq,
            notes=f"{shown}, MAP@R {100 * metrics['map@r']:.1f} ({q_note})",
            metrics=metrics,
        )
        if subset:
            rows.add(
                "exact kNN, all queries",
                seconds=t_knn * scale,
                extrapolated=True,
                queries=n,
                notes=f"{nq}-query time x {scale:.1f}",
            )
            rows.add(
                "exact evaluation w/o NMI, all queries",
                seconds=(t_knn + t_metrics) * scale,
                extrapolated=True,
                queries=n,
                notes=f"kNN + Recall + MAP@R, {nq}-query time x {scale:.1f}",
            )

    eval_seconds = None
    if "evaluate" in args.steps and not subset:
        with measure(device) as m:
            out = evaluate(
                x_dev, labels_dev, recall_ks=ks, compute_nmi=False, chunk_size=args.chunk_size, seed=args.seed
            )
        agree = all(abs(out[key] - metrics[key]) < 1e-6 for key in out) if metrics else None
        eval_seconds = m["seconds"]
        rows.add(
            "evaluate(compute_nmi=False)",
            m,
            metrics=out,
            agrees_with_parts=agree,
            notes=f"whole call: kNN + Recall@{ks} + MAP@R; agrees with the parts: {agree}",
        )
    elif knn_steps:
        eval_seconds = (t_knn + t_metrics) * scale

    nmi_seconds = None
    if "nmi" in args.steps:
        nmi_iters = args.kmeans_iters or nmi_default_iters
        res, nmi_seconds = timed_kmeans(
            rows,
            "NMI (k-means K=classes + assignment_nmi)",
            x_dev,
            classes,
            nmi_iters,
            nmi_default_iters,
            args.nmi_backend,
            device,
            args.seed,
            nmi_of=labels,
            short="NMI",
            return_default_seconds=True,
        )
        metrics["nmi"] = res.nmi
        del res
    if eval_seconds is not None and nmi_seconds is not None:
        extra = subset or (args.kmeans_iters not in (None, nmi_default_iters))
        rows.add(
            "exact evaluation total (kNN + metrics + NMI)",
            seconds=eval_seconds + nmi_seconds,
            extrapolated=extra,
            notes="sum of the rows above" + (", partly extrapolated" if extra else ""),
        )

    # --- approximate search (faiss) ------------------------------------------------------------------
    if "approx" in args.steps:
        if not faiss_available():
            print(f"  [N={n}] approximate search: skipped, faiss is not installed", flush=True)
        else:
            approx_search(x, labels, qidx, exact_nn, metrics["recall@1"], args, rows, info)

    info["metrics"] = metrics
    return {"info": info, "rows": rows.rows}


def approx_search(x, labels, qidx, exact_nn, exact_r1, args, rows: Rows, info: dict) -> None:
    from udml.index import build_index

    cpu = torch.device("cpu")
    xn = x.numpy()
    qn = np.ascontiguousarray(xn[qidx.numpy()])
    q, lab, ex = qidx.numpy(), labels.numpy(), exact_nn.numpy()
    n, nq = xn.shape[0], len(q)

    def search(index, name: str, setting: str) -> None:
        with measure(cpu) as m:
            _, ids = index.search(qn, 2)
        top = np.where(ids[:, 0] == q, ids[:, 1], ids[:, 0])  # drop the query itself
        r1 = float(np.mean((top >= 0) & (lab[np.maximum(top, 0)] == lab[q])))
        same = float(np.mean(top == ex))
        loss = 100 * (exact_r1 - r1)
        extra = f"; all {n} queries ~{m['seconds'] * n / nq:.1f} s (extrapolated)" if nq < n else ""
        rows.add(
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

    with measure(cpu) as m:
        index = build_index(xn, "flat")
    rows.add("faiss Flat build", m, index="flat", notes="IndexFlatIP, exact (reference for the approximate ones)")
    search(index, "faiss Flat", "")
    del index

    with measure(cpu) as m:
        index = build_index(xn, "ivf", nprobe=args.nprobe[0], seed=args.seed)
    nlist = int(index.nlist)
    info["ivf_nlist"] = nlist
    rows.add("faiss IVF build", m, index="ivf", nlist=nlist, notes=f"IndexIVFFlat IP, nlist={nlist}: train + add")
    for p in args.nprobe:
        index.nprobe = min(p, nlist)
        search(index, "faiss IVF", f"nprobe={index.nprobe}")
    del index

    with measure(cpu) as m:
        index = build_index(xn, "hnsw", hnsw_m=args.hnsw_m, ef_search=args.ef_search[0])
    rows.add("faiss HNSW build", m, index="hnsw", hnsw_m=args.hnsw_m, notes=f"IndexHNSWFlat IP, M={args.hnsw_m}")
    for ef in args.ef_search:
        index.hnsw.efSearch = ef
        search(index, "faiss HNSW", f"efSearch={ef}")
    del index


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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[6000, 60000, 600000])
    p.add_argument("--dim", type=int, default=512)
    p.add_argument(
        "--points-per-class", type=float, default=5.3, help="N / number of classes (SOP test: 60502 / 11316 = 5.35)"
    )
    p.add_argument("--noise", type=float, default=2.2, help="norm of the noise added to a unit class centre")
    p.add_argument("--seed", type=int, default=0)
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
    p.add_argument(
        "--steps",
        nargs="+",
        default=["kmeans", "knn", "evaluate", "nmi", "approx"],
        choices=["kmeans", "knn", "evaluate", "nmi", "approx"],
    )
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--threads", type=int, default=None, help="torch and faiss threads; default: as given")
    p.add_argument("--results", default=None, help="default benchmarks/results/scale_<cpu|cuda>.json")
    p.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--child-out", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.threads:
        torch.set_num_threads(args.threads)
        try:
            import faiss

            faiss.omp_set_num_threads(args.threads)
        except ImportError:
            pass

    if args.child is not None:  # one size, in a fresh process
        res = run_size(args.child, args)
        Path(args.child_out).write_text(json.dumps(res))
        return

    from udml.clustering import faiss_available

    cfg_iters, nmi_iters = default_iters()
    faiss_info = None
    if faiss_available():
        import faiss

        faiss_info = {"version": faiss.__version__, "threads": faiss.omp_get_max_threads()}
    info = machine()
    print(
        f"scale benchmark | synthetic clustered data (not SOP images): dim {args.dim}, "
        f"{args.points_per_class} points per class, noise {args.noise}, seed {args.seed}"
    )
    print(
        f"device {args.device} ({info['card']}) | torch {torch.__version__}, torch.get_num_threads() = "
        f"{torch.get_num_threads()} | faiss {faiss_info or 'not installed'} | commit {info['commit']}"
    )
    print(
        f"k-means: K = min({args.kmeans_k}, N // 5), iterations {args.kmeans_iters or cfg_iters} "
        f"(config.kmeans_iters = {cfg_iters}, nmi's kmeans default = {nmi_iters}) | exact query limit "
        f"{args.exact_query_limit} | recall_ks {args.recall_ks}",
        flush=True,
    )

    results = []
    for n in args.sizes:
        print(
            f"N = {n}: K = {min(args.kmeans_k, n // 5)}, classes = "
            f"{max(2, min(n // 2, round(n / args.points_per_class)))}",
            flush=True,
        )
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "size.json"
            cmd = [
                sys.executable,
                os.path.abspath(__file__),
                *sys.argv[1:],
                "--device",
                args.device,
                "--child",
                str(n),
                "--child-out",
                str(out),
            ]
            proc = subprocess.run(cmd)
            if proc.returncode != 0 or not out.is_file():
                print(f"N = {n}: the run failed (exit code {proc.returncode})", flush=True)
                results.append({"info": {"n": n, "failed": True, "returncode": proc.returncode}, "rows": []})
                continue
            results.append(json.loads(out.read_text()))

    results_path = Path(args.results or f"benchmarks/results/scale_{args.device}.json")
    results_path.parent.mkdir(parents=True, exist_ok=True)
    child_args = {k: v for k, v in vars(args).items() if not k.startswith("child")}
    doc = {
        "benchmark": "scale",
        "command": " ".join(["python", *sys.argv]),
        "args": child_args,
        **info,
        "device": args.device,
        "faiss": faiss_info,
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
    results_path.write_text(json.dumps(doc, indent=2))

    print(
        f"\nScale benchmark, synthetic data | {args.device} ({info['card']}), torch threads "
        f"{torch.get_num_threads()} | commit {info['commit']}"
    )
    print_table(results)
    print(
        f"\nkNN is chunked: the largest block is {args.chunk_size} queries x N similarities, never N x N. "
        f"Rows marked EXTRAPOLATED were not measured.\nwrote {results_path}"
    )


if __name__ == "__main__":
    main()
