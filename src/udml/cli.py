"""Command line: ``udml train`` and ``udml evaluate``."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .config import load_config, make_config, parse_override, preset_names


def _train(args) -> int:
    from .training import CHECKPOINT, train

    if args.resume:
        run_dir = Path(args.resume)
        if not (run_dir / CHECKPOINT).exists():
            raise FileNotFoundError(f"--resume {run_dir}: no {CHECKPOINT} there; give the run folder of a run "
                                    "that wrote at least one checkpoint")
        if args.config:
            raise ValueError("--resume takes its configuration from the run folder; drop --config")
        cfg = load_config(run_dir / "config.yaml")
        overrides = dict(parse_override(o) for o in args.overrides)
        cfg = make_config(None, {**cfg.to_dict(), **overrides, **_flag_overrides(args)})
        train(cfg, run_dir=run_dir, resume=True)
        return 0
    cfg = make_config(args.config or "digits", args.overrides and [*args.overrides])
    extra = _flag_overrides(args)
    if extra:
        cfg = make_config(None, {**cfg.to_dict(), **extra})
    train(cfg)
    return 0


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
    from .evaluation import evaluate
    from .inference import extract, load_model
    from .training import format_metrics, resolve_device

    device = resolve_device(args.device or "auto")
    model = load_model(args.model, device)
    image_set = load_split(args.dataset, args.data, args.split)
    if image_set.labels is None:
        raise ValueError(f"{image_set.name} has no labels; evaluation needs one sub-folder per class")
    ds = ImageDataset(image_set, test_transform(model.image_size, resize_size=model.resize_size),
                      short_side=model.resize_size)
    _, emb = extract(model, ds, batch_size=args.batch_size, num_workers=args.workers)
    metrics = evaluate(emb, torch.as_tensor(ds.labels, device=emb.device), recall_ks=args.recall_ks)
    print(f"{image_set.name} ({len(ds)} images, {image_set.num_classes} classes): {format_metrics(metrics)}")
    if args.output:
        Path(args.output).write_text(json.dumps(metrics, indent=2) + "\n")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="udml", description="Unsupervised deep metric learning (UDML-SS).")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train an embedding network without labels",
                       description="Train by UDML-SS. With no arguments: the embedded digits job.")
    t.add_argument("--config", "-c", help=f"a preset ({', '.join(preset_names())}) or a YAML file")
    t.add_argument("--data", help="data set root (sets data_root)")
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
    e.add_argument("--output", "-o", help="write the metrics as JSON here")
    e.set_defaults(func=_evaluate)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, KeyError, FileNotFoundError, FileExistsError, ImportError, RuntimeError) as e:
        message = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"udml {args.command}: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
