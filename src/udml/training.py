"""The UDML-SS training loop: cluster -> sample P x M -> metric loss + lambda * rotation loss, repeat."""
from __future__ import annotations

import dataclasses
import json
import logging
import sys
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from . import checkpoint as ckpt
from . import distributed
from .clustering import assignment_nmi, kmeans
from .config import RUNTIME_FIELDS, Config, default_num_clusters, save_config, validate
from .data import ImageDataset, default_workers, make_loader, resize_for, test_transform, train_transform
from .datasets import load_split
from .evaluation import evaluate
from .inference import autocast, extract, resolve_device, stack
from .losses import create_loss, rotation_batch, rotation_loss
from .models import build_model
from .plots import write_run_pictures
from .samplers import ClusterBatchSampler

log = logging.getLogger("udml")

CHECKPOINT = "checkpoint.pt"
MODEL = "model.pt"
METRICS = "metrics.jsonl"


class NonFiniteLoss(RuntimeError):
    pass


def setup_logging(run_dir: Path | None, quiet: bool = False) -> None:
    """Console (and run_dir/train.log); ``quiet``: warnings only, for the non-main processes of a torchrun job."""
    log.setLevel(logging.WARNING if quiet else logging.INFO)
    for h in list(log.handlers):
        log.removeHandler(h)
    console = logging.StreamHandler(sys.stdout)
    console.setFormatter(logging.Formatter("%(message)s"))
    log.addHandler(console)
    if run_dir is not None:
        handler = logging.FileHandler(run_dir / "train.log")
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
        log.addHandler(handler)
    log.propagate = False


def format_metrics(m: dict) -> str:
    keys = [k for k in m if k.startswith("recall@")] + [k for k in ("nmi", "map@r") if k in m]
    names = {"nmi": "NMI", "map@r": "MAP@R"}
    return "  ".join(f"{names.get(k, 'R@' + k[7:])} {100 * m[k]:5.2f}" for k in keys)


class MetricsFile:
    """Append-only JSON lines; on resume, lines of rounds that the checkpoint does not hold are dropped.
    With ``path=None`` (the non-main processes of a torchrun job) nothing is written."""

    def __init__(self, path: Path | None):
        self.path = path

    def truncate_after(self, rounds_done: int) -> None:
        """Keep the records of rounds 1..rounds_done (and the start); drop later ones, the final evaluation
        (written after the last checkpoint) and a line torn by a kill in mid-write."""
        if self.path is None or not self.path.exists():
            return
        keep = []
        for line in self.path.read_text().splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if record.get("round", 0) <= rounds_done and not record.get("final"):
                keep.append(line)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text("".join(line + "\n" for line in keep))
        tmp.replace(self.path)

    def append(self, **record) -> None:
        if self.path is None:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")

    def read(self) -> list[dict]:
        if self.path is None or not self.path.exists():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]


def build_datasets(cfg: Config, image_size: int):
    """(train set with the train transform, train set with the test transform, test set)."""
    train_set = load_split(cfg.dataset, cfg.data_root, cfg.train_split)
    short = resize_for(image_size, cfg.resize_size)
    train = ImageDataset(train_set, None, cache=cfg.cache_images, short_side=short)
    test = None
    if cfg.dataset == "folder" and cfg.test_root is None:  # a folder's own sub-folders need not be classes
        log.info("no labelled test split was given (test_root=FOLDER, one sub-folder per class): the run "
                 "is not evaluated")
    else:
        test_set = load_split(cfg.dataset, cfg.test_root or cfg.data_root, cfg.test_split)
        test = ImageDataset(test_set, test_transform(image_size, resize_size=cfg.resize_size),
                            cache="transformed" if cfg.cache_images else False, short_side=short)
    if test is not None and test.labels is None:
        raise ValueError(f"the test split {test_set.name!r} has no labels; evaluation needs class labels "
                         "(for a folder: one sub-folder per class)")
    aug = train.with_transform(train_transform(image_size, resize_size=cfg.resize_size,
                                               crop_scale_min=cfg.crop_scale_min, hflip=cfg.hflip))
    plain = train.with_transform(test_transform(image_size, resize_size=cfg.resize_size))
    return aug, plain, test


