"""What a training run works with, built once (``prepare``): the data sets with their transforms, the model, its
optimiser and loss, and the embedding passes over the training and test images (``extract_all``,
``evaluate_model``) that every clustering and evaluation of the loop (udml.training) runs."""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from . import distributed
from .config import Config, default_num_clusters
from .data import FrozenViews, ImageDataset, default_workers, resize_for, stack, test_transform, train_transform
from .datasets import load_split
from .devices import Precision, precision_for
from .errors import InputError
from .evaluation import check_recall_ks, evaluate
from .inference import extract, frozen_features
from .losses import create_loss
from .methods import create_method
from .methods.base import Method
from .models import model_from_config
from .samplers import check_world_size

log = logging.getLogger("udml")


@dataclass
class Session:
    """Everything a run builds once: model, optimiser, loss, data (train with both transforms, test)."""

    cfg: Config
    device: torch.device
    precision: Precision  # the network's dtype and layout on this device (udml.devices)
    workers: int
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    metric_loss: torch.nn.Module
    aug: ImageDataset  # training images, train transform
    train_plain: object  # training images, test transform (Dataset or stacked tensor)
    test_plain: object
    test_labels: torch.Tensor | None  # None: no labelled test split, no evaluations
    test_classes: list | None = None
    train_labels: torch.Tensor | None = None  # true classes of a benchmark's training split: diagnostics only
    train_model: torch.nn.Module | None = None  # what the training step calls: the model, or its DDP wrapper
    # With frozen stages: their outputs for this process's share of "train" / "test" images, computed once per run
    # (frozen_cache_gb bounds them; None: they do not fit and are recomputed at every pass).
    frozen: dict = dataclasses.field(default_factory=dict)
    frozen_cache: bool = False
    method: Method | None = None  # the training method (udml.methods), attached to this session
    views: torch.Tensor | None = None  # frozen_views: the frozen stages' outputs of every training image's views
    # [N, V, ...], computed once (prepare_views); the training steps then read these instead of images

    def __post_init__(self):
        self.train_model = self.train_model or self.model

    def train_set(self):
        """What the training batches are read from: the cached views, or the images with the train transform."""
        return FrozenViews(self.views) if self.views is not None else self.aug

    def plain_images(self, idx: torch.Tensor) -> torch.Tensor:
        """The training images ``idx`` with the test transform (uint8, on the model's device)."""
        data = self.train_plain
        idx = idx.cpu()
        if isinstance(data, torch.Tensor):
            return data[idx.to(data.device)]
        return torch.stack([data[int(i)][0] for i in idx]).to(self.device)


def build_datasets(cfg: Config, image_size: int):
    """(train set with the train transform, train set with the test transform, test set)."""
    train_set = load_split(cfg.dataset, cfg.data_root, cfg.train_split)
    short = resize_for(image_size, cfg.resize_size)
    disk = cfg.cache_images == "disk"
    train = ImageDataset(train_set, None, cache=cfg.cache_images, short_side=short, store_dir=cfg.store_dir)
    test = None
    if cfg.dataset == "folder" and cfg.test_root is None:  # a folder's own sub-folders need not be classes
        log.info(
            "no labelled test split was given (test_root=FOLDER, one sub-folder per class): the run is not evaluated"
        )
    else:
        test_set = load_split(cfg.dataset, cfg.test_root or cfg.data_root, cfg.test_split)
        test = ImageDataset(
            test_set,
            test_transform(image_size, resize_size=cfg.resize_size),
            cache="disk" if disk else "transformed" if cfg.cache_images else False,
            short_side=short,
            store_dir=cfg.store_dir,
        )
    if test is not None and test.labels is None:
        raise InputError(
            f"the test split {test_set.name!r} has no labels; evaluation needs class labels "
            "(for a folder: one sub-folder per class)"
        )
    aug = train.with_transform(
        train_transform(
            cfg.train_crop_size or image_size,
            resize_size=resize_for(image_size, cfg.resize_size),
            crop_scale_min=cfg.crop_scale_min,
            hflip=cfg.hflip,
            crop_rule=cfg.crop_rule,
        )
    )
    plain = train.with_transform(test_transform(image_size, resize_size=cfg.resize_size))
    return aug, plain, test


def resolve_num_clusters(cfg: Config) -> Config:
    """``num_clusters: null`` replaced by default_num_clusters of the number of training images."""
    if cfg.num_clusters is not None:
        return cfg
    n = len(load_split(cfg.dataset, cfg.data_root, cfg.train_split))
    cfg = dataclasses.replace(cfg, num_clusters=default_num_clusters(n, cfg.clusters_per_batch))
    log.info("num_clusters (K) = %d for %d training images (default_num_clusters)", cfg.num_clusters, n)
    return cfg


