import numpy as np
import pytest
import torch

from udml import clustering
from udml.clustering import KMeansResult, assignment_nmi, faiss_available, kmeans

BACKENDS = [
    "torch",
    pytest.param("faiss", marks=pytest.mark.skipif(not faiss_available(), reason="faiss not installed")),
]


def make_blobs(n_per=100, n_blobs=5, dim=16, spread=10.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(n_blobs, dim, generator=g) * spread
    truth = torch.arange(n_blobs).repeat_interleave(n_per)
    x = centers[truth] + torch.randn(n_blobs * n_per, dim, generator=g)
    return x, truth, centers


def brute_labels(x, centroids):
    return torch.cdist(x.double(), centroids.double()).argmin(dim=1)


@pytest.mark.parametrize("backend", BACKENDS)
def test_recovers_separated_blobs(backend):
    x, truth, _ = make_blobs()
    res = kmeans(x, 5, backend=backend, seed=0)
    assert res.backend == backend
    assert res.labels.dtype == torch.int64 and res.labels.shape == (500,)
    assert res.centroids.dtype == torch.float32 and res.centroids.shape == (5, 16)
    assert res.labels.device.type == "cpu" and res.centroids.device.type == "cpu"
    assert assignment_nmi(res.labels, truth) == pytest.approx(1.0)
    # centroids are the blob means
    for c in range(5):
        members = x[res.labels == c]
        torch.testing.assert_close(res.centroids[c], members.mean(0), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_labels_and_inertia_match_final_centroids(backend):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(800, 12, generator=g)  # no structure: many points move between clusters
    res = kmeans(x, 20, niter=3, backend=backend, seed=3)
    assert torch.equal(res.labels, brute_labels(x, res.centroids))
    d2 = ((x.double() - res.centroids.double()[res.labels]) ** 2).sum()
    assert res.inertia == pytest.approx(float(d2), rel=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_warm_start_uses_init_centroids(backend):
    x, truth, centers = make_blobs()
    # Centre i starts at blob i, so cluster ids must equal blob ids (a fresh init would permute).
    res = kmeans(x, 5, init_centroids=centers + 0.5, niter=5, backend=backend)
    assert torch.equal(res.labels, truth)
    # numpy input and numpy init are accepted too
    res_np = kmeans(x.numpy(), 5, init_centroids=(centers + 0.5).numpy(), niter=5, backend=backend)
    assert torch.equal(res_np.labels, truth)


def test_auto_backend_choice():
    x, _, _ = make_blobs(n_per=20)
    expected = "faiss" if faiss_available() else "torch"
    assert kmeans(x, 5).backend == expected
    assert kmeans(x, 5, device="cpu").backend == expected


def test_duplicate_init_centroids_are_reseeded():
    x, truth, centers = make_blobs()
    # Five identical centres: float rounding decides which copies win the ties, but most copies
    # get no point at all and must be re-seeded.
    init = centers[:1].repeat(5, 1)
    res = kmeans(x, 5, init_centroids=init, backend="torch")
    assert res.n_reseeded >= 1
    assert int((res.sizes() == 0).sum()) == 0
    assert res.stats()["empty"] == 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_far_away_centre_is_reseeded(backend):
    x, truth, centers = make_blobs()
    init = centers.clone()
    init[2] = 1e4  # no point is ever assigned to it
    res = kmeans(x, 5, init_centroids=init, backend=backend)
    assert res.n_reseeded >= 1
    assert int((res.sizes() == 0).sum()) == 0
    assert bool((res.centroids.abs() < 1e3).all())


def test_update_reseeds_with_farthest_point_and_removes_it_from_donor():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(30, 4, generator=g)
    centroids = torch.stack([x[:15].mean(0), x[15:].mean(0), torch.full((4,), 100.0)])
    labels, d2 = clustering._assign(x, centroids)
    assert int((labels == 2).sum()) == 0
    new, n_new = clustering._update(x, labels, d2, centroids)
    assert n_new == 1
    far = int(torch.argmax(d2))
    torch.testing.assert_close(new[2], x[far])
    donor = int(labels[far])
    keep = (labels == donor) & (torch.arange(30) != far)
    torch.testing.assert_close(new[donor], x[keep].mean(0))
    other = 1 - donor
    torch.testing.assert_close(new[other], x[labels == other].mean(0))


def test_chunked_assignment_matches_cdist():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1000, 32, generator=g)
    c = torch.randn(37, 32, generator=g)
    ref = torch.cdist(x.double(), c.double())
    for chunk_rows in (1, 64, 999, 5000):
        labels, d2 = clustering._assign(x, c, chunk_rows=chunk_rows)
        assert torch.equal(labels, ref.argmin(1))
        torch.testing.assert_close(d2.double(), ref.min(1).values ** 2, atol=1e-3, rtol=1e-4)


def test_bfloat16_candidates_reranked_in_float32_match_the_exact_assignment():
    g = torch.Generator().manual_seed(0)
    x = torch.nn.functional.normalize(torch.randn(3000, 64, generator=g), dim=1)
    c = x[:500] + 0.05 * torch.randn(500, 64, generator=g)  # many close centroids: near-ties
    ref = torch.cdist(x.double(), c.double())
    for chunk_rows in (7, 1000, 5000):
        labels, d2 = clustering._assign(x, c, chunk_rows=chunk_rows, x_low=x.bfloat16())
        assert torch.equal(labels, ref.argmin(1))
        torch.testing.assert_close(d2.double(), ref.min(1).values ** 2, atol=1e-4, rtol=1e-4)


def test_default_chunk_is_bounded_for_large_k():
    k = 10_000
    rows = max(1, clustering._CHUNK_BYTES // (4 * k))
    assert rows * k * 4 <= 256 * 2**20
    assert rows > 1000  # big enough for a fast matmul


def test_small_chunks_give_same_kmeans(monkeypatch):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(600, 8, generator=g)
    full = kmeans(x, 10, backend="torch", seed=5)
    monkeypatch.setattr(clustering, "_CHUNK_BYTES", 4 * 10 * 64)  # 64-row chunks
    chunked = kmeans(x, 10, backend="torch", seed=5)
    assert torch.equal(full.labels, chunked.labels)
    torch.testing.assert_close(full.centroids, chunked.centroids)


def test_torch_backend_is_deterministic():
    g = torch.Generator().manual_seed(4)
    x = torch.randn(700, 10, generator=g)
    a = kmeans(x, 15, backend="torch", seed=7)
    b = kmeans(x, 15, backend="torch", seed=7)
    assert torch.equal(a.labels, b.labels)
    assert torch.equal(a.centroids, b.centroids)
    assert a.inertia == b.inertia
    c = kmeans(x, 15, backend="torch", seed=8)
    assert not torch.equal(a.centroids, c.centroids)


def test_large_k_uses_random_distinct_init():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2500, 4, generator=g)
    res = kmeans(x, 1100, niter=2, backend="torch")
    assert res.centroids.shape == (1100, 4)
    assert int((res.sizes() == 0).sum()) == 0
    assert torch.equal(res.labels, brute_labels(x, res.centroids))


def test_kmeans_plus_plus_picks_distinct_data_points():
    x, _, _ = make_blobs(n_per=30)
    x_sq = (x * x).sum(1)
    gen = torch.Generator().manual_seed(0)
    c = clustering._kmeans_plus_plus(x, x_sq, 5, gen)
    # each centre is a data point, and with separated blobs k-means++ hits every blob
    idx = brute_labels(c, x)
    torch.testing.assert_close(x[idx], c)
    assert len(set((idx // 30).tolist())) == 5


@pytest.mark.parametrize("k", [0, 1, 501])
def test_bad_k_raises_helpful_error(k):
    x, _, _ = make_blobs()
    with pytest.raises(ValueError, match=rf"k={k}.*N=500"):
        kmeans(x, k)


def test_bad_inputs_raise():
    x, _, _ = make_blobs()
    with pytest.raises(ValueError, match="2-D"):
        kmeans(x[0], 2)
    bad = x.clone()
    bad[3, 1] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        kmeans(bad, 5)
    with pytest.raises(ValueError, match=r"\[5, 16\]"):
        kmeans(x, 5, init_centroids=torch.zeros(4, 16))
    with pytest.raises(ValueError, match="backend"):
        kmeans(x, 5, backend="sklearn")


def test_forcing_missing_faiss_raises_import_error(monkeypatch):
    monkeypatch.setattr(clustering, "faiss_available", lambda: False)
    x, _, _ = make_blobs(n_per=10)
    with pytest.raises(ImportError, match="pip install faiss-cpu.*backend='torch'"):
        kmeans(x, 5, backend="faiss")
    assert kmeans(x, 5).backend == "torch"  # auto falls back


def test_stats_and_sizes():
    res = KMeansResult(
        labels=torch.tensor([0, 0, 2, 2, 2]),
        centroids=torch.zeros(4, 3),
        inertia=1.5,
        backend="torch",
        n_reseeded=2,
        iterations=7,
    )
    assert res.sizes().tolist() == [2, 0, 3, 0]
    assert res.stats() == {
        "k": 4,
        "empty": 2,
        "min": 0,
        "median": 1.0,
        "max": 3,
        "inertia": 1.5,
        "backend": "torch",
        "iterations": 7,
        "n_reseeded": 2,
    }


def test_assignment_nmi():
    a = np.array([0, 0, 1, 1, 2, 2])
    assert assignment_nmi(a, np.array([5, 5, 3, 3, 9, 9])) == pytest.approx(1.0)
    assert assignment_nmi(torch.tensor(a), torch.tensor([0, 1, 0, 1, 0, 1])) == pytest.approx(0.0)
    with pytest.raises(ValueError, match="same length"):
        assignment_nmi(a, a[:5])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_torch_backend_on_cuda_matches_blobs():
    x, truth, _ = make_blobs()
    res = kmeans(x.cuda(), 5, seed=0)
    assert res.backend == "torch"
    assert res.labels.device.type == "cpu"
    assert assignment_nmi(res.labels, truth) == pytest.approx(1.0)


@pytest.mark.parametrize("backend", ["torch", "faiss"])
def test_iterations_run_are_reported(backend):
    if backend == "faiss":
        pytest.importorskip("faiss")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2000, 8, generator=g)
    res = kmeans(x, 20, niter=40, backend=backend)
    assert 1 <= res.iterations <= 40
    assert kmeans(x, 20, niter=1, backend=backend).iterations == 1


def naive_spherical_kmeans(x, init, niter):
    """Cosine k-means written plainly: unit rows, argmax cosine, mean, renormalise."""
    x = x.double() / x.double().norm(dim=1, keepdim=True)
    c = init.double() / init.double().norm(dim=1, keepdim=True)
    for _ in range(niter):
        labels = (x @ c.T).argmax(1)
        c = torch.stack([x[labels == j].mean(0) if (labels == j).any() else c[j] for j in range(len(c))])
        c = c / c.norm(dim=1, keepdim=True)
    return (x @ c.T).argmax(1), c


@pytest.mark.parametrize("backend", BACKENDS)
def test_spherical_kmeans_matches_a_naive_reference(backend):
    # directions in clusters, lengths all over the place (like raw pooled features, norms 7-18)
    x, _, centers = make_blobs(n_per=60, n_blobs=6, dim=12, spread=3.0, seed=3)
    x = x * torch.empty(len(x), 1).uniform_(0.2, 20, generator=torch.Generator().manual_seed(1))
    init = x[torch.arange(0, len(x), 60)] + 0.1
    res = kmeans(x, 6, init_centroids=init, niter=8, backend=backend, spherical=True)
    labels, c = naive_spherical_kmeans(x, init, res.iterations)
    assert torch.equal(res.labels, labels)
    torch.testing.assert_close(res.centroids.norm(dim=1), torch.ones(6), atol=1e-5, rtol=0)
    torch.testing.assert_close(res.centroids.double(), c, atol=1e-5, rtol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_spherical_kmeans_ignores_the_lengths_of_the_rows(backend):
    x, _, _ = make_blobs(n_per=50, n_blobs=8, dim=16, spread=2.0, seed=4)
    scale = torch.empty(len(x), 1).uniform_(0.1, 50, generator=torch.Generator().manual_seed(2))
    a = kmeans(x, 8, seed=5, backend=backend, spherical=True)
    b = kmeans(x * scale, 8, seed=5, backend=backend, spherical=True)
    assert torch.equal(a.labels, b.labels)


def test_confident_members_keep_each_clusters_images_nearest_its_centre_as_a_loop_does():
    gen = torch.Generator().manual_seed(0)
    x = torch.nn.functional.normalize(torch.randn(300, 16, generator=gen), dim=1)
    result = kmeans(x, 12, niter=10, seed=0, backend="torch", spherical=True)
    labels, centroids = result.labels, result.centroids
    for fraction, at_least in ((0.5, 1), (0.3, 5), (1.0, 1), (0.01, 3)):
        keep = clustering.confident_members(x, labels, centroids, fraction, at_least)
        expected = torch.zeros(len(x), dtype=torch.bool)
        c = torch.nn.functional.normalize(centroids, dim=1)
        for k in range(len(c)):
            members = torch.nonzero(labels == k).flatten().tolist()
            similarity = {i: float(x[i] @ c[k]) for i in members}
            quota = max(at_least, int(np.ceil(len(members) * fraction)))
            for i in sorted(members, key=lambda i: -similarity[i])[:quota]:
                expected[i] = True
        assert torch.equal(keep, expected), (fraction, at_least)
    assert clustering.confident_members(x, labels, centroids, 0.5).sum() < len(x)
    with pytest.raises(ValueError, match="confident_fraction must be in"):
        clustering.confident_members(x, labels, centroids, 0.0)
