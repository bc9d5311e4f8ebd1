"""Run pictures: retrieval grids with coloured frames, training curves, t-SNE maps."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from udml.config import make_config
from udml.models import model_from_config
from udml.plots import (
    GREEN,
    RED,
    embedding_map,
    read_metrics,
    retrieval_grid,
    sample_retrievals,
    training_curves,
    tsne_2d,
    write_run_pictures,
)


def colour_pixels(path, hex_colour: str, tol: int = 12) -> int:
    rgb = np.array([int(hex_colour[i : i + 2], 16) for i in (1, 3, 5)])
    with Image.open(path) as img:
        a = np.asarray(img.convert("RGB")).astype(int)
    return int((np.abs(a - rgb).max(axis=2) <= tol).sum())


def images(n, size=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    # blue-ish noise, far from the frame colours
    x = torch.randint(0, 80, (n, 3, size, size), generator=g, dtype=torch.uint8)
    x[:, 2] += 120
    return x


def test_retrieval_grid_frames_follow_the_matches(tmp_path):
    q, r = images(2), images(6, seed=1)
    results = [[r[0], r[1], r[2]], [r[3], r[4], r[5]]]
    all_good = retrieval_grid(q, results, tmp_path / "g.png", matches=[[True] * 3, [True] * 3], cell=48)
    mixed = retrieval_grid(
        q, results, tmp_path / "m.png", matches=[[True, False, True], [False, False, None]], cell=48, title="t"
    )
    plain = retrieval_grid(q, results, tmp_path / "p.png", cell=48)
    assert colour_pixels(all_good, GREEN) > 0 and colour_pixels(all_good, RED) == 0
    assert colour_pixels(mixed, GREEN) > 0 and colour_pixels(mixed, RED) > 0
    # three red frames against two green ones
    assert colour_pixels(mixed, RED) > colour_pixels(mixed, GREEN)
    assert colour_pixels(plain, GREEN) == colour_pixels(plain, RED) == 0
    with Image.open(plain) as img:
        assert img.format == "PNG" and img.width >= 4 * 48 and img.height >= 2 * 48


def test_retrieval_grid_accepts_paths_pil_and_arrays_and_rejects_mismatches(tmp_path):
    Image.new("RGB", (30, 20), (200, 10, 10)).save(tmp_path / "a.png")
    retrieval_grid(
        [tmp_path / "a.png"],
        [[Image.new("L", (10, 10), 128), np.zeros((8, 8, 3), np.uint8)]],
        tmp_path / "x.png",
        cell=32,
    )
    assert (tmp_path / "x.png").is_file()
    with pytest.raises(ValueError, match="2 queries but 1 result lists"):
        retrieval_grid([tmp_path / "a.png"] * 2, [[tmp_path / "a.png"]], tmp_path / "y.png")
    with pytest.raises(ValueError, match="cannot show"):
        retrieval_grid([np.zeros((4, 4, 5))], [[tmp_path / "a.png"]], tmp_path / "y.png")


def test_sample_retrievals_matches_brute_force():
    g = torch.Generator().manual_seed(0)
    emb = torch.nn.functional.normalize(torch.randn(50, 8, generator=g), dim=1)
    labels = np.arange(50) % 3
    q, nn, sims, matches = sample_retrievals(emb, labels, n_queries=5, k=4, seed=1)
    s = emb @ emb.T
    s.fill_diagonal_(-float("inf"))
    ref = torch.topk(s[torch.as_tensor(q)], 4, dim=1)
    np.testing.assert_array_equal(nn, ref.indices.numpy())
    np.testing.assert_allclose(sims, ref.values.numpy(), atol=1e-6)
    np.testing.assert_array_equal(matches, labels[nn] == labels[q][:, None])
    assert len(set(q)) == 5 and not (nn == q[:, None]).any()


def test_training_curves_from_metrics(tmp_path):
    records = [
        {"kind": "eval", "round": 0, "step": 0, "features": "embedding", "recall@1": 0.4, "nmi": 0.5},
        {"kind": "eval", "round": 0, "step": 0, "features": "pooled", "recall@1": 0.42, "nmi": 0.52},
    ]
    for r in range(1, 6):
        records.append({"kind": "cluster", "round": r, "step": 10 * (r - 1)})
        records.append(
            {
                "kind": "train",
                "round": r,
                "step": 10 * r,
                "metric_loss": 1 / r,
                "rotation_loss": 1.3,
                "rotation_accuracy": 0.4,
            }
        )
    records.append(
        {"kind": "eval", "round": 5, "step": 50, "features": "embedding", "final": True, "recall@1": 0.5, "nmi": 0.55}
    )
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    out = training_curves(read_metrics(tmp_path / "metrics.jsonl"), tmp_path / "c.png", title="run")
    with Image.open(out) as img:
        assert img.format == "PNG" and img.width > 500
    with pytest.raises(ValueError, match="no training or evaluation records"):
        training_curves([{"kind": "cluster"}], tmp_path / "d.png")
    with pytest.raises(FileNotFoundError, match="udml train"):
        read_metrics(tmp_path / "missing.jsonl")


def test_tsne_keeps_separated_classes_apart(tmp_path):
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(3, 16)) * 10
    labels = np.repeat(np.arange(3), 40)
    x = centres[labels] + rng.normal(size=(120, 16))
    xy = tsne_2d(x, seed=0)
    d = ((xy[:, None] - xy[None]) ** 2).sum(-1)
    np.fill_diagonal(d, np.inf)
    assert (labels[d.argmin(1)] == labels).mean() == 1.0  # every point's 2-D neighbour is of its class
    out = embedding_map(x, labels, tmp_path / "e.png", class_names=["a", "b", "c"])
    assert out.is_file()
    embedding_map(x, None, tmp_path / "u.png")
    many = np.arange(120) % 30  # more classes than colours: 20 coloured, the rest grey
    embedding_map(x, many, tmp_path / "m.png", max_classes=20)
    with pytest.raises(ValueError, match="at least 5 points"):
        tsne_2d(x[:3])


@pytest.mark.parametrize("stacked,labelled", [(True, True), (False, False)])
def test_write_run_pictures(tmp_path, stacked, labelled):
    cfg = make_config("digits", ["embedding_dim=16"])
    model = model_from_config(cfg).eval()
    x = images(40, size=32)
    labels = torch.arange(40) % 4 if labelled else None
    data = x if stacked else torch.utils.data.TensorDataset(x, torch.arange(40))
    (tmp_path / "metrics.jsonl").write_text(
        json.dumps({"kind": "train", "round": 1, "step": 5, "metric_loss": 0.5, "rotation_loss": 1.0}) + "\n"
    )
    written = write_run_pictures(
        tmp_path, model, data, labels, class_names=list("abcd") if labelled else None, max_gallery=30
    )
    assert [p.name for p in written] == ["curves.png", "retrieval.png", "embeddings.png"]
    assert (
        colour_pixels(tmp_path / "retrieval.png", GREEN) + colour_pixels(tmp_path / "retrieval.png", RED) > 0
    ) == labelled


def test_write_run_pictures_logs_instead_of_raising(tmp_path, udml_log):
    model = model_from_config(make_config("digits", ["embedding_dim=16"])).eval()
    assert write_run_pictures(tmp_path, model, images(1, size=32)) == []  # no metrics, a single image
    assert "could not draw curves.png" in udml_log.text
    assert "could not draw the retrieval pictures" in udml_log.text


def test_run_pictures_reuse_given_embeddings_without_a_second_pass(tmp_path, monkeypatch):
    """finish() hands the final evaluation's embeddings to the pictures: the same pictures, no embedding pass."""
    from udml import inference

    model = model_from_config(make_config("digits", ["embedding_dim=16"])).eval()
    x, labels = images(40, size=32), torch.arange(40) % 4
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"kind": "train", "round": 1, "step": 5, "metric_loss": 0.5}))
    _, emb = inference.extract(model, x, pooled=False)
    runs = {d: tmp_path / d / "run" for d in ("a", "b")}  # one name: it is in the pictures' titles
    for run in runs.values():
        run.mkdir(parents=True)
        (run / "metrics.jsonl").write_text((tmp_path / "metrics.jsonl").read_text())
    write_run_pictures(runs["a"], model, x, labels, max_gallery=30)

    def no_pass(*args, **kwargs):
        raise AssertionError("embedded again")

    monkeypatch.setattr(inference, "extract", no_pass)
    written = write_run_pictures(runs["b"], model, x, labels, max_gallery=30, embeddings=emb)
    assert [p.name for p in written] == ["curves.png", "retrieval.png", "embeddings.png"]
    for name in ("retrieval.png", "embeddings.png"):
        with Image.open(runs["a"] / name) as a, Image.open(runs["b"] / name) as b:
            assert np.array_equal(np.asarray(a.convert("RGB")), np.asarray(b.convert("RGB"))), name
