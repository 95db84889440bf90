"""The Karpathy splits of COCO and Flickr30K as BLIP / LAVIS ship them, and the Kaggle CSV.

BLIP/LAVIS JSONs (as salesforce/BLIP data/coco_karpathy_dataset.py and flickr30k_dataset.py
read them) are one JSON list per split:

- train (`coco_karpathy_train.json`, `flickr30k_train.json`): one entry per caption,
  `{"caption": str, "image": "val2014/COCO_val2014_000000328757.jpg", "image_id": ...}`;
- val/test (`coco_karpathy_{val,test}.json`, `flickr30k_{val,test}.json`): one entry per image,
  `{"image": path, "caption": [5 strings]}`.

Paths are relative to an image root (`train2014/`, `val2014/` for COCO; `flickr30k-images/` for
Flickr30K). The image id used everywhere in dlip is derived from the file name, never from the
entry's own `image_id` (BLIP's differ between files): `coco_328757` from
`COCO_val2014_000000328757.jpg` or `000000328757.jpg`, `flickr30k_1000092795` from
`1000092795.jpg`. `load_eval_set` turns a val/test file into what retrieval evaluation needs.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dlip.data.common import (
    PUBLIC_ID_PREFIXES,
    BadSample,
    ImageCheck,
    ImageIds,
    check_caption,
    under_root,
)

if TYPE_CHECKING:  # manifest.py imports this module; the report type is only an annotation
    from dlip.data.manifest import BuildReport

DATASETS = ("coco", "flickr30k")

# COCO file names: 2014 `COCO_val2014_000000328757.jpg`, 2017 `train2017/000000328757.jpg`.
_COCO_2014 = re.compile(r"COCO_(?:train|val|test)20\d\d_(\d{12})\.jpg")
_COCO_2017 = re.compile(r"(?:train|val|test)20\d\d/(\d{12})\.jpg")


def coco_id_from_name(text: str) -> int | None:
    """The numeric COCO image id in a file name, path or URL, or None if it names no COCO image.

    A bare 12-digit name counts only under a `train2017/`-style folder, so an img2dataset key
    (9 digits) or an unrelated number is never mistaken for a COCO id.
    """
    m = _COCO_2014.search(text) or _COCO_2017.search(text.replace("\\", "/"))
    return int(m.group(1)) if m else None


def detect_dataset(image: str) -> str:
    """'coco' or 'flickr30k' from an annotation's image path."""
    if coco_id_from_name(image) is not None:
        return "coco"
    if "flickr" in image.lower() or Path(image).stem.isdigit():
        return "flickr30k"
    raise ValueError(f"cannot tell COCO from Flickr30K by the image path {image!r}; pass dataset=")


def image_id_for(image: str, dataset: str) -> str:
    """The stable dlip image id of a COCO / Flickr30K image path (see the module docstring)."""
    if dataset == "coco":
        coco_id = coco_id_from_name(image)
        if coco_id is None:
            raise ValueError(f"not a COCO image file name: {image!r}")
        return f"coco_{coco_id}"
    if dataset == "flickr30k":
        stem = Path(image).stem
        if not stem.isdigit():
            raise ValueError(f"not a Flickr30K image file name (digits.jpg): {image!r}")
        return f"flickr30k_{int(stem)}"
    raise ValueError(f"unknown dataset {dataset!r}; expected one of {DATASETS}")


def iter_json_array(path: str | Path, chunk_chars: int = 1 << 20) -> Iterator[Any]:
    """The objects of a top-level JSON list, parsed one at a time (VG's files are ~1 GB)."""
    decoder = json.JSONDecoder()
    path = Path(path)
    with path.open(encoding="utf-8-sig") as f:
        buf, pos, eof = "", 0, False
        started = False
        while True:
            while pos < len(buf) and buf[pos] in " \t\r\n,":
                pos += 1
            if not started and pos < len(buf):
                if buf[pos] != "[":
                    raise ValueError(f"{path}: expected a JSON list")
                started, pos = True, pos + 1
                continue
            if pos < len(buf) and buf[pos] == "]":
                return
            try:
                # Elements are objects, so a parse that succeeds is complete, never cut short.
                item, end = decoder.raw_decode(buf, pos)
            except json.JSONDecodeError as err:
                if eof:
                    raise ValueError(f"{path}: invalid or truncated JSON ({err})") from None
                more = f.read(chunk_chars)
                eof = not more
                buf, pos = buf[pos:] + more, 0
                continue
            if not isinstance(item, dict):
                raise ValueError(f"{path}: list items must be objects, got {type(item).__name__}")
            yield item
            pos = end


