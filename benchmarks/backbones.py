"""Pretrained backbones side by side on CUB's test classes: what ``udml embed pretrained:NAME`` gives, and how fast.

    python benchmarks/backbones.py --cub ../shared/data/CUB_200_2011      # efficientnet_lite0 and efficientnet_lite2

For each backbone: its pretrained pooled features (L2-normalised, the network's own crop size and normalisation, no
training) of CUB's 5,924 test images (classes 101-200), embedded the way ``udml embed`` does it (embed_folder,
one loader process per core, the CPU fast path), then Recall@K, NMI and MAP@R against the species. Reports the
embedding's wall time and images/s. Writes ``benchmarks/results/backbones_<device>.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine  # noqa: E402

from udml.data import default_workers  # noqa: E402
from udml.evaluation import evaluate  # noqa: E402
from udml.retrieval import Embedder, embed_folder  # noqa: E402

HERE = Path(__file__).resolve().parent


def test_classes_folder(cub: Path) -> Path:
    """Links to CUB's classes 101-200, one folder per species."""
    root = Path(tempfile.mkdtemp(prefix="udml-backbones-"))
    for c in sorted((cub / "images").iterdir()):
        if int(c.name.split(".")[0]) >= 101:
            (root / c.name).symlink_to(c.resolve(), target_is_directory=True)
    return root


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cub", required=True, help="CUB_200_2011 root")
    ap.add_argument("--backbones", nargs="+", default=["efficientnet_lite0", "efficientnet_lite2"])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--output", type=Path)
    args = ap.parse_args()
    folder = test_classes_folder(Path(args.cub))
    out = {"machine": machine(), "images": None, "backbones": {}}
    for name in args.backbones:
        embedder = Embedder.from_file(f"pretrained:{name}", args.device)
        t = time.perf_counter()
        emb = embed_folder(embedder, folder, num_workers=default_workers())
        seconds = time.perf_counter() - t
        species = [Path(p).parent.name for p in emb.paths]
        _, labels = np.unique(species, return_inverse=True)
        m = evaluate(torch.from_numpy(emb.embeddings), torch.from_numpy(labels))
        row = {
            "crop_size": embedder.image.crop_size,
            "resize_size": embedder.image.resize_size,
            "dim": embedder.dim,
            "precision": str(embedder.precision),
            "seconds": seconds,
            "images_per_s": len(emb.paths) / seconds,
            **{k: 100 * v for k, v in m.items()},
        }
        out["images"] = len(emb.paths)
        out["backbones"][name] = row
        print(
            f"{name:20} {row['crop_size']} px  R@1 {row['recall@1']:.2f}  NMI {row['nmi']:.2f}  "
            f"MAP@R {row['map@r']:.2f}  {seconds:.1f} s, {row['images_per_s']:.1f} images/s",
            flush=True,
        )
    path = args.output or HERE / "results" / f"backbones_{args.device}.json"
    path.write_text(json.dumps(out, indent=2) + "\n")
    print(f"-> {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