def prepare(cfg: Config, device: torch.device) -> Session:
    """Model, optimiser, loss and data for ``cfg`` (its num_clusters resolved) on ``device``, the one that
    ``distributed.init`` gave this process."""
    world = distributed.world_size()
    check_world_size(cfg.clusters_per_batch, world)
    workers = max(1, default_workers() // distributed.local_world_size()) if cfg.num_workers < 0 else cfg.num_workers
    precision = precision_for(device, cfg.amp)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        # TF32 where it is safe: convolutions (PyTorch's default, made explicit; it matters with amp=false, as bf16
        # autocast already covers them). Float32 matrix products stay IEEE: here they are the loss's batch x batch
        # similarities (tiny; the miner thresholds them), k-means assignments and the exact evaluation, and the
        # network's linear layers run in bf16 under autocast anyway.
        torch.backends.cudnn.allow_tf32 = True
    model = precision.prepare(model_from_config(cfg, device).to(device))
    metric_loss = create_loss(cfg.loss, cfg.loss_params).to(device)  # a bad loss name fails before decoding
    aug, plain, test = build_datasets(cfg, model.image_size)
    if cfg.num_clusters is None:
        raise InputError("num_clusters is null: resolve it first (resolve_num_clusters)")
    if cfg.num_clusters > len(aug):
        raise InputError(
            f"num_clusters (K={cfg.num_clusters}) is larger than the number of training images "
            f"({len(aug)}); lower num_clusters"
        )
    if test is not None:  # before the images are stacked and the start evaluation runs
        n = len(test)
        check_recall_ks(cfg.recall_ks, n - 1, f"the test split has {n} images, so each query has {n - 1} neighbours")
    # Images read from a disk store are transformed when read, never stacked: memory must not grow with N. With
    # the frozen stages' outputs kept instead, the images are read once more for them and need not be stacked.
    n_views = cfg.frozen_views * len(aug)
    frozen_cache = frozen_cache_fits(
        model, precision, len(plain) + (len(test) if test else 0), cfg.frozen_cache_gb, n_views
    )
    keep = plain.store is not None or frozen_cache
    train_plain = plain if keep else stack(plain, num_workers=workers, budget_gb=cfg.stack_budget_gb)
    test_plain = test
    if test is not None and not (test.store is not None or frozen_cache):
        test_plain = stack(test, num_workers=workers, budget_gb=cfg.stack_budget_gb)
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
            log.warning(
                "BatchNorm is trained with statistics of each process's share of the batch (SyncBatchNorm "
                "needs CUDA); set freeze_bn=true for steps identical to a single process"
            )
        train_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device] if device.type == "cuda" else None
        )
        metric_loss = metric_loss.across_processes()
    heads = list(model.embedding.parameters()) + list(model.rotation.parameters())
    heads += list(model.wide.parameters()) if model.wide is not None else []
    optimizer = (torch.optim.AdamW if cfg.optimizer == "adamw" else torch.optim.Adam)(
        [
            {"params": [p for p in model.backbone.parameters() if p.requires_grad], "lr": cfg.lr},
            {"params": heads, "lr": cfg.head_lr or cfg.lr},
        ],
        weight_decay=cfg.weight_decay,
        fused=device.type == "cuda" or None,
    )  # fused: one kernel per step on CUDA
    # A folder's sub-folders need not be classes; the benchmarks' training classes are.
    train_labels = torch.as_tensor(aug.labels) if aug.labels is not None and cfg.dataset != "folder" else None
    log.info("network: %s on %s", precision, device)
    s = Session(
        cfg,
        device,
        precision,
        workers,
        model,
        optimizer,
        metric_loss,
        aug,
        train_plain,
        test_plain,
        None if test is None else torch.as_tensor(test.labels),
        test_classes=None if test is None else test.image_set.class_names,
        train_labels=train_labels,
        train_model=train_model,
        frozen_cache=frozen_cache,
        method=create_method(cfg),
    )
    s.method.attach(s)
    return s


