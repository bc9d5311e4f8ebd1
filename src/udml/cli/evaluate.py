"""``udml evaluate``: Recall@K, NMI and MAP@R of a trained model on a labelled split."""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import InputError
from . import options


def run(args) -> int:
    import torch

    from ..data import ImageDataset, test_transform
    from ..datasets import load_split
    from ..devices import resolve_device
    from ..evaluation import evaluate
    from ..inference import extract, load_model
    from ..report import format_metrics

    device = resolve_device(args.device or "auto")
    model = load_model(args.model, device)
    image_set = load_split(args.dataset, args.data, args.split)
    if image_set.labels is None:
        raise InputError(f"{image_set.name} has no labels; evaluation needs one sub-folder per class")
    ds = ImageDataset(
        image_set, test_transform(model.image_size, resize_size=model.resize_size), short_side=model.resize_size
    )
    _, emb = extract(model, ds, batch_size=args.batch_size, num_workers=args.workers, amp=not args.float32)
    metrics = evaluate(emb, torch.as_tensor(ds.labels, device=emb.device), recall_ks=args.recall_ks)
    print(f"{image_set.name} ({len(ds)} images, {image_set.num_classes} classes): {format_metrics(metrics)}")
    if args.output:
        Path(args.output).write_text(json.dumps(metrics, indent=2) + "\n")
    return 0


def add(sub) -> None:
    e = sub.add_parser("evaluate", help="Recall@K, NMI and MAP@R of a trained model on a labelled split")
    e.add_argument("model", help="model.pt, checkpoint.pt or a run folder")
    e.add_argument("--dataset", default="cub", help="data set name (cub, cars196, sop, omniglot, folder, digits, ...)")
    e.add_argument("--data", help="data set root")
    e.add_argument("--split", default="test")
    e.add_argument("--recall-ks", type=int, nargs="+", default=[1, 2, 4, 8])
    e.add_argument("--batch-size", type=int, default=256)
    e.add_argument("--workers", type=int, default=0)
    e.add_argument("--output", "-o", help="write the metrics as JSON here")
    options.device(e)
    options.float32(e)
    e.set_defaults(func=run)
