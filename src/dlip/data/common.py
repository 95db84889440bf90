"""Shared pieces of the data layer: manifest rows, bad-sample reasons, image decoding.

A manifest is a jsonl file of rows `{"image": str, "caption": str, "source": str,
"image_id": str}` (DESIGN.md's data contract); `image` is an absolute path (or a URL for
rows that were never downloaded). A bad sample is never fatal: the code that meets it raises
`BadSample(reason)`, the caller skips the sample and counts it in a `SkipCounts`.
"""

from __future__ import annotations

import io
import json
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from PIL import Image

MANIFEST_KEYS = ("image", "caption", "source", "image_id")

# Why a sample was skipped. Builders and loaders use these names so logs read the same.
REASONS = (
    "missing_file",  # the image path does not exist
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
)

MAX_IMAGE_PIXELS = 178_956_970  # PIL's own default bomb limit, applied explicitly


class BadSample(Exception):
    """A sample that must be skipped; `reason` is one of REASONS."""

    def __init__(self, reason: str, detail: str = "") -> None:
        if reason not in REASONS:
            raise ValueError(f"unknown skip reason {reason!r}")
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


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


def decode_image(source: str | Path | bytes) -> Image.Image:
    """Open a path or encoded bytes as a fully decoded RGB image, or raise BadSample."""
    if isinstance(source, (str, Path)):
        path = Path(source)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise BadSample("missing_file", str(path)) from None
        except IsADirectoryError:
            raise BadSample("missing_file", f"{path} is a directory") from None
    else:
        data = source
    if not data:
        raise BadSample("empty_image", "0 bytes")
    try:
        with Image.open(io.BytesIO(data)) as im:
            if im.width * im.height == 0:
                raise BadSample("empty_image", f"{im.width}x{im.height}")
            if im.width * im.height > MAX_IMAGE_PIXELS:
                raise BadSample("too_large", f"{im.width}x{im.height}")
            return im.convert("RGB")  # forces the full decode: truncation surfaces here
    except BadSample:
        raise
    except Image.UnidentifiedImageError as err:
        raise BadSample("not_an_image", str(err)) from None
    except (OSError, SyntaxError, ValueError) as err:
        raise BadSample("truncated", str(err)) from None


def read_manifest(path: str | Path) -> Iterator[dict[str, str]]:
    """Rows of a jsonl manifest; a malformed line is an error naming the file and line."""
    path = Path(path)
    # surrogateescape: one bad byte makes one row's caption a counted bad_text skip
    # (check_caption), not the whole manifest unreadable.
    with path.open(encoding="utf-8", errors="surrogateescape") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{n}: not valid JSON ({err})") from None
            missing = [k for k in MANIFEST_KEYS if k not in row]
            if missing:
                raise ValueError(f"{path}:{n}: manifest row lacks {missing}")
            yield row


def write_manifest(rows: Iterable[dict[str, str]], path: str | Path) -> int:
    """Write rows as jsonl atomically (temp file + rename); returns the row count."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    n = 0
    with tmp.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps({k: row[k] for k in MANIFEST_KEYS}, ensure_ascii=False) + "\n")
            n += 1
    tmp.replace(path)
    return n
