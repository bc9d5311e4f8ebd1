import glob
import os
from pathlib import Path

import numpy as np
import pytest
import scipy.io
from conftest import shared_data
from PIL import Image

from udml.datasets import DATASETS, ImageSet, load_split


def tiny_image(path: Path, value: int = 0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fmt = {".jpg": "JPEG", ".jpeg": "JPEG", ".png": "PNG"}.get(path.suffix.lower(), "PNG")
    Image.new("RGB", (4, 4), (value, value, value)).save(path, format=fmt)


# --------------------------------------------------------------------------- ImageSet / registry


def test_registry_and_unknown_names(tmp_path):
    assert set(DATASETS) == {"cub", "cars196", "sop", "inshop", "omniglot", "folder", "digits", "omniglot_mini"}
    with pytest.raises(ValueError, match="valid names: .*cub.*digits"):
        load_split("imagenet", tmp_path, "train")
    with pytest.raises(ValueError, match="valid splits: train, test"):
        load_split("digits", None, "val")


def test_imageset_validates_and_counts():
    s = ImageSet(["a", "b", "c"], np.array([0, 1, 1]), "x")
    assert len(s) == 3 and s.num_classes == 2 and s.labels.dtype == np.int64
    assert ImageSet(["a"], None, "x").num_classes == 0
    with pytest.raises(ValueError, match="shape"):
        ImageSet(["a", "b"], np.array([0]), "x")
    with pytest.raises(ValueError, match="class_names"):
        ImageSet(["a"], np.array([3]), "x", ["only"])


def test_missing_root_names_path(tmp_path):
    missing = tmp_path / "nope"
    for name in ("cub", "cars196", "sop", "inshop", "omniglot", "folder"):
        with pytest.raises(FileNotFoundError, match="nope"):
            load_split(name, missing, "train")


# --------------------------------------------------------------------------- CUB on the real data


def test_cub_real_protocol_split():
    root = shared_data("CUB_200_2011")
    # brute-force reference: parse the two files independently
    paths = dict(line.split() for line in open(root / "images.txt"))
    cls = {k: int(v) for k, v in (line.split() for line in open(root / "image_class_labels.txt"))}
    train, test = load_split("cub", root, "train"), load_split("cub", root, "test")
    assert (len(train), train.num_classes) == (5864, 100)
    assert (len(test), test.num_classes) == (5924, 100)
    for s, offset in ((train, 1), (test, 101)):
        assert s.labels.dtype == np.int64 and s.labels.min() == 0 and s.labels.max() == 99
        ref = sorted(
            (int(k), str(root / "images" / p), cls[k] - offset)
            for k, p in paths.items()
            if offset <= cls[k] < offset + 100
        )
        assert s.images == [r[1] for r in ref]
        assert s.labels.tolist() == [r[2] for r in ref]
    assert os.path.exists(train.images[0])
    assert all(f"/{c:03d}." in p for p, c in zip(test.images, test.labels + 101))
    assert test.class_names[0] == "101.White_Pelican" and len(test.class_names) == 100
    assert not set(train.images) & set(test.images)
    # root may be the folder the archive was extracted into
    assert load_split("cub", root.parent, "test").images == test.images


# --------------------------------------------------------------------------- CUB broken copies


def make_cub(root: Path, classes=(1, 2, 101), per_class=2) -> list[str]:
    """A tiny CUB in the official layout; returns the relative image paths in id order."""
    rels = []
    for c in classes:
        for k in range(per_class):
            rels.append(f"{c:03d}.Bird_{c}/Bird_{c}_{k}.jpg")
    (root / "images").mkdir(parents=True)
    for i, rel in enumerate(rels):
        tiny_image(root / "images" / rel, value=i)
    (root / "images.txt").write_text("".join(f"{i} {r}\n" for i, r in enumerate(rels, 1)))
    (root / "image_class_labels.txt").write_text("".join(f"{i} {int(r[:3])}\n" for i, r in enumerate(rels, 1)))
    (root / "classes.txt").write_text("".join(f"{c} {c:03d}.Bird_{c}\n" for c in classes))
    return rels


def test_cub_fixture_loads_non_strict_and_strict_complains(tmp_path):
    rels = make_cub(tmp_path / "CUB_200_2011")
    with pytest.raises(
        ValueError,
        match=r"expected 5,864 images in 100 classes.*found 4 images "
        r"in 2 classes.*image_class_labels.txt",
    ):
        load_split("cub", tmp_path / "CUB_200_2011", "train")
    train = load_split("cub", tmp_path, "train", strict=False)  # parent folder accepted
    test = load_split("cub", tmp_path, "test", strict=False)
    assert train.images == [str(tmp_path / "CUB_200_2011" / "images" / r) for r in rels[:4]]
    assert train.labels.tolist() == [0, 0, 1, 1] and test.labels.tolist() == [0, 0]
    assert test.class_names == ["101.Bird_101"]


def test_cub_missing_images_txt(tmp_path):
    make_cub(tmp_path)
    (tmp_path / "images.txt").unlink()
    with pytest.raises(FileNotFoundError, match=r"images.txt is missing.*images/NNN.Class"):
        load_split("cub", tmp_path, "train", strict=False)


def test_cub_missing_images_dir(tmp_path):
    (tmp_path / "images.txt").write_text("")
    (tmp_path / "image_class_labels.txt").write_text("")
    with pytest.raises(FileNotFoundError, match=r"images is missing"):
        load_split("cub", tmp_path, "train", strict=False)


@pytest.mark.parametrize(
    "bad_line, message",
    [
        ("3 a.jpg extra", r"images.txt:3: expected 2 whitespace-separated fields, got 3"),
        ("x 001.Bird_1/Bird_1_0.jpg", r"images.txt:3: image id must be an integer"),
        ("1 001.Bird_1/Bird_1_0.jpg", r"images.txt:3: duplicate image id 1"),
    ],
)
def test_cub_malformed_images_txt(tmp_path, bad_line, message):
    make_cub(tmp_path)
    lines = (tmp_path / "images.txt").read_text().splitlines()
    lines[2] = bad_line
    (tmp_path / "images.txt").write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=message):
        load_split("cub", tmp_path, "train", strict=False)


