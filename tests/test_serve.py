"""udml serve (udml.serve): the JSON API (FastAPI's test client) on CUB images, and `udml serve`. The page in a real
headless browser: test_browser.py."""

import io
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import BIRDS_PER_CLASS, CUB_CLASSES
from fastapi.testclient import TestClient
from helpers import brute_force_neighbours
from PIL import Image

from udml.cli import main
from udml.embeddings import Embeddings, save_embeddings
from udml.index import build_index, save_index
from udml.retrieval import Embedder, embed_folder
from udml.serve import LOOPBACK_HOSTS, bind, create_app, map_2d, open_collection

CLASSES = CUB_CLASSES
PER_CLASS = BIRDS_PER_CLASS


@pytest.fixture(scope="module")
def photos(birds) -> Path:
    """What conftest's ``embedded`` (and so ``index_file`` and ``collection``) embeds: conftest's 36 birds."""
    return birds


@pytest.fixture(scope="module")
def client(collection) -> TestClient:
    return TestClient(create_app(collection))


def test_info_and_paging(client, embedded):
    info = client.get("/api/info").json()
    assert info["count"] == 36 and info["dim"] == 32 and info["upload"]["enabled"]
    assert info["upload"]["max_bytes"] == 10 * 2**20 and info["model"] == "model.pt"
    page = client.get("/api/images", params={"offset": 30, "limit": 10}).json()
    assert page["total"] == 36 and [it["id"] for it in page["items"]] == list(range(30, 36))
    first = client.get("/api/images", params={"limit": 1}).json()["items"][0]
    assert first == {
        "id": 0,
        "name": Path(embedded.paths[0]).name,
        "folder": CLASSES[0],
        "path": f"{CLASSES[0]}/{Path(embedded.paths[0]).name}",
    }
    assert client.get("/api/images/0").json() == first
    cardinals = client.get("/api/images", params={"contains": "cardinal", "limit": 500}).json()
    assert cardinals["total"] == PER_CLASS and all(it["folder"] == CLASSES[1] for it in cardinals["items"])
    assert client.get("/api/images", params={"folder": CLASSES[2]}).json()["total"] == PER_CLASS
    bad = client.get("/api/images", params={"limit": 0})
    assert bad.status_code == 400 and "limit" in bad.json()["detail"]
    page = client.get("/")
    assert page.status_code == 200 and "<title>udml serve</title>" in page.text
    assert "default-src 'self'" in page.headers["content-security-policy"]
    assert "http://" not in page.text and "https://" not in page.text  # nothing loaded from elsewhere


def test_neighbours_equal_brute_force_top_k(client, embedded):
    x = embedded.embeddings
    for image_id in (0, 13, 35):
        got = client.get(f"/api/neighbours/{image_id}", params={"k": 5}).json()
        assert got["query"]["id"] == image_id and got["k"] == 5
        ids, scores = brute_force_neighbours(x, x[image_id], 5, exclude=image_id)
        assert [r["rank"] for r in got["results"]] == [1, 2, 3, 4, 5]
        np.testing.assert_allclose([r["score"] for r in got["results"]], scores, atol=1e-5)
        assert [r["id"] for r in got["results"]][:3] == ids.tolist()[:3]  # ties aside, the same images
        for r in got["results"]:
            assert r["same_folder"] == (r["folder"] == got["query"]["folder"])
            assert r["score"] == pytest.approx(float(x[image_id] @ x[r["id"]]), abs=1e-5)
    # by path: the stored absolute path or the one /api/images shows
    by_id = client.get("/api/neighbours/13").json()
    for path in (embedded.paths[13], by_id["query"]["path"]):
        assert client.get("/api/neighbours", params={"path": path}).json() == by_id
    assert len(by_id["results"]) == 10  # the default k
    everything = client.get("/api/neighbours/3", params={"k": 1000}).json()["results"]
    assert len(everything) == 35 and 3 not in [r["id"] for r in everything]


@pytest.mark.parametrize("kind", ["ivf", "hnsw"])
def test_approximate_indexes_serve_their_stored_vectors(tmp_path, embedded, kind):
    path = tmp_path / f"{kind}.faiss"
    save_index(path, build_index(embedded.embeddings, kind, nlist=1), embedded, kind)
    c = TestClient(create_app(open_collection(path)))
    got = c.get("/api/neighbours/7", params={"k": 3}).json()["results"]
    ids, scores = brute_force_neighbours(embedded.embeddings, embedded.embeddings[7], 3, exclude=7)
    np.testing.assert_allclose([r["score"] for r in got], scores, atol=1e-4)


