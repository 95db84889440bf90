"""Inference latency through `dlip.inference.Predictor`: teacher (blip_base) vs student.

    python benchmarks/latency.py [--models blip_base,dlip_small] [--out FILE]
        [--device cpu|cuda|both]

Per model, task (caption = 3-beam search, max_length 20 / min_length 5, BLIP's settings;
embed = image ITC feature) and batch size (1, 32): warm-up calls, then timed calls; p50 / p95
of the wall time per call (nearest-rank percentiles; with few repeats p95 is the max). Inputs
are in-memory uint8 arrays (random noise, 224x224), so decoding/resizing is included but file
I/O is not. Weights are random (preset init) at 224 px: latency depends on shapes, not values,
except caption length -- random weights rarely emit [SEP] early, so captions run to max_length
(the worst case; a trained model stops sooner). Repeat counts are stored per row: the slow
rows (teacher caption at batch 32) run few times to keep the whole CPU run under ~6 minutes.
On CUDA (when present, `--device both` or cuda) the same table runs in bf16 with
torch.cuda.synchronize around each call. The recorded CPU run used OMP_NUM_THREADS=1 on a
2-core machine shared with other jobs (two threads against a busy neighbour ran ~9x slower).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

from dlip.bench import machine
from dlip.inference import Predictor
from dlip.models.presets import create_model

IMAGE_SIZE = 224
BATCHES = (1, 32)
# (warm-up, timed) calls per (task, batch) on CPU; the device's own table on CUDA.
# Batch-32 rows run after the batch-1 rows of the same model, so the process is already warm
# (weights paged in, kernels chosen): they take no extra warm-up call on CPU.
REPEATS_CPU = {
    ("embed", 1): (1, 5),
    ("embed", 32): (0, 2),
    ("caption", 1): (1, 3),
    ("caption", 32): (0, 1),
}
REPEATS_CUDA = {key: (3, 20) for key in REPEATS_CPU}


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (a measured value, no interpolation)."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


def time_calls(fn: Callable[[], object], warmup: int, repeats: int, cuda: bool) -> list[float]:
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(repeats):
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize()
        out.append(time.perf_counter() - t0)
    return out


def bench_model(name: str, device: str) -> list[dict]:
    torch.manual_seed(0)
    dtype = "bfloat16" if device == "cuda" else "float32"
    pred = Predictor(create_model(name, image_size=IMAGE_SIZE), device=device, dtype=dtype)
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8) for _ in range(32)]
    table = REPEATS_CUDA if device == "cuda" else REPEATS_CPU
    rows = []
    for task in ("embed", "caption"):
        for batch in BATCHES:
            warmup, repeats = table[(task, batch)]
            batch_images = images[:batch]
            if task == "embed":
                fn = lambda b=batch_images: pred.embed_images(b, batch_size=32)  # noqa: E731
            else:
                fn = lambda b=batch_images: pred.caption(b, num_beams=3, batch_size=32)  # noqa: E731
            secs = time_calls(fn, warmup, repeats, device == "cuda")
            row = {
                "model": name,
                "device": device,
                "dtype": dtype,
                "task": task,
                "batch": batch,
                "warmup": warmup,
                "repeats": repeats,
                "p50_ms": 1000 * percentile(secs, 50),
                "p95_ms": 1000 * percentile(secs, 95),
                "per_image_ms": 1000 * percentile(secs, 50) / batch,
            }
            print(json.dumps(row), flush=True)
            rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="blip_base,dlip_small")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda", "both"])
    parser.add_argument("--out", default=None, help="default: results/latency_<device>.json")
    args = parser.parse_args()
    devices = ["cpu", "cuda"] if args.device == "both" else [args.device]
    if "cuda" in devices and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device")
    t0 = time.perf_counter()
    rows = [r for d in devices for m in args.models.split(",") for r in bench_model(m, d)]
    tag = "cpu" if devices == ["cpu"] else "cuda" if devices == ["cuda"] else "all"
    out = Path(args.out or f"benchmarks/results/latency_{tag}.json")
    record = {
        "benchmark": "latency",
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"),
        "machine": machine(),
        "image_size": IMAGE_SIZE,
        "weights": "random (preset init)",
        "caption": {"num_beams": 3, "max_length": 20, "min_length": 5},
        "percentiles": "nearest-rank over the timed calls (p95 = max when repeats < 20)",
        "total_seconds": time.perf_counter() - t0,
        "rows": rows,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
