"""Transforms and the torch Dataset over an ImageSet, with decoded images optionally cached in memory."""

from __future__ import annotations

import copy
import logging
import math
import os

import numpy as np
import torch
from PIL import Image
from torchvision import transforms as T

from .datasets import ImageSet
from .errors import InputError, PathProblem
from .images import check_headers, decode_all, open_rgb, report_unreadable

log = logging.getLogger("udml")


def resize_for(image_size: int, resize_size: int | None = None) -> int:
    """The protocol resizes to 256 before cropping 227; keep that ratio for other crop sizes."""
    return resize_size or round(image_size * 256 / 227)


# Transforms stop at uint8 tensors: a quarter of the bytes through the loader, and the model normalises
# on its own device (UDMLNet.normalize), so inference needs no transform configuration.
CROP_RULES = ("torchvision", "clamped")
_DRAWS = 10  # torchvision's RandomResizedCrop tries this many boxes before its central fallback


def crop_box(width: int, height: int, scale, ratio, rule: str, u) -> tuple[int, int, int, int]:
    """A RandomResizedCrop box (top, left, height, width) in a ``width`` x ``height`` image, from 2 * 10 + 2
    uniform numbers ``u`` in [0, 1).

    ``torchvision``: torchvision's rule, draw by draw (area fraction in ``scale``, log-uniform aspect in ``ratio``,
    up to 10 draws until the box fits, else a central crop). ``clamped``: one draw, the box clamped to the image;
    torchvision's redraws favour small boxes on 3:2 photos (mean area about 0.43 of the image at scale 0.16-1,
    against about 0.54 clamped), further from the test framing."""
    area = width * height
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for t in range(_DRAWS if rule == "torchvision" else 1):
        target = area * (scale[0] + (scale[1] - scale[0]) * u[2 * t])
        aspect = math.exp(log_lo + (log_hi - log_lo) * u[2 * t + 1])
        w, h = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if rule == "clamped":
            w, h = min(width, max(1, w)), min(height, max(1, h))
        if 0 < w <= width and 0 < h <= height:
            return int(u[-2] * (height - h + 1)), int(u[-1] * (width - w + 1)), h, w
    in_ratio = width / height  # torchvision's fallback: the central crop of the nearest allowed aspect
    if in_ratio < min(ratio):
        w, h = width, round(width / min(ratio))
    elif in_ratio > max(ratio):
        w, h = round(height * max(ratio)), height
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


CROPS_TOGETHER_MAX_SIZE = 32  # TrainCrop.batch: the largest crop made with grid_sample rather than Pillow


def enlarge_crops(images: torch.Tensor, boxes: torch.Tensor, flips: torch.Tensor, size: int) -> torch.Tensor:
    """Bilinear crops of ``images`` (uint8 [B, H, W] or [B, H, W, C]) from ``boxes`` (float64 [B, 4]: left, top,
    right, bottom in pixels, each no larger than ``size``), mirrored where ``flips``; uint8 [B, C, size, size].
    Output pixel i of a box [l, r) samples the image at l + (i + 0.5) (r - l) / size, as Pillow does."""
    x = images if images.dim() == 4 else images[..., None]
    b, h, w, _ = x.shape
    centres = (torch.arange(size, dtype=torch.float64) + 0.5) / size
    px = boxes[:, :1] + centres * (boxes[:, 2:3] - boxes[:, :1])  # [B, size], in pixels from the left edge
    py = boxes[:, 1:2] + centres * (boxes[:, 3:4] - boxes[:, 1:2])
    px = torch.where(flips[:, None], px.flip(1), px)
    gx, gy = 2 * px / w - 1, 2 * py / h - 1  # grid_sample's coordinates (align_corners=False: -1, 1 are the edges)
    grid = torch.stack([gx[:, None, :].expand(b, size, size), gy[:, :, None].expand(b, size, size)], -1)
    out = torch.nn.functional.grid_sample(
        x.permute(0, 3, 1, 2).float(), grid.float(), mode="bilinear", padding_mode="border", align_corners=False
    )
    return out.add_(0.5).floor_().clamp_(0, 255).to(torch.uint8)


