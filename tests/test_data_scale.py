"""Data tools at scale: shard bookkeeping is linear in the shard count, and merge's dedupe holds
a bounded number of keys whatever the row count, with the result of a plain in-memory set."""

from __future__ import annotations

import hashlib
import os
import random
import tracemalloc
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dlip.data import common
from dlip.data.common import (
    dedupe_key,
    file_image_id,
    read_manifest,
    repeated_positions,
    write_manifest,
)
from dlip.data.manifest import BuildReport, merge_manifests
from dlip.data.shards import write_shards

PROC_IO = Path("/proc/self/io")


def _bytes_written() -> int:
    """Bytes this process has passed to write(2) so far (Linux's per-process I/O counter)."""
    for line in PROC_IO.read_text().splitlines():
        if line.startswith("wchar:"):
            return int(line.split()[1])
    raise RuntimeError("no wchar in /proc/self/io")


@pytest.mark.skipif(not PROC_IO.is_file(), reason="needs Linux's /proc/self/io")
def test_shard_bookkeeping_writes_grow_linearly(tmp_path, monkeypatch):
    """Bytes written besides the shards themselves, per shard, must not grow with the shard
    count. Rewriting the whole index after every shard made them grow linearly (quadratic in
    all: 9.3 kB a shard at 200 shards against 1.2 kB at 20)."""
    monkeypatch.setattr(os, "fsync", lambda fd: None)  # durability is not measured here
    image = tmp_path / "tiny.png"
    Image.new("RGB", (4, 4), (200, 30, 90)).save(image)

    def bookkeeping_per_shard(n: int) -> float:
        rows = [
            {"image": str(image), "caption": f"row {i}", "source": "s", "image_id": f"i{i}"}
            for i in range(n)
        ]
        manifest = write_manifest(rows, tmp_path / f"m{n}.jsonl") and tmp_path / f"m{n}.jsonl"
        out = tmp_path / f"out{n}"
        before = _bytes_written()
        report = write_shards(manifest, out, shard_size=1, progress=False)
        written = _bytes_written() - before
        assert report.complete and len(report.shards) == n
        shard_bytes = sum((out / name).stat().st_size for name in report.shards)
        return (written - shard_bytes) / n

    small, large = bookkeeping_per_shard(20), bookkeeping_per_shard(200)
    assert large < 1.25 * small, (small, large)
    assert large < 1000  # a journal line and a final index line a shard: ~180 bytes


def _key(i: int, top: int | None = None) -> bytes:
    digest = hashlib.blake2b(str(i).encode(), digest_size=16).digest()
    # Byte 7 is the top byte of the little-endian `hi` word, the first spill level's bits:
    # fixing it puts every key in one first-level file, which must then be split again.
    return digest if top is None else digest[:7] + bytes([top]) + digest[8:]


def _reference(keys: list[bytes | None]) -> list[int]:
    seen: set[bytes] = set()
    repeated = []
    for pos, key in enumerate(keys):
        if key is None:
            continue
        if key in seen:
            repeated.append(pos)
        seen.add(key)
    return repeated


def _keys(n: int, distinct: int, seed: int, top: int | None = None) -> list[bytes | None]:
    rng = random.Random(seed)
    return [None if rng.random() < 0.05 else _key(rng.randrange(distinct), top) for _ in range(n)]


@pytest.mark.parametrize(
    ("n", "distinct", "top", "max_keys"),
    [
        (6000, 4000, None, 2),  # spilled, every first-level file folded in steps of one
        (6000, 4000, 5, 64),  # one first-level file with too many distinct keys: split again
        (6000, 3, 5, 16),  # thousands of copies of three keys: folded, never split
        (6000, 10**9, None, 10**6),  # fits: no spill, no repeats
        (6000, 1500, None, 10**6),  # fits, with repeats
    ],
)
def test_repeated_positions_equal_a_set(n, distinct, top, max_keys, tmp_path, monkeypatch):
    keys = _keys(n, distinct, seed=n + distinct, top=top)
    held, levels = [], set()
    fold, scatter = common._firsts_and_repeats, common._scatter

    def counting_fold(both):
        held.append(sum(len(a) for a in both))
        return fold(both)

    def counting_scatter(records, level, prefix, files):
        held.append(len(records))
        levels.add(level)
        return scatter(records, level, prefix, files)

    monkeypatch.setattr(common, "_firsts_and_repeats", counting_fold)
    monkeypatch.setattr(common, "_scatter", counting_scatter)
    got = repeated_positions(iter(keys), max_keys=max_keys, tmp_dir=tmp_path)
    assert got.dtype == np.uint64 and got.tolist() == _reference(keys)
    assert max(held) <= max_keys  # records held at once, whatever n
    assert list(tmp_path.iterdir()) == []  # spill files removed
    assert bool(levels) == (n - keys.count(None) > max_keys)  # spilled only when needed
    if top is not None and distinct > max_keys:
        assert 1 in levels


