"""``udml index``: a faiss index over an embeddings file, updated in place as the collection changes."""

from __future__ import annotations

from ..errors import InputError

FLAT_UP_TO = 200_000  # exact search of 200,000 x 512-d answers a query in tens of ms on 2 cores; above, HNSW


def run(args) -> int:
    from ..embeddings import load_embeddings
    from ..index import update_index

    if sum(x is not None and x is not False for x in (args.ivf, args.hnsw, args.exact or None)) > 1:
        raise InputError("choose one of --exact, --ivf and --hnsw (or none: exact up to 200,000 images, HNSW above)")
    emb = load_embeddings(args.embeddings)
    kind = "ivf" if args.ivf is not None else "hnsw" if args.hnsw is not None else "flat"
    if kind == "flat" and not args.exact and len(emb.paths) > FLAT_UP_TO:
        kind = "hnsw"
        print(
            f"{len(emb.paths):,} embeddings, above {FLAT_UP_TO:,}: an approximate HNSW index (each query visits a "
            "few thousand vectors, not all); --exact for exact search"
        )
    done = update_index(
        args.output, emb, kind, nlist=args.ivf or None, hnsw_m=args.hnsw or 32, nprobe=args.nprobe, rebuild=args.rebuild
    )
    if "rebuilt" in done:
        how = "built" if done["rebuilt"] == "new index" else f"rebuilt ({done['rebuilt']})"
    else:
        how = f"updated: {done['kept']} kept, {done['added']} added, {done['removed']} removed"
    refined = " refined (udml embed --refine)" if emb.refined is not None else ""
    print(f"{kind} index of {done['count']}{refined} embeddings {how} -> {args.output} (paths in {args.output}.json)")
    return 0


def add(sub) -> None:
    i = sub.add_parser(
        "index", help="build a faiss index over embeddings (exact up to 200,000, approximate HNSW above)"
    )
    i.add_argument("embeddings", help="embeddings written by udml embed (an .npz file or a folder of shards)")
    i.add_argument(
        "--output",
        "-o",
        required=True,
        help="index file to write; the paths go to <output>.json. If it exists, it is updated: vectors of removed "
        "and changed images are removed by ID, new ones added",
    )
    i.add_argument("--rebuild", action="store_true", help="build the index anew even if --output exists")
    i.add_argument(
        "--exact",
        action="store_true",
        help="exact search at any size (default: exact up to 200,000 embeddings, an HNSW graph above)",
    )
    i.add_argument(
        "--ivf",
        type=int,
        nargs="?",
        const=0,
        metavar="NLIST",
        help="approximate: inverted lists with NLIST cells (default 4 sqrt(N))",
    )
    i.add_argument("--nprobe", type=int, default=16, help="cells visited per query with --ivf")
    i.add_argument(
        "--hnsw",
        type=int,
        nargs="?",
        const=32,
        metavar="M",
        help="approximate: HNSW graph with M links per node (default 32)",
    )
    i.set_defaults(func=run)
