"""Speed of dlip's blip_base against transformers' BLIP on identical weights (CPU, fp32).

    python benchmarks/hf_speed.py [--threads 1] [--out benchmarks/results/hf_speed_cpu.json]

A randomly initialised dlip model is exported with `dlip.models.convert.export_hf` and loaded
with transformers' BlipForImageTextRetrieval / BlipForConditionalGeneration, so both sides run
the same tensors. Rows (eval mode, torch.inference_mode, median of `repeats` timed calls after
`warmup` untimed ones):
- `image_embed`: ours `encode_image` vs HF vision_model + vision_proj + L2 normalise.
- `itm_fusion`: one image's tokens against k texts, ITM logits of the k pairs in one batch:
  ours `itm_logits` (the image's cross-attention K/V projected once for the k texts, as dlip's
  re-rank runs it) vs HF text_encoder (cross-attending to the image repeated k times) + itm_head.
- `itm_rerank`: the same k pairs end to end from pixels: ours `encode_image` once + `itm_logits`
  vs one HF `BlipForImageTextRetrieval(use_itm_head=True)` call on the k pairs (HF's forward
  takes one image per pair, so the image is repeated k times and the ViT runs k times).
- `caption`: ours `generate` (KV-cached beam search) vs HF `generate`, same beams/lengths/prompt;
  the generated ids are compared (parity).
`ratio` = ours / HF time (< 1: ours faster).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from dlip.fileio import machine
from dlip.models.blip import BLIP
from dlip.models.convert import export_hf
from dlip.models.generation import generate_ids
from dlip.models.presets import create_model
from dlip.tokenizer import Tokenizer, get_tokenizer

PROMPT = "a picture of "
CAPTION = {"num_beams": 3, "max_length": 20, "min_length": 5}
# 16 candidate texts of ~12 tokens (with [ENC] and [SEP]) for the re-rank rows.
TEXTS = [
    f"a {c} {a} is {v} on the {p} today"
    for c, a, v, p in [
        ("brown", "dog", "running", "beach"),
        ("small", "cat", "sleeping", "sofa"),
        ("young", "man", "riding", "street"),
        ("red", "car", "parked", "road"),
        ("white", "bird", "sitting", "fence"),
        ("tall", "woman", "standing", "bridge"),
        ("green", "bus", "driving", "highway"),
        ("black", "horse", "grazing", "field"),
        ("little", "girl", "playing", "grass"),
        ("old", "boat", "floating", "lake"),
        ("large", "elephant", "walking", "savanna"),
        ("blue", "train", "waiting", "platform"),
        ("happy", "boy", "jumping", "bed"),
        ("yellow", "kite", "flying", "hill"),
        ("grey", "pigeon", "eating", "sidewalk"),
        ("striped", "zebra", "drinking", "river"),
    ]
]


def time_pair(
    ours: Callable[[], Any], hf: Callable[[], Any], warmup: int, repeats: int
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Median ms of `repeats` calls of each after `warmup` untimed ones, interleaved: each repeat
    times one call of each, the order swapped every repeat, so load changes on a shared machine
    hit both sides alike."""
    for _ in range(warmup):
        ours(), hf()
    times: dict[int, list[float]] = {0: [], 1: []}
    for r in range(repeats):
        for side in (0, 1) if r % 2 == 0 else (1, 0):
            start = time.perf_counter()
            (ours if side == 0 else hf)()
            times[side].append((time.perf_counter() - start) * 1e3)
    a, b = times[0], times[1]
    return (
        {"median_ms": statistics.median(a), "times_ms": a},
        {"median_ms": statistics.median(b), "times_ms": b},
    )


def build_pair(name: str, image_size: int, tmp: Path) -> tuple[BLIP, Any, Any]:
    """Our random-init model and its two transformers forms on the same weights."""
    import transformers

    torch.manual_seed(0)
    ours = create_model(name, image_size=image_size).eval()
    ret = transformers.BlipForImageTextRetrieval.from_pretrained(
        str(export_hf(ours, tmp / "retrieval", "retrieval"))
    ).eval()
    cap = transformers.BlipForConditionalGeneration.from_pretrained(
        str(export_hf(ours, tmp / "captioning", "captioning"))
    ).eval()
    return ours, ret, cap


