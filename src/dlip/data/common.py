"""Shared pieces of the data layer: manifest rows, bad-sample reasons, image decoding.

A manifest is a jsonl file of rows `{"image": str, "caption": str, "source": str,
"image_id": str}` (DESIGN.md's data contract); `image` is an absolute path (or a URL for
rows that were never downloaded). A bad sample is never fatal: the code that meets it raises
`BadSample(reason)`, the caller skips the sample and counts it in a `SkipCounts`.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import tempfile
from array import array
from collections import Counter
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

import numpy as np
from PIL import Image

from dlip.images import MAX_IMAGE_PIXELS, ImageError, decode_rgb

MANIFEST_KEYS = ("image", "caption", "source", "image_id")

# Why a sample was skipped. Builders and loaders use these names so logs read the same.
REASONS = (
    "missing_file",  # the image path does not exist (or runs through a non-directory)
    "unreadable_file",  # it exists but cannot be read: permission, I/O error, symlink loop...
    "not_an_image",  # bytes PIL cannot identify
    "truncated",  # an image that fails to decode completely
    "empty_image",  # zero-size file or a 0-pixel image
    "too_large",  # over the decompression-bomb limit
    "empty_caption",  # empty or whitespace-only caption
    "bad_text",  # caption bytes that are not valid UTF-8 / not a string
    "download_failed",  # img2dataset status other than success
    "duplicate",  # same image + caption already kept
    "karpathy_eval",  # image in a Karpathy val/test split (leakage guard)
    "bad_shard",  # a tar shard that cannot be opened or read to the end
    "malformed_row",  # a source row (e.g. a CSV line) that cannot be parsed
    "outside_root",  # an image name that is absolute or leads out of the image root
    "bad_box",  # a region box that is not finite numbers with positive width and height
    "empty_question",  # a VQA question that is missing, not a string or blank
    "no_answer",  # a VQA training / validation question without any answer
)


# Image ids that name a public picture (`karpathy.image_id_for`), not a file: two copies of one
# COCO image share one, and the leakage guard (`karpathy.eval_key`) matches on them.
PUBLIC_ID_PREFIXES = ("coco_", "flickr30k_")


class BadSample(Exception):
    """A sample that must be skipped; `reason` is one of REASONS."""

    def __init__(self, reason: str, detail: str = "") -> None:
        if reason not in REASONS:
            raise ValueError(f"unknown skip reason {reason!r}")
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason, self.detail = reason, detail


class SkipCounts(Counter):
    """Counts of skipped samples by reason (a Counter that prints as one log line)."""

    def add(self, reason: str, n: int = 1) -> None:
        self[reason] += n

    def summary(self) -> str:
        if not self:
            return "skipped 0"
        parts = ", ".join(f"{k} {v}" for k, v in sorted(self.items()))
        return f"skipped {sum(self.values())} ({parts})"


def check_caption(caption: Any) -> str:
    """The caption as a non-empty string, else BadSample (bytes must be valid UTF-8)."""
    if isinstance(caption, bytes):
        try:
            caption = caption.decode("utf-8")
        except UnicodeDecodeError as err:
            raise BadSample("bad_text", str(err)) from None
    if not isinstance(caption, str):
        raise BadSample("bad_text", f"caption of type {type(caption).__name__}")
    try:
        caption.encode("utf-8")  # lone surrogates (from surrogateescape reads) are not text
    except UnicodeEncodeError as err:
        raise BadSample("bad_text", str(err)) from None
    if not caption.strip():
        raise BadSample("empty_caption")
    return caption


def decode_image(source: str | Path | bytes, max_pixels: int = MAX_IMAGE_PIXELS) -> Image.Image:
    """Open a path or encoded bytes as an upright, fully decoded 8-bit RGB image
    (`dlip.images.decode_rgb`), or raise BadSample naming the reason."""
    if isinstance(source, (str, Path)):
        from dlip.data.members import read_bytes

        path = Path(source)
        try:
            data = read_bytes(path)  # a file, or a member of a tar shard (SHARD.tar/NAME)
        except (FileNotFoundError, NotADirectoryError):
            raise BadSample("missing_file", str(path)) from None
        except IsADirectoryError:
            raise BadSample("missing_file", f"{path} is a directory") from None
        except OSError as err:  # EACCES, EIO, ELOOP, ENAMETOOLONG...: one sample, not the run
            name = errno.errorcode.get(err.errno or 0, type(err).__name__)
            raise BadSample("unreadable_file", f"{path}: {name} {err.strerror or err}") from None
    else:
        data = source
    try:
        return decode_rgb(data, max_pixels)
    except ImageError as err:
        raise BadSample(err.reason, err.detail) from None


def under_root(root: str | Path, name: str) -> str:
    """The absolute path of `name` inside `root`, else BadSample("outside_root").

    An annotation file names images relative to the root; an absolute name or one whose `..`
    leads out of the root would read any file on the machine, so it is refused. The check is
    on the normalised path, not the resolved one: a root that holds symlinks to the real
    images (a common way to lay out a dataset) still works.
    """
    base = os.path.abspath(root)
    if os.path.isabs(name) or Path(name).drive:
        raise BadSample("outside_root", name)
    path = os.path.normpath(os.path.join(base, name))
    if os.path.commonpath([base, path]) != base:
        raise BadSample("outside_root", name)
    return path


class ImageCheck:
    """Whether image files decode (`decode_image`), once per file: COCO has 5 captions an image.

    Calling it returns None for a good image, else the skip reason; results are cached.
    """

    def __init__(self) -> None:
        self._seen: dict[str, str | None] = {}

    def __call__(self, path: str) -> str | None:
        if path not in self._seen:
            try:
                decode_image(path)
                self._seen[path] = None
            except BadSample as bad:
                self._seen[path] = bad.reason
        return self._seen[path]


class ImageIds:
    """Image ids that identify the image across merged manifests (retrieval and ITC treat rows
    with one image_id as the same picture: a shared id between two pictures makes false
    positives; two ids for one file, missed ones).

    The first id met for an image file is that file's id from then on; an id already given to
    another file gets `@` and a digest of this file's path appended (`web_0@3f2a9c1b7d4e`), so
    manifests whose ids collide (two that both count from 0) stay apart. Public ids
    (PUBLIC_ID_PREFIXES: `coco_N`, `flickr30k_N`) name the picture, not the file:
    copies of one COCO image keep sharing theirs (the leakage guard matches on it). Memory:
    about 200 bytes per distinct image (a 16-byte path digest and the id).
    """

    def __init__(self) -> None:
        self._by_path: dict[bytes, str] = {}
        self._used: set[str] = set()

    def __call__(self, row: dict[str, str]) -> dict[str, str]:
        """The row with its image's id (a new dict only when the id changes)."""
        digest = hashlib.blake2b(row["image"].encode("utf-8"), digest_size=16).digest()
        image_id = self._by_path.get(digest)
        if image_id is None:
            image_id = row["image_id"]
            if image_id in self._used and not image_id.startswith(PUBLIC_ID_PREFIXES):
                image_id = f"{image_id}@{digest.hex()[:12]}"
                if image_id in self._used:  # only if an input already holds this very id
                    image_id = f"{row['image_id']}@{digest.hex()}"
            self._by_path[digest] = image_id
            self._used.add(image_id)
        return row if image_id == row["image_id"] else {**row, "image_id": image_id}