class TrainCrop:
    """The training augmentation: Resize(``resize``) -> RandomResizedCrop(``size``) -> random horizontal flip ->
    uint8 tensor, as torchvision's four transforms, in one resampling.

    The box is drawn in the resized image's coordinates (crop_box) and mapped back to the image, which PIL then
    resamples to ``size`` x ``size`` directly (bilinear, antialiased when shrinking, as torchvision's PIL path).
    The random numbers come from torch's default generator in one draw per image, so ImageDataset's per-image
    seeds make the crops reproducible. A fifth of the per-image time of the four transforms, which at 28 px cost
    a third of a training step on 2 cores (issue #18)."""

    def __init__(self, size: int, resize: int, scale=(0.16, 1.0), ratio=(3 / 4, 4 / 3), hflip=True, rule="torchvision"):
        if rule not in CROP_RULES:
            raise InputError(f"crop_rule must be one of {', '.join(CROP_RULES)}, got {rule!r}")
        self.size, self.resize, self.scale, self.ratio, self.hflip, self.rule = size, resize, scale, ratio, hflip, rule

    def resized_size(self, width: int, height: int) -> tuple[int, int]:
        """The size T.Resize(resize) gives: the shorter side ``resize``, the longer one scaled and truncated."""
        if width <= height:
            return self.resize, int(self.resize * height / width)
        return int(self.resize * width / height), self.resize

    def draw(self, width: int, height: int) -> tuple[tuple[float, float, float, float], bool]:
        """(box in the image's pixels (left, top, right, bottom), flip) for a ``width`` x ``height`` image: one
        draw of 2 * 10 + 3 numbers from torch's default generator."""
        rw, rh = self.resized_size(width, height)
        u = torch.rand(2 * _DRAWS + 3).tolist()
        i, j, h, w = crop_box(rw, rh, self.scale, self.ratio, self.rule, u[:-1])
        sx, sy = width / rw, height / rh
        return (j * sx, i * sy, (j + w) * sx, (i + h) * sy), self.hflip and u[-1] < 0.5

    def __call__(self, img: Image.Image) -> torch.Tensor:
        return self.resample(img, *self.draw(*img.size))

    def resample(self, img: Image.Image, box, flip: bool) -> torch.Tensor:
        out = img.resize((self.size, self.size), Image.BILINEAR, box=box)
        if flip:
            out = out.transpose(Image.FLIP_LEFT_RIGHT)
        a = np.asarray(out)
        a = a[:, :, None] if a.ndim == 2 else a
        return torch.from_numpy(a.transpose(2, 0, 1).copy())

    @property
    def crops_together(self) -> bool:
        """Whether ``batch`` makes the enlarging crops together (small crops), rather than each with Pillow."""
        return self.size <= CROPS_TOGETHER_MAX_SIZE

    def batch(self, arrays: list[np.ndarray], draws: list) -> list[torch.Tensor]:
        """The crops of images given as uint8 arrays [H, W(, C)] with their draws (``draw``): what ``resample``
        gives each, to within one grey level, at a fraction of the cost on small images.

        A box no larger than the output on either axis is enlarged, and then Pillow's antialiased bilinear filter
        is plain bilinear interpolation at the output pixels' centres, clamped at the image's edges: one
        ``grid_sample`` call computes it for all such crops of images of one shape (Pillow rounds after each of
        its two passes, with 22-bit coefficients; this rounds once: 0.8 % of the pixels of Omniglot's crops
        differ, by 1). Pillow costs 30-75 us an image at 28 px on a 2-core EPYC, most of it making image
        objects and converting arrays; the call costs 12-25 us an image there. Boxes that shrink (where
        Pillow's filter averages more pixels) go through Pillow, and so does every crop larger than
        CROPS_TOGETHER_MAX_SIZE, where Pillow is the faster (at 64 px 83 against 116 us an image, at 224 px 840
        against 1,970)."""
        if not self.crops_together:
            return [self.resample(Image.fromarray(a), *d) for a, d in zip(arrays, draws)]
        out: list = [None] * len(arrays)
        groups: dict = {}
        for k, (a, ((left, top, right, bottom), _)) in enumerate(zip(arrays, draws)):
            if right - left <= self.size and bottom - top <= self.size:
                groups.setdefault(a.shape, []).append(k)
            else:
                out[k] = self.resample(Image.fromarray(a), *draws[k])
        for ks in groups.values():
            crops = enlarge_crops(
                torch.from_numpy(np.stack([arrays[k] for k in ks])),
                torch.tensor([draws[k][0] for k in ks], dtype=torch.float64),
                torch.tensor([draws[k][1] for k in ks], dtype=torch.bool),
                self.size,
            )
            for k, x in zip(ks, crops):
                out[k] = x
        return out

    def __repr__(self) -> str:
        return f"TrainCrop(size={self.size}, resize={self.resize}, scale={self.scale}, rule={self.rule!r})"


def train_transform(
    image_size: int,
    *,
    resize_size: int | None = None,
    crop_scale_min: float = 0.16,
    hflip: bool = True,
    crop_rule: str = "torchvision",
) -> TrainCrop:
    return TrainCrop(
        image_size, resize_for(image_size, resize_size), (crop_scale_min, 1.0), hflip=hflip, rule=crop_rule
    )


