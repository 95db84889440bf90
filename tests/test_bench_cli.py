"""`dlip bench latency` end to end on test_tiny (structure and positivity, not speed)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from dlip.bench.latency import candidate_texts, percentile
from dlip.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")


def test_bench_latency_writes_a_complete_record(tmp_path):
    argv = ["bench", "latency", "--models", "test_tiny,test_tiny", "--teacher", "test_tiny"]
    argv += ["--image-size", "32", "--warmup", "1", "--repeats", "2", "--threads", "1"]
    assert main([*argv, "--out-dir", str(tmp_path)]) == 0
    record = json.loads((tmp_path / "latency_cpu.json").read_text())
    assert record["benchmark"] == "latency" and record["device"] == "cpu"
    assert record["machine"]["torch_threads"] == "1" and record["machine"]["cpu"]
    rows = record["rows"]
    expected = {("image_embed", 1), ("image_embed", 32), ("itm_rerank", 16)}
    expected |= {("itm_rerank", 128), ("caption", 1), ("caption", 8)}
    assert {(r["task"], r["batch"]) for r in rows} == expected
    assert len(rows) == 2 * len(expected)
    for r in rows:
        assert (r["warmup"], r["repeats"], len(r["times_ms"])) == (1, 2, 2)
        assert r["median_ms"] > 0 and r["p95_ms"] >= r["median_ms"] and r["items_per_s"] > 0
        assert r["per_item_ms"] == pytest.approx(r["median_ms"] / r["batch"])
    assert record["total_seconds"] > 0 and record["caption"]["num_beams"] == 3
    # The teacher is not compared with itself; nothing else is in the run.
    assert record["speedup_vs_teacher"] == {}


def test_bench_latency_variants_int8_and_onnx_runtime(tmp_path):
    argv = ["bench", "latency", "--models", "test_tiny", "--teacher", "test_tiny"]
    argv += ["--image-size", "32", "--warmup", "0", "--repeats", "1", "--threads", "1"]
    argv += ["--variants", "fp32,int8,onnx_int8", "--out-dir", str(tmp_path)]
    assert main(argv) == 0
    record = json.loads((tmp_path / "latency_cpu.json").read_text())
    labels = {"test_tiny", "test_tiny+int8", "test_tiny+onnx_int8"}
    assert {r["model"] for r in record["rows"]} == labels and len(record["rows"]) == 18
    assert set(record["speedup_vs_fp32"]) == labels - {"test_tiny"}
    assert all(len(v) == 6 and min(v.values()) > 0 for v in record["speedup_vs_fp32"].values())
    bad = ["bench", "latency", "--models", "test_tiny", "--out-dir", str(tmp_path / "x")]
    assert main([*bad, "--variants", "int4"]) == 2


def test_bench_rejects_bad_arguments(tmp_path, capsys):
    assert main(["bench", "latency", "--models", "nope", "--out-dir", str(tmp_path)]) == 2
    assert "nope" in capsys.readouterr().err
    assert main(["bench", "latency", "--models", "test_tiny", "--repeats", "0"]) == 2
    assert not list(tmp_path.iterdir())


def test_helpers():
    texts = candidate_texts(128)
    assert len(set(texts)) == 128 and all(len(t.split()) == 9 for t in texts)
    with pytest.raises(ValueError, match="k must be"):
        candidate_texts(10**6)
    assert percentile([3.0, 1.0, 2.0], 50) == 2.0 and percentile([1.0, 2.0], 95) == 2.0


def test_bench_help_does_not_import_torch():
    code = (
        "import sys\nfrom dlip.cli import main\ntry:\n    main(['bench', '--help'])\n"
        "except SystemExit:\n    pass\nprint('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "latency" in out.stdout and out.stdout.strip().splitlines()[-1] == "False"
