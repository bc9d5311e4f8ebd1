"""The collection's own neighbours (udml.refine, `udml embed --refine`): Recall@K, NMI and MAP@R of a labelled
split before and after database-side augmentation, for a grid of k and alpha. Transductive: every number here uses
the unlabelled collection being searched, so it is reported apart from the protocol's.

    python -m benchmarks.refine_sweep --model pretrained:efficientnet_lite0 --dataset cub \
        --data ../shared/data/CUB_200_2011 --split val --label cub_val_lite0
    python -m benchmarks.refine_sweep --model runs/x --dataset omniglot --data ../shared/data/omniglot \
        --split val --ks 8 --alphas 1 --label omniglot_val

The split is embedded once by the model (its own test transform; the run's bfloat16 fast path where the CPU has
it); each (k, alpha) refines those embeddings exactly as `udml embed --refine --refine-k K --refine-alpha A` would
(udml.refine.refine) and is evaluated with the NMI seeds given. Results merge into ``--results`` under
``--label``.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from udml.data import default_workers
from udml.datasets import load_split
from udml.evaluation import evaluate
from udml.refine import Refinement, refine
from udml.retrieval import Embedder, _embed_files

from .harness import RESULTS, base_parser, read_results, stamped, write_results

KEYS = ("recall@1", "recall@2", "recall@4", "recall@8", "nmi", "map@r")


def main(argv: list[str] | None = None) -> int:
    p = base_parser(__doc__, results=RESULTS / "refine_sweep.json")
    p.add_argument("--model", required=True, help="pretrained:NAME, a run folder or a model file")
    p.add_argument("--dataset", required=True)
    p.add_argument("--data", help="the data set's root (none: a pack shipped with udml)")
    p.add_argument("--split", required=True)
    p.add_argument("--label", required=True, help="the name of this collection and model in the results file")
    p.add_argument("--ks", type=int, nargs="+", default=[1, 2, 3, 5, 8, 10, 15, 20])
    p.add_argument("--alphas", type=float, nargs="+", default=[0, 1, 3])
    p.add_argument("--nmi-seeds", type=int, nargs="+", default=[0, 1, 2])
    args = p.parse_args(argv)

    images = load_split(args.dataset, args.data, args.split)
    t = time.time()
    x = embedded(args.model, images)
    embed_s = time.time() - t
    labels = torch.as_tensor(np.asarray(images.labels))
    rows = [{"k": 0, "alpha": None, **measure(x, labels, args.nmi_seeds), "seconds": 0.0}]
    print(line(rows[0], rows[0]), flush=True)
    for k in args.ks:
        for alpha in args.alphas:
            t = time.time()
            refined, _, _ = refine(x, Refinement(k, alpha))
            seconds = time.time() - t
            rows.append({"k": k, "alpha": alpha, **measure(refined, labels, args.nmi_seeds), "seconds": seconds})
            print(line(rows[-1], rows[0]), flush=True)
    data = read_results(args.results, {})
    entry = {"model": args.model, "dataset": args.dataset, "split": args.split, "images": len(x)}
    data[args.label] = stamped({**entry, "embed_seconds": round(embed_s, 1), "rows": rows}, flat=True)
    write_results(args.results, data, block=None, indent=1)
    return 0


def embedded(model: str, images) -> np.ndarray:
    """The split embedded by the model: files decoded by the loader's worker processes, images in memory (the
    packs) directly."""
    embedder = Embedder.from_file(model, "cpu")
    if not all(isinstance(i, str) for i in images.images):
        return embedder.embed(images.images)
    x, errors = _embed_files(embedder, list(images.images), 64, default_workers(), progress=False)
    if any(errors):
        raise SystemExit(f"{sum(bool(e) for e in errors)} images could not be read")
    return x


def measure(x: np.ndarray, labels: torch.Tensor, nmi_seeds: list[int]) -> dict:
    """Recall@K and MAP@R (exact), NMI as the mean over k-means seeds."""
    x = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    runs = [evaluate(x, labels, seed=s, compute_map_at_r=i == 0) for i, s in enumerate(nmi_seeds)]
    out = {k: v for k, v in runs[0].items() if k in KEYS}
    out["nmi"] = float(np.mean([r["nmi"] for r in runs]))
    return out


def line(r: dict, base: dict) -> str:
    what = "start" if not r["k"] else f"k={r['k']:<3d} alpha={r['alpha']:g}"
    cells = "  ".join(f"{k} {100 * r[k]:6.2f} ({100 * (r[k] - base[k]):+5.2f})" for k in ("recall@1", "nmi", "map@r"))
    return f"{what:18s} {cells}"


if __name__ == "__main__":
    raise SystemExit(main())
