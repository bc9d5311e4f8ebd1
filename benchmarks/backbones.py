"""Pretrained backbones side by side on CUB's test classes: what ``udml embed pretrained:NAME`` gives, and how fast.

    python -m benchmarks.backbones --cub ../shared/data/CUB_200_2011   # efficientnet_lite0 and efficientnet_lite2

For each backbone: its pretrained pooled features (L2-normalised, the network's own crop size and normalisation, no
training) of CUB's 5,924 test images (classes 101-200; ``--classes`` and ``--per-class`` take fewer), embedded the
way ``udml embed`` does it (embed_folder, one loader process per core, the CPU fast path), then Recall@K, NMI and
MAP@R against the species. Reports the embedding's wall time and images/s. Writes
``benchmarks/results/backbones_<device>.json``.

``--speed-only``: the backbones built with random weights (so the downloadable ones run offline: DINO, DINOv2,
CLIP), their embedding speed alone; retrieval numbers of random weights would mean nothing and are not reported.

    python -m benchmarks.backbones --cub ... --speed-only --backbones dino_vits16 dinov2_vits14 clip_vitb16 \
        --per-class 3 --output benchmarks/results/backbones_speed_cpu.json
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from udml.data import default_workers
from udml.evaluation import evaluate
from udml.retrieval import Embedder, embed_folder

from .harness import RESULTS, base_parser, cub_images, link_photos, write_results


def measure(name: str, device: str, folder: Path, speed_only: bool = False) -> tuple[dict, int]:
    """A backbone's row (its image settings, embedding speed and metrics, in percent) and the images embedded."""
    if speed_only:
        from udml.models import UDMLNet, create_backbone

        torch.manual_seed(0)
        embedder = Embedder(
            UDMLNet(create_backbone(name, pretrained=False), embedding_dim=None), device, f"random:{name}"
        )
    else:
        embedder = Embedder.from_file(f"pretrained:{name}", device)
    t = time.perf_counter()
    emb = embed_folder(embedder, folder, num_workers=default_workers())
    seconds = time.perf_counter() - t
    _, labels = np.unique([Path(p).parent.name for p in emb.paths], return_inverse=True)
    m = {} if speed_only else evaluate(torch.from_numpy(emb.embeddings), torch.from_numpy(labels))
    row = {
        "crop_size": embedder.image.crop_size,
        "resize_size": embedder.image.resize_size,
        "dim": embedder.dim,
        "precision": str(embedder.precision),
        "seconds": seconds,
        "images_per_s": len(emb.paths) / seconds,
        **{k: 100 * v for k, v in m.items()},
    }
    if speed_only:
        row["weights"] = "random (speed only)"
    quality = "" if speed_only else f"R@1 {row['recall@1']:.2f}  NMI {row['nmi']:.2f}  MAP@R {row['map@r']:.2f}  "
    print(f"{name:20} {row['crop_size']} px  {quality}{seconds:.1f} s, {row['images_per_s']:.1f} images/s", flush=True)
    return row, len(emb.paths)


def main(argv: list[str] | None = None) -> int:
    ap = base_parser(__doc__, results=True, flag="--output")
    ap.add_argument("--cub", required=True, help="CUB_200_2011 root")
    ap.add_argument("--backbones", nargs="+", default=["efficientnet_lite0", "efficientnet_lite2"])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--classes", type=int, default=100, help="the first N test classes (default all 100)")
    ap.add_argument("--per-class", type=int, default=None, help="photos per class (default all)")
    ap.add_argument("--speed-only", action="store_true", help="random weights: the embedding speed alone (offline)")
    args = ap.parse_args(argv)
    out = {"images": None, "backbones": {}}
    with tempfile.TemporaryDirectory(prefix="udml-backbones-") as tmp:
        folder = link_photos(cub_images(args.cub, "test", classes=args.classes, per_class=args.per_class), Path(tmp))
        for name in args.backbones:
            out["backbones"][name], out["images"] = measure(name, args.device, folder, args.speed_only)
    path = args.output or RESULTS / f"backbones_{args.device}.json"
    write_results(path, out)
    print(f"-> {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
