"""Bad rows at web scale: merge / export-json count a broken manifest row by reason and write
the rest, and a corrupt per-sample .json in an img2dataset tar is counted, naming tar and key."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from dlip.cli import main
from dlip.data.common import file_image_id, read_manifest
from dlip.data.manifest import BuildReport, build_img2dataset, export_json, merge_manifests


def _line(image: object, caption: object, n: int) -> bytes:
    row = {"image": image, "caption": caption, "source": "web", "image_id": f"web_{n}"}
    return json.dumps(row).encode() + b"\n"


def _bad_manifest(path: Path) -> Path:
    """Two good rows around every kind of bad one; the invalid UTF-8 byte is written raw."""
    lines = [
        b"\xef\xbb\xbf" + _line("/d/0.jpg", "a good caption", 0),  # BOM: must still parse
        b'{"image": "/d/1.jpg", "caption": "caf\xe9", "source": "web", "image_id": "web_1"}\n',
        _line("/d/2.jpg", None, 2),
        _line("/d/3.jpg", 5, 3),
        _line("/d/4.jpg", [], 4),
        _line(None, "no image", 5),
        _line(7, "image not a string", 6),
        _line("/d/7.jpg", "", 7),
        _line("/d/8.jpg", " \t ", 8),
        b"{not json\n",
        b"null\n",
        b"5\n",
        b'["a", "list"]\n',
        b'{"image": "/d/13.jpg"}\n',  # keys missing
        _line("/d/14.jpg", "another good caption", 14),
    ]
    path.write_bytes(b"".join(lines))
    return path


BAD_COUNTS = {"bad_text": 4, "malformed_row": 7, "empty_caption": 2}


def _no_tmp(folder: Path) -> None:
    assert not [p.name for p in folder.rglob("*.tmp")]


def test_merge_cli_counts_bad_rows_and_writes_the_rest(tmp_path, capsys):
    src = _bad_manifest(tmp_path / "bad.jsonl")
    out = tmp_path / "all.jsonl"
    assert main(["data", "merge", str(src), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    kept = list(read_manifest(out))
    assert [r["image_id"] for r in kept] == [file_image_id(r) for r in kept]  # ids name files
    assert [r["image_id"].split("@")[0] for r in kept] == [Path(r["image"]).stem for r in kept]
    assert len({r["image_id"] for r in kept}) == 2
    assert "wrote 2 rows" in printed
    assert "skipped 13 (bad_text 4, empty_caption 2, malformed_row 7)" in printed
    assert f"{src}:10:" in printed  # the unparseable line is named
    _no_tmp(tmp_path)

    report = BuildReport()  # the two dedupe passes count each bad row once
    assert len(list(merge_manifests([src, src], report=report))) == 2
    assert report.skipped == {**{k: 2 * v for k, v in BAD_COUNTS.items()}, "duplicate": 2}


def test_export_json_cli_counts_bad_rows_and_writes_the_rest(tmp_path, capsys):
    src = _bad_manifest(tmp_path / "bad.jsonl")
    out = tmp_path / "all.json"
    assert main(["data", "export-json", str(src), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert [e["image_root"] for e in json.loads(out.read_text())] == ["/d/0.jpg", "/d/14.jpg"]
    assert "wrote 2 entries" in printed
    assert "skipped 13 (bad_text 4, empty_caption 2, malformed_row 7)" in printed
    _no_tmp(tmp_path)

    report = BuildReport()
    assert export_json([src], tmp_path / "again.json", report=report) == 2
    assert report.skipped == BAD_COUNTS


@pytest.mark.parametrize("first", [b"{not json\n", b"[]\n", b'{"image": "/d/0.jpg"}\n'])
def test_a_broken_first_line_is_an_error_naming_file_and_line(tmp_path, capsys, first):
    src = tmp_path / "m.jsonl"
    src.write_bytes(first + _line("/d/1.jpg", "fine", 1))
    with pytest.raises(ValueError, match=f"{src}:1:"):
        list(merge_manifests([src], report=BuildReport()))
    assert main(["data", "merge", str(src), "--out", str(tmp_path / "o.jsonl")]) == 2
    assert f"{src}:1:" in capsys.readouterr().err
    with pytest.raises(ValueError, match=f"{src}:1:"):
        export_json([src], tmp_path / "o.json")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.jsonl"]  # nothing, no .tmp


def test_read_manifest_accepts_a_bom_and_names_a_non_object_line(tmp_path):
    src = tmp_path / "m.jsonl"
    src.write_bytes(b"\xef\xbb\xbf" + _line("/d/0.jpg", "ok", 0) + b"null\n")
    rows = read_manifest(src)
    assert next(rows)["image_id"] == "web_0"
    with pytest.raises(ValueError, match=f"{src}:2:"):
        next(rows)


def _jpeg() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 30, 30)).save(buf, format="JPEG")
    return buf.getvalue()


def _webdataset_output(folder: Path, corrupt: dict[str, bytes]) -> Path:
    """img2dataset's webdataset output for 4 samples, with some KEY.json members replaced."""
    folder.mkdir()
    keys = [f"00000000{i}" for i in range(4)]
    with tarfile.open(folder / "00000.tar", "w") as tar:
        for key in keys:
            meta = {"key": key, "status": "success", "url": f"http://h/{key}.jpg"}
            members = {"jpg": _jpeg(), "txt": f"caption {key}".encode()}
            members["json"] = corrupt.get(key, json.dumps({**meta, "caption": "x"}).encode())
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    table = {"key": keys, "status": ["success"] * 4, "caption": [f"caption {k}" for k in keys]}
    pq.write_table(pa.table({**table, "url": [f"http://h/{k}.jpg" for k in keys]}),
                   folder / "00000.parquet")  # fmt: skip
    (folder / "00000_stats.json").write_text(json.dumps({"count": 4, "successes": 4}))
    return folder


