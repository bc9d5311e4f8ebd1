"""UDML-SS (Cao, Chen and Lim 2019; docs/method.md): k-means pseudo-labels of the current embedding, batches of P
clusters x M images, a metric loss on the pseudo-labels plus lambda x the rotation loss. With ``supervised=true``
the true training labels replace the clusters: a benchmark's ceiling, not the method."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import distributed
from ..devices import Precision
from ..errors import InputError
from ..losses import rotation_batch, rotation_loss
from ..samplers import ClusterBatchSampler, one_per_cluster
from .base import Method, RoundTargets


class UDMLSS(Method):
    name = "udml_ss"

    def round_targets(self, s, previous, rnd):
        from ..pseudolabels import cluster, describe_clusters  # it embeds with udml.session, which imports this

        cfg = s.cfg
        if cfg.supervised:
            if s.aug.labels is None:
                raise InputError("supervised=true needs a labelled training split; this one has no labels")
            return RoundTargets(torch.as_tensor(s.aug.labels))
        labels, keep, result, stats = cluster(s, previous, seed=cfg.seed + rnd)
        record = {"kind": "cluster", **stats}
        return RoundTargets(
            labels,
            None if bool(keep.all()) else keep,
            record,
            describe_clusters(stats) if result is not None else None,
        )

    def sampler(self, s, targets, num_batches, seed):
        cfg = s.cfg
        return ClusterBatchSampler(
            targets.labels.numpy(),
            cfg.clusters_per_batch,
            cfg.images_per_cluster,
            num_batches,
            seed=seed,
            rank=distributed.rank(),
            world_size=distributed.world_size(),
            keep=None if targets.keep is None else targets.keep.numpy(),
        )

    def begin_round(self, s, targets):
        self.labels = targets.labels.to(s.device)
        self.settings = StepSettings.of(s.cfg)

    def loss(self, s, x, idx):
        rotate_from = s.plain_images(idx[:: s.cfg.images_per_cluster]) if s.views is not None else None
        return training_step(
            s.train_model,
            s.metric_loss,
            x,
            self.labels[idx.to(s.device, non_blocking=True)],
            self.settings,
            s.precision,
            distributed.world_size(),
            frozen_input=s.views is not None,
            rotate_from=rotate_from,
        )


@dataclass(frozen=True)
class StepSettings:
    """What a training step takes from the configuration."""

    images_per_cluster: int  # M: a batch holds each cluster's M images one after another
    rotation_images: int = 16  # R: one image of each of the first R clusters, rotated 4 ways
    rotation_weight: float = 0.1  # lambda; 0: no rotation task
    separate_rotation_pass: bool = False  # rotation_pass=separate
    trained_float32: bool = False  # train_float32

    @classmethod
    def of(cls, cfg) -> "StepSettings":
        return cls(
            cfg.images_per_cluster,
            cfg.rotation_images,
            cfg.rotation_weight,
            cfg.rotation_pass == "separate",
            cfg.train_float32,
        )


def training_step(
    model,
    metric_loss,
    x,
    y,
    step: StepSettings,
    precision: Precision | None = None,
    world_size: int = 1,
    frozen_input: bool = False,
    rotate_from: torch.Tensor | None = None,
):
    """Forward both tasks in one pass over [batch; rotated images]; returns (total loss, named terms).

    The terms are detached, for logging: ``metric_loss``, and with the rotation task ``rotation_loss`` and
    ``rotation_accuracy``; the total is ``metric_loss + rotation_weight * rotation_loss``. Under torchrun ``x``
    is this process's share of the batch, ``model`` the DDP wrapper and ``metric_loss`` the loss over the batch
    gathered from all processes, scaled by ``world_size`` because DDP averages the gradients while each process
    back-propagates only through its own share. ``precision``: the network's dtype and layout (default
    float32, NCHW). ``frozen_input``: ``x`` holds frozen-stage outputs (frozen_views), and the rotation task
    rotates the images ``rotate_from`` instead (one per cluster, un-augmented)."""
    precision = precision or Precision(x.device.type)
    rotate = step.rotation_weight > 0
    f32 = step.trained_float32
    frozen = frozen_input
    with precision.autocast():
        if rotate:  # one image of each of the first R clusters of the batch
            source = rotate_from if rotate_from is not None else one_per_cluster(x, step.images_per_cluster)
            xr, yr = rotation_batch(source[: max(1, step.rotation_images // world_size)].to(x.device))
            emb, logits = model(x, xr, separate=step.separate_rotation_pass, trained_float32=f32, frozen_input=frozen)
        else:
            emb = model(x, trained_float32=f32, frozen_input=frozen)
    metric = metric_loss(emb.float(), y)
    terms = {"metric_loss": metric.detach() / world_size}
    if not rotate:
        return metric, terms
    rotation = rotation_loss(logits, yr)
    terms["rotation_loss"] = rotation.detach()
    terms["rotation_accuracy"] = (logits.argmax(1) == yr).float().mean()
    return metric + step.rotation_weight * rotation, terms
