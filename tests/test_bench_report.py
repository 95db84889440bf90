"""benchmarks/report.py: marked table regions are re-rendered from JSON, prose is untouched."""

from __future__ import annotations

import json

import pytest

MACHINE = {
    "platform": "Linux-test",
    "cpu": "Test CPU 9000",
    "cpu_count": "4",
    "torch_threads": "1",
    "gpu": "none",
    "python": "3.11.0",
    "torch": "2.0",
    "dlip": "0.1.0",
}
KD = {
    "benchmark": "kd_experiment",
    "date": "2026-01-02 03:04:05 UTC",
    "machine": MACHINE,
    **{
        key: {"loss_itc": 1.5 + i, "loss_itm": 0.6, "loss_lm": 2.25, "params": 1_000_000 * (i + 1)}
        for i, key in enumerate(["teacher", "student_kd", "student_nokd"])
    },
}
PROSE_TOP = "# Title\n\nHand-written prose, *kept* as is.\n\n"
PROSE_END = "\nMore prose after the table: 1.234 stays.\n"


def _doc(name: str, body: str = "| old | table |\n") -> str:
    return f"{PROSE_TOP}<!-- table:{name} -->\n{body}<!-- /table -->\n{PROSE_END}"


def test_region_is_rendered_from_json_and_prose_kept(tmp_path, benchmark_script):
    report = benchmark_script("report")
    (tmp_path / "kd_experiment.json").write_text(json.dumps(KD))
    doc = tmp_path / "bench.md"
    doc.write_text(_doc("kd_experiment"))
    assert report.main(["--doc", str(doc), "--results", str(tmp_path), "--check"]) == 1
    assert report.main(["--doc", str(doc), "--results", str(tmp_path)]) == 0
    out = doc.read_text()
    assert out.startswith(PROSE_TOP) and out.endswith(PROSE_END)
    assert "| old | table |" not in out
    assert "Test CPU 9000, 4 cores, torch threads 1, no GPU" in out  # the JSON's machine
    assert "2026-01-02 03:04:05 UTC" in out
    assert "| student with KD | 2.0M | 2.500 | 0.600 | 2.250 |" in out
    # Rendering is idempotent: a second pass changes nothing and --check agrees.
    assert report.render(out, tmp_path) == out
    assert report.main(["--doc", str(doc), "--results", str(tmp_path), "--check"]) == 0


def test_missing_json_keeps_region_and_unknown_region_fails(tmp_path, benchmark_script):
    report = benchmark_script("report")
    messages: list[str] = []
    doc = _doc("hf_speed")
    assert report.render(doc, tmp_path, log=messages.append) == doc
    assert messages and "hf_speed_cpu.json" in messages[0]
    with pytest.raises(ValueError, match="no_such_table"):
        report.render(_doc("no_such_table"), tmp_path)
