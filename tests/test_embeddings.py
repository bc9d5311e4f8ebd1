"""The embeddings file of `udml embed` (udml.embeddings): written and read back, and never left half written."""

import json
import os
from pathlib import Path

import numpy as np
import pytest
from conftest import change_collection

from udml.cli import main
from udml.embeddings import load_embeddings, save_embeddings


def test_embeddings_file_round_trip(tmp_path, embedded):
    path = tmp_path / "emb.data"  # any name: not silently renamed to .npz
    save_embeddings(path, embedded)
    back = load_embeddings(path)
    assert back.paths == embedded.paths and back.meta == embedded.meta
    np.testing.assert_array_equal(back.embeddings, embedded.embeddings)
    (tmp_path / "junk.npz").write_bytes(b"junk")
    with pytest.raises(ValueError, match="not a udml embeddings file"):
        load_embeddings(tmp_path / "junk.npz")
    with pytest.raises(FileNotFoundError, match="udml embed"):
        load_embeddings(tmp_path / "missing.npz")


def test_a_write_killed_half_way_leaves_the_previous_file(changing_photos, model_file, tmp_path, monkeypatch):
    out = tmp_path / "photos.npz"
    assert main(["embed", str(model_file), str(changing_photos), "-o", str(out), "--device", "cpu"]) == 0
    before = out.read_bytes()
    change_collection(changing_photos)

    def killed(f, **arrays):
        f.write(b"PK\x03\x04 half a zip file")
        raise KeyboardInterrupt  # what a Ctrl-C or a kill in the middle of the write looks like to Python

    monkeypatch.setattr(np, "savez", killed)
    with pytest.raises(KeyboardInterrupt):
        main(["embed", str(model_file), str(changing_photos), "-o", str(out), "--device", "cpu"])
    assert out.read_bytes() == before and sorted(os.listdir(tmp_path)) == ["photos", "photos.npz"]
    assert len(load_embeddings(out).paths) == 12


# --------------------------------------------------------------------------- a folder of row shards


def stand_in(n: int, seed: int = 0, start: int = 0):
    """Embeddings of n made-up files (sorted paths, stamps), as udml embed would hold them."""
    from udml.embeddings import Embeddings

    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, 8)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    paths = [f"/photos/{i:06d}.jpg" for i in range(start, start + n)]
    stamps = np.stack([np.full(n, 1000), np.arange(n) + 10**9], 1).astype(np.int64)
    return Embeddings(x, paths, {"model_fingerprint": "f", "precision": "float32", "dim": 8}, stamps=stamps)


def changed(emb, new: int, removed: int, modified: int, seed: int = 1):
    """``emb`` after ``removed`` files went, ``modified`` were rewritten (new stamp and vector) and ``new`` came."""
    import dataclasses

    keep = np.arange(removed, len(emb.paths))
    x, stamps = emb.embeddings[keep].copy(), emb.stamps[keep].copy()
    rng = np.random.default_rng(seed)
    x[:modified] = rng.standard_normal((modified, x.shape[1]))
    stamps[:modified, 1] += 7
    extra = stand_in(new, seed, start=10**5)
    paths = [emb.paths[i] for i in keep] + extra.paths
    return dataclasses.replace(
        emb,
        embeddings=np.concatenate([x, extra.embeddings]),
        paths=paths,
        stamps=np.concatenate([stamps, extra.stamps]),
    )


def same(a, b):
    assert a.paths == b.paths and a.meta == b.meta
    np.testing.assert_array_equal(a.embeddings, b.embeddings)
    np.testing.assert_array_equal(a.stamps, b.stamps)