def test_thumbnails_are_made_once(client, collection):
    first = client.get("/api/images/4/thumb")
    assert first.status_code == 200 and first.headers["content-type"] == "image/jpeg"
    with Image.open(io.BytesIO(first.content)) as im:
        assert im.format == "JPEG" and max(im.size) <= collection.thumb_size
    cached = list((collection.cache_dir / "thumbs").rglob("4-*.jpg"))
    assert len(cached) == 1 and str(collection.cache_dir).endswith("birds.faiss.serve-cache")
    stamp = cached[0].stat().st_mtime_ns
    assert client.get("/api/images/4/thumb").content == first.content
    assert cached[0].stat().st_mtime_ns == stamp


TRAVERSALS = [
    "/api/images/../../../../etc/passwd",
    "/api/images/%2e%2e%2f%2e%2e%2fetc%2fpasswd/thumb",
    "/api/images/..%2F..%2Fetc%2Fpasswd/thumb",
    "/api/images/0/../../../etc/passwd",
    "/api/images/-1/thumb",
    "/api/images/36/thumb",
    "/api/images/99999999999999999999999/thumb",
    "/api/images/0x1/thumb",
    "/api/images/%00/thumb",
    "/api/neighbours?path=../../../../etc/passwd",
    "/api/neighbours?path=/etc/passwd",
    "/api/neighbours?path=..%2F017.Cardinal",
    "/api/neighbours/36",
    "/static/../../etc/passwd",
    "/etc/passwd",
    "/..%2f..%2fetc%2fpasswd",
]


@pytest.mark.parametrize("url", TRAVERSALS)
def test_path_traversal_and_unknown_ids_are_refused(client, url):
    r = client.get(url)
    assert r.status_code in (400, 404), (url, r.status_code)
    assert "detail" in r.json() and "root:" not in r.text


def test_upload_search_finds_the_same_image(client, embedded, model_file):
    path = embedded.paths[20]
    data = Path(path).read_bytes()
    got = client.post("/api/search", params={"k": 4}, files={"image": ("q.jpg", data, "image/jpeg")})
    assert got.status_code == 200, got.text
    results = got.json()["results"]
    query = Embedder.from_file(model_file).embed([path])[0]
    ids, scores = brute_force_neighbours(embedded.embeddings, query, 4)
    assert results[0]["id"] == 20 and results[0]["score"] == pytest.approx(1, abs=1e-4)
    np.testing.assert_allclose([r["score"] for r in results], scores, atol=1e-5)
    # the image as the raw request body works too, and a form field of another name
    raw = client.post("/api/search?k=4", content=data, headers={"content-type": "image/jpeg"}).json()
    other = client.post("/api/search?k=4", files={"file": ("q.jpg", data, "image/jpeg")}).json()
    assert [r["id"] for r in raw["results"]] == [r["id"] for r in other["results"]] == [r["id"] for r in results]


def test_broken_uploads_get_400(client):
    garbage = client.post("/api/search", files={"image": ("q.jpg", b"not an image at all", "image/jpeg")})
    assert garbage.status_code == 400 and "not a readable image" in garbage.json()["detail"]
    truncated = io.BytesIO()
    Image.new("RGB", (64, 64), "red").save(truncated, format="PNG")
    half = client.post("/api/search", files={"image": ("q.png", truncated.getvalue()[:60], "image/png")})
    assert half.status_code == 400 and "not a readable image" in half.json()["detail"]
    empty = client.post("/api/search", content=b"", headers={"content-type": "image/jpeg"})
    assert empty.status_code == 400 and "empty" in empty.json()["detail"]
    no_file = client.post("/api/search", data={"note": "hello"}, files={"x": (None, "y")})
    assert no_file.status_code == 400 and "form field 'image'" in no_file.json()["detail"]
    broken_form = client.post(
        "/api/search", content=b"--zz\r\ngarbage", headers={"content-type": "multipart/form-data; boundary=zz"}
    )
    assert broken_form.status_code == 400, broken_form.text
    assert client.post("/api/search?k=0", content=b"x").status_code == 400


