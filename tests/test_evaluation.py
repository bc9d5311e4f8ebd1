import numpy as np
import pytest
import torch
import torch.nn.functional as F

from udml.evaluation import evaluate, knn, map_at_r, nmi, recall_at_k


def random_embeddings(n, dim=8, n_classes=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = F.normalize(torch.randn(n, dim, generator=g), dim=1)
    labels = torch.randint(n_classes, (n,), generator=g)
    return x, labels


def naive_ranking(query, gallery, skip=None):
    """Gallery indices sorted by decreasing float64 similarity, `skip` left out."""
    q, g = query.double().numpy(), gallery.double().numpy()
    sims = [(float(np.dot(q, g[j])), j) for j in range(len(g)) if j != skip]
    return [j for _, j in sorted(sims, key=lambda t: -t[0])]


def naive_metrics(query, q_labels, gallery, g_labels, self_excluded, ks):
    q_labels, g_labels = q_labels.tolist(), g_labels.tolist()
    hits = {k: 0 for k in ks}
    aps = []
    for i in range(len(query)):
        ranking = naive_ranking(query[i], gallery, skip=i if self_excluded else None)
        ranked_labels = [g_labels[j] for j in ranking]
        for k in ks:
            hits[k] += q_labels[i] in ranked_labels[:k]
        relevant = sum(1 for j, lab in enumerate(g_labels) if lab == q_labels[i] and not (self_excluded and j == i))
        if relevant == 0:
            continue
        ap, n_rel = 0.0, 0
        for rank in range(1, relevant + 1):  # precision at each relevant rank among the first R
            if ranked_labels[rank - 1] == q_labels[i]:
                n_rel += 1
                ap += n_rel / rank
        aps.append(ap / relevant)
    out = {f"recall@{k}": hits[k] / len(query) for k in ks}
    out["map@r"] = sum(aps) / len(aps)
    return out


def test_knn_matches_bruteforce():
    q, _ = random_embeddings(50, seed=1)
    g, _ = random_embeddings(200, seed=2)
    exclude = torch.randint(-1, 200, (50,), generator=torch.Generator().manual_seed(3))
    sims, idx = knn(q, g, 10, exclude=exclude, chunk_size=16)
    assert sims.shape == idx.shape == (50, 10) and idx.dtype == torch.int64
    full = q.double() @ g.double().T
    for i in range(50):
        skip = int(exclude[i]) if exclude[i] >= 0 else None
        expected = naive_ranking(q[i], g, skip=skip)[:10]
        assert idx[i].tolist() == expected
        torch.testing.assert_close(sims[i].double(), full[i, expected], atol=1e-6, rtol=1e-6)
    assert bool((sims[:, :-1] >= sims[:, 1:]).all())


def test_knn_excludes_by_index_with_duplicates():
    x, _ = random_embeddings(20, seed=4)
    x[7] = x[3]  # exact duplicates of the same class
    sims, idx = knn(x, x, 3, exclude=torch.arange(20))
    assert int(idx[3, 0]) == 7 and int(idx[7, 0]) == 3
    assert float(sims[3, 0]) == pytest.approx(1.0, abs=1e-6)
    for i in range(20):
        assert i not in idx[i].tolist()


def test_knn_chunking_does_not_change_results():
    x, _ = random_embeddings(300, dim=16, seed=5)
    ex = torch.arange(300)
    s_small, i_small = knn(x, x, 12, exclude=ex, chunk_size=7)
    s_full, i_full = knn(x, x, 12, exclude=ex, chunk_size=300)
    s_big, i_big = knn(x, x, 12, exclude=ex, chunk_size=10_000)
    assert torch.equal(i_small, i_full) and torch.equal(i_full, i_big)
    torch.testing.assert_close(s_small, s_full)


def test_knn_k_larger_than_gallery_raises():
    x, _ = random_embeddings(10)
    knn(x, x, 10)  # every gallery item, nothing excluded
    with pytest.raises(ValueError, match="k=11"):
        knn(x, x, 11)
    with pytest.raises(ValueError, match=r"k=10.*use k <= 9"):
        knn(x, x, 10, exclude=torch.arange(10))
    with pytest.raises(ValueError, match="exclude"):
        knn(x, x, 2, exclude=torch.full((10,), 10))


def test_recall_and_map_match_naive_loops():
    x, labels = random_embeddings(150, seed=6)
    got = evaluate(x, labels, recall_ks=(1, 2, 4, 8), compute_nmi=False, chunk_size=32)
    ref = naive_metrics(x, labels, x, labels, self_excluded=True, ks=(1, 2, 4, 8))
    assert set(got) == set(ref)
    for key in ref:
        assert got[key] == pytest.approx(ref[key], abs=1e-12), key
        assert isinstance(got[key], float)


def test_query_gallery_mode_matches_naive_loops():
    gallery, g_labels = random_embeddings(120, n_classes=8, seed=7)
    query, q_labels = random_embeddings(40, n_classes=10, seed=8)  # classes 8, 9 not in gallery
    got = evaluate(
        gallery,
        g_labels,
        query=query,
        query_labels=q_labels,
        recall_ks=(1, 5, 10),
        compute_nmi=False,
        chunk_size=16,
    )
    ref = naive_metrics(query, q_labels, gallery, g_labels, self_excluded=False, ks=(1, 5, 10))
    for key in ref:
        assert got[key] == pytest.approx(ref[key], abs=1e-12), key


def test_recall_at_k_and_map_at_r_functions_on_knn_output():
    x, labels = random_embeddings(100, seed=9)
    _, idx = knn(x, x, 30, exclude=torch.arange(100))
    nl = labels[idx]
    r = torch.bincount(labels)[labels] - 1
    ref = naive_metrics(x, labels, x, labels, self_excluded=True, ks=(1, 3, 30))
    rec = recall_at_k(nl, labels, [1, 3, 30])
    assert rec == {k: pytest.approx(ref[f"recall@{k}"], abs=1e-12) for k in (1, 3, 30)}
    assert map_at_r(nl, labels, r) == pytest.approx(ref["map@r"], abs=1e-12)
    with pytest.raises(ValueError, match="K=31"):
        recall_at_k(nl, labels, [31])


def test_map_at_r_hand_computed():
    # Musgrave et al. 2020: R = 10, relevant items at ranks 1 and 3 -> (1 + 2/3) / 10
    nl = torch.tensor([[1, 0, 1, 0, 0, 0, 0, 0, 0, 0, 1, 1]])
    assert map_at_r(nl, torch.tensor([1]), torch.tensor([10])) == pytest.approx((1 + 2 / 3) / 10)
    # all first R relevant -> 1; R = 0 queries are skipped; items beyond R do not count
    nl2 = torch.tensor([[1, 1, 0, 1], [2, 2, 2, 2], [3, 0, 0, 3]])
    r2 = torch.tensor([2, 0, 2])
    assert map_at_r(nl2, torch.tensor([1, 5, 3]), r2) == pytest.approx((1.0 + 0.5) / 2)
    with pytest.raises(ValueError, match="r=5"):
        map_at_r(nl2, torch.tensor([1, 5, 3]), torch.tensor([5, 0, 1]))
    with pytest.raises(ValueError, match="all r are 0"):
        map_at_r(nl2, torch.tensor([1, 5, 3]), torch.zeros(3, dtype=torch.int64))


def test_recall_k_larger_than_gallery_raises():
    x, labels = random_embeddings(20)
    with pytest.raises(ValueError, match=r"Recall@20.*20 items.*<= 19"):
        evaluate(x, labels, recall_ks=(1, 20), compute_nmi=False)
    out = evaluate(
        x[:5], labels[:5], query=x, query_labels=labels, recall_ks=(5,), compute_nmi=False, compute_map_at_r=False
    )
    assert set(out) == {"recall@5"}
    with pytest.raises(ValueError, match=r"Recall@6.*5 items"):
        evaluate(x[:5], labels[:5], query=x, query_labels=labels, recall_ks=(6,), compute_nmi=False)


def test_bad_evaluate_inputs_raise():
    x, labels = random_embeddings(20)
    with pytest.raises(ValueError, match="one label per embedding"):
        evaluate(x, labels[:10])
    with pytest.raises(ValueError, match="integer"):
        evaluate(x, labels.float())
    with pytest.raises(ValueError, match="both query and query_labels"):
        evaluate(x, labels, query=x)


def separated_embeddings(n_classes=6, per_class=10, dim=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n_classes).repeat_interleave(per_class)
    x = torch.zeros(len(labels), dim)
    x[torch.arange(len(labels)), labels] = 1.0
    x = F.normalize(x + 0.01 * torch.randn(x.shape, generator=g), dim=1)
    return x, labels


@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_nmi_of_separated_embeddings_is_one(backend):
    x, labels = separated_embeddings()
    assert nmi(x, labels, backend=backend) == pytest.approx(1.0)


def test_evaluate_perfect_embeddings():
    x, labels = separated_embeddings()
    out = evaluate(x, labels)
    assert list(out) == ["recall@1", "recall@2", "recall@4", "recall@8", "map@r", "nmi"]
    for value in out.values():
        assert value == pytest.approx(1.0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_evaluate_on_cuda_matches_cpu():
    x, labels = random_embeddings(300, seed=10)
    cpu = evaluate(x, labels, chunk_size=64, compute_nmi=False)
    gpu = evaluate(x.cuda(), labels.cuda(), chunk_size=64, compute_nmi=False)
    for key in cpu:
        assert gpu[key] == pytest.approx(cpu[key], abs=1e-6), key
    xs, ls = separated_embeddings()
    assert nmi(xs.cuda(), ls.cuda()) == pytest.approx(1.0)


# ---------------------------------------------------------------------- exact order beyond float32


def near_tied_embeddings(n=120, spread=6, n_classes=6, seed=11):
    """Rows (a, b, t): integers a in 10 +- spread, b in 0 +- spread, and t = (i + 1) 2^-22. Inner products
    are an integer plus (i + 1)(j + 1) 2^-44 (below 2^-29 here), exact in float64 and all distinct there,
    while float32 rounds a non-zero integer plus it to the integer: each group of equal integer parts is a
    run of float32 ties in a fixed float64 order."""
    g = torch.Generator().manual_seed(seed)
    ab = torch.randint(-spread, spread + 1, (n, 2), generator=g).double() + torch.tensor([10.0, 0.0])
    t = (torch.arange(n, dtype=torch.float64) + 1) * 2.0**-22
    x = torch.cat([ab, t.unsqueeze(1)], dim=1).float()
    assert torch.equal(x.double(), torch.cat([ab, t.unsqueeze(1)], dim=1))  # exact in float32
    return x, torch.randint(n_classes, (n,), generator=g)


@pytest.fixture(params=[True, False], ids=["tiled", "chunked"])
def tiled(request, monkeypatch):
    """All-against-all searches on the CPU through _self_knn (tiles of the upper triangle) or knn, whatever
    _tiled would choose for the size."""
    import udml.evaluation as ev

    monkeypatch.setattr(ev, "_tiled", lambda n, k, tile: request.param)
    return request.param


def float64_calls(monkeypatch):
    """Record the dtype of every knn call evaluate makes."""
    import udml.evaluation as ev

    calls, real = [], ev.knn
    monkeypatch.setattr(ev, "knn", lambda q, g, k, **kw: calls.append(q.dtype) or real(q, g, k, **kw))
    return calls


@pytest.mark.parametrize("chunk_size", [1, 16, 50, 4096])
def test_near_ties_below_float32_are_ordered_as_float64(chunk_size, tiled, monkeypatch):
    x, labels = near_tied_embeddings()
    s32, s64 = x @ x.T, x.double() @ x.double().T
    assert len(torch.unique(s32[0])) < len(torch.unique(s64[0]))  # float32 alone cannot order the runs
    calls = float64_calls(monkeypatch)
    got = evaluate(x, labels, recall_ks=(1, 2, 4, 8), compute_nmi=False, chunk_size=chunk_size)
    ref = naive_metrics(x, labels, x, labels, self_excluded=True, ks=(1, 2, 4, 8))
    for key in ref:
        assert got[key] == pytest.approx(ref[key], abs=1e-12), key
    assert torch.float64 not in calls  # short runs: re-ordered among the candidates, no float64 search


def test_near_ties_longer_than_the_candidates_are_searched_again_in_float64(tiled, monkeypatch):
    x, labels = near_tied_embeddings(n=80, spread=0)  # every inner product ties in float32
    calls = float64_calls(monkeypatch)
    got = evaluate(x, labels, recall_ks=(1, 5), compute_nmi=False, chunk_size=32)
    ref = naive_metrics(x, labels, x, labels, self_excluded=True, ks=(1, 5))
    for key in ref:
        assert got[key] == pytest.approx(ref[key], abs=1e-12), key
    assert torch.float64 in calls


def test_near_ties_in_query_gallery_mode():
    x, labels = near_tied_embeddings(n=150, seed=12)
    q, ql, g, gl = x[:40], labels[:40], x[40:], labels[40:]
    got = evaluate(g, gl, query=q, query_labels=ql, recall_ks=(1, 3), compute_nmi=False, chunk_size=16)
    ref = naive_metrics(q, ql, g, gl, self_excluded=False, ks=(1, 3))
    for key in ref:
        assert got[key] == pytest.approx(ref[key], abs=1e-12), key


@pytest.mark.parametrize("chunk_size", [1, 7, 64, 149, 150, 10_000])
def test_every_tiling_gives_the_float64_metrics(chunk_size, tiled):
    x, labels = random_embeddings(150, dim=16, n_classes=12, seed=13)
    got = evaluate(x, labels, recall_ks=(1, 2, 4, 8), compute_nmi=False, chunk_size=chunk_size)
    ref = naive_metrics(x, labels, x, labels, self_excluded=True, ks=(1, 2, 4, 8))
    for key in ref:
        assert got[key] == pytest.approx(ref[key], abs=1e-12), key
    if chunk_size == 64:  # float64 inputs are computed in float64 without the re-check
        assert evaluate(x.double(), labels, compute_nmi=False, chunk_size=chunk_size) == pytest.approx(
            evaluate(x, labels, compute_nmi=False, chunk_size=chunk_size), abs=1e-12
        )


@pytest.mark.parametrize("tile", [1, 3, 16, 37, 64, 200])
def test_self_knn_tiles_give_the_brute_force_top_k(tile):
    from udml.evaluation import _self_knn

    g = torch.Generator().manual_seed(14)
    x = torch.randint(-3, 4, (64, 4), generator=g).float()  # small integers: exact similarities, many ties
    x[10] = x[3]  # duplicates at other indices are found
    sims, idx = _self_knn(x, 9, tile)
    full = x.double() @ x.double().T
    for i in range(64):
        row = torch.cat([full[i, :i], full[i, i + 1 :]])
        assert sims[i].double().tolist() == row.sort(descending=True).values[:9].tolist()
        assert len(set(idx[i].tolist())) == 9 and i not in idx[i].tolist()
        assert full[i, idx[i]].tolist() == sims[i].double().tolist()


@pytest.mark.parametrize("self_search", [True, False])
def test_exact_neighbours_follow_the_float64_order(self_search, tiled):
    from udml.evaluation import _exact_neighbours

    x, _ = near_tied_embeddings()
    q = x if self_search else x[:30]
    idx = _exact_neighbours(q, x, 10, self_search=self_search, chunk_size=16)
    s64 = q.double() @ x.double().T
    if self_search:
        s64.fill_diagonal_(float("-inf"))
    assert torch.equal(idx, s64.topk(10, dim=1).indices)  # float64 similarities are distinct: one order


def test_tiled_search_matches_brute_force_on_random_sets(monkeypatch):
    """test_properties' all-against-all check, every search through _self_knn (on these sizes _tiled would
    choose knn): random sizes, ties, duplicates, single-image classes, tiles of 1 to 16."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st
    from test_properties import check_against_brute_force, embedded_set

    import udml.evaluation as ev

    monkeypatch.setattr(ev, "_tiled", lambda n, k, tile: True)

    @settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(data=embedded_set(), ks=st.lists(st.integers(1, 13), min_size=1, max_size=3), chunk=st.integers(1, 16))
    def check(data, ks, chunk):
        x, labels = data
        ks = sorted({min(k, x.shape[0] - 1) for k in ks})
        has_pair = any((labels == c).sum() >= 2 for c in labels.unique())
        got = evaluate(x, labels, recall_ks=ks, compute_nmi=False, compute_map_at_r=has_pair, chunk_size=chunk)
        check_against_brute_force(got, x, labels, x, labels, True, ks)

    check()
