"""VQA latency, teacher vs students, one question at a time (CPU).

    python benchmarks/vqa_latency.py [--threads 1] [--repeats 3]
        [--out benchmarks/results/vqa_latency_cpu.json]

The VQA presets (`blip_base_vqa`, `dlip_base_vqa`, `dlip_small_vqa`, `dlip_tiny_vqa`) with
random weights (speed depends on shapes) at their 480 px, answering one (image, question):
- `rank`: BLIP's default VQAv2 inference, `BLIP.answer` over a 3,128-answer list (BLIP's
  answer_list.json size; synthetic 1-3 word answers here), k_test 128: the first-token pass,
  then 128 answers re-scored whole.
- `generate`: 3 beams from [DEC] with min_length = max_length = 10, so every model decodes
  the same number of steps (random weights would stop anywhere).
Both include the ViT at 480 px and the question encoder; not image decoding. Calls are
interleaved across models (order reversed every repeat) after one warm-up call each; medians
and every time are kept, with speed-ups vs blip_base_vqa from this one run.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import time
import warnings
from datetime import datetime, timezone
from pathlib import Path

import torch

import dlip
from dlip.fileio import machine

MODELS = ("blip_base_vqa", "dlip_base_vqa", "dlip_small_vqa", "dlip_tiny_vqa")
QUESTION = "what is the man on the left holding in his hand?"
ANSWER_LIST_SIZE = 3128  # BLIP's answer_list.json
WORDS = ("red", "blue", "two", "dog", "table", "left", "yes", "wooden", "tennis", "pizza",
         "sitting", "white", "kitchen", "man", "frisbee", "three", "bus", "green", "cat",
         "surfing", "phone", "umbrella", "black", "water", "food", "snow", "hat", "skateboard",
         "horse", "sign", "clock", "bench", "street", "train", "glasses", "orange", "none",
         "sheep", "kite", "bananas")  # fmt: skip


def answer_list(n: int = ANSWER_LIST_SIZE) -> list[str]:
    """n distinct answers of 1-3 words (BLIP's list: mostly 1-2 words)."""
    out = list(WORDS)
    for a, b in itertools.permutations(WORDS, 2):
        out.append(f"{a} {b}")
    for a, b, c in itertools.permutations(WORDS, 3):
        if len(out) >= n:
            break
        out.append(f"{a} {b} {c}")
    return out[:n]


def calls(model: dlip.BLIP, answers: list[str]) -> dict:
    size = model.config.vision.image_size
    pixels = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(0))

    def rank() -> list[str]:
        return model.answer(pixels, [QUESTION], answers, k_test=128)

    def generate() -> list[str]:
        return model.answer(pixels, [QUESTION], None, num_beams=3, max_length=10, min_length=10)

    return {"rank": rank, "generate": generate}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default="benchmarks/results/vqa_latency_cpu.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    answers = answer_list()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        models = {name: dlip.create_model(name).eval() for name in MODELS}
    fns = {name: calls(m, answers) for name, m in models.items()}
    times: dict[str, dict[str, list[float]]] = {n: {"rank": [], "generate": []} for n in MODELS}
    with torch.inference_mode():
        for row in ("rank", "generate"):
            for name in MODELS:
                fns[name][row]()  # warm-up
            for r in range(args.repeats):
                for name in MODELS if r % 2 == 0 else MODELS[::-1]:
                    t0 = time.perf_counter()
                    fns[name][row]()
                    times[name][row].append(time.perf_counter() - t0)
    median = {n: {row: statistics.median(v) * 1000 for row, v in rows.items()}
              for n, rows in times.items()}  # fmt: skip
    record = {
        "benchmark": "vqa_latency",
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"),
        "machine": machine(),
        "threads": args.threads,
        "repeats": args.repeats,
        "answer_list": len(answers),
        "k_test": 128,
        "question": QUESTION,
        "models": {
            n: {
                "params": models[n].num_params(),
                "image_size": models[n].config.vision.image_size,
                "median_ms": {row: round(v, 1) for row, v in median[n].items()},
                "speedup_vs_blip_base_vqa": {
                    row: round(median[MODELS[0]][row] / v, 2) for row, v in median[n].items()
                },
                "times_s": {row: [round(t, 4) for t in v] for row, v in times[n].items()},
            }
            for n in MODELS
        },
        "seconds": round(time.perf_counter() - start, 1),
    }
    Path(args.out).write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps({n: r["median_ms"] for n, r in record["models"].items()}, indent=1))


if __name__ == "__main__":
    main()
