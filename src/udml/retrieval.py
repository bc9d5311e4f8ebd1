"""Using a trained model: embed images and folders (udml.embeddings holds the file, udml.index the index).

Embeddings are L2-normalised, so inner product is cosine similarity: scores lie in [-1, 1], higher
is more similar.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from . import distributed
from .data import ImageFiles, make_loader, test_transform
from .datasets import list_images
from .devices import precision_for, resolve_device
from .embeddings import EMBEDDINGS_FORMAT, Embeddings, model_stamp, same_meta
from .errors import InputError, MissingPath, ModelMismatch
from .images import open_rgb, report_unreadable
from .store import describe_files

log = logging.getLogger("udml")


PRETRAINED = "pretrained:"


def pretrained_backbone(name: str) -> torch.nn.Module:
    """A backbone's pretrained pooled features, L2-normalised, as the embedding: no training at all. What a CPU
    user gets when training does not beat the start (``udml embed pretrained:efficientnet_lite0 DIR``)."""
    from .models import UDMLNet, create_backbone

    return UDMLNet(create_backbone(name, pretrained=True), embedding_dim=None).eval()


class Embedder:
    """A trained network with its test transform: embeds PIL images or image paths.

    ``udml.load("runs/x/model.pt").embed(["a.jpg", pil_image])`` -> float32 array [2, D], one
    L2-normalised row per image. Images are resized and centre-cropped exactly as at test time.
    """

    def __init__(
        self, model: torch.nn.Module, device: str | torch.device = "cpu", source: str | None = None, amp: bool = True
    ):
        """``amp``: the device's fast path (bfloat16 where native, channels_last; see udml.devices); False:
        float32, for bit-stable embeddings."""
        self.device = resolve_device(device)
        self.amp, self.precision = amp, precision_for(self.device, amp)
        self.model = self.precision.prepare(model.to(self.device).eval())
        self.image = model.image  # crop and resize sizes, normalisation: the model's own
        self.image_size = model.image.crop_size
        self.transform = test_transform(model.image.crop_size, resize_size=model.image.resize_size)
        self.source = source
        self._fingerprint = None

    @property
    def fingerprint(self) -> str:
        """:func:`model_fingerprint` of the network (computed once)."""
        if self._fingerprint is None:
            self._fingerprint = model_fingerprint(self.model)
        return self._fingerprint

    @classmethod
    def from_file(cls, path: str | Path, device: str | torch.device = "cpu", amp: bool = True) -> "Embedder":
        """From model.pt, checkpoint.pt or a run folder (see :func:`udml.inference.load_model`), or
        ``pretrained:NAME``: the pretrained backbone NAME alone (see :func:`pretrained_backbone`)."""
        from .inference import load_model

        if str(path).startswith(PRETRAINED):
            return cls(pretrained_backbone(str(path)[len(PRETRAINED) :]), device, source=str(path), amp=amp)
        path = Path(path)
        if not path.exists():
            raise MissingPath(f"no model at {path}; give a model.pt, a checkpoint.pt or a run folder")
        model = load_model(path, "cpu")
        return cls(model, device, source=str(path.resolve()), amp=amp)

    @property
    def dim(self) -> int:
        return int(self.model.embedding_dim)

    def _tensor(self, item) -> torch.Tensor:
        try:
            return self.transform(open_rgb(item))
        except Exception as e:  # noqa: BLE001 - any decoder failure: say which image
            where = item if isinstance(item, (str, Path)) else f"image of type {type(item).__name__}"
            raise InputError(
                f"cannot read {where} ({type(e).__name__}: {e}); pass a PIL image or the path of an image file"
            ) from e

    def embed_tensors(self, x: torch.Tensor) -> np.ndarray:
        """Embeddings of a uint8 batch [B, 3, H, W] already transformed to ``image_size``: the one embedding
        pass of the package (inference.extract), in this embedder's precision."""
        from .inference import extract

        return extract(self.model, x, batch_size=max(1, len(x)), amp=self.amp, pooled=False)[1].cpu().numpy()

    def embed(self, images, batch_size: int = 64) -> np.ndarray:
        """Float32 [N, D] embeddings of a list of PIL images or paths (or of one of them: [1, D])."""
        if isinstance(images, (str, Path)) or not isinstance(images, Sequence):
            images = [images]
        if len(images) == 0:
            return np.zeros((0, self.dim), dtype=np.float32)
        out = []
        for i in range(0, len(images), batch_size):
            out.append(self.embed_tensors(torch.stack([self._tensor(im) for im in images[i : i + batch_size]])))
        return np.concatenate(out)

    __call__ = embed


