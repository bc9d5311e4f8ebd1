"""`udml cluster` at 100,000 and 1,000,000 embeddings (issue #30, item 1): the exact neighbour pass against faiss's
HNSW graph, on STAND-IN embeddings (synthetic, not a network's).

    python -m benchmarks.cluster_scale --sizes 100000 1000000 --exact-up-to 100000

For each size: SOP-like synthetic unit vectors (benchmarks.harness.synthetic_embeddings, 512-d, 5 per class) with
one in 50 replaced by a near-copy of another (similarity about 0.95), written as an embeddings file; then the whole
`udml cluster FILE -o groups.csv` command, timed with its peak memory, with ``--approximate`` (faiss's HNSW graph
and k-means in two levels, the default above udml.groups.EXACT_UP_TO) and, up to ``--exact-up-to``, with
``--exact`` (every pair compared, one level of k-means). Where both ran, the near-duplicate pairs at the default
threshold (0.9) are compared: the approximate pass's recall of the exact pairs, and its precision (1.0 when it only
misses pairs, as it should); and the groups: each mode's mean similarity of an image to its group's centre (what
k-means maximises), its NMI to the synthetic classes, and the NMI between the two modes' groups.
"""

from __future__ import annotations

import csv
import json
import tempfile
from pathlib import Path

import numpy as np
from sklearn.metrics import normalized_mutual_info_score

from udml.embeddings import Embeddings, save_embeddings

from .harness import RESULTS, add_synthetic_options, base_parser, run_timed, synthetic_embeddings, write_results


def main(argv: list[str] | None = None) -> int:
    p = base_parser(__doc__, results=RESULTS / "cluster_scale_cpu.json")
    p.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    p.add_argument("--exact-up-to", type=int, default=100_000, help="largest size also run with --exact")
    p.add_argument("--copies", type=float, default=0.02, help="fraction of rows made near-copies of another")
    p.add_argument(
        "--kmeans-only",
        action="store_true",
        help="time k-means alone, in this process, at the default K: two levels at every size, one level up to "
        "--exact-up-to (results to cluster_scale_kmeans_cpu.json unless --results)",
    )
    add_synthetic_options(p, points_per_class=5.0)
    args = p.parse_args(argv)
    if args.kmeans_only and args.results == str(RESULTS / "cluster_scale_cpu.json"):
        args.results = str(RESULTS / "cluster_scale_kmeans_cpu.json")
    rows = []
    for n in args.sizes:
        if args.kmeans_only:
            rows.append(time_kmeans(n, args))
        else:
            with tempfile.TemporaryDirectory() as tmp:
                rows.append(measure(n, args, Path(tmp)))
        write_results(args.results, {"stand_in": "synthetic embeddings, not a network's", "rows": rows})
    return 0


def time_kmeans(n: int, args) -> dict:
    """udml.groups.kmeans_groups at the default K, two levels and (up to --exact-up-to) one: seconds, the mean
    similarity of an image to its group's centre (what k-means maximises), NMI to the synthetic classes."""
    import time

    from udml import groups

    x, classes, _ = synthetic_embeddings(n, args.dim, args.points_per_class, args.noise, args.seed)
    row = {"n": n, "dim": args.dim}
    for mode, two_level in (("two_level", True), ("one_level", False)):
        if not two_level and n > args.exact_up_to:
            continue
        t = time.perf_counter()
        labels, score, k = groups.kmeans_groups(x, seed=0, two_level=two_level)
        row["k"] = k
        row[mode] = {
            "seconds": round(time.perf_counter() - t, 1),
            "mean_similarity_to_centre": round(float(score.mean()), 4),
            "nmi_to_classes": round(normalized_mutual_info_score(classes.numpy(), labels), 4),
        }
    print(json.dumps(row), flush=True)
    return row


def measure(n: int, args, tmp: Path) -> dict:
    npz = tmp / "emb.npz"
    classes = write_embeddings(n, args, npz)
    row = {"n": n, "dim": args.dim}
    grouped = {}
    modes = [("approximate", ["--approximate"])] + ([("exact", ["--exact"])] if n <= args.exact_up_to else [])
    pairs = {}
    for mode, extra in modes:
        out = tmp / f"groups_{mode}.csv"
        t = run_timed("cluster", npz, "-o", out, *extra)
        row[mode] = {"seconds": round(t.seconds, 1), "peak_rss_mb": t.peak_rss_mb, "said": t.stdout.strip()}
        pairs[mode] = duplicate_sets(out)
        grouped[mode] = read_groups(out)
        row[mode]["groups"] = {
            "mean_similarity_to_centre": round(float(grouped[mode][1].mean()), 4),
            "nmi_to_classes": round(normalized_mutual_info_score(classes, grouped[mode][0]), 4),
        }
    if "exact" in pairs:
        row["duplicates_vs_exact"] = compare(pairs["approximate"], pairs["exact"])
        row["groups_nmi_two_level_vs_one"] = round(
            normalized_mutual_info_score(grouped["exact"][0], grouped["approximate"][0]), 4
        )
    print(json.dumps(row), flush=True)
    return row


def write_embeddings(n: int, args, path: Path) -> np.ndarray:
    """Writes the stand-in file; returns the synthetic classes (the near-copies keep their own row's class)."""
    x, classes, _ = synthetic_embeddings(n, args.dim, args.points_per_class, args.noise, args.seed)
    x = x.numpy()
    rng = np.random.default_rng(args.seed)
    k = int(n * args.copies)
    src, dst = rng.choice(n, 2 * k, replace=False).reshape(2, k)
    x[dst] = x[src] + 0.32 / np.sqrt(args.dim) * rng.standard_normal((k, args.dim)).astype(np.float32)
    x[dst] /= np.linalg.norm(x[dst], axis=1, keepdims=True)
    save_embeddings(path, Embeddings(x, [f"/stand-in/{i:07d}.jpg" for i in range(n)], {"model": "stand-in"}))
    return classes.numpy()


def read_groups(groups_csv: Path) -> tuple[np.ndarray, np.ndarray]:
    """(group, group_score) of every image, in the file's order (the embeddings' order)."""
    with open(groups_csv) as f:
        rows = list(csv.DictReader(f))
    return np.array([int(r["group"]) for r in rows]), np.array([float(r["group_score"]) for r in rows])


def duplicate_sets(groups_csv: Path) -> set[tuple[int, int]]:
    """The pairs of images that share a near-duplicate set (all pairs within each set)."""
    members: dict[int, list[int]] = {}
    with open(groups_csv) as f:
        for i, r in enumerate(csv.DictReader(f)):
            if int(r["duplicate_group"]) >= 0:
                members.setdefault(int(r["duplicate_group"]), []).append(i)
    return {(a, b) for m in members.values() for j, a in enumerate(m) for b in m[j + 1 :]}


def compare(found: set, truth: set) -> dict:
    hit = len(found & truth)
    return {
        "exact_pairs": len(truth),
        "approximate_pairs": len(found),
        "recall": hit / max(1, len(truth)),
        "precision": hit / max(1, len(found)),
    }


if __name__ == "__main__":
    raise SystemExit(main())
