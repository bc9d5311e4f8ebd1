"""The collection path end to end at 100,000 images on the CPU (issue #21, item 5), with a STAND-IN network.

    python benchmarks/collection_scale.py --n 100000               # the measurement (~15 min on 2 cores)
    python benchmarks/collection_scale.py --n 2000 --label 2k      # a quick check

Real files, real commands, a stand-in network: N small synthetic JPEGs (64 x 48, 100 folders, made once under
``--folder``) are embedded by an untrained small convnet at 32 px with a 512-d embedding head (random weights:
the network's cost is not what is measured here; EfficientNet-Lite0 embeds about 120 images/s on this CPU, so
its time at N is N / 120 s more, see RESULTS.md). Every other part is what a user runs, each a whole command in
its own process, timed, with its peak resident memory (``/usr/bin/time``-style, from the kernel's ru_maxrss):

1. ``udml embed`` of the N images; 2. ``udml index`` (flat, then HNSW); 3. ``udml search`` of 10 images;
4. ``udml serve``: start, ``/api/info``, a page of the grid, neighbours of one image (latency), the 2-D map until
   ready; 5. 1 % new images added: ``udml embed`` and ``udml index`` (flat and HNSW) again, updating;
6. ``udml cluster`` (k-means at the default K and near-duplicates).

Writes ``benchmarks/results/collection_scale_cpu[_<label>].json`` and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine  # noqa: E402

HERE = Path(__file__).resolve().parent
FOLDERS = 100


def make_images(root: Path, start: int, stop: int) -> None:
    """Images start..stop-1: 64 x 48 JPEGs, a colour and a gradient by image number, a little noise."""

    def save(i: int) -> None:
        rng = np.random.default_rng(i)
        base = np.array([(i * 37) % 256, (i * 91) % 256, (i * 53) % 256], dtype=np.float32)
        ramp = np.linspace(0, 80, 64, dtype=np.float32)[None, :, None]
        pixels = np.clip(base + ramp + rng.normal(0, 12, (48, 64, 3)), 0, 255).astype(np.uint8)
        folder = root / f"f{i % FOLDERS:03d}"
        Image.fromarray(pixels).save(folder / f"{i:07d}.jpg", quality=85)

    for f in range(FOLDERS):
        (root / f"f{f:03d}").mkdir(parents=True, exist_ok=True)
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(save, range(start, stop), chunksize=256))


def stand_in_model(path: Path) -> None:
    import torch

    from udml.checkpoint import save_model
    from udml.config import make_config
    from udml.models import model_from_config

    cfg = make_config("digits", ["embedding_dim=512", "image_size=32"])
    torch.manual_seed(0)
    save_model(model_from_config(cfg), cfg, path)


def timed(*args) -> dict:
    """Run ``udml ARGS`` in its own process: wall time and the process's peak RSS. The wrapper reads VmHWM, not
    getrusage's ru_maxrss, which Linux carries over exec from the forked copy of this (torch-importing) process."""
    wrapper = (
        "import runpy, sys; sys.argv = ['udml'] + sys.argv[1:]\n"
        "try:\n    runpy.run_module('udml', run_name='__main__')\n"
        "except SystemExit as e:\n    code = e.code\nelse:\n    code = 0\n"
        "hwm = [line for line in open('/proc/self/status') if line.startswith('VmHWM')][0].split()[1]\n"
        "print('PEAK_RSS_KB', hwm, file=sys.stderr)\n"
        "sys.exit(code)\n"
    )
    t = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", wrapper, *map(str, args)], capture_output=True, text=True)
    seconds = time.perf_counter() - t
    if proc.returncode:
        raise SystemExit(f"udml {' '.join(map(str, args))} failed:\n{proc.stderr[-3000:]}")
    peak = int(proc.stderr.rsplit("PEAK_RSS_KB", 1)[1].split()[0]) / 1024
    last = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else ""
    print(f"  udml {args[0]}: {seconds:.1f} s, peak RSS {peak:.0f} MB | {last[:140]}", flush=True)
    return {"seconds": round(seconds, 2), "peak_rss_mb": round(peak, 1), "output": last}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get(url: str, timeout: float = 600) -> tuple[int, dict, float]:
    t = time.perf_counter()
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, json.loads(r.read()), time.perf_counter() - t
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read()), time.perf_counter() - t


