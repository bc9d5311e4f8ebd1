"""Embedding with a trained model (udml.retrieval): folders and single images, unreadable files, the check that an
index was embedded by the same network, the pretrained backbone alone, and `udml embed` updating an existing
embeddings file as the collection changes (real CUB photos)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import CUB_CLASSES, change_collection, spare_photos

from udml import retrieval
from udml.checkpoint import save_model
from udml.cli import main
from udml.config import make_config
from udml.embeddings import load_embeddings, save_embeddings
from udml.models import model_from_config
from udml.retrieval import Embedder, embed_folder

CLASSES = CUB_CLASSES


@pytest.fixture(scope="module")
def photos(cub3) -> Path:
    """What conftest's ``embedded`` embeds."""
    return cub3


def test_embed_folder_matches_embedder_one_by_one(cub3, model_file, embedded):
    n = sum(len(os.listdir(cub3 / c)) for c in CLASSES)
    assert len(embedded.paths) == n == len(embedded.embeddings) and not embedded.skipped
    assert embedded.paths == sorted(embedded.paths) and all(os.path.isabs(p) for p in embedded.paths)
    assert embedded.embeddings.dtype == np.float32 and embedded.embeddings.shape[1] == 32
    np.testing.assert_allclose(np.linalg.norm(embedded.embeddings, axis=1), 1, atol=1e-5)
    some = [0, 7, n - 1]
    single = Embedder.from_file(model_file).embed([embedded.paths[i] for i in some])
    np.testing.assert_allclose(single, embedded.embeddings[some], atol=1e-5)
    assert len(embedded.meta["model_fingerprint"]) == 64 and embedded.meta["dim"] == 32


def test_embed_folder_reports_and_skips_unreadable_files(tmp_path, cub3, model_file, udml_log):
    nested = tmp_path / "a" / "b"
    nested.mkdir(parents=True)
    first = sorted((cub3 / CLASSES[0]).iterdir())[:2]
    for f in first:
        (nested / f.name).write_bytes(f.read_bytes())
    (tmp_path / "a" / "broken.jpg").write_bytes(b"not an image")
    (tmp_path / "a" / "notes.txt").write_text("ignored: not an image extension")
    emb = embed_folder(Embedder.from_file(model_file), tmp_path)
    assert len(emb.paths) == 2 and [Path(p).name for p in emb.paths] == [f.name for f in first]
    assert len(emb.skipped) == 1 and emb.skipped[0][0].endswith("broken.jpg")
    assert "broken.jpg" in udml_log.text
    (nested / first[0].name).unlink()
    (nested / first[1].name).unlink()
    with pytest.raises(ValueError, match="none of the 1 images"):
        embed_folder(Embedder.from_file(model_file), tmp_path)


def test_search_with_another_network_is_an_error(tmp_path, cub3, model_file, capsys):
    """The collection is embedded from a run folder; the same network as model.pt or checkpoint.pt is accepted,
    any other network of the same shape is refused unless --allow-other-model says otherwise."""
    run = tmp_path / "run"
    run.mkdir()
    cfg = make_config("digits", ["embedding_dim=32"])
    torch.manual_seed(0)
    same = model_from_config(cfg)
    save_model(same, cfg, run / "model.pt")
    torch.manual_seed(1)
    other = model_from_config(cfg)
    save_model(other, cfg, tmp_path / "other.pt")
    few = tmp_path / "few"
    (few / CLASSES[0]).mkdir(parents=True)
    for p in sorted((cub3 / CLASSES[0]).iterdir())[:6]:
        (few / CLASSES[0] / p.name).symlink_to(p)
    emb, idx = tmp_path / "emb.npz", tmp_path / "index.faiss"
    assert main(["embed", str(run), str(few), "-o", str(emb)]) == 0  # a run folder, not a file
    assert main(["index", str(emb), "-o", str(idx)]) == 0
    fingerprint = load_embeddings(emb).meta["model_fingerprint"]
    assert fingerprint == Embedder.from_file(model_file).fingerprint  # same weights, another file
    assert fingerprint != Embedder.from_file(tmp_path / "other.pt").fingerprint
    query = str(sorted((few / CLASSES[0]).iterdir())[0])
    assert main(["search", str(idx), query, "--model", str(run / "model.pt"), "-k", "2"]) == 0
    capsys.readouterr()
    assert main(["search", str(idx), query, "--model", str(tmp_path / "other.pt"), "-k", "2"]) == 2
    err = capsys.readouterr().err
    assert "embedded by another network" in err and "--allow-other-model" in err
    assert (
        main(["search", str(idx), query, "--model", str(tmp_path / "other.pt"), "-k", "2", "--allow-other-model"]) == 0
    )


