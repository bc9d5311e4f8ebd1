"""Batches of P groups x M images: clusters (UDML-SS) or neighbourhoods (STML), in one or more views."""

from __future__ import annotations

import numpy as np
import torch

from .errors import InputError


def check_world_size(clusters_per_batch: int, world_size: int) -> None:
    if clusters_per_batch % world_size:
        raise InputError(
            f"clusters_per_batch (P={clusters_per_batch}) must be divisible by the number of processes "
            f"({world_size}) so that every process trains on whole clusters; change P or "
            "--nproc_per_node"
        )


def one_per_cluster(batch: torch.Tensor, images_per_cluster: int) -> torch.Tensor:
    """The first image of each cluster of a batch from ClusterBatchSampler, whose batches hold each cluster's
    M images one after another: rows 0, M, 2M, ..."""
    return batch[::images_per_cluster]


class GroupBatchSampler(torch.utils.data.Sampler):
    """Yields ``num_batches`` batches of P groups x M images, grouped group by group; what a group is, the subclass
    says (a cluster's members, a query and its nearest neighbours).

    Items are (index, augmentation seed) pairs for ImageDataset. With ``views > 1`` every image of the batch comes
    ``views`` times with consecutive seeds (its crops differ; a cache of V views picks views ``seed % V``, so the
    views differ too): all of the batch's images in view 0, then all in view 1, and so on. The draw depends only on
    ``seed``, so a round can be replayed exactly on resume. With ``world_size > 1`` every rank sees the same global
    batch and takes its own contiguous share of the P groups (no overlap between ranks), in all its views."""

    def __init__(
        self,
        clusters_per_batch: int,
        images_per_cluster: int,
        num_batches: int,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        views: int = 1,
    ):
        self.P, self.M, self.num_batches, self.views = clusters_per_batch, images_per_cluster, num_batches, views
        check_world_size(clusters_per_batch, world_size)
        self.rank, self.world_size = rank, world_size
        self.seed = seed

    def groups(self, rng: np.random.Generator) -> list[np.ndarray]:
        """The P groups of M image indices of one batch, drawn from ``rng``."""
        raise NotImplementedError

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self):
        rng = np.random.default_rng(self.seed)
        share = self.P // self.world_size
        for _ in range(self.num_batches):
            batch = self.groups(rng)
            seeds = rng.integers(0, 2**62, size=self.P * self.M)  # one augmentation seed per image
            mine = slice(self.rank * share * self.M, (self.rank + 1) * share * self.M)
            items, seeds = np.concatenate(batch)[mine].tolist(), seeds[mine].tolist()
            yield [(i, s + v) for v in range(self.views) for i, s in zip(items, seeds)]


class ClusterBatchSampler(GroupBatchSampler):
    """P distinct clusters x M of their images (UDML-SS). Clusters smaller than M are sampled with replacement."""

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
        views: int = 1,
    ):
        super().__init__(clusters_per_batch, images_per_cluster, num_batches, seed, rank, world_size, views)
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
            raise InputError(
                f"only {len(self.members)} non-empty clusters but clusters_per_batch (P) is {self.P}; "
                "lower clusters_per_batch or raise num_clusters (k-means leaves clusters empty when "
                "the data holds fewer distinct images than num_clusters: remove duplicates)"
            )
        self.seed = seed

    def groups(self, rng: np.random.Generator) -> list[np.ndarray]:
        clusters = rng.choice(len(self.members), self.P, replace=False)
        return [rng.choice(self.members[c], self.M, replace=len(self.members[c]) < self.M) for c in clusters]


class NeighbourBatchSampler(GroupBatchSampler):
    """P distinct query images, each with its M - 1 nearest neighbours (STML's neighbourhood batches): the row of
    ``neighbours`` [N, >= M - 1] (nearest first) of each query. An image may stand in two neighbourhoods of a batch."""

    def __init__(
        self,
        neighbours,
        clusters_per_batch: int,
        images_per_cluster: int,
        num_batches: int,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        views: int = 1,
    ):
        super().__init__(clusters_per_batch, images_per_cluster, num_batches, seed, rank, world_size, views)
        self.reset(neighbours, seed)

    def reset(self, neighbours, seed: int, keep=None) -> None:
        neighbours = np.asarray(neighbours)
        if neighbours.ndim != 2 or neighbours.shape[1] < self.M - 1:
            raise InputError(
                f"a neighbourhood batch needs each image's {self.M - 1} nearest neighbours (images_per_cluster M = "
                f"{self.M}); got a table of shape {neighbours.shape}"
            )
        if len(neighbours) < self.P:
            raise InputError(
                f"only {len(neighbours)} training images but clusters_per_batch (P, the queries of a batch) is "
                f"{self.P}; lower clusters_per_batch"
            )
        self.neighbours, self.seed = neighbours[:, : self.M - 1], seed

    def groups(self, rng: np.random.Generator) -> list[np.ndarray]:
        queries = rng.choice(len(self.neighbours), self.P, replace=False)
        return list(np.concatenate([queries[:, None], self.neighbours[queries]], axis=1))
