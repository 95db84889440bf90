"""Write a manifest as webdataset shards: `dlip data shard MANIFEST --out DIR`.

Each sample in a shard is three tar members sharing one key, the manifest row index padded to
9 digits (stable, unique within the manifest, and sorted like the manifest):

    000000042.jpg   the image, RGB JPEG, longest side <= max_side (never upscaled)
    000000042.txt   the caption as the manifest has it (pre_caption runs at load time)
    000000042.json  {"image_id", "source", "caption", "image"} ("image": the original path)

Shards are `DIR/000000.tar`, `DIR/000001.tar`, ...; each holds `shard_size` samples except the
last. `DIR/index.json` lists the completed shards with their sample counts, the manifest row
range each covers (`rows: [start, end)`, skipped rows included) and skip counts by reason.

Resuming: `index.json` is written first, without shards (`complete: false`). A shard is
written as `NAME.tmp`, fsynced and renamed when complete; then its entry is appended as one
line to `DIR/index.journal` and fsynced: O(1) bookkeeping per shard (rewriting the whole index
after every shard made a run's bookkeeping quadratic in the shard count). At the end the full
`index.json` is written once, atomically, and the journal is deleted. `read_shard_index` reads
an unfinished run as the index plus its journal. A kill at any point leaves a resumable state:
a torn last journal line (a kill mid-append) is dropped, a renamed shard whose line never made
it is written again, and an `index.json` already complete ends the run. A killed run is resumed
by running the same command again: listed shards are kept as they are, the rows they cover
are read past without decoding, and writing continues at the first row after them. Tar members
carry fixed metadata (mtime 0, uid 0), so an interrupted-then-resumed run produces the same
bytes as an uninterrupted one.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any

from PIL import Image

from dlip.data.common import BadSample, SkipCounts, check_caption, decode_image, read_manifest
from dlip.fileio import atomic_write_text

INDEX_NAME = "index.json"
INDEX_FORMAT = "dlip-shards/1"
JOURNAL_NAME = "index.journal"  # one shard entry per line while a run is unfinished
_CHUNK = 256  # rows handed to the worker pool at a time (bounds memory on huge manifests)


@dataclass
class ShardReport:
    """What a `write_shards` call left in `out_dir` (the whole shard set, not just this call)."""

    out_dir: Path
    shards: list[str]  # file names of the completed shards, in order
    samples: int  # samples in those shards
    rows: int  # manifest rows they cover (kept + skipped)
    skipped: SkipCounts = field(default_factory=SkipCounts)
    complete: bool = False  # False when stopped early (stop_after); run again to resume
    reused_shards: int = 0  # complete shards found from an earlier run and kept as they were

    def summary(self) -> str:
        state = "" if self.complete else " (incomplete: run again to resume)"
        reused = f", {self.reused_shards} reused" if self.reused_shards else ""
        return (
            f"{len(self.shards)} shards{reused} in {self.out_dir}: {self.samples} samples from "
            f"{self.rows} rows, {self.skipped.summary()}{state}"
        )


def resize_longest(image: Image.Image, max_side: int) -> Image.Image:
    """Shrink so the longest side is at most `max_side` (bicubic, aspect kept); never upscale."""
    w, h = image.size
    longest = max(w, h)
    if longest <= max_side:
        return image
    scale = max_side / longest
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    return image.resize(size, Image.Resampling.BICUBIC)


def encode_sample(row: dict[str, Any], max_side: int, quality: int) -> tuple[bytes, str]:
    """(JPEG bytes, caption) for a manifest row, or BadSample naming why it is skipped."""
    caption = check_caption(row["caption"])
    image = resize_longest(decode_image(row["image"]), max_side)
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=quality)
    return buf.getvalue(), caption


def _encode_task(task: tuple[dict[str, Any], int, int]) -> tuple[bytes | None, str]:
    """Pool-friendly encode_sample: returns (jpg, caption) or (None, reason).

    A reason string travels back instead of the exception because BadSample's constructor
    signature does not survive pickling.
    """
    row, max_side, quality = task
    try:
        return encode_sample(row, max_side, quality)
    except BadSample as err:
        return None, err.reason


def _encoded(
    rows: Iterator[dict[str, Any]], max_side: int, quality: int, workers: int
) -> Iterator[tuple[dict[str, Any], bytes | None, str]]:
    """(row, jpg or None, caption or skip reason) in manifest order, optionally in a pool."""
    if workers <= 0:
        for row in rows:
            yield (row, *_encode_task((row, max_side, quality)))
        return
    import multiprocessing

    with multiprocessing.get_context("spawn").Pool(workers) as pool:
        while chunk := list(islice(rows, _CHUNK)):
            tasks = [(row, max_side, quality) for row in chunk]
            for row, out in zip(chunk, pool.map(_encode_task, tasks, chunksize=8), strict=True):
                yield (row, *out)


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)  # mtime 0, uid/gid 0, no user names: reproducible bytes
    info.size = len(data)
    info.mode = 0o444
    tar.addfile(info, io.BytesIO(data))


class _ShardFile:
    """One shard being written to `NAME.tmp`; `finish` renames it into place."""

    def __init__(self, out_dir: Path, number: int, row_start: int) -> None:
        self.path = out_dir / f"{number:06d}.tar"
        self.tmp = self.path.with_name(self.path.name + ".tmp")
        self.file = self.tmp.open("wb")
        # Closed by finish() or abandon(): the shard outlives any one with-block.
        self.tar = tarfile.open(fileobj=self.file, mode="w", format=tarfile.GNU_FORMAT)  # noqa: SIM115
        self.row_start = row_start
        self.samples = 0
        self.skipped = SkipCounts()

    def add(self, index: int, row: dict[str, Any], jpg: bytes, caption: str) -> None:
        key = f"{index:09d}"
        meta = {
            "image_id": str(row["image_id"]),
            "source": str(row["source"]),
            "caption": caption,
            "image": str(row["image"]),
        }
        _add_member(self.tar, f"{key}.jpg", jpg)
        _add_member(self.tar, f"{key}.txt", caption.encode("utf-8"))
        _add_member(self.tar, f"{key}.json", json.dumps(meta, ensure_ascii=False).encode())
        self.samples += 1

    def finish(self, row_end: int) -> dict[str, Any]:
        """Close, flush to disk, rename into place; the shard's index entry."""
        self.tar.close()
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        self.tmp.replace(self.path)
        _fsync_dir(self.path.parent)
        return {
            "name": self.path.name,
            "samples": self.samples,
            "rows": [self.row_start, row_end],
            "skipped": dict(sorted(self.skipped.items())),
            "bytes": self.path.stat().st_size,
        }

    def abandon(self) -> None:
        self.tar.close()
        self.file.close()