def model_fingerprint(model: torch.nn.Module) -> str:
    """SHA-256 of a network's weights (names, dtypes, shapes and values, in order) and input settings.

    It identifies the network, not the file: a run folder, its model.pt and its last checkpoint.pt give the same
    fingerprint, and any other network a different one. The rotation head is left out: it takes no part in
    the embeddings."""
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        if name.startswith("rotation."):
            continue
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    h.update(json.dumps(model.image.to_dict(), sort_keys=True).encode())
    return h.hexdigest()


def _file_stamps(paths: list[str]) -> np.ndarray:
    """int64 [N, 2], size and mtime_ns of each file, as the image store keys them (-1 where stat fails)."""
    return np.array([row[1:] for row in describe_files(paths)], dtype=np.int64).reshape(-1, 2)


def embedder_meta(embedder: Embedder) -> dict:
    """What makes two embeddings comparable: the network (fingerprint), its input size and its precision."""
    return {
        "image_size": embedder.image_size,
        "model": embedder.source,
        "model_fingerprint": embedder.fingerprint,
        "model_stamp": model_stamp(embedder.source) if embedder.source else None,
        "precision": str(embedder.precision),
        "amp": embedder.amp,  # what was asked (the fast path, or --float32): a no-op update is told without torch
    }


def same_embedder(meta: dict, embedder: Embedder) -> str | None:
    """None when embeddings described by ``meta`` came from ``embedder`` (same network and precision); else why
    not, in words."""
    return same_meta(meta, embedder_meta(embedder))


def embed_folder(
    embedder: Embedder,
    root: str | Path,
    *,
    batch_size: int = 64,
    num_workers: int = 0,
    progress: bool = False,
    previous: Embeddings | None = None,
) -> Embeddings:
    """Embed every image under ``root``; unreadable files are logged and left out (see ``.skipped``).

    ``previous``: an earlier result for the same folder by the same embedder (:func:`same_embedder`). Its rows
    whose file has the same path, size and mtime_ns are kept as they are; only new and changed files are
    embedded, and files no longer under ``root`` are dropped (counts in ``.changes``). The rows come in the
    order of a fresh run (sorted paths).

    Under torchrun (``torchrun --nproc_per_node=N -m udml embed ...``) each process embeds its share of the files
    (udml.distributed.shard) and every process returns the whole result, the same rows in the same order as one
    process."""
    paths = list_images(root)
    stamps = _file_stamps(paths)
    kept_rows = {}
    if previous is not None and previous.stamps is not None:
        before = {p: (i, tuple(st)) for i, (p, st) in enumerate(zip(previous.paths, previous.stamps.tolist()))}
        for p, st in zip(paths, stamps.tolist()):
            if p in before and before[p][1] == tuple(st) and st[0] >= 0:
                kept_rows[p] = before[p][0]
    todo = [p for p in paths if p not in kept_rows]
    vectors, errs = _embed_files(embedder, todo, batch_size, num_workers, progress)
    new_rows = {p: j for j, (p, e) in enumerate(zip(todo, errs)) if not e}  # row of each embedded file in vectors
    errors = {p: e for p, e in zip(todo, errs) if e}
    skipped = [(p, errors[p]) for p in todo if p in errors]
    if distributed.is_main():
        report_unreadable(root, skipped)
    ok = [i for i, p in enumerate(paths) if p in kept_rows or p in new_rows]
    if not ok:
        raise InputError(f"none of the {len(paths)} images under {root} could be read")
    if len(new_rows) == len(paths):  # every file embedded now, in path order: the rows as they are, no copy
        emb = vectors
    else:
        emb = np.empty((len(ok), vectors.shape[1]), dtype=np.float32)
        for rows, source in ((new_rows, vectors), (kept_rows, None if previous is None else previous.embeddings)):
            pairs = np.array([(k, rows[paths[i]]) for k, i in enumerate(ok) if paths[i] in rows], dtype=np.int64)
            for s in range(0, len(pairs), 65_536):  # in blocks: no second copy of the collection on the way
                emb[pairs[s : s + 65_536, 0]] = source[pairs[s : s + 65_536, 1]]
    meta = {
        "format": EMBEDDINGS_FORMAT,
        "root": os.path.abspath(root),
        "dim": int(emb.shape[1]),
        **embedder_meta(embedder),
        # the unreadable files as they were (path, size, mtime_ns): an update with nothing changed is told by stat alone
        "unreadable": [[p, *st] for p, st in zip(paths, stamps.tolist()) if p in errors],
    }
    removed = 0 if previous is None else len(set(previous.paths) - set(paths))
    changes = {"kept": len(kept_rows), "embedded": len(new_rows), "removed": removed, "unreadable": len(skipped)}
    return Embeddings(emb, [paths[i] for i in ok], meta, skipped, stamps[ok], changes)


