"""``udml serve`` under load from concurrent clients at 1,000,000 images (issue #30, item 5), STAND-IN vectors.

    python -m benchmarks.serve_load --n 1000000            # the measurement (the HNSW build is most of it)
    python -m benchmarks.serve_load --n 20000 --label 20k  # a quick check

What a user runs, on a stand-in collection: N synthetic 512-d unit vectors (SOP-like classes of 5,
benchmarks.harness.synthetic_embeddings) written as an embeddings file whose first ``--files`` paths are real small
JPEGs (so thumbnails and uploads read real files) and the rest made-up paths (a grid page and a neighbour query read
no image); ``udml index`` of it (the kind ``udml index`` picks at N: HNSW above 200,000), timed; then ``udml serve``
of that index with a stand-in model for uploads (an untrained small convnet at 32 px with a 512-d head, as
benchmarks.collection_scale). ``--clients`` threads send ``--requests`` requests in all, mixed as the CI test
``test_serve_under_load_from_concurrent_clients`` mixes them: grid pages at random offsets, thumbnails, neighbour
queries of random images, uploads of a real photo, and bad uploads (garbage, a truncated PNG, a text file) that must
get 400. Recorded: each kind's p50 / p95 / max latency under that load and its status codes, the requests per
second, the server's start time and peak resident memory (VmHWM), and that it still answers afterwards.
"""

from __future__ import annotations

import io
import random
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from .collection_scale import stand_in_model
from .harness import (
    RESULTS,
    base_parser,
    run_timed,
    status_kb,
    synthetic_embeddings,
    udml_serve,
    write_results,
    write_synthetic_images,
)

WEIGHTS = {"page": 10, "thumb": 4, "neighbours": 6, "upload": 3, "bad": 1}
EXPECTED = {"page": 200, "thumb": 200, "neighbours": 200, "upload": 200, "bad": 400}


def main(argv: list[str] | None = None) -> int:
    p = base_parser(__doc__, results=True)
    p.add_argument("--n", type=int, default=1_000_000)
    p.add_argument("--files", type=int, default=2000, help="how many of the paths are real JPEGs")
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--requests", type=int, default=2000)
    p.add_argument("--label", default="")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        out = measure(args, Path(tmp))
    path = Path(args.results or RESULTS / f"serve_load_cpu{'_' + args.label if args.label else ''}.json")
    write_results(path, out)
    print(f"-> {path}")
    return 0


def measure(args, tmp: Path) -> dict:
    from udml.embeddings import Embeddings, save_embeddings
    from udml.retrieval import Embedder, embedder_meta

    files = min(args.files, args.n)
    (tmp / "photos").mkdir()
    write_synthetic_images(range(files), lambda i, _: tmp / "photos" / f"{i:06d}.jpg", size=(64, 48))
    x, _, _ = synthetic_embeddings(args.n, 512, 5.0, 0.5, 0)
    paths = [str(tmp / "photos" / f"{i:06d}.jpg") for i in range(files)]
    paths += [f"/stand-in/{i:07d}.jpg" for i in range(files, args.n)]
    stand_in_model(tmp / "model.pt")
    meta = embedder_meta(Embedder.from_file(tmp / "model.pt"))  # as udml embed records it: uploads are checked
    save_embeddings(tmp / "c.npz", Embeddings(x.numpy(), paths, meta))
    del x
    t = run_timed("index", tmp / "c.npz", "-o", tmp / "c.faiss")
    out = {
        "n": args.n,
        "stand_in": "synthetic 512-d vectors and a stand-in network, not a real collection",
        "index": {"seconds": round(t.seconds, 1), "peak_rss_mb": t.peak_rss_mb, "said": t.last_line},
    }
    print(f"udml index: {out['index']}", flush=True)
    t0 = time.perf_counter()
    with udml_serve(tmp / "c.faiss", "--model", tmp / "model.pt", "--device", "cpu") as (proc, url):
        import httpx

        httpx.get(url + "/api/info", timeout=600).raise_for_status()
        out["serve_ready_s"] = round(time.perf_counter() - t0, 1)
        out["load"] = load(url, args, files, Path(paths[0]).read_bytes())
        info = httpx.get(url + "/api/info", timeout=60).json()
        out["still_answering"] = info["count"] == args.n and proc.poll() is None
        out["server_peak_rss_mb"] = round(status_kb("VmHWM", proc.pid) / 1024, 1)
    print(
        f"serve ready in {out['serve_ready_s']} s, peak RSS {out['server_peak_rss_mb']} MB, still answering "
        f"{out['still_answering']}",
        flush=True,
    )
    return out


def load(url: str, args, files: int, photo: bytes) -> dict:
    """``args.requests`` mixed requests from ``args.clients`` threads, each on its own keep-alive client."""
    import threading

    import httpx
    from PIL import Image

    png = io.BytesIO()
    Image.new("RGB", (64, 64), "red").save(png, format="PNG")
    bad = [b"not an image at all", png.getvalue()[:60], b"a text file\n" * 50]
    rng = random.Random(0)
    kinds = rng.choices(list(WEIGHTS), weights=list(WEIGHTS.values()), k=args.requests)
    local = threading.local()

    def request(i: int) -> tuple[str, int, float]:
        c = getattr(local, "client", None) or httpx.Client(base_url=url, timeout=120)
        local.client = c
        kind, r = kinds[i], random.Random(i)
        t = time.perf_counter()
        if kind == "page":
            resp = c.get("/api/images", params={"offset": r.randrange(args.n - 60), "limit": 60})
        elif kind == "thumb":
            resp = c.get(f"/api/images/{r.randrange(files)}/thumb")
        elif kind == "neighbours":
            resp = c.get(f"/api/neighbours/{r.randrange(args.n)}", params={"k": 10})
        else:
            data = photo if kind == "upload" else bad[i % len(bad)]
            resp = c.post("/api/search", params={"k": 10}, files={"image": ("q.jpg", data, "image/jpeg")})
        return kind, resp.status_code, (time.perf_counter() - t) * 1000

    t = time.perf_counter()
    with ThreadPoolExecutor(args.clients) as pool:
        answers = list(pool.map(request, range(args.requests)))
    wall = time.perf_counter() - t
    out = {"clients": args.clients, "requests": args.requests, "seconds": round(wall, 1)}
    out["requests_per_s"] = round(args.requests / wall, 1)
    out["wrong_status"] = sum(s != EXPECTED[k] for k, s, _ in answers)
    for kind in WEIGHTS:
        ms = np.array([m for k, _, m in answers if k == kind])
        codes = sorted({s for k, s, _ in answers if k == kind})
        if not len(ms):  # a short run may draw no request of this kind
            out[kind] = {"count": 0}
            continue
        out[kind] = {
            "count": len(ms),
            "p50_ms": round(float(np.percentile(ms, 50)), 1),
            "p95_ms": round(float(np.percentile(ms, 95)), 1),
            "max_ms": round(float(ms.max()), 1),
            "status": codes,
        }
        print(f"  {kind:10} {out[kind]}", flush=True)
    print(f"  {out['requests']} requests in {out['seconds']} s, {out['wrong_status']} with a wrong status", flush=True)
    return out


if __name__ == "__main__":
    raise SystemExit(main())
