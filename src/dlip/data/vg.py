"""Visual Genome region descriptions -> manifest rows (BLIP pretrains on VG's region phrases
as captions of the whole image).

Format (Krishna et al. 2017; https://homes.cs.washington.edu/~ranjay/visualgenome/api.html,
`region_descriptions.json` of VG 1.2 / 1.4): a list of `{"id", "regions": [{"region_id",
"image_id", "phrase", "x", "y", "width", "height"}]}`; images are found in `VG_100K/` or
`VG_100K_2/` (nothing is moved); sizes come from `image_data.json` if present, else from each
image header (no decode).

**Filter** (a region phrase stands for the whole image, so it must describe a large part of
it): keep a phrase with at least `min_words` words (default 3) whose box, clipped to the image,
covers at least `min_area_frac` (default 0.1) of the real image area; per image keep identical
phrases (case, spacing and final period ignored) once, as `duplicate` otherwise, and at most
`max_per_image` (default 10), largest regions first. Filtered phrases go to
`BuildReport.filtered`, not to the bad-sample counts. `image_id` is `vg_<id>`.

**Bad entries** are counted, the rest written: an image entry without an integer `id` (a
numeric string such as "12" is read as 12, as JSON written by other tools sometimes quotes
ids) or without a list of `regions` is one `malformed_row`; a region that is not an object is
a `malformed_row`; a box that is not four finite numbers with positive width and height is a
`bad_box`; a missing image counts once per image as `missing_file`. A file that is not a JSON
list of objects is an error naming the file.
"""

from __future__ import annotations

import math
import os
from collections.abc import Collection, Iterator
from pathlib import Path
from typing import Any

from dlip.data.common import BadSample, check_caption
from dlip.data.karpathy import iter_json_array
from dlip.data.rows import BuildReport

Row = dict[str, str]
_BOX = ("x", "y", "width", "height")


def vg_int(value: Any) -> int | None:
    """An image id as an int: an int (not a bool) or a string of digits; else None."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().isdigit():
        return int(value)
    return None


def _vg_images(root: Path) -> dict[int, Path]:
    """VG image id -> file, from VG_100K and VG_100K_2 (one directory listing each)."""
    index: dict[int, Path] = {}
    folders = [root / d for d in ("VG_100K", "VG_100K_2") if (root / d).is_dir()]
    if not folders:
        raise FileNotFoundError(f"{root}: neither VG_100K/ nor VG_100K_2/ exists")
    for folder in folders:
        for name in os.listdir(folder):
            stem, _, ext = name.partition(".")
            if stem.isdigit() and ext.lower() == "jpg":
                index.setdefault(int(stem), folder / name)
    return index


def _vg_image_data(root: Path) -> dict[int, dict[str, Any]]:
    """image id -> {width, height, coco_id} from image_data.json, or {} if it is absent.

    Entries without a usable id are left out: they are only size hints (the header is read)."""
    path = root / "image_data.json"
    if not path.is_file():
        return {}
    info = {}
    for d in iter_json_array(path):
        vg_id = vg_int(d.get("image_id", d.get("id")))
        if vg_id is not None:
            info[vg_id] = d
    return info


def _positive(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0


def _image_size(path: Path) -> tuple[int, int]:
    """(width, height) from the image header, without decoding pixels."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            w, h = im.size
    except Image.UnidentifiedImageError as err:
        raise BadSample("not_an_image", str(err)) from None
    except OSError as err:
        raise BadSample("truncated", str(err)) from None
    if w * h == 0:
        raise BadSample("empty_image", f"{w}x{h}")
    return w, h


def _size(meta: dict[str, Any], path: Path) -> tuple[float, float]:
    """The image size: image_data.json's when it is two positive numbers, else the header's."""
    w, h = meta.get("width"), meta.get("height")
    return (w, h) if _positive(w) and _positive(h) else _image_size(path)


def _box(region: dict[str, Any]) -> tuple[float, float, float, float]:
    """(x, y, width, height) as finite numbers with a positive size, else BadSample."""
    try:
        box = tuple(float(region[k]) for k in _BOX)
    except (KeyError, TypeError, ValueError):
        raise BadSample("bad_box", f"region {region.get('region_id')}: x/y/width/height") from None
    x, y, w, h = box
    if not all(math.isfinite(v) for v in box) or w <= 0 or h <= 0:
        raise BadSample("bad_box", f"region {region.get('region_id')}: {box}")
    return x, y, w, h


