"""embed / index / search (library and command line) on CUB images, and `udml train --data DIR`."""

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import CUB_CLASSES, cub_photos
from PIL import Image

from udml.checkpoint import save_model
from udml.cli import main
from udml.config import default_num_clusters, load_config, make_config
from udml.embeddings import load_embeddings, save_embeddings
from udml.index import build_index, load_index, save_index, search
from udml.models import model_from_config
from udml.retrieval import Embedder, embed_folder

CLASSES = CUB_CLASSES


@pytest.fixture(scope="module")
def cub3(tmp_path_factory) -> Path:
    """Three CUB classes, every photo of each, linked file by file into a folder per class."""
    return cub_photos(tmp_path_factory.mktemp("cub3"), CLASSES)


@pytest.fixture(scope="module")
def photos(cub3) -> Path:
    """What conftest's ``embedded`` embeds."""
    return cub3


def brute_force(x: np.ndarray, q: np.ndarray, k: int):
    s = q.astype(np.float64) @ x.astype(np.float64).T
    order = np.argsort(-s, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(s, order, 1), order


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


def test_command_line_embed_index_search(tmp_path, cub3, model_file, capsys):
    emb, idx = tmp_path / "emb.npz", tmp_path / "index.faiss"
    assert main(["embed", str(model_file), str(cub3), "-o", str(emb), "--device", "cpu"]) == 0
    assert main(["index", str(emb), "-o", str(idx)]) == 0
    assert main(["index", str(emb), "-o", str(tmp_path / "hnsw.faiss"), "--hnsw", "16"]) == 0
    assert main(["index", str(emb), "-o", str(tmp_path / "ivf.faiss"), "--ivf"]) == 0
    assert "ivf index of" in capsys.readouterr().out
    queries = [str(sorted((cub3 / c).iterdir())[0]) for c in CLASSES[:2]]
    out, grid = tmp_path / "out.json", tmp_path / "grid.png"
    assert (
        main(
            [
                "search",
                str(idx),
                *queries,
                "--model",
                str(model_file),
                "-k",
                "4",
                "--json",
                str(out),
                "--grid",
                str(grid),
                "--folder-labels",
                "--cell",
                "64",
            ]
        )
        == 0
    )
    results = json.loads(out.read_text())
    stored = load_embeddings(emb)
    brute = {p: e for p, e in zip(stored.paths, stored.embeddings)}
    for q, r in zip(queries, results):
        assert r["query"] == os.path.abspath(q) and len(r["results"]) == 4
        scores = [x["score"] for x in r["results"]]
        assert scores == sorted(scores, reverse=True)
        assert all(os.path.isfile(x["path"]) and x["path"] != r["query"] for x in r["results"])
        # the score is the cosine similarity of the stored embeddings (the query is in the collection)
        for x in r["results"]:
            assert x["score"] == pytest.approx(float(brute[r["query"]] @ brute[x["path"]]), abs=1e-5)
    with Image.open(grid) as g:
        assert g.format == "PNG" and g.width > 5 * 64 and g.height > 2 * 64
    # an .npz works as an exact index, the model comes from the file, and printing replaces --json
    capsys.readouterr()
    assert main(["search", str(emb), queries[0], "-k", "2", "--keep-self"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed[0]["results"][0]["path"] == os.path.abspath(queries[0])


def test_command_line_search_errors(tmp_path, embedded, capsys):
    emb = tmp_path / "emb.npz"
    save_embeddings(emb, embedded)
    other = tmp_path / "other.pt"
    cfg = make_config("digits", ["embedding_dim=16"])
    save_model(model_from_config(cfg), cfg, other)
    assert main(["search", str(emb), embedded.paths[0], "--model", str(other)]) == 2
    assert "32-d embeddings" in capsys.readouterr().err
    assert main(["search", str(emb), str(tmp_path / "nope.jpg")]) == 2
    assert "nope.jpg does not exist" in capsys.readouterr().err
    assert main(["index", str(emb), "-o", str(tmp_path / "i"), "--ivf", "--hnsw"]) == 2
    assert "one of --ivf and --hnsw" in capsys.readouterr().err


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


# --------------------------------------------------------------------------- udml train --data DIR


def test_default_num_clusters_rule():
    assert default_num_clusters(5864) == 117  # CUB's training split: near the paper's 100
    assert default_num_clusters(50_000) == 1000
    assert default_num_clusters(100) == 16  # at least one batch's worth of clusters
    assert default_num_clusters(100, clusters_per_batch=4) == 4
    assert default_num_clusters(10_000_000) == 10_000
    assert make_config("folder").num_clusters is None
    with pytest.raises(ValueError, match="num_clusters is null"):
        make_config("folder").iterations_per_round()


@pytest.mark.slow
def test_train_on_an_unlabelled_folder(tmp_path, cub3, capsys):
    """`udml train --data DIR`: the folder preset, K from N, a damaged file skipped, no evaluation, pictures."""
    data = tmp_path / "photos"
    (data / "2019" / "trip").mkdir(parents=True)
    for i, f in enumerate(sorted((cub3 / CLASSES[1]).iterdir())[:40]):
        (data / ("2019/trip" if i % 2 else "") / f"img{i}.jpg").write_bytes(f.read_bytes())
    (data / "damaged.jpg").write_bytes(b"\xff\xd8 truncated")
    small = [
        "backbone=smallconv",
        "pretrained=false",
        "freeze_bn=false",
        "image_size=32",
        "resize_size=36",
        "embedding_dim=32",
        "clusters_per_batch=4",
        "pseudo_epochs=5",
        "lr=1e-3",
        "num_workers=0",
        "cache_images=false",
        "freeze_stages=0",  # the CPU variant (folder_cpu) freezes Lite0's stages; smallconv has none
        "run_name=r",
    ]
    assert main(["train", "--data", str(data), "--out", str(tmp_path / "runs"), "--device", "cpu", *small]) == 0
    run = tmp_path / "runs" / "r"
    cfg = load_config(run / "config.yaml")
    assert cfg.dataset == "folder" and cfg.num_clusters == default_num_clusters(40, 4) == 4
    log = (run / "train.log").read_text()
    assert "damaged.jpg" in log and "not evaluated" in log and "40 train / 0 test images" in log
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert {r["kind"] for r in records} == {"cluster", "train"}
    for name in ("model.pt", "curves.png", "retrieval.png", "embeddings.png"):
        assert (run / name).is_file(), name

    # with a labelled test folder the run is evaluated
    assert (
        main(
            [
                "train",
                "--data",
                str(data),
                "--out",
                str(tmp_path / "runs"),
                "--device",
                "cpu",
                *small[:-1],
                f"test_root={cub3}",
                "run_name=r2",
            ]
        )
        == 0
    )
    records = [json.loads(line) for line in (tmp_path / "runs" / "r2" / "metrics.jsonl").read_text().splitlines()]
    final = [r for r in records if r.get("final")]
    assert len(final) == 1 and 0 < final[0]["recall@1"] <= 1


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
