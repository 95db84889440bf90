"""Webdataset shards: writer (resumable, indexed) and the training pipeline over them."""

from __future__ import annotations

import io
import itertools
import json
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dlip.data import shards as shards_mod
from dlip.data.common import SkipCounts, read_manifest, write_manifest
from dlip.data.shards import read_shard_index, shard_urls, write_shards
from dlip.data.webdata import SharedEpoch, expand_urls, wds_pipeline
from dlip.tokenizer import pre_caption

torch.set_num_threads(1)

PHOTOS = Path(__file__).resolve().parents[1] / "src" / "dlip" / "assets" / "photos"
MAX_SIDE = 64
N_GOOD = 20
# Bad rows interleaved with the good ones, by manifest position, and why each is skipped.
BAD_AT = {
    2: "missing_file",
    5: "not_an_image",
    9: "truncated",
    13: "empty_image",
    14: "empty_caption",
    21: "empty_caption",
    26: "truncated",  # the manifest's last row: trailing skips still belong to a shard
}


def _variant(i: int) -> Image.Image:
    """A distinct real-photo image: crop, size, orientation and colour vary with i."""
    photo = Image.open(PHOTOS / ["astronaut.jpg", "chelsea.jpg", "coffee.jpg"][i % 3])
    w, h = photo.size
    left, top = (i * 17) % (w // 3), (i * 11) % (h // 3)
    im = photo.crop((left, top, left + w // 2 + i * 5, top + h // 2 + i * 3)).convert("RGB")
    longest = 40 + 9 * i  # 40..211: some already under MAX_SIDE (kept as is), most shrunk
    scale = longest / max(im.size)
    im = im.resize((max(1, round(im.width * scale)), max(1, round(im.height * scale))))
    if i % 4 == 1:
        im = im.transpose(Image.Transpose.ROTATE_90)  # portrait
    if i % 5 == 2:
        im = Image.merge("RGB", im.split()[::-1])
    if i == 7:
        im = im.convert("L")  # grayscale must come out RGB
    return im


def _bad_row(tmp: Path, reason: str, n: int, good_image: str) -> dict[str, str]:
    path = tmp / f"bad{n}.jpg"
    if reason == "not_an_image":
        path.write_text("this is not a jpeg")
    elif reason == "truncated":
        path.write_bytes(Path(good_image).read_bytes()[:400])
    elif reason == "empty_image":
        path.write_bytes(b"")
    caption = " \n " if reason == "empty_caption" else f"bad row {n}"
    image = good_image if reason == "empty_caption" else str(path)
    return {"image": image, "caption": caption, "source": "photos", "image_id": f"bad{n}"}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """A manifest of 20 real images with distinct captions and 7 bad rows; returns its path."""
    tmp = tmp_path_factory.mktemp("corpus")
    good = []
    for i in range(N_GOOD):
        path = tmp / f"img{i:02d}.{'png' if i % 6 == 3 else 'jpg'}"
        _variant(i).save(path)
        caption = f"A Photo #{i}: the {['astronaut', 'cat', 'coffee'][i % 3]} (variant {i})!"
        good.append(
            {"image": str(path), "caption": caption, "source": "photos", "image_id": f"img{i:02d}"}
        )
    rows, it = [], iter(good)
    for n in range(N_GOOD + len(BAD_AT)):
        reason = BAD_AT.get(n)
        rows.append(next(it) if reason is None else _bad_row(tmp, reason, n, good[0]["image"]))
    write_manifest(rows, tmp / "manifest.jsonl")
    return tmp / "manifest.jsonl"


@pytest.fixture(scope="module")
def written(corpus, tmp_path_factory) -> Path:
    """The corpus written once, uninterrupted: 20 samples in shards of 6."""
    out = tmp_path_factory.mktemp("shards")
    write_shards(corpus, out, max_side=MAX_SIDE, shard_size=6, progress=False)
    return out


def _tar_members(path: Path) -> list[tuple[str, bytes]]:
    with tarfile.open(path) as tar:
        return [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()]


def _to_uint8(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1)  # (3, H, W) uint8


def _fixed_size(image: Image.Image) -> torch.Tensor:
    return _to_uint8(image.resize((16, 16)))  # (3, 16, 16)


def _expected_pixels(path: str) -> np.ndarray:
    """The manifest image under the max_side rule, computed here independently."""
    im = Image.open(path).convert("RGB")
    w, h = im.size
    if max(w, h) > MAX_SIDE:
        s = MAX_SIDE / max(w, h)
        im = im.resize((round(w * s), round(h * s)), Image.Resampling.BICUBIC)
    return np.asarray(im).astype(np.float32)


def _samples(pipeline) -> tuple[list[dict], SkipCounts]:
    """Unbatched samples of one pass over a pipeline, and the summed skip counts."""
    out, skipped = [], SkipCounts()
    for batch in pipeline:
        skipped.update(batch["skipped"])
        for k in range(len(batch["caption"])):
            out.append({key: batch[key][k] for key in ("image", "caption", "image_id", "source")})
    return out, skipped


def test_write_report_and_index(corpus, written):
    rows = list(read_manifest(corpus))
    report = write_shards(corpus, written, max_side=MAX_SIDE, shard_size=6, progress=False)
    assert report.complete and report.reused_shards == 4  # already done: nothing rewritten
    assert report.samples == N_GOOD and report.rows == len(rows)
    assert report.skipped == Counter(BAD_AT.values())
    assert report.shards == ["000000.tar", "000001.tar", "000002.tar", "000003.tar"]
    assert sorted(p.name for p in written.iterdir()) == [*report.shards, "index.json"]

    index = read_shard_index(written)
    assert index["complete"] and index["params"] == {"max_side": 64, "shard_size": 6, "quality": 95}
    assert [s["samples"] for s in index["shards"]] == [6, 6, 6, 2]
    ranges = [s["rows"] for s in index["shards"]]
    assert ranges[0][0] == 0 and ranges[-1][1] == len(rows) == index["manifest_rows"]
    assert all(a[1] == b[0] for a, b in itertools.pairwise(ranges))  # contiguous
    for shard in index["shards"]:
        lo, hi = shard["rows"]
        assert shard["skipped"] == dict(Counter(BAD_AT[n] for n in range(lo, hi) if n in BAD_AT))
        assert shard["bytes"] == (written / shard["name"]).stat().st_size
    assert index["skipped"] == dict(sorted(Counter(BAD_AT.values()).items()))
    assert shard_urls(written) == [str(written / n) for n in report.shards]

    members = _tar_members(written / "000000.tar")
    assert [n for n, _ in members[:3]] == ["000000000.jpg", "000000000.txt", "000000000.json"]
    meta = json.loads(members[2][1])
    assert meta == {
        "image_id": "img00",
        "source": "photos",
        "caption": rows[0]["caption"],
        "image": rows[0]["image"],
    }
    assert members[1][1].decode() == rows[0]["caption"]


def test_max_side_and_rgb(corpus, written):
    rows = list(read_manifest(corpus))
    sizes = Counter()
    for url in shard_urls(written):
        for name, data in _tar_members(Path(url)):
            if name.endswith(".jpg"):
                im = Image.open(io.BytesIO(data))
                original = Image.open(rows[int(name.removesuffix(".jpg"))]["image"])  # key = row
                assert im.format == "JPEG" and im.mode == "RGB"
                assert max(im.size) == min(MAX_SIDE, max(original.size))  # never upscaled
                sizes[max(original.size) > MAX_SIDE] += 1
    assert sizes[True] > 5 and sizes[False] > 1  # both cases were exercised


def test_round_trip_pixels_captions_ids(corpus, written):
    rows = [r for n, r in enumerate(read_manifest(corpus)) if n not in BAD_AT]
    pipe = wds_pipeline(written, _to_uint8, batch_size=1, shuffle_buffer=7, seed=3)
    samples, skipped = _samples(pipe)
    assert not skipped  # the writer already dropped the bad rows
    got = {s["image_id"]: s for s in samples}
    assert len(samples) == len(got) == N_GOOD
    assert set(got) == {r["image_id"] for r in rows}
    for row in rows:
        sample = got[row["image_id"]]
        assert sample["caption"] == pre_caption(row["caption"]) and sample["source"] == "photos"
        pixels = sample["image"].permute(1, 2, 0).numpy().astype(np.float32)
        expected = _expected_pixels(row["image"])
        assert pixels.shape == expected.shape
        assert np.abs(pixels - expected).mean() < 4.0, row["image_id"]  # JPEG q95 error


def test_resume_after_stop_is_identical(corpus, written, tmp_path, monkeypatch):
    report = write_shards(
        corpus, tmp_path, max_side=MAX_SIDE, shard_size=6, progress=False, stop_after=2
    )
    assert not report.complete and report.shards == ["000000.tar", "000001.tar"]
    assert not read_shard_index(tmp_path)["complete"]
    with pytest.raises(ValueError, match="did not finish"):
        shard_urls(tmp_path)
    first = (tmp_path / "000000.tar").stat()
    covered = read_shard_index(tmp_path)["shards"][-1]["rows"][1]

    seen = []
    real = shards_mod.encode_sample
    monkeypatch.setattr(
        shards_mod, "encode_sample", lambda row, *a: seen.append(row) or real(row, *a)
    )
    report = write_shards(corpus, tmp_path, max_side=MAX_SIDE, shard_size=6, progress=False)
    assert report.complete and report.reused_shards == 2
    rows = list(read_manifest(corpus))
    assert seen == rows[covered:]  # only rows after the completed shards were decoded
    assert (tmp_path / "000000.tar").stat().st_mtime_ns == first.st_mtime_ns
    _assert_same_output(written, tmp_path)


def test_resume_after_crash_mid_shard(corpus, written, tmp_path, monkeypatch):
    real = shards_mod.encode_sample

    def crash_in_third_shard(row, *args):
        if row["image_id"] == "img14":  # shards hold img00-05, img06-11, img12-17, img18-19
            raise KeyboardInterrupt
        return real(row, *args)

    monkeypatch.setattr(shards_mod, "encode_sample", crash_in_third_shard)
    with pytest.raises(KeyboardInterrupt):
        write_shards(corpus, tmp_path, max_side=MAX_SIDE, shard_size=6, progress=False)
    assert (tmp_path / "000002.tar.tmp").exists()  # the unfinished shard
    assert [s["name"] for s in read_shard_index(tmp_path)["shards"]] == ["000000.tar", "000001.tar"]
    monkeypatch.setattr(shards_mod, "encode_sample", real)
    write_shards(corpus, tmp_path, max_side=MAX_SIDE, shard_size=6, progress=False, workers=2)
    _assert_same_output(written, tmp_path)


@pytest.mark.parametrize("kill", ["mid_append", "before_append", "before_unlink", "header"])
def test_resume_after_kill_around_the_journal(corpus, written, tmp_path, kill):
    """Each state a kill can leave around the journal resumes to the uninterrupted bytes."""
    journal = tmp_path / shards_mod.JOURNAL_NAME
    kwargs = {"max_side": MAX_SIDE, "shard_size": 6, "progress": False}
    if kill == "before_unlink":  # the final index was written, the journal not yet deleted
        write_shards(corpus, tmp_path, **kwargs)
        journal.write_text('{"name": "000000.tar"}\n')
    else:
        write_shards(corpus, tmp_path, **kwargs, stop_after=3)
        lines = journal.read_bytes().splitlines(keepends=True)
        # mid_append: the third line torn; before_append: shard 2 renamed, its line unwritten
        torn = lines[2][: len(lines[2]) // 2] if kill == "mid_append" else b""
        journal.write_bytes(b"".join(lines[:2]) + torn)
        if kill == "header":  # killed right after the run's first index.json
            for path in [journal, *tmp_path.glob("*.tar")]:
                path.unlink()
        listed = [s["name"] for s in read_shard_index(tmp_path)["shards"]]
        assert listed == ([] if kill == "header" else ["000000.tar", "000001.tar"])
        write_shards(corpus, tmp_path, **kwargs, stop_after=1)  # appends after the torn line
        assert len(read_shard_index(tmp_path)["shards"]) == len(listed) + 1
    report = write_shards(corpus, tmp_path, **kwargs)
    assert report.complete and not journal.exists()
    _assert_same_output(written, tmp_path)


def _assert_same_output(a: Path, b: Path) -> None:
    names = sorted(p.name for p in a.iterdir())
    assert names == sorted(p.name for p in b.iterdir())
    for name in names:
        if name.endswith(".tar"):
            assert _tar_members(a / name) == _tar_members(b / name), name
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


def test_only_bad_rows(corpus, tmp_path):
    rows = [r for n, r in enumerate(read_manifest(corpus)) if n in BAD_AT]
    write_manifest(rows, tmp_path / "bad.jsonl")
    report = write_shards(tmp_path / "bad.jsonl", tmp_path / "out", progress=False)
    assert report.complete and report.shards == [] and report.samples == 0
    assert report.rows == len(BAD_AT) and report.skipped == Counter(BAD_AT.values())
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["index.json"]


def test_resume_with_other_options_is_refused(corpus, tmp_path):
    write_shards(corpus, tmp_path, max_side=MAX_SIDE, shard_size=6, progress=False, stop_after=1)
    with pytest.raises(ValueError, match=r"index\.json: params differs"):
        write_shards(corpus, tmp_path, max_side=32, shard_size=6, progress=False)
    report = write_shards(corpus, tmp_path, max_side=32, shard_size=6, progress=False, resume=False)
    assert report.complete and report.reused_shards == 0 and report.samples == N_GOOD


def test_epoch_shuffle_reproducible(written):
    def order(seed: int, epoch: int) -> list[str]:
        pipe = wds_pipeline(
            written,
            _fixed_size,
            batch_size=4,
            seed=seed,
            epoch=SharedEpoch(epoch),
            shuffle_buffer=8,
        )
        return [s["image_id"] for s in _samples(pipe)[0]]

    epoch0 = order(0, 0)
    assert sorted(epoch0) == sorted(order(0, 1)) and len(epoch0) == N_GOOD
    assert order(0, 0) == epoch0  # a function of (seed, epoch)
    assert order(0, 1) != epoch0 and order(1, 0) != epoch0

    shared = SharedEpoch(0)
    pipe = wds_pipeline(written, _fixed_size, batch_size=4, epoch=shared, shuffle_buffer=8)
    first = [s["image_id"] for s in _samples(pipe)[0]]
    shared.set_value(1)  # what the training loop does between epochs
    assert first == epoch0 and [s["image_id"] for s in _samples(pipe)[0]] == order(0, 1)


def test_two_workers_see_every_sample_once(written):
    from dlip.models.presets import get_config
    from dlip.transforms import eval_transform

    config = get_config("test_tiny")
    size = config.vision.image_size
    epoch = SharedEpoch(0)

    def loader(persistent: bool) -> torch.utils.data.DataLoader:
        pipe = wds_pipeline(written, eval_transform(config), batch_size=4, epoch=epoch)
        return torch.utils.data.DataLoader(
            pipe, batch_size=None, num_workers=2, persistent_workers=persistent
        )

    orders = []
    persistent = loader(persistent=True)  # workers must still see the new epoch
    for e in range(2):
        epoch.set_value(e)
        ids = []
        for batch in persistent:
            assert batch["image"].shape[1:] == (3, size, size)  # (B, 3, S, S)
            assert batch["image"].dtype == torch.float32
            assert len(batch["caption"]) == len(batch["image_id"]) == batch["image"].shape[0]
            ids += batch["image_id"]
        assert sorted(ids) == [f"img{i:02d}" for i in range(N_GOOD)]  # each exactly once
        orders.append(ids)
    assert orders[0] != orders[1]
    assert [i for b in loader(persistent=False) for i in b["image_id"]] == orders[1]


def test_split_by_node_and_resampling(written, monkeypatch):
    def ids(rank: int, worker: int, resampled: bool = False, epoch: int = 0) -> list[str]:
        # webdataset reads rank and worker from these variables before torch's own state
        env = {"RANK": rank, "WORLD_SIZE": 2, "WORKER": worker, "NUM_WORKERS": 2}
        for k, v in env.items():
            monkeypatch.setenv(k, str(v))
        pipe = wds_pipeline(
            written,
            _fixed_size,
            batch_size=5,
            resampled=resampled,
            shuffle_buffer=10,
            epoch=SharedEpoch(epoch),
        )
        return [s["image_id"] for s in _samples(pipe.with_epoch(4) if resampled else pipe)[0]]

    parts = [ids(rank, worker) for rank in (0, 1) for worker in (0, 1)]
    everything = sorted(i for part in parts for i in part)
    assert everything == [f"img{i:02d}" for i in range(N_GOOD)]  # disjoint and complete
    assert all(parts)  # 4 shards, 2 ranks x 2 workers: one shard each

    drawn = ids(0, 0, resampled=True)
    assert len(drawn) == 20 and len(set(drawn)) < 20  # shards drawn with replacement
    assert drawn == ids(0, 0, resampled=True)  # reproducible for (seed, epoch, rank, worker)
    assert drawn != ids(0, 1, resampled=True) and drawn != ids(1, 0, resampled=True)
    assert drawn != ids(0, 0, resampled=True, epoch=1)


def _source_shards(corpus: Path, out: Path, source: str) -> list[str]:
    rows = [dict(r, source=source) for r in read_manifest(corpus)]
    write_manifest(rows, out / "m.jsonl")
    write_shards(out / "m.jsonl", out / "shards", max_side=16, shard_size=5, progress=False)
    return shard_urls(out / "shards")


def test_weighted_mixing_matches_weights(corpus, tmp_path):
    a = _source_shards(corpus, tmp_path / "a", "a")
    b = _source_shards(corpus, tmp_path / "b", "b")

    def sources(seed: int) -> list[str]:
        pipe = wds_pipeline(
            [a, b], _fixed_size, batch_size=50, weights=[3, 1], seed=seed, shuffle_buffer=20
        ).with_epoch(8)
        return [s["source"] for s in _samples(pipe)[0]]

    drawn = sources(seed=0)
    assert len(drawn) == 400
    # 400 draws with p = 0.75: sd 0.022, so +-0.08 is a 3.7-sigma bound (fixed seed anyway).
    assert abs(drawn.count("a") / 400 - 0.75) < 0.08
    assert drawn == sources(seed=0) and drawn != sources(seed=1)


def _tar(path: Path, samples: list[dict[str, bytes]]) -> str:
    with tarfile.open(path, "w") as tar:
        for sample in samples:
            key = sample.pop("__key__").decode()
            for ext, data in sample.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return str(path)


def test_corrupt_members_and_shards_are_counted(written, tmp_path):
    good = dict(_tar_members(written / "000000.tar"))
    jpg, meta = good["000000000.jpg"], good["000000000.json"]
    bad = _tar(
        tmp_path / "bad.tar",
        [
            {"__key__": b"a", "jpg": jpg, "txt": b"a good one", "json": meta},
            {"__key__": b"b", "jpg": b"\xff\xd8 not really a jpeg", "txt": b"garbage jpg"},
            {"__key__": b"c", "jpg": jpg[: len(jpg) // 2], "txt": b"truncated jpg"},
            {"__key__": b"d", "jpg": jpg, "txt": b"   "},
            {"__key__": b"e", "jpg": jpg, "txt": b"\xff\xfe not utf-8"},
            {"__key__": b"f", "txt": b"no image member"},
            {"__key__": b"g", "jpg": jpg, "txt": b"broken json", "json": b"{"},
            {"__key__": b"h", "png": b"", "txt": b"zero bytes"},
            {"__key__": b"i", "jpg": jpg, "txt": b"another good one"},
        ],
    )
    whole = Path(_tar(tmp_path / "whole.tar", [{"__key__": b"z", "jpg": jpg, "txt": b"fine"}]))
    cut = tmp_path / "cut.tar"  # a shard cut off inside its first member's data
    cut.write_bytes(whole.read_bytes()[:1000])
    pipe = wds_pipeline(
        [bad, str(cut), str(tmp_path / "absent.tar")],
        _fixed_size,
        batch_size=2,
        shardshuffle=False,
        shuffle_buffer=0,
    )
    samples, skipped = _samples(pipe)
    assert expand_urls(tmp_path) == [bad, str(cut), str(whole)]  # a plain folder of tars
    assert [s["caption"] for s in samples] == ["a good one", "another good one"]
    assert [s["image_id"] for s in samples] == ["img00", "i"]  # json's id, else the tar key
    assert skipped == {
        "not_an_image": 1,
        "truncated": 1,
        "empty_caption": 1,
        "bad_text": 2,
        "missing_file": 1,
        "empty_image": 1,
        "bad_shard": 2,
    }
