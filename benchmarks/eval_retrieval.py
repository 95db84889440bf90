"""Retrieval evaluation speed: the batched ITM re-rank vs BLIP's pair-by-pair loop, and the
ITM re-rank throughput (pairs/s) of a student and the teacher.

    python benchmarks/eval_retrieval.py [--out benchmarks/results/eval_retrieval_cpu.json]

1. `rerank_vs_loop`: dlip_tiny (random init) at 64 px on a synthetic test split (50 images, 250
   texts), k=16. Both sides start from the same image tokens, text ids and ITC similarities;
   timed are `dlip.eval.retrieval.rerank` (pooled, deduplicated pairs, `--itm-batch` per
   forward) and the straightforward loop (per image its top-k texts, per text its top-k
   images, one `itm_logits` forward per pair, + cosine). The two score matrices are compared.
   Run with `--loop-threads` torch threads (default 1: with 2 threads on a busy 2-core machine
   every small op of the loop waits for a scheduler slice, which would inflate the speedup).
2. `itm_throughput`: dlip_small and blip_base (random init) at 224 px, 8 images x 40 texts,
   k=4: unique re-ranked pairs / seconds of `score_candidates` (feature extraction excluded),
   torch's default threads.
Random weights change no cost. Numbers are wall-clock on whatever machine runs this; the JSON
names it (`dlip.fileio.machine()`) and the load average at the start.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

import dlip
from dlip.data.datasets import eval_texts
from dlip.data.karpathy import EvalSet, load_eval_set
from dlip.data.synthetic import synthesize
from dlip.eval.retrieval import (
    FILL,
    image_features,
    rerank,
    score_candidates,
    text_features,
    tokenize_texts,
    top_candidates,
)
from dlip.fileio import machine
from dlip.losses.itm import with_first_token
from dlip.tokenizer import get_tokenizer

CPU = torch.device("cpu")


def features(model: dlip.BLIP, eval_set: EvalSet) -> dict[str, torch.Tensor]:
    """Image tokens, [ENC]-first text ids + mask, ITC sims: what both re-rank paths start from."""
    feat, tokens = image_features(model, eval_set, range(len(eval_set.images)), 16, CPU)
    ids, mask = tokenize_texts(eval_texts(eval_set))
    sims = feat @ text_features(model, ids, mask, 64, CPU).t()
    itm_ids = with_first_token(ids, get_tokenizer().enc_token_id)
    return {"tokens": tokens, "ids": itm_ids, "mask": mask, "sims": sims}


@torch.inference_mode()
def slow_loop(model: dlip.BLIP, f: dict[str, torch.Tensor], k: int) -> tuple[torch.Tensor, ...]:
    """BLIP's evaluation loop shape: one cross-encoder forward per (query, candidate) pair."""
    sims, tokens, ids, mask = f["sims"], f["tokens"], f["ids"], f["mask"]
    n_img, n_txt = sims.shape
    i2t, t2i = torch.full((n_img, n_txt), FILL), torch.full((n_txt, n_img), FILL)

    def score(i: int, t: int) -> float:
        logits = model.itm_logits(tokens[i : i + 1], ids[t : t + 1], mask[t : t + 1])
        return float(logits[0, 1]) + float(sims[i, t])

    for i in range(n_img):
        for t in sims[i].topk(min(k, n_txt)).indices.tolist():
            i2t[i, t] = score(i, t)
    for t in range(n_txt):
        for i in sims[:, t].topk(min(k, n_img)).indices.tolist():
            t2i[t, i] = score(i, t)
    return i2t, t2i


def unique_pairs(sims: torch.Tensor, k: int) -> int:
    cand = top_candidates(sims, k)
    n_txt = sims.shape[1]
    i2t = torch.arange(sims.shape[0])[:, None] * n_txt + cand.i2t
    t2i = cand.t2i * n_txt + torch.arange(n_txt)[:, None]
    return int(torch.cat([i2t.flatten(), t2i.flatten()]).unique().numel())


