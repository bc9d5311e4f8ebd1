"""An embeddings file that appends (issue #30, item 2): a 1 % update of 100,000 and 1,000,000 embeddings written as
one `.npz` (rewritten whole) against a folder of row shards (only what changed), on STAND-IN embeddings.

    python -m benchmarks.embeddings_shards --sizes 100000 1000000

For each size N: synthetic 512-d unit vectors with paths and file stamps as `udml embed` keeps them, written both
ways (time, bytes); then 1 % of the collection changes (0.5 % new files, 0.25 % removed, 0.25 % rewritten) and the
new state is written both ways again (time, bytes written by that write), then read back (time). The writes are
udml.embeddings.save_embeddings, the reads load_embeddings: what `udml embed` and every reader of its output do.
"""

from __future__ import annotations

import dataclasses
import tempfile
import time
from pathlib import Path

import numpy as np

from udml.embeddings import Embeddings, load_embeddings, save_embeddings

from .harness import RESULTS, base_parser, write_results


def main(argv: list[str] | None = None) -> int:
    p = base_parser(__doc__, results=RESULTS / "embeddings_shards_cpu.json")
    p.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--changed", type=float, default=0.01, help="fraction of the collection an update changes")
    args = p.parse_args(argv)
    rows = []
    for n in args.sizes:
        with tempfile.TemporaryDirectory() as tmp:
            rows.append(measure(n, args.dim, args.changed, Path(tmp)))
        write_results(args.results, {"stand_in": "synthetic embeddings, not a network's", "rows": rows})
    return 0


def measure(n: int, dim: int, fraction: float, tmp: Path) -> dict:
    first = stand_in(n, dim, seed=0)
    second = update(first, fraction)
    row = {"n": n, "dim": dim, "changed_rows": int(fraction * n)}
    for kind, path in (("npz", tmp / "emb.npz"), ("shards", tmp / "emb")):
        full = timed_write(path, first)
        part = timed_write(path, second)
        t = time.perf_counter()
        back = load_embeddings(path)
        read_s = time.perf_counter() - t
        assert back.paths == second.paths
        row[kind] = {"full_write": full, "update_write": part, "read_s": round(read_s, 2)}
        sizes = [f"{w['seconds']:6.2f} s {w['bytes'] / 2**20:8.1f} MB" for w in (full, part)]
        print(f"N {n:>9,} {kind:6}: full {sizes[0]} | 1 % update {sizes[1]} | read {read_s:.2f} s", flush=True)
    return row


def timed_write(path: Path, emb: Embeddings) -> dict:
    t = time.perf_counter()
    written = save_embeddings(path, emb)
    return {"seconds": round(time.perf_counter() - t, 3), "bytes": written["bytes"], "files": written["files"]}


def stand_in(n: int, dim: int, seed: int, start: int = 0) -> Embeddings:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, dim), dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    paths = [f"/collection/{i // 1000:04d}/{i:08d}.jpg" for i in range(start, start + n)]
    stamps = np.stack([np.full(n, 250_000), 1_700_000_000_000_000_000 + np.arange(start, start + n)], 1)
    meta = {"model": "stand-in", "model_fingerprint": "stand-in", "precision": "float32", "dim": dim}
    return Embeddings(x, paths, meta, stamps=stamps.astype(np.int64))


def update(emb: Embeddings, fraction: float) -> Embeddings:
    """0.5 % new files (at the end of the sorted paths), 0.25 % removed, 0.25 % rewritten, spread over the rows."""
    n = len(emb.paths)
    rng = np.random.default_rng(1)
    gone = rng.choice(n, int(n * fraction / 4), replace=False)
    keep = np.setdiff1d(np.arange(n), gone)
    x, stamps = emb.embeddings[keep].copy(), emb.stamps[keep].copy()
    rewritten = rng.choice(len(keep), int(n * fraction / 4), replace=False)
    x[rewritten] = rng.standard_normal((len(rewritten), x.shape[1]), dtype=np.float32)
    stamps[rewritten, 1] += 1
    new = stand_in(int(n * fraction / 2), x.shape[1], seed=2, start=n)
    return dataclasses.replace(
        emb,
        embeddings=np.concatenate([x, new.embeddings]),
        paths=[emb.paths[i] for i in keep] + new.paths,
        stamps=np.concatenate([stamps, new.stamps]),
    )


if __name__ == "__main__":
    raise SystemExit(main())
