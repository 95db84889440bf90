"""`dlip serve` as a real server (a subprocess on 127.0.0.1; uvicorn in a thread for the
index-less app) with a tiny saved model and an index of synthetic images: captions / ITM scores /
search hits equal the library's, every bad input gets a 4xx `{"error"}` answer and the server
keeps serving, and 32 concurrent requests all get the answer a lone request gets."""

from __future__ import annotations

import contextlib
import http.client
import io
import os
import socket
import threading
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from PIL import Image

import dlip
from dlip.data.synthetic import synthesize
from dlip.inference.index import ImageIndex, build_index
from dlip.inference.predictor import Predictor
from dlip.inference.serve import create_app

UPLOAD_LIMIT = 1024 * 1024  # the servers run with --max-upload-mb 1


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ThreadServer:
    """`create_app` over an in-process Predictor, served by uvicorn in a thread."""

    def __init__(self, app: object) -> None:
        import uvicorn

        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()

    def wait(self, timeout: float = 30.0) -> ThreadServer:
        deadline = time.monotonic() + timeout
        while not self.server.started:
            assert self.thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.05)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)


@pytest.fixture(scope="module")
def world(tmp_path_factory, serve_process):
    root = tmp_path_factory.mktemp("serve")
    images = root / "images"
    synthesize(images, 12, image_size=32)
    model_dir = dlip.save(dlip.create_model("test_tiny"), root / "model")
    predictor = Predictor.load(str(model_dir), device="cpu")
    report = build_index(predictor, images, root / "index", progress=False)
    assert report.complete and report.count == 12
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the preset's random-weights warning
        bare = create_app(Predictor.load("test_tiny", device="cpu"), None, UPLOAD_LIMIT)
    servers = [
        serve_process(
            ["--model", str(model_dir), "--index", str(root / "index"), "--max-upload-mb", "1"],
            root / "a.log",
        ),
        ThreadServer(bare),  # a preset, no index
    ]
    try:
        for server in servers:
            server.wait()
        yield {
            "root": root,
            "images": sorted(p for p in images.rglob("*") if p.suffix in (".jpg", ".png")),
            "predictor": predictor,
            "index": ImageIndex.load(root / "index"),
            "client": httpx.Client(base_url=servers[0].url, timeout=120),
            "bare": httpx.Client(base_url=servers[1].url, timeout=120),
        }
    finally:
        for server in servers:
            server.stop()


def caption(client: httpx.Client, data: bytes) -> httpx.Response:
    return client.post("/api/caption", files={"image": ("x.jpg", data, "image/jpeg")})


def assert_error(response: httpx.Response, status: int | tuple[int, ...], needle: str = "") -> None:
    statuses = (status,) if isinstance(status, int) else status
    assert response.status_code in statuses, (response.status_code, response.text)
    body = response.json()
    assert set(body) == {"error"} and isinstance(body["error"], str) and body["error"]
    assert needle.lower() in body["error"].lower(), body["error"]


def assert_still_serving(world: dict) -> None:
    response = caption(world["client"], world["images"][0].read_bytes())
    assert response.status_code == 200 and response.json()["caption"]


