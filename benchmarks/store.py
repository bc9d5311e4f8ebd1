"""The decoded-image store on disk (``cache_images=disk``) at 10k and 100k images, against the in-memory cache
(issue #14, item 3): build time, training-batch and embedding throughput, peak memory, disk used.

    python -m benchmarks.store --folder /work/synthetic_jpegs --sizes 10000 100000      # the measurement
    python -m benchmarks.store --folder /tmp/synthetic_jpegs --sizes 1000 --label 1k    # a quick check (~1 min)

Images: ``--folder``/all/dNNN/ holds sub-folders of 1,000 generated JPEGs (Pillow, quality 85), made once and
reused (a sub-folder is complete when its ``.complete`` marker exists). Sizes vary around 400 x 300 (width
320-480, height 240-360, one in five portrait); each image belongs to one of 500 classes, which fix its
background colour, the direction of a gradient and the kind, colour and place of a shape, jittered per image,
with noise on top (``harness.synthetic_image``). The images of size N are ``--folder``/nN/, links to the first
N / 1,000 sub-folders (the 10k images are the first 10k of the 100k). Nothing is labelled: ``udml train`` sees an
unlabelled folder.

Every (size, mode) runs in a fresh subprocess, sampled by this one every ``--interval`` s (the process and its
DataLoader workers: RSS and PSS, ``memory.TreeSampler``). Settings are those of the ``folder`` preset
(EfficientNet-Lite0: 224 px crops, images shrunk to a short side of 253), workers as udml picks them
(``default_workers()``: one per core, at most 8). Modes:

- ``disk`` (every size): the store is deleted, then built (``build_s``: listing the folder excluded, it is
  ``list_s``); then opened again as a later run does (``reopen_s``: stat of every file, no decoding).
- ``memory`` (sizes <= ``--memory-max``, default 10,000): what ``cache_images=true`` does today: the training
  images decoded into memory (``build_s``) and their centre crops stacked (``stack_s``, ``stack_budget_gb`` 4).

Then, in both: ``--batches`` training batches (16 clusters x 5 images of random pseudo-labels, K = N / 50)
through the training DataLoader (ClusterBatchSampler, seeded random-resized crops and flips, persistent workers,
as ``run_round`` builds it), after one batch that starts the workers (``first_batch_s``): ``train_img_s``. And
one embedding pass over all N training images as the clustering reads them (test transform; the store's images
through the DataLoader, the memory mode's stacked crops in batches of 256): ``embed_img_s``. With ``--model``,
also EfficientNet-Lite0 (random weights: the same speed) embedding ``--model-images`` images through
``udml.inference.extract``: ``model_img_s``.

Recorded per run: ``peak_rss_mb`` (the main process's resident-set high-water mark, the largest of its phases;
reset between phases through /proc/self/clear_refs), ``peak_tree_pss_mb`` (largest sampled PSS of the process
and its workers together: pages shared between them counted once), ``peak_tree_rss_mb`` (the sum of their RSS:
shared pages counted once per process), per phase the same, ``store_mb`` / ``jpeg_mb`` (disk blocks used), and
the times. At 100k the store (~25 GB) may not fit in the page cache, so the embedding pass then reads the disk.

Writes ``benchmarks/results/store_cpu[_<label>].json`` and prints a table, then an estimate of the time and disk
of ``--sizes 10000 100000`` scaled from the sizes just measured. Linux only (/proc).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np

from .harness import (
    RESULTS,
    base_parser,
    command_line,
    mb,
    python_module,
    reset_peak,
    status_kb,
    write_results,
    write_synthetic_images,
)
from .memory import run_sampled

PER_FOLDER = 1000


# ---------------------------------------------------------------------------------------------------------------
# generated JPEGs


def generate(folder: Path, n: int, threads: int) -> Path:
    """``folder``/nN: links to the first N / 1,000 generated sub-folders, generated where missing."""
    if n % PER_FOLDER:
        raise ValueError(f"sizes must be multiples of {PER_FOLDER}, got {n}")
    everything = folder / "all"
    everything.mkdir(parents=True, exist_ok=True)
    for d in range(n // PER_FOLDER):
        sub = everything / f"d{d:03d}"
        if (sub / ".complete").exists():
            continue
        t = time.time()
        shutil.rmtree(sub, ignore_errors=True)
        sub.mkdir()
        indices = range(d * PER_FOLDER, (d + 1) * PER_FOLDER)
        write_synthetic_images(indices, lambda i, c, sub=sub: sub / f"{i:06d}_c{c:03d}.jpg", threads=threads)
        (sub / ".complete").write_text("")
        print(f"generated {sub} ({PER_FOLDER} JPEGs, {time.time() - t:.1f} s)", flush=True)
    root = folder / f"n{n}"
    root.mkdir(exist_ok=True)
    for d in range(n // PER_FOLDER):
        link = root / f"d{d:03d}"
        if not link.exists():
            os.symlink(everything / f"d{d:03d}", link)
    return root


def disk_mb(path: Path) -> float:
    """Disk blocks used by the files under ``path`` (following the links to sub-folders)."""
    total = 0
    for dirpath, _, files in os.walk(path, followlinks=True):
        for f in files:
            with contextlib.suppress(OSError):
                total += os.stat(os.path.join(dirpath, f)).st_blocks * 512
    return round(total / 2**20, 1)


# ---------------------------------------------------------------------------------------------------------------
# the child: one size, one mode


class Phases:
    """Per phase: wall time and the main process's resident-set high-water mark (reset at each start)."""

    def __init__(self):
        self.records: list[dict] = []

    @contextlib.contextmanager
    def __call__(self, name: str):
        reset_peak()
        t0 = time.time()
        record = {"phase": name, "t0": t0}
        yield record
        record.update(t=time.time(), seconds=round(time.time() - t0, 2), peak_mb=mb(status_kb("VmHWM")))
        self.records.append(record)
        print(json.dumps({k: v for k, v in record.items() if k not in ("t0", "t")}), flush=True)


