"""Manifest builders: what img2dataset, Visual Genome, COCO and Flickr30K ship -> jsonl rows.

Each builder yields DESIGN.md rows `{"image", "caption", "source", "image_id"}` (absolute
image paths, stripped captions), skipping bad samples and counting them by a `common.REASONS`
name in a `BuildReport` as the rows are consumed. `write_rows` writes rows and counts them per
source; `merge_manifests` joins manifests, drops duplicates and Karpathy val/test images;
`export_json` (rows.py) writes the seed's `all.json`; both skip and count bad rows. The sources:

- **img2dataset** (`build_img2dataset`), output format detected from the folder: `files`
  (`NNNNN/KEY.jpg|.txt|.json`), `webdataset` (`NNNNN.tar` holding the same members) or
  `parquet` (image bytes in a `jpg` column); each shard also has `NNNNN.parquet` listing every
  attempted sample with its `status` (anything but `success` is `download_failed`) and
  `NNNNN_stats.json`. Images inside tar/parquet shards are extracted to
  `extract_to/NNNNN/KEY.jpg` (resumable: an equal-sized file already there is kept). The
  trade-off: one more file and copy per image, but every later stage (map-style dataset,
  `dlip data shard`, eval) opens plain paths and can shuffle globally; at tens of millions of
  images, train on shards instead. `image_id` is `<source>_<key>` (`cc3m_000000015`), or
  `coco_<id>` when the URL names a COCO image, so the leakage guard sees it after the URL is gone.
- **Visual Genome** (`build_vg`): region descriptions as whole-image captions; see `vg.py`.
- **Karpathy JSONs** of COCO and Flickr30K (`build_karpathy`) and the Flickr30K Kaggle
  `results.csv` (`build_flickr30k_csv`): see `karpathy.py`, which defines both.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from dlip.data.common import (
    BadSample,
    SkipCounts,
    check_caption,
    decode_image,
    dedupe_key,
    dedupe_max_keys,
    file_image_id,
    repeated_positions,
    write_manifest,
)
from dlip.data.karpathy import build_flickr30k_csv as build_flickr30k_csv  # re-exported
from dlip.data.karpathy import build_karpathy as build_karpathy  # re-exported
from dlip.data.karpathy import coco_id_from_name, eval_image_ids, eval_key
from dlip.data.rows import BuildReport as BuildReport  # re-exported
from dlip.data.rows import checked_rows, parse_object
from dlip.data.rows import export_json as export_json  # re-exported
from dlip.data.vg import build_vg as build_vg  # re-exported

Row = dict[str, str]


def write_rows(rows: Iterable[Row], out: str | Path, report: BuildReport) -> int:
    """Write rows as a jsonl manifest (atomically), counting kept rows per source."""
    from dlip.progress import bar

    return write_manifest(report.track(bar(rows, desc=f"rows -> {out}", unit="row")), out)


def default_extract_dir(manifest: str | Path) -> Path:
    """Where images from tar/parquet shards go by default: `<manifest stem>_images/` beside it."""
    return Path(manifest).with_name(Path(manifest).stem + "_images")


# ---------------------------------------------------------------------------- img2dataset

I2D_FORMATS = ("files", "webdataset", "parquet")
_IMAGE_EXTS = ("jpg", "png", "webp")  # img2dataset's encode_format choices
_SHARD = re.compile(r"(\d+)(?:\.tar|\.parquet)?")
_KEY = re.compile(r"[\w-]+")


def detect_img2dataset_format(folder: str | Path) -> str:
    """'files', 'webdataset' or 'parquet', from what is in an img2dataset output folder."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"img2dataset output folder not found: {folder}")
    names = os.listdir(folder)
    if any(n.endswith(".tar") and _SHARD.fullmatch(n) for n in names):
        return "webdataset"
    if any(_SHARD.fullmatch(n) and (folder / n).is_dir() for n in names):
        return "files"
    parquets = sorted(n for n in names if n.endswith(".parquet") and _SHARD.fullmatch(n))
    if parquets:
        import pyarrow.parquet as pq

        columns = pq.read_schema(folder / parquets[0]).names
        return "parquet" if any(e in columns for e in _IMAGE_EXTS) else "files"
    raise ValueError(f"{folder}: no img2dataset shards (NNNNN/, NNNNN.tar or NNNNN.parquet)")


def _read_meta(parquet: Path, report: BuildReport) -> dict[str, dict[str, Any]] | None:
    """key -> {status, caption, url} of every sample a shard attempted; None if unreadable."""
    import pyarrow.parquet as pq

    try:
        schema = pq.read_schema(parquet).names
        cols = [c for c in ("key", "status", "caption", "url") if c in schema]
        rows = pq.read_table(parquet, columns=cols).to_pylist()
    except (OSError, ValueError) as err:  # absent, or cut short by an interrupted run
        report.notes.append(f"{parquet}: unreadable shard metadata ({err})")
        return None
    if "caption" not in schema:
        raise ValueError(f"{parquet}: no 'caption' column (img2dataset ran without caption_col)")
    return {r["key"]: r for r in rows}