def test_a_shard_folder_round_trips_and_an_update_writes_what_changed(tmp_path):
    from udml.embeddings import convert, load_embeddings, save_embeddings

    first = stand_in(2000)
    full = save_embeddings(tmp_path / "rows", first)
    same(load_embeddings(tmp_path / "rows"), first)
    second = changed(first, new=20, removed=10, modified=5)
    update = save_embeddings(tmp_path / "rows", second)
    same(load_embeddings(tmp_path / "rows"), second)
    assert update["bytes"] < 0.05 * full["bytes"] and update["files"] == 2  # 25 rows and the manifest
    npz = tmp_path / "rows.npz"
    convert(tmp_path / "rows", npz)
    same(load_embeddings(npz), second)
    convert(npz, tmp_path / "again")
    same(load_embeddings(tmp_path / "again"), second)


def test_a_shard_that_lost_most_rows_is_compacted_and_another_network_replaces_all(tmp_path):
    import dataclasses

    from udml.embeddings import MANIFEST, load_embeddings, save_embeddings

    first = stand_in(100)
    save_embeddings(tmp_path / "rows", first)
    second = changed(first, new=5, removed=60, modified=0)
    save_embeddings(tmp_path / "rows", second)
    manifest = json.loads((tmp_path / "rows" / MANIFEST).read_text())
    assert [s["rows"] for s in manifest["shards"]] == [45] and not manifest["shards"][0]["removed"]
    assert sorted(p.name for p in (tmp_path / "rows").iterdir()) == [MANIFEST, manifest["shards"][0]["file"]]
    same(load_embeddings(tmp_path / "rows"), second)
    other = dataclasses.replace(second, meta={**second.meta, "model_fingerprint": "g"})
    save_embeddings(tmp_path / "rows", other)
    same(load_embeddings(tmp_path / "rows"), other)


def test_a_shard_update_killed_half_way_leaves_the_previous_state(tmp_path, monkeypatch):
    from udml import embeddings
    from udml.embeddings import load_embeddings, save_embeddings

    first = stand_in(300)
    save_embeddings(tmp_path / "rows", first)
    real = embeddings.atomic_write

    def killed(path, write, what="file", **kw):
        if Path(path).name == embeddings.MANIFEST:
            raise OSError(28, "No space left on device")
        real(path, write, what, **kw)

    monkeypatch.setattr(embeddings, "atomic_write", killed)
    with pytest.raises(OSError):
        save_embeddings(tmp_path / "rows", changed(first, new=10, removed=3, modified=2))
    same(load_embeddings(tmp_path / "rows"), first)  # the new shard is there, unnamed: nothing changed
    monkeypatch.setattr(embeddings, "atomic_write", real)
    second = changed(first, new=4, removed=1, modified=1)
    save_embeddings(tmp_path / "rows", second)
    same(load_embeddings(tmp_path / "rows"), second)
    assert len(list((tmp_path / "rows").glob("*.npz"))) == 2  # the orphan of the killed write is gone


def test_udml_embed_index_cluster_and_search_with_a_shard_folder(changing_photos, model_file, tmp_path, capsys):
    out, npz = tmp_path / "photos.emb", tmp_path / "photos.npz"
    embed = ["embed", str(model_file), str(changing_photos), "--device", "cpu", "--workers", "0", "--refine", "-o"]
    assert main([*embed, str(out)]) == 0 and out.is_dir()
    change_collection(changing_photos)
    assert main([*embed, str(out)]) == 0 and "(updated:" in capsys.readouterr().out
    assert main([*embed, str(out)]) == 0 and "up to date" in capsys.readouterr().out
    assert main([*embed, str(npz)]) == 0
    folder, single = load_embeddings(out), load_embeddings(npz)
    assert folder.paths == single.paths
    np.testing.assert_allclose(folder.embeddings, single.embeddings, atol=1e-5)
    np.testing.assert_allclose(folder.refined, single.refined, atol=1e-5)
    assert main(["index", str(out), "-o", str(tmp_path / "p.faiss")]) == 0
    assert main(["cluster", str(out), "-o", str(tmp_path / "g.csv"), "--k", "3"]) == 0
    query = folder.paths[0]
    assert main(["search", str(out), query, "-k", "2", "--json", str(tmp_path / "hits.json")]) == 0
    assert json.loads((tmp_path / "hits.json").read_text())[0]["results"]
