"""The udml command line (udml.cli): how `udml train` reads its arguments, and `udml embed`, `udml index` and
`udml search` one after the other on CUB photos (the search command's JSON, picture and errors)."""

import json
import os
from pathlib import Path

import pytest
from conftest import CUB_CLASSES
from PIL import Image

from udml.checkpoint import save_model
from udml.cli import main
from udml.config import make_config
from udml.embeddings import load_embeddings, save_embeddings
from udml.models import model_from_config

CLASSES = CUB_CLASSES


@pytest.fixture(scope="module")
def photos(cub3) -> Path:
    """What conftest's ``embedded`` embeds."""
    return cub3


# --------------------------------------------------------------------------- udml train's arguments


def test_data_alone_picks_the_folder_preset_or_its_cpu_variant(monkeypatch, tmp_path, capsys):
    """`udml train --data DIR`: the folder preset's GPU recipe where CUDA is found, its CPU variant (folder_cpu:
    frozen stages, a time budget) elsewhere, said on the first line; --config and --device decide when given."""
    import udml.cli
    import udml.training

    seen = []
    monkeypatch.setattr(udml.training, "train", lambda cfg, **kw: seen.append(cfg))
    for gpu in (False, True):
        monkeypatch.setattr(udml.cli.train, "_has_gpu", lambda gpu=gpu: gpu)
        assert main(["train", "--data", str(tmp_path)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("no GPU in use: the folder_cpu preset") and "--config folder" in out[0]
    assert out[1].startswith("the folder preset (the paper's recipe on Lite0, docs/method.md")
    cpu, gpu = seen
    assert cpu.to_dict() == make_config("folder_cpu", {"data_root": str(tmp_path)}).to_dict()
    assert (cpu.freeze_stages, cpu.target_neighbours, cpu.embedding_dim) == (4, 8, None)
    assert (cpu.time_budget, cpu.cache_images) == ("20m", "disk")
    assert gpu.to_dict() == make_config("folder", {"data_root": str(tmp_path)}).to_dict()
    monkeypatch.setattr(udml.cli.train, "_has_gpu", lambda: True)
    assert main(["train", "--data", str(tmp_path), "--device", "cpu"]) == 0  # asked for the CPU: its variant
    assert main(["train", "--data", str(tmp_path), "device=cpu"]) == 0
    assert main(["train", "--data", str(tmp_path), "--config", "folder", "--device", "cpu"]) == 0  # as asked
    assert [c.freeze_stages for c in seen[2:]] == [4, 4, 0]


def test_key_value_overrides_may_follow_options(monkeypatch, tmp_path, capsys):
    """`udml train --out DIR lr=1e-4` and `udml train lr=1e-4 --out DIR` mean the same; other stray words are
    still errors."""
    import udml.training

    seen = []
    monkeypatch.setattr(udml.training, "train", lambda cfg, **kw: seen.append(cfg))
    assert main(["train", "--out", str(tmp_path), "run_name=a", "lr=0.002"]) == 0
    assert main(["train", "run_name=a", "--out", str(tmp_path), "lr=0.002"]) == 0
    assert seen[0].to_dict() == seen[1].to_dict()
    assert (seen[0].run_name, seen[0].lr, seen[0].out_dir) == ("a", 0.002, str(tmp_path))
    with pytest.raises(SystemExit):
        main(["train", "--out", str(tmp_path), "--no-such-flag"])
    assert "unrecognized arguments: --no-such-flag" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["embed", "pretrained:x", str(tmp_path), "-o", "x.npz", "lr=1"])  # only train takes key=value


# --------------------------------------------------------------------------- udml embed / index / search


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
    assert "one of --exact, --ivf and --hnsw" in capsys.readouterr().err