def child(args) -> dict:
    from udml.config import make_config
    from udml.data import default_workers, resize_for
    from udml.datasets import load_folder

    cfg = make_config("folder")
    short = resize_for(cfg.image_size, cfg.resize_size)
    workers = default_workers()
    phase = Phases()
    out = {"n": args.n, "mode": args.mode, "workers": workers, "short_side": short, "image_size": cfg.image_size}
    with phase("list") as p:
        image_set = load_folder(args.root, "train")
    out["list_s"] = p["seconds"]
    build = build_disk if args.mode == "disk" else build_memory
    ds, plain_data = build(args, cfg, image_set, short, workers, phase, out)
    training_batches(cfg, ds, args.batches, workers, phase, out)
    embedding_pass(cfg, plain_data, workers, phase, out)
    if args.model:
        model_embedding(cfg, ds, plain_data, args.model_images, workers, phase, out)
    out["phases"] = phase.records
    out["peak_rss_mb"] = max(r["peak_mb"] for r in phase.records)
    return out


def build_disk(args, cfg, image_set, short: int, workers: int, phase: Phases, out: dict):
    """The store built from nothing, then opened again as a later run does; (the data set, its test view)."""
    from udml.data import ImageDataset, test_transform

    shutil.rmtree(args.store_dir, ignore_errors=True)
    with phase("build") as p:
        ds = ImageDataset(image_set, None, cache="disk", short_side=short, store_dir=args.store_dir)
    out["build_s"] = p["seconds"]
    del ds
    with phase("reopen") as p:
        ds = ImageDataset(image_set, None, cache="disk", short_side=short, store_dir=args.store_dir)
    out["reopen_s"] = p["seconds"]
    out["store_mb"] = disk_mb(ds.store.path)
    return ds, ds.with_transform(test_transform(cfg.image_size, resize_size=cfg.resize_size))


def build_memory(args, cfg, image_set, short: int, workers: int, phase: Phases, out: dict):
    """The images decoded into memory, then their centre crops stacked; (the data set, the stacked crops)."""
    import torch

    from udml.data import ImageDataset, stack, test_transform

    with phase("build") as p:
        ds = ImageDataset(image_set, None, cache=True, short_side=short)
    out["build_s"] = p["seconds"]
    out["decoded_mb"] = round(sum(a.nbytes for a in ds.arrays) / 2**20, 1)
    with phase("stack") as p:
        plain_data = stack(
            ds.with_transform(test_transform(cfg.image_size, resize_size=cfg.resize_size)),
            num_workers=workers,
            budget_gb=cfg.stack_budget_gb,
        )
    out["stack_s"] = p["seconds"]
    out["stacked_mb"] = round(plain_data.numel() / 2**20, 1) if isinstance(plain_data, torch.Tensor) else 0
    return ds, plain_data


