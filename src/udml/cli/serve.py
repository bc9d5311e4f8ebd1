"""``udml serve``: browse and search an index in a web browser (udml.serve)."""

from __future__ import annotations

from ..errors import InputError
from . import options


def run(args) -> int:
    from ..serve import open_collection, serve

    if args.max_upload_mb <= 0:
        raise InputError(f"--max-upload-mb must be positive, got {args.max_upload_mb}")
    collection = open_collection(
        args.index,
        model=args.model,
        device=args.device or "auto",
        amp=not args.float32,
        cache_dir=args.cache_dir,
        thumb_size=args.thumb_size,
        map_fit_points=args.map_points,
        default_k=args.k,
        groups=args.groups,
    )
    serve(collection, host=args.host, port=args.port, max_upload_bytes=int(args.max_upload_mb * 2**20))
    return 0


def add(sub) -> None:
    v = sub.add_parser(
        "serve",
        help="browse an index in a web browser: a grid, a 2-D map, nearest neighbours",
        description="Start a local web server over an index: a paged grid of the images, a click "
        "shows an image's nearest neighbours, an uploaded image searches the collection, "
        "a 2-D map (t-SNE) shows the whole. JSON API under /api/ (see README).",
    )
    v.add_argument("index", help="an index from udml index, or an .npz from udml embed (exact search)")
    v.add_argument(
        "--model",
        help="the model that embedded the collection, for uploaded queries (default: the one "
        "recorded in the index; without one, uploads are off and browsing still works)",
    )
    v.add_argument(
        "--host",
        default="127.0.0.1",
        help="interface to listen on (default 127.0.0.1: this machine only; 0.0.0.0: every machine)",
    )
    v.add_argument("--port", type=int, default=8000, help="port (default 8000; 0: any free port)")
    v.add_argument("-k", type=int, default=10, help="neighbours shown per query (default 10; the page can change it)")
    v.add_argument("--max-upload-mb", type=float, default=10, help="largest uploaded image in MB (default 10)")
    v.add_argument(
        "--groups", help="a groups file from udml cluster (CSV or JSON): browse the collection group by group"
    )
    v.add_argument("--cache-dir", help="where thumbnails and the 2-D map are cached (default <index>.serve-cache/)")
    v.add_argument("--thumb-size", type=int, default=192, help="thumbnail size in pixels (default 192)")
    v.add_argument(
        "--map-points",
        type=int,
        default=5000,
        help="t-SNE is fitted on at most this many embeddings; "
        "the others are placed by their nearest fitted neighbours (default 5000)",
    )
    options.device(v, "for embedding uploads: auto (default), cpu, cuda or cuda:N")
    options.float32(v)
    v.set_defaults(func=run)
