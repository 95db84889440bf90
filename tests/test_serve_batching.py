"""Micro-batched serving: concurrent caption requests run as one batch and each gets exactly
the answer a lone request gets; a bad upload among them fails alone."""

from __future__ import annotations

import io
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from PIL import Image

import dlip
from dlip.inference.batching import MicroBatcher


def test_batcher_gathers_concurrent_items_and_isolates_a_failing_one():
    calls: list[list] = []
    gate = threading.Event()

    def fn(items):
        gate.wait(5)  # the first call holds the worker while the others queue up
        calls.append(list(items))
        if "bad" in items:
            raise ValueError("bad item")
        return [f"<{x}>" for x in items]

    batcher = MicroBatcher(fn, max_batch=4, wait_ms=200)
    first = batcher.submit("a")
    futures = [batcher.submit(x) for x in ("b", "bad", "c", "d", "e")]
    gate.set()
    assert first.result(5) == "<a>"
    with pytest.raises(ValueError, match="bad item"):
        futures[1].result(5)
    assert [f.result(5) for f in futures if f is not futures[1]] == ["<b>", "<c>", "<d>", "<e>"]
    assert max(batcher.sizes) > 1  # some items ran together
    assert ["bad"] in calls  # retried alone after its batch failed
    with pytest.raises(ValueError, match="max_batch"):
        MicroBatcher(fn, max_batch=0)


def _png(seed: int) -> bytes:
    g = torch.Generator().manual_seed(seed)
    pixels = (torch.rand(40, 48, 3, generator=g) * 255).to(torch.uint8).numpy()
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def server(tmp_path_factory, serve_process, perturbed_tiny):
    root = tmp_path_factory.mktemp("batch")
    dlip.save(perturbed_tiny(0.2), root / "model")  # captions that differ by image
    args = ["--model", str(root / "model"), "--max-batch", "8", "--batch-wait-ms", "100"]
    proc = serve_process(args, root / "serve.log").wait()
    yield proc
    proc.stop()


def test_concurrent_captions_equal_single_requests(server):
    import httpx

    images = [_png(i) for i in range(8)]

    def caption(data: bytes) -> httpx.Response:
        files = {"image": ("x.png", data, "image/png")}
        return httpx.post(server.url + "/api/caption", files=files, timeout=120)

    alone = [caption(data).json()["caption"] for data in images]  # one at a time
    assert len(set(alone)) > 1
    with ThreadPoolExecutor(9) as pool:
        together = list(pool.map(caption, [*images, b"not an image"]))
    assert [r.status_code for r in together] == [200] * 8 + [400]
    assert [r.json()["caption"] for r in together[:8]] == alone
    assert "error" in together[8].json()
    info = httpx.get(server.url + "/api/info", timeout=30).json()["caption_batching"]
    assert info["largest"] > 1 and info["captions"] == 16 and info["max_batch"] == 8
