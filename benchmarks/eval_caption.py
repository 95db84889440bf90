"""Captioning throughput of `dlip eval caption`: teacher (blip_base) vs student (dlip_small).

    python benchmarks/eval_caption.py [--images 8] [--batch-size 8] [--repeats 3] [--warmup 1]
        [--models blip_base,dlip_small] [--threads N] [--out results/eval_caption_cpu.json]

The recorded CPU numbers were taken with `--threads 1`: on a shared 2-core machine, two intra-op
threads wait on each other for every small decoder op (dlip_small generation measured 8x slower
with 2 threads than with 1 under load).

Each model is a random-init preset at 224 px, in eval mode, timed through the code the
evaluation runs: `BLIP.generate` with BLIP's settings (prompt "a picture of ", 3 beams,
max_length 20 and min_length 5 counting the 4 prompt tokens, repetition penalty 1.0) under
torch.inference_mode (bf16 autocast on CUDA). Pixels are random and in memory, so the numbers
exclude image decoding and scoring (pycocoevalcap's Java start-up alone is seconds). Random
weights rarely emit [SEP] early, so most captions run to max_length: the worst case for
decoding cost; generated lengths are reported.

Reported per model: seconds per pass over the images (median of `--repeats` timed passes after
`--warmup` untimed one-image passes), images/s (images / median), the student's speed-up.
Defaults with --threads 1 keep the whole run well under 3 minutes on a 2-core CPU.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

import dlip
from dlip.eval.captioning import PROMPT
from dlip.fileio import machine

IMAGE_SIZE = 224
GENERATION = {
    "prompt": PROMPT,
    "num_beams": 3,
    "max_length": 20,
    "min_length": 5,
    "repetition_penalty": 1.0,
    "beam_scoring": "hf",  # the rule the stored numbers were measured with (docs/benchmarks.md)
}


def caption_all(model: dlip.BLIP, pixels: torch.Tensor, batch_size: int) -> list[str]:
    """Captions for (N, 3, S, S) pixels in batches, as the evaluation generates them."""
    device = pixels.device
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
    out: list[str] = []
    with torch.inference_mode(), autocast:
        for start in range(0, pixels.shape[0], batch_size):
            out += model.generate(pixels[start : start + batch_size], **GENERATION)
    return out


def timed(fn, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def bench_model(name: str, args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    torch.manual_seed(0)
    model = dlip.create_model(name)
    model.set_image_size(IMAGE_SIZE)
    model = model.to(device).eval()
    gen = torch.Generator().manual_seed(1)
    pixels = torch.randn(args.images, 3, IMAGE_SIZE, IMAGE_SIZE, generator=gen).to(device)
    captions: list[str] = []

    def run() -> None:
        captions[:] = caption_all(model, pixels, args.batch_size)

    for _ in range(args.warmup):  # one image: allocator and kernels warm, seconds saved
        caption_all(model, pixels[:1], 1)
    times = [timed(run, device) for _ in range(args.repeats)]
    median = statistics.median(times)
    words = [len(c.split()) for c in captions]
    row = {
        "model": name,
        "params": model.num_params(),
        "seconds_per_pass": median,
        "seconds_all": times,
        "images_per_s": args.images / median,
        "mean_words_per_caption": sum(words) / len(words),
        "example_caption": captions[0],
    }
    print(f"{name:12s} {median:7.2f} s / {args.images} images  {row['images_per_s']:6.2f} img/s")
    return row


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--models", default="blip_base,dlip_small", help="teacher first")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (CPU)")
    p.add_argument("--out", default=None, help="default: results/eval_caption_<device>.json")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    use_cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    device = torch.device("cuda" if use_cuda else "cpu")
    rows = [bench_model(name, args, device) for name in args.models.split(",")]
    teacher = rows[0]
    for row in rows[1:]:
        row["speedup_vs_teacher"] = teacher["seconds_per_pass"] / row["seconds_per_pass"]
        print(f"{row['model']}: {row['speedup_vs_teacher']:.2f}x faster than {teacher['model']}")
    default = Path(__file__).resolve().parent / "results" / f"eval_caption_{device.type}.json"
    out = Path(args.out) if args.out else default
    result = {
        "benchmark": "eval_caption",
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"),
        "machine": machine(),
        "device": device.type,
        "precision": "bf16 autocast" if use_cuda else "fp32",
        "weights": "random init (presets)",
        "image_size": IMAGE_SIZE,
        "images": args.images,
        "batch_size": args.batch_size,
        "generation": GENERATION,
        "warmup_passes": f"{args.warmup} (one image each)",
        "timed_passes": args.repeats,
        "statistic": "median seconds per pass over the images; images/s = images / median",
        "excluded": "image decoding, transforms, scoring (pixels are random, in memory)",
        "models": rows,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
