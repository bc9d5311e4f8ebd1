"""``udml embed``: embed every image under a folder into an embeddings file, updating an existing one."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

from ..errors import InputError
from . import options


def run(args) -> int:
    unchanged = nothing_to_do(args)  # before torch is imported: a no-op update costs a listing and a stat per file
    if unchanged:
        print(unchanged)
        return 0
    from .. import distributed
    from ..devices import resolve_device

    finished = False
    try:  # under torchrun: one process per GPU (or CPU share), each embeds its share of the files
        device = distributed.init(resolve_device(args.device or "auto"))
        code = _embed_files(args, device)
        finished = True
        return code
    finally:
        distributed.close(finished)


def _embed_files(args, device) -> int:
    from .. import distributed
    from ..data import default_workers
    from ..embeddings import load_embeddings, save_embeddings
    from ..errors import ModelMismatch
    from ..retrieval import Embedder, embed_folder, same_embedder

    embedder = Embedder.from_file(args.model, device, amp=not args.float32)
    main_process = distributed.is_main()
    previous = None
    if Path(args.output).exists() and not args.rebuild:
        try:
            previous = load_embeddings(args.output)
        except ValueError as e:
            raise InputError(f"{e}. Pass --rebuild to overwrite it, or write to another file") from e
        why = same_embedder(previous.meta, embedder)
        if why is not None:
            raise ModelMismatch(
                f"{args.output} exists but {why}: its rows cannot be kept. Pass --rebuild to re-embed every image "
                "with this model and replace the file, or write to another file"
            )
        if previous.stamps is None:
            if main_process:
                print(f"{args.output} records no file sizes and times (written by an older udml): re-embedding all")
            previous = None
    local = max(1, default_workers() // distributed.local_world_size())
    workers = local if args.workers < 0 else args.workers
    emb = embed_folder(
        embedder, args.folder, batch_size=args.batch_size, num_workers=workers, progress=True, previous=previous
    )
    if not main_process:
        return 0
    refinement = _refinement(args, previous)
    if refinement is not None:
        from ..refine import refine_collection

        emb = refine_collection(emb, refinement, previous)
    save_embeddings(args.output, emb)
    skipped = f", {len(emb.skipped)} unreadable file(s) skipped" if emb.skipped else ""
    c = emb.changes
    update = f" (updated: {c['kept']} kept, {c['embedded']} embedded, {c['removed']} removed)" if previous else ""
    shards = f" by {distributed.world_size()} processes" if distributed.world_size() > 1 else ""
    print(f"{len(emb.paths)} images embedded{shards} ({emb.embeddings.shape[1]}-d){skipped}{update} -> {args.output}")
    if refinement is not None:
        r = emb.meta["refine"]
        print(
            f"refined by the collection's own neighbours: each embedding averaged with its {r['k']} nearest (weights "
            f"similarity^{r['alpha']:g}; {c['refined_again']} recomputed); udml index, cluster, search and serve use "
            "them (--no-refine to drop)"
        )
    return 0


def nothing_to_do(args) -> str | None:
    """When ``--output`` already holds every image under the folder as it is now (the same files with the same sizes
    and modification times, the unreadable ones as they were), embedded by the same model file (or pretrained
    backbone, with the same package versions) and precision request, and refined as asked: what to say. Else None,
    and the update runs. Reads the file's paths, stamps and metadata and stats the folder; imports no torch."""
    from ..datasets import list_images
    from ..embeddings import model_stamp, read_rows
    from ..errors import UdmlError
    from ..store import describe_files

    out = Path(args.output)
    if args.rebuild or not out.exists():
        return None
    try:
        meta, rows = read_rows(out)
    except (UdmlError, OSError):
        return None  # not readable as embeddings: the update says what is wrong
    stamp = model_stamp(args.model)
    if stamp is None or meta.get("model_stamp") != stamp or meta.get("amp") != (not args.float32):
        return None
    wanted = _refinement(args, SimpleNamespace(meta=meta))
    if (wanted.to_dict() if wanted is not None else None) != meta.get("refine"):
        return None
    rows += meta.get("unreadable", [])
    if sorted(rows) != describe_files(list_images(args.folder)):
        return None
    return (
        f"{out}: up to date, nothing new, changed or removed under {args.folder} ({len(rows)} files, "
        f"{len(meta.get('unreadable', []))} of them unreadable); no model loaded"
    )


def _refinement(args, previous):
    """The refinement ``udml embed`` applies: --refine (with --refine-k / --refine-alpha), or the existing file's
    own (a refined file stays refined through updates) unless --no-refine."""
    from ..refine import Refinement

    if args.no_refine:
        if args.refine:
            raise InputError("--refine and --no-refine contradict each other; give one")
        return None
    own = (previous.meta.get("refine") if previous is not None else None) or {}
    if not args.refine and not own:
        return None
    k = args.refine_k if args.refine_k is not None else own.get("k", Refinement().k)
    alpha = args.refine_alpha if args.refine_alpha is not None else own.get("alpha", Refinement().alpha)
    return Refinement(k, alpha)


def add(sub) -> None:
    m = sub.add_parser("embed", help="embed every image under a folder into an .npz file (embeddings + paths)")
    m.add_argument(
        "model",
        help="model.pt, checkpoint.pt or a run folder; or pretrained:NAME (e.g. "
        "pretrained:efficientnet_lite0) to embed with a pretrained backbone alone, without training",
    )
    m.add_argument("folder", help="folder of images (any nesting); unreadable files are reported and skipped")
    m.add_argument(
        "--output",
        "-o",
        required=True,
        help="embeddings to write: an .npz file, or a folder of row shards (any path without .npz: updates then "
        "write only what changed, for large collections). If it exists (same model), only new and changed images "
        "are embedded and removed ones dropped",
    )
    m.add_argument(
        "--rebuild", action="store_true", help="re-embed every image even if --output exists (e.g. another model)"
    )
    m.add_argument("--batch-size", type=int, default=64)
    m.add_argument(
        "--workers",
        type=int,
        default=-1,
        help="image-decoding processes, beside the network (default -1: one per CPU core, at most 8; 0: none)",
    )
    m.add_argument(
        "--refine",
        action="store_true",
        help="also refine the collection by its own neighbours (each embedding averaged with its nearest ones; "
        "udml index, cluster, search and serve then use them): better groups and rankings where neighbours are "
        "mostly right (docs/method.md). A refined file stays refined through updates",
    )
    m.add_argument("--refine-k", type=int, help="neighbours averaged in (default 10, chosen on CUB)")
    m.add_argument(
        "--refine-alpha", type=float, help="weight of a neighbour: similarity^ALPHA (default 0: a plain mean)"
    )
    m.add_argument("--no-refine", action="store_true", help="drop the refinement of an existing refined file")
    options.device(m)
    options.float32(m)
    m.set_defaults(func=run)