def manifest_digest(path: str | Path) -> tuple[str, int]:
    """(sha256, row count) of a manifest: a resumed run must read the very same rows."""
    digest, rows = hashlib.sha256(), 0
    with Path(path).open("rb") as f:
        for line in f:
            digest.update(line)
            rows += bool(line.strip())  # read_manifest skips blank lines too
    return digest.hexdigest(), rows


def _fsync_dir(path: Path) -> None:
    """Make a rename in `path` durable before the journal names its result."""
    if not hasattr(os, "O_DIRECTORY"):  # no directory handles (Windows): nothing to sync
        return
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _read_journal(out_dir: Path) -> tuple[list[dict[str, Any]], int]:
    """The journal's shard entries and the length in bytes of its complete lines.

    Each line is written and fsynced whole, so only an unterminated last line can be partial
    (a kill mid-append): it is left out. Any other unreadable line is an error.
    """
    path = out_dir / JOURNAL_NAME
    entries: list[dict[str, Any]] = []
    good = 0
    try:
        f = path.open("rb")
    except FileNotFoundError:
        return entries, good
    with f:
        for n, line in enumerate(f, 1):
            if not line.endswith(b"\n"):
                break  # torn tail
            try:
                entries.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{n}: not valid JSON ({err})") from None
            good += len(line)
    return entries, good


def _add_entry(index: dict[str, Any], entry: dict[str, Any]) -> None:
    """Count a finished shard into the in-memory index: O(1) per shard."""
    totals = SkipCounts(index["skipped"])
    totals.update(entry["skipped"])
    index["shards"].append(entry)
    index["samples"] += entry["samples"]
    index["rows"] = entry["rows"][1]
    index["skipped"] = dict(sorted(totals.items()))


