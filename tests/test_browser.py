"""The `dlip serve` page in a real browser (Playwright driving the system chromium, headless):
upload a photo -> the caption the API gives for that file; a text -> its ITM score; a query ->
ranked thumbnails that load, scores descending; with a VQA model, only the question box, whose
answer is the API's. Skipped only when /usr/bin/chromium is absent
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
    yield from _serve(model_dir, ["--index", str(root / "index")], root / "server.log")


def _serve(model_dir: Path, extra: list[str], log: Path):
    """`dlip serve` as a subprocess: yields its URL once it answers, stops it afterwards."""
    url = f"http://127.0.0.1:{(port := free_port())}"
    cmd = [sys.executable, "-m", "dlip", "serve", "--model", str(model_dir), "--port", str(port)]
    cmd += [*extra, "--log-level", "warning"]
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
def browser():
    """One headless chromium for the module (Playwright's sync API allows one at a time)."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        chromium = pw.chromium.launch(
            executable_path=CHROMIUM, headless=True, args=["--no-sandbox"]
        )
        try:
            yield chromium
        finally:
            chromium.close()


@pytest.fixture(scope="module")
def page(server, browser):
    tab = browser.new_page()
    tab.set_default_timeout(WAIT_MS)
    tab.goto(server + "/")
    return tab


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


# ------------------------------------------------------------------------------ a VQA model
@pytest.fixture(scope="module")
def vqa_server(tmp_path_factory):
    root = tmp_path_factory.mktemp("browser_vqa")
    model_dir = dlip.save(dlip.create_model(dlip.get_config("test_tiny").vqa_form()), root / "m")
    (root / "answers.json").write_text('["yes", "no", "cat", "two", "red"]')
    yield from _serve(model_dir, ["--answers", str(root / "answers.json")], root / "server.log")


def test_a_vqa_model_gets_a_question_box(vqa_server, browser):
    page = browser.new_page()
    try:
        page.set_default_timeout(WAIT_MS)
        page.goto(vqa_server + "/")
        page.wait_for_selector("body[data-ready=true]", state="attached")
        # only what the model does is shown: the question box, not caption / ITM / search
        assert page.is_visible("#vqa-section")
        assert not page.is_visible("#caption-section")
        assert not page.is_visible("#itm-section") and not page.is_visible("#search-section")
        page.fill("#vqa-question", "is there a cat?")
        page.click("#vqa-button")  # before an upload: the page says what is missing
        page.wait_for_selector("#vqa-answer[data-state=error]", state="attached")
        assert "upload an image first" in page.text_content("#vqa-status")
        page.set_input_files("#image-input", str(PHOTO))
        page.click("#vqa-button")
        _wait_settled(page, "#vqa-answer", "#vqa-status")
        shown = page.text_content("#vqa-answer").strip()
        files = {"image": (PHOTO.name, PHOTO.read_bytes(), "image/jpeg")}
        data = {"question": "is there a cat?"}
        want = httpx.post(vqa_server + "/api/vqa", files=files, data=data, timeout=120)
        assert shown and shown == want.json()["answer"]
        assert page.get_attribute("#caption", "data-state") == "idle"  # never asked
        page.fill("#vqa-question", "   ")  # the server's 400 reaches the page
        page.click("#vqa-button")
        page.wait_for_selector("#vqa-answer[data-state=error]", state="attached")
        assert "empty" in page.text_content("#vqa-status")
    finally:
        page.close()
