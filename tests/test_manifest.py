"""Manifest builders on fixtures written in the real formats: Visual Genome, the Karpathy JSONs
of COCO and Flickr30K, the Flickr30K Kaggle CSV; merge, dedupe, the Karpathy leakage guard and
the seed's all.json export. Every count is exact."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from dlip.data.common import read_manifest
from dlip.data.karpathy import (
    coco_id_from_name,
    eval_image_ids,
    eval_image_paths,
    iter_json_array,
    load_eval_set,
    parse_flickr_csv_line,
)
from dlip.data.manifest import (
    BuildReport,
    build_flickr30k_csv,
    build_karpathy,
    build_vg,
    export_json,
    merge_manifests,
    write_rows,
)


def _jpg(path: Path, size: tuple[int, int]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (120, 60, 30)).save(path)
    return path


def _dump(path: Path, obj) -> Path:
    path.write_text(json.dumps(obj), encoding="utf-8")
    return path


def _region(rid: int, image_id: int, phrase: str, x, y, w, h) -> dict:
    return {"region_id": rid, "image_id": image_id, "phrase": phrase, "x": x, "y": y,
            "width": w, "height": h}  # fmt: skip


# ------------------------------------------------------------------------------ Visual Genome


@pytest.fixture
def vg_root(tmp_path) -> Path:
    """Image 1 in VG_100K (200x100), image 2 in VG_100K_2 (50x50), image 3 absent."""
    _jpg(tmp_path / "VG_100K" / "1.jpg", (200, 100))
    _jpg(tmp_path / "VG_100K_2" / "2.jpg", (50, 50))
    regions = [
        {"id": 1, "regions": [
            _region(10, 1, "a man riding a brown horse", 0, 0, 150, 80),  # 60% of the image
            _region(11, 1, "green grass", 0, 50, 200, 50),  # 2 words: too short
            _region(12, 1, "a small red flower", 5, 5, 20, 20),  # 2% of 200x100: too small
            _region(13, 1, "A man riding a brown horse.", 10, 10, 100, 50),  # duplicate, smaller
            _region(14, 1, "   ", 0, 0, 200, 100),  # empty phrase
            _region(15, 1, "sky  above the   field", -50, -20, 300, 60),  # overhangs: 60%
        ]},
        # 20x20 of 50x50 = 16%: kept; the seed's fixed 800x600 would call it 0.08%.
        {"id": 2, "regions": [_region(20, 2, "a white cup on a table", 10, 10, 20, 20)]},
        {"id": 3, "regions": [_region(30, 3, "a dog on a sofa", 0, 0, 10, 10)]},
    ]  # fmt: skip
    _dump(tmp_path / "region_descriptions.json", regions)
    return tmp_path


def test_vg_filter_on_real_sizes_both_folders_and_missing_images(vg_root):
    report = BuildReport()
    rows = list(build_vg(vg_root, report=report))
    assert [(r["image_id"], r["caption"]) for r in rows] == [
        ("vg_1", "a man riding a brown horse"),  # largest region first
        ("vg_1", "sky above the field"),  # spacing normalised; clipped box 200x40 = 40%
        ("vg_2", "a white cup on a table"),
    ]
    assert rows[0]["image"] == str((vg_root / "VG_100K" / "1.jpg").resolve())
    assert rows[2]["image"] == str((vg_root / "VG_100K_2" / "2.jpg").resolve())
    assert {r["source"] for r in rows} == {"vg"}
    assert report.skipped == {"duplicate": 1, "empty_caption": 1, "missing_file": 1}
    assert report.filtered == {"vg_short_phrase": 1, "vg_small_region": 1}


def test_vg_thresholds_are_parameters(vg_root):
    report = BuildReport()
    rows = list(build_vg(vg_root, report=report, min_words=2, min_area_frac=0.0, max_per_image=2))
    assert [r["caption"] for r in rows if r["image_id"] == "vg_1"] == [
        "a man riding a brown horse",
        "green grass",  # 50% beats the overhanging sky box (40%)
    ]
    assert report.filtered == {"vg_per_image_cap": 2}  # sky, flower
    assert report.skipped == {"duplicate": 1, "empty_caption": 1, "missing_file": 1}


def test_vg_image_data_sizes_and_coco_overlap(vg_root):
    # image_data.json (VG 1.4 spelling "image_id") is trusted for sizes: no image is opened.
    _dump(vg_root / "image_data.json", [
        {"image_id": 1, "width": 2000, "height": 1000, "coco_id": None, "url": "..."},
        {"image_id": 2, "width": 50, "height": 50, "coco_id": 391895, "url": "..."},
    ])  # fmt: skip
    report = BuildReport()
    rows = list(build_vg(vg_root, report=report, exclude_image_ids={"coco_391895"}))
    assert rows == []  # at 2000x1000 every region of image 1 is small; image 2 is a test image
    assert report.skipped == {"karpathy_eval": 1, "missing_file": 1, "empty_caption": 1}
    assert report.filtered == {"vg_short_phrase": 1, "vg_small_region": 4}


def test_vg_bad_input_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"region_descriptions\.json not found"):
        list(build_vg(tmp_path, report=BuildReport()))
    _jpg(tmp_path / "VG_100K" / "1.jpg", (10, 10))
    _dump(tmp_path / "region_descriptions.json", [{"id": 1, "regions": [{"phrase": "a b c"}]}])
    report = BuildReport()  # a region without a box: counted, not an error
    assert list(build_vg(tmp_path, report=report)) == []
    assert report.skipped == {"bad_box": 1}
    (tmp_path / "region_descriptions.json").write_text('{"id": 1}')
    with pytest.raises(ValueError, match="expected a JSON list"):
        list(build_vg(tmp_path, report=BuildReport()))


def test_json_array_streaming_matches_json_load(tmp_path):
    items = [{"id": i, "s": "x" * i + ' "quoted" ]}'} for i in range(40)]
    path = _dump(tmp_path / "a.json", items)
    assert list(iter_json_array(path, chunk_chars=7)) == items
    path.write_text(json.dumps(items)[:-30])
    with pytest.raises(ValueError, match="truncated"):
        list(iter_json_array(path, chunk_chars=64))


# ------------------------------------------------------------------------------ Karpathy JSONs


COCO_TEST = [
    {"image": "val2014/COCO_val2014_000000391895.jpg", "caption": [f"bike {i}" for i in "abcde"]},
    {"image": "val2014/COCO_val2014_000000060623.jpg", "caption": [f"girl {i}" for i in "abcde"]},
]  # fmt: skip


@pytest.fixture
def coco(tmp_path) -> dict[str, Path]:
    root = tmp_path / "coco"
    for name in (
        "val2014/COCO_val2014_000000328757.jpg",
        "train2014/COCO_train2014_000000000009.jpg",
        "val2014/COCO_val2014_000000391895.jpg",
        "val2014/COCO_val2014_000000060623.jpg",
    ):
        _jpg(root / name, (8, 8))  # fmt: skip
    train = [
        {"caption": "A dog on a couch.", "image": "val2014/COCO_val2014_000000328757.jpg",
         "image_id": "coco_328757"},
        {"caption": "A bowl of food.", "image": "train2014/COCO_train2014_000000000009.jpg",
         "image_id": "coco_9"},
        {"caption": " \n", "image": "train2014/COCO_train2014_000000000009.jpg",
         "image_id": "coco_9"},
        {"caption": "gone", "image": "train2014/COCO_train2014_000000000025.jpg",
         "image_id": "coco_25"},
    ]  # fmt: skip
    return {
        "root": root,
        "train": _dump(tmp_path / "coco_karpathy_train.json", train),
        "test": _dump(tmp_path / "coco_karpathy_test.json", COCO_TEST),
    }


def test_karpathy_coco_train_and_test(coco):
    report = BuildReport()
    rows = list(build_karpathy(coco["train"], coco["root"], report=report))
    assert [(r["image_id"], r["caption"]) for r in rows] == [
        ("coco_328757", "A dog on a couch."),
        ("coco_9", "A bowl of food."),
    ]
    assert rows[0]["image"] == str(coco["root"] / "val2014/COCO_val2014_000000328757.jpg")
    assert report.skipped == {"empty_caption": 1, "missing_file": 1}

    report = BuildReport()
    rows = list(build_karpathy(coco["test"], coco["root"], report=report))
    assert len(rows) == 10 and report.skipped == {}
    assert [r["image_id"] for r in rows] == ["coco_391895"] * 5 + ["coco_60623"] * 5
    assert {r["source"] for r in rows} == {"coco"}


def test_karpathy_flickr_splits_and_eval_set(tmp_path):
    root = tmp_path / "flickr"
    for stem in ("1000092795", "1007129816", "1009434119"):
        _jpg(root / "flickr30k-images" / f"{stem}.jpg", (8, 8))
    train = [
        {"image": "flickr30k-images/1000092795.jpg", "caption": "Two young guys.", "image_id": 0}
    ]
    test = [
        {"image": "flickr30k-images/1007129816.jpg", "caption": [f"man {i}" for i in range(5)]},
        {"image": "flickr30k-images/1009434119.jpg", "caption": [f"dog {i}" for i in range(4)]},
    ]  # fmt: skip
    report = BuildReport()
    rows = list(build_karpathy(_dump(tmp_path / "f_train.json", train), root, report=report))
    assert [(r["image_id"], r["source"]) for r in rows] == [("flickr30k_1000092795", "flickr30k")]

    ev = load_eval_set(_dump(tmp_path / "flickr30k_test.json", test), root)
    assert ev.image_ids == ["flickr30k_1007129816", "flickr30k_1009434119"]
    assert ev.images == [str(root / e["image"]) for e in test]
    assert ev.captions == [f"man {i}" for i in range(5)] + [f"dog {i}" for i in range(4)]
    assert ev.txt2img == [0] * 5 + [1] * 4
    assert ev.img2txt == [[0, 1, 2, 3, 4], [5, 6, 7, 8]]
    assert eval_image_paths(tmp_path / "flickr30k_test.json", root) == ev.images
    assert eval_image_ids([tmp_path / "flickr30k_test.json"]) == set(ev.image_ids)


def test_eval_set_refuses_train_files_missing_images_and_bad_entries(coco, tmp_path):
    with pytest.raises(ValueError, match="a train split"):
        load_eval_set(coco["train"], coco["root"])
    with pytest.raises(ValueError, match="a train split"):
        eval_image_ids([coco["train"]])
    with pytest.raises(FileNotFoundError, match="1 of 2 images missing"):
        (coco["root"] / COCO_TEST[1]["image"]).unlink()
        load_eval_set(coco["test"], coco["root"])
    bad = _dump(tmp_path / "bad.json", [{"image": "a.jpg"}])
    with pytest.raises(ValueError, match=r"bad.json: entry 0 lacks 'image' or 'caption'"):
        list(build_karpathy(bad, tmp_path, report=BuildReport()))
    odd = _dump(tmp_path / "odd.json", [{"image": "val2014/x.jpg", "caption": "c"}])
    with pytest.raises(ValueError, match=r"odd.json: entry 0: not a COCO image"):
        list(build_karpathy(odd, tmp_path, report=BuildReport(), dataset="coco"))


def test_coco_ids_from_names_paths_and_urls():
    assert coco_id_from_name("val2014/COCO_val2014_000000328757.jpg") == 328757
    assert coco_id_from_name("/data/coco/train2017/000000328757.jpg") == 328757
    assert coco_id_from_name("http://images.cocodataset.org/val2017/000000000139.jpg") == 139
    assert coco_id_from_name("/data/cc3m/00000/000000015.jpg") is None  # img2dataset key
    assert coco_id_from_name("/photos/000000328757.jpg") is None  # no COCO folder


# ------------------------------------------------------------------------------ Kaggle CSV

CSV_LINES = [
    "image_name| comment_number| comment",  # the real header, leading spaces included
    "1000092795.jpg| 0| Two young guys with shaggy hair look at their hands .",
    "1000092795.jpg| 1| Two young , White males are outside near many bushes .",
    "1000092795.jpg| 2|   ",
    "2199200615.jpg| 4   A dog runs across the grass .",  # the real malformed row
    "this line has no pipes at all",
    "1000092795.jpg| x| the comment number is not a number",
    "3333333.jpg| 0| an image that is not on disk",
]


def test_flickr_csv_recovers_the_malformed_row_and_counts_the_rest(tmp_path):
    inner = tmp_path / "flickr30k_images" / "flickr30k_images"
    _jpg(inner / "1000092795.jpg", (8, 8))
    _jpg(inner / "2199200615.jpg", (8, 8))
    csv = tmp_path / "flickr30k_images" / "results.csv"
    csv.write_bytes("\n".join(CSV_LINES).encode() + b"\n1000092795.jpg| 3| caf\xe9 latin-1\n")
    report = BuildReport()
    rows = list(build_flickr30k_csv(csv, tmp_path / "flickr30k_images", report=report))
    assert [(r["image_id"], r["caption"]) for r in rows] == [
        ("flickr30k_1000092795", "Two young guys with shaggy hair look at their hands ."),
        ("flickr30k_1000092795", "Two young , White males are outside near many bushes ."),
        ("flickr30k_2199200615", "A dog runs across the grass ."),
    ]  # fmt: skip
    assert rows[0]["image"] == str(inner / "1000092795.jpg")  # found in the nested folder
    assert report.skipped == {
        "empty_caption": 1,
        "malformed_row": 2,
        "missing_file": 1,
        "bad_text": 1,
    }
    csv.write_text("name,comment\n")
    with pytest.raises(ValueError, match="header"):
        list(build_flickr30k_csv(csv, inner, report=BuildReport()))


def test_parse_flickr_csv_line():
    assert parse_flickr_csv_line("1.jpg| 0| A b .\n") == ("1.jpg", 0, "A b .")
    assert parse_flickr_csv_line("2199200615.jpg| 4   A dog runs .") == (
        "2199200615.jpg",
        4,
        "A dog runs .",
    )
    assert parse_flickr_csv_line("1.jpg| 2| a | b") == ("1.jpg", 2, "a | b")  # pipes in text
    assert parse_flickr_csv_line("1.jpg| 4") is None
    assert parse_flickr_csv_line("x.jpg| 0| text") is None


# ------------------------------------------------------------------------------ merge / export


def _manifest(path: Path, rows: list[tuple[str, str, str, str]]) -> Path:
    report = BuildReport()
    keys = ("image", "caption", "source", "image_id")
    write_rows((dict(zip(keys, r, strict=True)) for r in rows), path, report)
    return path


def test_merge_dedupes_and_drops_karpathy_eval_images(coco, tmp_path):
    # Karpathy train rows, plus the test split itself (as if merged by mistake).
    report = BuildReport()
    a = tmp_path / "coco.jsonl"
    write_rows(build_karpathy(coco["train"], coco["root"], report=report), a, report)
    t = tmp_path / "test.jsonl"
    write_rows(build_karpathy(coco["test"], coco["root"], report=report), t, report)
    # COCO 2017 files from another source (ids only in the paths), VG and a repeated caption.
    b = _manifest(tmp_path / "other.jsonl", [
        ("/d/coco/train2017/000000391895.jpg", "a cyclist", "mscoco", "mscoco_000000001"),
        ("/d/coco/train2017/000000000009.jpg", "food", "mscoco", "mscoco_000000002"),
        ("/d/vg/VG_100K/1.jpg", "a man riding a horse", "vg", "vg_1"),
        ("/d/vg/VG_100K/1.jpg", "A man  riding a HORSE", "vg", "vg_1"),  # duplicate
        ("/d/vg/VG_100K/2.jpg", "a man riding a horse", "vg", "vg_2"),  # other image: kept
        (str(coco["root"] / "val2014/COCO_val2014_000000328757.jpg"), "A dog on a couch.",
         "coco", "coco_328757"),  # duplicate of a Karpathy train row
    ])  # fmt: skip
    merged = BuildReport()
    out = tmp_path / "all.jsonl"
    rows = merge_manifests([a, t, b], report=merged, exclude_karpathy=[coco["test"]])
    assert write_rows(rows, out, merged) == 5
    # 10 test-split rows + the train2017 copy of test image 391895; first occurrence wins.
    assert merged.skipped == {"karpathy_eval": 11, "duplicate": 2}
    assert merged.kept == {"coco": 2, "mscoco": 1, "vg": 2}
    ids = [r["image_id"] for r in read_manifest(out)]
    # Public COCO ids kept; the others become the file's own (`file_image_id`: stem@digest).
    assert ids[:2] == ["coco_328757", "coco_9"]
    assert [i.split("@")[0] for i in ids[2:]] == ["000000000009", "1", "2"]
    assert merged.summary().splitlines() == [
        "kept 5 (coco 2, mscoco 1, vg 2)",
        "skipped 13 (duplicate 2, karpathy_eval 11)",
    ]
    assert json.loads(json.dumps(merged.as_dict())) == {
        "kept": {"coco": 2, "mscoco": 1, "vg": 2},
        "skipped": {"karpathy_eval": 11, "duplicate": 2},
        "filtered": {},
        "notes": [],
    }

    nodedupe = BuildReport()
    assert len(list(merge_manifests([a, t, b], report=nodedupe, dedupe=False))) == 18


def test_export_json_is_the_seeds_all_json(tmp_path):
    a = _manifest(tmp_path / "a.jsonl", [
        ("/data/x/1.jpg", "first caption", "cc3m", "cc3m_000000001"),
        ("/data/x/1.jpg", "second caption", "cc3m", "cc3m_000000001"),
    ])  # fmt: skip
    b = _manifest(tmp_path / "b.jsonl", [("/data/vg/7.jpg", "a red bus", "vg", "vg_7")])
    out = tmp_path / "out" / "all.json"
    assert export_json([a, b], out) == 3
    entries = json.loads(out.read_text())
    assert entries == [
        {"caption": "first caption", "image_root": "/data/x/1.jpg", "id": 0},
        {"caption": "second caption", "image_root": "/data/x/1.jpg", "id": 1},
        {"caption": "a red bus", "image_root": "/data/vg/7.jpg", "id": 2},
    ]
    url = _manifest(tmp_path / "u.jsonl", [("http://h/1.jpg", "c", "web", "web_1")])
    with pytest.raises(ValueError, match="has a URL"):
        export_json([url], tmp_path / "u.json")
    assert not (tmp_path / "u.json").exists()