def evaluate_model(s: "Session", *, with_pooled: bool) -> dict:
    """Metrics of the embedding (and optionally of the pooled backbone features) on the test split; {} without one
    and on the non-main processes of a torchrun job (they only embed their share of the images)."""
    if s.test_labels is None:
        return {}
    pooled, emb = extract_all(s, s.test_plain, pooled=with_pooled)
    if not distributed.is_main():
        return {}
    labels = s.test_labels.to(emb.device)
    results = {"embedding": evaluate(emb, labels, recall_ks=s.cfg.recall_ks, seed=s.cfg.seed)}
    if with_pooled:
        results["pooled"] = evaluate(F.normalize(pooled, dim=1), labels, recall_ks=s.cfg.recall_ks,
                                     seed=s.cfg.seed)
    return results


def extract_all(s: "Session", data, pooled: bool):
    """extract() of every item of ``data``; under torchrun each process embeds its contiguous share and the
    shares are gathered in order, so every process ends with the same features."""
    if distributed.world_size() > 1:
        part = distributed.shard(len(data))
        data = data[part.start:part.stop] if isinstance(data, torch.Tensor) else torch.utils.data.Subset(data, part)
    p, e = extract(s.model, data, batch_size=s.cfg.eval_batch_size, num_workers=s.workers, amp=s.cfg.amp,
                   pooled=pooled)
    return (distributed.gather_rows(p) if pooled else None), distributed.gather_rows(e)


def warm_start(features: torch.Tensor, previous_labels: torch.Tensor, k: int) -> torch.Tensor:
    """The previous clusters' centres in the current feature space (the features moved since they were made)."""
    d = features.shape[1]
    sums = torch.zeros(k, d, dtype=features.dtype, device=features.device)
    sums.index_add_(0, previous_labels.to(features.device), features)
    counts = torch.bincount(previous_labels.to(features.device), minlength=k).clamp_min(1).unsqueeze(1)
    return sums / counts


def new_run_dir(cfg: Config) -> Path:
    name = cfg.run_name or f"{cfg.dataset}-{cfg.backbone.replace(':', '_')}-{datetime.now():%Y%m%d-%H%M%S}"
    run_dir = Path(cfg.out_dir) / name
    if (run_dir / CHECKPOINT).exists():
        raise FileExistsError(f"run folder {run_dir} already holds a checkpoint; continue it with "
                              f"--resume {run_dir}, or choose another run_name")
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


def check_resumable(cfg: Config, saved: dict, path: Path) -> None:
    now = cfg.to_dict()
    diff = [f"{k}: {saved.get(k)!r} in the checkpoint, {now[k]!r} now" for k in now
            if k not in RUNTIME_FIELDS and saved.get(k) != now[k]]
    if diff:
        raise ValueError(f"checkpoint {path} was written with a different configuration ("
                         + "; ".join(diff) + "). Resume with the run folder's own config.yaml "
                         "(udml train --resume RUN_DIR) or start a new run.")


@dataclass
class Session:
    """Everything a run builds once: model, optimiser, loss, data (train with both transforms, test)."""
    cfg: Config
    device: torch.device
    use_amp: bool
    workers: int
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    metric_loss: torch.nn.Module
    aug: ImageDataset                       # training images, train transform
    train_plain: object                     # training images, test transform (Dataset or stacked tensor)
    test_plain: object
    test_labels: torch.Tensor | None        # None: no labelled test split, no evaluations
    test_classes: list | None = None
    train_model: torch.nn.Module | None = None  # what the training step calls: the model, or its DDP wrapper

    def __post_init__(self):
        self.train_model = self.train_model or self.model