def file_image_id(row: dict[str, str]) -> str:
    """An image id that names the row's image file, whatever manifest the row came from.

    `<stem>@<16 hex digits of the path's blake2b>`: the same file always gets the same id, two
    files practically never one (64 bits: ~3e-4 expected collisions among 1e8 images), and it
    costs no memory, unlike a table of every image seen (a merge of 100M images would need
    ~20 GB for one). Public ids (`coco_N`, `flickr30k_N`) name the picture, not the file, and
    are kept: copies of one COCO image share theirs and the leakage guard matches on them.
    Applying it twice changes nothing.
    """
    image_id = str(row["image_id"])
    if image_id.startswith(PUBLIC_ID_PREFIXES):
        return image_id
    image = row["image"]
    digest = hashlib.blake2b(image.encode("utf-8", "surrogateescape"), digest_size=8).hexdigest()
    return f"{Path(image).stem[:40]}@{digest}"


def read_manifest(path: str | Path) -> Iterator[dict[str, str]]:
    """Rows of a jsonl manifest; a malformed line is an error naming the file and line.

    (`dlip.data.rows.checked_rows` counts and skips bad rows instead, for merge / export.)
    """
    path = Path(path)
    # utf-8-sig: a leading BOM is dropped. surrogateescape: one bad byte makes one row's
    # caption a counted bad_text skip (check_caption), not the whole manifest unreadable.
    with path.open(encoding="utf-8-sig", errors="surrogateescape") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{n}: not valid JSON ({err})") from None
            if not isinstance(row, dict):
                raise ValueError(f"{path}:{n}: a JSON {type(row).__name__}, not an object")
            missing = [k for k in MANIFEST_KEYS if k not in row]
            if missing:
                raise ValueError(f"{path}:{n}: manifest row lacks {missing}")
            yield row


