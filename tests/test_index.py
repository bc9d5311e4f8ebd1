"""faiss indexes (udml.index): exact and approximate search against brute force, the index files, and `udml index`
updating an index as the collection changes (real CUB photos)."""

import json
import os
from pathlib import Path

import numpy as np
import pytest
from conftest import change_collection

from udml.cli import main
from udml.embeddings import load_embeddings, save_embeddings
from udml.index import build_index, load_index, save_index, search


def brute_force(x: np.ndarray, q: np.ndarray, k: int):
    s = q.astype(np.float64) @ x.astype(np.float64).T
    order = np.argsort(-s, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(s, order, 1), order


@pytest.mark.parametrize("kind", ["flat", "ivf1"])
def test_exact_indexes_equal_brute_force(embedded, kind):
    x = embedded.embeddings
    # one inverted list holds everything: IVF is then exact too
    index = build_index(x, "flat") if kind == "flat" else build_index(x, "ivf", nlist=1)
    q = x[::17]
    got = search(index, embedded.paths, q, k=8)
    ref_s, ref_i = brute_force(x, q, 8)
    for row, ss, ii in zip(got, ref_s, ref_i):
        assert [r["rank"] for r in row] == list(range(1, 9))
        np.testing.assert_allclose([r["score"] for r in row], ss, atol=1e-5)
        # ties aside, the same images in the same order
        assert [r["path"] for r in row][:3] == [embedded.paths[i] for i in ii][:3]


def test_approximate_indexes_find_most_true_neighbours(embedded):
    x = embedded.embeddings
    _, ref = brute_force(x, x, 10)
    for kind in ("ivf", "hnsw"):
        index = build_index(x, kind)
        _, ids = index.search(x, 10)
        recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(ids, ref)])
        assert recall > 0.9, (kind, recall)


def test_search_leaves_out_the_query_file(embedded):
    index = build_index(embedded.embeddings)
    q = embedded.paths[5]
    res = search(index, embedded.paths, embedded.embeddings[[5]], k=3, query_paths=[q])[0]
    assert len(res) == 3 and q not in [r["path"] for r in res]
    kept = search(index, embedded.paths, embedded.embeddings[[5]], k=3, query_paths=[q], keep_self=True)[0]
    assert kept[0]["path"] == q and kept[0]["score"] == pytest.approx(1, abs=1e-5)
    assert [r["path"] for r in kept[1:]] == [r["path"] for r in res[:2]]
    with pytest.raises(ValueError, match="dimension"):
        search(index, embedded.paths, np.zeros((1, 5), np.float32), k=3)
    assert len(search(index, embedded.paths, embedded.embeddings[:1], k=10_000)[0]) == len(embedded.paths)


def test_index_files_round_trip_and_must_stay_together(tmp_path, embedded):
    for kind in ("flat", "ivf", "hnsw"):
        path = tmp_path / f"{kind}.faiss"
        save_index(path, build_index(embedded.embeddings, kind), embedded, kind)
        index, paths, meta = load_index(path)
        assert index.ntotal == len(paths) == len(embedded.paths) and meta == embedded.meta
    os.remove(tmp_path / "flat.faiss.json")
    with pytest.raises(FileNotFoundError, match="flat.faiss.json is missing"):
        load_index(tmp_path / "flat.faiss")
    (tmp_path / "ivf.faiss.json").write_text(json.dumps({"paths": ["a"]}))
    with pytest.raises(ValueError, match="not written together"):
        load_index(tmp_path / "ivf.faiss")


# --------------------------------------------------------------------------- updates as the collection changes