def _area(region: Any, size: tuple[float, float], cfg: dict[str, Any]) -> tuple[float, str]:
    """(fraction of the image the box covers, normalised phrase) of one region, or BadSample."""
    if not isinstance(region, dict):
        raise BadSample("malformed_row", f"a region that is a {type(region).__name__}")
    phrase = " ".join(check_caption(region.get("phrase")).split())
    if len(phrase.split()) < cfg["min_words"]:
        return 0.0, ""  # short: filtered, its box is not read
    x, y, rw, rh = _box(region)
    w, h = size
    x0, y0, x1, y1 = max(0, x), max(0, y), min(w, x + rw), min(h, y + rh)  # boxes overhang
    return max(0, x1 - x0) * max(0, y1 - y0) / (w * h), phrase


def _select_phrases(
    regions: list[Any], size: tuple[float, float], cfg: dict[str, Any], report: BuildReport
) -> list[str]:
    """The phrases of one image that pass the VG filter (module docstring), largest first."""
    scored: list[tuple[float, str]] = []
    for region in regions:
        try:
            area, phrase = _area(region, size, cfg)
        except BadSample as bad:
            report.skipped.add(bad.reason)
            continue
        if not phrase:
            report.filtered["vg_short_phrase"] += 1
        elif area < cfg["min_area_frac"]:
            report.filtered["vg_small_region"] += 1
        else:
            scored.append((area, phrase))
    scored.sort(key=lambda t: -t[0])  # stable: ties keep file order
    kept: dict[str, str] = {}
    for _, phrase in scored:
        key = phrase.lower().rstrip(" .")  # phrase spacing is already normalised
        if key in kept:
            report.skipped.add("duplicate")
        elif len(kept) >= cfg["max_per_image"]:
            report.filtered["vg_per_image_cap"] += 1
        else:
            kept[key] = phrase
    return list(kept.values())


def _item_id(item: dict[str, Any]) -> tuple[int, list[Any]]:
    """(image id, regions) of one region_descriptions.json entry, else BadSample."""
    vg_id = vg_int(item.get("id", item.get("image_id")))
    regions = item.get("regions")
    if vg_id is None or not isinstance(regions, list):
        what = f"id {item.get('id', item.get('image_id'))!r}, regions {type(regions).__name__}"
        raise BadSample("malformed_row", what)
    return vg_id, regions


def build_vg(
    root: str | Path,
    *,
    report: BuildReport,
    min_words: int = 3,
    min_area_frac: float = 0.1,
    max_per_image: int = 10,
    exclude_image_ids: Collection[str] = (),
) -> Iterator[Row]:
    """Rows of Visual Genome: filtered region phrases paired with their whole image.

    `root` holds region_descriptions.json, VG_100K/ and/or VG_100K_2/, optionally
    image_data.json. The filter, its thresholds and what is counted are in the module docstring.
    `exclude_image_ids` (e.g. `karpathy.eval_image_ids(...)`) drops VG images whose
    image_data.json `coco_id` is a Karpathy val/test COCO image, counted as `karpathy_eval`.
    """
    root = Path(root)
    regions_file = root / "region_descriptions.json"
    if not regions_file.is_file():
        raise FileNotFoundError(f"{regions_file} not found")
    cfg = {"min_words": min_words, "min_area_frac": min_area_frac, "max_per_image": max_per_image}
    images, info = _vg_images(root.resolve()), _vg_image_data(root)
    for n, item in enumerate(iter_json_array(regions_file)):
        try:
            vg_id, regions = _item_id(item)
        except BadSample as bad:
            report.skipped.add(bad.reason)
            if len(report.notes) < 20:  # name the first few; a bad file would drown the log
                report.notes.append(f"{regions_file}: item {n}: {bad.detail}")
            continue
        meta = info.get(vg_id, {})
        if meta.get("coco_id") and f"coco_{meta['coco_id']}" in exclude_image_ids:
            report.skipped.add("karpathy_eval")
            continue
        path = images.get(vg_id)
        if path is None:
            report.skipped.add("missing_file")
            continue
        try:
            size = _size(meta, path)
        except BadSample as bad:
            report.skipped.add(bad.reason)
            continue
        for phrase in _select_phrases(regions, size, cfg, report):
            yield {"image": str(path), "caption": phrase, "source": "vg", "image_id": f"vg_{vg_id}"}
