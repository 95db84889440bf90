"""benchmarks/hf_speed.py runs end to end on a tiny model (no timing assertions: speed on a
shared CPU is not a test property; parity of outputs is)."""

from __future__ import annotations

import pytest

pytest.importorskip("transformers")


def test_hf_speed_runs_on_tiny_model_with_parity(benchmark_script) -> None:
    hf_speed = benchmark_script("hf_speed")
    result = hf_speed.run(
        "test_tiny",
        image_size=32,
        k=4,
        embed_plan={1: (0, 1), 2: (0, 1)},
        itm_plan=(0, 1),
        caption_plan={2: (0, 1)},
    )
    rows = result["rows"]
    assert [(r["task"], r["batch"]) for r in rows] == [
        ("image_embed", 1),
        ("image_embed", 2),
        ("itm_fusion", 4),
        ("itm_rerank", 4),
        ("caption", 2),
    ]
    for row in rows:
        assert row["repeats"] == 1 and len(row["ours_times_ms"]) == 1
        assert row["ours_ms"] > 0 and row["hf_ms"] > 0
        assert row["ratio"] == pytest.approx(row["ours_ms"] / row["hf_ms"])
        if "max_abs_diff" in row:
            assert row["max_abs_diff"] < 1e-4, row
    assert rows[-1]["ids_equal"] is True


def test_time_pair_interleaves_and_counts_warmup_apart(benchmark_script) -> None:
    hf_speed = benchmark_script("hf_speed")
    calls: list[str] = []
    a, b = hf_speed.time_pair(lambda: calls.append("a"), lambda: calls.append("b"), 2, 3)
    assert calls == ["a", "b", "a", "b", "a", "b", "b", "a", "a", "b"]  # order swaps per repeat
    assert len(a["times_ms"]) == len(b["times_ms"]) == 3
    assert a["median_ms"] == sorted(a["times_ms"])[1]