def prepare(cfg: Config) -> Session:
    device = distributed.init(resolve_device(cfg.device))
    world = distributed.world_size()
    if cfg.clusters_per_batch % world:
        raise ValueError(f"clusters_per_batch (P={cfg.clusters_per_batch}) must be divisible by the number of "
                         f"processes ({world}) so that every process trains on whole clusters; change P or "
                         "--nproc_per_node")
    workers = max(1, default_workers() // distributed.local_world_size()) if cfg.num_workers < 0 else cfg.num_workers
    use_amp = cfg.amp and device.type == "cuda"
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    model = build_model(cfg).to(device)
    if use_amp:
        model = model.to(memory_format=torch.channels_last)
    model.image_size = cfg.image_size or model.image_size
    metric_loss = create_loss(cfg.loss, cfg.loss_params).to(device)  # a bad loss name fails before decoding
    aug, plain, test = build_datasets(cfg, model.image_size)
    if cfg.num_clusters is None:
        cfg = dataclasses.replace(cfg, num_clusters=default_num_clusters(len(aug), cfg.clusters_per_batch))
        log.info("num_clusters (K) = %d for %d training images (default_num_clusters)", cfg.num_clusters, len(aug))
    if cfg.num_clusters > len(aug):
        raise ValueError(f"num_clusters (K={cfg.num_clusters}) is larger than the number of training images "
                         f"({len(aug)}); lower num_clusters")
    if test is not None and max(cfg.recall_ks) > len(test) - 1:
        raise ValueError(f"recall_ks asks for Recall@{max(cfg.recall_ks)} but the test split has {len(test)} "
                         f"images, so each query has {len(test) - 1} neighbours; use recall_ks values <= "
                         f"{len(test) - 1}")
    train_plain = stack(plain, num_workers=workers, budget_gb=cfg.stack_budget_gb)
    test_plain = stack(test, num_workers=workers, budget_gb=cfg.stack_budget_gb) if test is not None else None
    if device.type == "cuda":  # stacked images live on the GPU: re-embedding costs no transfer
        train_plain = train_plain.to(device) if isinstance(train_plain, torch.Tensor) else train_plain
        test_plain = test_plain.to(device) if isinstance(test_plain, torch.Tensor) else test_plain
    if cfg.rotation_weight == 0:  # UDML: the rotation head takes no part (and DDP needs no unused parameters)
        model.rotation.requires_grad_(False)
    train_model = model
    if world > 1:
        if not cfg.freeze_bn and device.type == "cuda":
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        elif not cfg.freeze_bn:
            log.warning("BatchNorm is trained with statistics of each process's share of the batch (SyncBatchNorm "
                        "needs CUDA); set freeze_bn=true for steps identical to a single process")
        train_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device] if device.type == "cuda" else None)
        metric_loss = metric_loss.across_processes()
    optimizer = torch.optim.Adam([
        {"params": model.backbone.parameters(), "lr": cfg.lr},
        {"params": list(model.embedding.parameters()) + list(model.rotation.parameters()),
         "lr": cfg.head_lr or cfg.lr},
    ], weight_decay=cfg.weight_decay, fused=device.type == "cuda" or None)  # fused: one kernel per step on CUDA
    return Session(cfg, device, use_amp, workers, model, optimizer, metric_loss, aug, train_plain, test_plain,
                   None if test is None else torch.as_tensor(test.labels),
                   None if test is None else test.image_set.class_names, train_model)


def cluster(s: Session, previous: torch.Tensor | None, seed: int):
    """Pseudo-labels: features in eval mode with the test transform, then k-means; returns (labels, k-means
    result, stats).

    The first clustering uses the pretrained pooled features (k-means++); later ones the embeddings,
    warm-started from the previous clusters. Under torchrun the features are gathered from every process,
    the main process clusters and broadcasts the labels (the others get result None and stats {})."""
    cfg = s.cfg
    pooled, emb = extract_all(s, s.train_plain, pooled=previous is None)
    features = pooled if previous is None else emb
    if not bool(torch.isfinite(features).all()):
        raise NonFiniteLoss("the network's outputs on the training images are NaN or infinite")
    result, stats, labels = None, {}, None
    if distributed.is_main():
        if previous is None:
            result = kmeans(features, cfg.num_clusters, niter=cfg.kmeans_iters, seed=seed, backend=cfg.kmeans_backend)
        else:
            result = kmeans(features, cfg.num_clusters, niter=cfg.kmeans_iters, seed=seed, backend=cfg.kmeans_backend,
                            init_centroids=warm_start(features, previous, cfg.num_clusters))
        stats = result.stats()
        stats["nmi_previous"] = assignment_nmi(previous, result.labels) if previous is not None else None
        labels = torch.as_tensor(result.labels, dtype=torch.long)
    labels = distributed.broadcast(labels, like=torch.empty(len(features), dtype=torch.long, device=features.device))
    return labels.cpu(), result, stats


