"""The page of udml serve in a real headless browser (Chromium through Selenium), on CUB images: the grid, a click's
neighbours, an uploaded image, the map, and the groups of udml cluster as a filter. The JSON API: test_serve.py."""

import os
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import BIRDS_PER_CLASS, CUB_CLASSES
from fastapi.testclient import TestClient
from helpers import brute_force_neighbours

from udml.serve import LOOPBACK_HOSTS, bind, create_app, open_collection

CLASSES = CUB_CLASSES
PER_CLASS = BIRDS_PER_CLASS
CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
needs_chromium = pytest.mark.skipif(
    not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)),
    reason=f"needs {CHROMIUM} and {CHROMEDRIVER} (Debian: apt-get install chromium chromium-driver)",
)


@pytest.fixture(scope="module")
def photos(birds) -> Path:
    """What conftest's ``embedded`` (and so ``index_file`` and ``collection``) embeds: conftest's 36 birds."""
    return birds


class LiveServer:
    """uvicorn serving an app in a thread, on a free port of 127.0.0.1."""

    def __init__(self, app):
        import uvicorn

        self.socket = bind("127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{self.socket.getsockname()[1]}/"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.socket]}, daemon=True)

    def __enter__(self):
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started:
            assert time.time() < deadline and self.thread.is_alive(), "the server did not start"
            time.sleep(0.05)
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.socket.close()


def chromium(tmp_path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        f"--user-data-dir={tmp_path / 'chromium-profile'}",
        "--window-size=1400,900",
    ):
        options.add_argument(flag)
    # an explicit driver: Selenium Manager must not try to download one
    return webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)


@needs_chromium
def test_page_in_a_headless_browser(tmp_path, collection, embedded):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    with LiveServer(create_app(collection, allowed_hosts=LOOPBACK_HOSTS)) as server:
        driver = chromium(tmp_path)
        try:
            wait = WebDriverWait(driver, 30)
            driver.get(server.url)
            # the grid: every image of the first page, thumbnails decoded, folder names below them
            wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#grid figure img")) == 36)
            wait.until(
                lambda d: d.execute_script(
                    "return [...document.querySelectorAll('#grid img')].every(i => i.complete && i.naturalWidth > 0)"
                )
            )
            figures = driver.find_elements(By.CSS_SELECTOR, "#grid figure")
            assert figures[14].text == CLASSES[1] and "36 images" in driver.find_element(By.ID, "meta").text

            # a click: k = 10 neighbours with their scores, framed by folder
            figures[14].click()
            wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#results figure")) == 10)
            results = driver.find_elements(By.CSS_SELECTOR, "#results figure")
            ids, scores = brute_force_neighbours(embedded.embeddings, embedded.embeddings[14], 10, exclude=14)
            shown = [float(r.find_element(By.CLASS_NAME, "score").text) for r in results]
            np.testing.assert_allclose(shown, scores, atol=1.5e-3)
            frames = [r.get_attribute("class") for r in results]
            expected = [
                "match" if embedded.paths[int(r.get_attribute("data-id"))].split("/")[-2] == CLASSES[1] else "miss"
                for r in results
            ]
            assert frames == expected
            driver.find_element(By.ID, "folders").click()  # the toggle: plain grey frames
            wait.until(
                lambda d: all(
                    f.get_attribute("class") == "" for f in d.find_elements(By.CSS_SELECTOR, "#results figure")
                )
            )

            # an uploaded image (the file input is what a drop feeds too)
            upload = driver.find_element(By.ID, "upload")
            driver.execute_script("arguments[0].hidden = false", upload)
            upload.send_keys(os.path.realpath(embedded.paths[30]))
            wait.until(lambda d: "your image" in d.find_element(By.ID, "query").text)
            first = driver.find_element(By.CSS_SELECTOR, "#results figure")
            assert first.get_attribute("data-id") == "30"

            # the map: hovering a point shows its thumbnail, clicking it opens its neighbours
            driver.find_element(By.ID, "tab-map").click()
            # "t-SNE" alone also appears in the note while the map is computed (202): wait for the drawn map
            wait.until(lambda d: "t-SNE" in (note := d.find_element(By.ID, "map-note").text) and "Hover" in note)
            canvas = driver.find_element(By.ID, "map")
            point = driver.execute_script("return window.udml.mapPixel(5)")
            rect = driver.execute_script("return arguments[0].getBoundingClientRect()", canvas)
            dx = round(point["x"] - rect["left"] - rect["width"] / 2)
            dy = round(point["y"] - rect["top"] - rect["height"] / 2)
            ActionChains(driver).move_to_element_with_offset(canvas, dx, dy).perform()
            wait.until(lambda d: d.find_element(By.ID, "tip").is_displayed())
            assert "(id " in driver.find_element(By.ID, "tip").text
            ActionChains(driver).move_to_element_with_offset(canvas, dx, dy).click().perform()
            wait.until(lambda d: d.execute_script("return window.udml.state.selected") is not None)
            selected = driver.execute_script("return window.udml.state.selected")
            xy = np.c_[collection.map_state()["x"], collection.map_state()["y"]]
            assert selected == 5 or np.allclose(xy[selected], xy[5], atol=1e-3)  # or a point drawn on top of it
            assert f"id {selected}" in driver.find_element(By.ID, "query").text
            errors = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
            assert not errors, errors
        finally:
            driver.quit()


