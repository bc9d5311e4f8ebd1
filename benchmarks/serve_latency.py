"""Latency of ``udml serve``'s neighbour query on a large index, through its HTTP API.

    python -m benchmarks.serve_latency                   # 100,000 x 512-d, 200 queries, k = 10

The vectors are SYNTHETIC (L2-normalised Gaussian, fixed seed) and the paths made up: a neighbour query
by id reads no image file, only the index. Each of ``--queries`` random ids is asked for its ``k``
nearest neighbours (``GET /api/neighbours/{id}?k=``) three ways, after a few warm-up queries:

- ``library``: ``Collection.neighbours_of`` called directly (the search and the JSON-ready rows);
- ``test_client``: through FastAPI's TestClient (the whole app, in process, no sockets);
- ``http``: ``udml serve`` itself, in its own process, on the same vectors written as an index file, and an
  httpx client with keep-alive on 127.0.0.1 (what a browser sees, minus its rendering).

Prints median, p95 and max in milliseconds and writes ``--results``
(default benchmarks/results/serve_latency_cpu.json) with the machine information and the load average
(other jobs on a shared machine slow every number down).
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import numpy as np

from .harness import RESULTS, ROOT, base_parser, command_line, udml_serve, write_results


def synthetic_collection(n: int, dim: int, kind: str, folder: str, seed: int = 0):
    """A Collection over synthetic vectors, and the same vectors saved as an index file in ``folder``."""
    from udml.embeddings import Embeddings
    from udml.index import build_index, save_index
    from udml.serve import Collection

    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, dim), dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    paths = [f"/synthetic/class_{i % 1000:04d}/img_{i:06d}.jpg" for i in range(n)]
    t0 = time.perf_counter()
    index = build_index(x, kind)
    build_s = time.perf_counter() - t0
    meta = {"dim": dim, "model": None}
    index_file = Path(folder) / f"synthetic.{kind}.faiss"
    save_index(index_file, index, Embeddings(x, paths, meta), kind)
    return Collection(index, paths, meta, cache_dir=Path(folder) / "cache"), index_file, build_s


def timed(call, ids) -> dict:
    """Milliseconds per call over the ids: median, p95, max and mean."""
    times = []
    for i in ids:
        t0 = time.perf_counter()
        call(int(i))
        times.append((time.perf_counter() - t0) * 1000)
    t = np.array(times)
    return {
        "median_ms": round(float(np.median(t)), 2),
        "p95_ms": round(float(np.percentile(t, 95)), 2),
        "max_ms": round(float(t.max()), 2),
        "mean_ms": round(float(t.mean()), 2),
        "queries": len(t),
    }


def main(argv: list[str] | None = None) -> int:
    p = base_parser(__doc__, results=RESULTS / "serve_latency_cpu.json")
    p.add_argument("--n", type=int, default=100_000, help="indexed vectors (default 100,000)")
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--kind", default="flat", choices=["flat", "ivf", "hnsw"], help="index kind (default flat: exact)")
    p.add_argument("--queries", type=int, default=200)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("-k", type=int, default=10)
    args = p.parse_args(argv)

    import faiss

    load_before = os.getloadavg()  # before the queries: they set this thread's faiss threads to 1
    faiss_threads = faiss.omp_get_max_threads()
    with tempfile.TemporaryDirectory() as folder:
        collection, index_file, build_s = synthetic_collection(args.n, args.dim, args.kind, folder)
        print(
            f"{args.kind} index of {args.n} x {args.dim}-d synthetic vectors built in {build_s:.1f} s; "
            f"faiss threads {faiss_threads} (one per query in udml serve)"
        )
        results = latencies(args, collection, index_file)
    out = {
        "benchmark": "serve_latency",
        "command": command_line(__file__, argv),
        "args": {**vars(args), "results": os.path.relpath(args.results, ROOT)},
        "faiss": {"version": faiss.__version__, "threads": faiss_threads, "threads_per_query": 1},
        "load_average_1_5_15_min": {
            "before": [round(v, 2) for v in load_before],
            "after": [round(v, 2) for v in os.getloadavg()],
        },
        "index_build_s": round(build_s, 2),
        "data": "synthetic L2-normalised Gaussian vectors, seed 0; made-up paths (no image is read)",
        "latency": results,
    }
    write_results(args.results, out, block="flat")
    print(f"-> {args.results}")
    return 0


def latencies(args, collection, index_file: Path) -> dict:
    """The neighbour query timed three ways (library, TestClient, udml serve over HTTP) after a warm-up each."""
    import httpx
    from fastapi.testclient import TestClient

    from udml.serve import create_app

    rng = np.random.default_rng(1)
    warm, ids = rng.integers(0, args.n, args.warmup), rng.integers(0, args.n, args.queries)
    results = {}
    with udml_serve(index_file) as (_, url), httpx.Client(base_url=url, timeout=30) as http:
        ways = {
            "library": lambda i: collection.neighbours_of(i, args.k),
            "test_client": through(TestClient(create_app(collection)), args.k),
            "http": through(http, args.k),
        }
        for name, call in ways.items():
            for i in warm:
                call(int(i))
            r = results[name] = timed(call, ids)
            print(
                f"{name:12s} median {r['median_ms']:7.2f} ms   p95 {r['p95_ms']:7.2f} ms   "
                f"max {r['max_ms']:7.2f} ms   ({r['queries']} queries, k = {args.k})"
            )
    return results


def through(client, k: int):
    """The neighbour query of the JSON API through a client (TestClient or httpx), checked."""

    def call(i):
        r = client.get(f"/api/neighbours/{i}", params={"k": k})
        assert r.status_code == 200 and len(r.json()["results"]) == k, r.text

    return call


if __name__ == "__main__":
    raise SystemExit(main())
