import numpy as np
import pytest

from udml.samplers import ClusterBatchSampler


def labels_with_sizes(sizes, seed=0):
    labels = np.concatenate([np.full(s, c) for c, s in enumerate(sizes)])
    return np.random.default_rng(seed).permutation(labels)


def test_batches_hold_p_clusters_of_exactly_m_images():
    labels = labels_with_sizes([3, 7, 12, 5, 9, 20, 2, 8])  # some clusters smaller than M
    sampler = ClusterBatchSampler(labels, clusters_per_batch=4, images_per_cluster=5, num_batches=50, seed=1)
    batches = list(sampler)
    assert len(batches) == len(sampler) == 50
    for batch in batches:
        idx = np.array([i for i, _ in batch])
        assert len(idx) == 20
        groups = idx.reshape(4, 5)  # grouped cluster by cluster
        for g in groups:
            assert len(set(labels[g])) == 1
        assert len(set(labels[groups[:, 0]])) == 4  # P distinct clusters
        big = [g for g in groups if np.sum(labels == labels[g[0]]) >= 5]
        assert all(len(set(g)) == 5 for g in big)  # no repeats when the cluster is large enough


def test_same_seed_same_batches_and_reset_changes_them():
    labels = labels_with_sizes([10] * 10)
    a = list(ClusterBatchSampler(labels, 4, 3, 5, seed=7))
    b = ClusterBatchSampler(labels, 4, 3, 5, seed=7)
    assert a == list(b)
    b.reset(labels, seed=8)
    assert a != list(b)


def test_ranks_split_each_global_batch_without_overlap():
    labels = labels_with_sizes([10] * 12)
    full = list(ClusterBatchSampler(labels, 8, 4, 6, seed=3))
    parts = [list(ClusterBatchSampler(labels, 8, 4, 6, seed=3, rank=r, world_size=2)) for r in range(2)]
    for i, batch in enumerate(full):
        assert parts[0][i] + parts[1][i] == batch
        clusters0 = set(labels[[j for j, _ in parts[0][i]]])
        clusters1 = set(labels[[j for j, _ in parts[1][i]]])
        assert not clusters0 & clusters1


def test_too_few_clusters_is_a_clear_error():
    with pytest.raises(ValueError, match="non-empty clusters but clusters_per_batch"):
        ClusterBatchSampler(np.array([0, 0, 1, 1, 5, 5]), 4, 2, 1)


def test_images_outside_keep_are_never_drawn():
    labels = np.repeat(np.arange(6), 10)
    keep = np.arange(60) % 3 != 0  # left out of the round (confident_fraction)
    sampler = ClusterBatchSampler(labels, 4, 3, num_batches=50, seed=1, keep=keep)
    drawn = {i for batch in sampler for i, _ in batch}
    assert drawn and all(keep[i] for i in drawn)
    assert len(sampler.members) == 6
    sampler.reset(labels, seed=1)  # without keep: every image again
    assert {i for batch in sampler for i, _ in batch} - drawn
