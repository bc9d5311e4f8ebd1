"""The collection that ``udml serve`` shows: an index with its paths, look-up by id and path, nearest neighbours,
uploads embedded by the model, and the caches beside the index (thumbnails, the 2-D map)."""

from __future__ import annotations

import json
import logging
import os
import tempfile
import threading
from io import BytesIO
from pathlib import Path

import numpy as np

from ..errors import InputError, ServeError
from ..plots import MAP_FIT_POINTS, map_2d, map_method
from ..rundir import atomic_write

log = logging.getLogger("udml")

THUMB_SIZE = 192
MAX_K = 1000  # neighbours a request may ask for


class Collection:
    """The indexed images: the faiss index, their paths and metadata, the query model if any, and the caches."""

    def __init__(
        self,
        index,
        paths: list[str],
        meta: dict,
        *,
        cache_dir: str | Path,
        source: str | Path | None = None,
        embedder=None,
        upload_disabled: str | None = None,
        thumb_size: int = THUMB_SIZE,
        map_fit_points: int = MAP_FIT_POINTS,
        default_k: int = 10,
        search_threads: int = 1,
        groups: dict[str, dict] | None = None,
    ):
        if index.ntotal != len(paths) or not paths:
            raise InputError(
                f"the index holds {index.ntotal} vectors and {len(paths)} paths; need as many of each, at least one"
            )
        self.index, self.paths, self.meta = index, list(paths), meta
        self.source = Path(source) if source else None
        self.cache_dir = Path(cache_dir)
        self.embedder = embedder
        self.upload_disabled = (
            None
            if embedder is not None
            else (upload_disabled or "no model to embed uploaded images; start udml serve with --model")
        )
        for name, value, least in (
            ("thumb_size", thumb_size, 16),
            ("map_fit_points", map_fit_points, 5),
            ("default_k", default_k, 1),
        ):
            if value < least:
                raise InputError(f"{name} must be at least {least}, got {value}")
        self.thumb_size, self.map_fit_points, self.default_k = thumb_size, map_fit_points, min(default_k, MAX_K)
        self.search_threads = search_threads
        _make_reconstructable(index)
        self.folders = [os.path.basename(os.path.dirname(p)) for p in self.paths]
        self.root = _common_root(self.paths)
        self._by_path: dict[str, int] | None = None
        self._embed_lock = threading.Lock()
        self._map_lock = threading.Lock()
        self._map_thread: threading.Thread | None = None
        self._map_error: str | None = None
        self._map: dict | None = None
        self.group_of = self.duplicate_of = None
        if groups is not None:  # from udml cluster: images it does not list are in no group (-1)
            rows = [groups.get(p, {}) for p in self.paths]
            self.group_of = np.array([r.get("group", -1) for r in rows], dtype=np.int64)
            self.duplicate_of = np.array([r.get("duplicate_group", -1) for r in rows], dtype=np.int64)
            if (self.group_of < 0).all() and (self.duplicate_of < 0).all():
                raise InputError(
                    "the groups file lists none of the indexed images; give the groups that udml cluster wrote "
                    "for this collection's embeddings"
                )

    @property
    def count(self) -> int:
        return len(self.paths)

    # ------------------------------------------------------------------ images and neighbours

    def check_id(self, image_id: int) -> int:
        if not 0 <= image_id < self.count:
            raise ServeError(404, f"no image {image_id} in the index: ids run from 0 to {self.count - 1}")
        return image_id

    def relative_path(self, image_id: int) -> str:
        """The path shown and accepted by the API: relative to the collection's root (absolute paths stay private)."""
        p = self.paths[image_id]
        if self.root is None:
            return os.path.basename(p)
        return p[len(self.root) + 1 :] if p.startswith(self.root + os.sep) else os.path.relpath(p, self.root)

    def item(self, image_id: int) -> dict:
        out = {
            "id": image_id,
            "name": os.path.basename(self.paths[image_id]),
            "folder": self.folders[image_id],
            "path": self.relative_path(image_id),
        }
        if self.group_of is not None:
            out["group"], out["duplicate_group"] = int(self.group_of[image_id]), int(self.duplicate_of[image_id])
        return out

    def group_list(self) -> dict:
        """The groups and the sets of near-duplicates from ``udml cluster``, largest first: size and first image."""
        if self.group_of is None:
            raise ServeError(404, "no groups loaded; write them with udml cluster and start udml serve with --groups")

        def listing(labels):
            groups, first, sizes = np.unique(labels, return_index=True, return_counts=True)  # one pass, any K
            return [
                {"group": int(g), "size": int(n), "cover": int(i)} for g, i, n in zip(groups, first, sizes) if g >= 0
            ]

        return {"groups": listing(self.group_of), "duplicates": listing(self.duplicate_of)}

    def id_of_path(self, path: str) -> int:
        """The id of an indexed image given its stored path or its path relative to the collection's root."""
        if self._by_path is None:
            by_path = {p: i for i, p in enumerate(self.paths)}
            by_path.update({self.relative_path(i): i for i in range(self.count)})
            self._by_path = by_path
        if path not in self._by_path:
            raise ServeError(404, f"{path!r} is not an indexed image; give a path as /api/images lists it, or an id")
        return self._by_path[path]

    def page(
        self,
        offset: int = 0,
        limit: int = 60,
        folder: str | None = None,
        contains: str | None = None,
        group: int | None = None,
        duplicates: int | None = None,
    ) -> dict:
        ids = range(self.count)
        for name, value, labels in (("group", group, self.group_of), ("duplicates", duplicates, self.duplicate_of)):
            if value is not None:
                if labels is None:
                    raise ServeError(400, f"no groups loaded, so no {name} filter; start udml serve with --groups")
                ids = [int(i) for i in np.flatnonzero(labels == value)]
        if folder is not None:
            ids = [i for i in ids if self.folders[i] == folder]
        if contains:
            needle = contains.lower()
            ids = [i for i in ids if needle in self.relative_path(i).lower()]
        return {
            "total": len(ids),
            "offset": offset,
            "limit": limit,
            "items": [self.item(i) for i in ids[offset : offset + limit]],
        }

    def vector(self, image_id: int) -> np.ndarray:
        return self.index.reconstruct(self.check_id(image_id))

    def neighbours(self, query: np.ndarray, k: int, exclude: int | None = None) -> list[dict]:
        """The ``k`` nearest indexed images of one query vector (cosine similarity), ``exclude`` left out."""
        import faiss

        # per calling thread (OpenMP keeps it per thread): on cores shared with other jobs, two spin-waiting
        # threads made one 100k-vector query 3x slower than one thread; parallel requests use their own threads
        faiss.omp_set_num_threads(self.search_threads)
        q = np.ascontiguousarray(np.asarray(query, dtype=np.float32).reshape(1, -1))
        scores, ids = self.index.search(q, min(k + (exclude is not None), self.count))
        out = []
        for score, i in zip(scores[0], ids[0]):
            if i < 0 or i == exclude:  # approximate indexes may return fewer than asked (-1)
                continue
            out.append({"rank": len(out) + 1, "score": float(score), **self.item(int(i))})
        return out[:k]

    def neighbours_of(self, image_id: int, k: int) -> dict:
        query = self.item(self.check_id(image_id))
        results = self.neighbours(self.vector(image_id), k, exclude=image_id)
        for r in results:
            r["same_folder"] = r["folder"] == query["folder"]
        return {"query": query, "k": k, "results": results}

    def embed_upload(self, data: bytes) -> np.ndarray:
        from PIL import Image

        from ..images import open_rgb

        if self.embedder is None:
            raise ServeError(503, f"searching by an uploaded image is disabled: {self.upload_disabled}")
        try:
            with Image.open(BytesIO(data)) as img:
                img.load()
                image = open_rgb(img)
        except Exception as e:  # noqa: BLE001 - any decoder failure is the upload's fault
            raise ServeError(
                400,
                f"the upload is not a readable image ({type(e).__name__}: {e}); send a JPEG, PNG, WebP or AVIF file",
            ) from e
        with self._embed_lock:  # one model forward at a time: the cores are better used by one
            vector = self.embedder.embed([image])
        refine = self.meta.get("refine")
        if refine:  # a refined collection (udml embed --refine): the upload gets the averaging its members had
            from ..index import expand_queries

            vector = expand_queries(self.index, vector, refine["k"], refine["alpha"])
        return vector[0]

    # ------------------------------------------------------------------ thumbnails

    def thumbnail(self, image_id: int) -> Path:
        """A JPEG of at most ``thumb_size`` pixels a side, made once; the cache key holds the file's mtime and size."""
        from ..images import open_rgb

        path = self.paths[self.check_id(image_id)]
        try:
            st = os.stat(path)
        except OSError as e:
            raise ServeError(
                404,
                f"image {image_id} ({self.relative_path(image_id)}) is missing on disk: "
                f"{e.strerror}; it was moved or deleted after indexing (re-run udml embed "
                "and udml index)",
            ) from e
        cached = (
            self.cache_dir
            / "thumbs"
            / str(image_id // 1000)
            / f"{image_id}-{st.st_mtime_ns}-{st.st_size}-{self.thumb_size}.jpg"
        )
        if cached.is_file():
            return cached
        try:
            img = open_rgb(path)
        except Exception as e:  # noqa: BLE001 - any decoder failure: say which image
            raise ServeError(
                500, f"image {image_id} ({self.relative_path(image_id)}) cannot be read ({type(e).__name__}: {e})"
            ) from e
        img.thumbnail((self.thumb_size, self.thumb_size))
        cached.parent.mkdir(parents=True, exist_ok=True)
        # atomic: a concurrent request sees no file or the whole one; a cache needs no fsync
        atomic_write(cached, lambda f: img.save(f, format="JPEG", quality=85), what="thumbnail", durable=False)
        return cached

    # ------------------------------------------------------------------ the 2-D map

    def map_state(self, start: bool = True) -> dict:
        """The 2-D map when ready; otherwise starts computing it (in a thread) and says so."""
        with self._map_lock:
            if self._map is None and self._map_error is None:
                self._map = self._read_cached_map()
            if self._map is not None:
                return self._map
            if self._map_error is not None:
                return {"status": "failed", "detail": self._map_error}
            if start and self._map_thread is None:
                self._map_thread = threading.Thread(target=self._compute_map, name="udml-map", daemon=True)
                self._map_thread.start()
            return {
                "status": "computing",
                "detail": f"computing the 2-D map of {self.count} embeddings "
                f"({map_method(self.count, self.map_fit_points)})",
            }

    def wait_for_map(self, timeout: float | None = None) -> dict:
        state = self.map_state()
        if self._map_thread is not None:
            self._map_thread.join(timeout)
        return self.map_state(start=False) if state["status"] == "computing" else state

    def _map_key(self) -> dict:
        key = {"n": self.count, "fit_points": self.map_fit_points}
        if self.source is not None and self.source.is_file():
            st = self.source.stat()
            key.update(index=str(self.source.resolve()), size=st.st_size, mtime_ns=st.st_mtime_ns)
        return key

    def _read_cached_map(self) -> dict | None:
        coords, info = self.cache_dir / "map.npy", self.cache_dir / "map.json"
        try:
            meta = json.loads(info.read_text())
            if meta.get("key") != self._map_key():
                return None
            xy = np.load(coords, allow_pickle=False)
        except (OSError, ValueError):
            return None
        return self._map_response(xy, meta["method"]) if xy.shape == (self.count, 2) else None

    def _compute_map(self) -> None:
        try:
            vectors = self.index.reconstruct_n(0, self.count)
            xy, method = map_2d(vectors, self.map_fit_points)
            del vectors
            self.cache_dir.mkdir(parents=True, exist_ok=True)
            atomic_write(self.cache_dir / "map.npy", lambda f: np.save(f, xy), what="map", durable=False)
            meta = json.dumps({"key": self._map_key(), "method": method}).encode()
            atomic_write(self.cache_dir / "map.json", lambda f: f.write(meta), what="map", durable=False)
            log.info("2-D map (%s) -> %s", method, self.cache_dir / "map.npy")
            result = self._map_response(xy, method)
            with self._map_lock:
                self._map = result
        except Exception as e:  # noqa: BLE001 - reported to the page instead of lost in a thread
            log.exception("the 2-D map failed")
            with self._map_lock:
                self._map_error = f"{type(e).__name__}: {e}"

    def _map_response(self, xy: np.ndarray, method: str) -> dict:
        names, folder_ids = np.unique(np.array(self.folders, dtype=str), return_inverse=True)
        return {
            "status": "ready",
            "method": method,
            "count": self.count,
            "x": np.round(xy[:, 0], 4).tolist(),
            "y": np.round(xy[:, 1], 4).tolist(),
            "folders": names.tolist(),
            "folder_of": folder_ids.tolist(),
        }


def _common_root(paths: list[str]) -> str | None:
    """The deepest folder that holds every path (shown paths are relative to it), or None."""
    try:
        root = os.path.commonpath(paths)
    except ValueError:  # relative and absolute mixed, or different drives
        return None
    return os.path.dirname(root) if len(paths) == 1 or root in paths else root


def _make_reconstructable(index) -> None:
    """Clicking an indexed image searches with its stored vector: IVF indexes need a direct map for that."""
    import faiss

    try:
        index.reconstruct(0)
        return
    except RuntimeError:
        pass
    try:
        faiss.extract_index_ivf(index).make_direct_map()
        index.reconstruct(0)
    except RuntimeError as e:
        raise InputError(
            f"the stored vectors cannot be read back from this {type(index).__name__}; rebuild the "
            "index with udml index (flat, --ivf or --hnsw)"
        ) from e


def open_collection(
    path: str | Path,
    *,
    model: str | Path | None = None,
    device: str = "cpu",
    cache_dir: str | Path | None = None,
    amp: bool = True,
    groups: str | Path | None = None,
    **options,
) -> Collection:
    """A :class:`Collection` from an index file or an embeddings ``.npz``, with the model for uploads when
    one is given or recorded in the index (and exists); otherwise uploads are disabled, browsing still works."""
    from ..groups import read_groups
    from ..index import load_index
    from ..retrieval import Embedder, check_model_matches

    path = Path(path)
    index, paths, meta = load_index(path)
    embedder, disabled = None, None
    if model is not None:
        embedder = Embedder.from_file(model, device, amp=amp)  # given explicitly: a missing file is an error
    elif meta.get("model") and os.path.exists(meta["model"]):
        embedder = Embedder.from_file(meta["model"], device, amp=amp)
    elif meta.get("model"):
        disabled = (
            f"the model that embedded the collection ({meta['model']}) is gone; start udml serve with "
            "--model MODEL to search by uploaded images"
        )
    else:
        disabled = "the index records no model; start udml serve with --model MODEL to search by uploaded images"
    if embedder is not None:
        check_model_matches(embedder, meta, str(path))
    return Collection(
        index,
        paths,
        meta,
        cache_dir=_writable_cache_dir(cache_dir, path),
        source=path,
        embedder=embedder,
        upload_disabled=disabled,
        groups=None if groups is None else read_groups(groups),
        **options,
    )


def _writable_cache_dir(cache_dir: str | Path | None, index_path: Path) -> Path:
    if cache_dir is not None:
        cache = Path(cache_dir)
        cache.mkdir(parents=True, exist_ok=True)  # given explicitly: failing to make it is an error
        return cache
    cache = Path(f"{index_path}.serve-cache")
    try:
        cache.mkdir(exist_ok=True)
        if os.access(cache, os.W_OK):
            return cache
    except OSError:
        pass
    fallback = Path(tempfile.mkdtemp(prefix="udml-serve-"))
    log.warning(
        "udml serve: cannot write %s; thumbnails and the map are cached in %s for this session "
        "(give --cache-dir to keep them)",
        cache,
        fallback,
    )
    return fallback