def test_cub_malformed_labels(tmp_path):
    make_cub(tmp_path)
    labels = tmp_path / "image_class_labels.txt"
    lines = labels.read_text().splitlines()
    labels.write_text("\n".join(lines[:-1] + ["6 201"]) + "\n")
    with pytest.raises(ValueError, match=r"image_class_labels.txt:6: class id must be in 1..200"):
        load_split("cub", tmp_path, "train", strict=False)
    labels.write_text("\n".join(lines[:-1] + ["99 1"]) + "\n")
    with pytest.raises(ValueError, match=r"image_class_labels.txt:6: image id 99 is not listed"):
        load_split("cub", tmp_path, "train", strict=False)
    labels.write_text("\n".join(lines[:-1]) + "\n")
    with pytest.raises(ValueError, match=r"1 image id\(s\) have no class.*first: 6"):
        load_split("cub", tmp_path, "train", strict=False)


def test_cub_missing_image_file(tmp_path):
    rels = make_cub(tmp_path)
    (tmp_path / "images" / rels[1]).unlink()
    with pytest.raises(
        FileNotFoundError,
        match=r"1 image\(s\) listed in .*images.txt are missing"
        r".*Bird_1_1.jpg",
    ):
        load_split("cub", tmp_path, "train", strict=False)
    # the missing file belongs to a train class, so the test split still loads
    assert len(load_split("cub", tmp_path, "test", strict=False)) == 2


# --------------------------------------------------------------------------- Omniglot


def test_omniglot_real_counts():
    root = shared_data("omniglot")
    for split, sub, n, k in (("train", "images_background", 19280, 964), ("test", "images_evaluation", 13180, 659)):
        s = load_split("omniglot", root, split)
        assert (len(s), s.num_classes) == (n, k)
        ref = sorted(glob.glob(str(root / sub / "*" / "*" / "*.png")))
        assert sorted(s.images) == ref
        # every image's label names its own alphabet/character folder
        for i in range(0, n, 997):
            assert s.images[i].split(os.sep)[-3:-1] == s.class_names[s.labels[i]].split("/")
        assert np.bincount(s.labels).tolist() == [20] * k


def test_omniglot_validation_split_holds_out_whole_background_alphabets():
    root = shared_data("omniglot")
    full, tv, val = (load_split("omniglot", root, sp) for sp in ("train", "train_val", "val"))
    assert (len(tv), tv.num_classes, len(val), val.num_classes) == (15740, 787, 3540, 177)
    assert sorted(tv.images + val.images) == sorted(full.images)
    alphabets = lambda s: {c.split("/")[0] for c in s.class_names}  # noqa: E731
    assert len(alphabets(val)) == 5 and not alphabets(val) & alphabets(tv)
    for s in (tv, val):  # labels renumbered 0..C-1 and still naming each image's own character
        assert np.bincount(s.labels).tolist() == [20] * s.num_classes
        for i in range(0, len(s), 701):
            assert s.images[i].split(os.sep)[-3:-1] == s.class_names[s.labels[i]].split("/")