def test_spill_files_are_removed_on_error(tmp_path):
    def keys():
        for i in range(500):
            yield _key(i)
        raise KeyboardInterrupt  # a kill while reading the manifests

    with pytest.raises(KeyboardInterrupt):
        repeated_positions(keys(), max_keys=50, tmp_dir=tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_dedupe_memory_is_bounded_by_the_budget(tmp_path):
    """tracemalloc's peak stays within the budget however many keys stream through: the
    documented DEDUPE_BYTES_PER_KEY bytes a key held (plus fixed overhead and the repeats)."""
    max_keys = 20_000

    def peak(n: int) -> tuple[int, int]:
        keys = (_key(i % (n - n // 20), top=3) for i in range(n))  # 5% repeats
        tracemalloc.start()
        try:
            repeats = repeated_positions(keys, max_keys=max_keys, tmp_dir=tmp_path)
            return tracemalloc.get_traced_memory()[1], len(repeats)
        finally:
            tracemalloc.stop()

    for n in (60_000, 180_000):
        used, repeats = peak(n)
        assert used < common.DEDUPE_BYTES_PER_KEY * max_keys + 16 * repeats + 256 * 1024, n


def _merge_reference(paths: list[Path], leak: set[str]) -> tuple[list[dict], Counter]:
    """What merge_manifests did before: one pass, a set of every kept key."""
    from dlip.data.karpathy import eval_key

    seen, out, skipped = set(), [], Counter()
    for path in paths:
        for row in read_manifest(path):
            if eval_key(row) in leak:
                skipped["karpathy_eval"] += 1
            elif dedupe_key(row) in seen:
                skipped["duplicate"] += 1
            else:
                seen.add(dedupe_key(row))
                out.append({**row, "image_id": file_image_id(row)})
    return out, skipped


def test_merge_with_a_tiny_budget_equals_the_in_memory_merge(tmp_path, monkeypatch):
    rng = random.Random(7)
    paths = []
    for m in range(3):  # repeats within and across manifests, in other case and spacing
        rows = []
        for i in range(700):
            j = rng.randrange(900)
            caption = f"A photo  of thing {j}" if rng.random() < 0.5 else f"a photo of THING {j}"
            image_id = f"coco_{j}" if j % 7 == 0 else f"s{m}_{i}"  # the leakage guard's key
            row = {"image": f"/data/{j % 300}.jpg", "caption": caption, "source": f"s{m}"}
            rows.append({**row, "image_id": image_id})
        paths.append(tmp_path / f"m{m}.jsonl")
        write_manifest(rows, paths[-1])
    leak = {"coco_14", "coco_21", "coco_700"}  # as eval_image_ids names two Karpathy test images
    monkeypatch.setattr("dlip.data.manifest.eval_image_ids", lambda _: leak)
    expected, skipped = _merge_reference(paths, leak)
    assert skipped["duplicate"] > 500 and skipped["karpathy_eval"] > 0
    for mib in (0.001, 256):  # ~16 keys held (spilled) / all in memory
        report = BuildReport()
        spill = tmp_path / f"spill{mib}"
        spill.mkdir()
        rows = merge_manifests(
            paths, report=report, exclude_karpathy=["test.json"], dedupe_mib=mib, tmp_dir=spill
        )
        assert list(report.track(rows)) == expected
        assert report.skipped == skipped
        assert report.kept == Counter(r["source"] for r in expected)
        assert list(spill.iterdir()) == []