def _checked(path: Path, i: int, entry: dict[str, Any]) -> dict[str, Any]:
    if "image" not in entry or "caption" not in entry:
        raise ValueError(f"{path}: entry {i} lacks 'image' or 'caption': {entry!r:.200}")
    if not isinstance(entry["image"], str):
        raise ValueError(f"{path}: entry {i}: 'image' must be a string")
    # A caption that is not a string (null, a number) is left to `check_caption`: a counted
    # bad_text skip in training rows, an error naming it in an evaluation split.
    return entry


def iter_entries(path: str | Path) -> Iterator[dict[str, Any]]:
    """Entries of a Karpathy JSON, streamed; a malformed entry is an error naming it."""
    path = Path(path)
    for i, entry in enumerate(iter_json_array(path)):
        yield _checked(path, i, entry)


def load_karpathy(path: str | Path) -> list[dict[str, Any]]:
    """All entries of a Karpathy JSON (checked like `iter_entries`)."""
    return list(iter_entries(path))


def _entry_id(path: str | Path, i: int, image: str, dataset: str | None) -> tuple[str, str]:
    """(dataset, image id) of entry i; dataset None means detect it from this path."""
    try:
        dataset = dataset or detect_dataset(image)
        return dataset, image_id_for(image, dataset)
    except ValueError as err:
        raise ValueError(f"{path}: entry {i}: {err}") from None


def _any_entry_id(
    path: str | Path, i: int, entry: dict[str, Any], dataset: str | None
) -> tuple[str | None, str]:
    """Like _entry_id, but a set that is neither COCO nor Flickr30K (e.g. `dlip data synth`)
    keeps its own `image_id`, else the file stem, and has no dataset name (None)."""
    if dataset is None:
        try:
            dataset = detect_dataset(entry["image"])
        except ValueError:
            return None, str(entry.get("image_id") or Path(entry["image"]).stem)
    return _entry_id(path, i, entry["image"], dataset)


def is_eval_split(entries: list[dict[str, Any]]) -> bool:
    """True for val/test files (captions as lists), False for train (one caption per entry)."""
    return bool(entries) and isinstance(entries[0]["caption"], list)


def _join(root: str | Path | None, image: str) -> str:
    return os.path.abspath(os.path.join(root, image) if root is not None else image)


def _image_path(root: str | Path | None, image: str) -> str:
    """The absolute path of an annotation's image; BadSample("outside_root") if it escapes
    `root` (absolute, or `..` out of it). Without a root the name is used as it is."""
    return under_root(root, image) if root is not None else os.path.abspath(image)


