"""``udml serve``: browse an indexed collection in a web browser; a click gives an image's nearest neighbours.

One FastAPI app over an index from ``udml index`` (or an embeddings ``.npz`` from ``udml embed``):

- ``GET /``: the page (``static/serve.html``: plain HTML, CSS and JS, nothing fetched from elsewhere).
- ``GET /api/info``, ``GET /api/images`` (paged, filterable), ``GET /api/images/{id}``,
  ``GET /api/images/{id}/thumb``, ``GET /api/neighbours/{id}``, ``GET /api/neighbours?path=``,
  ``POST /api/search`` (an uploaded image), ``GET /api/map`` (2-D map of the embeddings), ``GET /api/groups``
  (with ``--groups``: the groups and near-duplicate sets of ``udml cluster``; ``/api/images?group=`` or
  ``?duplicates=`` lists one).

Images are addressed by their integer id (their row in the index); a path in a request is only ever
looked up among the indexed paths, never opened. Thumbnails and the 2-D map are computed once and cached
in a folder beside the index (``<index>.serve-cache/``, or ``--cache-dir``).
"""

from ..errors import ServeError
from ..plots import map_2d
from .app import LOOPBACK_HOSTS, MAX_UPLOAD_BYTES, bind, create_app, is_loopback, serve
from .collection import Collection, open_collection

__all__ = [
    "LOOPBACK_HOSTS",
    "MAX_UPLOAD_BYTES",
    "Collection",
    "ServeError",
    "bind",
    "create_app",
    "is_loopback",
    "map_2d",
    "open_collection",
    "serve",
]