@needs_chromium
def test_groups_from_udml_cluster_filter_the_grid(tmp_path, index_file, embedded):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    from udml import groups

    labels, score, _ = groups.kmeans_groups(embedded.embeddings, 3)
    dup, dup_score = groups.near_duplicates(embedded.embeddings, 0.99)
    dup[:2], dup_score[:2] = max(dup.max(), -1) + 1, 1.0  # a set of two, as udml cluster would write it
    path = tmp_path / "groups.csv"
    groups.write_groups(path, groups.group_rows(embedded.paths, labels, score, dup, dup_score), {})
    c = open_collection(index_file, device="cpu", groups=path, cache_dir=tmp_path / "cache")
    client = TestClient(create_app(c))
    listed = client.get("/api/groups").json()
    sizes = np.bincount(labels)
    assert [g["size"] for g in listed["groups"]] == sizes.tolist() and sum(sizes) == 36
    assert listed["duplicates"][-1]["size"] == 2
    for g in listed["groups"]:
        page = client.get(f"/api/images?group={g['group']}&limit=100").json()
        assert page["total"] == g["size"] and all(it["group"] == g["group"] for it in page["items"])
        assert [it["id"] for it in page["items"]] == np.flatnonzero(labels == g["group"]).tolist()
    last = listed["duplicates"][-1]["group"]
    assert [it["id"] for it in client.get(f"/api/images?duplicates={last}").json()["items"]] == [0, 1]
    # without groups: the filter says how to get them
    plain = TestClient(create_app(open_collection(index_file, device="cpu", cache_dir=tmp_path / "c2")))
    assert plain.get("/api/groups").status_code == 404 and "--groups" in plain.get("/api/groups").json()["detail"]
    assert plain.get("/api/images?group=0").status_code == 400
    (tmp_path / "other.csv").write_text("path,group,group_score,duplicate_group,duplicate_score\n/x.jpg,0,1,-1,0\n")
    with pytest.raises(ValueError, match="none of the indexed images"):
        open_collection(index_file, device="cpu", groups=tmp_path / "other.csv", cache_dir=tmp_path / "c3")

    # the page: a select lists the groups; choosing one shows its images only
    with LiveServer(create_app(c, allowed_hosts=LOOPBACK_HOSTS)) as server:
        driver = chromium(tmp_path)
        try:
            wait = WebDriverWait(driver, 30)
            driver.get(server.url)
            wait.until(lambda d: d.find_element(By.ID, "group").is_displayed())
            wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#grid figure")) == 36)
            Select(driver.find_element(By.ID, "group")).select_by_value("group:1")
            wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#grid figure")) == sizes[1])
            shown = [int(f.get_attribute("data-id")) for f in driver.find_elements(By.CSS_SELECTOR, "#grid figure")]
            assert shown == np.flatnonzero(labels == 1).tolist()
            assert " · g1" in driver.find_element(By.CSS_SELECTOR, "#grid figure").text
            errors = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
            assert not errors, errors
        finally:
            driver.quit()