def build_karpathy(
    path: str | Path,
    image_root: str | Path | None,
    *,
    report: BuildReport,
    dataset: str | None = None,
    check_files: bool = True,
    check_captions: bool = True,
) -> Iterator[dict[str, str]]:
    """Manifest rows of a Karpathy JSON (any split): one row per caption, absolute image path.

    Relative paths are joined to `image_root`; `dataset` ('coco'/'flickr30k') is detected from
    the paths when not given; other sets in the same schema (e.g. `dlip data synth`) keep their
    own image ids and get the source "karpathy". Skipped and counted in `report.skipped`, one
    count per caption row left out: empty captions, image names outside `image_root`
    (`outside_root`), and with `check_files` images that do not fully decode (`missing_file`,
    `empty_image`, `truncated`, ...: `common.decode_image`, once per image). Training passes
    `check_files=False, check_captions=False`: its loader checks each sample as it reads it
    and counts the bad ones in the run's metrics.
    """
    counts = report.skipped
    check = ImageCheck()
    image_ids = ImageIds()  # an own id (or stem) given to two files must not join them
    for i, entry in enumerate(iter_entries(path)):
        dataset, image_id = _any_entry_id(path, i, entry, dataset)
        source = dataset or "karpathy"
        captions = entry["caption"] if isinstance(entry["caption"], list) else [entry["caption"]]
        try:
            image = _image_path(image_root, entry["image"])
        except BadSample as bad:
            counts.add(bad.reason, len(captions))
            continue
        bad_image = check(image) if check_files else None
        if bad_image is not None:
            counts.add(bad_image, len(captions))
            continue
        for caption in captions:
            if check_captions:
                try:
                    caption = check_caption(caption).strip()
                except BadSample as bad:
                    counts.add(bad.reason)
                    continue
            row = {"image": image, "caption": caption, "source": source, "image_id": image_id}
            yield image_ids(row)


def eval_image_ids(paths: Iterable[str | Path]) -> set[str]:
    """dlip image ids of every image in Karpathy val/test files (for the leakage guard).

    A train file here is almost certainly a mistake (it would drop the whole training set), so
    it is an error.
    """
    ids: set[str] = set()
    for path in paths:
        entries = load_karpathy(path)
        if entries and not is_eval_split(entries):
            raise ValueError(f"{path}: a train split (one caption per entry), not val/test")
        dataset = None
        for i, entry in enumerate(entries):
            dataset, image_id = _entry_id(path, i, entry["image"], dataset)
            ids.add(image_id)
    return ids


def eval_key(row: dict[str, str]) -> str | None:
    """The COCO / Flickr30K image id a row shows, for the leakage guard (None if none).

    Read from `image_id` (`coco_N`, `flickr30k_N`), else from a COCO file name or URL in the
    row's `url` (in-memory rows from build_img2dataset) or `image`.
    """
    image_id = row["image_id"]
    if image_id.startswith(PUBLIC_ID_PREFIXES):
        return image_id
    for text in (row.get("url") or "", row["image"]):
        coco_id = coco_id_from_name(text)
        if coco_id is not None:
            return f"coco_{coco_id}"
    return None


def eval_image_paths(path: str | Path, image_root: str | Path | None) -> list[str]:
    """Absolute image paths of a Karpathy val/test file, in file order."""
    return [_join(image_root, e["image"]) for e in load_karpathy(path)]


@dataclass
class EvalSet:
    """A retrieval evaluation set: images, all their captions, and the maps between them.

    `captions` are raw (callers apply `pre_caption`); `txt2img[t]` is the index of caption t's
    image; `img2txt[i]` lists the caption indices of image i (usually 5).
    """

    images: list[str]
    image_ids: list[str]
    captions: list[str]
    txt2img: list[int]
    img2txt: list[list[int]]


def load_eval_set(
    path: str | Path,
    image_root: str | Path | None,
    dataset: str | None = None,
    check_files: bool = True,
) -> EvalSet:
    """A Karpathy val/test file as an EvalSet (BLIP's retrieval eval layout).

    A missing image is an error (naming the first ones): skipping it would silently change the
    benchmark. An empty caption is an error for the same reason.
    """
    entries = load_karpathy(path)
    if not entries:  # metrics over nothing are NaN: refuse rather than write them
        raise ValueError(f"{path}: no images to evaluate (an empty split)")
    if not is_eval_split(entries):
        raise ValueError(f"{path}: a train split (one caption per entry), not val/test")
    out = EvalSet([], [], [], [], [])
    for i, entry in enumerate(entries):
        if not isinstance(entry["caption"], list):
            raise ValueError(f"{path}: entry {i}: 'caption' must be a list in a val/test split")
        dataset, image_id = _any_entry_id(path, i, entry, dataset)
        try:
            out.images.append(_image_path(image_root, entry["image"]))
        except BadSample:
            raise ValueError(
                f"{path}: entry {i}: image {entry['image']!r} is outside the image root"
            ) from None
        out.image_ids.append(image_id)
        out.img2txt.append([])
        for caption in entry["caption"]:
            if not isinstance(caption, str) or not caption.strip():
                raise ValueError(f"{path}: entry {i} ({entry['image']}): empty or non-text caption")
            out.img2txt[-1].append(len(out.captions))
            out.captions.append(caption)
            out.txt2img.append(i)
    if check_files:
        missing = [p for p in out.images if not os.path.isfile(p)]
        if missing:
            raise FileNotFoundError(
                f"{path}: {len(missing)} of {len(out.images)} images missing under "
                f"{image_root}, e.g. {missing[:3]}"
            )
    return out