def test_a_corrupt_json_member_in_an_img2dataset_tar_is_counted(tmp_path, capsys):
    corrupt = {"000000001": b'{"key": "000000001", "stat', "000000002": b"[1, 2]"}
    folder = _webdataset_output(tmp_path / "cc", corrupt)
    report = BuildReport()
    rows = list(build_img2dataset(folder, report=report, extract_to=tmp_path / "img"))
    assert [r["image_id"] for r in rows] == ["cc_000000000", "cc_000000003"]
    assert report.skipped == {"malformed_row": 2}
    tar = folder / "00000.tar"
    assert [n for n in report.notes if str(tar) in n and "000000001" in n]
    assert [n for n in report.notes if str(tar) in n and "000000002" in n]

    out = tmp_path / "m.jsonl"
    assert main(["data", "build", "img2dataset", str(folder), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "wrote 2 rows" in printed and "malformed_row 2" in printed
    assert f"{tar}: sample 000000001" in printed


def test_a_corrupt_json_file_in_img2dataset_files_output_is_counted(tmp_path):
    # files output whose parquet is gone: the per-sample .json files are all there is
    shard = tmp_path / "cc" / "00000"
    shard.mkdir(parents=True)
    for key in ("000000000", "000000001"):
        (shard / f"{key}.jpg").write_bytes(_jpeg())
        meta = {"key": key, "status": "success", "caption": f"caption {key}", "url": ""}
        (shard / f"{key}.json").write_text(json.dumps(meta))
    (shard / "000000001.json").write_bytes(b'{"key": "000000001", "sta')
    report = BuildReport()
    rows = list(build_img2dataset(tmp_path / "cc", report=report))
    assert [r["image_id"] for r in rows] == ["cc_000000000"]
    assert report.skipped == {"malformed_row": 1}
    assert [n for n in report.notes if str(shard / "000000001.json") in n]
