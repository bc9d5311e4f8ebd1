"""The first pseudo-labels on CUB: raw pooled features with Euclidean k-means (udml before this change, and the
paper's code) against L2-normalised features with spherical k-means (udml now, the evaluation's geometry).

Embeds CUB's 5,864 training images once with the pretrained backbone (eval mode, test transform; cached), then
for each seed clusters them both ways with K = 100 and reports, as diagnostics only, the NMI of the pseudo-labels
to the true training classes and the number of clusters with fewer than 5 images (M). Prints a table and writes
benchmarks/results/first_clustering_<label>.json (or ``--results``).

    python -m benchmarks.first_clustering --data ../shared/data/CUB_200_2011 --seeds 0 1 2
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from udml.clustering import assignment_nmi, kmeans
from udml.config import make_config
from udml.data import ImageDataset, resize_for, test_transform
from udml.datasets import load_split
from udml.inference import extract
from udml.models import model_from_config

from .harness import RESULTS, base_parser, command_line, write_results

GEOMETRIES = (("raw, Euclidean", False), ("L2-normalised, spherical", True))


def pooled_features(cfg, cache: Path) -> tuple[np.ndarray, np.ndarray]:
    if cache.is_file():
        z = np.load(cache)
        return z["features"], z["labels"]
    torch.manual_seed(cfg.seed)
    model = model_from_config(cfg)
    size = cfg.image_size or model.image_size
    data = ImageDataset(
        load_split(cfg.dataset, cfg.data_root, cfg.train_split),
        test_transform(size, resize_size=cfg.resize_size),
        short_side=resize_for(size, cfg.resize_size),
    )
    t = time.time()
    features, _ = extract(model, data, batch_size=64, num_workers=0)
    print(f"embedded {len(data)} images in {time.time() - t:.0f} s")
    cache.parent.mkdir(parents=True, exist_ok=True)
    np.savez(cache, features=features.numpy(), labels=np.asarray(data.labels))
    return features.numpy(), np.asarray(data.labels)


def main(argv: list[str] | None = None) -> int:
    p = base_parser(__doc__, results=True, seeds=[0, 1, 2], overrides="configuration overrides (key=value)")
    p.add_argument("--data", default="../shared/data/CUB_200_2011")
    p.add_argument("--config", default="cub_lite0")
    p.add_argument("--backend", default="auto", choices=["auto", "faiss", "torch"])
    p.add_argument("--cache", default=str(Path.home() / ".cache" / "udml" / "cub_lite0_train_pooled.npz"))
    p.add_argument("--label", default="cub_cpu")
    args = p.parse_args(argv)
    cfg = make_config(args.config, [f"data_root={args.data}", *args.overrides])
    x, y = pooled_features(cfg, Path(args.cache))
    x = torch.from_numpy(x)
    norms = x.norm(dim=1)
    print(f"pooled features {tuple(x.shape)}, norms {norms.min():.1f}-{norms.max():.1f}; K = {cfg.num_clusters}")
    rows = [
        clustering(cfg, x, y, seed, geometry, spherical, args.backend)
        for seed in args.seeds
        for geometry, spherical in GEOMETRIES
    ]
    out = Path(args.results or RESULTS / f"first_clustering_{args.label}.json")
    doc = {"config": args.config, "k": cfg.num_clusters, "command": command_line(__file__, argv), "rows": rows}
    write_results(out, doc, indent=1)
    print(f"-> {out}")
    return 0


def clustering(cfg, x: torch.Tensor, y: np.ndarray, seed: int, geometry: str, spherical: bool, backend: str) -> dict:
    """The first pseudo-labels one way: their NMI to the true classes and their cluster sizes."""
    features = F.normalize(x, dim=1) if spherical else x
    r = kmeans(features, cfg.num_clusters, niter=cfg.kmeans_iters, seed=seed, backend=backend, spherical=spherical)
    sizes = r.sizes()
    row = {
        "seed": seed,
        "geometry": geometry,
        "backend": r.backend,
        "diagnostic_nmi_true_classes": assignment_nmi(y, r.labels),
        "clusters_under_5": int((sizes < 5).sum()),
        "min_size": int(sizes.min()),
        "max_size": int(sizes.max()),
    }
    print(
        f"seed {seed}  {geometry:<26} {r.backend:5}  NMI to true classes "
        f"{100 * row['diagnostic_nmi_true_classes']:.1f}  clusters < 5 images: {row['clusters_under_5']:2d}"
        f"  sizes {row['min_size']}-{row['max_size']}"
    )
    return row


if __name__ == "__main__":
    raise SystemExit(main())
