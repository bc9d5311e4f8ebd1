"""Latency of ``udml serve``'s neighbour query on a large index, through its HTTP API.

    python benchmarks/serve_latency.py                      # 100,000 x 512-d, 200 queries, k = 10

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

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine  # noqa: E402


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


def start_udml_serve(index_file: Path) -> tuple[subprocess.Popen, str]:
    """``udml serve INDEX --port 0`` in its own process; returns it and the address it printed."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "udml", "serve", str(index_file), "--port", "0"], stdout=subprocess.PIPE, text=True
    )
    line = proc.stdout.readline()
    if " at http://" not in line:
        proc.kill()
        raise RuntimeError(f"udml serve did not start: {line!r}")
    return proc, line.split(" at ")[1].split()[0]


def timed(call, ids) -> dict:
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


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=100_000, help="indexed vectors (default 100,000)")
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--kind", default="flat", choices=["flat", "ivf", "hnsw"], help="index kind (default flat: exact)")
    p.add_argument("--queries", type=int, default=200)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("-k", type=int, default=10)
    p.add_argument("--results", default=str(Path(__file__).parent / "results" / "serve_latency_cpu.json"))
    args = p.parse_args(argv)

    import faiss
    import httpx
    from fastapi.testclient import TestClient

    from udml.serve import create_app

    load_before, host = os.getloadavg(), machine()  # before the queries: they set this thread's faiss threads to 1
    faiss_threads = faiss.omp_get_max_threads()
    with tempfile.TemporaryDirectory() as folder:
        collection, index_file, build_s = synthetic_collection(args.n, args.dim, args.kind, folder)
        print(
            f"{args.kind} index of {args.n} x {args.dim}-d synthetic vectors built in {build_s:.1f} s; "
            f"faiss threads {faiss_threads} (one per query in udml serve)"
        )
        rng = np.random.default_rng(1)
        warm, ids = rng.integers(0, args.n, args.warmup), rng.integers(0, args.n, args.queries)
        client = TestClient(create_app(collection))
        server, url = start_udml_serve(index_file)
        http = httpx.Client(base_url=url, timeout=30)

        def library(i):
            return collection.neighbours_of(i, args.k)

        def through(client_):
            def call(i):
                r = client_.get(f"/api/neighbours/{i}", params={"k": args.k})
                assert r.status_code == 200 and len(r.json()["results"]) == args.k, r.text

            return call

        results = {}
        try:
            for name, call in (("library", library), ("test_client", through(client)), ("http", through(http))):
                for i in warm:
                    call(int(i))
                results[name] = timed(call, ids)
                r = results[name]
                print(
                    f"{name:12s} median {r['median_ms']:7.2f} ms   p95 {r['p95_ms']:7.2f} ms   "
                    f"max {r['max_ms']:7.2f} ms   ({r['queries']} queries, k = {args.k})"
                )
        finally:
            http.close()
            server.terminate()
            server.wait(timeout=30)

    out = {
        "benchmark": "serve_latency",
        "command": "python " + " ".join([sys.argv[0], *(argv or sys.argv[1:])]),
        "args": {**vars(args), "results": os.path.relpath(args.results, Path(__file__).resolve().parents[1])},
        **host,
        "faiss": {"version": faiss.__version__, "threads": faiss_threads, "threads_per_query": 1},
        "load_average_1_5_15_min": {
            "before": [round(v, 2) for v in load_before],
            "after": [round(v, 2) for v in os.getloadavg()],
        },
        "index_build_s": round(build_s, 2),
        "data": "synthetic L2-normalised Gaussian vectors, seed 0; made-up paths (no image is read)",
        "latency": results,
    }
    Path(args.results).parent.mkdir(parents=True, exist_ok=True)
    Path(args.results).write_text(json.dumps(out, indent=2) + "\n")
    print(f"-> {args.results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
