"""A collection that changes: `udml embed` and `udml index` on an existing file update it (real CUB photos)."""

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import CUB_CLASSES, cub_photos, shared_data

from udml import retrieval
from udml.checkpoint import save_model
from udml.cli import main
from udml.config import make_config
from udml.embeddings import load_embeddings, save_embeddings
from udml.index import load_index, search
from udml.models import model_from_config
from udml.retrieval import Embedder, embed_folder

CLASSES = CUB_CLASSES


@pytest.fixture
def collection(tmp_path) -> Path:
    """12 real photos (4 of each of 3 species) copied into a folder that the test may change."""
    return cub_photos(tmp_path / "photos", CLASSES, 4, copy=True)


def spare_photos(n: int) -> list[Path]:
    """Photos not in ``collection``: the next ones of the first species."""
    return sorted((shared_data("CUB_200_2011", "images") / CLASSES[0]).iterdir())[4 : 4 + n]


def change_collection(root: Path) -> dict:
    """Add 2 photos, change 1 (other content under its name), remove 1, rename 1, add an unreadable file."""
    first, second = sorted((root / CLASSES[0]).iterdir()), sorted((root / CLASSES[1]).iterdir())
    for f in spare_photos(2):
        shutil.copy2(f, root / CLASSES[0] / f.name)
    changed = second[0]
    changed.write_bytes(second[1].read_bytes())  # another photo's content: size and mtime change
    first[0].unlink()
    renamed = root / CLASSES[2] / "renamed.jpg"
    os.rename(sorted((root / CLASSES[2]).iterdir())[0], renamed)
    (root / "broken.jpg").write_bytes(b"not an image")
    return {"changed": str(changed), "removed": str(first[0]), "renamed": str(renamed)}


def test_embed_updates_only_new_and_changed_files(collection, model_file, tmp_path, monkeypatch, capsys):
    out = tmp_path / "photos.npz"
    assert main(["embed", str(model_file), str(collection), "-o", str(out), "--device", "cpu"]) == 0
    before = load_embeddings(out)
    assert len(before.paths) == 12 and before.stamps.shape == (12, 2)
    what = change_collection(collection)

    asked = []  # every file the update hands to the network
    files = retrieval.ImageFiles

    def spy(paths, *args):
        asked.extend(paths)
        return files(paths, *args)

    monkeypatch.setattr(retrieval, "ImageFiles", spy)
    capsys.readouterr()
    assert main(["embed", str(model_file), str(collection), "-o", str(out), "--device", "cpu"]) == 0
    assert "9 kept, 4 embedded, 2 removed" in capsys.readouterr().out
    new = {str(p) for p in spare_photos(2)}
    assert {Path(p).name for p in asked} == {Path(p).name for p in new} | {
        Path(what["changed"]).name,
        "renamed.jpg",
        "broken.jpg",
    }
    after = load_embeddings(out)
    monkeypatch.setattr(retrieval, "ImageFiles", files)
    fresh = embed_folder(Embedder.from_file(model_file), collection)
    assert after.paths == fresh.paths and what["removed"] not in after.paths and what["renamed"] in after.paths
    np.testing.assert_allclose(after.embeddings, fresh.embeddings, atol=1e-5)
    np.testing.assert_array_equal(after.stamps, fresh.stamps)
    kept = [p for p in after.paths if p in before.paths and p != what["changed"]]
    assert len(kept) == 9
    rows = {p: e for p, e in zip(before.paths, before.embeddings)}
    for p, e in zip(after.paths, after.embeddings):
        if p in kept:  # reused as stored, not recomputed
            np.testing.assert_array_equal(e, rows[p])
    changed_before = rows[what["changed"]]
    assert not np.allclose(after.embeddings[after.paths.index(what["changed"])], changed_before, atol=1e-4)


def test_embed_with_another_model_refuses_unless_rebuild(collection, model_file, tmp_path, capsys):
    out = tmp_path / "photos.npz"
    assert main(["embed", str(model_file), str(collection), "-o", str(out), "--device", "cpu"]) == 0
    cfg = make_config("digits", ["embedding_dim=32"])
    torch.manual_seed(1)
    other = tmp_path / "other.pt"
    save_model(model_from_config(cfg), cfg, other)
    capsys.readouterr()
    assert main(["embed", str(other), str(collection), "-o", str(out), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "another network" in err and "--rebuild" in err and "Traceback" not in err
    assert load_embeddings(out).meta["model"] == str(model_file.resolve())  # untouched
    assert main(["embed", str(other), str(collection), "-o", str(out), "--device", "cpu", "--rebuild"]) == 0
    assert load_embeddings(out).meta["model"] == str(other.resolve())
    # a file from before stamps: every image is embedded again, and said so
    old = load_embeddings(out)
    old.stamps = None
    save_embeddings(out, old)
    capsys.readouterr()
    assert main(["embed", str(other), str(collection), "-o", str(out), "--device", "cpu"]) == 0
    assert "re-embedding all" in capsys.readouterr().out and load_embeddings(out).stamps is not None


def test_a_write_killed_half_way_leaves_the_previous_file(collection, model_file, tmp_path, monkeypatch):
    out = tmp_path / "photos.npz"
    assert main(["embed", str(model_file), str(collection), "-o", str(out), "--device", "cpu"]) == 0
    before = out.read_bytes()
    change_collection(collection)

    def killed(f, **arrays):
        f.write(b"PK\x03\x04 half a zip file")
        raise KeyboardInterrupt  # what a Ctrl-C or a kill in the middle of the write looks like to Python

    monkeypatch.setattr(np, "savez", killed)
    with pytest.raises(KeyboardInterrupt):
        main(["embed", str(model_file), str(collection), "-o", str(out), "--device", "cpu"])
    assert out.read_bytes() == before and sorted(os.listdir(tmp_path)) == ["photos", "photos.npz"]
    assert len(load_embeddings(out).paths) == 12


def test_an_index_write_killed_half_way_leaves_the_previous_index(collection, model_file, tmp_path, monkeypatch):
    """The index goes through the package's one atomic write: a kill while faiss writes it leaves the previous
    index (and its paths file) as they were, and no temporary file."""
    import faiss

    emb, idx = tmp_path / "photos.npz", tmp_path / "photos.faiss"
    assert main(["embed", str(model_file), str(collection), "-o", str(emb), "--device", "cpu"]) == 0
    assert main(["index", str(emb), "-o", str(idx)]) == 0
    before, sidecar = idx.read_bytes(), Path(f"{idx}.json").read_text()
    change_collection(collection)
    assert main(["embed", str(model_file), str(collection), "-o", str(emb), "--device", "cpu"]) == 0
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
def test_index_update_keeps_ids_and_never_returns_a_removed_image(collection, model_file, tmp_path, kind, capsys):
    emb, idx = tmp_path / "photos.npz", tmp_path / "photos.faiss"
    assert main(["embed", str(model_file), str(collection), "-o", str(emb), "--device", "cpu"]) == 0
    assert main(["index", str(emb), "-o", str(idx), *kind]) == 0
    first = json.loads(Path(f"{idx}.json").read_text())
    what = change_collection(collection)
    assert main(["embed", str(model_file), str(collection), "-o", str(emb), "--device", "cpu"]) == 0
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