def test_oversize_uploads_get_413(collection):
    small = TestClient(create_app(collection, max_upload_bytes=100_000))
    big = b"\0" * 100_001
    for response in (
        small.post("/api/search", files={"image": ("big.jpg", big, "image/jpeg")}),
        small.post("/api/search", content=big, headers={"content-type": "image/jpeg"}),
        small.post("/api/search", content=b"\0" * 400_000, headers={"content-type": "image/jpeg"}),
        # no Content-Length: counted as it arrives
        small.post("/api/search", content=(b"\0" * 50_000 for _ in range(10)), headers={"content-type": "image/jpeg"}),
    ):
        assert response.status_code == 413 and "--max-upload-mb" in response.json()["detail"]


def test_without_a_model_uploads_are_off_and_browsing_works(tmp_path, embedded):
    gone = Embeddings(embedded.embeddings, embedded.paths, {**embedded.meta, "model": str(tmp_path / "gone.pt")})
    npz = tmp_path / "birds.npz"
    save_embeddings(npz, gone)
    c = TestClient(create_app(open_collection(npz)))
    info = c.get("/api/info").json()
    assert not info["upload"]["enabled"] and "gone.pt" in info["upload"]["reason"]
    assert "--model" in info["upload"]["reason"]
    refused = c.post("/api/search", files={"image": ("q.jpg", b"x", "image/jpeg")})
    assert refused.status_code == 503 and "disabled" in refused.json()["detail"]
    got = c.get("/api/neighbours/2", params={"k": 3}).json()["results"]
    ids, scores = brute_force_neighbours(embedded.embeddings, embedded.embeddings[2], 3, exclude=2)
    np.testing.assert_allclose([r["score"] for r in got], scores, atol=1e-5)
    assert (tmp_path / "birds.npz.serve-cache").is_dir()


def test_missing_changed_and_damaged_image_files(tmp_path, birds, model_file):
    photos = tmp_path / "photos" / "cardinals"
    photos.mkdir(parents=True)
    sources = sorted((birds / CLASSES[1]).iterdir())[:4]
    for f in sources:
        shutil.copyfile(f, photos / f.name)
    emb = embed_folder(Embedder.from_file(model_file), photos.parent)
    save_embeddings(tmp_path / "p.npz", emb)
    c = TestClient(create_app(open_collection(tmp_path / "p.npz", cache_dir=tmp_path / "cache")))
    assert c.get("/api/images/0/thumb").status_code == 200
    os.remove(emb.paths[0])
    missing = c.get("/api/images/0/thumb")
    assert missing.status_code == 404 and "missing on disk" in missing.json()["detail"]
    Path(emb.paths[1]).write_bytes(b"damaged")
    damaged = c.get("/api/images/1/thumb")
    assert damaged.status_code == 500 and "cannot be read" in damaged.json()["detail"]
    assert "Traceback" not in damaged.text
    # a file replaced by another image gets a new thumbnail (the cache key holds its mtime and size)
    before = c.get("/api/images/2/thumb").content
    shutil.copyfile(sources[3], emb.paths[2])
    after = c.get("/api/images/2/thumb").content
    assert after != before and after == c.get("/api/images/3/thumb").content
    assert len(list((tmp_path / "cache" / "thumbs").rglob("2-*.jpg"))) == 2


def test_map_is_computed_once_and_cached(index_file, collection, client):
    state = collection.wait_for_map(timeout=120)
    assert state["status"] == "ready" and state["method"] == "t-SNE of all 36 embeddings"
    ready = client.get("/api/map")
    assert ready.status_code == 200
    body = ready.json()
    assert len(body["x"]) == len(body["y"]) == len(body["folder_of"]) == 36
    assert body["folders"] == list(CLASSES) and np.isfinite(body["x"]).all()
    cached = json.loads((collection.cache_dir / "map.json").read_text())
    assert cached["key"]["n"] == 36 and (collection.cache_dir / "map.npy").is_file()
    again = open_collection(index_file)
    assert again.map_state() == state and again._map_thread is None  # read from the cache, not recomputed
    # a different sample size is a different map
    other = open_collection(index_file, map_fit_points=20)
    assert other._read_cached_map() is None


def test_map_of_many_points_fits_a_sample(embedded):
    x = embedded.embeddings
    xy, method = map_2d(x, fit_points=20)
    assert xy.shape == (36, 2) and np.isfinite(xy).all()
    assert "sample of 20 of the 36" in method and "nearest sampled" in method
    assert map_2d(x[:3])[0].shape == (3, 2)