def test_transform(image_size: int, *, resize_size: int | None = None) -> T.Compose:
    return T.Compose([T.Resize(resize_for(image_size, resize_size)), T.CenterCrop(image_size), T.PILToTensor()])


def decode_stacked(images: list, transform, short_side: int | None = None, chunk: int = 512):
    """``transform`` (deterministic, uint8 tensors of one shape) of every readable image, in one tensor.

    Decodes ``chunk`` images at a time into a tensor allocated once, so that neither the decoded images nor a
    list of the results are ever all held: memory is the stacked results and a chunk. Returns (tensor or None
    when no image could be read, bad) like decode_all.
    """
    out, bad, n = None, [], 0
    for start in range(0, len(images), chunk):
        items, errors = decode_all(images[start : start + chunk], short_side, transform=transform)
        bad += [(start + i, item, error) for i, item, error in errors]
        for x in items:
            if x is not None:
                if out is None:
                    out = torch.empty((len(images),) + tuple(x.shape), dtype=x.dtype)
                out[n] = x
                n += 1
    return (None if out is None else out[:n]), bad


class ImageDataset(torch.utils.data.Dataset):
    """Items are (uint8 image tensor, index). Unreadable images are reported and left out.

    A key may be an index or (index, seed): with a seed the random transform is seeded per image, so
    augmentations do not depend on the number of loader workers or processes, and a run replays exactly.

    ``cache``: True keeps the decoded images (shrunk to ``short_side``), for a random transform; "transformed"
    keeps only the outputs of a deterministic transform (the test transform), all in one uint8 tensor
    ``stacked`` (what inference.stack returns, without a copy), never all the decoded images; "disk" reads the
    decoded images from a store on disk (udml.store, under ``store_dir``), built once and reused, so that memory
    does not grow with the number of images (images given as PIL images rather than files are cached in memory
    instead); False decodes every image when it is read.
    """

    def __init__(
        self,
        image_set: ImageSet,
        transform,
        cache: bool | str = True,
        short_side: int | None = None,
        store_dir: str | None = None,
    ):
        self.image_set, self.transform = image_set, transform
        if len(image_set) == 0:
            raise InputError(
                f"data set {image_set.name!r} has no images; check data_root and that the files "
                "follow the data set's layout (or, for a folder, have an image extension)"
            )
        items = list(image_set.images)
        keep = np.arange(len(items))
        self.arrays = self.stacked = self.store = None
        if cache == "disk" and not all(isinstance(x, (str, os.PathLike)) for x in items):
            log.info("%s: images held in memory, not files: cached in memory rather than on disk", image_set.name)
            cache = True
        if cache == "disk":
            from .store import open_or_build

            self.store = open_or_build(items, short_side, store_dir, image_set.name)
            bad = self.store.unreadable
        elif cache == "transformed":
            self.stacked, bad = decode_stacked(items, transform, short_side)
        elif cache:
            self.arrays, bad = decode_all(items, short_side)
            self.arrays = [a for a in self.arrays if a is not None]
        else:
            bad = check_headers(items)
        if bad:
            self._report(bad)
            keep = np.setdiff1d(keep, [i for i, _, _ in bad])
        self.items = [items[i] for i in keep]
        self.labels = None if image_set.labels is None else np.asarray(image_set.labels)[keep]
        self.kept = keep
        if len(self.items) == 0:
            first = f" (first: {bad[0][1]}: {bad[0][2]})" if bad else ""
            raise InputError(
                f"data set {image_set.name!r}: none of its {len(image_set)} images could be read"
                f"{first}; replace the damaged files or point data_root at an intact copy"
            )

    def _report(self, bad) -> None:
        report_unreadable(self.image_set.name, [(item, err) for _, item, err in bad])

    def __len__(self) -> int:
        return len(self.items)

    def array(self, i: int) -> np.ndarray | None:
        """Image ``i`` decoded, from the cache in memory or on disk; None when there is none."""
        if self.arrays is not None:
            return self.arrays[i]
        if self.store is not None:
            return self.store.array(self.kept[i])
        return None

    def image(self, i: int) -> Image.Image:
        a = self.array(i)
        if a is not None:
            return Image.fromarray(a)
        try:
            return open_rgb(self.items[i])
        except Exception as e:  # noqa: BLE001
            raise PathProblem(
                f"cannot read image {self.items[i]}: {e}. Remove or replace the file, or enable "
                "cache_images so that unreadable files are skipped up front"
            ) from e

    def with_transform(self, transform) -> "ImageDataset":
        if self.stacked is not None:
            raise InputError("a data set cached as transformed images holds no images to transform otherwise")
        view = copy.copy(self)
        view.transform = transform
        return view

    def __getitem__(self, key):
        if self._crops_together():
            return self.__getitems__([key])[0]
        i = self._seeded(key)
        if self.stacked is not None:
            return self.stacked[i], i
        return self.transform(self.image(i)), i

    def __getitems__(self, keys: list) -> list:
        """The items of a batch (the DataLoader fetches a batch's keys with one call). Training crops of cached
        images are made together (TrainCrop.batch), and one item read alone is made the same way."""
        if not self._crops_together():
            return [self[k] for k in keys]
        idx, arrays, draws = [], [], []
        for key in keys:
            i = self._seeded(key)
            a = self.array(i)
            idx.append(i)
            arrays.append(a)
            draws.append(self.transform.draw(a.shape[1], a.shape[0]))
        return list(zip(self.transform.batch(arrays, draws), idx))

    def _crops_together(self) -> bool:
        cached = self.arrays is not None or self.store is not None
        return cached and isinstance(self.transform, TrainCrop) and self.transform.crops_together

    @staticmethod
    def _seeded(key) -> int:
        """The index of ``key``; with a key (index, seed), torch's generator seeded for that image first."""
        if not isinstance(key, tuple):
            return key
        i, seed = key
        # The CPU generator only: torch.manual_seed would also queue a CUDA seeding with a captured stack
        # trace on every call when CUDA is not initialised (3.7 ms a call, 0.3 s a batch of 80 images).
        torch.random.default_generator.manual_seed(seed)
        return i


