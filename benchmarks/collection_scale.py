"""The collection path end to end at 100,000 images on the CPU (issue #21, item 5), with a STAND-IN network.

    python -m benchmarks.collection_scale --n 100000               # the measurement (~15 min on 2 cores)
    python -m benchmarks.collection_scale --n 2000 --label 2k      # a quick check

Real files, real commands, a stand-in network: N small synthetic JPEGs (64 x 48, 100 folders, made under
``--folder`` by ``harness.synthetic_image``) are embedded by an untrained small convnet at 32 px with a 512-d
embedding head (random weights: the network's cost is not what is measured here; EfficientNet-Lite0 embeds about
120 images/s on this CPU, so its time at N is N / 120 s more, see RESULTS.md). Every other part is what a user
runs, each a whole command in its own process, timed, with its peak resident memory (``/usr/bin/time``-style: the
process's own high-water mark, VmHWM):

1. ``udml embed`` of the N images; 2. ``udml index`` (flat, then HNSW); 3. ``udml search`` of 10 images;
4. ``udml serve`` of the index kind ``udml index`` picks at N (flat up to 200,000, HNSW above): start,
   ``/api/info``, a page of the grid, neighbours of 20 images (latency), the mixed load of benchmarks.serve_load from
   16 concurrent clients (p50/p95 per kind of request), the 2-D map until ready;
5. 1 % new images added: ``udml embed`` and ``udml index`` (flat and HNSW) again, updating;
6. ``udml cluster`` (k-means at the default K and near-duplicates; above 200,000 images the HNSW neighbour pass
   and two-level k-means).

Writes ``benchmarks/results/collection_scale_cpu[_<label>].json`` (or ``--results``) and prints a table.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import time
import urllib.request
from pathlib import Path

import numpy as np

from .harness import RESULTS, base_parser, run_timed, status_kb, udml_serve, write_results, write_synthetic_images

FOLDERS = 100


def make_images(root: Path, start: int, stop: int) -> None:
    """Images start..stop-1: 64 x 48 JPEGs, image i in folder i % 100."""
    for f in range(FOLDERS):
        (root / f"f{f:03d}").mkdir(parents=True, exist_ok=True)
    write_synthetic_images(
        range(start, stop), lambda i, _: root / f"f{i % FOLDERS:03d}" / f"{i:07d}.jpg", size=(64, 48)
    )


def stand_in_model(path: Path) -> None:
    import torch

    from udml.checkpoint import save_model
    from udml.config import make_config
    from udml.models import model_from_config

    cfg = make_config("digits", ["embedding_dim=512", "image_size=32"])
    torch.manual_seed(0)
    save_model(model_from_config(cfg), cfg, path)


def timed(*args) -> dict:
    """``udml ARGS`` in its own process: seconds, peak RSS and the last line it printed."""
    r = run_timed(*args)
    return {"seconds": round(r.seconds, 2), "peak_rss_mb": round(r.peak_rss_mb, 1), "output": r.last_line}


def get(url: str, timeout: float = 600) -> tuple[int, dict, float]:
    t = time.perf_counter()
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, json.loads(r.read()), time.perf_counter() - t
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read()), time.perf_counter() - t


def serving(index: Path, photo: Path, n: int) -> dict:
    """``udml serve``: time to answer, a page of the grid, neighbour latency, then the mixed load of
    benchmarks.serve_load (16 clients, 2,000 requests: pages, thumbnails, neighbours, uploads, bad uploads), the 2-D
    map, peak RSS."""
    from types import SimpleNamespace

    from .serve_load import load

    t = time.perf_counter()
    out = {"index": index.name}
    with udml_serve(index) as (proc, base):
        _, info, _ = get(f"{base}/api/info")
        out["start_s"] = round(time.perf_counter() - t, 2)
        out["count"] = info["count"]
        _, page, out["page_s"] = get(f"{base}/api/images?offset={n // 2}&limit=60")
        latencies = [get(f"{base}/api/neighbours/{i}?k=10")[2] for i in range(0, info["count"], info["count"] // 20)]
        out["neighbours_ms_median"] = round(1000 * float(np.median(latencies)), 1)
        out["load"] = load(base, SimpleNamespace(n=n, requests=2000, clients=16), n, photo.read_bytes())
        t_map = time.perf_counter()
        while get(f"{base}/api/map")[0] == 202:
            time.sleep(2)
        out["map_s"] = round(time.perf_counter() - t_map, 1)
        out["still_answering"] = get(f"{base}/api/info")[1]["count"] == n and proc.poll() is None
        out["peak_rss_mb"] = round(status_kb("VmHWM", proc.pid) / 1024, 1)
    print(f"  udml serve: {out}", flush=True)
    return out


def main(argv: list[str] | None = None) -> int:
    p = base_parser(__doc__, results=True)
    p.add_argument("--n", type=int, default=100_000)
    p.add_argument("--folder", type=Path, default=Path("/tmp/udml_collection_scale"))
    p.add_argument("--label", default="")
    args = p.parse_args(argv)
    root, work = fresh_folders(args.folder, args.n)
    t = time.perf_counter()
    make_images(root, 0, args.n)
    out = {"n": args.n, "added": max(1, args.n // 100), "generate_s": round(time.perf_counter() - t, 1)}
    out["steps"] = steps(root, work, args.n, out["added"])
    out["embeddings_mb"] = round(os.path.getsize(work / "collection.npz") / 2**20, 1)
    out["own_peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    name = f"collection_scale_cpu{'_' + args.label if args.label else ''}.json"
    path = Path(args.results or RESULTS / name)
    write_results(path, out)
    print(f"\n{'step':20} {'seconds':>9} {'peak RSS MB':>12}")
    for k, v in out["steps"].items():
        print(f"{k:20} {v.get('seconds', v.get('start_s')):9} {v.get('peak_rss_mb', ''):>12}")
    print(f"-> {path}")
    return 0


def fresh_folders(folder: Path, n: int) -> tuple[Path, Path]:
    """(the images' folder, removed; the work folder, emptied of files)."""
    root, work = folder / f"n{n}", folder / f"work{n}"
    work.mkdir(parents=True, exist_ok=True)
    for p in work.glob("*"):
        if p.is_file():
            p.unlink()
    if root.exists():
        shutil.rmtree(root)
    return root, work


def steps(root: Path, work: Path, n: int, added: int) -> dict:
    """Every command of the collection path, in order, on N images, then again after ``added`` more."""
    model, npz = work / "stand_in.pt", work / "collection.npz"
    stand_in_model(model)
    steps = {}
    steps["embed"] = timed("embed", model, root, "-o", npz)
    steps["index_flat"] = timed("index", npz, "-o", work / "flat.faiss")
    steps["index_hnsw"] = timed("index", npz, "-o", work / "hnsw.faiss", "--hnsw")
    queries = [str(p) for p in sorted((root / "f000").iterdir())[:10]]
    steps["search_flat_10"] = timed("search", work / "flat.faiss", *queries, "-k", "10", "--json", work / "hits.json")
    steps["search_hnsw_10"] = timed("search", work / "hnsw.faiss", *queries, "-k", "10", "--json", work / "h.json")
    # udml serve of the index kind udml index picks without a flag at this size (flat up to 200,000, HNSW above)
    served = work / ("hnsw.faiss" if n > 200_000 else "flat.faiss")
    steps["serve"] = serving(served, Path(queries[0]), n)
    make_images(root, n, n + added)
    steps["embed_update"] = timed("embed", model, root, "-o", npz)
    steps["index_flat_update"] = timed("index", npz, "-o", work / "flat.faiss")
    steps["index_hnsw_update"] = timed("index", npz, "-o", work / "hnsw.faiss", "--hnsw")
    steps["cluster"] = timed("cluster", npz, "-o", work / "groups.csv")
    return steps


if __name__ == "__main__":
    raise SystemExit(main())