def _load_index(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise FileNotFoundError(f"no shard index {path} (write shards with `dlip data shard`)")
    try:
        index = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(index, dict) or index.get("format") != INDEX_FORMAT:
        raise ValueError(f"{path}: not a dlip shard index (expected format {INDEX_FORMAT!r})")
    return index


def read_shard_index(out_dir: str | Path) -> dict[str, Any]:
    """The parsed `DIR/index.json`; a missing or foreign file is an error naming it.

    For an unfinished run, the shards its journal lists are added, with the totals, so the
    result reads like the index of a run that stopped after them.
    """
    out_dir = Path(out_dir)
    index = _load_index(out_dir / INDEX_NAME)
    if not index["complete"]:
        for entry in _read_journal(out_dir)[0]:
            _add_entry(index, entry)
    return index


def shard_urls(out_dir: str | Path, allow_incomplete: bool = False) -> list[str]:
    """Paths of the shards listed in `DIR/index.json`, in order, for the webdataset pipeline."""
    out_dir = Path(out_dir)
    index = read_shard_index(out_dir)
    if not index["complete"] and not allow_incomplete:
        raise ValueError(
            f"{out_dir / INDEX_NAME}: shard writing did not finish; run `dlip data shard` again "
            "to resume it (or pass allow_incomplete=True)"
        )
    return [str(out_dir / s["name"]) for s in index["shards"]]


def _index_text(index: dict[str, Any]) -> str:
    """JSON with one line per field and per shard: readable, and diffable between runs."""

    def dump(value: Any) -> str:
        return json.dumps(value, ensure_ascii=False)

    fields = [f" {dump(k)}: {dump(v)}" for k, v in index.items() if k != "shards"]
    shards = ",\n".join(f"  {dump(s)}" for s in index["shards"])
    fields.append(f' "shards": [\n{shards}\n ]' if shards else ' "shards": []')
    return "{\n" + ",\n".join(fields) + "\n}\n"


def _write_index(out_dir: Path, index: dict[str, Any]) -> None:
    atomic_write_text(out_dir / INDEX_NAME, _index_text(index))


def _fresh_index(manifest: Path, params: dict[str, Any]) -> dict[str, Any]:
    sha256, rows = manifest_digest(manifest)
    return {
        "format": INDEX_FORMAT,
        "manifest": str(manifest),
        "manifest_sha256": sha256,
        "manifest_rows": rows,
        "params": params,
        "shards": [],
        "complete": False,
        "rows": 0,
        "samples": 0,
        "skipped": {},
    }


def _check_resumable(index: dict[str, Any], fresh: dict[str, Any], out_dir: Path) -> None:
    """A resumed run must use the same manifest and options, and find every listed shard."""
    where = out_dir / INDEX_NAME
    for key in ("manifest_sha256", "params"):
        if index.get(key) != fresh[key]:
            raise ValueError(
                f"{where}: {key} differs from this run ({index.get(key)} vs {fresh[key]}); "
                "use the same manifest and options to resume, or resume=False to start over"
            )
    for n, shard in enumerate(index["shards"]):
        path = out_dir / shard["name"]
        if shard["name"] != f"{n:06d}.tar":
            raise ValueError(f"{where}: shard {n} is listed as {shard['name']}")
        if not path.is_file() or path.stat().st_size != shard["bytes"]:
            raise ValueError(f"{where}: listed shard {path} is missing or has the wrong size")


def _start_index(
    manifest: Path, out_dir: Path, params: dict[str, Any], resume: bool
) -> dict[str, Any]:
    """The index to continue from (the existing one plus its journal when resuming), or a
    fresh one, already written as the header of a new run."""
    fresh = _fresh_index(manifest, params)
    for stale in out_dir.glob("*.tar.tmp"):  # a shard a killed run did not finish
        stale.unlink()
    journal = out_dir / JOURNAL_NAME
    if not (out_dir / INDEX_NAME).exists():
        if any(out_dir.glob("*.tar")):
            raise FileExistsError(f"{out_dir} holds .tar files but no {INDEX_NAME}; use a new dir")
        journal.unlink(missing_ok=True)
    elif resume:
        index = read_shard_index(out_dir)
        _check_resumable(index, fresh, out_dir)
        if index["complete"]:
            journal.unlink(missing_ok=True)  # killed between the final index and this unlink
            return index
        good = _read_journal(out_dir)[1]
        if journal.exists() and journal.stat().st_size != good:
            os.truncate(journal, good)  # drop a torn last line before appending after it
        return index
    else:
        index = read_shard_index(out_dir)
        # Starting over: drop what our own index lists, and the one shard that may have been
        # renamed into place before its journal line was written. The journal goes last, so
        # a kill in between leaves the rest listed for the next start-over.
        names = [s["name"] for s in index["shards"]] + [f"{len(index['shards']):06d}.tar"]
        for name in names:
            (out_dir / name).unlink(missing_ok=True)
        journal.unlink(missing_ok=True)
    _write_index(out_dir, fresh)  # before any shard: a .tar never sits without an index
    return fresh


def _commit(index: dict[str, Any], out_dir: Path, entry: dict[str, Any]) -> None:
    """Record a finished shard: one fsynced journal line, whatever the shard count."""
    _add_entry(index, entry)
    with (out_dir / JOURNAL_NAME).open("ab") as f:
        f.write(json.dumps(entry, ensure_ascii=False).encode("utf-8") + b"\n")
        f.flush()
        os.fsync(f.fileno())


def _report(index: dict[str, Any], out_dir: Path, reused: int) -> ShardReport:
    return ShardReport(
        out_dir=out_dir,
        shards=[s["name"] for s in index["shards"]],
        samples=index["samples"],
        rows=index["rows"],
        skipped=SkipCounts(index["skipped"]),
        complete=index["complete"],
        reused_shards=reused,
    )


def write_shards(
    manifest: str | Path,
    out_dir: str | Path,
    max_side: int = 384,
    shard_size: int = 1000,
    quality: int = 95,
    resume: bool = True,
    progress: bool = True,
    workers: int = 0,
    stop_after: int | None = None,
) -> ShardReport:
    """Write `manifest` as webdataset shards in `out_dir` (see the module docstring).

    `workers` > 0 decodes and re-encodes images in that many spawned processes (same output
    bytes; a calling script needs the usual `if __name__ == "__main__":` guard);
    `stop_after` stops after that many newly completed shards, as an interrupted run would.
    `resume=False` deletes the shards an existing index lists and starts over.
    """
    if max_side < 1 or shard_size < 1 or not 1 <= quality <= 100:
        got = f"max_side={max_side}, shard_size={shard_size}, quality={quality}"
        raise ValueError(f"need max_side >= 1, shard_size >= 1, 1 <= quality <= 100; got {got}")
    manifest, out_dir = Path(manifest).resolve(), Path(out_dir)
    if not manifest.is_file():
        raise FileNotFoundError(f"manifest {manifest} not found")
    out_dir.mkdir(parents=True, exist_ok=True)
    params = {"max_side": max_side, "shard_size": shard_size, "quality": quality}
    index = _start_index(manifest, out_dir, params, resume)
    reused = len(index["shards"])
    if not index["complete"]:
        _write_rows(index, manifest, out_dir, workers, progress, stop_after)
    return _report(index, out_dir, reused)


def _write_rows(
    index: dict[str, Any],
    manifest: Path,
    out_dir: Path,
    workers: int,
    progress: bool,
    stop_after: int | None,
) -> None:
    """Continue writing shards after the rows the index already covers."""
    from tqdm import tqdm

    p = index["params"]
    start = index["shards"][-1]["rows"][1] if index["shards"] else 0
    rows = islice(read_manifest(manifest), start, None)  # covered rows: read past, not decoded
    encoded = _encoded(rows, p["max_side"], p["quality"], workers)
    bar = tqdm(
        desc=f"shards -> {out_dir}",
        total=index["manifest_rows"],
        initial=start,
        unit="row",
        disable=not progress,
    )
    shard, done_now, n = None, 0, start - 1
    try:
        for n, (row, jpg, text) in enumerate(encoded, start):
            bar.update(1)
            if shard is None:
                shard = _ShardFile(out_dir, len(index["shards"]), n)
            if jpg is None:
                shard.skipped.add(text)
                continue
            # A full shard closes only when the next kept sample arrives, so skipped rows
            # between the two belong to it and no empty shard is ever written.
            if shard.samples == p["shard_size"]:
                _commit(index, out_dir, shard.finish(row_end=n))
                shard, done_now = None, done_now + 1
                if stop_after is not None and done_now >= stop_after:
                    return
                shard = _ShardFile(out_dir, len(index["shards"]), n)
            shard.add(n, row, jpg, text)
            bar.set_postfix(shards=len(index["shards"]), refresh=False)
        _finish(index, out_dir, shard, rows=n + 1)
        shard = None
    finally:
        encoded.close()  # stops a worker pool early when returning or failing
        bar.close()
        if shard is not None:
            shard.abandon()


def _finish(index: dict[str, Any], out_dir: Path, shard: _ShardFile | None, rows: int) -> None:
    """Close the last shard at the end of the manifest; write the full index once."""
    if shard is not None and shard.samples:
        _add_entry(index, shard.finish(row_end=rows))
    elif shard is not None:  # no kept sample at all since the last shard: no tar for them
        shard.abandon()
        shard.tmp.unlink()
        totals = SkipCounts(index["skipped"])
        totals.update(shard.skipped)
        index["skipped"] = dict(sorted(totals.items()))
    index["rows"], index["complete"] = rows, True
    _write_index(out_dir, index)  # the one O(shards) write of the run
    (out_dir / JOURNAL_NAME).unlink(missing_ok=True)
