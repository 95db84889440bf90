"""The `dlip serve` page in a real browser (Playwright driving the system chromium, headless):
upload a photo -> the caption the API gives for that file; a text -> its ITM score; a query ->
ranked thumbnails that load, scores descending. Skipped only when /usr/bin/chromium is absent
(.ci/run installs it); Playwright's own browser downloads are never used."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

import dlip
from dlip.data.synthetic import synthesize
from dlip.inference.index import build_index
from dlip.inference.predictor import Predictor

CHROMIUM = "/usr/bin/chromium"
PHOTO = Path(dlip.__file__).parent / "assets" / "photos" / "chelsea.jpg"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
WAIT_MS = 120_000

pytestmark = pytest.mark.skipif(
    not os.path.exists(CHROMIUM), reason=f"{CHROMIUM} is absent (apt-get install chromium)"
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("browser")
    synthesize(root / "images", 12, image_size=32)
    model_dir = dlip.save(dlip.create_model("test_tiny"), root / "model")
    predictor = Predictor.load(str(model_dir), device="cpu")
    assert build_index(predictor, root / "images", root / "index", progress=False).complete
    url = f"http://127.0.0.1:{(port := free_port())}"
    cmd = [sys.executable, "-m", "dlip", "serve", "--model", str(model_dir), "--port", str(port)]
    cmd += ["--index", str(root / "index"), "--log-level", "warning"]
    log = root / "server.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, env=ENV, stdout=out, stderr=subprocess.STDOUT)
    try:
        _wait_ready(proc, url, log)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def _wait_ready(proc: subprocess.Popen, url: str, log: Path, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited {proc.returncode}:\n{log.read_text()}")
        try:
            if httpx.get(url + "/api/info", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"server did not start in {timeout}s:\n{log.read_text()}")


@pytest.fixture(scope="module")
def page(server):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        try:
            tab = browser.new_page()
            tab.set_default_timeout(WAIT_MS)
            tab.goto(server + "/")
            yield tab
        finally:
            browser.close()


def _wait_settled(page, selector: str, status_selector: str) -> None:
    """Wait until the element's data-state leaves idle/loading; fail with the page's message."""
    page.wait_for_selector(f"{selector}[data-state=done], {selector}[data-state=error]")
    state = page.get_attribute(selector, "data-state")
    assert state == "done", page.text_content(status_selector)


def test_upload_shows_the_api_caption(server, page):
    page.set_input_files("#image-input", str(PHOTO))
    _wait_settled(page, "#caption", "#caption-status")
    shown = page.text_content("#caption").strip()
    files = {"image": (PHOTO.name, PHOTO.read_bytes(), "image/jpeg")}
    want = httpx.post(server + "/api/caption", files=files, timeout=120).json()["caption"]
    assert shown and shown == want
    assert page.evaluate("document.querySelector('#preview').naturalWidth") > 0

    page.fill("#itm-text", "a cat lying on a blanket")
    page.click("#itm-button")
    _wait_settled(page, "#itm-score", "#itm-status")
    score = float(page.get_attribute("#itm-score", "data-score"))
    data = {"text": "a cat lying on a blanket"}
    want_score = httpx.post(server + "/api/itm", files=files, data=data, timeout=120).json()
    assert score == pytest.approx(want_score["score"], abs=1e-6)


def test_search_shows_ranked_thumbnails(server, page):
    page.fill("#search-q", "a red circle")
    page.fill("#search-k", "5")
    page.click("#search-button")
    _wait_settled(page, "#results", "#search-status")
    images = page.locator("#results img")
    assert images.count() == 5
    scores = page.eval_on_selector_all(".hit", "es => es.map(e => Number(e.dataset.score))")
    assert scores == sorted(scores, reverse=True)
    loaded = "[...document.querySelectorAll('#results img')].every(i => i.naturalWidth > 0)"
    page.wait_for_function(loaded)  # the thumbnails really load
    api = httpx.get(server + "/api/search", params={"q": "a red circle", "k": 5}).json()
    paths = page.eval_on_selector_all(".hit", "es => es.map(e => e.dataset.path)")
    assert paths == [r["path"] for r in api["results"]]

    page.fill("#search-q", "   ")  # a bad query: the page shows the server's error
    page.click("#search-button")
    page.wait_for_selector("#results[data-state=error]", state="attached")
    assert "empty" in page.text_content("#search-status")