def _row(task: str, batch: int, warmup: int, repeats: int, ours: dict, hf: dict) -> dict:
    return {
        "task": task,
        "batch": batch,
        "warmup": warmup,
        "repeats": repeats,
        "ours_ms": ours["median_ms"],
        "hf_ms": hf["median_ms"],
        "ratio": ours["median_ms"] / hf["median_ms"],
        "ours_times_ms": ours["times_ms"],
        "hf_times_ms": hf["times_ms"],
    }


def embed_rows(ours: BLIP, ret: Any, size: int, plan: dict) -> list[dict]:
    rows = []
    for batch, (warmup, repeats) in plan.items():
        pixels = torch.randn(batch, 3, size, size)

        def hf_embed(pixels: Tensor = pixels) -> Tensor:
            tokens = ret.vision_model(pixel_values=pixels).last_hidden_state  # (B, N, Dv)
            return F.normalize(ret.vision_proj(tokens[:, 0]), dim=-1)  # (B, E)

        diff = (ours.encode_image(pixels).feat - hf_embed()).abs().max().item()
        a, b = time_pair(lambda p=pixels: ours.encode_image(p), hf_embed, warmup, repeats)
        rows.append(_row("image_embed", batch, warmup, repeats, a, b) | {"max_abs_diff": diff})
    return rows


def itm_inputs(tok: Tokenizer, k: int) -> tuple[Tensor, Tensor]:
    """(k, T) ids with [ENC] first and their mask (texts cycle when k > 16)."""
    batch = tok([TEXTS[i % len(TEXTS)] for i in range(k)], max_length=35, padding="longest")
    ids = batch["input_ids"].clone()
    ids[:, 0] = tok.enc_token_id
    return ids, batch["attention_mask"]


def itm_rows(ours: BLIP, ret: Any, size: int, k: int, warmup: int, repeats: int) -> list[dict]:
    ids, mask = itm_inputs(get_tokenizer(), k)
    pixels = torch.randn(1, 3, size, size)
    image = ours.encode_image(pixels).tokens  # (1, N, Dv): dlip shares its K/V by the k texts
    index = torch.zeros(k, dtype=torch.long)  # every text reads image 0 (as dlip's re-rank)
    hf_image = ret.vision_model(pixel_values=pixels).last_hidden_state.expand(k, -1, -1)
    image_mask = torch.ones(hf_image.shape[:2], dtype=torch.long)

    def hf_fusion() -> Tensor:
        out = ret.text_encoder(
            input_ids=ids,
            attention_mask=mask,
            encoder_hidden_states=hf_image,
            encoder_attention_mask=image_mask,
        )
        return ret.itm_head(out.last_hidden_state[:, 0])  # (k, 2)

    def ours_rerank() -> Tensor:
        tokens = ours.encode_image(pixels).tokens  # (1, N, Dv)
        return ours.itm_logits(tokens, ids, mask, image_index=index)

    def hf_rerank() -> Tensor:
        many = pixels.expand(k, -1, -1, -1)  # HF: one image per pair
        return ret(input_ids=ids, pixel_values=many, attention_mask=mask, use_itm_head=True)[0]

    diff = (ours_rerank() - hf_rerank()).abs().max().item()
    a, b = time_pair(
        lambda: ours.itm_logits(image, ids, mask, image_index=index), hf_fusion, warmup, repeats
    )
    fusion = _row("itm_fusion", k, warmup, repeats, a, b) | {"max_abs_diff": diff}
    a, b = time_pair(ours_rerank, hf_rerank, warmup, repeats)
    rerank = _row("itm_rerank", k, warmup, repeats, a, b) | {"max_abs_diff": diff}
    tokens = int(mask.sum(1).float().mean().item())
    return [row | {"k": k, "text_tokens_mean": tokens} for row in (fusion, rerank)]


