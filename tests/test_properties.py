"""Property-based checks (hypothesis) of the retrieval metrics and the P x M sampler against brute force, on
random sizes, ties, duplicate embeddings and single-image classes.

Embeddings hold small integers, so every similarity is exact in float32 and float64 and ties are exact:
with ties the ranking is not unique, so a metric is checked to lie between its values for the two extreme
tie orders (relevant items last / first), which coincide, and must then match exactly, on tie-free data.
"""

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from udml.evaluation import evaluate, knn, map_at_r, recall_at_k
from udml.samplers import ClusterBatchSampler

SETTINGS = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def embedded_set(draw, max_n=14, ties=True):
    """(embeddings float32 [N, D] of integers, labels [N]). A small value range gives many ties and exact
    duplicates, a wide one almost none; the labels give single-image classes as often as larger ones.
    ``ties=False``: the wide range only (ties are then rare, for tests that must skip them)."""
    n = draw(st.integers(2, max_n))
    d = draw(st.integers(1, 4))
    span = draw(st.sampled_from([1, 2, 1000] if ties else [1000]))
    values = draw(st.lists(st.integers(-span, span), min_size=n * d, max_size=n * d))
    x = torch.tensor(values, dtype=torch.float32).view(n, d)
    if ties and draw(st.booleans()):  # force exact duplicates of the first row
        x[draw(st.integers(0, n - 1))] = x[0]
    labels = torch.tensor(draw(st.lists(st.integers(0, max(1, n // 2)), min_size=n, max_size=n)))
    return x, labels


def brute_similarities(q: torch.Tensor, g: torch.Tensor) -> np.ndarray:
    return q.double().numpy() @ g.double().numpy().T  # exact: small integers


def ranking(sims: np.ndarray, relevant: np.ndarray, skip: int | None, relevant_first: bool) -> list[int]:
    """Gallery indices by decreasing similarity; ties broken against (or for) the relevant items."""
    order = [j for j in range(len(sims)) if j != skip]
    return sorted(order, key=lambda j: (-sims[j], (not relevant[j]) if relevant_first else relevant[j], j))


def brute_metrics(q, q_labels, g, g_labels, self_excluded: bool, ks, relevant_first: bool):
    s = brute_similarities(q, g)
    hits, aps = {k: 0 for k in ks}, []
    for i in range(len(q)):
        relevant = (g_labels == q_labels[i]).numpy()
        if self_excluded:
            relevant[i] = False
        ranked = ranking(s[i], relevant, i if self_excluded else None, relevant_first)
        rel = [bool(relevant[j]) for j in ranked]
        for k in ks:
            hits[k] += any(rel[:k])
        r = int(relevant.sum())
        if r:
            aps.append(sum(sum(rel[: i + 1]) / (i + 1) for i in range(r) if rel[i]) / r)
    out = {f"recall@{k}": hits[k] / len(q) for k in ks}
    out["map@r"] = float(np.mean(aps)) if aps else None
    return out


def has_ties(q, g, self_excluded: bool) -> bool:
    s = brute_similarities(q, g)
    for i in range(len(q)):
        row = np.delete(s[i], i) if self_excluded else s[i]
        if len(np.unique(row)) < len(row):
            return True
    return False


# --------------------------------------------------------------------------- knn


@SETTINGS
@given(
    data=embedded_set(),
    n_query=st.integers(1, 6),
    k_fraction=st.floats(0, 1),
    chunk=st.integers(1, 8),
    exclude_self=st.booleans(),
)
def test_knn_returns_the_brute_force_top_k(data, n_query, k_fraction, chunk, exclude_self):
    g, _ = data
    n = g.shape[0]
    q = g[:n_query] if exclude_self else g[torch.arange(n_query) % n] + 1
    usable = n - 1 if exclude_self else n
    k = 1 + int(k_fraction * (usable - 1))
    exclude = torch.arange(q.shape[0]) if exclude_self else None
    sims, idx = knn(q, g, k, exclude=exclude, chunk_size=chunk)
    s = brute_similarities(q, g)
    assert sims.shape == idx.shape == (q.shape[0], k)
    for i in range(q.shape[0]):
        row = np.delete(s[i], i) if exclude_self else s[i]
        # tie-agnostic: the similarity values are the brute-force top k, in order ...
        assert sims[i].double().numpy().tolist() == sorted(row, reverse=True)[:k]
        # ... and the indices are distinct, never the excluded one, and carry those similarities
        assert len(set(idx[i].tolist())) == k
        assert not exclude_self or i not in idx[i].tolist()
        assert s[i, idx[i].numpy()].tolist() == sims[i].double().numpy().tolist()


@SETTINGS
@given(data=embedded_set())
def test_knn_finds_exact_duplicates_at_other_indices(data):
    g, _ = data
    n = g.shape[0]
    g = torch.cat([g, g[:1]])  # row n duplicates row 0
    norm = g.double().pow(2).sum(1)
    sims, idx = knn(g[:1], g, 1, exclude=torch.tensor([0]))
    best = brute_similarities(g[:1], g)[0, 1:].max()
    assert float(sims[0, 0]) == best
    if norm[0] > 0 and best == norm[0] and (brute_similarities(g[:1], g)[0, 1:] == best).sum() == 1:
        assert int(idx[0, 0]) == n  # the duplicate is the unique nearest neighbour


# --------------------------------------------------------------------------- recall_at_k, map_at_r


@st.composite
def neighbour_labels(draw):
    nq = draw(st.integers(1, 8))
    m = draw(st.integers(1, 8))
    n_classes = draw(st.integers(1, 4))
    nl = torch.tensor(draw(st.lists(st.integers(0, n_classes - 1), min_size=nq * m, max_size=nq * m))).view(nq, m)
    ql = torch.tensor(draw(st.lists(st.integers(0, n_classes), min_size=nq, max_size=nq)))
    return nl, ql


@SETTINGS
@given(data=neighbour_labels(), ks=st.lists(st.integers(1, 8), min_size=1, max_size=4))
def test_recall_at_k_matches_brute_force(data, ks):
    nl, ql = data
    ks = [k for k in ks if k <= nl.shape[1]] or [1]
    got = recall_at_k(nl, ql, ks)
    for k in ks:
        want = sum(int(ql[i]) in nl[i, :k].tolist() for i in range(len(ql))) / len(ql)
        assert got[k] == pytest.approx(want, abs=1e-12)
    assert all(got[a] <= got[b] for a in got for b in got if a <= b)  # monotone in K


@SETTINGS
@given(data=neighbour_labels(), r_seed=st.integers(0, 2**16))
def test_map_at_r_matches_brute_force(data, r_seed):
    nl, ql = data
    m = nl.shape[1]
    r = torch.tensor(np.random.default_rng(r_seed).integers(0, m + 1, size=len(ql)))
    if not bool((r > 0).any()):
        with pytest.raises(ValueError, match="MAP@R is undefined"):
            map_at_r(nl, ql, r)
        return
    aps = []
    for i in range(len(ql)):
        ri = int(r[i])
        if ri == 0:
            continue
        rel = [int(v) == int(ql[i]) for v in nl[i, :ri]]
        aps.append(sum(sum(rel[: j + 1]) / (j + 1) for j in range(ri) if rel[j]) / ri)
    assert map_at_r(nl, ql, r) == pytest.approx(float(np.mean(aps)), abs=1e-12)


# --------------------------------------------------------------------------- evaluate


def check_against_brute_force(got, q, ql, g, gl, self_excluded, ks):
    low = brute_metrics(q, ql, g, gl, self_excluded, ks, relevant_first=False)
    high = brute_metrics(q, ql, g, gl, self_excluded, ks, relevant_first=True)
    for key in got:
        assert low[key] - 1e-9 <= got[key] <= high[key] + 1e-9, (key, low[key], got[key], high[key])
    if not has_ties(q, g, self_excluded):
        assert low == high
        for key in got:
            assert got[key] == pytest.approx(low[key], abs=1e-9)


@SETTINGS
@given(data=embedded_set(), ks=st.lists(st.integers(1, 13), min_size=1, max_size=3), chunk=st.integers(1, 16))
def test_evaluate_all_against_all_matches_brute_force(data, ks, chunk):
    x, labels = data
    n = x.shape[0]
    ks = sorted({min(k, n - 1) for k in ks})
    if not any((labels == c).sum() >= 2 for c in labels.unique()):  # only single-image classes
        with pytest.raises(ValueError, match="MAP@R is undefined"):
            evaluate(x, labels, recall_ks=ks, compute_nmi=False, chunk_size=chunk)
        got = evaluate(x, labels, recall_ks=ks, compute_nmi=False, compute_map_at_r=False, chunk_size=chunk)
        assert all(v == 0 for v in got.values())  # no query has a positive
        return
    got = evaluate(x, labels, recall_ks=ks, compute_nmi=False, chunk_size=chunk)
    assert set(got) == {f"recall@{k}" for k in ks} | {"map@r"}
    check_against_brute_force(got, x, labels, x, labels, True, ks)


@SETTINGS
@given(data=embedded_set(), split=st.floats(0.1, 0.9), ks=st.lists(st.integers(1, 13), min_size=1, max_size=3))
def test_evaluate_query_gallery_matches_brute_force(data, split, ks):
    x, labels = data
    n = x.shape[0]
    nq = min(n - 1, max(1, int(split * n)))
    q, ql, g, gl = x[:nq], labels[:nq], x[nq:], labels[nq:]
    ks = sorted({min(k, g.shape[0]) for k in ks})
    has_positive = bool(torch.isin(ql, gl).any())
    got = evaluate(g, gl, recall_ks=ks, query=q, query_labels=ql, compute_nmi=False, compute_map_at_r=has_positive)
    check_against_brute_force(got, q, ql, g, gl, False, ks)


@SETTINGS
@given(data=embedded_set(ties=False))
def test_evaluate_ignores_row_order(data):
    x, labels = data
    assume(any((labels == c).sum() >= 2 for c in labels.unique()))
    assume(not has_ties(x, x, True))
    perm = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(0))
    a = evaluate(x, labels, recall_ks=[1], compute_nmi=False)
    b = evaluate(x[perm], labels[perm], recall_ks=[1], compute_nmi=False)
    assert a == pytest.approx(b, abs=1e-12)


# --------------------------------------------------------------------------- ClusterBatchSampler


@st.composite
def sampler_case(draw):
    sizes = draw(st.lists(st.integers(1, 9), min_size=1, max_size=10))  # size-1 clusters included
    ids = draw(st.lists(st.integers(-50, 50), min_size=len(sizes), max_size=len(sizes), unique=True))
    labels = np.concatenate([np.full(s, c) for c, s in zip(ids, sizes)])
    labels = np.random.default_rng(draw(st.integers(0, 1000))).permutation(labels)
    world = draw(st.sampled_from([1, 2]))
    p = world * draw(st.integers(1, max(1, 5 // world)))
    m = draw(st.integers(1, 6))
    return labels, p, m, world, draw(st.integers(0, 6)), draw(st.integers(0, 2**31))


@SETTINGS
@given(case=sampler_case())
def test_sampler_batches_against_brute_force(case):
    labels, p, m, world, num_batches, seed = case
    n_clusters = len(np.unique(labels))
    if n_clusters < p:
        with pytest.raises(ValueError, match=rf"only {n_clusters} non-empty clusters but clusters_per_batch"):
            ClusterBatchSampler(labels, p, m, num_batches, seed=seed)
        return
    members = {c: set(np.flatnonzero(labels == c).tolist()) for c in np.unique(labels)}  # brute force
    sampler = ClusterBatchSampler(labels, p, m, num_batches, seed=seed)
    batches = list(sampler)
    assert len(batches) == len(sampler) == num_batches
    for batch in batches:
        assert len(batch) == p * m
        idx = [i for i, _ in batch]
        assert all(isinstance(s, int) and 0 <= s < 2**62 for _, s in batch)
        groups = [idx[j * m : (j + 1) * m] for j in range(p)]
        clusters = [labels[g[0]] for g in groups]
        assert len(set(clusters)) == p  # P distinct clusters, grouped cluster by cluster
        for c, g in zip(clusters, groups):
            assert set(g) <= members[c]
            if len(members[c]) >= m:
                assert len(set(g)) == m  # without replacement when the cluster is big enough
    assert batches == list(ClusterBatchSampler(labels, p, m, num_batches, seed=seed))  # replayable
    if world > 1:  # ranks take disjoint contiguous shares of the same global batch
        parts = [
            list(ClusterBatchSampler(labels, p, m, num_batches, seed=seed, rank=r, world_size=world))
            for r in range(world)
        ]
        for b, batch in enumerate(batches):
            assert sum((parts[r][b] for r in range(world)), []) == batch
