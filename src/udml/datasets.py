"""Readers for the image-retrieval data-set layouts used in deep metric learning.

Each loader parses one official on-disk layout into an :class:`ImageSet` (image paths and
integer labels) for one split of the class-disjoint protocol: the classes seen in training
never appear at test time. Decoding images and building torch Datasets happens elsewhere.

Checks are sized to the data set. CUB-200-2011 (11,788 images) and Omniglot (32,460) are
small enough to check that every listed image exists. For Cars196, Stanford Online Products
and In-Shop (16k-120k images, often on network storage) only the metadata files, the image
folder and the first and last listed image are checked; a missing image then surfaces when it
is opened.

With ``strict=True`` (the default) a loader also compares its counts with the canonical ones
of the full data set and raises if they differ, so a partial download does not silently
produce numbers that cannot be compared with published ones. ``strict=False`` skips that
comparison (for subsets and test fixtures); format errors are raised either way.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image

from .errors import InputError, MissingPath

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".avif", ".tif", ".tiff", ".gif")


@dataclass
class ImageSet:
    """One split of a data set: images (paths or in-memory PIL images) and their labels."""

    images: list
    labels: np.ndarray | None
    name: str
    class_names: list[str] | None = None

    def __post_init__(self) -> None:
        if self.labels is not None:
            self.labels = np.asarray(self.labels, dtype=np.int64)
            if self.labels.shape != (len(self.images),):
                raise InputError(
                    f"{self.name}: labels must have shape ({len(self.images)},) to match the "
                    f"images, got {self.labels.shape}"
                )
        if self.class_names is not None and self.labels is not None and len(self.labels):
            if self.labels.min() < 0 or self.labels.max() >= len(self.class_names):
                raise InputError(
                    f"{self.name}: labels must lie in [0, {len(self.class_names)}) to index "
                    f"class_names, got range [{self.labels.min()}, {self.labels.max()}]"
                )

    def __len__(self) -> int:
        return len(self.images)

    @property
    def num_classes(self) -> int:
        """Number of classes; 0 for an unlabelled set."""
        if self.labels is None:
            return 0
        if self.class_names is not None:
            return len(self.class_names)
        return int(np.unique(self.labels).size)


# ---------------------------------------------------------------------------------------------
# shared helpers


def _check_split(dataset: str, split: str, valid: tuple[str, ...]) -> None:
    if split not in valid:
        raise InputError(f"{dataset}: unknown split {split!r}; valid splits: {', '.join(valid)}")


def _existing_folder(root: str | Path | None, dataset: str, layout: str) -> Path:
    """``root`` as a Path, which must be an existing folder (``layout`` says what it should hold)."""
    if root is None:
        raise InputError(f"{dataset}: root is required; pass the folder holding {layout}")
    root = Path(root).expanduser()
    if not root.is_dir():
        raise MissingPath(f"{dataset}: data-set folder {root} does not exist; expected a folder holding {layout}")
    return root


def _resolve_root(root: str | Path | None, dataset: str, marker: str, folder: str, layout: str) -> Path:
    """Return the data-set root: ``root`` itself, or ``root/folder`` when ``root`` is the
    parent the archive was extracted into. ``marker`` is a file or folder the root must hold."""
    root = _existing_folder(root, dataset, layout)
    if not (root / marker).exists() and (root / folder / marker).exists():
        return root / folder
    return root


def _require(path: Path, dataset: str, layout: str) -> Path:
    if not path.exists():
        raise MissingPath(f"{dataset}: {path} is missing; expected layout: {layout}")
    return path


def _read_rows(path: Path, n_fields: int, layout: str, skip: int = 0) -> list[tuple[int, list[str]]]:
    """Whitespace-separated rows of a metadata file as (line number, fields); blank lines are
    skipped, any other line without exactly ``n_fields`` fields raises."""
    rows = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if lineno <= skip or not line.strip():
                continue
            fields = line.split()
            if len(fields) != n_fields:
                raise InputError(
                    f"{path}:{lineno}: expected {n_fields} whitespace-separated fields, got "
                    f"{len(fields)} in {line.rstrip()!r}; expected layout: {layout}"
                )
            rows.append((lineno, fields))
    return rows


def _to_int(value: str, path: Path, lineno: int, what: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise InputError(f"{path}:{lineno}: {what} must be an integer, got {value!r}") from None


def _dense_labels(ids) -> tuple[np.ndarray, list]:
    """Map arbitrary class ids to 0..K-1 in sorted order; returns (labels, sorted unique ids)."""
    uniq, labels = np.unique(np.asarray(ids), return_inverse=True)
    return labels.astype(np.int64), uniq.tolist()


def _check_counts(
    name: str, strict: bool, source: Path, expected: tuple[int, int], found: tuple[int, int], unit: str = "classes"
) -> None:
    if strict and tuple(found) != tuple(expected):
        raise InputError(
            f"{name}: expected {expected[0]:,} images in {expected[1]:,} {unit} (the canonical "
            f"split), found {found[0]:,} images in {found[1]:,} {unit} according to {source}. "
            f"The copy is incomplete or not the official release; pass strict=False to load "
            f"it anyway (results will not be comparable with published ones)."
        )


def _spot_check_images(paths: list[str], dataset: str, source: Path, layout: str) -> None:
    """Cheap existence check for large sets: the first and the last listed image."""
    for p in {paths[0], paths[-1]} if paths else ():
        if not os.path.exists(p):
            raise MissingPath(f"{dataset}: image {p} listed in {source} is missing; expected layout: {layout}")


# ---------------------------------------------------------------------------------------------
# CUB-200-2011

CUB_LAYOUT = (
    "root/images.txt ('<image_id> <path>'), root/image_class_labels.txt "
    "('<image_id> <class_id 1-200>'), root/images/NNN.Class_Name/*.jpg, optional "
    "root/classes.txt ('<class_id> <name>'); root may also be the folder containing CUB_200_2011/"
)
CUB_COUNTS = {"train": (5864, 100), "test": (5924, 100)}


CUB_VAL_EVERY = 4  # training classes 4, 8, ..., 100 form the validation split


def _keep_classes(full: ImageSet, keep_class: np.ndarray, name: str) -> ImageSet:
    """The images of the classes where ``keep_class`` is true, relabelled 0..n-1 in order."""
    keep = keep_class[full.labels]
    classes = np.flatnonzero(keep_class)
    relabel = np.full(len(full.class_names), -1)
    relabel[classes] = np.arange(len(classes))
    return ImageSet(
        [f for f, k in zip(full.images, keep) if k],
        relabel[full.labels[keep]],
        name,
        [full.class_names[c] for c in classes],
    )


def load_cub(root: str | Path | None, split: str, *, strict: bool = True) -> ImageSet:
    """CUB-200-2011 with the metric-learning split: classes 1-100 train, 101-200 test.

    ``train_test_split.txt`` (the classification split) is deliberately not used.

    For choosing settings without the test classes: ``val`` holds every fourth training class (classes 4, 8,
    ..., 100: 25 classes), ``train_val`` the other 75.
    """
    _check_split("cub", split, ("train", "test", "train_val", "val"))
    if split in ("train_val", "val"):
        full = load_cub(root, "train", strict=strict)
        held = np.arange(len(full.class_names)) % CUB_VAL_EVERY == CUB_VAL_EVERY - 1
        return _keep_classes(full, held if split == "val" else ~held, f"cub/{split}")
    root = _resolve_root(root, "cub", "images.txt", "CUB_200_2011", CUB_LAYOUT)
    images_txt = _require(root / "images.txt", "cub", CUB_LAYOUT)
    labels_txt = _require(root / "image_class_labels.txt", "cub", CUB_LAYOUT)
    image_dir = _require(root / "images", "cub", CUB_LAYOUT)

    paths: dict[int, str] = {}
    for lineno, (sid, rel) in _read_rows(images_txt, 2, CUB_LAYOUT):
        iid = _to_int(sid, images_txt, lineno, "image id")
        if iid in paths:
            raise InputError(f"{images_txt}:{lineno}: duplicate image id {iid}")
        paths[iid] = rel
    classes: dict[int, int] = {}
    for lineno, (sid, scls) in _read_rows(labels_txt, 2, CUB_LAYOUT):
        iid = _to_int(sid, labels_txt, lineno, "image id")
        cls = _to_int(scls, labels_txt, lineno, "class id")
        if iid in classes:
            raise InputError(f"{labels_txt}:{lineno}: duplicate image id {iid}")
        if not 1 <= cls <= 200:
            raise InputError(f"{labels_txt}:{lineno}: class id must be in 1..200, got {cls}")
        if iid not in paths:
            raise InputError(
                f"{labels_txt}:{lineno}: image id {iid} is not listed in {images_txt}; the two "
                f"files must list the same image ids"
            )
        classes[iid] = cls
    unlabelled = sorted(paths.keys() - classes.keys())
    if unlabelled:
        raise InputError(
            f"{images_txt}: {len(unlabelled)} image id(s) have no class in {labels_txt} "
            f"(first: {unlabelled[0]}); the two files must list the same image ids"
        )

    names: dict[int, str] = {}
    classes_txt = root / "classes.txt"
    if classes_txt.exists():
        for lineno, (scls, cname) in _read_rows(classes_txt, 2, CUB_LAYOUT):
            names[_to_int(scls, classes_txt, lineno, "class id")] = cname

    lo, hi = (1, 100) if split == "train" else (101, 200)
    ids = sorted(i for i, c in classes.items() if lo <= c <= hi)
    files = [str(image_dir / paths[i]) for i in ids]
    missing = [f for f in files if not os.path.exists(f)]
    if missing:
        raise MissingPath(
            f"cub: {len(missing)} image(s) listed in {images_txt} are missing (first: "
            f"{missing[0]}); expected layout: {CUB_LAYOUT}"
        )
    labels, class_ids = _dense_labels([classes[i] for i in ids])
    name = f"cub/{split}"
    _check_counts(name, strict, labels_txt, CUB_COUNTS[split], (len(files), len(class_ids)))
    class_names = [names.get(c, str(c)) for c in class_ids]
    return ImageSet(files, labels, name, class_names)


# ---------------------------------------------------------------------------------------------
# Cars196

CARS_LAYOUT = (
    "root/cars_annos.mat (struct array 'annotations' with fields relative_im_path and class "
    "1-196, optional cell array 'class_names') and root/car_ims/*.jpg"
)
CARS_COUNTS = {"train": (8054, 98), "test": (8131, 98)}


def _mat_scalar(value):
    """Unwrap the nested 1x1 arrays loadmat puts around struct fields."""
    while isinstance(value, np.ndarray):
        if value.size != 1:
            raise InputError(f"expected a single value, got an array of shape {value.shape}")
        value = value.reshape(-1)[0]
    return value


def load_cars196(root: str | Path | None, split: str, *, strict: bool = True) -> ImageSet:
    """Cars196 (Stanford Cars) with the metric-learning split: classes 1-98 train, 99-196 test."""
    from scipy.io import loadmat

    _check_split("cars196", split, ("train", "test"))
    root = _resolve_root(root, "cars196", "cars_annos.mat", "cars196", CARS_LAYOUT)
    mat_path = _require(root / "cars_annos.mat", "cars196", CARS_LAYOUT)
    try:
        mat = loadmat(str(mat_path))
    except Exception as e:  # scipy raises several types for corrupt files
        raise InputError(f"{mat_path}: cannot be read as a MATLAB file ({e})") from e
    annos = mat.get("annotations")
    if annos is None or annos.dtype.names is None or not {"relative_im_path", "class"} <= set(annos.dtype.names):
        raise InputError(
            f"{mat_path}: no struct array 'annotations' with fields relative_im_path and class; "
            f"expected layout: {CARS_LAYOUT}"
        )
    annos = annos.reshape(-1)
    rel_paths, classes = [], []
    for k, a in enumerate(annos):
        try:
            rel = str(_mat_scalar(a["relative_im_path"]))
            cls = int(_mat_scalar(a["class"]))
        except (ValueError, TypeError) as e:
            raise InputError(f"{mat_path}: annotations[{k}] is malformed ({e})") from e
        if not 1 <= cls <= 196:
            raise InputError(f"{mat_path}: annotations[{k}].class must be in 1..196, got {cls}")
        rel_paths.append(rel)
        classes.append(cls)
    names = {}
    if "class_names" in mat:
        for k, n in enumerate(mat["class_names"].reshape(-1), start=1):
            names[k] = str(_mat_scalar(n))

    lo, hi = (1, 98) if split == "train" else (99, 196)
    keep = [k for k, c in enumerate(classes) if lo <= c <= hi]
    files = [str(root / rel_paths[k]) for k in keep]
    _require(root / "car_ims", "cars196", CARS_LAYOUT)
    _spot_check_images(files, "cars196", mat_path, CARS_LAYOUT)
    labels, class_ids = _dense_labels([classes[k] for k in keep])
    name = f"cars196/{split}"
    _check_counts(name, strict, mat_path, CARS_COUNTS[split], (len(files), len(class_ids)))
    return ImageSet(files, labels, name, [names.get(c, str(c)) for c in class_ids])


# ---------------------------------------------------------------------------------------------
# Stanford Online Products

SOP_LAYOUT = (
    "root/Ebay_train.txt and root/Ebay_test.txt (header 'image_id class_id super_class_id "
    "path', then one row per image) and the images under root/<category>_final/; root may also "
    "be the folder containing Stanford_Online_Products/"
)
SOP_COUNTS = {"train": (59551, 11318), "test": (60502, 11316)}


def load_sop(root: str | Path | None, split: str, *, strict: bool = True) -> ImageSet:
    """Stanford Online Products: the official Ebay_train / Ebay_test split (disjoint products)."""
    _check_split("sop", split, ("train", "test"))
    root = _resolve_root(root, "sop", "Ebay_train.txt", "Stanford_Online_Products", SOP_LAYOUT)
    list_path = _require(root / f"Ebay_{split}.txt", "sop", SOP_LAYOUT)
    with open(list_path, encoding="utf-8") as f:
        header = f.readline().split()
    if header != ["image_id", "class_id", "super_class_id", "path"]:
        raise InputError(
            f"{list_path}:1: expected the header 'image_id class_id super_class_id path', got "
            f"{' '.join(header)!r}; expected layout: {SOP_LAYOUT}"
        )
    files, class_ids = [], []
    for lineno, (_, scls, _, rel) in _read_rows(list_path, 4, SOP_LAYOUT, skip=1):
        class_ids.append(_to_int(scls, list_path, lineno, "class_id"))
        files.append(str(root / rel))
    if not files:
        raise InputError(f"{list_path}: lists no images; expected layout: {SOP_LAYOUT}")
    _spot_check_images(files, "sop", list_path, SOP_LAYOUT)
    labels, uniq = _dense_labels(class_ids)
    name = f"sop/{split}"
    _check_counts(name, strict, list_path, SOP_COUNTS[split], (len(files), len(uniq)))
    return ImageSet(files, labels, name, [str(c) for c in uniq])


# ---------------------------------------------------------------------------------------------
# In-Shop Clothes Retrieval

INSHOP_LAYOUT = (
    "root/list_eval_partition.txt or root/Eval/list_eval_partition.txt (first line the number "
    "of images, second the header 'image_name item_id evaluation_status', then one row per "
    "image) and the images under root/img/"
)
INSHOP_COUNTS = {"train": (25882, 3997), "query": (14218, None), "gallery": (12612, None)}
INSHOP_TEST_ITEMS = 3985


def load_inshop(root: str | Path | None, split: str, *, strict: bool = True) -> ImageSet:
    """In-Shop Clothes Retrieval: train items, and the query / gallery sets of the test items.

    Query and gallery share one item-id-to-label mapping, built over both, so that a query and
    its gallery matches carry the same label.
    """
    _check_split("inshop", split, ("train", "query", "gallery"))
    root = _existing_folder(root, "inshop", INSHOP_LAYOUT)
    list_path = root / "list_eval_partition.txt"
    if not list_path.exists() and (root / "Eval" / "list_eval_partition.txt").exists():
        list_path = root / "Eval" / "list_eval_partition.txt"
    _require(list_path, "inshop", INSHOP_LAYOUT)
    with open(list_path, encoding="utf-8") as f:
        first, header = f.readline().strip(), f.readline().split()
    declared = _to_int(first, list_path, 1, "the image count on the first line")
    if header != ["image_name", "item_id", "evaluation_status"]:
        raise InputError(
            f"{list_path}:2: expected the header 'image_name item_id evaluation_status', got "
            f"{' '.join(header)!r}; expected layout: {INSHOP_LAYOUT}"
        )
    rows = _read_rows(list_path, 3, INSHOP_LAYOUT, skip=2)
    if len(rows) != declared:
        raise InputError(
            f"{list_path}: the first line declares {declared:,} images but {len(rows):,} rows "
            f"follow; the file is truncated or edited"
        )
    by_split: dict[str, list[tuple[str, str]]] = {"train": [], "query": [], "gallery": []}
    for lineno, (rel, item, status) in rows:
        if status not in by_split:
            raise InputError(f"{list_path}:{lineno}: evaluation_status must be train, query or gallery, got {status!r}")
        by_split[status].append((rel, item))

    selected = by_split[split]
    files = [str(root / rel) for rel, _ in selected]
    if not files:
        raise InputError(f"{list_path}: lists no {split} images; expected layout: {INSHOP_LAYOUT}")
    _spot_check_images(files, "inshop", list_path, INSHOP_LAYOUT)
    if split == "train":
        item_ids = sorted({item for _, item in selected})
    else:
        item_ids = sorted({item for s in ("query", "gallery") for _, item in by_split[s]})
    index = {item: k for k, item in enumerate(item_ids)}
    labels = np.array([index[item] for _, item in selected], dtype=np.int64)
    name = f"inshop/{split}"
    expected_n, expected_items = INSHOP_COUNTS[split]
    if expected_items is None:
        expected_items = INSHOP_TEST_ITEMS
    _check_counts(name, strict, list_path, (expected_n, expected_items), (len(files), len(item_ids)), unit="items")
    return ImageSet(files, labels, name, item_ids)


# ---------------------------------------------------------------------------------------------
# Omniglot

OMNIGLOT_LAYOUT = (
    "root/images_background/<Alphabet>/<character>/*.png (train) and "
    "root/images_evaluation/<Alphabet>/<character>/*.png (test); root may also be the folder "
    "containing omniglot/"
)
OMNIGLOT_COUNTS = {"train": (19280, 964), "test": (13180, 659)}
OMNIGLOT_DRAWERS = 20


def _sorted_entries(path: Path, dirs: bool) -> list[os.DirEntry]:
    with os.scandir(path) as it:
        return sorted((e for e in it if e.is_dir() == dirs and not e.name.startswith(".")), key=lambda e: e.name)


OMNIGLOT_VAL_EVERY = 6  # background alphabets 0, 6, 12, 18, 24 (sorted by name) form the validation split


def load_omniglot(root: str | Path | None, split: str, *, strict: bool = True) -> ImageSet:
    """Omniglot: images_background for train, images_evaluation for test; one class per
    character, named '<Alphabet>/<character>'.

    For choosing settings without the test alphabets: ``train_val`` is images_background without every
    sixth alphabet (25 alphabets), ``val`` those 5 held-out background alphabets."""
    _check_split("omniglot", split, ("train", "test", "train_val", "val"))
    if split in ("train_val", "val"):
        full = load_omniglot(root, "train", strict=strict)
        alphabets = sorted({c.split("/")[0] for c in full.class_names})
        held = set(alphabets[::OMNIGLOT_VAL_EVERY])
        keep_class = np.array([(c.split("/")[0] in held) == (split == "val") for c in full.class_names])
        return _keep_classes(full, keep_class, f"omniglot/{split}")
    sub = "images_background" if split == "train" else "images_evaluation"
    root = _resolve_root(root, "omniglot", sub, "omniglot", OMNIGLOT_LAYOUT)
    split_dir = _require(root / sub, "omniglot", OMNIGLOT_LAYOUT)

    files, labels, class_names, wrong = [], [], [], []
    for alphabet in _sorted_entries(split_dir, dirs=True):
        for char in _sorted_entries(Path(alphabet.path), dirs=True):
            pngs = [e.path for e in _sorted_entries(Path(char.path), dirs=False) if e.name.lower().endswith(".png")]
            if not pngs:
                continue
            if len(pngs) != OMNIGLOT_DRAWERS:
                wrong.append(f"{char.path} ({len(pngs)})")
            labels += [len(class_names)] * len(pngs)
            files += pngs
            class_names.append(f"{alphabet.name}/{char.name}")
    if not files:
        raise InputError(f"omniglot: no .png images under {split_dir}; expected layout: {OMNIGLOT_LAYOUT}")
    name = f"omniglot/{split}"
    if strict and wrong:
        raise InputError(
            f"{name}: every character folder must hold {OMNIGLOT_DRAWERS} png images; "
            f"{len(wrong)} do not, e.g. {', '.join(wrong[:3])}. Pass strict=False to load anyway."
        )
    _check_counts(name, strict, split_dir, OMNIGLOT_COUNTS[split], (len(files), len(class_names)))
    return ImageSet(files, np.array(labels, dtype=np.int64), name, class_names)


# ---------------------------------------------------------------------------------------------
# any folder of images


def load_folder(root: str | Path | None, split: str, *, strict: bool = True) -> ImageSet:
    """Every image under ``root`` (recursively, hidden entries skipped, sorted paths).

    ``train`` is unlabelled (the method needs no labels). ``test`` and ``all`` are labelled by
    the first-level sub-folder, like torchvision's ImageFolder. ``strict`` is accepted for a
    uniform signature and has no effect: a folder has no canonical counts.
    """
    _check_split("folder", split, ("train", "test", "all"))
    exts = ", ".join(e.lstrip(".") for e in IMAGE_EXTENSIONS)
    if root is None:
        raise InputError("folder: root is required; pass a folder of images")
    root = Path(root).expanduser()
    if not root.is_dir():
        raise MissingPath(
            f"folder: {root} does not exist or is not a folder; expected a folder of images "
            f"({exts}), in class sub-folders for labelled use"
        )
    files = []
    # followlinks: class folders are often symlinks into a larger collection
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        files += [
            os.path.join(dirpath, f)
            for f in filenames
            if not f.startswith(".") and os.path.splitext(f)[1].lower() in IMAGE_EXTENSIONS
        ]
    files.sort()
    if not files:
        raise InputError(f"folder: no images found under {root} with the extensions {exts}")
    name = f"folder/{split}"
    if split == "train":
        return ImageSet(files, None, name)

    top = [Path(os.path.relpath(f, root)).parts for f in files]
    loose = [f for f, parts in zip(files, top) if len(parts) == 1]
    if loose:
        raise InputError(
            f"folder/{split}: labels come from the class sub-folders of {root}, but "
            f"{len(loose)} image(s) lie directly in it (first: {loose[0]}); move them into "
            f"class sub-folders (root/<class>/image.jpg) or use split='train' for unlabelled use"
        )
    labels, class_names = _dense_labels([parts[0] for parts in top])
    return ImageSet(files, labels, name, [str(c) for c in class_names])


def list_images(root: str | Path) -> list[str]:
    """Every image under ``root`` (any nesting), as sorted absolute paths."""
    return [os.path.abspath(p) for p in load_folder(root, "train").images]


# ---------------------------------------------------------------------------------------------
# scikit-learn's embedded digits


def load_digits(root: str | Path | None, split: str, *, strict: bool = True) -> ImageSet:
    """scikit-learn's 1,797 8x8 handwritten digits (shipped with scikit-learn, no download):
    digits 0-4 train, 5-9 test, as 32x32 'L' images. ``root`` and ``strict`` are ignored."""
    from sklearn.datasets import load_digits as sk_load_digits

    _check_split("digits", split, ("train", "test"))
    data = sk_load_digits()
    first = 0 if split == "train" else 5
    keep = np.flatnonzero((data.target >= first) & (data.target < first + 5))
    pixels = np.clip(np.rint(data.images[keep] * (255.0 / 16.0)), 0, 255).astype(np.uint8)
    images = [Image.fromarray(p).resize((32, 32), Image.Resampling.BICUBIC) for p in pixels]
    labels = data.target[keep].astype(np.int64) - first
    return ImageSet(images, labels, f"digits/{split}", [str(d) for d in range(first, first + 5)])


# ---------------------------------------------------------------------------------------------
# a small Omniglot subset shipped inside the package

OMNIGLOT_MINI_COUNTS = {"train": (4820, 241), "val": (4720, 236), "test": (2960, 148)}


def load_omniglot_mini(root: str | Path | None, split: str, *, strict: bool = True) -> ImageSet:
    """A small subset of Omniglot (Lake, Salakhutdinov and Tenenbaum, 2015; MIT licence) shipped inside
    the package as ``udml/packs/omniglot_mini.npz`` (about 300 kB, no download): the default job.

    Every fourth alphabet by sorted name, all characters and all 20 drawings each: ``train`` 8 background
    alphabets (241 characters, 4,820 images), ``val`` 7 other background alphabets (236 characters, for
    choosing settings), ``test`` 5 evaluation alphabets (148 characters, 2,960 images); classes (characters)
    are disjoint between splits. 28 x 28 'L' images, black ink on white, 1 bit per pixel (shrunk with a
    bilinear filter, then rounded). ``root`` may name another pack file of the same format; ``strict``
    compares the counts with those of the shipped pack. Rebuilt by python -m benchmarks.make_omniglot_mini, which
    lists the alphabets; see also udml/packs/README.md."""
    _check_split("omniglot_mini", split, ("train", "val", "test"))
    if root is None:
        from importlib import resources

        source = resources.files("udml") / "packs" / "omniglot_mini.npz"
    else:
        source = Path(root).expanduser()
        if not source.is_file():
            raise MissingPath(
                f"omniglot_mini: {source} is not a file; give an .npz pack written by "
                "python -m benchmarks.make_omniglot_mini, or no root for the shipped one"
            )
    with source.open("rb") as f, np.load(f, allow_pickle=False) as pack:
        size = int(pack["size"])
        bits = pack[f"{split}_images"]
        labels = pack[f"{split}_labels"].astype(np.int64)
        class_names = [str(c) for c in pack[f"{split}_classes"]]
    ink = np.unpackbits(bits, axis=-1, count=size).astype(bool)
    pixels = np.where(ink, 0, 255).astype(np.uint8)
    images = [Image.fromarray(p) for p in pixels]
    name = f"omniglot_mini/{split}"
    _check_counts(name, strict, Path(str(source)), OMNIGLOT_MINI_COUNTS[split], (len(images), len(class_names)))
    return ImageSet(images, labels, name, class_names)


# ---------------------------------------------------------------------------------------------

DATASETS: dict[str, Callable[..., ImageSet]] = {
    "cub": load_cub,
    "cars196": load_cars196,
    "sop": load_sop,
    "inshop": load_inshop,
    "omniglot": load_omniglot,
    "folder": load_folder,
    "digits": load_digits,
    "omniglot_mini": load_omniglot_mini,
}


def load_split(dataset: str, root: str | Path | None, split: str, *, strict: bool = True) -> ImageSet:
    """Load one split of a registered data set, e.g. ``load_split("cub", "data/CUB_200_2011",
    "train")``. ``strict=False`` skips the canonical-count check (for subsets and fixtures)."""
    if dataset not in DATASETS:
        raise InputError(f"unknown dataset {dataset!r}; valid names: {', '.join(sorted(DATASETS))}")
    return DATASETS[dataset](root, split, strict=strict)