# ---- Flickr30K Kaggle CSV (hsankesara/flickr-image-dataset: flickr30k_images/results.csv) ----

_CSV_HEADER = ["image_name", "comment_number", "comment"]
# The one known malformed row lost its second pipe: "2199200615.jpg| 4   A dog runs ...".
_NUM_THEN_TEXT = re.compile(r"\s*(\d+)\s+(\S.*)")


def parse_flickr_csv_line(line: str) -> tuple[str, int, str] | None:
    """(image name, comment number, comment) of one results.csv row, or None if unparseable.

    Rows are `name| n| comment` with a leading space in each value; a row missing the pipe
    between number and comment is recovered, anything else is None.
    """
    parts = line.rstrip("\r\n").split("|", 2)
    if len(parts) == 3:
        name, number, comment = (p.strip() for p in parts)
        if not number.isdigit():
            return None
    elif len(parts) == 2 and (m := _NUM_THEN_TEXT.fullmatch(parts[1])):
        name, number, comment = parts[0].strip(), m.group(1), m.group(2)
    else:
        return None
    if not Path(name).stem.isdigit():  # Flickr30K names are <digits>.jpg
        return None
    return name, int(number), comment


def _flickr_image_dir(image_dir: Path, first_name: str | None) -> Path:
    """The folder holding the jpgs; Kaggle nests it as flickr30k_images/flickr30k_images/."""
    nested = image_dir / "flickr30k_images"
    if first_name and not (image_dir / first_name).exists() and (nested / first_name).exists():
        return nested
    return image_dir


def build_flickr30k_csv(
    csv_path: str | Path, image_dir: str | Path, *, report: BuildReport, check_files: bool = True
) -> Iterator[dict[str, str]]:
    """Manifest rows of the Kaggle Flickr30K results.csv, one per caption.

    `image_dir` is the folder of jpgs, or Kaggle's `flickr30k_images/` that nests it.
    Unparseable rows count as `malformed_row`, undecodable bytes as `bad_text`, empty comments
    as `empty_caption`, names outside `image_dir` as `outside_root`, and (with `check_files`)
    images that do not fully decode by their reason (`missing_file`, `truncated`, ...).
    """
    counts = report.skipped
    csv_path, image_dir = Path(csv_path), Path(image_dir)
    with csv_path.open("rb") as f:
        header = f.readline().decode("utf-8-sig", errors="replace")
        if [h.strip() for h in header.split("|")] != _CSV_HEADER:
            raise ValueError(
                f"{csv_path}: header {header.strip()!r} is not {'|'.join(_CSV_HEADER)}"
            )
        root: Path | None = None
        check = ImageCheck()
        for raw in f:
            if not raw.strip():
                continue
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                counts.add("bad_text")
                continue
            parsed = parse_flickr_csv_line(line)
            if parsed is None:
                counts.add("malformed_row")
                continue
            name, _, comment = parsed
            root = root or _flickr_image_dir(image_dir, name)
            try:
                image = under_root(root, name)
            except BadSample as bad:
                counts.add(bad.reason)
                continue
            bad_image = check(image) if check_files and comment.strip() else None
            if not comment.strip():
                counts.add("empty_caption")
            elif bad_image is not None:
                counts.add(bad_image)
            else:
                yield {
                    "image": image,
                    "caption": comment,
                    "source": "flickr30k",
                    "image_id": image_id_for(name, "flickr30k"),
                }
