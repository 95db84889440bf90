"""An index whose files changed after it was built: a re-ranked search skips (and counts) the
files it can no longer read, `dlip serve` answers without them and never shows a server path in
an error, and a rebuild re-embeds the files replaced in place (size + mtime_ns) only."""

from __future__ import annotations

import io
import json
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import torch
from PIL import Image

from dlip.data.synthetic import synthesize
from dlip.inference.index import ImageIndex, build_index, list_images
from dlip.inference.predictor import Predictor

QUERY = "a red circle"


def _indexed_copy(pred: Predictor, root: Path) -> ImageIndex:
    """A fresh folder of 12 synthetic images and its index (at root/index)."""
    synthesize(root / "images", 12, image_size=32)
    assert build_index(pred, root / "images", root / "index", progress=False).complete
    return ImageIndex.load(root / "index")


def _replace_image(path: Path, color: str, size: int, mtime_ns: int) -> None:
    """Overwrite `path` in place with another picture and a chosen mtime."""
    Image.new("RGB", (size, size), color).save(path, format=Image.open(path).format)
    os.utime(path, ns=(mtime_ns, mtime_ns))


# ------------------------------------------------------------------------------- search
@pytest.mark.parametrize("damage", ["deleted", "not_an_image"])
def test_rerank_skips_and_counts_unreadable_files(pred, tmp_path, damage):
    index = _indexed_copy(pred, tmp_path)
    before = pred.search(QUERY, index, k=4, rerank=6)
    assert before.skipped == {}
    victim = Path(before[1].path)
    if damage == "deleted":
        victim.unlink()
    else:
        victim.write_bytes(b"<html>not an image</html>")
    hits = pred.search(QUERY, index, k=4, rerank=6)
    assert len(hits) == 4 and victim.as_posix() not in {Path(h.path).as_posix() for h in hits}
    assert all(h.itm is not None and h.score == pytest.approx(h.itm + h.itc) for h in hits)
    assert list(hits.skipped) == [before[1].path]
    reason = "missing_file" if damage == "deleted" else "not_an_image"
    assert hits.skipped[before[1].path] == reason
    kept = [h.path for h in before if h.path != before[1].path]
    assert [h.path for h in hits][:3] == kept  # the others keep their order and scores
    plain = pred.search(QUERY, index, k=4)  # without re-ranking no file is read
    assert len(plain) == 4 and plain.skipped == {}


def test_search_cli_names_the_files_it_skipped(pred, model_dir, tmp_path, capsys):
    from dlip.cli import main

    index = _indexed_copy(pred, tmp_path)
    victim = Path(pred.search(QUERY, index, k=3, rerank=5)[0].path)
    victim.unlink()
    argv = ["search", str(tmp_path / "index"), QUERY, "-k", "3", "--rerank", "5"]
    assert main([*argv, "--model", str(model_dir), "--json"]) == 0
    printed = capsys.readouterr()
    assert len(json.loads(printed.out)) == 3
    assert "skipped 1 unreadable index files" in printed.err
    assert f"{victim.as_posix()}: missing_file" in printed.err


def _no_server_path(response: httpx.Response, root: Path) -> None:
    assert response.status_code >= 400 and set(response.json()) == {"error"}, response.text
    for secret in (str(root), str(root.resolve()), "/tmp", os.sep + "images" + os.sep):
        assert secret not in response.text, response.text


def test_serve_search_skips_missing_files_and_hides_paths(pred, model_dir, tmp_path, serve_process):
    index = _indexed_copy(pred, tmp_path)
    params = {"q": QUERY, "k": 4, "rerank": 6}
    victim = Path(pred.search(QUERY, index, k=4, rerank=6)[0].path)
    victim.unlink()
    other = Path(pred.search(QUERY, index, k=4, rerank=6)[0].path)
    other.replace(tmp_path / other.name)
    other.mkdir()  # a second bad entry: a folder where the file was
    want = pred.search(QUERY, index, k=4, rerank=6)
    assert len(want.skipped) == 2
    server = serve_process(
        ["--model", str(model_dir), "--index", str(tmp_path / "index")], tmp_path / "log"
    ).wait()
    client = httpx.Client(base_url=server.url, timeout=120)
    try:
        got = client.get("/api/search", params=params)
        assert got.status_code == 200, got.text
        body = got.json()
        assert [r["path"] for r in body["results"]] == [h.path for h in want]
        assert body["skipped"] == 2
        for path in (victim, other):
            i = index.paths.index(path.relative_to(index.meta["root"]).as_posix())
            _no_server_path(client.get(f"/api/image/{i}"), tmp_path)
        ok = client.get("/api/search", params={"q": QUERY})
        assert ok.status_code == 200 and ok.json()["skipped"] == 0
    finally:
        server.stop()


