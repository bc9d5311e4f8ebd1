"""Command line: ``udml train``, ``evaluate``, ``embed``, ``index``, ``search``, ``serve`` and ``export``."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .config import load_config, make_config, parse_override, preset_names

FLOAT32_HELP = (
    "run the network in float32 (NCHW): bit-stable embeddings. By default it runs in bfloat16 with channels_last "
    "where the device computes bfloat16 natively (recent GPUs; CPUs with AVX512-BF16 or AMX), float32 elsewhere"
)


def _train(args) -> int:
    cfg, resume_dir = _train_config(args)  # before importing torch: a bad argument is reported at once
    from . import distributed
    from .logs import log, log_to_console
    from .training import train

    log_to_console()
    if getattr(args, "picked", None):  # --data without --config: say which recipe, and how to get the other
        log.info("%s", FOLDER_PRESET_NOTE[args.picked])
    try:
        train(cfg, run_dir=resume_dir, resume=resume_dir is not None)
    finally:
        distributed.close()  # torchrun: leave the process group cleanly
    return 0


def _train_config(args):
    """(configuration, run folder to resume or None) from the command line, checked without importing torch."""
    from .config import check_paths
    from .rundir import RunDir

    if args.resume:
        run = RunDir(args.resume)
        run.check_resumable()
        if args.config:
            raise ValueError("--resume takes its configuration from the run folder; drop --config")
        cfg = load_config(run.config)
        overrides = dict(parse_override(o) for o in args.overrides)
        cfg = make_config(None, {**cfg.to_dict(), **overrides, **_flag_overrides(args)})
        check_paths(cfg)
        return cfg, run.path
    # --data alone: a folder of the user's own images, with the folder preset, or its CPU variant without a GPU
    overrides = dict(parse_override(o) for o in args.overrides)
    cfg = _checked(args.config or ("folder" if args.data else "omniglot_mini"), overrides, args)
    if args.data and not args.config:  # every argument checked: now torch may be imported to look for a GPU
        device = str(cfg.device)
        args.picked = "folder" if device.startswith("cuda") or (device == "auto" and _has_gpu()) else "folder_cpu"
        if args.picked == "folder_cpu":
            cfg = _checked("folder_cpu", overrides, args)
    return cfg, None


def _checked(preset: str, overrides: dict, args):
    """The preset, the key=value overrides, then the command-line options; keys and folders checked."""
    from .config import check_paths

    cfg = make_config(preset, overrides)
    extra = _flag_overrides(args)
    if extra:
        cfg = make_config(None, {**cfg.to_dict(), **extra})
    check_paths(cfg)
    return cfg


FOLDER_PRESET_NOTE = {
    "folder_cpu": "no GPU in use: the folder_cpu preset (Lite0 with its first 5 stages frozen, one clustering, "
    "a 20-minute time_budget; see README). For the GPU recipe: udml train --config folder --data DIR",
    "folder": "the folder preset (METHOD.md's recipe on Lite0, a GPU job); on a CPU udml uses folder_cpu instead",
}


def _has_gpu() -> bool:
    import torch

    return torch.cuda.is_available()


def _is_override(word: str) -> bool:
    return not word.startswith("-") and "=" in word


def _flag_overrides(args) -> dict:
    out = {}
    if getattr(args, "data", None):
        out["data_root"] = args.data
    if getattr(args, "out", None):
        out["out_dir"] = args.out
    if getattr(args, "device", None):
        out["device"] = args.device
    return out


def _evaluate(args) -> int:
    import torch

    from .data import ImageDataset, test_transform
    from .datasets import load_split
    from .devices import resolve_device
    from .evaluation import evaluate
    from .inference import extract, load_model
    from .report import format_metrics

    device = resolve_device(args.device or "auto")
    model = load_model(args.model, device)
    image_set = load_split(args.dataset, args.data, args.split)
    if image_set.labels is None:
        raise ValueError(f"{image_set.name} has no labels; evaluation needs one sub-folder per class")
    ds = ImageDataset(
        image_set, test_transform(model.image_size, resize_size=model.resize_size), short_side=model.resize_size
    )
    _, emb = extract(model, ds, batch_size=args.batch_size, num_workers=args.workers, amp=not args.float32)
    metrics = evaluate(emb, torch.as_tensor(ds.labels, device=emb.device), recall_ks=args.recall_ks)
    print(f"{image_set.name} ({len(ds)} images, {image_set.num_classes} classes): {format_metrics(metrics)}")
    if args.output:
        Path(args.output).write_text(json.dumps(metrics, indent=2) + "\n")
    return 0


def _embed(args) -> int:
    from . import distributed
    from .devices import resolve_device

    try:  # under torchrun: one process per GPU (or CPU share), each embeds its share of the files
        device = distributed.init(resolve_device(args.device or "auto"))
        return _embed_files(args, device)
    finally:
        distributed.close()


def _embed_files(args, device) -> int:
    from . import distributed
    from .data import default_workers
    from .embeddings import load_embeddings, save_embeddings
    from .errors import ModelMismatch
    from .retrieval import Embedder, embed_folder, same_embedder

    embedder = Embedder.from_file(args.model, device, amp=not args.float32)
    main_process = distributed.is_main()
    previous = None
    if Path(args.output).exists() and not args.rebuild:
        try:
            previous = load_embeddings(args.output)
        except ValueError as e:
            raise ValueError(f"{e}. Pass --rebuild to overwrite it, or write to another file") from e
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
        from .refine import refine_collection

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


def _refinement(args, previous):
    """The refinement ``udml embed`` applies: --refine (with --refine-k / --refine-alpha), or the existing file's
    own (a refined file stays refined through updates) unless --no-refine."""
    from .refine import Refinement

    if args.no_refine:
        if args.refine:
            raise ValueError("--refine and --no-refine contradict each other; give one")
        return None
    own = (previous.meta.get("refine") if previous is not None else None) or {}
    if not args.refine and not own:
        return None
    k = args.refine_k if args.refine_k is not None else own.get("k", Refinement().k)
    alpha = args.refine_alpha if args.refine_alpha is not None else own.get("alpha", Refinement().alpha)
    return Refinement(k, alpha)


def _index(args) -> int:
    from .embeddings import load_embeddings
    from .index import update_index

    if args.ivf is not None and args.hnsw is not None:
        raise ValueError("choose one of --ivf and --hnsw (or neither, for exact search)")
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


def _cluster(args) -> int:
    import numpy as np

    from . import groups
    from .embeddings import load_embeddings

    emb = load_embeddings(args.embeddings)
    x, paths = emb.embeddings, emb.paths
    near = groups.nearest_neighbours(x)  # one exact k-nearest-neighbour pass for the threshold sets and the quantiles
    # groups follow a refined collection's refined vectors; near-duplicates are about the images themselves (raw)
    g = emb.vectors
    if args.threshold is not None:
        label, score = groups.threshold_groups(g, args.threshold, near=near if g is x else None)
        how = {"method": "threshold", "threshold": args.threshold}
    else:
        label, score, k = groups.kmeans_groups(g, args.k, seed=args.seed)
        how = {"method": "kmeans", "k": k}
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


def _search(args) -> int:
    import os

    from .index import load_index, search
    from .retrieval import PRETRAINED, Embedder, check_model_matches, list_images

    index, paths, meta = load_index(args.index)
    model = args.model or meta.get("model")
    if not model or not (os.path.exists(model) or model.startswith(PRETRAINED)):
        raise FileNotFoundError(
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
            raise FileNotFoundError(f"query image {q} does not exist")
    vectors = embedder.embed(queries)
    refine = meta.get("refine")
    if refine and not args.no_expand:  # a refined collection: the queries get the averaging its members had
        from .index import expand_queries

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
        from .plots import retrieval_grid

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


def _serve(args) -> int:
    from .serve import open_collection, serve

    if args.max_upload_mb <= 0:
        raise ValueError(f"--max-upload-mb must be positive, got {args.max_upload_mb}")
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


def _export(args) -> int:
    from .export import export_onnx
    from .inference import load_model

    model = load_model(args.model, "cpu")
    diff = export_onnx(model, args.output, input_kind=args.input, opset=args.opset)
    check = "" if diff is None else f"; onnxruntime matches PyTorch to {diff:.1e}"
    print(
        f"{args.output}: input 'images' {args.input} [B, 3, {model.image_size}, {model.image_size}] "
        f"(RGB 0-255, shorter side resized to {model.resize_size} then centre-cropped), output 'embeddings' "
        f"[B, {model.embedding_dim}]{check}"
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="udml", description="Unsupervised deep metric learning (UDML-SS).")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser(
        "train",
        help="train an embedding network without labels",
        description="Train by UDML-SS. With no arguments: the default job, a small convnet from "
        "scratch on the Omniglot subset shipped inside the package (under a minute on 2 CPU "
        "cores).",
        epilog="Several GPUs or machines: torchrun --nproc_per_node=N -m udml train ... "
        "(DistributedDataParallel; clusters_per_batch must be divisible by the number of "
        "processes).",
    )
    t.add_argument("--config", "-c", help=f"a preset ({', '.join(preset_names())}) or a YAML file")
    t.add_argument(
        "--data",
        help="data set root (sets data_root); without --config: a folder of your own "
        "unlabelled images (any nesting), trained with the folder preset",
    )
    t.add_argument("--out", help="folder for run folders (sets out_dir)")
    t.add_argument("--device", help="auto, cpu, cuda or cuda:N")
    t.add_argument("--resume", metavar="RUN_DIR", help="continue a run from its last checkpoint")
    t.add_argument("overrides", nargs="*", metavar="key=value", help="configuration overrides, e.g. lr=1e-4")
    t.set_defaults(func=_train)

    e = sub.add_parser("evaluate", help="Recall@K, NMI and MAP@R of a trained model on a labelled split")
    e.add_argument("model", help="model.pt, checkpoint.pt or a run folder")
    e.add_argument("--dataset", default="cub", help="data set name (cub, cars196, sop, omniglot, folder, digits, ...)")
    e.add_argument("--data", help="data set root")
    e.add_argument("--split", default="test")
    e.add_argument("--recall-ks", type=int, nargs="+", default=[1, 2, 4, 8])
    e.add_argument("--batch-size", type=int, default=256)
    e.add_argument("--workers", type=int, default=0)
    e.add_argument("--device")
    e.add_argument("--float32", action="store_true", help=FLOAT32_HELP)
    e.add_argument("--output", "-o", help="write the metrics as JSON here")
    e.set_defaults(func=_evaluate)

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
        help="embeddings file to write (.npz). If it exists (same model), only new and changed images are embedded "
        "and removed ones dropped",
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
    m.add_argument("--device", help="auto (default), cpu, cuda or cuda:N")
    m.add_argument("--float32", action="store_true", help=FLOAT32_HELP)
    m.add_argument(
        "--refine",
        action="store_true",
        help="also refine the collection by its own neighbours (each embedding averaged with its nearest ones; "
        "udml index, cluster, search and serve then use them): better groups and rankings where neighbours are "
        "mostly right (docs/method.md). A refined file stays refined through updates",
    )
    m.add_argument("--refine-k", type=int, help="neighbours averaged in (default 8, chosen on CUB)")
    m.add_argument("--refine-alpha", type=float, help="weight of a neighbour: similarity^ALPHA (default 1)")
    m.add_argument("--no-refine", action="store_true", help="drop the refinement of an existing refined file")
    m.set_defaults(func=_embed)

    i = sub.add_parser("index", help="build a faiss index (exact by default) over an embeddings file")
    i.add_argument("embeddings", help="an .npz file written by udml embed")
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
    i.set_defaults(func=_index)

    c = sub.add_parser(
        "cluster",
        help="group a collection's embeddings (k-means or a similarity threshold) and find near-duplicates",
        description="Group the images of an embeddings file and find sets of near-duplicates; writes one row per "
        "image (path, group, group_score, duplicate_group, duplicate_score; -1: in no group) as CSV or JSON. "
        "Scores are cosine similarities of the L2-normalised embeddings, in [-1, 1].",
    )
    c.add_argument("embeddings", help="an .npz file written by udml embed")
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
    c.add_argument("--sheet", help="also write a contact sheet (PNG) of the largest groups, and of the duplicates")
    c.add_argument("--seed", type=int, default=0, help="k-means seed")
    c.set_defaults(func=_cluster)

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
    s.add_argument("--device", help="auto (default), cpu, cuda or cuda:N")
    s.add_argument("--float32", action="store_true", help=FLOAT32_HELP)
    s.set_defaults(func=_search)

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
    v.add_argument("--device", help="for embedding uploads: auto (default), cpu, cuda or cuda:N")
    v.add_argument("--float32", action="store_true", help=FLOAT32_HELP)
    v.set_defaults(func=_serve)

    x = sub.add_parser("export", help="export a model to ONNX (images in, L2-normalised embeddings out)")
    x.add_argument("model", help="model.pt, checkpoint.pt or a run folder")
    x.add_argument("--output", "-o", required=True, help="the .onnx file to write")
    x.add_argument(
        "--input",
        choices=["uint8", "float"],
        default="uint8",
        help="input type: uint8 or float32 RGB pixels in 0-255, NCHW (default uint8)",
    )
    x.add_argument("--opset", type=int, default=17)
    x.set_defaults(func=_export)
    return p


def expected_errors() -> tuple[type[BaseException], ...]:
    """What a user can cause and fix (bad arguments, configuration, data, files, a full disk, a missing package,
    a diverging run): one line. Anything else, a bug or CUDA running out of memory, keeps its traceback."""
    from .errors import UdmlError

    return (UdmlError, ValueError, OSError, ImportError)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    # argparse takes a subcommand's positionals in one run, so `udml train --out DIR lr=1e-4` would leave lr=1e-4
    # unrecognised: key=value words found after an option are the train command's overrides too.
    args, rest = parser.parse_known_args(argv)
    if rest and getattr(args, "command", None) == "train" and all(_is_override(w) for w in rest):
        args.overrides = [*args.overrides, *rest]
    elif rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    try:
        return args.func(args)
    except Exception as e:  # noqa: BLE001 - sorted below: expected ones become one line, the rest is re-raised
        if not isinstance(e, expected_errors()):
            if type(e).__name__ == "OutOfMemoryError":
                print(
                    f"udml {args.command}: out of memory on the GPU: lower clusters_per_batch or "
                    "eval_batch_size, set grad_checkpointing=true, or use a smaller image_size",
                    file=sys.stderr,
                )
            raise
        print(f"udml {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
