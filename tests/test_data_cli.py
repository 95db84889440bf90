"""`dlip data ...` end to end on the synthetic set: synth -> build -> merge -> export / shard."""

from __future__ import annotations

import json

from dlip.cli import main
from dlip.data.common import read_manifest


def test_data_commands_chain(tmp_path, capsys):
    synth = tmp_path / "synth"
    assert main(["data", "synth", "--out", str(synth), "--n", "30", "--image-size", "32"]) == 0
    assert "synth: train" in capsys.readouterr().out

    test_rows = tmp_path / "test.jsonl"
    args = ["data", "build", "karpathy", str(synth / "test.json"), "--images", str(synth)]
    assert main([*args, "--out", str(test_rows)]) == 0
    out = capsys.readouterr().out
    n_test = len(json.loads((synth / "test.json").read_text())) * 5
    assert f"wrote {n_test} rows" in out and f"kept {n_test} (karpathy {n_test})" in out

    train = synth / "manifest.jsonl"
    n_train = sum(1 for _ in read_manifest(train))
    merged = tmp_path / "all.jsonl"
    merge = ["data", "merge", str(train), str(test_rows), str(train), "--out", str(merged)]
    assert main(merge) == 0
    out = capsys.readouterr().out
    assert f"wrote {n_train + n_test} rows" in out and f"duplicate {n_train}" in out

    all_json = tmp_path / "all.json"
    assert main(["data", "export-json", str(merged), "--out", str(all_json)]) == 0
    entries = json.loads(all_json.read_text())
    assert len(entries) == n_train + n_test
    assert sorted(e["id"] for e in entries) == list(range(len(entries)))
    assert set(entries[0]) == {"caption", "image_root", "id"}

    shards = tmp_path / "shards"
    shard = ["data", "shard", str(merged), "--out", str(shards), "--shard-size", "50"]
    assert main(shard) == 0
    assert f"{n_train + n_test} samples" in capsys.readouterr().out
    assert (shards / "index.json").is_file()


def test_data_build_errors_are_clear(tmp_path, capsys):
    missing = tmp_path / "none.json"
    args = ["data", "build", "karpathy", str(missing), "--images", str(tmp_path)]
    assert main([*args, "--out", str(tmp_path / "m.jsonl")]) == 2
    assert str(missing) in capsys.readouterr().err
