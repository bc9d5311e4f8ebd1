"""udml cluster: groups and near-duplicates, against naive references and on real photos and their copies."""

import csv
import io
import itertools
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import shared_data
from PIL import Image
from sklearn.metrics import normalized_mutual_info_score

from udml import groups
from udml.cli import main
from udml.embeddings import load_embeddings


def naive_threshold_groups(x: np.ndarray, threshold: float, neighbours: int):
    """Connected sets of the graph linking i and j when j is among i's `neighbours` nearest (or i among j's) and
    their cosine similarity is at least `threshold`, by repeated merging of label sets."""
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    s = x @ x.T
    np.fill_diagonal(s, -np.inf)
    near = np.argsort(-s, axis=1, kind="stable")[:, :neighbours]
    sets = [{i} for i in range(len(x))]
    for i in range(len(x)):
        for j in near[i]:
            if s[i, j] >= threshold:
                a = next(t for t in sets if i in t)
                b = next(t for t in sets if j in t)
                if a is not b:
                    a |= b
                    sets.remove(b)
    return [t for t in sets if len(t) > 1], s.max(axis=1)


def as_sets(labels: np.ndarray) -> list[set]:
    return [set(np.flatnonzero(labels == g)) for g in range(int(labels.max()) + 1)]


@pytest.mark.parametrize("threshold", [0.5, 0.8, 0.95])
def test_threshold_groups_match_a_naive_reference(threshold):
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(6, 16))
    x = (centres[rng.integers(0, 6, 120)] + rng.normal(scale=0.5, size=(120, 16))).astype(np.float32)
    labels, nearest = groups.threshold_groups(x, threshold, neighbours=4)
    expected, best = naive_threshold_groups(x, threshold, 4)
    assert sorted(map(sorted, as_sets(labels))) == sorted(map(sorted, expected))
    np.testing.assert_allclose(nearest, best, atol=1e-5)
    sizes = [len(t) for t in as_sets(labels)]
    assert sizes == sorted(sizes, reverse=True)  # numbered by size, largest first
    assert set(np.flatnonzero(labels < 0)) == set(range(120)) - set().union(*expected)


def test_kmeans_groups_scores_are_similarities_to_the_group_centre():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(200, 8)).astype(np.float32)
    labels, score, k = groups.kmeans_groups(x, 5)
    assert k == 5 and labels.min() == 0 and labels.max() == 4
    sizes = np.bincount(labels)
    assert list(sizes) == sorted(sizes, reverse=True)
    u = x / np.linalg.norm(x, axis=1, keepdims=True)
    for g in range(5):
        centre = u[labels == g].mean(0)
        centre /= np.linalg.norm(centre)
        # spherical k-means: each image's centre is the normalised mean of its group (up to the last update)
        np.testing.assert_allclose(score[labels == g], u[labels == g] @ centre, atol=0.02)
    assert groups.kmeans_groups(x)[2] == 16  # default K as training: N / 50, at least clusters_per_batch
    with pytest.raises(ValueError, match="between 2 and 200"):
        groups.kmeans_groups(x, 500)


def test_two_level_kmeans_recovers_separated_groups_with_their_centres():
    """48 tight groups of 25 on the sphere, K = 48: the two levels (7 coarse clusters, then the groups within them)
    find every group, and each centre is its members' normalised mean, as one level of spherical k-means gives."""
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(48, 16))
    truth = np.repeat(np.arange(48), 25)
    x = centres[truth] / np.linalg.norm(centres[truth], axis=1, keepdims=True) + 0.02 * rng.normal(size=(1200, 16))
    x = torch.nn.functional.normalize(torch.as_tensor(x, dtype=torch.float32), dim=1)
    labels, found = groups.two_level_kmeans(x, 48)
    assert found.shape == (48, 16) and sorted(set(labels.tolist())) == list(range(48))
    assert normalized_mutual_info_score(truth, labels.numpy()) == pytest.approx(1.0)
    for g in range(48):
        mean = torch.nn.functional.normalize(x[labels == g].mean(0), dim=0)
        assert float(mean @ torch.nn.functional.normalize(found[g], dim=0)) > 0.9999
    two, score, k = groups.kmeans_groups(x.numpy(), 48, two_level=True)
    assert k == 48 and normalized_mutual_info_score(truth, two) == pytest.approx(1.0) and score.min() > 0.99


