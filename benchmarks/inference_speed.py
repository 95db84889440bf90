"""Inference speed-ups measured side by side: the shared cross-attention cache of beam search,
and int8 linear layers (speed, and the accuracy they cost on the demo's trained models).

    python benchmarks/inference_speed.py [--models dlip_small,blip_base] [--threads 1,2]
        [--demo runs/demo] [--out benchmarks/results/inference_speed_cpu.json]

Speed (random preset weights: speed depends on shapes), per model, thread count and variant,
calls interleaved (A, B, A, B, ...), median ms:
- `caption_3beam` at batch 1: 3 beams, fixed 20 tokens (min = max length, as `dlip bench
  latency`); variants: image keys / values projected per beam (BLIP's and transformers' way),
  shared by the beams (dlip's default), shared + int8;
- `image_embed` at batch 1 and 8: float32 vs int8;
- with `--onnx` (models in `--onnx-models`, exported once by `dlip export onnx` into a temporary
  folder, float32 and `--quantize int8`): both rows again run by ONNX Runtime
  (`Predictor.load(onnx_dir)`'s backend, dlip.inference.ort), same thread count;
- `preprocess`: a bundled photo's JPEG bytes -> pixels, dlip's PIL decode vs torchvision.io's;
- `itm_rerank`: BLIP's re-rank of 2 images x 16 candidate texts each (35 tokens), each image's
  cross-attention keys / values projected per pair vs once per image (`share_image_kv`).
The ids of the shared and per-beam captions are compared (they must be equal), and so are the
ONNX Runtime captions with PyTorch's.
Accuracy (with --demo, a `dlip demo` run folder): every finetuned model found there evaluated
on the demo's test split in float32 and int8 (retrieval r_mean, caption CIDEr / BLEU-4).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent


def interleaved(calls: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Median ms per call name; one warm-up each, then rounds in alternating order."""
    times: dict[str, list[float]] = {name: [] for name in calls}
    for fn in calls.values():
        fn()
    names = list(calls)
    for r in range(repeats):
        for name in names if r % 2 == 0 else names[::-1]:
            start = time.perf_counter()
            calls[name]()
            times[name].append(1000 * (time.perf_counter() - start))
    return {name: round(statistics.median(v), 2) for name, v in times.items()}


def export_onnx_dirs(name: str, image_size: int, root: Path) -> tuple[Path, Path]:
    """dlip export onnx of the preset (seed 0) at `image_size`: (float32 dir, int8 dir)."""
    import dlip
    from dlip.cli import main as dlip_main

    torch.manual_seed(0)
    saved = dlip.save(dlip.create_model(name), root / name / "model")
    for extra, sub in (([], "fp32"), (["--quantize", "int8"], "int8")):
        argv = ["export", "onnx", str(saved), "--out", str(root / name / sub)]
        if dlip_main([*argv, "--image-size", str(image_size), *extra]) != 0:
            raise SystemExit(f"export of {name} failed")
    return root / name / "fp32", root / name / "int8"