# ------------------------------------------------------------------------------- rebuild
def test_rebuild_reembeds_files_replaced_in_place(pred, tmp_path):
    images = tmp_path / "images"
    synthesize(images, 12, image_size=32)
    build_index(pred, images, tmp_path / "index", chunk_size=5, progress=False)
    old = ImageIndex.load(tmp_path / "index")
    changed = old.paths[6]
    stat = (images / changed).stat()
    _replace_image(images / changed, "yellow", 48, stat.st_mtime_ns - 10**9)
    assert (images / changed).stat().st_size != stat.st_size

    report = build_index(pred, images, tmp_path / "index", chunk_size=5, progress=False)
    assert report.complete and report.refreshed == 1
    new = ImageIndex.load(tmp_path / "index")
    assert new.paths == old.paths and new.meta["change_check"] == "size+mtime_ns"
    build_index(pred, images, tmp_path / "fresh", chunk_size=5, progress=False)  # from scratch
    fresh = ImageIndex.load(tmp_path / "fresh")
    i = new.paths.index(changed)
    torch.testing.assert_close(new.features[i], fresh.features[i])
    assert not torch.allclose(new.features[i], old.features[i])
    same = [j for j in range(len(old)) if j != i]
    torch.testing.assert_close(new.features[same], old.features[same], rtol=0, atol=0)

    again = build_index(pred, images, tmp_path / "fresh", chunk_size=5, progress=False)
    assert again.refreshed == 0 and again.resumed_chunks == 3  # nothing changed: nothing redone
    torch.testing.assert_close(ImageIndex.load(tmp_path / "fresh").features, fresh.features)


def test_chunks_without_signatures_are_redone(pred, tmp_path):
    """A partial build written before signatures were recorded still resumes correctly."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    images = tmp_path / "images"
    synthesize(images, 12, image_size=32)
    out = tmp_path / "index"
    build_index(pred, images, out, chunk_size=5, max_chunks=1, progress=False)
    chunk = out / "chunks" / "00000.safetensors"
    with safe_open(str(chunk), framework="pt") as f:
        meta, feats = f.metadata(), f.get_tensor("features")
    save_file({"features": feats}, str(chunk), metadata={k: meta[k] for k in ("paths", "bad")})
    _replace_image(images / list_images(images)[0], "yellow", 48, 10**18)
    report = build_index(pred, images, out, chunk_size=5, progress=False)
    assert report.complete and report.refreshed == 5
    build_index(pred, images, tmp_path / "fresh", chunk_size=5, progress=False)
    torch.testing.assert_close(
        ImageIndex.load(out).features, ImageIndex.load(tmp_path / "fresh").features
    )


# ------------------------------------------------------------------------------- thumbnails
def _counting_decoder(monkeypatch) -> dict:
    """Wrap serve._make_thumbnail (the real decoder) to count calls and the most at once; each
    call lingers 0.1 s so that requests arriving together really overlap."""
    import dlip.inference.serve as serve_module

    real = serve_module._make_thumbnail
    stats = {"calls": 0, "running": 0, "most": 0}
    guard = threading.Lock()

    def counted(path: Path, max_pixels: int) -> bytes:
        with guard:
            stats["calls"] += 1
            stats["running"] += 1
            stats["most"] = max(stats["most"], stats["running"])
        try:
            time.sleep(0.1)
            return real(path, max_pixels)
        finally:
            with guard:
                stats["running"] -= 1

    monkeypatch.setattr(serve_module, "_make_thumbnail", counted)
    return stats


def test_thumbnails_decode_each_image_once_and_one_at_a_time(pred, tmp_path, monkeypatch):
    from dlip.inference.serve import Service

    index = _indexed_copy(pred, tmp_path)
    big = Path(index.path(0))
    Image.new("RGB", (2400, 1800), "teal").save(big, format=Image.open(big).format)
    service = Service(pred, index)
    stats = _counting_decoder(monkeypatch)
    with ThreadPoolExecutor(24) as pool:  # 24 requests for one image at the same moment
        thumbs = list(pool.map(lambda _: service.thumbnail(0), range(24)))
    assert stats["calls"] == 1 and len(set(thumbs)) == 1
    assert Image.open(io.BytesIO(thumbs[0])).size == (256, 192)
    with ThreadPoolExecutor(8) as pool:  # 8 different images: decoded one after another
        list(pool.map(service.thumbnail, range(1, 9)))
    assert stats["calls"] == 9 and stats["most"] == 1
    assert service._pending == {}  # no per-image gate outlives its requests


def test_a_thumbnail_follows_its_file_and_errors_are_cached(pred, tmp_path, monkeypatch):
    from dlip.inference.serve import ApiError, Service

    index = _indexed_copy(pred, tmp_path)
    service = Service(pred, index)
    stats = _counting_decoder(monkeypatch)
    first = service.thumbnail(2)
    assert service.thumbnail(2) == first and stats["calls"] == 1
    path = Path(index.path(2))
    _replace_image(path, "yellow", 48, mtime_ns=path.stat().st_mtime_ns + 10**9)
    assert service.thumbnail(2) != first and stats["calls"] == 2  # replaced in place: re-made
    path.write_bytes(b"not an image")
    for _ in range(3):
        with pytest.raises(ApiError) as err:
            service.thumbnail(2)
        assert err.value.status == 404 and "cannot be read" in str(err.value)
    assert stats["calls"] == 3  # the error was cached too, until the file changes