def frozen_cache_fits(model, precision: Precision, n_images: int, budget_gb: float, n_views: int = 0) -> bool:
    """Whether the frozen stages' outputs of ``n_images`` test-transformed images fit ``budget_gb``, beside those of
    ``n_views`` training views (frozen_views, which must fit: an error says so otherwise); says so."""
    if not getattr(model, "frozen_stages", 0):
        if n_views:
            raise InputError(
                "frozen_views needs frozen stages whose outputs can be kept: freeze_stages on timm's EfficientNet "
                "family (efficientnet_lite0, ...) or a vision transformer (dino_vits16, ...); set frozen_views=0"
            )
        return False
    size = model.image_size  # the frozen stages are in eval mode from construction on (UDMLNet): no state changes
    with torch.no_grad(), precision.autocast():
        probe = model.frozen_features(torch.zeros(2, 3, size, size, dtype=torch.uint8))
    per_image = probe[0].numel() * probe.element_size() / 2**30
    views_gb = n_views * per_image
    if views_gb > budget_gb:
        raise InputError(
            f"frozen_views: the frozen stages' outputs of {n_views} training views would take {views_gb:.2f} GB, over "
            f"frozen_cache_gb={budget_gb:g}; raise frozen_cache_gb or lower frozen_views (0: new crops every step)"
        )
    if n_views:
        log.info("the frozen stages' outputs of %d training views will take %.2f GB", n_views, views_gb)
    gb = n_images * per_image
    budget_gb -= views_gb
    if gb > budget_gb:
        log.info(
            "the frozen stages' outputs of %d images would take %.2f GB, over frozen_cache_gb=%g: recomputed at "
            "every clustering and evaluation (raise frozen_cache_gb to keep them)",
            n_images,
            gb,
            budget_gb,
        )
        return False
    log.info("the frozen stages' outputs are computed once and kept: %.2f GB for %d images", gb, n_images)
    return True


def prepare_views(s: Session) -> None:
    """frozen_views: ``s.views``, the frozen stages' outputs for V training-transformed crops of every training image
    [N, V, ...], computed once (under torchrun each process computes its share and the shares are gathered). View v
    of image i is drawn from its own seed, a function of the run's seed, v and i only, so that a resumed run and
    every process see the same views."""
    v = s.cfg.frozen_views
    if not v or s.views is not None:
        return
    n = len(s.aug)
    seeds = np.stack([np.random.default_rng([s.cfg.seed, k]).integers(0, 2**62, size=n) for k in range(v)], 1)
    part = distributed.shard(n)
    keys = [(i, int(seeds[i, k])) for i in part for k in range(v)]
    kw = dict(batch_size=s.cfg.eval_batch_size, num_workers=s.workers, amp=s.cfg.amp)
    views = frozen_features(s.model, torch.utils.data.Subset(s.aug, keys), **kw)
    s.views = distributed.gather_rows(views.view(len(part), v, *views.shape[1:]))


def extract_all(s: Session, split: str, pooled: bool, model: torch.nn.Module | None = None):
    """extract() of every image of ``split`` ("train" or "test", with the test transform) by ``model`` (default:
    the session's); under torchrun each process embeds its contiguous share and the shares are gathered in order,
    so every process ends with the same features. With frozen stages, their outputs are computed at the first pass
    and reused after (by any model that shares those stages, such as a teacher copied from it)."""
    model = s.model if model is None else model
    data = s.train_plain if split == "train" else s.test_plain
    if distributed.world_size() > 1:
        part = distributed.shard(len(data))
        data = data[part.start : part.stop] if isinstance(data, torch.Tensor) else torch.utils.data.Subset(data, part)
    kw = dict(batch_size=s.cfg.eval_batch_size, num_workers=s.workers, amp=s.cfg.amp)
    if s.frozen_cache and split not in s.frozen:
        s.frozen[split] = frozen_features(s.model, data, **kw)
    if split in s.frozen:
        p, e = extract(model, s.frozen[split], pooled=pooled, frozen=True, **kw)
    else:
        p, e = extract(model, data, pooled=pooled, **kw)
    return (distributed.gather_rows(p) if pooled else None), distributed.gather_rows(e)


def evaluate_model(s: Session, *, with_pooled: bool, keep: dict | None = None) -> dict:
    """Metrics of the embedding (and optionally of the pooled backbone features) on the test split; {} without one
    and on the non-main processes of a torchrun job (they only embed their share of the images). ``keep``: a dict
    that receives the test embeddings as ``keep["embeddings"]`` (the run pictures reuse them)."""
    if s.test_labels is None:
        return {}
    pooled, emb = extract_all(s, "test", pooled=with_pooled)
    if keep is not None:
        keep["embeddings"] = emb
    if not distributed.is_main():
        return {}
    labels = s.test_labels.to(emb.device)
    results = {"embedding": evaluate(emb, labels, recall_ks=s.cfg.recall_ks, seed=s.cfg.seed)}
    if with_pooled:
        results["pooled"] = evaluate(F.normalize(pooled, dim=1), labels, recall_ks=s.cfg.recall_ks, seed=s.cfg.seed)
    return results
