"""Data-loading throughput: decode + BLIP train transform, images/s per DataLoader worker.

    python benchmarks/data_loading.py [--out benchmarks/results/data_loading.json]

Runs a ManifestDataset over the bundled photos (dlip/assets/photos, repeated) through
make_loader with 1 and 2 workers at 224 and 384 px (RandomResizedCrop + flip + RandomAugment
+ normalise), and times decode and transform alone in the main process (one thread). Worker
start-up is excluded: the clock starts when the first batch arrives. About 30-60 s on 2
cores; the JSON records the load average, since other jobs on the machine skew the rates.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
from PIL import Image

import dlip
from dlip.data.common import decode_image
from dlip.data.datasets import ManifestDataset
from dlip.data.loader import batch_size_of, make_loader
from dlip.fileio import machine
from dlip.transforms import PRETRAIN_MIN_SCALE, train_transform

PHOTOS = Path(dlip.__file__).parent / "assets" / "photos"
BATCH = 16


def _rows(repeat: int) -> list[dict[str, str]]:
    photos = sorted(PHOTOS.glob("*.jpg"))
    return [
        {"image": str(p), "caption": f"a photo number {k}", "image_id": p.stem}
        for k in range(repeat)
        for p in photos
    ]


def _loader_rate(dataset: ManifestDataset, workers: int) -> float:
    """Images/s after the first batch (so worker start-up is not counted)."""
    loader = make_loader(dataset, batch_size=BATCH, shuffle=True, num_workers=workers, seed=0)
    batches = iter(loader)
    next(batches)
    start, n = time.perf_counter(), 0
    for batch in batches:
        n += batch_size_of(batch)
    return n / (time.perf_counter() - start)


def _main_process_ms(rows: list[dict[str, str]], tf) -> dict[str, float]:
    """Mean ms per image for decode and for the transform, in this process on one thread."""
    decode_s = transform_s = 0.0
    for row in rows:
        t0 = time.perf_counter()
        image = decode_image(row["image"])
        t1 = time.perf_counter()
        tf(image)
        decode_s, transform_s = decode_s + t1 - t0, transform_s + time.perf_counter() - t1
    return {
        "decode_ms": round(1000 * decode_s / len(rows), 3),
        "transform_ms": round(1000 * transform_s / len(rows), 3),
    }


def run(sizes: tuple[int, ...] = (224, 384), workers: tuple[int, ...] = (1, 2)) -> dict:
    host = machine()  # before set_num_threads, so it names the process's default
    torch.set_num_threads(1)  # what each DataLoader worker gets
    load_before = os.getloadavg()[0]
    rows = _rows(repeat=100)  # 300 images per pass
    results, single = [], {}
    for size in sizes:
        config = dlip.get_config("dlip_base").with_image_size(size)
        tf = train_transform(config, min_scale=PRETRAIN_MIN_SCALE)
        single[str(size)] = _main_process_ms(rows[:60], tf)
        dataset = ManifestDataset(rows, tf)
        for n in workers:
            rate = _loader_rate(dataset, n)
            results.append(
                {
                    "image_size": size,
                    "num_workers": n,
                    "images_per_s": round(rate, 1),
                    "images_per_s_per_worker": round(rate / n, 1),
                }
            )
    photos = []
    for p in sorted(PHOTOS.glob("*.jpg")):
        with Image.open(p) as im:
            photos.append({"name": p.name, "width": im.width, "height": im.height})
    return {
        "benchmark": "data_loading",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": host,
        "what": "decode (PIL, JPEG) + train_transform (RandomResizedCrop 0.2-1, flip, "
        "RandomAugment N=2 M=5, normalise) through ManifestDataset + make_loader",
        "photos": photos,
        "images_per_pass": len(rows),
        "batch_size": BATCH,
        # other jobs on the machine skew these numbers: 1-minute load before / after
        "load_average": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        "note": "the photos are at most 384 px, so 384 crops are upsampled; with 2 workers on "
        "a 2-core machine the main process (collate) competes with the workers",
        "results": results,
        "main_process_ms_per_image": single,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="benchmarks/results/data_loading.json")
    args = parser.parse_args()
    result = run()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    for row in result["results"]:
        print(
            f"{row['image_size']:>4}px  workers {row['num_workers']}  "
            f"{row['images_per_s']:7.1f} img/s  ({row['images_per_s_per_worker']:6.1f} per worker)"
        )
    for size, ms in result["main_process_ms_per_image"].items():
        print(
            f"{size:>4}px  one thread: decode {ms['decode_ms']:.2f} ms, "
            f"transform {ms['transform_ms']:.2f} ms"
        )


if __name__ == "__main__":
    main()
