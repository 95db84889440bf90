"""Manifest rows checked one at a time, so one bad row is a counted skip, not a failed run.

`merge` and `export-json` read manifests written by other tools and by hand; at web scale a
stray non-UTF-8 byte, a null caption or a torn line is certain somewhere. Such a row is
skipped and counted by a `common.REASONS` name (`bad_text`, `empty_caption`, `malformed_row`),
and an unparseable line is named `file:line` in a note. Only a broken *first* line is an
error: that file is most likely not a jsonl manifest at all (a JSON array, a CSV...).
`BuildReport` (re-exported by manifest.py) lives here so that both modules can use it.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dlip.data.common import MANIFEST_KEYS, BadSample, SkipCounts, atomic_text, check_caption

Row = dict[str, str]
NOTES_PER_FILE = 20  # malformed lines named per manifest; a million would drown the summary


@dataclass
class BuildReport:
    """What a build or merge kept (rows per source) and dropped (bad samples by reason, and
    rows a documented filter removed)."""

    kept: Counter = field(default_factory=Counter)
    skipped: SkipCounts = field(default_factory=SkipCounts)
    filtered: Counter = field(default_factory=Counter)
    notes: list[str] = field(default_factory=list)

    def track(self, rows: Iterable[Row]) -> Iterator[Row]:
        """Pass rows through, counting them per source as kept."""
        for row in rows:
            self.kept[row["source"]] += 1
            yield row

    def summary(self) -> str:
        kept = ", ".join(f"{k} {v}" for k, v in sorted(self.kept.items())) or "none"
        lines = [f"kept {sum(self.kept.values())} ({kept})", self.skipped.summary()]
        if self.filtered:
            parts = ", ".join(f"{k} {v}" for k, v in sorted(self.filtered.items()))
            lines.append(f"filtered {sum(self.filtered.values())} ({parts})")
        return "\n".join(lines + [f"note: {n}" for n in self.notes])

    def as_dict(self) -> dict[str, Any]:
        counts = {k: dict(getattr(self, k)) for k in ("kept", "skipped", "filtered")}
        return {**counts, "notes": list(self.notes)}


def parse_object(text: str | bytes) -> dict[str, Any]:
    """One JSON object, else BadSample("malformed_row") saying what the text is instead."""
    try:
        obj = json.loads(text)
    except ValueError as err:  # JSONDecodeError, and UnicodeDecodeError for bytes
        raise BadSample("malformed_row", f"not valid JSON ({err})") from None
    if not isinstance(obj, dict):
        raise BadSample("malformed_row", f"a JSON {type(obj).__name__}, not an object")
    return obj


def _is_text(value: Any) -> bool:
    """A string that can be written back as UTF-8 (no lone surrogates from a bad byte)."""
    if not isinstance(value, str):
        return False
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def check_row(row: dict[str, Any]) -> Row:
    """The row if it keeps DESIGN.md's data contract, else BadSample naming the reason."""
    missing = [k for k in MANIFEST_KEYS if k not in row]
    if missing:
        raise BadSample("malformed_row", f"lacks {missing}")
    for key in ("image", "source", "image_id"):
        if not _is_text(row[key]) or (key == "image" and not row[key].strip()):
            raise BadSample("malformed_row", f"{key} {row[key]!r} is not a path or name")
    check_caption(row["caption"])  # bad_text (not a string, bad bytes) or empty_caption
    return row


def checked_rows(path: str | Path, skipped: SkipCounts, notes: list[str]) -> Iterator[Row]:
    """The good rows of a jsonl manifest; bad ones are counted in `skipped`, and malformed
    lines named in `notes` (the first NOTES_PER_FILE of them)."""
    path = Path(path)
    first, named = True, 0
    # utf-8-sig: a leading BOM (Windows editors) is dropped; surrogateescape: a bad byte spoils
    # one caption (bad_text), not the whole file.
    with path.open(encoding="utf-8-sig", errors="surrogateescape") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = check_row(parse_object(line))
            except BadSample as bad:
                if bad.reason == "malformed_row":
                    if first:
                        msg = f"{path}:{n}: {bad.detail}; not a jsonl manifest?"
                        raise ValueError(msg) from None
                    named += 1
                    if named <= NOTES_PER_FILE:
                        notes.append(f"{path}:{n}: malformed row skipped: {bad.detail}")
                skipped.add(bad.reason)
                first = False
                continue
            first = False
            yield row
    if named > NOTES_PER_FILE:
        notes.append(f"{path}: {named - NOTES_PER_FILE} more malformed rows not listed")


def export_json(
    manifests: Sequence[str | Path], out: str | Path, report: BuildReport | None = None
) -> int:
    """Write the seed's `all.json`: a JSON list of `{"caption", "image_root", "id"}`.

    `image_root` is the absolute image path, `id` the row's position (unique). Bad rows are
    skipped and counted in `report` (`checked_rows`); a row with a URL is an error. Streamed,
    and written atomically. Returns the number of entries.
    """
    report = report if report is not None else BuildReport()
    n = 0
    with atomic_text(out) as f:
        f.write("[")
        for path in manifests:
            for row in report.track(checked_rows(path, report.skipped, report.notes)):
                if "://" in row["image"]:
                    raise ValueError(f"{path}: row {row['image_id']} has a URL, not a file path")
                entry = {"caption": row["caption"], "image_root": os.path.abspath(row["image"])}
                entry["id"] = n
                f.write(("\n" if n == 0 else ",\n") + json.dumps(entry, ensure_ascii=False))
                n += 1
        f.write("\n]\n")
    return n
