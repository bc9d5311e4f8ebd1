"""``udml search``: the most similar indexed images of query images, as JSON and a picture."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from ..errors import MissingPath
from . import options


def run(args) -> int:
    import os

    from ..index import load_index, search
    from ..retrieval import PRETRAINED, Embedder, check_model_matches, list_images

    index, paths, meta = load_index(args.index)
    model = args.model or meta.get("model")
    if not model or not (os.path.exists(model) or model.startswith(PRETRAINED)):
        raise MissingPath(
            f"no model to embed the queries: pass --model (the model that embedded {args.index}"
            + (f"; {model} is gone)" if model else ")")
        )
    embedder = Embedder.from_file(model, args.device or "auto", amp=not args.float32)
    check_model_matches(embedder, meta, str(args.index), allow_other=args.allow_other_model)
    queries = []
    for q in args.queries:
        queries += list_images(q) if os.path.isdir(q) else [q]
    for q in queries:
        if not os.path.isfile(q):
            raise MissingPath(f"query image {q} does not exist")
    vectors = embedder.embed(queries)
    refine = meta.get("refine")
    if refine and not args.no_expand:  # a refined collection: the queries get the averaging its members had
        from ..index import expand_queries

        vectors = expand_queries(index, vectors, refine["k"], refine["alpha"])
        print(
            f"queries expanded by their {refine['k']} nearest indexed images, as the refined collection was "
            "(--no-expand: plain queries)",
            file=sys.stderr,
        )
    results = search(index, paths, vectors, args.k, query_paths=queries, keep_self=args.keep_self)
    out = [{"query": os.path.abspath(q), "results": r} for q, r in zip(queries, results)]
    text = json.dumps(out, indent=2)
    if args.json:
        Path(args.json).write_text(text + "\n")
        print(f"top-{args.k} results of {len(queries)} queries -> {args.json}")
    else:
        print(text)
    if args.grid:
        from ..plots import retrieval_grid

        def cls(p):
            return Path(p).parent.name

        matches = (
            [[cls(r["path"]) == cls(q) for r in res] for q, res in zip(queries, results)]
            if args.folder_labels
            else None
        )
        captions = [[f"{r['score']:.3f}\n{_where(r['path'])}" for r in res] for res in results]
        retrieval_grid(
            queries,
            [[r["path"] for r in res] for res in results],
            args.grid,
            matches=matches,
            captions=captions,
            query_captions=[f"query\n{_where(q)}" for q in queries],
            cell=args.cell,
        )
        print(f"picture -> {args.grid}")
    return 0


def _where(path: str, width: int = 24) -> str:
    """folder/file for a grid caption, each part shortened so that both stay visible."""
    folder, name = Path(path).parent.name, Path(path).name
    if len(folder) + 1 + len(name) > width:
        keep = max(4, width - 1 - min(len(name), width // 2))
        folder = folder[: keep - 1] + "~" if len(folder) > keep else folder
        name = name[: width - 1 - len(folder)]
    return f"{folder}/{name}"


def add(sub) -> None:
    s = sub.add_parser("search", help="the most similar indexed images of one or more query images")
    s.add_argument("index", help="an index from udml index, or an .npz from udml embed (exact search)")
    s.add_argument("queries", nargs="+", help="query images (or folders of them)")
    s.add_argument("--model", help="the model that embedded the collection (default: the one recorded in the index)")
    s.add_argument("-k", type=int, default=10, help="results per query (default 10)")
    s.add_argument("--json", help="write the results (paths and cosine similarities) here instead of printing them")
    s.add_argument("--grid", help="write a PNG with one row per query: the query, then its results")
    s.add_argument("--cell", type=int, default=128, help="size in pixels of one image in the grid")
    s.add_argument(
        "--folder-labels",
        action="store_true",
        help="frame results green when their folder has the query's folder name, red otherwise",
    )
    s.add_argument("--keep-self", action="store_true", help="keep a query's own file among its results")
    s.add_argument(
        "--no-expand",
        action="store_true",
        help="with a refined collection (udml embed --refine): search with the plain query embeddings instead of "
        "expanding them by their nearest indexed images",
    )
    s.add_argument(
        "--allow-other-model",
        action="store_true",
        help="search even when --model is not the network that embedded the collection (by default an "
        "error: the neighbours would be meaningless)",
    )
    options.device(s)
    options.float32(s)
    s.set_defaults(func=run)
