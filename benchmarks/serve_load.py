"""`dlip serve` under load: N concurrent caption clients on loopback, one request at a time each,
against the server with micro-batching off (`--max-batch 1`, requests one by one as before) and
on (`--max-batch 8`), same model and machine, in one run.

    python benchmarks/serve_load.py [--model dlip_small] [--clients 32] [--requests 2]
        [--threads 1,2] [--out benchmarks/results/serve_load_cpu.json]

Each client sends `--requests` captions of its own synthetic photo-sized image (no two clients
the same) and waits for each answer; the run is bounded by --timeout-s. Reported per setting:
requests/s over the whole run, p50 / p95 latency, the batch sizes the server formed, and whether
every answer equals the caption of the same image sent alone to the same server.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent


def image(seed: int, size: int = 320) -> bytes:
    """A smooth random image (JPEG), different per seed."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
    big = Image.fromarray(small).resize((size, size), Image.BICUBIC)
    buf = io.BytesIO()
    big.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


class Server:
    def __init__(self, model: str, max_batch: int, threads: int, log: Path) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.url = f"http://127.0.0.1:{s.getsockname()[1]}"
        port = self.url.rsplit(":", 1)[1]
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "CUDA_VISIBLE_DEVICES": ""}
        cmd = [sys.executable, "-m", "dlip", "serve", "--model", model, "--port", port]
        cmd += ["--device", "cpu", "--max-batch", str(max_batch), "--log-level", "warning"]
        self.proc = subprocess.Popen(cmd, env=env, stdout=log.open("wb"), stderr=subprocess.STDOUT)

    def wait(self, timeout: float = 300) -> None:
        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited {self.proc.returncode}")
            try:
                if httpx.get(self.url + "/api/info", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                time.sleep(0.3)
        raise RuntimeError("server did not start")

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(30)


def caption(url: str, data: bytes, timeout: float) -> tuple[str, float]:
    import httpx

    start = time.perf_counter()
    r = httpx.post(url + "/api/caption", files={"image": ("x.jpg", data, "image/jpeg")},
                   timeout=timeout)  # fmt: skip
    r.raise_for_status()
    return r.json()["caption"], time.perf_counter() - start


def load(server: Server, images: list[bytes], requests: int, timeout: float) -> dict:
    """Every client sends its image `requests` times, one at a time; all clients at once."""
    import httpx

    def client(data: bytes) -> list[tuple[str, float]]:
        return [caption(server.url, data, timeout) for _ in range(requests)]

    start = time.perf_counter()
    with ThreadPoolExecutor(len(images)) as pool:
        answers = list(pool.map(client, images))
    wall = time.perf_counter() - start
    latencies = sorted(t for rows in answers for _, t in rows)
    batching = httpx.get(server.url + "/api/info", timeout=30).json()["caption_batching"]
    return {
        "requests": len(latencies),
        "wall_s": round(wall, 2),
        "requests_per_s": round(len(latencies) / wall, 3),
        "p50_s": round(statistics.median(latencies), 3),
        "p95_s": round(latencies[int(0.95 * (len(latencies) - 1))], 3),
        "batching": batching,
        "answers": [[c for c, _ in rows] for rows in answers],
    }


def run(args: argparse.Namespace, threads: int, images: list[bytes]) -> dict:
    out = {}
    for max_batch in (1, 8):
        server = Server(args.model, max_batch, threads, args.out.with_suffix(f".b{max_batch}.log"))
        try:
            server.wait()
            alone = [caption(server.url, data, args.timeout_s)[0] for data in images[:4]]
            record = load(server, images, args.requests, args.timeout_s)
        finally:
            server.stop()
        answers = record.pop("answers")
        same = all(set(rows) == {rows[0]} for rows in answers)  # a client's repeats agree
        record["identical_to_single"] = same and [r[0] for r in answers[:4]] == alone
        out[f"max_batch_{max_batch}"] = record
    base, batched = out["max_batch_1"], out["max_batch_8"]
    out["speedup_requests_per_s"] = round(batched["requests_per_s"] / base["requests_per_s"], 2)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="dlip_small", help="saved model directory or preset")
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--requests", type=int, default=2, help="captions per client")
    p.add_argument("--threads", default="1,2")
    p.add_argument("--timeout-s", type=float, default=600)
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/serve_load_cpu.json")
    args = p.parse_args()
    from dlip.fileio import machine

    images = [image(seed) for seed in range(args.clients)]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    results = {f"threads_{t}": run(args, int(t), images) for t in args.threads.split(",")}
    record = {
        "benchmark": "serve_load",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(),
        "model": args.model,
        "clients": args.clients,
        "requests_per_client": args.requests,
        "results": results,
    }
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    for name, r in results.items():
        b1, b8 = r["max_batch_1"], r["max_batch_8"]
        print(f"{name}: {b1['requests_per_s']} -> {b8['requests_per_s']} req/s "
              f"({r['speedup_requests_per_s']}x), p50 {b1['p50_s']} -> {b8['p50_s']} s, "
              f"identical {b1['identical_to_single']}/{b8['identical_to_single']}")  # fmt: skip


if __name__ == "__main__":
    main()
