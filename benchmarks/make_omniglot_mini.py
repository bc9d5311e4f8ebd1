"""Rebuild src/udml/packs/omniglot_mini.npz, the small Omniglot subset shipped inside the package (the
default job of `udml train`), from the official Omniglot folders:

    python -m benchmarks.make_omniglot_mini --data ../shared/data/omniglot

Which alphabets (fixed by rule, in each folder sorted by name, before any training was run):
  train: every fourth alphabet of images_background, starting with the second (positions 1, 5, 9, ...)
  val:   every fourth alphabet of images_background, starting with the fourth (positions 3, 7, 11, ...);
         held-out training-side alphabets for choosing settings without looking at the test alphabets
  test:  every fourth alphabet of images_evaluation, starting with the second (positions 1, 5, 9, ...)
All characters of an alphabet and all 20 drawings of a character are kept, so the three splits have
disjoint classes (characters) and disjoint alphabets.

Each 105 x 105 drawing is converted to greyscale and shrunk to 28 x 28 with Pillow's bilinear filter (what
the `omniglot` preset's loader does at resize_size 28), then rounded to 1 bit (ink where the shrunk pixel is
darker than 128) and stored with np.packbits: 98 bytes per drawing before compression. The file is written
byte for byte the same on every run (sorted order, fixed zip timestamps); the script prints its SHA-256.
"""

from __future__ import annotations

import hashlib
import io
import os
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image

from .harness import ROOT, base_parser

SIZE = 28
THRESHOLD = 128
SPLITS = {"train": ("images_background", 1), "val": ("images_background", 3), "test": ("images_evaluation", 1)}
EVERY = 4
DRAWERS = 20
OUT = ROOT / "src" / "udml" / "packs" / "omniglot_mini.npz"


def sorted_dirs(path: Path) -> list[str]:
    return sorted(e.name for e in os.scandir(path) if e.is_dir() and not e.name.startswith("."))


def shrink(path: str) -> np.ndarray:
    with Image.open(path) as im:
        grey = im.convert("L").resize((SIZE, SIZE), Image.BILINEAR)
    return np.asarray(grey) < THRESHOLD  # True = ink


def build_split(root: Path, folder: str, first: int) -> dict[str, np.ndarray]:
    alphabets = sorted_dirs(root / folder)[first::EVERY]
    ink, labels, classes = [], [], []
    for alphabet in alphabets:
        for char in sorted_dirs(root / folder / alphabet):
            pngs = sorted(f for f in os.listdir(root / folder / alphabet / char) if f.lower().endswith(".png"))
            if len(pngs) != DRAWERS:
                raise ValueError(f"{root / folder / alphabet / char}: expected {DRAWERS} png files, found {len(pngs)}")
            ink += [shrink(str(root / folder / alphabet / char / f)) for f in pngs]
            labels += [len(classes)] * len(pngs)
            classes.append(f"{alphabet}/{char}")
    return {
        "images": np.packbits(np.stack(ink), axis=-1),
        "labels": np.asarray(labels, dtype=np.uint16),
        "classes": np.asarray(classes),
    }


def write_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """np.savez_compressed with a fixed timestamp on every member, so that the bytes are reproducible."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=9) as zf:
        for name in sorted(arrays):
            buf = io.BytesIO()
            np.lib.format.write_array(buf, np.asarray(arrays[name]), allow_pickle=False)
            info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            zf.writestr(info, buf.getvalue(), compresslevel=9)
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    p = base_parser(__doc__)
    p.add_argument(
        "--data", default="../shared/data/omniglot", help="folder holding images_background/ and images_evaluation/"
    )
    p.add_argument("--out", default=str(OUT))
    args = p.parse_args(argv)
    root = Path(args.data)
    arrays = {"size": np.asarray(SIZE, dtype=np.int16)}
    for split, (folder, first) in SPLITS.items():
        part = build_split(root, folder, first)
        arrays.update({f"{split}_{k}": v for k, v in part.items()})
        alphabets = sorted({c.split("/")[0] for c in part["classes"]})
        print(
            f"{split}: {len(part['labels'])} images, {len(part['classes'])} characters, "
            f"{len(alphabets)} alphabets ({', '.join(alphabets)})"
        )
    out = Path(args.out)
    write_npz(out, arrays)
    digest = hashlib.sha256(out.read_bytes()).hexdigest()
    print(f"{out}: {out.stat().st_size:,} bytes, sha256 {digest}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