def _cut(row: list[int], sep: int) -> list[int]:
    """HF pads finished beams; keep up to and including the first [SEP] after [DEC]."""
    end = next((i for i in range(1, len(row)) if row[i] == sep), len(row) - 1)
    return row[: end + 1]


def caption_rows(ours: BLIP, cap: Any, size: int, plan: dict) -> list[dict]:
    tok = get_tokenizer()
    beams, lo, hi = CAPTION["num_beams"], CAPTION["min_length"], CAPTION["max_length"]
    rows = []
    for batch, (warmup, repeats) in plan.items():
        pixels = torch.randn(batch, 3, size, size)
        prompt = [tok.bos_token_id, *tok.encode(PROMPT)[1:-1]]
        hf_in = torch.tensor([[*prompt, tok.sep_token_id]] * batch)  # HF drops the last token
        mine = generate_ids(ours, pixels, PROMPT, beams, hi, lo, 1.0, tok, "hf")
        hf_ids = cap.generate(
            pixel_values=pixels, input_ids=hf_in, num_beams=beams, max_length=hi, min_length=lo
        )
        equal = [_cut(r, tok.sep_token_id) for r in hf_ids.tolist()] == mine
        a, b = time_pair(
            lambda p=pixels: ours.generate(p, prompt=PROMPT, beam_scoring="hf", **CAPTION),
            lambda p=pixels, i=hf_in: cap.generate(
                pixel_values=p, input_ids=i, num_beams=beams, max_length=hi, min_length=lo
            ),
            warmup,
            repeats,
        )
        extra = {"ids_equal": equal, "generated_lengths": [len(r) for r in mine]}
        rows.append(_row("caption", batch, warmup, repeats, a, b) | extra)
    return rows


def run(
    name: str = "blip_base",
    image_size: int = 224,
    k: int = 16,
    embed_plan: dict | None = None,
    itm_plan: tuple[int, int] = (1, 5),
    caption_plan: dict | None = None,
) -> dict[str, Any]:
    """All rows for one model; plans map batch -> (warmup, repeats)."""
    embed_plan = embed_plan or {1: (2, 15), 8: (1, 5)}
    caption_plan = caption_plan or {1: (1, 3), 4: (1, 2)}
    with tempfile.TemporaryDirectory() as tmp, torch.inference_mode():
        ours, ret, cap = build_pair(name, image_size, Path(tmp))
        rows = embed_rows(ours, ret, image_size, embed_plan)
        rows += itm_rows(ours, ret, image_size, k, *itm_plan)
        rows += caption_rows(ours, cap, image_size, caption_plan)
    return {"model": name, "image_size": image_size, "rows": rows}


def main() -> None:
    import transformers

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="blip_base")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default="benchmarks/results/hf_speed_cpu.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    result = run(args.model, args.image_size)
    record = {
        "benchmark": "hf_speed",
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"),
        "machine": machine(),
        "weights": "random (preset init), exported to transformers with export_hf",
        "device": "cpu",
        "dtype": "float32",
        "caption": {"prompt": PROMPT, **CAPTION},
        "statistic": (
            "median of repeats timed calls after warmup untimed calls; ours and HF "
            "interleaved, the order swapped each repeat"
        ),
        "ratio": "ours_ms / hf_ms (< 1: dlip faster)",
        "transformers": transformers.__version__,
        **result,
        "total_seconds": time.perf_counter() - start,
    }
    Path(args.out).write_text(json.dumps(record, indent=2) + "\n")
    for row in record["rows"]:
        print(
            f"{row['task']:12s} b={row['batch']:<3d} ours {row['ours_ms']:9.1f} ms  "
            f"hf {row['hf_ms']:9.1f} ms  ratio {row['ratio']:.3f}"
        )


if __name__ == "__main__":
    main()