@contextmanager
def atomic_text(path: str | Path) -> Iterator[IO[str]]:
    """A UTF-8 text file written to `<path>.tmp` and renamed over `path` on success; on any
    error the temp file is removed, so a failed run leaves neither half a file nor a .tmp."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with tmp.open("w", encoding="utf-8") as f:
            yield f
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


def write_manifest(rows: Iterable[dict[str, str]], path: str | Path) -> int:
    """Write rows as jsonl atomically (`atomic_text`); returns the row count."""
    n = 0
    with atomic_text(path) as f:
        for row in rows:
            f.write(json.dumps({k: row[k] for k in MANIFEST_KEYS}, ensure_ascii=False) + "\n")
            n += 1
    return n


# ---------------------------------------------------------------- dedupe in bounded memory

# A key record: the 16-byte key as two integers and the position it was seen at; 24 bytes
# in memory and in the spill files.
_RECORD = np.dtype([("hi", "<u8"), ("lo", "<u8"), ("pos", "<u8")])
# Peak bytes per record held, measured with tracemalloc (56-60 at 10^5-10^6 records, the
# fixed overhead shows below that; tests/test_data_scale.py checks it): the records, a sorted
# copy and the sort order. A MiB budget divided by this is the number of records held at once.
DEDUPE_BYTES_PER_KEY = 64
_BITS = 8  # a spill level splits by 8 more bits of the key: 256 files
_LEVELS = 64 // _BITS


def dedupe_key(row: dict[str, str]) -> bytes:
    """What makes two rows `duplicate`s: the image and the caption (case and spacing ignored),
    as a 16-byte digest (the strings would take far more memory)."""
    text = row["image"] + "\0" + " ".join(row["caption"].lower().split())
    return hashlib.blake2b(text.encode("utf-8"), digest_size=16).digest()


def dedupe_max_keys(memory_mib: float) -> int:
    """Records `repeated_positions` may hold at once within `memory_mib` MiB."""
    return max(2, int(memory_mib * 2**20) // DEDUPE_BYTES_PER_KEY)


def _firsts_and_repeats(both: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Fold records into the distinct keys seen so far: `both` = [firsts, later records].

    Returns the new firsts (one record per key, sorted by key) and the positions whose key
    was already seen. lexsort is stable, so among equal keys the earliest position comes first.
    The list is emptied so that its arrays are freed before the sorted copy is made.
    """
    records = np.concatenate(both)
    both.clear()
    order = np.lexsort((records["lo"], records["hi"]))
    ordered = records[order]
    del records, order
    new = np.ones(len(ordered), dtype=bool)
    hi, lo = ordered["hi"], ordered["lo"]
    new[1:] = (hi[1:] != hi[:-1]) | (lo[1:] != lo[:-1])
    return ordered[new], ordered["pos"][~new]


def _scatter(records: np.ndarray, level: int, prefix: str, files: dict[int, Path]) -> None:
    """Append records to the spill files of `level` by key bits; file order stays position order."""
    part = (records["hi"] >> np.uint64(64 - _BITS * (level + 1))).astype(np.uint8)
    order = np.argsort(part, kind="stable")
    records, part = records[order], part[order]
    del order
    cuts = np.searchsorted(part, np.arange(1, 2**_BITS))
    for p, chunk in enumerate(np.split(records, cuts)):
        if chunk.size:
            path = files.setdefault(p, Path(f"{prefix}{p:02x}"))
            with path.open("ab") as f:
                chunk.tofile(f)