def _i2d_row(
    meta: dict[str, Any], image: str, source: str, report: BuildReport, data: bytes | None = None
) -> Row | None:
    """The manifest row of one downloaded sample, or None (counted) if it must be skipped."""
    try:
        caption = check_caption(meta.get("caption")).strip()
        if data is not None:  # verification asked for: decode fully before keeping
            decode_image(data)
    except BadSample as bad:
        report.skipped.add(bad.reason)
        return None
    url = meta.get("url") or ""
    coco_id = coco_id_from_name(url)
    image_id = f"coco_{coco_id}" if coco_id is not None else f"{source}_{meta['key']}"
    return {"image": image, "caption": caption, "source": source, "image_id": image_id, "url": url}


def _files_shard(
    folder: Path, shard: str, source: str, report: BuildReport, verify: bool
) -> Iterator[Row]:
    sub = folder / shard
    present = set(os.listdir(sub)) if sub.is_dir() else set()
    meta = _read_meta(folder / f"{shard}.parquet", report)
    if meta is None:  # fall back to the per-sample .json files: only successes are visible
        meta = {}
        for name in sorted(n for n in present if n.endswith(".json")):
            try:  # a corrupt one is one skipped sample, named, not a failed build
                m = parse_object((sub / name).read_bytes())
            except BadSample as bad:
                report.skipped.add(bad.reason)
                report.notes.append(f"{sub / name}: {bad.detail}")
                continue
            meta[m.setdefault("key", name.partition(".")[0])] = m
    for key, m in sorted(meta.items()):  # key order: the parquet is in completion order
        if m["status"] != "success":
            report.skipped.add("download_failed")
            continue
        name = next((f"{key}.{e}" for e in _IMAGE_EXTS if f"{key}.{e}" in present), None)
        if name is None:
            report.skipped.add("missing_file")
            continue
        path = os.path.abspath(sub / name)
        row = _i2d_row(m, path, source, report, Path(path).read_bytes() if verify else None)
        if row is not None:
            yield row


