"""benchmarks/gpu_check.sh and benchmarks/gpu_bench.py run end to end on CPU with test_tiny
(GPU_CHECK_SMOKE=1), so the GPU script is not dead code until a GPU is lent. Structure and
positivity only: speed on a shared CPU is not a test property."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"
PARTS = ("train_eager", "itm", "train_compile")  # latency: tests/test_bench_cli.py runs it
TRAIN_KEYS = {
    "seconds_per_step",
    "samples_per_s",
    "step_times_s",
    "flops_per_step",
    "achieved_tflops",
    "mfu",
    "peak_memory_bytes",
}


def test_gpu_check_script_is_valid_bash() -> None:
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)


def _positive(row: dict, keys: set[str]) -> None:
    for key in keys:
        value = row[key]
        assert all(v > 0 for v in value) if isinstance(value, list) else value > 0, (key, row)


def _check_train(record: dict, compiled: bool) -> None:
    assert record["status"] == "complete" and record["compile"] is compiled
    assert record["machine"]["gpu"] == "none"  # the card is named (none here)
    kd, plain = record["configurations"]
    assert (kd["with_teacher"], plain["with_teacher"]) == (True, False)
    for row in (kd, plain):
        _positive(row, TRAIN_KEYS)
        assert len(row["step_times_s"]) == record["timed_steps"] == 1
        assert (row["compiled_blocks"] > 0) is compiled
    assert kd["flops_per_step"] > plain["flops_per_step"]  # the teacher's passes are counted
    assert 0 < kd["teacher_share_direct"] < 1 and "teacher_share_difference" in kd
    assert "teacher_share_direct" not in plain and plain["kd_terms"] == []


@pytest.mark.skipif(shutil.which("timeout") is None, reason="needs coreutils timeout")
def test_gpu_check_smoke_run_writes_every_record(tmp_path, benchmark_script) -> None:
    env = {**os.environ, "GPU_CHECK_SMOKE": "1", "GPU_CHECK_PARTS": " ".join(PARTS)}
    env.update(RESULTS=str(tmp_path), PYTHON=sys.executable, OMP_NUM_THREADS="1")
    run = subprocess.run(["bash", str(SCRIPT)], env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    load = lambda name: json.loads((tmp_path / name).read_text())  # noqa: E731

    summary = load("gpu_check.json")
    assert [(p["part"], p["status"]) for p in summary["parts"]] == [(p, "ok") for p in PARTS]
    _check_train(load("gpu_train_eager.json"), compiled=False)
    _check_train(load("gpu_train_compile.json"), compiled=True)
    (itm,) = load("gpu_itm.json")["rows"]
    assert itm["model"] == "test_tiny" and itm["unique_pairs"] >= 4 * 3
    _positive(itm, {"seconds", "pairs_per_s"})
    assert (tmp_path / "gpu_check.log").read_text().count("== ") >= len(PARTS)

    # The doc's GPU regions render from these records.
    report = benchmark_script("report")
    names = ("gpu_check", "gpu_train_eager", "gpu_train_compile", "gpu_itm")
    doc = "".join(f"<!-- table:{n} -->\nold\n<!-- /table -->\n" for n in names)
    out = report.render(doc, tmp_path)
    assert "old" not in out and "| test_tiny -> test_tiny | 4 |" in out
    assert "| train_compile | ok |" in out and "run.compile (eager)" in out


def test_part_status_reads_exit_codes_and_records(tmp_path, benchmark_script) -> None:
    gpu = benchmark_script("gpu_bench")
    rec = tmp_path / "r.json"
    assert gpu.part_status("skip", rec).startswith("skipped")
    assert gpu.part_status("0", rec) == "failed (no JSON written)"
    assert gpu.part_status("2", rec) == "failed (exit 2)"
    rec.write_text(json.dumps({"status": "timeout", "configurations": [{"name": "a"}]}))
    assert gpu.part_status("124", rec) == "timeout (1 rows written)"
    rec.write_text(json.dumps({"status": "complete", "rows": [{"error": "OOM"}, {}]}))
    assert gpu.part_status("0", rec) == "ok, 1 row(s) failed"


def test_a_time_box_still_writes_the_record(tmp_path, benchmark_script, monkeypatch) -> None:
    gpu = benchmark_script("gpu_bench")

    def killed(args, record, save) -> None:
        record["rows"] = [{"model": "first"}]
        save()
        raise gpu.TimeBox("SIGTERM")

    monkeypatch.setitem(gpu.RUNS, "itm", killed)
    before = signal.getsignal(signal.SIGTERM)
    try:
        assert gpu.main(["itm", "--device", "cpu", "--out", str(tmp_path / "i.json")]) == 124
    finally:
        signal.signal(signal.SIGTERM, before)
    record = json.loads((tmp_path / "i.json").read_text())
    assert record["status"] == "timeout" and record["rows"] == [{"model": "first"}]
    assert record["machine"]["gpu"] == "none"


@pytest.mark.parametrize(
    ("card", "peak"),
    [
        ("NVIDIA H200", 989e12),
        ("NVIDIA H200 NVL", 835e12),
        ("NVIDIA H100 80GB HBM3", 989e12),
        ("NVIDIA H100 PCIe", 756e12),
        ("NVIDIA A100-SXM4-80GB", 312e12),
        ("NVIDIA GeForce RTX 4090", None),
    ],
)
def test_mfu_peak_is_looked_up_by_card_name(card, peak, benchmark_script, monkeypatch) -> None:
    gpu = benchmark_script("gpu_bench")
    monkeypatch.setattr(gpu.torch.cuda, "get_device_name", lambda device=None: card)
    found, source = gpu.peak_bf16(gpu.torch.device("cuda"), None)
    assert found == peak and (source is None) is (peak is None)
    assert gpu.peak_bf16(gpu.torch.device("cpu"), None) == (None, None)
    assert gpu.peak_bf16(gpu.torch.device("cpu"), 1e12) == (1e12, "--peak-flops")
