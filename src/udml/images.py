"""Images from files, without torch: reading any file Pillow knows as RGB, shrinking, decoding many at once in
threads, and one policy for images that cannot be read (reported once, skipped). The data sets of udml.data
(ImageDataset up front, ImageFiles during a pass over a folder), the disk store (udml.store) and the pictures
use it."""

from __future__ import annotations

import logging
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from PIL import Image

log = logging.getLogger("udml")


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode as RGB: grayscale (8- and 16-bit), palette and CMYK are converted; transparent pixels are
    composited on white rather than on whatever colour they hide."""
    if img.mode.startswith("I;16"):  # convert("RGB") would clip 16-bit values to white
        a = np.asarray(img, dtype=np.float64)
        img = Image.fromarray(np.clip(np.rint(a / 257.0), 0, 255).astype(np.uint8), mode="L")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (img.mode == "P" and "transparency" in img.info):
        img = img.convert("RGBA")
        background = Image.new("RGBA", img.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, img).convert("RGB")
    return img.convert("RGB")


def open_rgb(item) -> Image.Image:
    """A path or PIL image as an RGB image (see to_rgb)."""
    if isinstance(item, Image.Image):
        return to_rgb(item)
    with Image.open(item) as img:
        img.load()
        return to_rgb(img)


def _shrink(img: Image.Image, short_side: int | None) -> Image.Image:
    if short_side and min(img.size) > short_side:
        w, h = img.size
        s = short_side / min(w, h)
        img = img.resize((max(1, round(w * s)), max(1, round(h * s))), Image.BILINEAR)
    return img


def decode_one(item, short_side: int | None = None) -> np.ndarray:
    """One image (a path or PIL image) as the (height, width, 3) uint8 array that the caches hold: RGB, shrunk
    to ``short_side`` when larger. The in-memory cache and the disk store (udml.store) both decode with this."""
    return np.asarray(_shrink(open_rgb(item), short_side))


def decode_all(images: list, short_side: int | None = None, workers: int | None = None, transform=None):
    """Decode every image once (threads: Pillow releases the GIL while decoding).

    Returns (arrays, bad) where bad lists (index, item, error) for images that could not be read.
    Images larger than needed are shrunk to ``short_side`` so that the cache stays small. With ``transform``
    the items are ``transform(image)`` instead of the decoded images' arrays.
    """

    def load(i):
        try:
            if transform is None:
                return decode_one(images[i], short_side), None
            return transform(_shrink(open_rgb(images[i]), short_side)), None
        except Exception as e:  # noqa: BLE001 - any decoder failure means: skip and report this file
            return None, (i, images[i], f"{type(e).__name__}: {e}")

    workers = workers or min(16, os.cpu_count() or 1)
    with ThreadPoolExecutor(workers) as pool:
        results = list(pool.map(load, range(len(images))))
    return [r[0] for r in results], [r[1] for r in results if r[1] is not None]


def check_headers(images: list, workers: int | None = None) -> list:
    """(index, item, error) for every path that Pillow cannot identify as an image, reading headers only.

    Much cheaper than decoding; a file damaged after an intact header still fails later, when it is opened.
    """

    def check(i):
        if isinstance(images[i], Image.Image):
            return None
        try:
            with Image.open(images[i]) as img:
                img.verify()
            return None
        except Exception as e:  # noqa: BLE001 - any failure means: skip and report this file
            return i, images[i], f"{type(e).__name__}: {e}"

    workers = workers or min(16, os.cpu_count() or 1)
    with ThreadPoolExecutor(workers) as pool:
        return [r for r in pool.map(check, range(len(images))) if r is not None]


def report_unreadable(where, bad: list[tuple[str, str]]) -> None:
    """One warning for the (file, error) pairs of images that could not be read and were skipped."""
    if not bad:
        return
    shown = "\n  ".join(f"{item}: {err}" for item, err in bad[:10])
    more = f"\n  ... and {len(bad) - 10} more" if len(bad) > 10 else ""
    log.warning("%s: skipped %d unreadable image(s):\n  %s%s", where, len(bad), shown, more)
