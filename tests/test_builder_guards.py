"""Builders and merge on hostile input: every bad entry is a counted skip, never a traceback,
never a wrong row (issue 14). Inputs are a few tiny files in the public formats: Visual Genome
`region_descriptions.json`, Karpathy JSONs, the Kaggle Flickr30K `results.csv`."""

from __future__ import annotations

import io
import json
from collections import defaultdict
from pathlib import Path

import pytest
from PIL import Image

from dlip.cli import main
from dlip.data import common
from dlip.data.common import read_manifest, write_manifest
from dlip.data.karpathy import build_flickr30k_csv, build_karpathy
from dlip.data.manifest import BuildReport, build_vg, merge_manifests


def _jpg(path: Path, size: tuple[int, int] = (32, 32)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (120, 60, 30)).save(path)
    return path


def _truncated(path: Path) -> Path:
    buf = io.BytesIO()
    Image.effect_noise((64, 64), 50).convert("RGB").save(buf, "JPEG")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])  # header intact, data cut
    return path


def _region(x, y, w, h, phrase: str = "a man riding a brown horse") -> dict:
    return {"region_id": 1, "image_id": 1, "phrase": phrase, "x": x, "y": y, "width": w,
            "height": h}  # fmt: skip


# ---------------------------------------------------------------------------- Visual Genome


def test_vg_bad_ids_regions_and_boxes_are_counted(tmp_path):
    _jpg(tmp_path / "VG_100K" / "1.jpg", (200, 100))
    _jpg(tmp_path / "VG_100K" / "2.jpg", (200, 100))
    items = [
        {"id": "1", "regions": [  # a numeric string id is read as 1
            _region(0, 0, 150, 80),
            _region(0, 0, 0, 80, "a zero width box here"),
            _region(0, 0, 150, -5, "a negative height box"),
            _region("left", 0, 150, 80, "a non numeric x value"),
            _region(0, 0, float("nan"), 80, "a not a number width"),
            "not a region",
        ]},
        {"id": "two", "regions": [_region(0, 0, 150, 80)]},  # non-numeric id
        {"id": 2, "regions": "a string, not a list"},
        {"id": True, "regions": []},  # a bool is not an id
    ]  # fmt: skip
    (tmp_path / "region_descriptions.json").write_text(json.dumps(items))
    # A 0 width in image_data.json must not divide by zero: the header gives the size.
    info = [{"image_id": 1, "width": 0, "height": 100}, {"image_id": "x", "width": 5}]
    (tmp_path / "image_data.json").write_text(json.dumps(info))
    report = BuildReport()
    rows = list(build_vg(tmp_path, report=report))
    assert [(r["image_id"], r["caption"]) for r in rows] == [("vg_1", "a man riding a brown horse")]
    assert report.skipped == {"bad_box": 4, "malformed_row": 4}
    assert any("item 1" in n for n in report.notes)


def test_vg_file_of_the_wrong_shape_is_an_error_naming_it(tmp_path):
    _jpg(tmp_path / "VG_100K" / "1.jpg")
    path = tmp_path / "region_descriptions.json"
    for text in ('{"id": 1, "regions": []}', "[1, 2]"):
        path.write_text(text)
        with pytest.raises(ValueError, match=r"region_descriptions\.json"):
            list(build_vg(tmp_path, report=BuildReport()))


# ---------------------------------------------------------------------------- merge image ids


def _manifest(path: Path, rows: list[tuple[str, str, str]]) -> Path:
    keys = ("image", "caption", "image_id")
    write_manifest([{**dict(zip(keys, r, strict=True)), "source": path.stem} for r in rows], path)
    return path


def test_merge_gives_one_id_per_image_file(tmp_path, capsys):
    a = _manifest(tmp_path / "a.jsonl", [
        ("/d/a/0.jpg", "a red car", "0"), ("/d/a/0.jpg", "a car in red", "0"),
        ("/d/a/1.jpg", "a blue boat", "1"), ("/d/coco/x.jpg", "a cyclist", "coco_9"),
    ])  # fmt: skip
    b = _manifest(tmp_path / "b.jsonl", [
        ("/d/b/0.jpg", "a green tree", "0"), ("/d/b/0.jpg", "a tall tree", "0"),  # id taken
        ("/d/a/0.jpg", "the red car again", "5"),  # a's file under another id
        ("/d/coco/y.jpg", "a cyclist riding", "coco_9"),  # another copy of one COCO picture
    ])  # fmt: skip
    out = tmp_path / "all.jsonl"
    assert main(["data", "merge", str(a), str(b), "--out", str(out)]) == 0
    rows = list(read_manifest(out))
    assert len(rows) == 8
    ids_of, files_of = defaultdict(set), defaultdict(set)
    for r in rows:
        ids_of[r["image"]].add(r["image_id"])
        files_of[r["image_id"]].add(r["image"])
    assert all(len(ids) == 1 for ids in ids_of.values())  # one file, one id
    shared = {i: f for i, f in files_of.items() if len(f) > 1}
    assert shared == {"coco_9": {"/d/coco/x.jpg", "/d/coco/y.jpg"}}  # public ids name pictures
    by_file = {f: ids.pop() for f, ids in ids_of.items()}
    for f in ("/d/a/0.jpg", "/d/a/1.jpg", "/d/b/0.jpg"):  # the file's stem @ its path's digest
        stem, digest = by_file[f].split("@")
        assert stem == Path(f).stem and len(digest) == 16 and int(digest, 16) >= 0
    # merging the merge changes nothing
    assert [r["image_id"] for r in merge_manifests([out], report=BuildReport())] == [
        r["image_id"] for r in rows
    ]


