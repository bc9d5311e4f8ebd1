"""``udml cluster``: groups (k-means or a similarity threshold) and near-duplicates of a collection."""

from __future__ import annotations

from pathlib import Path


def run(args) -> int:
    import numpy as np

    from .. import groups
    from ..embeddings import load_embeddings

    emb = load_embeddings(args.embeddings)
    x, paths = emb.embeddings, emb.paths
    # one k-nearest-neighbour pass for the threshold sets, the near-duplicates and the quantiles, and k-means: exact
    # up to groups.EXACT_UP_TO images; above, unless --exact, faiss's HNSW graph and k-means in two levels
    exact = True if args.exact else False if args.approximate else None
    near = groups.nearest_neighbours(x, exact=exact)
    approximate = groups.approximate(len(x), exact)
    # groups follow a refined collection's refined vectors; near-duplicates are about the images themselves (raw)
    g = emb.vectors
    if args.threshold is not None:
        label, score = groups.threshold_groups(g, args.threshold, near=near if g is x else None)
        how = {"method": "threshold", "threshold": args.threshold}
    else:
        two_level = groups.approximate(len(x), exact, neighbours=False)
        label, score, k = groups.kmeans_groups(g, args.k, seed=args.seed, two_level=two_level)
        how = {"method": "kmeans two-level" if two_level else "kmeans", "k": k}
    if emb.refined is not None:
        how["refined"] = emb.meta["refine"]
    threshold = groups.DUPLICATE_THRESHOLD if args.duplicates is None else args.duplicates
    dup, dup_score = groups.near_duplicates(x, threshold, near=near)
    quantiles = groups.nearest_neighbour_quantiles(x, near=near)
    n_groups, n_dups = int(label.max()) + 1, int(dup.max()) + 1
    summary = {
        **how,
        "count": len(paths),
        "groups": n_groups,
        "ungrouped": int((label < 0).sum()),
        "duplicate_threshold": threshold,
        "duplicate_sets": n_dups,
        "images_in_duplicate_sets": int((dup >= 0).sum()),
        "nearest_neighbour_similarity": quantiles,
        "neighbours": "approximate (faiss HNSW)" if approximate else "exact",
        "embeddings": str(Path(args.embeddings).resolve()),
        "model": emb.meta.get("model"),
    }
    groups.write_groups(args.output, groups.group_rows(paths, label, score, dup, dup_score), summary)
    sizes = np.bincount(label[label >= 0]) if n_groups else np.zeros(1, dtype=int)
    none = f", {summary['ungrouped']} in none" if summary["ungrouped"] else ""
    print(
        f"{len(paths)} images: {n_groups} groups ({how['method']}; sizes {sizes.min()}-{sizes.max()}, median "
        f"{int(np.median(sizes))}{none}); {n_dups} sets of near-duplicates (cosine >= {threshold}) holding "
        f"{summary['images_in_duplicate_sets']} images -> {args.output}"
    )
    print(
        "each image's similarity to its nearest other image: "
        + ", ".join(f"{q[1:]} quantile {v:.3f}" for q, v in quantiles.items())
    )
    if approximate:
        print(
            f"neighbours found approximately (faiss HNSW) for the {len(paths)} images, above {groups.EXACT_UP_TO:,}: a "
            "pair may be missed, none is invented; --exact compares every pair (quadratic in the images)"
            if not args.approximate
            else f"neighbours found approximately (faiss HNSW) for the {len(paths)} images, as asked (--approximate)"
        )
    if how["method"] == "kmeans two-level":
        why = "as asked (--approximate)" if args.approximate else f"as above {groups.EXACT_UP_TO:,} images"
        print(
            f"k-means in two levels, {why}: about sqrt(K) coarse clusters, then the {k} groups within them (no group "
            f"spans two); --exact runs one level over all {k} centres (slower: N x K)"
        )
    if args.sheet:
        sheet = groups.contact_sheet(
            args.sheet, paths, label, score, title=f"largest groups of {Path(args.embeddings).name}"
        )
        print(f"largest groups -> {sheet}")
        if n_dups:
            dup_sheet = Path(args.sheet).with_name(Path(args.sheet).stem + "_duplicates.png")
            groups.contact_sheet(dup_sheet, paths, dup, dup_score, title="largest sets of near-duplicates")
            print(f"largest sets of near-duplicates -> {dup_sheet}")
    return 0


def add(sub) -> None:
    c = sub.add_parser(
        "cluster",
        help="group a collection's embeddings (k-means or a similarity threshold) and find near-duplicates",
        description="Group the images of an embeddings file and find sets of near-duplicates; writes one row per "
        "image (path, group, group_score, duplicate_group, duplicate_score; -1: in no group) as CSV or JSON. "
        "Scores are cosine similarities of the L2-normalised embeddings, in [-1, 1].",
    )
    c.add_argument("embeddings", help="embeddings written by udml embed (an .npz file or a folder of shards)")
    c.add_argument("--output", "-o", required=True, help="groups file to write: .csv or .json")
    c.add_argument("--k", type=int, help="k-means with K groups (default: about 50 images a group, as training)")
    c.add_argument(
        "--threshold",
        type=float,
        help="instead of k-means: link images whose cosine similarity is at least this; groups are the linked sets",
    )
    c.add_argument(
        "--duplicates",
        type=float,
        help="cosine similarity from which two images are near-duplicates (default 0.9: copies, resized and "
        "recompressed versions of a photo score above it, distinct photos of one bird species below, with Lite0)",
    )
    how = c.add_mutually_exclusive_group()
    how.add_argument(
        "--exact",
        action="store_true",
        help="compare every pair of images for the threshold groups, near-duplicates and quantiles, and run k-means "
        "in one level (default: exact up to 200,000 images; above, approximate nearest neighbours from faiss's "
        "HNSW graph and k-means in two levels: near-linear, not N^2)",
    )
    how.add_argument(
        "--approximate",
        action="store_true",
        help="faiss's HNSW graph (without faiss the neighbour pass is exact) and two-level k-means at any size",
    )
    c.add_argument("--sheet", help="also write a contact sheet (PNG) of the largest groups, and of the duplicates")
    c.add_argument("--seed", type=int, default=0, help="k-means seed")
    c.set_defaults(func=run)