def test_embed_and_search_with_the_pretrained_backbone_alone(tmp_path, cub3, capsys):
    """No training: the L2-normalised pooled features of EfficientNet-Lite0's ImageNet weights."""
    few = tmp_path / "few"
    for c in CLASSES:
        (few / c).mkdir(parents=True)
        for p in sorted((cub3 / c).iterdir())[:4]:
            (few / c / p.name).symlink_to(p)
    emb = tmp_path / "emb.npz"
    assert main(["embed", "pretrained:efficientnet_lite0", str(few), "-o", str(emb)]) == 0
    stored = load_embeddings(emb)
    assert stored.embeddings.shape == (12, 1280) and stored.meta["model"] == "pretrained:efficientnet_lite0"
    np.testing.assert_allclose(np.linalg.norm(stored.embeddings, axis=1), 1, atol=1e-5)
    query = stored.paths[0]
    capsys.readouterr()
    assert main(["search", str(emb), query, "-k", "3", "--keep-self"]) == 0  # the model comes from the file
    out = capsys.readouterr().out
    top = json.loads(out[out.index("[") :])[0]["results"][0]
    assert top["path"] == query and top["score"] == pytest.approx(1, abs=1e-4)  # the query embeds as stored


# --------------------------------------------------------------------------- udml embed onto an existing file


def test_embed_updates_only_new_and_changed_files(changing_photos, model_file, tmp_path, monkeypatch, capsys):
    out = tmp_path / "photos.npz"
    assert main(["embed", str(model_file), str(changing_photos), "-o", str(out), "--device", "cpu"]) == 0
    before = load_embeddings(out)
    assert len(before.paths) == 12 and before.stamps.shape == (12, 2)
    what = change_collection(changing_photos)

    asked = []  # every file the update hands to the network
    files = retrieval.ImageFiles

    def spy(paths, *args):
        asked.extend(paths)
        return files(paths, *args)

    monkeypatch.setattr(retrieval, "ImageFiles", spy)
    capsys.readouterr()
    assert main(["embed", str(model_file), str(changing_photos), "-o", str(out), "--device", "cpu"]) == 0
    assert "9 kept, 4 embedded, 2 removed" in capsys.readouterr().out
    new = {str(p) for p in spare_photos(2)}
    assert {Path(p).name for p in asked} == {Path(p).name for p in new} | {
        Path(what["changed"]).name,
        "renamed.jpg",
        "broken.jpg",
    }
    after = load_embeddings(out)
    monkeypatch.setattr(retrieval, "ImageFiles", files)
    fresh = embed_folder(Embedder.from_file(model_file), changing_photos)
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


def test_embed_with_another_model_refuses_unless_rebuild(changing_photos, model_file, tmp_path, capsys):
    out = tmp_path / "photos.npz"
    assert main(["embed", str(model_file), str(changing_photos), "-o", str(out), "--device", "cpu"]) == 0
    cfg = make_config("digits", ["embedding_dim=32"])
    torch.manual_seed(1)
    other = tmp_path / "other.pt"
    save_model(model_from_config(cfg), cfg, other)
    capsys.readouterr()
    assert main(["embed", str(other), str(changing_photos), "-o", str(out), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "another network" in err and "--rebuild" in err and "Traceback" not in err
    assert load_embeddings(out).meta["model"] == str(model_file.resolve())  # untouched
    assert main(["embed", str(other), str(changing_photos), "-o", str(out), "--device", "cpu", "--rebuild"]) == 0
    assert load_embeddings(out).meta["model"] == str(other.resolve())
    # a file from before stamps: every image is embedded again, and said so
    old = load_embeddings(out)
    old.stamps = None
    save_embeddings(out, old)
    capsys.readouterr()
    assert main(["embed", str(other), str(changing_photos), "-o", str(out), "--device", "cpu"]) == 0
    assert "re-embedding all" in capsys.readouterr().out and load_embeddings(out).stamps is not None


def test_an_update_with_nothing_changed_is_told_without_loading_a_model(changing_photos, model_file, tmp_path):
    """udml embed onto a file that already holds the folder as it is (an unreadable file included): it says so and
    stops after a listing and a stat per file, without importing torch; any change to the folder, to the model file
    or to the refinement asked for makes it update (or refuse) as before."""
    out = tmp_path / "photos.npz"
    (changing_photos / CLASSES[0] / "broken.jpg").write_bytes(b"not an image")
    embed = ["embed", str(model_file), str(changing_photos), "-o", str(out), "--device", "cpu", "--workers", "0"]
    assert main(embed) == 0

    def again(*extra):
        code = (
            "import sys; from udml.cli import main; rc = main(sys.argv[1:]); "
            "print('TORCH' if 'torch' in sys.modules else 'NO TORCH'); sys.exit(rc)"
        )
        proc = subprocess.run([sys.executable, "-c", code, *embed, *extra], capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr
        return proc.stdout

    said = again()
    assert "up to date, nothing new, changed or removed" in said and "13 files, 1 of them unreadable" in said
    assert said.rstrip().endswith("NO TORCH")
    said = again("--refine")  # refining the same rows: work to do
    assert "refined by the collection's own neighbours" in said and said.rstrip().endswith("\nTORCH")
    assert "up to date" in again()  # the refined file, unchanged, with its refinement kept
    os.utime(model_file)  # the model file was replaced (touched): the file's rows may not be the model's
    assert "up to date" not in again()
    assert "up to date" in again()
    (changing_photos / CLASSES[1] / "new.jpg").write_bytes(next((changing_photos / CLASSES[1]).iterdir()).read_bytes())
    said = again()
    assert "12 kept, 1 embedded, 0 removed" in said and said.rstrip().endswith("\nTORCH")