def onnx_speed(dirs: tuple[Path, Path], threads: int, repeats: int, want_ids: list) -> dict:
    """Caption and image-embed rows of the ONNX Runtime backend, float32 and int8."""
    from dlip.inference.ort import OnnxBLIP
    from dlip.models.generation import beam_search, prompt_ids
    from dlip.tokenizer import get_tokenizer

    tok = get_tokenizer()
    models = {
        kind: OnnxBLIP(d, threads=threads)
        for kind, d in zip(("onnx", "onnx_int8"), dirs, strict=True)
    }
    size = models["onnx"].config.vision.image_size
    pixels = torch.randn(8, 3, size, size, generator=torch.Generator().manual_seed(0))
    ids = prompt_ids(tok, models["onnx"].config.prompt, 1, torch.device("cpu"))

    def caption(model) -> Callable[[], list]:
        def run() -> list:
            image = model.encode_image(pixels[:1]).tokens
            return beam_search(model, image, ids, 3, 20, 20, 1.0, tok.sep_token_id)

        return run

    def embed(model, batch: int) -> Callable[[], object]:
        return lambda: model.encode_image(pixels[:batch]).feat

    return {
        "caption_ids_equal_onnx_vs_torch": caption(models["onnx"])() == want_ids,
        "caption_3beam_ms": interleaved({k: caption(m) for k, m in models.items()}, repeats),
        "image_embed_b1_ms": interleaved({k: embed(m, 1) for k, m in models.items()}, repeats),
        "image_embed_b8_ms": interleaved(
            {k: embed(m, 8) for k, m in models.items()}, max(3, repeats // 2)
        ),
    }


def itm_speed(model, repeats: int) -> dict:
    """Re-rank of 2 images x 16 texts: image K/V per pair vs once per image."""
    from dlip.eval.retrieval import itm_pair_scores
    from dlip.tokenizer import get_tokenizer

    g = torch.Generator().manual_seed(0)
    size = model.config.vision.image_size
    with torch.inference_mode():
        image = model.encode_image(torch.randn(2, 3, size, size, generator=g)).tokens
    ids = torch.randint(1000, 20000, (32, 35), generator=g)
    ids[:, 0] = get_tokenizer().enc_token_id
    mask = torch.ones_like(ids)
    pairs_img, pairs_txt = torch.arange(2).repeat_interleave(16), torch.arange(32)

    def run(share: bool) -> Callable[[], object]:
        args = (model, image, ids, mask, pairs_img, pairs_txt)
        return lambda: itm_pair_scores(*args, itm_batch=32, share_image_kv=share)

    same = torch.allclose(run(True)(), run(False)(), atol=1e-4)
    ms = interleaved({"per_pair": run(False), "shared": run(True)}, max(3, repeats // 2))
    return {"itm_rerank_2x16_ms": ms, "itm_scores_equal": same,
            "itm_speedup_shared": round(ms["per_pair"] / ms["shared"], 2)}  # fmt: skip


def preprocess_speed(threads: int, repeats: int, image_size: int) -> dict:
    """One bundled photo's bytes -> normalised pixels: dlip's path (PIL decode with its checks,
    EXIF orientation, then the resize on a uint8 tensor) vs torchvision.io's decoder + the same
    transform; max abs pixel difference between the two."""
    from torchvision.io import ImageReadMode, decode_image

    import dlip
    from dlip.images import decode_rgb
    from dlip.models.presets import get_config
    from dlip.transforms import eval_transform

    torch.set_num_threads(threads)
    data = (Path(dlip.__file__).parent / "assets/photos/chelsea.jpg").read_bytes()
    cfg = get_config("dlip_small")
    tf = eval_transform(cfg.replace(vision=dataclasses.replace(cfg.vision, image_size=image_size)))
    raw = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    calls = {
        "pil": lambda: tf(decode_rgb(data)),
        "torchvision_io": lambda: tf(decode_image(raw, mode=ImageReadMode.RGB)),
    }
    diff = (calls["pil"]() - calls["torchvision_io"]()).abs().max().item()
    ms = interleaved(calls, repeats * 3)
    return {"preprocess_ms": ms, "preprocess_max_abs_diff": round(diff, 4)}


def speed(name: str, threads: int, repeats: int, image_size: int) -> dict:
    import dlip
    from dlip.inference.quant import quantize_model
    from dlip.models.generation import beam_search, prompt_ids
    from dlip.tokenizer import get_tokenizer

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    fp32 = dlip.create_model(name).eval()
    fp32.set_image_size(image_size)
    int8 = quantize_model(fp32, "int8", torch.device("cpu"), torch.float32)
    tok = get_tokenizer()
    pixels = torch.randn(8, 3, image_size, image_size, generator=torch.Generator().manual_seed(0))
    ids = prompt_ids(tok, fp32.config.prompt, 1, torch.device("cpu"))

    def caption(model, share: bool) -> Callable[[], list]:
        def run() -> list:
            with torch.inference_mode():
                image = model.encode_image(pixels[:1]).tokens
                return beam_search(model, image, ids, 3, 20, 20, 1.0, tok.sep_token_id,
                                   share_image_kv=share)  # fmt: skip

        return run

    def embed(model, batch: int) -> Callable[[], object]:
        def run() -> object:
            with torch.inference_mode():
                return model.encode_image(pixels[:batch]).feat

        return run

    same_ids = caption(fp32, True)() == caption(fp32, False)()
    cap = interleaved({"per_beam": caption(fp32, False), "shared": caption(fp32, True),
                       "shared_int8": caption(int8, True)}, repeats)  # fmt: skip
    emb1 = interleaved({"fp32": embed(fp32, 1), "int8": embed(int8, 1)}, repeats)
    emb8 = interleaved({"fp32": embed(fp32, 8), "int8": embed(int8, 8)}, max(3, repeats // 2))
    return itm_speed(fp32, repeats) | preprocess_speed(threads, repeats, image_size) | {
        "model": name, "threads": threads, "image_size": image_size,
        "caption_ids": caption(fp32, True)(),
        "caption_3beam_ms": cap, "caption_ids_equal_shared_vs_per_beam": same_ids,
        "caption_speedup_shared": round(cap["per_beam"] / cap["shared"], 2),
        "caption_speedup_shared_int8": round(cap["per_beam"] / cap["shared_int8"], 2),
        "image_embed_b1_ms": emb1, "image_embed_b8_ms": emb8,
        "image_embed_speedup_int8": round(emb1["fp32"] / emb1["int8"], 2),
    }  # fmt: skip


def accuracy(demo: Path) -> dict:
    """Test metrics of the demo's finetuned models in float32 and int8."""
    import dlip
    from dlip.data.karpathy import load_eval_set
    from dlip.eval.captioning import evaluate_captions
    from dlip.eval.retrieval import evaluate_retrieval
    from dlip.inference.quant import quantize_model

    test = load_eval_set(demo / "data/test.json", demo / "data")
    out = {}
    for best in sorted(demo.glob("*/*/best/model.safetensors")):
        model_dir, task = best.parent, best.parent.parent.name
        if task not in ("retrieval", "caption"):
            continue
        fp32 = dlip.load(model_dir).eval()
        int8 = quantize_model(fp32, "int8", torch.device("cpu"), torch.float32)
        row = {}
        for kind, model in (("fp32", fp32), ("int8", int8)):
            if task == "retrieval":
                res = evaluate_retrieval(model, test, k=16, batch_size=32, itm_batch=64)
                row[kind] = {"r_mean": res["metrics"]["r_mean"]}
            else:
                res = evaluate_captions(model, test, batch_size=32)
                row[kind] = {k: res["metrics"][k] for k in ("CIDEr", "Bleu_4")}
        row["delta"] = {k: round(row["int8"][k] - row["fp32"][k], 4) for k in row["fp32"]}
        out[f"{best.parent.parent.parent.name}/{task}"] = row
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="dlip_small,blip_base")
    p.add_argument("--threads", default="1,2")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--repeats", type=int, default=6)
    p.add_argument("--demo", type=Path, default=None, help="a `dlip demo` folder: int8 accuracy")
    p.add_argument("--onnx", action="store_true", help="ONNX Runtime rows (exports first)")
    p.add_argument("--onnx-models", default="dlip_small")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/inference_speed_cpu.json")
    args = p.parse_args()
    import tempfile

    from dlip.fileio import machine

    rows = [
        speed(m, int(t), args.repeats, args.image_size)
        for m in args.models.split(",")
        for t in args.threads.split(",")
    ]
    if args.onnx:
        with tempfile.TemporaryDirectory() as tmp:
            for m in args.onnx_models.split(","):
                dirs = export_onnx_dirs(m, args.image_size, Path(tmp))
                for r in rows:
                    if r["model"] == m:
                        r["onnx"] = onnx_speed(dirs, r["threads"], args.repeats, r["caption_ids"])
    for r in rows:
        r.pop("caption_ids")
    record = {
        "benchmark": "inference_speed",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(),
        "speed": rows,
        "accuracy": accuracy(args.demo) if args.demo else None,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    for r in rows:
        print(f"{r['model']} t{r['threads']}: caption {r['caption_3beam_ms']} "
              f"(shared {r['caption_speedup_shared']}x, +int8 {r['caption_speedup_shared_int8']}x, "
              f"ids equal {r['caption_ids_equal_shared_vs_per_beam']}); embed int8 "
              f"{r['image_embed_speedup_int8']}x; itm shared {r['itm_speedup_shared']}x; "
              f"onnx {r.get('onnx')}")  # fmt: skip
    if record["accuracy"]:
        print(json.dumps(record["accuracy"], indent=1))


if __name__ == "__main__":
    main()
