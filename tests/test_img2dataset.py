"""The real img2dataset, run against a loopback HTTP server, feeds `build_img2dataset`.

Each output format (files, webdataset, parquet) is downloaded once per module from the same
URL list: real photos, a PNG, a 404, random bytes, a truncated JPEG, a whitespace caption and
a COCO-style URL. img2dataset itself marks the 404 `failed_to_download` and, when it re-encodes,
the two corrupt files `failed_to_resize`; with `disable_all_reencoding` the corrupt bytes reach
the builder, whose `verify` catches them. Every count below is exact.
"""

from __future__ import annotations

import functools
import http.server
import io
import json
import os
import shutil
import signal
import tarfile
import threading
from pathlib import Path

import pytest
from PIL import Image

import dlip
from dlip.data.common import file_image_id, read_manifest
from dlip.data.manifest import (
    BuildReport,
    build_img2dataset,
    detect_img2dataset_format,
    merge_manifests,
    write_rows,
)

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # no PyPI check from albumentations
pytest.importorskip("img2dataset")

PHOTOS = Path(dlip.__file__).parent / "assets" / "photos"
COCO_NAME = "train2017/000000328757.jpg"  # a Karpathy test image id in COCO's 2017 layout

# (served path, caption, what img2dataset does with it when it re-encodes)
SAMPLES = [
    ("astronaut.jpg", "an astronaut in a white suit", "success"),
    ("chelsea.jpg", "a tabby cat looking up", "success"),
    ("camera.png", "a man with a camera on a tripod", "success"),
    ("missing.jpg", "this url answers 404", "failed_to_download"),
    ("noise.jpg", "random bytes, not an image", "failed_to_resize"),
    ("half.jpg", "the first third of a jpeg", "failed_to_resize"),
    ("coffee.jpg", "   ", "success"),  # img2dataset keeps it; the builder drops it
    (COCO_NAME, "a cup of coffee on a saucer", "success"),
]
KEYS = {name: f"{i:09d}" for i, (name, _, _) in enumerate(SAMPLES)}  # img2dataset keys


def _kept(names: list[str]) -> set[tuple[str, str]]:
    """Expected (caption, image_id) of kept samples; a COCO URL yields the COCO image id."""
    caption = {name: cap for name, cap, _ in SAMPLES}
    ids = {n: "coco_328757" if n == COCO_NAME else f"web_{KEYS[n]}" for n in names}
    return {(caption[n], ids[n]) for n in names}


GOOD = ["astronaut.jpg", "chelsea.jpg", "camera.png", COCO_NAME]


