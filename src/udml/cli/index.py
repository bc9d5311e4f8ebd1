"""``udml index``: a faiss index over an embeddings file, updated in place as the collection changes."""

from __future__ import annotations

from ..errors import InputError


def run(args) -> int:
    from ..embeddings import load_embeddings
    from ..index import update_index

    if args.ivf is not None and args.hnsw is not None:
        raise InputError("choose one of --ivf and --hnsw (or neither, for exact search)")
    kind = "ivf" if args.ivf is not None else "hnsw" if args.hnsw is not None else "flat"
    emb = load_embeddings(args.embeddings)
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
    i = sub.add_parser("index", help="build a faiss index (exact by default) over an embeddings file")
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
