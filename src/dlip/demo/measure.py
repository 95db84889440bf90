"""What the demo reports per model besides the `dlip eval` metrics: size, FLOPs, CPU latency,
and sample captions on the bundled photos and on synthetic test images."""

from __future__ import annotations

import statistics
from collections.abc import Callable
from importlib import resources
from pathlib import Path

import torch

from dlip.models.blip import BLIP

PHOTOS = ("chelsea", "astronaut", "coffee")
PROMPT = "a picture of "  # the finetuning prompt (BLIP's)


def bundled_photo(name: str) -> Path:
    """Path of a photo shipped with the package (see dlip/assets/photos/NOTICE.md)."""
    path = Path(str(resources.files("dlip").joinpath(f"assets/photos/{name}.jpg")))
    if not path.is_file():
        raise FileNotFoundError(f"bundled photo missing: {path}")
    return path


def latency_ms(retrieval: BLIP, captioner: BLIP, k: int, repeats: int) -> dict[str, float]:
    """Batch-1 wall time (ms, median of `repeats` after 2 warm-up calls) of what a user waits
    for: embedding an image, re-ranking k candidate texts for it with ITM, and a 3-beam caption
    of a fixed 20 tokens (`dlip bench latency`'s workloads, so the numbers compare)."""
    from dlip.benchmarks.latency import Workloads, time_calls

    device = torch.device("cpu")
    size = retrieval.config.vision.image_size
    ret, cap = Workloads(retrieval, device, size, k), Workloads(captioner, device, size, 1)

    def median_ms(fn: Callable[[], object]) -> float:
        return round(1000 * statistics.median(time_calls(fn, 2, repeats, cuda=False)), 3)

    return {
        "image_embed": median_ms(ret.call("image_embed", 1)),
        f"itm_rerank_k{k}": median_ms(ret.call("itm_rerank", k)),
        "caption_3beam": median_ms(cap.call("caption", 1)),
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
