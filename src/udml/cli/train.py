"""``udml train``: train an embedding network without labels (udml.training), or resume a run."""

from __future__ import annotations

from ..config import load_config, make_config, parse_override, preset_names
from ..errors import InputError
from . import options


def run(args) -> int:
    cfg, resume_dir = _train_config(args)  # before importing torch: a bad argument is reported at once
    from .. import distributed
    from ..logs import log, log_to_console
    from ..training import train

    log_to_console()
    if getattr(args, "picked", None):  # --data without --config: say which recipe, and how to get the other
        log.info("%s", FOLDER_PRESET_NOTE[args.picked])
    finished = False
    try:
        train(cfg, run_dir=resume_dir, resume=resume_dir is not None)
        finished = True
    finally:
        distributed.close(finished)  # torchrun: leave the process group cleanly
    return 0


def _train_config(args):
    """(configuration, run folder to resume or None) from the command line, checked without importing torch."""
    from ..config import check_paths
    from ..rundir import RunDir

    if args.resume:
        run = RunDir(args.resume)
        run.check_resumable()
        if args.config:
            raise InputError("--resume takes its configuration from the run folder; drop --config")
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
    from ..config import check_paths

    cfg = make_config(preset, overrides)
    extra = _flag_overrides(args)
    if extra:
        cfg = make_config(None, {**cfg.to_dict(), **extra})
    check_paths(cfg)
    return cfg


FOLDER_PRESET_NOTE = {
    "folder_cpu": "no GPU in use: the folder_cpu preset (Lite0 with its first 4 stages frozen, one clustering of "
    "neighbour-averaged features, a 20-minute time_budget; see README). For the GPU recipe: udml train --config "
    "folder --data DIR",
    "folder": "the folder preset (the paper's recipe on Lite0, docs/method.md; a GPU job); on a CPU udml uses "
    "folder_cpu instead",
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


def add(sub) -> None:
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
    t.add_argument("--resume", metavar="RUN_DIR", help="continue a run from its last checkpoint")
    t.add_argument("overrides", nargs="*", metavar="key=value", help="configuration overrides, e.g. lr=1e-4")
    options.device(t)
    t.set_defaults(func=run)