def model_is_finite(s: Session, probe_images: int = 16) -> bool:
    """Finite weights, and finite embeddings of the first training images (weights can be finite but so large
    that the outputs overflow). Changes no state: eval mode, no gradients, no random numbers."""
    if not all(bool(torch.isfinite(p).all()) for p in s.model.parameters()):
        return False
    data = s.train_plain
    n = min(probe_images, len(data))
    x = data[:n] if isinstance(data, torch.Tensor) else torch.stack([data[i][0] for i in range(n)])
    _, emb = extract(s.model, x, batch_size=n, amp=s.cfg.amp, pooled=False)
    return bool(torch.isfinite(emb).all())


def train_round(s: Session, loader, labels: torch.Tensor, step: int, bar=None):
    """One pass of the loader; returns (step, [mean metric loss, rotation loss, rotation accuracy], bad step).

    Non-finite losses are tracked on the device (no host sync per step) and reported as the first bad step,
    or -1; on the CPU the round stops at the first one."""
    label_dev = labels.to(s.device)
    sums = torch.zeros(4, device=s.device)  # metric loss, rotation loss, rotation accuracy, steps
    bad_step = torch.full((), -1, dtype=torch.long, device=s.device)
    s.model.train()
    for x, idx in loader:
        x = x.to(s.device, non_blocking=True)
        y = label_dev[idx.to(s.device, non_blocking=True)]
        loss, parts = training_step(s.train_model, s.metric_loss, x, y, s.cfg, s.use_amp, distributed.world_size())
        step += 1
        finite = torch.isfinite(loss)
        bad_step = torch.where(finite | (bad_step >= 0), bad_step, torch.full_like(bad_step, step))
        if s.device.type == "cpu" and distributed.any_true(~finite, s.device):  # every process stops together
            break
        s.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        s.optimizer.step()
        sums += torch.stack(parts + [torch.ones((), device=s.device)])
        if bar is not None:
            bar.update(1)
    sums = distributed.sum_over_ranks(sums)  # the processes' rotation losses differ; their metric losses do not
    means = (sums[:3] / sums[3].clamp_min(1)).tolist()  # the one host sync of the round
    return step, means, int(distributed.max_over_ranks(bad_step))