def test_only_loopback_host_names_when_bound_to_loopback(collection):
    c = TestClient(create_app(collection, allowed_hosts=LOOPBACK_HOSTS), base_url="http://127.0.0.1:8000")
    assert c.get("/api/info").status_code == 200
    assert c.get("/api/info", headers={"host": "localhost:8000"}).status_code == 200
    assert c.get("/api/info", headers={"host": "attacker.example"}).status_code == 400


def test_command_line_serve(tmp_path, index_file, model_file, capsys):
    assert main(["serve", str(index_file), "--model", str(tmp_path / "nope.pt")]) == 2
    assert "no model at" in capsys.readouterr().err
    taken = bind("127.0.0.1", 0)
    try:
        assert main(["serve", str(index_file), "--port", str(taken.getsockname()[1])]) == 2
        assert "choose another --port" in capsys.readouterr().err
    finally:
        taken.close()
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "udml", "serve", str(index_file), "--port", "0", "--device", "cpu"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        line = proc.stdout.readline()
        assert line.startswith("udml serve: 36 images of ") and "http://127.0.0.1:" in line, (line, proc.poll())
        url = line.split(" at ")[1].split()[0]
        import httpx

        for _ in range(50):
            try:
                info = httpx.get(url + "api/info", timeout=5).json()
                break
            except httpx.TransportError:
                time.sleep(0.2)
        assert info["count"] == 36 and info["upload"]["enabled"]
    finally:
        proc.terminate()
        proc.wait(timeout=20)


def bomb_png(side: int = 40_000) -> bytes:
    """A PNG whose header claims side x side pixels (1.6 gigapixels) in a few hundred bytes: a decompression bomb."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    rows = zlib.compress(b"\0" * (1 + side // 8) * 64)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", rows) + chunk(b"IEND", b"")


@pytest.mark.slow
def test_serve_under_load_from_concurrent_clients(index_file, model_file, embedded):
    """`udml serve` over HTTP on loopback, 16 clients at once, 320 requests mixing grid pages, neighbour queries,
    uploads and bad uploads (garbage, a truncated PNG, a decompression bomb, a text file): every answer is the one
    a lone client gets (200, or 400 for the bad uploads), nothing fails or hangs (each request within 60 s), and the
    server still answers afterwards."""
    import random
    from concurrent.futures import ThreadPoolExecutor

    import httpx

    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    cmd = [sys.executable, "-m", "udml", "serve", str(index_file), "--port", "0", "--device", "cpu"]
    proc = subprocess.Popen([*cmd, "--model", str(model_file)], stdout=subprocess.PIPE, text=True, env=env)
    good = Path(embedded.paths[5]).read_bytes()
    png = io.BytesIO()
    Image.new("RGB", (64, 64), "red").save(png, format="PNG")
    bad = [b"not an image at all", png.getvalue()[:60], bomb_png(), b"a text file\n" * 50]
    rng = random.Random(0)

    def request(i: int) -> tuple[str, int]:
        kind = rng.choices(["page", "neighbours", "upload", "bad"], weights=[10, 6, 3, 1])[0]
        with httpx.Client(base_url=url, timeout=60) as c:
            if kind == "page":
                r = c.get("/api/images", params={"offset": rng.randrange(36), "limit": 12})
            elif kind == "neighbours":
                r = c.get(f"/api/neighbours/{rng.randrange(36)}", params={"k": 5})
            else:
                data = good if kind == "upload" else bad[i % len(bad)]
                r = c.post("/api/search", params={"k": 5}, files={"image": ("q.jpg", data, "image/jpeg")})
        return kind, r.status_code

    try:
        line = proc.stdout.readline()
        url = line.split(" at ")[1].split()[0]
        for _ in range(100):
            try:
                httpx.get(url + "api/info", timeout=5)
                break
            except httpx.TransportError:
                time.sleep(0.2)
        with ThreadPoolExecutor(16) as pool:
            answers = list(pool.map(request, range(320)))
        expected = {"page": 200, "neighbours": 200, "upload": 200, "bad": 400}
        wrong = [(k, s) for k, s in answers if s != expected[k]]
        assert not wrong, wrong[:10]
        assert {k for k, _ in answers} == set(expected)
        assert httpx.get(url + "api/info", timeout=10).json()["count"] == 36 and proc.poll() is None
    finally:
        proc.terminate()
        proc.wait(timeout=20)