def test_an_index_write_killed_half_way_leaves_the_previous_index(changing_photos, model_file, tmp_path, monkeypatch):
    """The index goes through the package's one atomic write: a kill while faiss writes it leaves the previous
    index (and its paths file) as they were, and no temporary file."""
    import faiss

    emb, idx = tmp_path / "photos.npz", tmp_path / "photos.faiss"
    assert main(["embed", str(model_file), str(changing_photos), "-o", str(emb), "--device", "cpu"]) == 0
    assert main(["index", str(emb), "-o", str(idx)]) == 0
    before, sidecar = idx.read_bytes(), Path(f"{idx}.json").read_text()
    change_collection(changing_photos)
    assert main(["embed", str(model_file), str(changing_photos), "-o", str(emb), "--device", "cpu"]) == 0
    real = faiss.write_index

    def killed(index, writer):
        real(index, writer)  # the whole index reaches the temporary file, then the process is stopped
        raise KeyboardInterrupt

    monkeypatch.setattr(faiss, "write_index", killed)
    with pytest.raises(KeyboardInterrupt):
        main(["index", str(emb), "-o", str(idx)])
    assert idx.read_bytes() == before and Path(f"{idx}.json").read_text() == sidecar
    assert sorted(os.listdir(tmp_path)) == ["photos", "photos.faiss", "photos.faiss.json", "photos.npz"]


@pytest.mark.parametrize("kind", [[], ["--ivf", "1"], ["--hnsw", "8"]], ids=["flat", "ivf", "hnsw"])
def test_index_update_keeps_ids_and_never_returns_a_removed_image(changing_photos, model_file, tmp_path, kind, capsys):
    emb, idx = tmp_path / "photos.npz", tmp_path / "photos.faiss"
    assert main(["embed", str(model_file), str(changing_photos), "-o", str(emb), "--device", "cpu"]) == 0
    assert main(["index", str(emb), "-o", str(idx), *kind]) == 0
    first = json.loads(Path(f"{idx}.json").read_text())
    what = change_collection(changing_photos)
    assert main(["embed", str(model_file), str(changing_photos), "-o", str(emb), "--device", "cpu"]) == 0
    capsys.readouterr()
    assert main(["index", str(emb), "-o", str(idx), *kind]) == 0
    assert "updated: 9 kept, 4 added, 3 removed" in capsys.readouterr().out
    second = json.loads(Path(f"{idx}.json").read_text())
    id_of = dict(zip(first["paths"], first["ids"]))
    for p, i in zip(second["paths"], second["ids"]):
        if p in id_of and p != what["changed"]:
            assert i == id_of[p]  # an unchanged image keeps its ID
        else:
            assert i >= first["next_id"]  # new and changed images get new IDs, never a retired one
    stored = load_embeddings(emb)
    index, paths, _ = load_index(idx)
    assert sorted(paths) == sorted(stored.paths) and index.ntotal == len(stored.paths)
    # every stored image finds itself first; the removed image's old vector is gone from the index
    hits = search(index, paths, stored.embeddings, k=3)
    vectors = dict(zip(stored.paths, stored.embeddings))
    for p, rows in zip(stored.paths, hits):
        assert rows[0]["path"] == p or rows[0]["score"] == pytest.approx(1.0, abs=1e-5)
        assert what["removed"] not in [r["path"] for r in rows]
        for r in rows:
            assert r["score"] == pytest.approx(float(vectors[p] @ vectors[r["path"]]), abs=1e-5)
    # nothing changed: nothing to do
    capsys.readouterr()
    assert main(["index", str(emb), "-o", str(idx), *kind]) == 0
    assert "updated: 13 kept, 0 added, 0 removed" in capsys.readouterr().out
    # another kind rebuilds, and says why
    other = [] if kind else ["--hnsw", "8"]
    assert main(["index", str(emb), "-o", str(idx), *other]) == 0
    assert "rebuilt (another kind" in capsys.readouterr().out


def test_a_large_collection_gets_an_approximate_index_unless_exact_is_asked(tmp_path, embedded, monkeypatch, capsys):
    from udml.cli import index as index_command

    save_embeddings(tmp_path / "e.npz", embedded)
    run = ["index", str(tmp_path / "e.npz"), "-o", str(tmp_path / "i.faiss")]
    assert main(run) == 0 and capsys.readouterr().out.startswith("flat index")
    monkeypatch.setattr(index_command, "FLAT_UP_TO", len(embedded.paths) - 1)  # as if it were above the size
    assert main(run) == 0
    out = capsys.readouterr().out
    assert "an approximate HNSW index" in out and "hnsw index" in out
    assert main([*run, "--exact"]) == 0 and "flat index" in capsys.readouterr().out
    assert main([*run, "--exact", "--hnsw"]) == 2