# ------------------------------------------------------------------------------- good requests
def test_page_and_info(world):
    page = world["client"].get("/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    assert 'id="image-input"' in page.text and "/api/caption" in page.text
    info = world["client"].get("/api/info").json()
    assert info["model"] == "test_tiny" and info["index_size"] == 12
    assert world["bare"].get("/api/info").json()["index_size"] is None


def test_caption_equals_library(world):
    path = world["images"][3]
    got = caption(world["client"], path.read_bytes())
    assert got.status_code == 200
    assert got.json() == {"caption": world["predictor"].caption(path)[0]}
    assert caption(world["bare"], path.read_bytes()).json()["caption"]  # preset model


def test_itm_equals_library(world):
    path = world["images"][2]
    files = {"image": ("x.jpg", path.read_bytes(), "image/jpeg")}
    got = world["client"].post("/api/itm", files=files, data={"text": "  a red square  "})
    assert got.status_code == 200
    score = got.json()["score"]
    want = float(world["predictor"].itm_scores(path, ["a red square"])[0])
    assert isinstance(score, float) and 0.0 <= score <= 1.0
    assert score == pytest.approx(want, abs=1e-5)


def test_search_equals_library_and_thumbnails(world):
    client, index = world["client"], world["index"]
    got = client.get("/api/search", params={"q": "a blue circle", "k": 5})
    assert got.status_code == 200
    results = got.json()["results"]
    hits = world["predictor"].search("a blue circle", index, k=5)
    assert [r["path"] for r in results] == [h.path for h in hits]
    assert [r["score"] for r in results] == pytest.approx([h.score for h in hits], abs=1e-5)
    scores = [r["score"] for r in results]
    assert scores == sorted(scores, reverse=True)
    for r in results:
        i = int(r["thumb"].rsplit("/", 1)[1])
        assert index.path(i) == r["path"]
        thumb = client.get(r["thumb"])
        assert thumb.status_code == 200 and thumb.headers["content-type"] == "image/jpeg"
        assert Image.open(io.BytesIO(thumb.content)).size == Image.open(r["path"]).size
    everything = client.get("/api/search", params={"q": "a blue circle", "k": 100}).json()
    assert len(everything["results"]) == 12  # k past the index size: the whole index


# ------------------------------------------------------------------------------- bad requests
def _bomb() -> bytes:
    buf = io.BytesIO()
    Image.new("1", (10_000, 10_000)).save(buf, format="PNG")  # 1e8 pixels in a few KB
    assert len(buf.getvalue()) < UPLOAD_LIMIT
    return buf.getvalue()


def _truncated(world: dict) -> bytes:
    buf = io.BytesIO()
    Image.open(world["images"][0]).convert("RGB").resize((256, 256)).save(buf, format="JPEG")
    return buf.getvalue()[: len(buf.getvalue()) // 2]


@pytest.mark.parametrize(
    "kind, status, needle",
    [
        ("text_not_image", 400, "not_an_image"),
        ("truncated", 400, "truncated"),
        ("bomb", 400, "too_large"),
        ("oversize", 413, "too large"),
        ("empty_file", 400, "empty"),
        ("missing_field", 400, "missing"),
        ("image_as_text", 400, "file upload"),
        ("json_body", 400, "missing"),
    ],
)
def test_bad_caption_upload(world, kind, status, needle):
    client = world["client"]
    payloads = {
        "text_not_image": lambda: b"hello, this is not an image",
        "truncated": lambda: _truncated(world),
        "bomb": _bomb,
        "oversize": lambda: os.urandom(UPLOAD_LIMIT + 1000),
        "empty_file": lambda: b"",
    }
    if kind in payloads:
        response = caption(client, payloads[kind]())
    elif kind == "missing_field":
        response = client.post("/api/caption", files={"picture": ("x.jpg", b"abc", "image/jpeg")})
    elif kind == "image_as_text":
        response = client.post("/api/caption", data={"image": "abc"})
    else:
        response = client.post("/api/caption", json={"image": "abc"})
    assert_error(response, status, needle)
    assert_still_serving(world)


def test_oversize_chunked_upload_is_cut_off(world):
    """No Content-Length: the limit is enforced while the body streams in."""
    boundary = "dlipboundary"
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="x.jpg"\r\n'
        "Content-Type: image/jpeg\r\n\r\n"
    ).encode()
    chunks = [head] + [b"\0" * 65536] * (2 * UPLOAD_LIMIT // 65536)
    conn = http.client.HTTPConnection("127.0.0.1", int(world["client"].base_url.port), timeout=60)
    headers = {"Content-Type": f"multipart/form-data; boundary={boundary}"}
    # the server may answer and close before we finish sending
    with contextlib.suppress(BrokenPipeError, ConnectionResetError):
        body = iter(chunks)
        conn.request("POST", "/api/caption", body=body, headers=headers, encode_chunked=True)
    response = conn.getresponse()
    assert response.status == 413
    assert "too large" in response.read().decode()
    conn.close()
    assert_still_serving(world)


@pytest.mark.parametrize(
    "text, status, needle",
    [("", 400, "empty"), ("   \n\t ", 400, "empty"), (None, 400, "missing"), ("x" * 5000, 400, "")],
)
def test_bad_itm_text(world, text, status, needle):
    files = {"image": ("x.jpg", world["images"][0].read_bytes(), "image/jpeg")}
    data = {} if text is None else {"text": text}
    assert_error(world["client"].post("/api/itm", files=files, data=data), status, needle)
    missing_image = world["client"].post("/api/itm", data={"text": "a cat"})
    assert_error(missing_image, 400, "image")
    assert_still_serving(world)


@pytest.mark.parametrize(
    "params, status, needle",
    [
        ({}, 400, "missing"),
        ({"q": "   "}, 400, "empty"),
        ({"q": "a cat", "k": "0"}, 400, "'k'"),
        ({"q": "a cat", "k": "many"}, 400, "integer"),
        ({"q": "a cat", "k": "1000"}, 400, "'k'"),
    ],
)
def test_bad_search(world, params, status, needle):
    assert_error(world["client"].get("/api/search", params=params), status, needle)
    assert_still_serving(world)


def test_search_without_index(world):
    response = world["bare"].get("/api/search", params={"q": "a cat"})
    assert_error(response, 404, "--index")
    assert_error(world["bare"].get("/api/image/0"), 404)
    assert world["bare"].get("/api/info").status_code == 200


@pytest.mark.parametrize(
    "url, status",
    [
        ("/api/image/12", 404),
        ("/api/image/-1", 404),
        ("/api/image/abc", 422),
        ("/api/image/..%2F..%2F..%2Fetc%2Fpasswd", (404, 422)),
        ("/api/nothing", 404),
    ],
)
def test_only_index_images_are_served(world, url, status):
    response = world["client"].get(url)
    assert_error(response, status)
    assert b"root:" not in response.content


# ------------------------------------------------------------------------------- concurrency
def test_32_concurrent_requests_answer_like_single_ones(world):
    client, images = world["client"], world["images"][:4]
    single = {p: caption(client, p.read_bytes()).json()["caption"] for p in images}
    itm_single = world["predictor"].itm_scores(images[0], ["a green triangle"])[0]

    def one(i: int) -> tuple[str, object]:
        path = images[i % len(images)]
        if i % 8 == 7:  # some ITM calls mixed in
            files = {"image": ("x.jpg", images[0].read_bytes(), "image/jpeg")}
            r = client.post("/api/itm", files=files, data={"text": "a green triangle"})
            return "itm", r.json()["score"]
        return str(path), caption(client, path.read_bytes()).json()["caption"]

    with ThreadPoolExecutor(32) as pool:
        answers = list(pool.map(one, range(32)))
    assert len(answers) == 32
    for key, value in answers:
        if key == "itm":
            assert value == pytest.approx(float(itm_single), abs=1e-5)
        else:
            assert value == single[Path(key)]


# ------------------------------------------------------------------------------- cli errors
def test_cli_errors_before_serving(world, capsys):
    from dlip.cli import main

    assert main(["serve", "--model", str(world["root"] / "nope"), "--port", "1"]) == 2
    assert "not a saved model directory" in capsys.readouterr().err
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the preset's random-weights warning
        code = main(["serve", "--model", "test_tiny", "--index", str(world["root"] / "index")])
    assert code == 2 and "rebuild the index" in capsys.readouterr().err
