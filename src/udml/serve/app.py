"""The HTTP side of ``udml serve``: the FastAPI app over a Collection, its security headers, binding the socket."""

from __future__ import annotations

import functools
import ipaddress
import logging
import os
import socket
from importlib import resources

from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.trustedhost import TrustedHostMiddleware

from ..errors import PortUnavailable, ServeError
from ..plots import map_method
from .collection import MAX_K, Collection

log = logging.getLogger("udml")

MAX_UPLOAD_BYTES = 10 * 2**20
MULTIPART_SLACK = 64 * 1024  # form boundaries and headers around the uploaded file
MAX_PAGE = 500
LOOPBACK_HOSTS = ["127.0.0.1", "localhost", "::1"]


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
            "map": map_method(c.count, c.map_fit_points),
            "groups": c.group_of is not None,
        }

    @app.get("/api/images")
    def images(
        offset: int = Query(0, ge=0),
        limit: int = Query(60, ge=1, le=MAX_PAGE),
        folder: str | None = None,
        contains: str | None = None,
        group: int | None = Query(None, ge=0),
        duplicates: int | None = Query(None, ge=0),
    ):
        return JSONResponse(c.page(offset, limit, folder, contains, group, duplicates))

    @app.get("/api/groups")
    def group_list():
        return JSONResponse(c.group_list())

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
        raise PortUnavailable(
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