def test_cub_validation_split_holds_out_every_fourth_training_class():
    root = shared_data("CUB_200_2011")
    full, tv, val = (load_split("cub", root, sp) for sp in ("train", "train_val", "val"))
    assert (len(tv), tv.num_classes, len(val), val.num_classes) == (4407, 75, 1457, 25)
    assert sorted(tv.images + val.images) == sorted(full.images)
    assert val.class_names[:2] == ["004.Groove_billed_Ani", "008.Rhinoceros_Auklet"]
    assert not set(val.class_names) & set(tv.class_names)
    assert not set(val.class_names) & set(load_split("cub", root, "test").class_names)
    for s in (tv, val):  # labels renumbered 0..C-1 and still naming each image's own class folder
        assert sorted(set(s.labels.tolist())) == list(range(s.num_classes))
        for i in range(0, len(s), 97):
            assert s.images[i].split(os.sep)[-2] == s.class_names[s.labels[i]]


def test_omniglot_fixture(tmp_path):
    for alpha, chars in (("Latin", ("character01", "character02")), ("Greek", ("character01",))):
        for c in chars:
            for d in range(1, 21):
                tiny_image(tmp_path / "images_background" / alpha / c / f"{d:02d}.png")
    (tmp_path / "images_background" / "Latin" / "notes.txt").write_text("x")
    s = load_split("omniglot", tmp_path, "train", strict=False)
    assert s.class_names == ["Greek/character01", "Latin/character01", "Latin/character02"]
    assert np.bincount(s.labels).tolist() == [20, 20, 20]
    with pytest.raises(ValueError, match=r"expected 19,280 images in 964 classes.*found 60 images in 3 classes"):
        load_split("omniglot", tmp_path, "train")
    os.remove(tmp_path / "images_background" / "Greek" / "character01" / "05.png")
    with pytest.raises(ValueError, match=r"must hold 20 png.*Greek/character01 \(19\)"):
        load_split("omniglot", tmp_path, "train")
    with pytest.raises(FileNotFoundError, match="images_evaluation is missing"):
        load_split("omniglot", tmp_path, "test", strict=False)


# --------------------------------------------------------------------------- Cars196


def write_cars(root: Path, classes: list[int]) -> list[str]:
    rels = [f"car_ims/{i:06d}.jpg" for i in range(1, len(classes) + 1)]
    annos = np.zeros((1, len(classes)), dtype=[("relative_im_path", "O"), ("class", "O"), ("test", "O")])
    for k, (rel, c) in enumerate(zip(rels, classes)):
        annos[0, k] = (rel, np.array([[c]], dtype=np.uint8), np.array([[k % 2]], dtype=np.uint8))
    names = np.empty((1, 196), dtype="O")
    for c in range(196):
        names[0, c] = f"Car model {c + 1}"
    scipy.io.savemat(root / "cars_annos.mat", {"annotations": annos, "class_names": names})
    for rel in rels:
        tiny_image(root / rel)
    return rels


def test_cars196_fixture(tmp_path):
    classes = [1, 99, 98, 1, 196, 5]
    rels = write_cars(tmp_path, classes)
    train = load_split("cars196", tmp_path, "train", strict=False)
    test = load_split("cars196", tmp_path, "test", strict=False)
    ref_train = [(str(tmp_path / r), c) for r, c in zip(rels, classes) if c <= 98]
    assert train.images == [r[0] for r in ref_train]
    assert train.class_names == ["Car model 1", "Car model 5", "Car model 98"]
    assert [train.class_names[c] for c in train.labels] == [f"Car model {r[1]}" for r in ref_train]
    assert test.images == [str(tmp_path / rels[1]), str(tmp_path / rels[4])]
    assert test.labels.tolist() == [0, 1] and test.class_names == ["Car model 99", "Car model 196"]
    with pytest.raises(
        ValueError,
        match=r"expected 8,054 images in 98 classes.*found 4 images in "
        r"3 classes.*cars_annos.mat.*strict=False",
    ):
        load_split("cars196", tmp_path, "train")
    os.remove(tmp_path / rels[-1])  # the last train image
    with pytest.raises(FileNotFoundError, match="000006.jpg listed in .*cars_annos.mat"):
        load_split("cars196", tmp_path, "train", strict=False)


