"""Image-index search: exact (every image scored, what `dlip search` does without FAISS) against
the FAISS IVF index `dlip index build --faiss` writes, on one machine in one run.

    python benchmarks/index_search.py [--sizes 20000,100000,300000] [--dim 256]
        [--nprobe 8,16,32,64] [--queries 200] [--out benchmarks/results/index_search_cpu.json]

The features are synthetic but shaped like image embeddings: unit vectors around 1,000
cluster centres (Gaussian offsets of norm ~0.6); queries are features moved by an offset of
norm ~0.4 (a text query lands near the images it describes). For each size: the IVF index's
build time, and per nprobe its recall@k (the share of the exact top-k it returns) and ms per
single-query search, beside the exact search's ms.
Both searches run with the same torch / FAISS thread count (--threads).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
NOISE, QUERY_NOISE = 0.6, 0.4  # norms of the offsets from a centre / from a feature


def features(n: int, dim: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    centers = torch.nn.functional.normalize(torch.randn(1000, dim, generator=g), dim=1)
    noise = torch.randn(n, dim, generator=g) * (NOISE / dim**0.5)  # norm ~NOISE
    x = centers[torch.randint(0, 1000, (n,), generator=g)] + noise
    return torch.nn.functional.normalize(x, dim=1)  # (N, dim)


def timed(fn, queries: torch.Tensor) -> tuple[list[set[int]], float]:
    """Top-k row sets per query and the median ms of one query."""
    found, times = [], []
    for q in queries:
        start = time.perf_counter()
        found.append(set(fn(q)))
        times.append(1000 * (time.perf_counter() - start))
    return found, statistics.median(times)


def run_size(n: int, args: argparse.Namespace) -> dict:
    from dlip.inference.ann import build_faiss, faiss_topk

    x = features(n, args.dim, seed=0)
    g = torch.Generator().manual_seed(1)
    near = x[torch.randint(0, n, (args.queries,), generator=g)]
    queries = torch.nn.functional.normalize(
        near + 0.2 * torch.randn(near.shape, generator=g), dim=1
    )
    exact, exact_ms = timed(lambda q: (x @ q).topk(args.k).indices.tolist(), queries)
    start = time.perf_counter()
    ann = build_faiss(x)
    build_s = time.perf_counter() - start
    rows = []
    for nprobe in args.nprobe:
        ann.nprobe = nprobe
        got, ms = timed(lambda q: faiss_topk(ann, q, args.k)[1], queries)
        recall = statistics.fmean(len(a & b) / args.k for a, b in zip(got, exact, strict=True))
        row = {"nprobe": nprobe, "recall_at_k": round(recall, 4), "ms_per_query": round(ms, 3)}
        rows.append(row | {"speedup_vs_exact": round(exact_ms / ms, 2)})
    return {"n": n, "nlist": int(ann.nlist), "build_s": round(build_s, 2),
            "exact_ms_per_query": round(exact_ms, 3), "ivf": rows}  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="20000,100000,300000")
    p.add_argument("--dim", type=int, default=256, help="embed_dim (dlip_small / BLIP: 256)")
    p.add_argument("--nprobe", default="8,16,32,64")
    p.add_argument("--queries", type=int, default=200)
    p.add_argument("-k", type=int, default=10)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/index_search_cpu.json")
    args = p.parse_args()
    args.nprobe = [int(v) for v in args.nprobe.split(",")]
    import faiss

    from dlip.fileio import machine

    torch.set_num_threads(args.threads)
    faiss.omp_set_num_threads(args.threads)
    results = [run_size(int(n), args) for n in args.sizes.split(",")]
    record = {
        "benchmark": "index_search",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(),
        "threads": args.threads,
        "dim": args.dim,
        "k": args.k,
        "queries": args.queries,
        "faiss": faiss.__version__,
        "numpy": np.__version__,
        "data": f"unit vectors around 1000 centres (offset norm {NOISE}); queries: features "
        f"+ an offset of norm {QUERY_NOISE}",
        "sizes": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    for r in results:
        best = ", ".join(f"nprobe {v['nprobe']}: recall {v['recall_at_k']:.3f} "
                         f"{v['ms_per_query']:.2f} ms" for v in r["ivf"])  # fmt: skip
        print(f"N={r['n']}: exact {r['exact_ms_per_query']:.2f} ms; IVF({r['nlist']}) {best}")


if __name__ == "__main__":
    main()