def train(cfg: Config, run_dir: Path | None = None, resume: bool = False) -> dict:
    """Train by UDML-SS; returns {"start": metrics, "final": metrics, "run_dir": path, "step": steps}."""
    validate(cfg)
    distributed.init(resolve_device(cfg.device))
    main = distributed.is_main()  # under torchrun only the main process writes files and logs
    if main:
        run_dir = Path(run_dir) if run_dir is not None else new_run_dir(cfg)
        run_dir.mkdir(parents=True, exist_ok=True)
    run_dir = Path(distributed.broadcast_object(str(run_dir) if main else None))
    setup_logging(run_dir if main else None, quiet=not main)
    if main:
        ckpt.remove_temporaries(run_dir / CHECKPOINT)  # left by a process killed while writing a checkpoint
    ckpt.seed_all(cfg.seed)
    state = None
    if resume:
        state = ckpt.load(run_dir / CHECKPOINT)
        check_resumable(cfg, state["config"], run_dir / CHECKPOINT)
    if main:
        save_config(cfg, run_dir / "config.yaml")
    metrics = MetricsFile(run_dir / METRICS if main else None)

    s = prepare(cfg)
    if s.cfg != cfg:  # num_clusters: null, now resolved
        cfg = s.cfg
        if main:
            save_config(cfg, run_dir / "config.yaml")
    model, optimizer = s.model, s.optimizer
    rounds, iters = cfg.num_rounds(), cfg.iterations_per_round()
    log.info("run folder %s | device %s%s | %d train / %d test images | K=%d | %d rounds x %d iterations",
             run_dir, s.device, f" x {distributed.world_size()} processes" if distributed.world_size() > 1 else "",
             len(s.aug), 0 if s.test_labels is None else len(s.test_labels), cfg.num_clusters, rounds, iters)

    rounds_done, step, labels = 0, 0, None
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        rounds_done, step, labels = state["rounds_done"], state["step"], state["labels"]
        start_metrics = state["start_metrics"]
        metrics.truncate_after(rounds_done)
        log.info("resumed from %s after round %d (step %d)", run_dir / CHECKPOINT, rounds_done, step)
        threads = state.get("cpu_threads")
        if s.device.type == "cpu" and threads not in (None, torch.get_num_threads()):
            # CPU convolution gradients are summed in a thread-count dependent order.
            log.warning("the checkpoint was written with %d CPU threads and this process uses %d: the resumed "
                        "run will differ from an uninterrupted one by rounding; set OMP_NUM_THREADS=%d for an "
                        "exact replay", threads, torch.get_num_threads(), threads)
    else:
        metrics.truncate_after(-1)
        t = time.time()
        start_metrics = evaluate_model(s, with_pooled=True)
        for kind, m in start_metrics.items():
            metrics.append(kind="eval", round=0, step=0, features=kind, seconds=time.time() - t, **m)
            log.info("start  (%-9s) %s", kind, format_metrics(m))

    sampler = loader = None
    saved_round = rounds_done if state is not None else None  # the round the checkpoint on disk holds
    bar = tqdm(total=rounds * iters, initial=step, desc="train", unit="it", dynamic_ncols=True,
               disable=None if main else True, mininterval=2.0)

    def stop(what: str) -> NonFiniteLoss:
        kept = ("no checkpoint was written yet" if saved_round is None else
                f"the last good checkpoint {run_dir / CHECKPOINT} (after round {saved_round}) is intact")
        return NonFiniteLoss(f"{what}; training stopped and {kept}. Lower lr (or head_lr), raise weight_decay or "
                             "check the data, then start a new run: resuming with the same settings repeats the "
                             "same steps")

    for rnd in range(rounds_done + 1, rounds + 1):
        round_seed = cfg.seed * 1_000_003 + rnd
        ckpt.seed_all(round_seed)
        t = time.time()
        if cfg.supervised:  # a benchmark ceiling, not the method: true training labels instead of clusters
            if s.aug.labels is None:
                raise ValueError("supervised=true needs a labelled training split; this one has no labels")
            labels, result = torch.as_tensor(s.aug.labels), None
        else:
            try:
                labels, result, stats = cluster(s, labels, seed=cfg.seed + rnd)
            except NonFiniteLoss as e:  # weights blown up by the last steps, loss still finite
                raise stop(f"{e} after step {step} (at the clustering of round {rnd})") from None
            metrics.append(kind="cluster", round=rnd, step=step, seconds=time.time() - t, **stats)
        if result is not None and (rnd == 1 or rnd == rounds or rnd % max(1, rounds // 10) == 0):
            bar.write(f"round {rnd}/{rounds} clustering: sizes min {stats['min']} / median {stats['median']:g} / "
                      f"max {stats['max']}, {stats['n_reseeded']} re-seeded, NMI to previous "
                      + ("-" if stats["nmi_previous"] is None else f"{stats['nmi_previous']:.3f}")
                      + f" ({time.time() - t:.1f}s)")

        if sampler is None:
            sampler = ClusterBatchSampler(labels.numpy(), cfg.clusters_per_batch, cfg.images_per_cluster, iters,
                                          seed=round_seed, rank=distributed.rank(),
                                          world_size=distributed.world_size())
            loader = make_loader(s.aug, batch_sampler=sampler, num_workers=s.workers, device=s.device,
                                 persistent=True)
        sampler.reset(labels.numpy(), seed=round_seed)
        t = time.time()
        step, means, bad = train_round(s, loader, labels, step, bar)
        if bad >= 0:
            raise stop(f"the loss became NaN or infinite at step {bad} (round {rnd})")
        metrics.append(kind="train", round=rnd, step=step, seconds=time.time() - t, iterations=iters,
                       metric_loss=means[0], rotation_loss=means[1], rotation_accuracy=means[2])
        bar.set_postfix(metric=f"{means[0]:.3f}", rot=f"{means[1]:.3f}", refresh=False)

        if cfg.eval_every and rnd % cfg.eval_every == 0 and rnd != rounds and s.test_labels is not None:
            t = time.time()
            m = evaluate_model(s, with_pooled=False).get("embedding")
            if m is not None:
                metrics.append(kind="eval", round=rnd, step=step, features="embedding", seconds=time.time() - t, **m)
                bar.write(f"step {step:6d} (embedding) {format_metrics(m)}")

        if rnd % max(1, cfg.checkpoint_every) and rnd != rounds:
            continue
        if not model_is_finite(s):  # a checkpoint that only yields NaN would not be a good one
            raise stop(f"the weights or the network's outputs became NaN or infinite by step {step} (round {rnd})")
        if main:
                ckpt.atomic_save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "rounds_done": rnd,
                              "step": step, "labels": labels,
                              "centroids": None if result is None else result.centroids,
                              "config": cfg.to_dict(), "rng": ckpt.rng_state(), "start_metrics": start_metrics,
                              "cpu_threads": torch.get_num_threads()},
                             run_dir / CHECKPOINT)
        saved_round = rnd
    bar.close()

    t = time.time()
    final = evaluate_model(s, with_pooled=False)
    if not main:
        return {"start": {}, "final": {}, "run_dir": str(run_dir), "step": step}
    if final:
        metrics.append(kind="eval", round=rounds, step=step, features="embedding", final=True,
                       seconds=time.time() - t, **final["embedding"])
    save_model(model, cfg, run_dir / MODEL)
    for name, m in (("start  (embedding)", start_metrics.get("embedding")),
                    ("start  (pooled   )", start_metrics.get("pooled")),
                    ("final  (embedding)", final.get("embedding"))):
        if m:
            log.info("%s %s", name, format_metrics(m))
    log.info("model written to %s; metrics in %s", run_dir / MODEL, run_dir / METRICS)
    if cfg.pictures:
        write_run_pictures(run_dir, model, s.train_plain if s.test_labels is None else s.test_plain, s.test_labels,
                           class_names=s.test_classes, batch_size=cfg.eval_batch_size, num_workers=s.workers)
    return {"start": start_metrics, "final": final, "run_dir": str(run_dir), "step": step}