def test_cars196_bad_mat(tmp_path):
    scipy.io.savemat(tmp_path / "cars_annos.mat", {"something": np.zeros(3)})
    with pytest.raises(ValueError, match="no struct array 'annotations'"):
        load_split("cars196", tmp_path, "train", strict=False)
    with pytest.raises(FileNotFoundError, match="cars_annos.mat is missing"):
        load_split("cars196", tmp_path / "..", "train", strict=False)


# --------------------------------------------------------------------------- SOP


def write_sop(root: Path) -> dict[str, list[tuple[str, int]]]:
    rows = {
        "train": [
            ("bicycle_final/1_0.JPG", 1),
            ("bicycle_final/1_1.JPG", 1),
            ("chair_final/7_0.JPG", 7),
            ("bicycle_final/3_0.JPG", 3),
        ],
        "test": [("sofa_final/20_0.JPG", 20), ("kettle_final/11_0.JPG", 11)],
    }
    for split, items in rows.items():
        lines = ["image_id class_id super_class_id path"]
        lines += [f"{i} {c} 1 {p}" for i, (p, c) in enumerate(items, 1)]
        (root / f"Ebay_{split}.txt").write_text("\n".join(lines) + "\n")
        for p, _ in items:
            tiny_image(root / p)
    return rows


def test_sop_fixture(tmp_path):
    root = tmp_path / "Stanford_Online_Products"
    root.mkdir()
    rows = write_sop(root)
    for split in ("train", "test"):
        s = load_split("sop", tmp_path, split, strict=False)  # parent folder accepted
        assert s.images == [str(root / p) for p, _ in rows[split]]
        uniq = sorted({c for _, c in rows[split]})
        assert s.labels.tolist() == [uniq.index(c) for _, c in rows[split]]
        assert s.class_names == [str(c) for c in uniq]
    with pytest.raises(
        ValueError,
        match=r"expected 59,551 images in 11,318 classes.*found 4 "
        r"images in 3 classes.*Ebay_train.txt",
    ):
        load_split("sop", root, "train")


def test_sop_bad_header_and_row(tmp_path):
    write_sop(tmp_path)
    path = tmp_path / "Ebay_train.txt"
    lines = path.read_text().splitlines()
    path.write_text("\n".join(lines[1:]) + "\n")
    with pytest.raises(ValueError, match=r"Ebay_train.txt:1: expected the header"):
        load_split("sop", tmp_path, "train", strict=False)
    path.write_text("\n".join(lines[:2] + ["3 x 1 a.JPG"] + lines[3:]) + "\n")
    with pytest.raises(ValueError, match=r"Ebay_train.txt:3: class_id must be an integer"):
        load_split("sop", tmp_path, "train", strict=False)


# --------------------------------------------------------------------------- In-Shop


INSHOP_ROWS = [
    ("img/WOMEN/Dresses/id_00000002/02_1_front.jpg", "id_00000002", "train"),
    ("img/WOMEN/Dresses/id_00000002/02_2_side.jpg", "id_00000002", "train"),
    ("img/MEN/Denim/id_00000080/01_1_front.jpg", "id_00000080", "train"),
    ("img/WOMEN/Skirts/id_00000009/01_1_front.jpg", "id_00000009", "query"),
    ("img/MEN/Pants/id_00000001/01_1_front.jpg", "id_00000001", "gallery"),
    ("img/WOMEN/Skirts/id_00000009/01_2_side.jpg", "id_00000009", "gallery"),
    ("img/MEN/Tees/id_00000005/01_1_front.jpg", "id_00000005", "query"),
    ("img/MEN/Tees/id_00000005/01_2_side.jpg", "id_00000005", "gallery"),
]


def write_inshop(root: Path, rows=INSHOP_ROWS, declared=None) -> None:
    lines = [str(len(rows) if declared is None else declared), "image_name item_id evaluation_status"]
    lines += [f"{p}   {i} {s}" for p, i, s in rows]
    (root / "Eval").mkdir(parents=True, exist_ok=True)
    (root / "Eval" / "list_eval_partition.txt").write_text("\n".join(lines) + "\n")
    for p, _, _ in rows:
        tiny_image(root / p)