class FrozenViews(torch.utils.data.Dataset):
    """The frozen stages' outputs of V training views of every image, kept in memory (``views`` [N, V, ...],
    udml.session.prepare_views): item (index, seed) is (view ``seed % V`` of that image, index), so that the
    samplers' per-image seeds pick the views, and an image's consecutive seeds (its views in one batch) pick
    different ones."""

    def __init__(self, views: torch.Tensor):
        self.views = views

    def __len__(self) -> int:
        return len(self.views)

    def __getitem__(self, key):
        i, seed = key
        return self.views[i, seed % self.views.shape[1]], i


class ImageFiles(torch.utils.data.Dataset):
    """Image files by path for one pass over a collection (``udml embed``): items are (uint8 image tensor, error).

    The package's policy for unreadable images (reported once, left out) applied during the pass instead of up
    front as ImageDataset does, so that each file of a large collection is opened once: an unreadable file
    yields a blank image and its error message, which the caller leaves out and reports
    (images.report_unreadable)."""

    def __init__(self, paths: list[str], transform, size: int):
        self.paths, self.transform, self.size = paths, transform, size

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i):
        try:
            return self.transform(open_rgb(self.paths[i])), ""
        except Exception as e:  # noqa: BLE001 - any decoder failure: left out and reported by the caller
            return torch.zeros(3, self.size, self.size, dtype=torch.uint8), f"{type(e).__name__}: {e}"


def make_loader(
    dataset, *, batch_size: int = 1, batch_sampler=None, num_workers: int = 0, device="cpu", persistent: bool = False
):
    kwargs = dict(batch_sampler=batch_sampler) if batch_sampler is not None else dict(batch_size=batch_size)
    return torch.utils.data.DataLoader(
        dataset,
        shuffle=False,
        num_workers=num_workers,
        pin_memory=str(device).startswith("cuda"),
        persistent_workers=persistent and num_workers > 0,
        **kwargs,
    )


def default_workers() -> int:
    return min(8, os.cpu_count() or 1)


def stack(dataset, *, num_workers: int = 0, budget_gb: float = 4.0, batch_size: int = 256):
    """All items of a deterministic (test-transform) dataset as one uint8 tensor, when it fits ``budget_gb``;
    else the dataset itself. Re-embedding then costs no decoding or resizing. A dataset cached as transformed
    images (ImageDataset(cache="transformed")) already holds that tensor: it is returned, not copied."""
    x0, _ = dataset[0]
    if len(dataset) * x0.numel() * x0.element_size() > budget_gb * 2**30:
        return dataset
    if getattr(dataset, "stacked", None) is not None:
        return dataset.stacked
    out = torch.empty((len(dataset),) + tuple(x0.shape), dtype=x0.dtype)
    i = 0
    for x, _ in make_loader(dataset, batch_size=batch_size, num_workers=num_workers):
        out[i : i + len(x)] = x
        i += len(x)
    return out