@pytest.mark.parametrize("seed", range(20))
def test_shares_split_k_in_proportion_within_each_cluster(seed):
    rng = np.random.default_rng(seed)
    sizes = torch.as_tensor(rng.integers(0, 40, size=int(rng.integers(2, 12))))
    sizes[0] = max(int(sizes[0]), 1)
    nonempty, n = int((sizes > 0).sum()), int(sizes.sum())
    k = int(rng.integers(nonempty, n + 1))
    shares = groups._shares(sizes, k)
    assert int(shares.sum()) == k
    assert ((shares >= 1) == (sizes > 0)).all() and (shares <= sizes).all()
    exact = sizes.double() * k / n
    free = (shares > 1) & (shares < sizes)  # not held at a bound: within one of its proportion
    assert ((shares - exact).abs()[free] < 1).all()


def test_groups_file_round_trip(tmp_path):
    rows = groups.group_rows(["/a/x.jpg", "/a/y.jpg"], [0, -1], [0.9, 0.5], [-1, -1], [0.7, 0.6])
    for name in ("g.csv", "g.json"):
        groups.write_groups(tmp_path / name, rows, {"method": "kmeans"})
        back = groups.read_groups(tmp_path / name)
        assert back["/a/y.jpg"] == {"group": -1, "group_score": 0.5, "duplicate_group": -1, "duplicate_score": 0.6}
    with pytest.raises(ValueError, match=r"\.csv or a \.json"):
        groups.write_groups(tmp_path / "g.txt", rows, {})
    (tmp_path / "bad.csv").write_text("path,group\n/a/x.jpg,zero\n")
    with pytest.raises(ValueError, match="not a groups file"):
        groups.read_groups(tmp_path / "bad.csv")