def test_inshop_fixture_shared_query_gallery_labels(tmp_path):
    write_inshop(tmp_path)
    train = load_split("inshop", tmp_path, "train", strict=False)
    query = load_split("inshop", tmp_path, "query", strict=False)
    gallery = load_split("inshop", tmp_path, "gallery", strict=False)
    assert train.images == [str(tmp_path / r[0]) for r in INSHOP_ROWS[:3]]
    assert train.labels.tolist() == [0, 0, 1]
    assert query.images == [str(tmp_path / INSHOP_ROWS[i][0]) for i in (3, 6)]
    assert gallery.images == [str(tmp_path / INSHOP_ROWS[i][0]) for i in (4, 5, 7)]
    # brute force: same item string <=> same label, across query and gallery
    items = {"query": [INSHOP_ROWS[i][1] for i in (3, 6)], "gallery": [INSHOP_ROWS[i][1] for i in (4, 5, 7)]}
    pairs = [(q, g) for q in range(2) for g in range(3)]
    for q, g in pairs:
        assert (query.labels[q] == gallery.labels[g]) == (items["query"][q] == items["gallery"][g])
    assert query.class_names == gallery.class_names == ["id_00000001", "id_00000005", "id_00000009"]
    with pytest.raises(
        ValueError,
        match=r"expected 14,218 images in 3,985 items.*found 2 images "
        r"in 3 items.*list_eval_partition.txt",
    ):
        load_split("inshop", tmp_path, "query")


def test_inshop_malformed(tmp_path):
    write_inshop(tmp_path, declared=9)
    with pytest.raises(ValueError, match="declares 9 images but 8 rows follow"):
        load_split("inshop", tmp_path, "train", strict=False)
    write_inshop(tmp_path, rows=INSHOP_ROWS[:2] + [("img/a.jpg", "id_1", "val")])
    with pytest.raises(ValueError, match=r"list_eval_partition.txt:5: evaluation_status must be"):
        load_split("inshop", tmp_path, "train", strict=False)


# --------------------------------------------------------------------------- folder


def test_folder_recursive_mixed_case_and_labels(tmp_path):
    files = [
        "cats/a.JPG",
        "cats/deep/nested/b.png",
        "dogs/c.jpeg",
        "dogs/d.WebP",
        "dogs/e.TIFF",
        "birds/x/y/f.bmp",
        "birds/g.gif",
    ]
    for f in files:
        tiny_image(tmp_path / f)
    (tmp_path / "cats" / "notes.txt").write_text("not an image")
    (tmp_path / "dogs" / "labels.csv").write_text("a,b")
    (tmp_path / "dogs" / "model.pt").write_bytes(b"\0")
    (tmp_path / "empty").mkdir()
    ref = sorted(str(tmp_path / f) for f in files)

    train = load_split("folder", tmp_path, "train")
    assert train.images == ref and train.labels is None and train.num_classes == 0
    for split in ("test", "all"):
        s = load_split("folder", tmp_path, split)
        assert s.images == ref and s.class_names == ["birds", "cats", "dogs"]
        assert [s.class_names[c] for c in s.labels] == [os.path.relpath(p, tmp_path).split(os.sep)[0] for p in ref]


def test_folder_errors(tmp_path):
    (tmp_path / "readme.md").write_text("x")
    with pytest.raises(ValueError, match=r"no images found under .* with the extensions jpg"):
        load_split("folder", tmp_path, "train")
    tiny_image(tmp_path / "loose.png")
    tiny_image(tmp_path / "cls" / "ok.png")
    assert len(load_split("folder", tmp_path, "train")) == 2
    with pytest.raises(ValueError, match=r"lie directly in it.*loose.png.*class sub-folders"):
        load_split("folder", tmp_path, "test")


# --------------------------------------------------------------------------- digits


def test_digits_splits():
    from sklearn.datasets import load_digits

    ref = load_digits()
    train, test = load_split("digits", None, "train"), load_split("digits", "ignored", "test")
    assert len(train) == int((ref.target < 5).sum()) and len(test) == int((ref.target >= 5).sum())
    assert len(train) + len(test) == 1797
    assert sorted(set(train.labels.tolist())) == sorted(set(test.labels.tolist())) == [0, 1, 2, 3, 4]
    assert train.class_names == list("01234") and test.class_names == list("56789")
    assert all(im.mode == "L" and im.size == (32, 32) for im in train.images + test.images)
    # brute-force reference for one test image: scale 0-16 to 0-255, bicubic upscale
    k = int(np.flatnonzero(ref.target >= 5)[3])
    raw = np.rint(ref.images[k] * 255 / 16).astype(np.uint8)
    expected = np.asarray(Image.fromarray(raw).resize((32, 32), Image.Resampling.BICUBIC))
    assert test.labels[3] == ref.target[k] - 5
    np.testing.assert_array_equal(np.asarray(test.images[3]), expected)
    assert np.asarray(train.images[0]).max() > 200  # full 0-255 range, not 0-16