def training_step(model, metric_loss, x, y, cfg: Config, use_amp: bool, world_size: int = 1):
    """Forward both tasks in one pass over [batch; rotated images]; returns (loss, [metric, rotation, accuracy]).

    Under torchrun ``x`` is this process's share of the batch, ``model`` the DDP wrapper and ``metric_loss``
    the loss over the batch gathered from all processes, scaled by ``world_size`` because DDP averages the
    gradients while each process back-propagates only through its own share."""
    if use_amp:
        x = x.contiguous(memory_format=torch.channels_last)
    with autocast(x.device, use_amp):
        if cfg.rotation_weight > 0:
            # One image per sampled cluster (the batch is grouped cluster by cluster), up to R of them.
            xr, yr = rotation_batch(x[::cfg.images_per_cluster][:max(1, cfg.rotation_images // world_size)])
            emb, logits = model(x, xr, separate=cfg.rotation_pass == "separate")
        else:
            emb = model(x)
    lm = metric_loss(emb.float(), y)
    if cfg.rotation_weight > 0:
        lr_ = rotation_loss(logits, yr)
        acc = (logits.argmax(1) == yr).float().mean()
        loss = lm + cfg.rotation_weight * lr_
    else:
        lr_ = acc = torch.zeros((), device=x.device)
        loss = lm
    return loss, [lm.detach() / world_size, lr_.detach(), acc.detach()]


def save_model(model, cfg: Config, path: Path) -> None:
    """The inference file: weights plus what is needed to rebuild the network, without the training setup."""
    ckpt.atomic_save({"format": "udml-model-1", "state_dict": model.state_dict(),
                      "arch": {"backbone": cfg.backbone, "embedding_dim": cfg.embedding_dim,
                               "rotation_hidden": cfg.rotation_hidden, "image_size": model.image_size,
                               "resize_size": resize_for(model.image_size, cfg.resize_size)}}, path)
