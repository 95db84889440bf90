"""`dlip demo`: build a BLIP teacher and a DLIP student from presets and run them on a real photo.

Nothing is downloaded. Weights are random (the embedded training demo that distills a teacher on
synthetic data comes later), so the captions are noise: what the demo shows is the whole
inference path (preprocessing, image/text towers, ITM head, beam-search captioning with a KV
cache) and what the student costs against the teacher: parameters, FLOPs and CPU latency.
"""

from __future__ import annotations

import argparse
import time
from importlib import resources
from pathlib import Path

import torch

PHOTOS = ("chelsea", "astronaut", "coffee")
QUERY = "a cat lying on a blanket"


def bundled_photo(name: str) -> Path:
    """Path of a photo shipped with the package (see dlip/assets/photos/NOTICE.md)."""
    path = Path(str(resources.files("dlip").joinpath(f"assets/photos/{name}.jpg")))
    if not path.is_file():
        raise FileNotFoundError(f"bundled photo missing: {path}")
    return path


def _run_model(name: str, image_path: Path, text: str) -> dict:
    from dlip.bench import model_info
    from dlip.models.presets import create_model
    from dlip.tokenizer import get_tokenizer, pre_caption
    from dlip.transforms import load_image, preprocess

    torch.manual_seed(0)
    model = create_model(name).eval()
    tok = get_tokenizer()
    pixels = preprocess(model.config, [load_image(image_path)])
    enc = tok([pre_caption(text)], max_length=model.config.max_text_length)
    ids = enc["input_ids"].clone()
    ids[:, 0] = tok.enc_token_id  # ITM reads [ENC] at position 0, as BLIP trains it
    with torch.inference_mode():
        start = time.perf_counter()
        image = model.encode_image(pixels)
        itm = model.itm_logits(image.tokens, ids, enc["attention_mask"]).softmax(-1)[0, 1]
        itm_s = time.perf_counter() - start
        start = time.perf_counter()
        caption = model.generate(pixels, num_beams=3, max_length=20, min_length=5)[0]
        caption_s = time.perf_counter() - start
    info = model_info(model.config)
    return {
        "name": name,
        "caption": caption,
        "itm": float(itm),
        "itm_s": itm_s,
        "caption_s": caption_s,
        **info,
    }


def run_demo(teacher: str, student: str, photo: str, text: str) -> dict:
    image_path = bundled_photo(photo)
    print(f"photo: {image_path.name}   text: {text!r}   (random weights: captions are noise)\n")
    results = {}
    for role, name in (("teacher", teacher), ("student", student)):
        print(f"== {role}: {name}")
        r = _run_model(name, image_path, text)
        p, f = r["params"], r["flops"]
        print(f"   caption (3 beams)  : {r['caption']!r}  [{r['caption_s']:.2f}s]")
        print(f"   ITM match prob.    : {r['itm']:.3f}  [image+ITM {r['itm_s']:.2f}s]")
        print(
            f"   params retrieval   : {p['retrieval'] / 1e6:.1f}M   captioning: "
            f"{p['captioning'] / 1e6:.1f}M   total: {p['total'] / 1e6:.1f}M"
        )
        print(
            "   GFLOPs image/text/ITM pair/caption token: "
            + " / ".join(
                f"{f[k] / 1e9:.2f}"
                for k in ("image_embed", "text_embed", "itm_pair", "caption_token")
            )
        )
        results[role] = r
    t, s = results["teacher"], results["student"]
    print(
        f"\nstudent / teacher: params {s['params']['total'] / t['params']['total']:.1%}, "
        f"image FLOPs {s['flops']['image_embed'] / t['flops']['image_embed']:.1%}, "
        f"ITM-pair FLOPs {s['flops']['itm_pair'] / t['flops']['itm_pair']:.1%}, "
        f"caption latency {s['caption_s'] / t['caption_s']:.1%} (CPU, first call each)"
    )
    return results


def cmd_demo(args: argparse.Namespace) -> int:
    run_demo(args.teacher, args.student, args.photo, args.text)
    return 0