def _embed_files(embedder: Embedder, files: list[str], batch_size: int, num_workers: int, progress: bool):
    """(float32 [len(files), D] embeddings, error message or "" per file); an unreadable file's row is junk.
    Under torchrun this process embeds its shard and the rows and errors of all shards are gathered in order."""
    from tqdm import tqdm

    mine = [files[i] for i in distributed.shard(len(files))]
    vectors, errors = np.zeros((len(mine), embedder.dim), dtype=np.float32), []  # filled in place: one copy
    if mine:
        data = ImageFiles(mine, embedder.transform, embedder.image_size)
        loader = make_loader(data, batch_size=batch_size, num_workers=num_workers, device=embedder.device)
        show = progress and distributed.is_main()
        with tqdm(total=len(mine), desc="embed", unit="img", disable=not show, mininterval=2.0) as bar:
            for x, err in loader:
                vectors[len(errors) : len(errors) + len(x)] = embedder.embed_tensors(x)
                errors += list(err)
                bar.update(len(x))
    if distributed.world_size() > 1:
        vectors = distributed.gather_rows(torch.from_numpy(vectors).to(embedder.device)).cpu().numpy()
        errors = [e for part in distributed.gather_objects(errors) for e in part]
    return vectors, errors


def check_model_matches(embedder: Embedder, meta: dict, where: str, allow_other: bool = False) -> None:
    """The query model must be the network that embedded the collection (same :func:`model_fingerprint`):
    another network's embeddings live in another space, and its neighbours would look plausible but be wrong.
    ``allow_other`` turns the error into a warning (dimensions must still agree)."""
    dim = meta.get("dim")
    if dim is not None and dim != embedder.dim:
        raise ModelMismatch(
            f"{where} holds {dim}-d embeddings but the model {embedder.source} makes "
            f"{embedder.dim}-d ones; search with the model that embedded the images "
            f"({meta.get('model')})"
        )
    expected = meta.get("model_fingerprint")
    if expected is None:  # written before udml fingerprinted models
        log.warning(
            "%s records no model fingerprint, so the query model cannot be checked against the one that "
            "embedded it; re-embed the collection (udml embed) to record one",
            where,
        )
        return
    if expected != embedder.fingerprint:
        message = (
            f"{where} was embedded by another network ({meta.get('model')}, fingerprint {expected[:12]}) "
            f"than the query model {embedder.source} (fingerprint {embedder.fingerprint[:12]}); its "
            "neighbours would be meaningless"
        )
        if not allow_other:
            raise ModelMismatch(
                f"{message}. Search with the model that embedded the collection (drop --model), "
                "re-embed the collection with this model, or pass --allow-other-model to search "
                "anyway"
            )
        log.warning("%s (--allow-other-model given)", message)