def bench_rerank_vs_loop(data: Path, k: int, itm_batch: int, threads: int) -> dict[str, Any]:
    eval_set = load_eval_set(data / "test.json", data)
    torch.manual_seed(0)
    model = dlip.create_model("dlip_tiny").eval()
    model.set_image_size(64)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        f = features(model, eval_set)
        rerank(model, f["tokens"], f["ids"], f["mask"], f["sims"], k, itm_batch)  # warm-up
        t0 = time.perf_counter()
        fast = rerank(model, f["tokens"], f["ids"], f["mask"], f["sims"], k, itm_batch)
        t_fast = time.perf_counter() - t0
        t0 = time.perf_counter()
        slow = slow_loop(model, f, k)
        t_slow = time.perf_counter() - t0
    finally:
        torch.set_num_threads(before)
    n_img, n_txt = f["sims"].shape
    diff = max(float((a - b).abs().max()) for a, b in zip(fast, slow, strict=True))
    same_top = all(
        torch.equal(a.topk(k, dim=1).indices, b.topk(k, dim=1).indices)
        for a, b in zip(fast, slow, strict=True)
    )
    return {
        "model": "dlip_tiny (random init)",
        "image_size": 64,
        "num_images": n_img,
        "num_texts": n_txt,
        "k": k,
        "itm_batch": itm_batch,
        "torch_threads": threads,
        "loop_pairs": n_img * min(k, n_txt) + n_txt * min(k, n_img),
        "batched_unique_pairs": unique_pairs(f["sims"], k),
        "batched_seconds": round(t_fast, 3),
        "loop_seconds": round(t_slow, 3),
        "speedup": round(t_slow / t_fast, 2),
        "max_abs_score_diff": diff,
        "same_top_k_order": same_top,
    }


def bench_itm_throughput(
    data: Path, preset: str, k: int, itm_batch: int, image_size: int
) -> dict[str, Any]:
    eval_set = load_eval_set(data / "test.json", data)
    keep = 8  # the first 8 images and their 40 captions
    sub = EvalSet(
        eval_set.images[:keep],
        eval_set.image_ids[:keep],
        [c for i in range(keep) for c in (eval_set.captions[t] for t in eval_set.img2txt[i])],
        [i for i in range(keep) for _ in eval_set.img2txt[i]],
        [],
    )
    sub.img2txt.extend([[t for t, i in enumerate(sub.txt2img) if i == j] for j in range(keep)])
    torch.manual_seed(0)
    model = dlip.create_model(preset).eval()
    model.set_image_size(image_size)
    f = features(model, sub)
    cand = top_candidates(f["sims"], k)
    args = (model, f["tokens"], f["ids"], f["mask"], f["sims"], cand, itm_batch)
    t0 = time.perf_counter()
    score_candidates(*args)
    seconds = time.perf_counter() - t0
    pairs = unique_pairs(f["sims"], k)
    return {
        "model": f"{preset} (random init)",
        "params": model.num_params(),
        "image_size": image_size,
        "num_images": len(sub.images),
        "num_texts": len(sub.captions),
        "k": k,
        "itm_batch": itm_batch,
        "torch_threads": torch.get_num_threads(),
        "unique_pairs": pairs,
        "seconds": round(seconds, 3),
        "pairs_per_s": round(pairs / seconds, 2),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="benchmarks/results/eval_retrieval_cpu.json")
    p.add_argument("--k", type=int, default=16)
    p.add_argument("--itm-batch", type=int, default=128)
    p.add_argument("--loop-threads", type=int, default=1)
    p.add_argument("--presets", default="dlip_small,blip_base")
    args = p.parse_args()
    record: dict[str, Any] = {
        "benchmark": "eval_retrieval",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(),
        "loadavg_at_start": [round(x, 2) for x in os.getloadavg()],
        "device": "cpu",
        "precision": "fp32",
    }
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp)
        synthesize(data, 62, seed=0, image_size=64, n_val=2, n_test=50, overwrite=True)
        record["rerank_vs_loop"] = bench_rerank_vs_loop(
            data, args.k, args.itm_batch, args.loop_threads
        )
        print(json.dumps(record["rerank_vs_loop"], indent=2), flush=True)
        record["itm_throughput"] = {}
        for preset in args.presets.split(","):
            row = bench_itm_throughput(data, preset, 4, 64, 224)
            record["itm_throughput"][preset] = row
            print(json.dumps(row, indent=2), flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
