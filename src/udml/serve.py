"""``udml serve``: browse an indexed collection in a web browser; a click gives an image's nearest neighbours.

One FastAPI app over an index from ``udml index`` (or an embeddings ``.npz`` from ``udml embed``):

- ``GET /``: the page (``static/serve.html``: plain HTML, CSS and JS, nothing fetched from elsewhere).
- ``GET /api/info``, ``GET /api/images`` (paged, filterable), ``GET /api/images/{id}``,
  ``GET /api/images/{id}/thumb``, ``GET /api/neighbours/{id}``, ``GET /api/neighbours?path=``,
  ``POST /api/search`` (an uploaded image), ``GET /api/map`` (2-D map of the embeddings).

Images are addressed by their integer id (their row in the index); a path in a request is only ever
looked up among the indexed paths, never opened. Thumbnails and the 2-D map are computed once and cached
in a folder beside the index (``<index>.serve-cache/``, or ``--cache-dir``).
"""

from __future__ import annotations

import functools
import ipaddress
import json
import logging
import os
import socket
import tempfile
import threading
from importlib import resources
from io import BytesIO
from pathlib import Path

import numpy as np
from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.trustedhost import TrustedHostMiddleware

from .errors import ServeError

log = logging.getLogger("udml")

MAX_UPLOAD_BYTES = 10 * 2**20
MULTIPART_SLACK = 64 * 1024  # form boundaries and headers around the uploaded file
MAX_K = 1000
MAX_PAGE = 500
THUMB_SIZE = 192
MAP_FIT_POINTS = 5000
MAP_NEIGHBOURS = 10
LOOPBACK_HOSTS = ["127.0.0.1", "localhost", "::1"]


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
    ):
        if index.ntotal != len(paths) or not paths:
            raise ValueError(
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
                raise ValueError(f"{name} must be at least {least}, got {value}")
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
        return {
            "id": image_id,
            "name": os.path.basename(self.paths[image_id]),
            "folder": self.folders[image_id],
            "path": self.relative_path(image_id),
        }

    def id_of_path(self, path: str) -> int:
        """The id of an indexed image given its stored path or its path relative to the collection's root."""
        if self._by_path is None:
            by_path = {p: i for i, p in enumerate(self.paths)}
            by_path.update({self.relative_path(i): i for i in range(self.count)})
            self._by_path = by_path
        if path not in self._by_path:
            raise ServeError(404, f"{path!r} is not an indexed image; give a path as /api/images lists it, or an id")
        return self._by_path[path]

    def page(self, offset: int = 0, limit: int = 60, folder: str | None = None, contains: str | None = None) -> dict:
        ids = range(self.count)
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

        from .images import open_rgb

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
            return self.embedder.embed([image])[0]

    # ------------------------------------------------------------------ thumbnails

    def thumbnail(self, image_id: int) -> Path:
        """A JPEG of at most ``thumb_size`` pixels a side, made once; the cache key holds the file's mtime and size."""
        from .images import open_rgb

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
        tmp = cached.with_name(f"{cached.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        img.save(tmp, format="JPEG", quality=85)
        os.replace(tmp, cached)  # atomic: a concurrent request sees the old state or the whole file
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
                f"({_map_method(self.count, self.map_fit_points)})",
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
            with open(self.cache_dir / "map.npy", "wb") as f:
                np.save(f, xy)
            (self.cache_dir / "map.json").write_text(json.dumps({"key": self._map_key(), "method": method}))
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


def _map_method(n: int, fit_points: int) -> str:
    if n < 5:
        return f"{n} images are too few for t-SNE: shown in a row"
    if n <= fit_points:
        return f"t-SNE of all {n} embeddings"
    return (
        f"t-SNE fitted on a random sample of {fit_points} of the {n} embeddings; every other image is placed "
        f"at the similarity-weighted mean of its {MAP_NEIGHBOURS} nearest sampled images"
    )


def map_2d(vectors: np.ndarray, fit_points: int = MAP_FIT_POINTS, seed: int = 0) -> tuple[np.ndarray, str]:
    """2-D coordinates [N, 2] of L2-normalised vectors, and how they were made.

    t-SNE (scikit-learn) costs minutes beyond a few thousand points on a CPU, and cannot place new points;
    so above ``fit_points`` it is fitted on a random sample and the rest are interpolated from their
    nearest sampled neighbours (exact inner-product search with faiss).
    """
    import faiss

    from .plots import tsne_2d

    x = np.ascontiguousarray(vectors, dtype=np.float32)
    n = len(x)
    method = _map_method(n, fit_points)
    if n < 5:
        return np.c_[np.arange(n), np.zeros(n)].astype(np.float32), method
    if n <= fit_points:
        return tsne_2d(x, seed).astype(np.float32), method
    fit = np.sort(np.random.default_rng(seed).choice(n, fit_points, replace=False))
    xy_fit = tsne_2d(x[fit], seed).astype(np.float32)
    sample = faiss.IndexFlatIP(x.shape[1])
    sample.add(x[fit])
    scores, nearest = sample.search(x, MAP_NEIGHBOURS)
    weights = np.exp((scores - scores[:, :1]) / 0.05)  # softmax over similarities, temperature 0.05
    weights /= weights.sum(1, keepdims=True)
    xy = np.einsum("nk,nkd->nd", weights, xy_fit[nearest])
    xy[fit] = xy_fit
    return xy.astype(np.float32), method


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
        raise ValueError(
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
    **options,
) -> Collection:
    """A :class:`Collection` from an index file or an embeddings ``.npz``, with the model for uploads when
    one is given or recorded in the index (and exists); otherwise uploads are disabled, browsing still works."""
    from .retrieval import Embedder, check_model_matches, load_index

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


# ---------------------------------------------------------------------- the web app


def create_app(
    collection: Collection, *, max_upload_bytes: int = MAX_UPLOAD_BYTES, allowed_hosts: list[str] | None = None
):
    """The FastAPI app. ``allowed_hosts``: Host header names accepted (None: any); a server bound to the
    loopback interface should accept only loopback names, so that a web page cannot reach it by DNS rebinding."""
    page = (resources.files("udml") / "static" / "serve.html").read_text(encoding="utf-8")
    app = FastAPI(title="udml serve", docs_url=None, redoc_url=None, openapi_url=None)
    if allowed_hosts is not None:
        app.add_middleware(TrustedHostMiddleware, allowed_hosts=allowed_hosts)
    app.state.collection = collection
    c = collection

    @app.exception_handler(ServeError)
    async def serve_error(request, exc: ServeError):
        return JSONResponse({"detail": exc.message}, status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def bad_request(request, exc: RequestValidationError):
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc'][1:]) or e['loc'][0]}: {e['msg']}" for e in exc.errors()
        )
        return JSONResponse({"detail": f"bad request: {problems}"}, status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, exc: StarletteHTTPException):
        detail = exc.detail
        if exc.status_code == 404 and detail == "Not Found":  # no route: e.g. /api/images/../x or a typo
            detail = (
                f"nothing at {request.url.path}; images are addressed by integer id, as in "
                f"/api/images/0/thumb (ids 0 to {c.count - 1})"
            )
        return JSONResponse({"detail": detail}, status_code=exc.status_code, headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def internal_error(request, exc: Exception):
        log.error("udml serve: %s %s failed", request.method, request.url.path, exc_info=exc)
        return JSONResponse({"detail": f"internal error: {type(exc).__name__}: {exc}"}, status_code=500)

    app.add_middleware(NoSniff)

    @app.get("/", response_class=HTMLResponse)
    def index_page():
        # the page may load nothing from elsewhere: no CDN, no tracking
        return HTMLResponse(page, headers={"Content-Security-Policy": PAGE_POLICY})

    @app.get("/api/info")
    def info():
        return {
            "count": c.count,
            "dim": int(c.index.d),
            "index": c.source.name if c.source else None,
            "kind": type(c.index).__name__,
            "model": os.path.basename(c.meta.get("model") or "") or None,
            "upload": {"enabled": c.embedder is not None, "reason": c.upload_disabled, "max_bytes": max_upload_bytes},
            "thumb_size": c.thumb_size,
            "default_k": c.default_k,
            "max_k": MAX_K,
            "map": _map_method(c.count, c.map_fit_points),
        }

    @app.get("/api/images")
    def images(
        offset: int = Query(0, ge=0),
        limit: int = Query(60, ge=1, le=MAX_PAGE),
        folder: str | None = None,
        contains: str | None = None,
    ):
        return JSONResponse(c.page(offset, limit, folder, contains))

    @app.get("/api/images/{image_id:int}")
    def image(image_id: int):
        return c.item(c.check_id(image_id))

    @app.get("/api/images/{image_id:int}/thumb")
    def thumbnail(image_id: int):
        return FileResponse(
            c.thumbnail(image_id), media_type="image/jpeg", headers={"Cache-Control": "private, max-age=3600"}
        )

    # JSONResponse directly: the rows are plain JSON types already, FastAPI's encoder would walk them again
    @app.get("/api/neighbours/{image_id:int}")
    def neighbours(image_id: int, k: int = Query(None, ge=1, le=MAX_K)):
        return JSONResponse(c.neighbours_of(image_id, k or c.default_k))

    @app.get("/api/neighbours")
    def neighbours_by_path(path: str, k: int = Query(None, ge=1, le=MAX_K)):
        return JSONResponse(c.neighbours_of(c.id_of_path(path), k or c.default_k))

    @app.post("/api/search")
    async def search_upload(request: Request, k: int = Query(None, ge=1, le=MAX_K)):
        if c.embedder is None:
            raise ServeError(503, f"searching by an uploaded image is disabled: {c.upload_disabled}")
        data = await _read_upload(request, max_upload_bytes)
        vector = await run_in_threadpool(c.embed_upload, data)
        results = await run_in_threadpool(c.neighbours, vector, k or c.default_k)
        return {"query": {"upload": True, "bytes": len(data)}, "k": k or c.default_k, "results": results}

    @app.get("/api/map")
    def embedding_map():
        state = c.map_state()
        status = {"ready": 200, "computing": 202}.get(state["status"], 500)
        return JSONResponse(state, status_code=status)

    return app


PAGE_POLICY = (
    "default-src 'self'; img-src 'self' blob: data:; style-src 'self' 'unsafe-inline'; "
    "script-src 'self' 'unsafe-inline'; connect-src 'self'; frame-ancestors 'none'"
)


class NoSniff:
    """ASGI middleware: every response says X-Content-Type-Options: nosniff (a thumbnail is never run as a script).
    Plain ASGI rather than @app.middleware("http"), which costs a task and a stream per request."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def send_with_header(message):
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), (b"x-content-type-options", b"nosniff")]
            await send(message)

        await self.app(scope, receive, send_with_header)


async def _read_upload(request, limit: int) -> bytes:
    """The uploaded image's bytes: the form field ``image`` of a multipart form, or the raw request body.
    Anything larger than ``limit`` is answered with 413 without reading the rest."""
    too_large = ServeError(
        413,
        f"the upload is larger than the limit of {limit / 2**20:.1f} MB; send a smaller "
        "image or start udml serve with a larger --max-upload-mb",
    )
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit + MULTIPART_SLACK:
        raise too_large
    received = 0

    async def counting_receive():
        nonlocal received
        message = await request.receive()
        received += len(message.get("body", b""))
        if received > limit + MULTIPART_SLACK:
            raise too_large
        return message

    limited = Request(request.scope, counting_receive)
    if request.headers.get("content-type", "").startswith("multipart/form-data"):
        try:
            form = await limited.form(max_files=1, max_fields=8)
        except ServeError:
            raise
        except Exception as e:  # noqa: BLE001 - a malformed form is the client's fault
            message = getattr(e, "detail", None) or getattr(e, "message", None) or str(e)
            raise ServeError(
                400, f"cannot parse the multipart upload ({message}); send the image as the form field 'image'"
            ) from e
        files = [v for v in form.values() if isinstance(v, UploadFile)]
        upload = form.get("image") if isinstance(form.get("image"), UploadFile) else (files[0] if files else None)
        if upload is None:
            raise ServeError(400, "no file in the upload; send the image as the form field 'image'")
        data = await upload.read(limit + 1)
        await form.close()
    else:
        data = b"".join([chunk async for chunk in limited.stream()])
    if len(data) > limit:
        raise too_large
    if not data:
        raise ServeError(400, "the upload is empty; send an image file as the form field 'image' or as the body")
    return data


def _url(host: str, port: int) -> str:
    shown = "127.0.0.1" if host in ("0.0.0.0", "") else "[::1]" if host == "::" else host
    return f"http://[{shown}]:{port}/" if ":" in shown and not shown.startswith("[") else f"http://{shown}:{port}/"


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def bind(host: str, port: int) -> socket.socket:
    """A listening socket; port 0 picks a free one."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # proto IPPROTO_TCP, not socket.create_server's 0: asyncio sets TCP_NODELAY only on sockets that say TCP, and
    # without it Nagle's algorithm and delayed ACKs add 40 ms to every response
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(128)
        return sock
    except OSError as e:
        sock.close()
        raise OSError(
            f"cannot listen on {host}:{port} ({e.strerror}); choose another --port (0: any free port) or --host"
        ) from e


def serve(
    collection: Collection,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    max_upload_bytes: int = MAX_UPLOAD_BYTES,
    announce=None,
) -> None:
    """Run the web server until Ctrl+C."""
    import uvicorn

    if announce is None:  # flushed: the address must show up at once, also through a pipe
        announce = functools.partial(print, flush=True)

    allowed = LOOPBACK_HOSTS if is_loopback(host) else None
    app = create_app(collection, max_upload_bytes=max_upload_bytes, allowed_hosts=allowed)
    sock = bind(host, port)
    port = sock.getsockname()[1]
    where = f"{collection.source}" if collection.source else "the index"
    announce(f"udml serve: {collection.count} images of {where} at {_url(host, port)}  (Ctrl+C to stop)")
    if not is_loopback(host):
        announce(f"udml serve: listening on {host}: other machines can browse these images")
    if collection.upload_disabled:
        announce(f"udml serve: search by uploaded image is off: {collection.upload_disabled}")
    config = uvicorn.Config(app, log_level="warning", access_log=False, timeout_graceful_shutdown=2)
    uvicorn.Server(config).run(sockets=[sock])