def training_batches(cfg, ds, batches: int, workers: int, phase: Phases, out: dict) -> None:
    """Training batches of random pseudo-labels through the training loader, after one that starts the workers."""
    from udml.config import default_num_clusters
    from udml.data import make_loader
    from udml.data import train_transform as random_crop
    from udml.samplers import ClusterBatchSampler

    aug = ds.with_transform(
        random_crop(
            cfg.image_size,
            resize_size=cfg.resize_size,
            crop_scale_min=cfg.crop_scale_min,
            hflip=cfg.hflip,
            crop_rule=cfg.crop_rule,
        )
    )
    k = default_num_clusters(len(ds), cfg.clusters_per_batch)
    labels = np.random.default_rng(0).integers(0, k, len(ds))
    sampler = ClusterBatchSampler(labels, cfg.clusters_per_batch, cfg.images_per_cluster, batches + 1, seed=1)
    loader = make_loader(aug, batch_sampler=sampler, num_workers=workers, persistent=True)
    with phase("training batches"):
        batches = iter(loader)
        t = time.time()
        images = len(next(batches)[0])
        out["first_batch_s"] = round(time.time() - t, 2)
        t = time.time()
        for x, _ in batches:
            images += len(x)
        out["train_img_s"] = round((images - cfg.clusters_per_batch * cfg.images_per_cluster) / (time.time() - t), 1)


def embedding_pass(cfg, plain_data, workers: int, phase: Phases, out: dict) -> None:
    """Every training image once, as the clustering reads them: stacked crops in slices, or through the loader."""
    import torch

    from udml.data import make_loader

    with phase("embedding pass") as p:
        n = 0
        if isinstance(plain_data, torch.Tensor):
            for i in range(0, len(plain_data), cfg.eval_batch_size):
                n += len(plain_data[i : i + cfg.eval_batch_size])  # what extract() takes: a slice, no copy
        else:
            for x, _ in make_loader(plain_data, batch_size=cfg.eval_batch_size, num_workers=workers):
                n += len(x)
        out["embed_img_s"] = round(n / (time.time() - p["t0"]), 1)


def model_embedding(cfg, ds, plain_data, images: int, workers: int, phase: Phases, out: dict) -> None:
    """EfficientNet-Lite0 (random weights: the same speed) embedding the first ``images`` images."""
    import torch

    from udml.config import make_config
    from udml.inference import extract
    from udml.models import model_from_config

    model = model_from_config(make_config("folder", ["pretrained=false"]))
    part = min(images, len(ds))
    if isinstance(plain_data, torch.Tensor):
        data = plain_data[:part]
    else:
        data = torch.utils.data.Subset(plain_data, range(part))
    with phase("model embedding") as p:
        extract(model, data, batch_size=cfg.eval_batch_size, num_workers=workers, pooled=False)
    out["model_img_s"] = round(part / p["seconds"], 1)


# ---------------------------------------------------------------------------------------------------------------
# the parent


def measure(args, n: int, mode: str, root: Path, store_dir: Path) -> dict:
    cmd = python_module("benchmarks.store", "--child", mode, n, root, store_dir, "--batches", args.batches)
    cmd += ["--model-images", str(args.model_images)] + (["--model"] if args.model else [])
    ran = run_sampled(cmd, args.interval, echo=echo)
    lines = ran.output.splitlines()
    result = json.loads(next(x for x in reversed(lines) if x.startswith("RESULT "))[len("RESULT ") :])
    for p in result["phases"]:
        t0, t1 = p.pop("t0") - ran.t_start, p.pop("t") - ran.t_start
        p["tree_pss_peak_mb"] = ran.sampler.peak("tree_pss_mb", t0, t1)
        p["tree_rss_peak_mb"] = ran.sampler.peak("tree_rss_mb", t0, t1)
    result.update(
        wall_s=round(ran.wall_s, 1),
        peak_tree_pss_mb=ran.sampler.peak("tree_pss_mb"),
        peak_tree_rss_mb=ran.sampler.peak("tree_rss_mb"),
        jpeg_mb=disk_mb(root),
    )
    return result


def echo(line: str) -> None:
    if not line.startswith("RESULT "):
        print("   ", line.rstrip(), flush=True)


def row(r: dict) -> str:
    def f(key, fmt="{:.0f}"):
        return fmt.format(r[key]) if r.get(key) is not None else "-"

    return (
        f"{r['n']:>7} {r['mode']:>6} | build {f('build_s', '{:.1f}'):>6} s  reopen {f('reopen_s', '{:.2f}'):>5} s | "
        f"train {f('train_img_s'):>5} img/s  embed {f('embed_img_s'):>6} img/s  "
        f"model {f('model_img_s', '{:.1f}'):>5} | "
        f"peak RSS {f('peak_rss_mb'):>6} MB  tree PSS {f('peak_tree_pss_mb'):>6} MB | "
        f"store {f('store_mb'):>7} MB  JPEGs {f('jpeg_mb'):>6} MB"
    )


