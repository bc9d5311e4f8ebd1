"""The embeddings file of `udml embed` (udml.embeddings): written and read back, and never left half written."""

import os
from pathlib import Path

import numpy as np
import pytest
from conftest import CUB_CLASSES, change_collection, cub_photos

from udml.cli import main
from udml.embeddings import load_embeddings, save_embeddings


@pytest.fixture(scope="module")
def photos(cub3) -> Path:
    """What conftest's ``embedded`` embeds."""
    return cub3


@pytest.fixture
def collection(tmp_path) -> Path:
    """12 real photos (4 of each of 3 species) copied into a folder that the test may change."""
    return cub_photos(tmp_path / "photos", CUB_CLASSES, 4, copy=True)


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
