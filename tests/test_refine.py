"""udml.refine (the collection's own neighbours: DBA and query expansion) against brute-force references, its
incremental updates against a full recomputation, and its use by udml embed / index / search / cluster."""

import json

import numpy as np
import pytest
from conftest import CUB_CLASSES, change_collection, cub_photos

from udml.cli import main
from udml.embeddings import Embeddings, load_embeddings
from udml.index import expand_queries, load_index
from udml.refine import Refinement, augment, neighbour_graph, refine, refine_collection, update_graph


def unit_rows(n, d=6, seed=0):
    x = np.random.default_rng(seed).normal(size=(n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def brute_graph(x, k):
    s = x.astype(np.float64) @ x.T.astype(np.float64)
    np.fill_diagonal(s, -np.inf)
    rows = np.argsort(-s, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(s, rows, 1), rows


def brute_dba(x, k, alpha):
    s, rows = brute_graph(x, k)
    out = []
    for i in range(len(x)):
        v = x[i].astype(np.float64).copy()
        for j, sim in zip(rows[i], s[i]):
            v += max(sim, 0.0) ** alpha * x[j]
        out.append(v / np.linalg.norm(v))
    return np.array(out)


@pytest.mark.parametrize("k, alpha", [(1, 0.0), (5, 1.0), (8, 3.0)])
def test_graph_and_dba_match_brute_force(k, alpha):
    x = unit_rows(60)
    sims, rows = neighbour_graph(x, k)
    ref_s, ref_rows = brute_graph(x, k)
    np.testing.assert_array_equal(rows, ref_rows)
    np.testing.assert_allclose(sims, ref_s, atol=1e-6)
    refined, _, _ = refine(x, Refinement(k, alpha))
    np.testing.assert_allclose(refined, brute_dba(x, k, alpha), atol=1e-6)
    assert not (rows == np.arange(60)[:, None]).any()  # never itself, even with an exact duplicate elsewhere


def test_an_exact_duplicate_is_a_neighbour_and_the_row_itself_is_not():
    x = unit_rows(10)
    x[3] = x[7]
    _, rows = neighbour_graph(x, 2)
    assert rows[3, 0] == 7 and rows[7, 0] == 3 and 3 not in rows[3] and 7 not in rows[7]


def test_query_expansion_matches_a_loop():
    import faiss

    gallery, queries = unit_rows(40, seed=1), unit_rows(5, seed=2)
    index = faiss.IndexFlatIP(6)
    index.add(gallery)
    got = expand_queries(index, queries, 4, 2.0)
    for q, row in zip(queries, got):
        near = np.argsort(-(gallery @ q))[:4]
        v = q.astype(np.float64) + sum(max(float(gallery[j] @ q), 0) ** 2 * gallery[j] for j in near)
        np.testing.assert_allclose(row, v / np.linalg.norm(v), atol=1e-6)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_an_incremental_update_equals_a_full_recomputation(seed):
    rng = np.random.default_rng(seed)
    old = unit_rows(80, seed=seed)
    sims, rows = neighbour_graph(old, 5)
    keep = np.sort(rng.choice(80, 70, replace=False))  # 10 removed
    new = np.concatenate([old[keep], unit_rows(15, seed=seed + 10)])  # 15 added
    old_to_new = np.full(80, -1)
    old_to_new[keep] = np.arange(70)
    got_s, got_rows, changed = update_graph(new, sims, rows, old_to_new, 5)
    ref_s, ref_rows = neighbour_graph(new, 5)
    np.testing.assert_array_equal(got_rows, ref_rows)
    np.testing.assert_allclose(got_s, ref_s, atol=1e-6)
    mapped = old_to_new[rows[keep]]
    assert set(changed) == set(np.flatnonzero((ref_rows[:70] != mapped).any(1))) | set(range(70, 85))
    # through the embeddings files: the kept rows' refined vectors are reused, the result is the same
    paths = [f"/p/{i}.jpg" for i in range(80)]
    stamps = np.stack([np.arange(80), np.zeros(80)], 1).astype(np.int64)
    before = refine_collection(Embeddings(old, paths, {}, stamps=stamps), Refinement(5, 1.0))
    after_paths = [paths[i] for i in keep] + [f"/q/{i}.jpg" for i in range(15)]
    after_stamps = np.concatenate([stamps[keep], np.ones((15, 2), dtype=np.int64)])
    after = Embeddings(new, after_paths, {}, stamps=after_stamps)
    updated = refine_collection(after, Refinement(5, 1.0), previous=before)
    full = refine_collection(after, Refinement(5, 1.0))
    assert updated.changes["refined_again"] == len(changed) < full.changes["refined_again"] == 85
    np.testing.assert_allclose(updated.refined, full.refined, atol=1e-6)


def test_augment_weights_and_normalises():
    x = unit_rows(3)
    out = augment(x, np.array([[0.5], [-0.2], [1.0]], dtype=np.float32), np.array([[1], [2], [0]]), 2.0)
    ref = x[0] + 0.25 * x[1]
    np.testing.assert_allclose(out[0], ref / np.linalg.norm(ref), atol=1e-6)
    np.testing.assert_allclose(out[1], x[1], atol=1e-6)  # a negative similarity adds nothing


def test_embed_refine_index_search_cluster_and_update(tmp_path, model_file, capsys):
    photos = cub_photos(tmp_path / "photos", CUB_CLASSES, 6, copy=True)
    out, idx = tmp_path / "p.npz", tmp_path / "p.faiss"
    embed = ["embed", str(model_file), str(photos), "-o", str(out), "--device", "cpu", "--workers", "0"]
    assert main([*embed, "--refine", "--refine-k", "3", "--refine-alpha", "1"]) == 0
    assert "refined by the collection's own neighbours: each embedding averaged with its 3 nearest" in (
        capsys.readouterr().out
    )
    emb = load_embeddings(out)
    assert emb.meta["refine"] == {"kind": "dba", "k": 3, "alpha": 1.0}
    np.testing.assert_allclose(emb.refined, brute_dba(emb.embeddings, 3, 1.0), atol=1e-5)
    assert main(["index", str(out), "-o", str(idx)]) == 0
    assert "refined" in capsys.readouterr().out
    index, paths, meta = load_index(idx)
    np.testing.assert_allclose(index.reconstruct_batch(np.arange(len(paths))), emb.refined, atol=0)
    query = sorted((photos / CUB_CLASSES[1]).iterdir())[0]
    assert main(["search", str(idx), str(query), "-k", "3", "--json", str(tmp_path / "hits.json")]) == 0
    assert "queries expanded by their 3 nearest indexed images" in capsys.readouterr().err
    assert len(json.loads((tmp_path / "hits.json").read_text())[0]["results"]) == 3
    assert main(["cluster", str(out), "-o", str(tmp_path / "g.json"), "--k", "3"]) == 0
    assert json.loads((tmp_path / "g.json").read_text())["refined"]["k"] == 3
    # the collection changes: the update stays refined, equal to refining the new state from scratch
    change_collection(photos)
    assert main(embed) == 0
    updated = load_embeddings(out)
    full = refine_collection(updated, Refinement(3, 1.0))
    np.testing.assert_allclose(updated.refined, full.refined, atol=1e-5)
    assert main(["index", str(out), "-o", str(idx)]) == 0
    index, paths, _ = load_index(idx)
    assert sorted(paths) == sorted(updated.paths)
    by_path = dict(zip(updated.paths, updated.refined))
    np.testing.assert_allclose(index.reconstruct_batch(np.arange(len(paths))), [by_path[p] for p in paths], atol=0)
    # --no-refine drops it
    assert main([*embed, "--no-refine"]) == 0
    assert load_embeddings(out).refined is None


@pytest.mark.parametrize("k, alpha", [(1, 1.0), (5, 3.0), (8, 0.0)])
def test_the_training_targets_neighbour_averaging_is_the_collections_refinement(k, alpha):
    """target_neighbours (udml.pseudolabels.neighbour_averaged, in torch for the training loop) computes what
    udml.refine.refine does for a collection (faiss and numpy), on the same rows."""
    import torch

    from udml.pseudolabels import neighbour_averaged

    rng = np.random.default_rng(0)
    x = rng.standard_normal((300, 16)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    expected, _, _ = refine(x, Refinement(k, alpha))
    got = neighbour_averaged(torch.from_numpy(x), k, alpha).numpy()
    np.testing.assert_allclose(got, expected, atol=1e-5)
    np.testing.assert_array_equal(neighbour_averaged(torch.from_numpy(x), 0, alpha).numpy(), x)