def _write_site(root: Path) -> None:
    import numpy as np
    from skimage import data

    for name in ("astronaut.jpg", "chelsea.jpg", "coffee.jpg"):
        shutil.copy(PHOTOS / name, root / name)
    Image.fromarray(data.camera()).save(root / "camera.png")  # grayscale PNG
    (root / "noise.jpg").write_bytes(np.random.default_rng(0).bytes(3000))
    jpeg = (PHOTOS / "chelsea.jpg").read_bytes()
    (root / "half.jpg").write_bytes(jpeg[: len(jpeg) // 3])
    (root / "train2017").mkdir()
    shutil.copy(PHOTOS / "coffee.jpg", root / COCO_NAME)


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


@pytest.fixture(scope="module")
def url_list(tmp_path_factory) -> Path:
    """A parquet URL list pointing at a loopback server that runs for the whole module."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    site = tmp_path_factory.mktemp("site")
    _write_site(site)
    handler = functools.partial(_QuietHandler, directory=str(site))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    path = tmp_path_factory.mktemp("urls") / "urls.parquet"
    urls = [f"{base}/{name}" for name, _, _ in SAMPLES]
    pq.write_table(pa.table({"url": urls, "caption": [c for _, c, _ in SAMPLES]}), path)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("NO_PROXY", "127.0.0.1")  # a proxy must never see loopback requests
        mp.setenv("no_proxy", "127.0.0.1")
        yield path
    server.shutdown()
    thread.join()


@pytest.fixture(scope="module")
def download(url_list, tmp_path_factory):
    """download(fmt, **options) -> output folder; each combination runs img2dataset once."""
    from img2dataset import download as i2d_download

    cache: dict[tuple, Path] = {}

    def run(fmt: str, **options) -> Path:
        key = (fmt, *sorted(options.items()))
        if key not in cache:
            out = tmp_path_factory.mktemp(f"i2d_{fmt}") / "web"
            sigint = signal.getsignal(signal.SIGINT)  # img2dataset installs its own handler
            try:
                i2d_download(
                    url_list=str(url_list),
                    input_format="parquet",
                    url_col="url",
                    caption_col="caption",
                    output_format=fmt,
                    output_folder=str(out),
                    processes_count=1,
                    thread_count=4,
                    image_size=64,
                    timeout=5,
                    retries=0,
                    enable_wandb=False,
                    **options,
                )
            finally:
                signal.signal(signal.SIGINT, sigint)
            cache[key] = out
        return cache[key]

    return run


def _statuses(folder: Path) -> dict[str, str]:
    import pyarrow.parquet as pq

    table = pq.read_table(folder / "00000.parquet", columns=["key", "status"]).to_pylist()
    return {r["key"]: r["status"] for r in table}


def _check_img2dataset_marked(folder: Path, reencoded: bool) -> None:
    """What img2dataset itself recorded: per-sample status and the shard stats."""
    # Without re-encoding img2dataset never decodes, so the corrupt files count as successes.
    expected = {
        KEYS[name]: "success" if status == "failed_to_resize" and not reencoded else status
        for name, _, status in SAMPLES
    }
    assert _statuses(folder) == expected
    stats = json.loads((folder / "00000_stats.json").read_text())
    assert stats["count"] == len(SAMPLES)
    assert stats["failed_to_download"] == 1
    assert stats["failed_to_resize"] == (2 if reencoded else 0)


def _check_images(rows: list[dict]) -> None:
    for row in rows:
        assert os.path.isabs(row["image"])
        with Image.open(row["image"]) as im:
            assert im.size == (64, 64)  # img2dataset's border resize to image_size
            im.load()


def test_files_output(download, tmp_path):
    folder = download("files")
    _check_img2dataset_marked(folder, reencoded=True)
    assert detect_img2dataset_format(folder) == "files"
    report = BuildReport()
    n = write_rows(build_img2dataset(folder, report=report), tmp_path / "m.jsonl", report)
    rows = list(read_manifest(tmp_path / "m.jsonl"))
    assert n == len(rows) == 4
    assert report.kept == {"web": 4}
    assert report.skipped == {"download_failed": 3, "empty_caption": 1}
    assert {(r["caption"], r["image_id"]) for r in rows} == _kept(GOOD)
    assert {r["source"] for r in rows} == {"web"}
    assert all(Path(r["image"]).parent == folder / "00000" for r in rows)
    _check_images(rows)


def test_files_output_with_a_lost_image_and_lost_metadata(download, tmp_path):
    folder = tmp_path / "web"
    shutil.copytree(download("files"), folder)
    (folder / "00000" / f"{KEYS['chelsea.jpg']}.jpg").unlink()
    report = BuildReport()
    rows = list(build_img2dataset(folder, report=report, source="cc3m"))
    assert report.skipped == {"download_failed": 3, "empty_caption": 1, "missing_file": 1}
    assert {r["image_id"] for r in rows} >= {f"cc3m_{KEYS['astronaut.jpg']}"}

    # Without the shard parquet only the per-sample .json files remain: successes only.
    (folder / "00000.parquet").unlink()
    report = BuildReport()
    rows = list(build_img2dataset(folder, report=report, source="cc3m"))
    assert len(rows) == 3 and report.skipped == {"empty_caption": 1, "missing_file": 1}
    assert any("unreadable shard metadata" in note for note in report.notes)


def test_webdataset_output_corrupt_bytes_reach_the_builder(download, tmp_path):
    folder = download("webdataset", disable_all_reencoding=True)
    _check_img2dataset_marked(folder, reencoded=False)
    assert detect_img2dataset_format(folder) == "webdataset"
    with pytest.raises(ValueError, match="pass extract_to"):
        next(build_img2dataset(folder, report=BuildReport()))

    # Without verification the corrupt files pass as images (img2dataset never decoded them).
    report = BuildReport()
    rows = list(build_img2dataset(folder, report=report, extract_to=tmp_path / "plain"))
    assert len(rows) == 6 and report.skipped == {"download_failed": 1, "empty_caption": 1}

    report = BuildReport()
    extract = tmp_path / "images"
    rows = list(build_img2dataset(folder, report=report, extract_to=extract, verify=True))
    assert report.skipped == {
        "download_failed": 1,
        "empty_caption": 1,
        "not_an_image": 1,
        "truncated": 1,
    }
    assert {(r["caption"], r["image_id"]) for r in rows} == _kept(GOOD)
    with tarfile.open(folder / "00000.tar") as tar:  # extracted bytes are the tar's bytes
        for row in rows:
            member = f"{Path(row['image']).stem}.jpg"
            assert Path(row["image"]).read_bytes() == tar.extractfile(member).read()
            assert Path(row["image"]).parent == extract / "00000"

    # Resuming re-uses what is there: no file is rewritten.
    mtimes = {r["image"]: os.stat(r["image"]).st_mtime_ns for r in rows}
    again = list(build_img2dataset(folder, report=BuildReport(), extract_to=extract, verify=True))
    assert again == rows
    assert {r["image"]: os.stat(r["image"]).st_mtime_ns for r in again} == mtimes


def test_parquet_output(download, tmp_path):
    folder = download("parquet")
    _check_img2dataset_marked(folder, reencoded=True)
    assert detect_img2dataset_format(folder) == "parquet"
    report = BuildReport()
    rows = list(build_img2dataset(folder, report=report, extract_to=tmp_path / "x"))
    assert report.skipped == {"download_failed": 3, "empty_caption": 1}
    assert {(r["caption"], r["image_id"]) for r in rows} == _kept(GOOD)
    _check_images(rows)
    coco = next(r for r in rows if r["image_id"] == "coco_328757")
    assert coco["url"].endswith(COCO_NAME)  # in-memory rows keep the URL


def test_leakage_guard_drops_coco_test_images_from_img2dataset_rows(download, tmp_path):
    report = BuildReport()
    write_rows(build_img2dataset(download("files"), report=report), tmp_path / "a.jsonl", report)
    test_split = tmp_path / "coco_karpathy_test.json"
    entry = {"image": "val2014/COCO_val2014_000000328757.jpg", "caption": ["a"] * 5}
    test_split.write_text(json.dumps([entry]))
    merged = BuildReport()
    rows = list(
        merge_manifests([tmp_path / "a.jsonl"], report=merged, exclude_karpathy=[test_split])
    )
    assert merged.skipped == {"karpathy_eval": 1}
    assert {r["caption"] for r in rows} == {caption for caption, _ in _kept(GOOD[:3])}
    assert all(r["image_id"] == file_image_id(r) for r in rows)  # merged ids name the files


def test_not_img2dataset_output_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="no img2dataset shards"):
        detect_img2dataset_format(tmp_path)
    with pytest.raises(FileNotFoundError, match="not found"):
        detect_img2dataset_format(tmp_path / "absent")


def test_parquet_bytes_decode(download):
    """img2dataset's parquet image column holds complete JPEGs for successes, null otherwise."""
    import pyarrow.parquet as pq

    table = pq.read_table(download("parquet") / "00000.parquet").to_pylist()
    for row in table:
        if row["status"] == "success":
            assert Image.open(io.BytesIO(row["jpg"])).size == (64, 64)
        else:
            assert row["jpg"] is None