def build_copies(root: Path) -> set[frozenset]:
    """24 distinct photos (6 of each of 4 species) and 9 copies: 3 exact, 3 resized to 3/4, 3 recompressed as
    JPEG at quality 50. Returns the true duplicate pairs (of file names)."""
    images = shared_data("CUB_200_2011", "images")
    species = sorted(images.iterdir())[100:104]
    pairs = set()
    for s in species:
        (root / s.name).mkdir(parents=True)
        for f in sorted(s.iterdir())[:6]:
            shutil.copy2(f, root / s.name / f.name)
    originals = sorted(root.glob("*/*.jpg"))
    for n, f in enumerate(originals[::2][:9]):
        copy = f.with_name(f"copy{n}_{f.stem}.jpg")
        with Image.open(f) as im:
            im = im.convert("RGB")
            if n < 3:
                shutil.copy2(f, copy)
            elif n < 6:
                im.resize((im.width * 3 // 4, im.height * 3 // 4), Image.BILINEAR).save(copy, quality=95)
            else:
                buffer = io.BytesIO()
                im.save(buffer, "JPEG", quality=50)
                copy.write_bytes(buffer.getvalue())
        pairs.add(frozenset((f.name, copy.name)))
    return pairs


def test_cluster_finds_copies_of_real_photos_and_not_other_photos_of_a_species(tmp_path, capsys):
    photos = tmp_path / "photos"
    truth = build_copies(photos)
    emb, out, sheet = tmp_path / "p.npz", tmp_path / "groups.csv", tmp_path / "sheet.png"
    assert main(["embed", "pretrained:efficientnet_lite0", str(photos), "-o", str(emb), "--device", "cpu"]) == 0
    capsys.readouterr()
    assert main(["cluster", str(emb), "-o", str(out), "--k", "4", "--sheet", str(sheet)]) == 0
    printed = capsys.readouterr().out
    assert "33 images: 4 groups" in printed and "9 sets of near-duplicates" in printed
    with open(out, newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["path"] for r in rows] == load_embeddings(emb).paths
    by_set = {}
    for r in rows:
        if int(r["duplicate_group"]) >= 0:
            by_set.setdefault(r["duplicate_group"], []).append(Path(r["path"]).name)
    found = {frozenset(p) for names in by_set.values() for p in itertools.combinations(names, 2)}
    precision, recall = len(found & truth) / max(1, len(found)), len(found & truth) / len(truth)
    assert (precision, recall) == (1.0, 1.0)
    # the groups follow the species (pretrained features, 4 species of birds, K = 4)
    species = [Path(r["path"]).parent.name for r in rows]
    nmi = normalized_mutual_info_score(species, [r["group"] for r in rows])
    print(f"NMI of the groups to the species: {nmi:.3f}")
    assert nmi > 0.4
    with Image.open(sheet) as im:
        assert im.format == "PNG" and im.height > 4 * 96
    assert (tmp_path / "sheet_duplicates.png").is_file()
    # the threshold method and JSON output
    assert main(["cluster", str(emb), "-o", str(tmp_path / "g.json"), "--threshold", "0.7"]) == 0
    summary = json.loads((tmp_path / "g.json").read_text())
    assert summary["method"] == "threshold" and summary["count"] == len(summary["images"]) == 33
    assert summary["duplicate_sets"] == 9 and 0 < summary["nearest_neighbour_similarity"]["q0.5"] < 1


def clustered_with_copies(n=6000, d=64, seed=0):
    """Class-structured unit vectors and, for one row in 20, a near-copy of another row (similarity about 0.95)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((n // 40, d))
    x = centres[rng.integers(0, len(centres), n)] + 0.9 * rng.standard_normal((n, d))
    copies = rng.choice(n, n // 20, replace=False)
    x[copies[: len(copies) // 2]] = x[copies[len(copies) // 2 :]] + 0.2 * rng.standard_normal((len(copies) // 2, d))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def duplicate_pairs(sims, idx, threshold):
    rows, cols = np.nonzero(sims.numpy() >= threshold)
    return {tuple(sorted((int(a), int(idx[a, c])))) for a, c in zip(rows, cols)}


def test_approximate_neighbours_miss_few_pairs_and_invent_none():
    """faiss's HNSW graph against the exact pass on 6,000 vectors: every similarity it returns is the true one, the
    near-duplicate pairs at the default threshold are a subset of the exact ones (precision 1) with recall >= 0.99,
    and its nearest neighbour is the true one for almost every row."""
    x = clustered_with_copies()
    exact = groups.nearest_neighbours(x, exact=True)
    approx = groups.nearest_neighbours(x, exact=False)
    assert groups.approximate(len(x), False) and not groups.approximate(len(x), None)  # small: exact by default
    s, i = approx
    np.testing.assert_allclose(s.numpy(), (x[:, None, :] * x[i.numpy()]).sum(2), atol=1e-5)
    assert not (i.numpy() == np.arange(len(x))[:, None]).any()
    truth = duplicate_pairs(*exact, groups.DUPLICATE_THRESHOLD)
    found = duplicate_pairs(*approx, groups.DUPLICATE_THRESHOLD)
    assert len(truth) > 100 and found <= truth and len(found) >= 0.99 * len(truth)
    assert (approx[1][:, 0] == exact[1][:, 0]).float().mean() > 0.99
    dup_a, _ = groups.near_duplicates(x, near=approx)
    dup_e, _ = groups.near_duplicates(x, near=exact)
    assert normalized_mutual_info_score(dup_e, dup_a) > 0.99


def test_cluster_says_how_it_found_neighbours(tmp_path, monkeypatch, capsys):
    from udml.embeddings import Embeddings, save_embeddings

    x = clustered_with_copies(1200, 32)
    save_embeddings(tmp_path / "e.npz", Embeddings(x, [f"/img/{i}.jpg" for i in range(len(x))], {}))
    run = ["cluster", str(tmp_path / "e.npz"), "-o", str(tmp_path / "g.json"), "--k", "5"]
    assert main(run) == 0 and json.loads((tmp_path / "g.json").read_text())["neighbours"] == "exact"
    monkeypatch.setattr(groups, "EXACT_UP_TO", 1000)  # a collection above the size for the exact pass
    assert main(run) == 0 and "found approximately (faiss HNSW)" in capsys.readouterr().out
    summary = json.loads((tmp_path / "g.json").read_text())
    assert summary["neighbours"] == "approximate (faiss HNSW)" and summary["method"] == "kmeans two-level"
    assert main([*run, "--exact"]) == 0 and json.loads((tmp_path / "g.json").read_text())["neighbours"] == "exact"
    assert json.loads((tmp_path / "g.json").read_text())["method"] == "kmeans"
    monkeypatch.setattr(groups, "EXACT_UP_TO", 200_000)
    assert main([*run, "--approximate"]) == 0 and "as asked (--approximate)" in capsys.readouterr().out
    assert json.loads((tmp_path / "g.json").read_text())["neighbours"] == "approximate (faiss HNSW)"
