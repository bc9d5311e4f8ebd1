"""Cluster-balanced batches: P pseudo-classes x M images each."""

from __future__ import annotations

import numpy as np
import torch


def check_world_size(clusters_per_batch: int, world_size: int) -> None:
    if clusters_per_batch % world_size:
        raise ValueError(
            f"clusters_per_batch (P={clusters_per_batch}) must be divisible by the number of processes "
            f"({world_size}) so that every process trains on whole clusters; change P or "
            "--nproc_per_node"
        )


def one_per_cluster(batch: torch.Tensor, images_per_cluster: int) -> torch.Tensor:
    """The first image of each cluster of a batch from ClusterBatchSampler, whose batches hold each cluster's
    M images one after another: rows 0, M, 2M, ..."""
    return batch[::images_per_cluster]


class ClusterBatchSampler(torch.utils.data.Sampler):
    """Yields ``num_batches`` batches of P distinct clusters x M images, grouped cluster by cluster.

    Items are (index, augmentation seed) pairs for ImageDataset. Clusters smaller than M are sampled with
    replacement. The draw depends only on ``seed``, so a clustering round can be replayed exactly on resume.
    With ``world_size > 1`` every rank sees the same global batch and takes its own contiguous share of the P
    clusters (no overlap between ranks).
    """

    def __init__(
        self,
        labels,
        clusters_per_batch: int,
        images_per_cluster: int,
        num_batches: int,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        keep=None,
    ):
        self.P, self.M, self.num_batches = clusters_per_batch, images_per_cluster, num_batches
        check_world_size(clusters_per_batch, world_size)
        self.rank, self.world_size = rank, world_size
        self.reset(labels, seed, keep)

    def reset(self, labels, seed: int, keep=None) -> None:
        """New pseudo-labels (after a clustering) and a new seed; takes effect at the next iteration. ``keep``: a
        bool mask of the images that may be drawn (confident_fraction); None: all."""
        labels = np.asarray(labels)
        drawn = np.arange(len(labels)) if keep is None else np.flatnonzero(np.asarray(keep, dtype=bool))
        _, inverse = np.unique(labels[drawn], return_inverse=True)
        order = drawn[np.argsort(inverse, kind="stable")]
        self.members = np.split(order, np.cumsum(np.bincount(inverse))[:-1])
        if len(self.members) < self.P:
            raise ValueError(
                f"only {len(self.members)} non-empty clusters but clusters_per_batch (P) is {self.P}; "
                "lower clusters_per_batch or raise num_clusters (k-means leaves clusters empty when "
                "the data holds fewer distinct images than num_clusters: remove duplicates)"
            )
        self.seed = seed

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self):
        rng = np.random.default_rng(self.seed)
        share = self.P // self.world_size
        for _ in range(self.num_batches):
            clusters = rng.choice(len(self.members), self.P, replace=False)
            batch = []
            for c in clusters:
                members = self.members[c]
                batch.append(rng.choice(members, self.M, replace=len(members) < self.M))
            seeds = rng.integers(0, 2**62, size=self.P * self.M)  # one augmentation seed per image
            mine = slice(self.rank * share * self.M, (self.rank + 1) * share * self.M)
            yield list(zip(np.concatenate(batch)[mine].tolist(), seeds[mine].tolist()))