def _tar_samples(tar_path: Path, report: BuildReport) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {ext: bytes}) per sample of a webdataset tar, streamed (members grouped by key)."""
    import tarfile

    key, parts = None, {}
    try:
        with tarfile.open(tar_path, mode="r|*") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                k, _, ext = os.path.basename(member.name).partition(".")
                if k != key and key is not None:
                    yield key, parts
                    parts = {}
                key = k
                parts[ext] = tar.extractfile(member).read()
    except (tarfile.TarError, EOFError, OSError) as err:
        report.notes.append(f"{tar_path}: tar cut short ({err}); later samples missing")
    if key is not None:
        yield key, parts


def _extract(data: bytes, dest: Path) -> str:
    """Write image bytes to dest unless an equal-sized file is already there (resume)."""
    if not (dest.is_file() and dest.stat().st_size == len(data)):
        tmp = dest.with_name(dest.name + ".tmp")
        tmp.write_bytes(data)
        tmp.replace(dest)  # atomic: an interrupted run never leaves half an image
    return os.path.abspath(dest)


def _tar_shard(
    folder: Path, shard: str, source: str, report: BuildReport, out_dir: Path, verify: bool
) -> Iterator[Row]:
    meta = _read_meta(folder / f"{shard}.parquet", report) or {}
    expected = {k for k, m in meta.items() if m["status"] == "success"}
    # update() with a list, not add(n): a count of 0 must not create an entry
    report.skipped.update(["download_failed"] * (len(meta) - len(expected)))
    out_dir.mkdir(parents=True, exist_ok=True)
    for key, parts in _tar_samples(folder / f"{shard}.tar", report):
        expected.discard(key)
        try:  # one corrupt .json member is one skipped sample, named, not a failed build
            m = parse_object(parts["json"]) if "json" in parts else {"status": "success"}
        except BadSample as bad:
            report.skipped.add(bad.reason)
            report.notes.append(f"{folder / shard}.tar: sample {key}: {bad.detail}")
            continue
        m.setdefault("key", key)
        m["caption"] = parts.get("txt")  # bytes: check_caption reports invalid UTF-8
        ext = next((e for e in _IMAGE_EXTS if e in parts), None)
        if ext is None:
            report.skipped.add("missing_file")
            continue
        row = _i2d_row(m, "", source, report, parts[ext] if verify else None)
        if row is not None:
            row["image"] = _extract(parts[ext], out_dir / f"{key}.{ext}")
            yield row
    report.skipped.update(["missing_file"] * len(expected))  # success, but absent from the tar


def _parquet_shard(
    folder: Path, shard: str, source: str, report: BuildReport, out_dir: Path, verify: bool
) -> Iterator[Row]:
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(folder / f"{shard}.parquet")
    names = pf.schema_arrow.names
    ext = next((e for e in _IMAGE_EXTS if e in names), None)
    if ext is None or "caption" not in names:
        raise ValueError(f"{folder / shard}.parquet: needs an image column and 'caption'")
    out_dir.mkdir(parents=True, exist_ok=True)
    cols = ["key", "status", "caption", "url", ext]
    for batch in pf.iter_batches(batch_size=256, columns=cols):  # bounded memory
        for m in batch.to_pylist():
            data = m.pop(ext)
            if not _KEY.fullmatch(str(m["key"])):  # the key becomes a file name
                raise ValueError(f"{folder / shard}.parquet: bad sample key {m['key']!r}")
            if m["status"] != "success":
                report.skipped.add("download_failed")
            elif not data:
                report.skipped.add("missing_file" if data is None else "empty_image")
            else:
                row = _i2d_row(m, "", source, report, data if verify else None)
                if row is not None:
                    row["image"] = _extract(data, out_dir / f"{m['key']}.{ext}")
                    yield row


def build_img2dataset(
    folder: str | Path,
    *,
    report: BuildReport,
    source: str | None = None,
    extract_to: str | Path | None = None,
    verify: bool = False,
    output_format: str | None = None,
) -> Iterator[Row]:
    """Rows of an img2dataset output folder (format detected unless `output_format` is given).

    `source` defaults to the folder name (`cc3m/` -> "cc3m"). `extract_to` is required for the
    webdataset and parquet formats (images are written there, see the module docstring).
    `verify` fully decodes every image and skips undecodable ones (slow; img2dataset already
    decoded and re-encoded each image unless it ran with `disable_all_reencoding`).
    Rows also carry the sample's `url` (not written to the manifest).
    """
    folder = Path(folder)
    fmt = output_format or detect_img2dataset_format(folder)
    if fmt not in I2D_FORMATS:
        raise ValueError(f"unknown img2dataset output format {fmt!r}; expected {I2D_FORMATS}")
    if fmt != "files" and extract_to is None:
        raise ValueError(f"{folder}: {fmt} output keeps images in shards; pass extract_to")
    source = source or folder.resolve().name.lower()
    shards = sorted({m.group(1) for n in os.listdir(folder) if (m := _SHARD.fullmatch(n))})
    for shard in shards:
        if fmt == "files":
            yield from _files_shard(folder, shard, source, report, verify)
        elif (folder / f"{shard}.{'tar' if fmt == 'webdataset' else 'parquet'}").is_file():
            shard_fn = _tar_shard if fmt == "webdataset" else _parquet_shard
            yield from shard_fn(folder, shard, source, report, Path(extract_to) / shard, verify)
        else:
            report.notes.append(f"{folder}: shard {shard} has no {fmt} file")


# ---------------------------------------------------------------------------- merge / export


def merge_manifests(
    paths: Sequence[str | Path],
    *,
    report: BuildReport,
    exclude_karpathy: Sequence[str | Path] = (),
    dedupe: bool = True,
    dedupe_mib: float = 256,
    tmp_dir: str | Path | None = None,
) -> Iterator[Row]:
    """Rows of several manifests in order, with duplicates and Karpathy eval images dropped.

    Duplicates share `dedupe_key` (image path and caption, case and spacing ignored); the first
    wins. `exclude_karpathy` lists Karpathy val/test JSONs: every row showing one of their
    images (see `eval_key`) is dropped as `karpathy_eval`. Kept rows get ids that identify
    their image file across manifests (`common.file_image_id`: one id per file, never one id
    for two, no memory).
    Dedupe reads the manifests twice (`repeated_positions`): memory is `dedupe_mib` MiB (64
    bytes a row held; more rows spill to `tmp_dir`, 24 bytes a row) + 8 bytes a duplicate,
    whatever the row count.
    """
    leak = eval_image_ids(exclude_karpathy) if exclude_karpathy else set()
    paths = list(paths)  # read twice; bad rows (`checked_rows`) are counted on the second pass

    def rows(skipped: SkipCounts, notes: list[str]) -> Iterator[tuple[Row, bool]]:
        for path in paths:  # every good row of every manifest, and if it leaks
            for row in checked_rows(path, skipped, notes):
                yield row, bool(leak) and eval_key(row) in leak

    from dlip.progress import bar

    first = bar(rows(SkipCounts(), []), desc="dedupe: first pass", unit="row")
    keys = (None if leaked else dedupe_key(row) for row, leaked in first)
    max_keys = dedupe_max_keys(dedupe_mib)
    found = repeated_positions(keys, max_keys=max_keys, tmp_dir=tmp_dir) if dedupe else ()
    repeats = map(int, found)  # numpy scalars compare slowly
    repeat = next(repeats, -1)
    for pos, (row, leaked) in enumerate(rows(report.skipped, report.notes)):
        if leaked:
            report.skipped.add("karpathy_eval")
        elif pos == repeat:
            report.skipped.add("duplicate")
            repeat = next(repeats, -1)
        else:
            image_id = file_image_id(row)  # ids of two manifests may collide (both from 0)
            yield row if image_id == row["image_id"] else {**row, "image_id": image_id}