# ---------------------------------------------------------------------------- image checks


def _coco_name(n: int) -> str:
    return f"train2014/COCO_train2014_{n:012d}.jpg"


def test_karpathy_and_flickr_skip_bad_images_once_per_image(tmp_path, monkeypatch):
    root = tmp_path / "coco"
    _jpg(root / _coco_name(1))
    (root / _coco_name(2)).write_bytes(b"")
    _truncated(root / _coco_name(3))
    names = [_coco_name(n) for n in (1, 2, 3, 4, 1, 2, 3)]  # 4 is missing
    ann = tmp_path / "train.json"
    ann.write_text(
        json.dumps([{"image": n, "caption": f"caption {i}"} for i, n in enumerate(names)])
    )
    calls = []
    real = common.decode_image
    monkeypatch.setattr(common, "decode_image", lambda p: calls.append(p) or real(p))
    report = BuildReport()
    rows = list(build_karpathy(ann, root, report=report))
    assert [(r["image_id"], r["caption"]) for r in rows] == [
        ("coco_1", "caption 0"), ("coco_1", "caption 4")
    ]  # fmt: skip
    assert report.skipped == {"empty_image": 2, "truncated": 2, "missing_file": 1}
    assert len(calls) == 4  # one decode per distinct image, not per caption

    flickr = tmp_path / "flickr30k_images"
    _jpg(flickr / "10.jpg")
    (flickr / "11.jpg").write_bytes(b"")
    _truncated(flickr / "12.jpg")
    csv = tmp_path / "results.csv"
    lines = ["image_name| comment_number| comment"]
    lines += [f"{n}.jpg| {k}| a dog number {k}" for n in (10, 11, 12, 13) for k in range(2)]
    csv.write_text("\n".join(lines) + "\n")
    report = BuildReport()
    rows = list(build_flickr30k_csv(csv, flickr, report=report))
    assert [r["image_id"] for r in rows] == ["flickr30k_10"] * 2
    assert report.skipped == {"empty_image": 2, "truncated": 2, "missing_file": 2}


# ---------------------------------------------------------------------------- outside the root


def test_image_names_outside_the_root_are_refused(tmp_path, capsys):
    root = tmp_path / "images"
    _jpg(root / _coco_name(1))
    outside = _jpg(tmp_path / "secret" / _coco_name(2))  # exists, decodes: must not be read
    names = [
        _coco_name(1),
        f"../secret/{_coco_name(2)}",
        str(outside),
        f"train2014/../../{_coco_name(2)}",
    ]
    ann = tmp_path / "train.json"
    ann.write_text(json.dumps([{"image": n, "caption": "a caption"} for n in names]))
    out = tmp_path / "m.jsonl"
    assert (
        main(["data", "build", "karpathy", str(ann), "--images", str(root), "--out", str(out)]) == 0
    )
    assert [r["image"] for r in read_manifest(out)] == [str(root / _coco_name(1))]
    assert "outside_root 3" in capsys.readouterr().out

    flickr = tmp_path / "flickr"
    _jpg(flickr / "10.jpg")
    secret = _jpg(tmp_path / "20.jpg")
    csv = tmp_path / "results.csv"
    rows_text = ["10.jpg", "../20.jpg", str(secret), "sub/../../20.jpg"]
    lines = ["image_name| comment_number| comment"] + [f"{n}| 0| a dog" for n in rows_text]
    csv.write_text("\n".join(lines) + "\n")
    report = BuildReport()
    rows = list(build_flickr30k_csv(csv, flickr, report=report))
    assert [r["image"] for r in rows] == [str(flickr / "10.jpg")]
    assert report.skipped == {"outside_root": 3}
