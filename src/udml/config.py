"""Configuration as data: one flat dataclass, YAML presets, ``key=value`` overrides."""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from .errors import InputError, MissingPath, UnknownKey

KMEANS_BACKENDS = ("auto", "faiss", "torch")
OPTIMIZERS = ("adam", "adamw")


@dataclass
class Config:
    # data
    dataset: str = "digits"  # a name in udml.datasets.DATASETS
    data_root: str | None = None
    test_root: str | None = None  # root of the test split; default data_root. For dataset "folder": a
    # labelled folder (one sub-folder per class); none = no evaluations
    train_split: str = "train"
    test_split: str = "test"
    image_size: int | None = None  # crop size; None = the backbone's default
    resize_size: int | None = None  # shorter side before cropping; None = image_size * 256 / 227
    train_crop_size: int | None = None  # the training crops' size; None = image_size. Smaller crops (e.g. 160 for
    # 224 at test) make a step cheaper; the crops still come from the images resized for image_size
    crop_scale_min: float = 0.16  # RandomResizedCrop lower scale bound
    crop_rule: str = "torchvision"  # torchvision: redraw boxes that do not fit; clamped: clamp them to the image
    hflip: bool = True
    cache_images: bool | str = True  # true: decoded images kept in memory; false: decoded at every read; disk:
    # decoded once into a store on disk (udml.store), reused by later runs: memory does not grow with N
    store_dir: str | None = None  # where cache_images=disk keeps its stores; None = $XDG_CACHE_HOME/udml/stores
    # (else ~/.cache/udml/stores)
    stack_budget_gb: float = 4.0  # keep test-transformed images as one tensor when they fit in this
    num_workers: int = -1  # -1: one per CPU core, at most 8

    # model
    backbone: str = "smallconv"  # a name in udml.models.BACKBONES or "timm:<model name>"
    pretrained: bool = True
    embedding_dim: int = 512
    pooling: str = "avg"  # the backbone's global pooling: avg, or gem (generalised mean, its power p trained)
    gem_p: float = 3.0  # GeM's starting power
    rotation_hidden: int = 256
    freeze_bn: bool = True  # keep BatchNorm running statistics fixed while training
    grad_checkpointing: bool | None = None  # recompute activations in the backward pass (timm backbones): less
    # memory, more compute. null (auto): on when training on a CPU with freeze_bn, where a batch of 80 + 64
    # images at 224 px otherwise holds about 10 GB of activations; off on GPUs and with freeze_stages >= 4
    freeze_stages: int = 0  # the backbone's stem and first N stages keep their weights (timm backbones with
    # `blocks`: EfficientNet stages, a vision transformer's blocks): less compute and memory per step. On timm's
    # EfficientNet family and vision transformers they also run without autograd (and keep their BatchNorm
    # statistics), and their outputs for the test-transformed images are computed once per run and reused by every
    # clustering and evaluation
    frozen_cache_gb: float = 2.0  # memory for those outputs (Lite0 after 5 stages, 224 px: 44 KB an image in
    # bfloat16, 88 KB in float32); above it they are recomputed at every pass
    frozen_views: int = 0  # with freeze_stages on timm's EfficientNet family: the frozen stages' outputs for this many
    # training-transformed crops (views) of every training image, computed once per run and kept in memory (within
    # frozen_cache_gb), so that a training step runs only the trained layers; a step draws from them instead of
    # making new crops. 0: new crops at every step, through the whole network

    # pseudo-labels
    num_clusters: int | None = 100  # K; null = default_num_clusters(N training images): N / 50, clipped
    kmeans_iters: int = 20
    kmeans_backend: str = "auto"  # auto | faiss | torch
    confident_fraction: float = 1.0  # each round's batches draw from this fraction of each cluster's images, those
    # nearest its centre (at least M); 1 = all
    recluster_init: str = "warm"  # warm: start from the previous clusters' centres; fresh: k-means++ each time
    target_neighbours: int = 0  # the training images' features averaged with their k nearest neighbours
    # (database-side augmentation, weights similarity^target_alpha) before they make a round's targets: before
    # k-means (udml_ss) and before the neighbour graph (stml); 0: off
    target_alpha: float = 3.0

    # the training method (udml.methods): udml_ss (k-means pseudo-labels, the paper's method) or stml (soft
    # neighbourhood targets from a moving-average teacher); method_params: that method's own settings by name
    method: str = "udml_ss"
    method_params: dict = field(default_factory=dict)

    # batches and losses
    clusters_per_batch: int = 16  # P: clusters (udml_ss) or neighbourhoods (stml) a batch
    images_per_cluster: int = 5  # M: images of each (stml: a query and its M - 1 nearest neighbours)
    rotation_images: int = 16  # R, each rotated 0/90/180/270 degrees
    loss: str = "multi_similarity"  # a name in udml.losses.LOSSES
    loss_params: dict = field(default_factory=dict)
    rotation_weight: float = 0.1  # lambda; 0 turns the rotation task off (UDML)
    rotation_pass: str = "joint"  # joint: one backbone pass over [batch; rotated] (shared BatchNorm
    # statistics); separate: two passes, each with its own statistics
    supervised: bool = False  # benchmarks only: train on the true training labels (a ceiling)

    # optimisation and schedule
    optimizer: str = "adam"  # adam (weight decay added to the gradient) or adamw (decoupled weight decay)
    lr: float = 1e-5
    head_lr: float | None = None  # learning rate of the heads; None = lr
    weight_decay: float = 5e-4
    pseudo_epochs: int = 600  # one pseudo-epoch = num_clusters * epoch_images_per_cluster images
    epoch_images_per_cluster: int = 5
    recluster_every: int = 5  # pseudo-epochs between two clusterings

    # evaluation
    recall_ks: list = field(default_factory=lambda: [1, 2, 4, 8])
    eval_every: int = 0  # clustering rounds between evaluations; 0 = start and end only
    eval_batch_size: int = 256

    # run
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    amp: bool = True  # the network in bfloat16 autocast where the device computes it natively (CUDA; CPUs with
    # AVX512-BF16 or AMX), channels_last on CPU and CUDA; false: float32 NCHW, bit-stable (udml.devices)
    train_float32: bool = False  # the trained layers (those after freeze_stages, or all) run in float32 in the
    # training step even where amp runs the network in bfloat16; the frozen stages and every embedding pass keep amp
    out_dir: str = "runs"
    pictures: bool = True  # retrieval grid, curves and t-SNE map written at the end of a run
    checkpoint_every: int = 1  # clustering rounds between checkpoints (the last round always writes one)
    time_budget: str | None = None  # e.g. 20m, 90s, 1.5h: the whole `udml train` fits in it. Training stops at a
    # step boundary when the final evaluation and model (timed from the start evaluation) would no longer fit,
    # with a checkpoint and a finished model.pt; null: the schedule alone decides
    run_name: str | None = None

    def iterations_per_round(self) -> int:
        if self.num_clusters is None:
            raise InputError(
                "num_clusters is null: it is set from the number of training images when training "
                "starts (default_num_clusters); give a number to compute the schedule beforehand"
            )
        images = self.recluster_every * self.num_clusters * self.epoch_images_per_cluster
        return max(1, images // (self.clusters_per_batch * self.images_per_cluster))

    def num_rounds(self) -> int:
        return max(1, self.pseudo_epochs // self.recluster_every)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# Fields that may differ between a run and its resumption without changing the result.
RUNTIME_FIELDS = {
    "num_workers",
    "device",
    "out_dir",
    "run_name",
    "data_root",
    "test_root",
    "eval_batch_size",
    "cache_images",
    "store_dir",
    "stack_budget_gb",
    "eval_every",
    "checkpoint_every",
    "pictures",
    "grad_checkpointing",
    "frozen_cache_gb",
    "time_budget",
}

FIELDS = {f.name: f for f in dataclasses.fields(Config)}


MAX_DEFAULT_CLUSTERS = 10_000


def default_num_clusters(n_images: int, clusters_per_batch: int = 16) -> int:
    """K for ``num_clusters: null``: about 50 images per cluster, ``round(N / 50)``, at least
    ``clusters_per_batch`` (a batch draws that many clusters) and at most 10,000 (SOP's K).
    CUB's 5,864 training images give 117, close to the paper's K = 100."""
    return int(min(MAX_DEFAULT_CLUSTERS, max(clusters_per_batch, 2, round(n_images / 50))))


def preset_names() -> list[str]:
    return sorted(p.name[:-5] for p in resources.files("udml.presets").iterdir() if p.name.endswith(".yaml"))


def _read_yaml(path_or_name: str) -> dict[str, Any]:
    path = Path(path_or_name)
    if path.suffix in (".yaml", ".yml") and path.exists():
        text = path.read_text()
        where = str(path)
    else:
        name = path_or_name[:-5] if path_or_name.endswith(".yaml") else path_or_name
        entry = resources.files("udml.presets") / f"{name}.yaml"
        if not entry.is_file():
            raise MissingPath(
                f"no configuration file or preset named {path_or_name!r}; "
                f"give a path to a .yaml file or one of the presets: {', '.join(preset_names())}"
            )
        text = entry.read_text()
        where = f"preset {name}"
    data = yaml.safe_load(text) or {}
    if not isinstance(data, dict):
        raise InputError(f"{where}: expected a mapping of configuration keys to values, got {type(data).__name__}")
    return data


def _check_keys(data: dict[str, Any], where: str) -> None:
    unknown = sorted(set(data) - set(FIELDS))
    if unknown:
        hints = []
        for key in unknown:
            close = difflib.get_close_matches(key, FIELDS, n=1, cutoff=0.6)
            if close:
                hints.append(f"{key} -> did you mean {close[0]}?")
        hint = f" ({'; '.join(hints)})" if hints else ""
        raise UnknownKey(
            f"{where}: unknown configuration key(s) {', '.join(unknown)}{hint}; valid keys are: {', '.join(FIELDS)}"
        )


def check_paths(cfg: Config) -> None:
    """The data folders named by the configuration exist (the data set's own layout is checked when it loads),
    and with cache_images=disk the store directory can be written."""
    for key in ("data_root", "test_root"):
        value = getattr(cfg, key)
        if value is not None and not Path(value).exists():
            raise MissingPath(
                f"{key}: {value} does not exist; give the folder that holds the "
                f"{cfg.dataset} data (--data sets data_root)"
            )
    if cfg.cache_images == "disk":
        from .store import check_store_dir  # numpy only: torch is not imported yet

        check_store_dir(cfg.store_dir)


CACHE_MODES = (
    "true (decoded images kept in memory), false (decoded at every read) or disk (decoded once into a store on "
    "disk under store_dir, reused by later runs: for collections larger than memory)"
)


def _cache_mode(value: Any) -> Any:
    """cache_images as True, False or "disk"; anything else is returned as given, for validate to report."""
    if isinstance(value, str):
        return {"true": True, "false": False, "1": True, "0": False, "disk": "disk"}.get(value.strip().lower(), value)
    if isinstance(value, (int, float)) and value in (0, 1):
        return bool(value)
    return value


def parse_override(text: str) -> tuple[str, Any]:
    """``key=value`` with the value read as YAML (so ``lr=1e-4``, ``recall_ks=[1,10]``, ``run_name=x``)."""
    if "=" not in text:
        raise InputError(f"override {text!r} is not of the form key=value (for example lr=1e-4)")
    key, value = text.split("=", 1)
    key = key.strip().replace("-", "_")
    parsed = yaml.safe_load(value) if value.strip() else None
    if isinstance(parsed, str):
        try:  # YAML 1.1 reads 1e-4 as a string; _coerce turns it back into text for text keys
            parsed = float(parsed)
        except ValueError:
            pass
    return key, parsed


def _coerce(key: str, value: Any) -> Any:
    if key == "cache_images":
        return _cache_mode(value)
    if key == "time_budget" and value is not None:
        parse_duration(value, key)  # checked here, kept as written
        return str(value)
    default = getattr(Config(), key)
    if value is None or default is None:
        return value
    try:
        if isinstance(default, bool):
            if isinstance(value, str):
                return {"true": True, "false": False, "1": True, "0": False}[value.lower()]
            return bool(value)
        if isinstance(default, int):
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(value)
        if isinstance(default, float):
            return float(value)
        if isinstance(default, str):
            return str(value)
    except (ValueError, KeyError):
        raise InputError(f"configuration key {key!r}: {value!r} is not a valid {type(default).__name__}") from None
    return value


DURATION_UNITS = {"s": 1, "m": 60, "min": 60, "h": 3600}


def parse_duration(value: Any, key: str = "time_budget") -> float:
    """Seconds of a duration written as 90, 90s, 20m, 20min or 1.5h."""
    text = str(value).strip().lower()
    unit = next((u for u in sorted(DURATION_UNITS, key=len, reverse=True) if text.endswith(u)), "")
    try:
        seconds = float(text[: len(text) - len(unit)].strip()) * DURATION_UNITS.get(unit, 1)
    except ValueError:
        seconds = -1
    if not seconds > 0:
        raise InputError(
            f"configuration key {key!r}: {value!r} is not a duration; write a positive number with a unit, for "
            "example 90s, 20m or 1.5h (a bare number is seconds)"
        )
    return seconds


def make_config(preset: str | None = None, overrides: dict[str, Any] | list[str] | None = None) -> Config:
    """Defaults, then the preset (a name or a YAML path), then the overrides."""
    values: dict[str, Any] = {}
    if preset:
        data = _read_yaml(preset)
        _check_keys(data, f"configuration {preset!r}")
        values.update(data)
    if isinstance(overrides, list):
        overrides = dict(parse_override(o) for o in overrides)
    if overrides:
        _check_keys(overrides, "command-line override")
        values.update(overrides)
    cfg = Config(**{k: _coerce(k, v) for k, v in values.items()})
    validate(cfg)
    return cfg


def validate(cfg: Config) -> None:
    def need(ok: bool, message: str) -> None:
        if not ok:
            raise InputError(message)

    need(
        cfg.num_clusters is None or cfg.num_clusters >= 2,
        f"num_clusters (K) must be at least 2, got {cfg.num_clusters}; set num_clusters to 2 or more "
        "(the paper uses 100 for 100 unseen classes)",
    )
    need(
        cfg.clusters_per_batch >= 2,
        f"clusters_per_batch (P) must be at least 2, got {cfg.clusters_per_batch}; a batch needs clusters to contrast",
    )
    need(
        cfg.images_per_cluster >= 2,
        f"images_per_cluster (M) must be at least 2, got {cfg.images_per_cluster}; a batch needs positive pairs",
    )
    need(
        cfg.num_clusters is None or cfg.clusters_per_batch <= cfg.num_clusters,
        f"clusters_per_batch (P={cfg.clusters_per_batch}) cannot exceed num_clusters (K={cfg.num_clusters}); "
        "lower clusters_per_batch or raise num_clusters",
    )
    need(cfg.rotation_weight >= 0, f"rotation_weight (lambda) must be >= 0, got {cfg.rotation_weight}")
    need(
        cfg.rotation_pass in ("joint", "separate"),
        f"rotation_pass must be 'joint' or 'separate', got {cfg.rotation_pass!r}",
    )
    need(cfg.rotation_images >= 1, f"rotation_images must be at least 1, got {cfg.rotation_images}")
    need(cfg.lr > 0, f"lr must be positive, got {cfg.lr}")
    need(
        cfg.grad_checkpointing in (None, True, False),
        f"grad_checkpointing must be true, false or null (auto: on for CPU training), got {cfg.grad_checkpointing!r}",
    )
    need(cfg.freeze_stages >= 0, f"freeze_stages must be 0 (train everything) or more, got {cfg.freeze_stages}")
    need(cfg.frozen_cache_gb >= 0, f"frozen_cache_gb must be 0 (never keep) or more, got {cfg.frozen_cache_gb}")
    need(cfg.pseudo_epochs >= 1 and cfg.recluster_every >= 1, "pseudo_epochs and recluster_every must be at least 1")
    need(
        0 < cfg.confident_fraction <= 1,
        f"confident_fraction must be in (0, 1] (1 = every image of a cluster), got {cfg.confident_fraction}",
    )
    need(
        cfg.train_crop_size is None or cfg.train_crop_size >= 8,
        f"train_crop_size must be null (= image_size) or at least 8 pixels, got {cfg.train_crop_size}",
    )
    need(0 < cfg.crop_scale_min <= 1, f"crop_scale_min must be in (0, 1], got {cfg.crop_scale_min}")
    need(
        len(cfg.recall_ks) > 0 and all(int(k) >= 1 for k in cfg.recall_ks),
        f"recall_ks must be a non-empty list of positive integers, got {cfg.recall_ks}",
    )
    need(
        cfg.crop_rule in ("torchvision", "clamped"),
        f"crop_rule must be 'torchvision' or 'clamped', got {cfg.crop_rule!r}",
    )
    need(
        cfg.recluster_init in ("warm", "fresh"), f"recluster_init must be 'warm' or 'fresh', got {cfg.recluster_init!r}"
    )
    need(
        isinstance(cfg.cache_images, bool) or cfg.cache_images == "disk",
        f"cache_images must be {CACHE_MODES}; got {cfg.cache_images!r}",
    )
    need(
        cfg.store_dir is None or (isinstance(cfg.store_dir, str) and cfg.store_dir.strip() != ""),
        f"store_dir must be a folder path, or null for the default ($XDG_CACHE_HOME/udml/stores, else "
        f"~/.cache/udml/stores); got {cfg.store_dir!r}",
    )
    need(
        cfg.kmeans_backend in KMEANS_BACKENDS,
        f"kmeans_backend must be one of {', '.join(KMEANS_BACKENDS)}, got {cfg.kmeans_backend!r}",
    )
    need(
        cfg.target_neighbours >= 0,
        f"target_neighbours must be 0 (off) or a number of neighbours, got {cfg.target_neighbours}",
    )
    need(cfg.target_alpha >= 0, f"target_alpha must be 0 or more, got {cfg.target_alpha}")
    need(cfg.pooling in ("avg", "gem"), f"pooling must be avg or gem, got {cfg.pooling!r}")
    need(cfg.gem_p >= 1, f"gem_p must be at least 1 (1: average pooling), got {cfg.gem_p}")
    need(cfg.optimizer in OPTIMIZERS, f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {cfg.optimizer!r}")
    need(
        cfg.frozen_views >= 0 and (cfg.frozen_views == 0 or cfg.freeze_stages > 0),
        f"frozen_views must be 0 (new crops at every step) or, with freeze_stages set, 1 or more; got "
        f"frozen_views={cfg.frozen_views} with freeze_stages={cfg.freeze_stages}",
    )
    from .methods import check_method  # the method's own settings (method_params); no torch

    check_method(cfg)


def save_config(cfg: Config, path: Path) -> None:
    """Write via a temporary file and a rename, so that a kill or a full disk never leaves a torn config.yaml."""
    from .rundir import atomic_write

    text = yaml.safe_dump(cfg.to_dict(), sort_keys=False).encode()
    atomic_write(path, lambda f: f.write(text), what="configuration")


def load_config(path: Path) -> Config:
    path = Path(path)
    if not path.is_file():
        raise MissingPath(
            f"no configuration file at {path}; a run folder holds the config.yaml its run was started with"
        )
    data = yaml.safe_load(path.read_text())
    if not isinstance(data, dict):
        raise InputError(
            f"{path}: expected a mapping of configuration keys to values, got "
            f"{type(data).__name__}; the file is damaged: restore it, or copy the configuration "
            "from the checkpoint (torch.load(...)['config'])"
        )
    _check_keys(data, str(path))
    return Config(**data)