def serving(index: Path) -> dict:
    port = free_port()
    t = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-m", "udml", "serve", str(index), "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    base, out = f"http://127.0.0.1:{port}", {}
    try:
        while True:
            try:
                status, info, _ = get(f"{base}/api/info", timeout=5)
                break
            except OSError:
                if proc.poll() is not None or time.perf_counter() - t > 600:
                    raise SystemExit(f"udml serve did not start:\n{proc.stdout.read()[-3000:]}") from None
                time.sleep(0.5)
        out["start_s"] = round(time.perf_counter() - t, 2)
        out["count"] = info["count"]
        _, page, out["page_s"] = get(f"{base}/api/images?offset=50000&limit=60")
        latencies = [get(f"{base}/api/neighbours/{i}?k=10")[2] for i in range(0, info["count"], info["count"] // 20)]
        out["neighbours_ms_median"] = round(1000 * float(np.median(latencies)), 1)
        t_map = time.perf_counter()
        while get(f"{base}/api/map")[0] == 202:
            time.sleep(2)
        out["map_s"] = round(time.perf_counter() - t_map, 1)
        with open(f"/proc/{proc.pid}/status") as f:
            hwm = next(line for line in f if line.startswith("VmHWM"))
        out["peak_rss_mb"] = round(int(hwm.split()[1]) / 1024, 1)
    finally:
        proc.terminate()
        proc.wait(30)
    print(f"  udml serve: {out}", flush=True)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--folder", type=Path, default=Path("/tmp/udml_collection_scale"))
    ap.add_argument("--label", default="")
    args = ap.parse_args()
    added = max(1, args.n // 100)
    root = args.folder / f"n{args.n}"
    work = args.folder / f"work{args.n}"
    work.mkdir(parents=True, exist_ok=True)
    for p in work.glob("*"):
        if p.is_file():
            p.unlink()
    if root.exists():
        shutil.rmtree(root)
    t = time.perf_counter()
    make_images(root, 0, args.n)
    out = {"machine": machine(), "n": args.n, "added": added, "generate_s": round(time.perf_counter() - t, 1)}
    model, npz = work / "stand_in.pt", work / "collection.npz"
    stand_in_model(model)
    steps = out["steps"] = {}
    steps["embed"] = timed("embed", model, root, "-o", npz)
    steps["index_flat"] = timed("index", npz, "-o", work / "flat.faiss")
    steps["index_hnsw"] = timed("index", npz, "-o", work / "hnsw.faiss", "--hnsw")
    queries = [str(p) for p in sorted((root / "f000").iterdir())[:10]]
    steps["search_flat_10"] = timed("search", work / "flat.faiss", *queries, "-k", "10", "--json", work / "hits.json")
    steps["search_hnsw_10"] = timed("search", work / "hnsw.faiss", *queries, "-k", "10", "--json", work / "h.json")
    steps["serve"] = serving(work / "flat.faiss")
    make_images(root, args.n, args.n + added)
    steps["embed_update"] = timed("embed", model, root, "-o", npz)
    steps["index_flat_update"] = timed("index", npz, "-o", work / "flat.faiss")
    steps["index_hnsw_update"] = timed("index", npz, "-o", work / "hnsw.faiss", "--hnsw")
    steps["cluster"] = timed("cluster", npz, "-o", work / "groups.csv")
    out["embeddings_mb"] = round(os.path.getsize(npz) / 2**20, 1)
    out["own_peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    name = f"collection_scale_cpu{'_' + args.label if args.label else ''}.json"
    path = HERE / "results" / name
    path.write_text(json.dumps(out, indent=2) + "\n")
    print(f"\n{'step':20} {'seconds':>9} {'peak RSS MB':>12}")
    for k, v in steps.items():
        print(f"{k:20} {v.get('seconds', v.get('start_s')):9} {v.get('peak_rss_mb', ''):>12}")
    print(f"-> {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