def _file_repeats(path: Path, level: int, max_keys: int) -> list[np.ndarray]:
    """Repeated positions within one spill file, holding at most `max_keys` records at once.

    The file is folded in chunks into its distinct keys; when those outgrow half the budget
    the file is split by the next key bits instead (copies of one key never need a split).
    """
    step = max(1, max_keys // 2)
    firsts, found = np.empty(0, _RECORD), []
    with path.open("rb") as f:
        while True:
            both = [firsts, np.fromfile(f, dtype=_RECORD, count=step)]
            del firsts  # the list holds the only references: the fold frees them early
            if not both[1].size:
                return found
            firsts, repeats = _firsts_and_repeats(both)
            found.append(repeats)
            if len(firsts) > step and level + 1 < _LEVELS:
                break
    del firsts, found
    files: dict[int, Path] = {}
    with path.open("rb") as f:
        while (records := np.fromfile(f, dtype=_RECORD, count=max_keys)).size:
            _scatter(records, level + 1, f"{path}.", files)
    path.unlink()
    return [r for sub in files.values() for r in _file_repeats(sub, level + 1, max_keys)]


def _records(keys: bytearray, positions: array) -> np.ndarray:
    pairs = np.frombuffer(keys, dtype="<u8").reshape(-1, 2)
    out = np.empty(len(positions), _RECORD)
    out["hi"], out["lo"] = pairs[:, 0], pairs[:, 1]
    out["pos"] = np.frombuffer(positions, dtype=np.uint64) if positions else 0
    return out


def repeated_positions(
    keys: Iterable[bytes | None], *, max_keys: int, tmp_dir: str | Path | None = None
) -> np.ndarray:
    """Sorted positions in `keys` whose 16-byte key equals a key at an earlier position.

    None is a position without a key. Memory: at most `max_keys` records (24 bytes each, plus
    the sort's work: `DEDUPE_BYTES_PER_KEY` in all) whatever the number of keys, plus 8 bytes
    per repeated position in the result (16 while it is assembled). When the keys do not fit,
    they are spilled by key bits to 256 files in a temporary folder under `tmp_dir` (24 bytes a
    key on disk) and each file is deduplicated alone (split further when its distinct keys do
    not fit). The folder is removed on return and on error.
    """
    if max_keys < 2:
        raise ValueError(f"max_keys must be >= 2, got {max_keys}")
    tmp: str | None = None
    files: dict[int, Path] = {}
    buf, positions = bytearray(), array("Q")  # 24 bytes a key, no Python int objects
    try:
        for pos, key in enumerate(keys):
            if key is None:
                continue
            if len(key) != 16:
                raise ValueError(f"dedupe keys are 16 bytes, got {len(key)} at position {pos}")
            buf += key
            positions.append(pos)
            if len(positions) == max_keys:
                tmp = tmp or tempfile.mkdtemp(prefix="dlip-dedupe-", dir=tmp_dir)
                records = _records(buf, positions)
                buf, positions = bytearray(), array("Q")
                _scatter(records, 0, os.path.join(tmp, ""), files)
                del records
        records = _records(buf, positions)
        del buf, positions
        if not files:  # everything fitted: no spill at all
            both = [records]
            del records
            return np.sort(_firsts_and_repeats(both)[1])
        _scatter(records, 0, os.path.join(tmp, ""), files)
        del records
        found = [r for path in files.values() for r in _file_repeats(path, 0, max_keys)]
        out = np.concatenate([np.empty(0, np.uint64), *found])
        del found
        out.sort()
        return out
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


def check_headers(paths: Iterable[str | Path], key: str) -> None:
    """Open every image's header, not its pixels: a missing, unreadable or non-image file is a
    ValueError naming `key` (e.g. "data.val") and the file."""
    for path in paths:
        try:
            with Image.open(path):
                pass
        except (OSError, Image.DecompressionBombError) as err:
            raise ValueError(f"{key}: image {path} cannot be read: {err}") from None
