"""What the demo reports per model besides the `dlip eval` metrics: size, FLOPs, CPU latency,
and sample captions on the bundled photos and on synthetic test images."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from importlib import resources
from pathlib import Path

import torch

from dlip.models.blip import BLIP

PHOTOS = ("chelsea", "astronaut", "coffee")
PROMPT = "a picture of "  # the finetuning prompt (BLIP's)
RERANK_TEXTS = (
    "a small red circle to the left of a large blue square",
    "a large green star above a small yellow triangle",
)


def bundled_photo(name: str) -> Path:
    """Path of a photo shipped with the package (see dlip/assets/photos/NOTICE.md)."""
    path = Path(str(resources.files("dlip").joinpath(f"assets/photos/{name}.jpg")))
    if not path.is_file():
        raise FileNotFoundError(f"bundled photo missing: {path}")
    return path


def _median_ms(fn: Callable[[], object], repeats: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return round(1000 * statistics.median(times), 3)


@torch.inference_mode()
def latency_ms(retrieval: BLIP, captioner: BLIP, k: int, repeats: int) -> dict[str, float]:
    """Batch-1 wall time (ms, median of `repeats` after 2 warm-up calls) of the three things a
    user waits for: embedding an image, re-ranking k candidate texts for it with ITM, and a
    3-beam caption (BLIP's settings: max 20 / min 5 tokens with the prompt)."""
    from dlip.tokenizer import get_tokenizer, pre_caption

    size = retrieval.config.vision.image_size
    pixels = torch.randn(1, 3, size, size)  # (1, 3, S, S)
    tok = get_tokenizer()
    texts = [pre_caption(RERANK_TEXTS[i % len(RERANK_TEXTS)]) for i in range(k)]
    enc = tok(texts, max_length=35)
    ids = enc["input_ids"].clone()
    ids[:, 0] = tok.enc_token_id  # ITM reads [ENC] first, as BLIP trains it
    image_tokens = retrieval.encode_image(pixels).tokens  # (1, N, D)

    def rerank() -> None:
        retrieval.itm_logits(image_tokens.expand(k, -1, -1), ids, enc["attention_mask"])

    def caption() -> None:
        captioner.generate(pixels, prompt=PROMPT, num_beams=3, max_length=20, min_length=5)

    return {
        "image_embed": _median_ms(lambda: retrieval.encode_image(pixels), repeats),
        f"itm_rerank_k{k}": _median_ms(rerank, repeats),
        "caption_3beam": _median_ms(caption, repeats),
    }


@torch.inference_mode()
def sample_captions(captioner: BLIP, images: dict[str, Path]) -> dict[str, str]:
    """{name: caption} with the evaluation settings (3 beams, BLIP's lengths, the prompt)."""
    from dlip.transforms import load_image, preprocess

    names = list(images)
    pixels = preprocess(captioner.config, [load_image(images[n]) for n in names])
    caps = captioner.generate(pixels, prompt=PROMPT, num_beams=3, max_length=20, min_length=5)
    return dict(zip(names, caps, strict=True))


def size_and_flops(model: BLIP) -> dict:
    """Parameters (the whole model, tied weights once) and forward FLOPs per task (dlip.bench)."""
    from dlip.bench import model_info

    info = model_info(model.config)
    return {"params": info["params"]["total"], "flops": info["flops"]}