SCALING = ("list", "build", "reopen", "stack", "embedding pass")  # phases that grow with N; the others do not


def estimate(runs: list[dict], generate_s: dict, targets=(10_000, 100_000)) -> str:
    """Time and disk of ``--sizes 10000 100000`` (the memory mode at 10k too), scaled from the largest size measured
    here: the phases that read every image linearly in N, the rest (start-up, training batches) as they were."""

    def scaled(r: dict, n: int) -> float:
        grows = sum(p["seconds"] for p in r["phases"] if p["phase"] in SCALING)
        return r["wall_s"] - grows + grows * n / r["n"]

    largest = max(r["n"] for r in runs)
    disk = next(r for r in runs if r["mode"] == "disk" and r["n"] == largest)
    memory = next((r for r in runs if r["mode"] == "memory" and r["n"] == largest), None)
    seconds = sum(scaled(disk, n) for n in targets) + (scaled(memory, targets[0]) if memory else 0)
    seconds_gen = generate_s.get(largest, 0) * max(targets) / largest
    store_gb = disk["store_mb"] * sum(targets) / largest / 1024
    jpeg_gb = disk["jpeg_mb"] * max(targets) / largest / 1024
    return (
        f"estimate for --sizes {' '.join(map(str, targets))} from N={largest}: about "
        f"{(seconds + seconds_gen) / 60:.0f} min ({seconds_gen / 60:.0f} min generating the JPEGs the first time, "
        f"{seconds / 60:.0f} min measuring{'' if memory else ', without the memory mode'}; longer if the 100k "
        f"store, {disk['store_mb'] * max(targets) / largest / 1024:.0f} GB, does not fit in the page cache); "
        f"disk: {jpeg_gb:.1f} GB of JPEGs + {store_gb:.1f} GB of stores"
    )


def run_child(argv: list[str]) -> int:
    """``--child MODE N ROOT STORE_DIR [options]``: one size, one mode; prints its record as "RESULT {json}"."""
    i = argv.index("--child")
    ap = argparse.ArgumentParser()
    ap.add_argument("--batches", type=int, default=50)
    ap.add_argument("--model", action="store_true")
    ap.add_argument("--model-images", type=int, default=1000)
    args = ap.parse_args(argv[i + 5 :])
    args.mode, args.n, args.root, args.store_dir = argv[i + 1], int(argv[i + 2]), *argv[i + 3 : i + 5]
    logging.basicConfig(level=logging.INFO, format="    %(message)s", stream=sys.stdout)
    print("RESULT " + json.dumps(child(args)), flush=True)
    return 0


def parser() -> argparse.ArgumentParser:
    ap = base_parser(__doc__, results=True)
    ap.add_argument("--folder", type=Path, required=True, help="where the generated JPEGs and the stores live")
    ap.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    ap.add_argument("--memory-max", type=int, default=10_000, help="also run the in-memory cache up to this size")
    ap.add_argument("--batches", type=int, default=50, help="training batches timed (80 images each)")
    ap.add_argument("--model", action="store_true", help="also time EfficientNet-Lite0 embedding --model-images")
    ap.add_argument("--model-images", type=int, default=1000)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="threads generating the JPEGs")
    ap.add_argument("--interval", type=float, default=0.2, help="seconds between two samples of the process tree")
    ap.add_argument("--label", default=None, help="results go to results/store_cpu_<label>.json")
    return ap


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "--child" in argv:
        return run_child(argv)
    args = parser().parse_args(argv)
    results = Path(args.results or RESULTS / f"store_cpu{'_' + args.label if args.label else ''}.json")
    notes = __doc__.split("Recorded per run:")[1].split("Writes")[0].strip()
    runs, generate_s = [], {}
    for n in sorted(args.sizes):
        t = time.time()
        root = generate(args.folder, n, args.threads)
        generate_s[n] = round(time.time() - t, 1)
        for mode in ["memory", "disk"] if n <= args.memory_max else ["disk"]:
            print(f"N={n} {mode}: {root}", flush=True)
            r = measure(args, n, mode, root, args.folder / "stores" / f"n{n}")
            r["generate_s"] = generate_s[n]
            runs.append(r)
            print(row(r), flush=True)
            doc = {"command": command_line(__file__, argv), "notes": notes, "runs": runs}
            write_results(results, doc, indent=1)
    print()
    for r in runs:
        print(row(r))
    print(estimate(runs, generate_s))
    print(f"-> {results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
