"""Peak memory of `dlip serve` when many clients ask for the thumbnail of one huge index image.

    python benchmarks/thumbnail_memory.py [--megapixels 62] [--clients 24]
        [--out benchmarks/results/thumbnail_memory.json]

Builds (in a temporary folder) a test_tiny model, an index of three small images and one
noise PNG of `--megapixels` (PNG has no reduced-scale decode, so each decode holds the full
pixels), starts `dlip serve --index` as a subprocess, sends `--clients` parallel
`GET /api/image/<i>` for the big image and reads the server's peak resident memory (VmHWM,
Linux /proc) before and after. Several minutes on 2 cores (building the index decodes the big
image once too).
"""

from __future__ import annotations

import argparse
import json
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path

import httpx
import numpy as np
import torch
from PIL import Image

import dlip
from dlip.fileio import machine


def _make_world(root: Path, megapixels: float) -> tuple[Path, Path]:
    """(model dir, index dir): a test_tiny model and an index holding one huge PNG."""
    images = root / "images"
    images.mkdir()
    side = int((megapixels * 1e6) ** 0.5)
    noise = np.random.default_rng(0).integers(0, 255, (side // 10, side // 10, 3), dtype=np.uint8)
    Image.fromarray(noise).resize((side, side)).save(images / "big.png")
    for color in ("red", "blue", "green"):
        Image.new("RGB", (64, 64), color).save(images / f"{color}.png")
    torch.manual_seed(0)
    model = dlip.save(dlip.create_model("test_tiny"), root / "model")
    cmd = [sys.executable, "-m", "dlip", "index", "build", str(images), "--model", str(model)]
    subprocess.run([*cmd, "--out", str(root / "index"), "--no-progress"], check=True)
    return model, root / "index"


def _status_gb(pid: int, field: str) -> float:
    """A memory field of /proc/<pid>/status (kB) in GB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1e6
    raise KeyError(field)


def _serve(model: Path, index: Path) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "dlip", "serve", "--model", str(model), "--index", str(index)]
    proc = subprocess.Popen([*cmd, "--port", str(port), "--log-level", "warning"])
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            if httpx.get(url + "/api/info", timeout=2).status_code == 200:
                return proc, url
        except httpx.TransportError:
            time.sleep(0.5)
    proc.kill()
    raise RuntimeError("dlip serve did not start in 5 minutes")


def measure(megapixels: float, clients: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        model, index = _make_world(Path(tmp), megapixels)
        paths = json.loads((index / "index.json").read_text())["paths"]
        big = next(i for i, p in enumerate(paths) if p.endswith("big.png"))
        proc, url = _serve(model, index)
        try:
            before = _status_gb(proc.pid, "VmHWM")
            start = time.perf_counter()
            with ThreadPoolExecutor(clients) as pool:
                codes = list(
                    pool.map(
                        lambda _: httpx.get(f"{url}/api/image/{big}", timeout=600), range(clients)
                    )
                )
            seconds = time.perf_counter() - start
            after = _status_gb(proc.pid, "VmHWM")
        finally:
            proc.terminate()
            proc.wait(30)
    return {
        "megapixels": megapixels, "clients": clients,
        "statuses": sorted({r.status_code for r in codes}),
        "peak_rss_gb_before": round(before, 3), "peak_rss_gb_after": round(after, 3),
        "seconds_all_answered": round(seconds, 2),
    }  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--megapixels", type=float, default=62.0)
    ap.add_argument("--clients", type=int, default=24)
    ap.add_argument("--out", default="benchmarks/results/thumbnail_memory.json")
    args = ap.parse_args()
    record = {
        "benchmark": "thumbnail_memory", "machine": machine(),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        **measure(args.megapixels, args.clients),
    }  # fmt: skip
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
