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


def bundled_photo(name: str) -> Path:
    """Path of a photo shipped with the package (see dlip/assets/photos/NOTICE.md)."""
    path = Path(str(resources.files("dlip").joinpath(f"assets/photos/{name}.jpg")))
    if not path.is_file():
        raise FileNotFoundError(f"bundled photo missing: {path}")
    return path


def latency_ms(models: dict[str, tuple[BLIP, BLIP]], k: int, repeats: int) -> dict[str, dict]:
    """{model: {task: ms}}: batch-1 wall time, median of `repeats` calls after 2 warm-up calls,
    of embedding an image, re-ranking k candidate texts for it with ITM (retrieval model) and a
    3-beam caption of a fixed 20 tokens (caption model): `dlip bench latency`'s workloads.

    `models` maps a name to its (retrieval, caption) models. Calls are interleaved across the
    models (the order reversed every repeat) on one thread, so machine load hits all alike:
    millisecond calls of tiny models are otherwise dominated by noise and thread hand-offs.
    """
    from dlip.bench.latency import Workloads

    device = torch.device("cpu")
    calls: dict[str, dict[str, Callable[[], object]]] = {}
    for name, (ret, cap) in models.items():
        size = ret.config.vision.image_size
        w_ret, w_cap = Workloads(ret, device, size, k), Workloads(cap, device, size, 1)
        calls[name] = {
            "image_embed": w_ret.call("image_embed", 1),
            f"itm_rerank_k{k}": w_ret.call("itm_rerank", k),
            "caption_3beam": w_cap.call("caption", 1),
        }
    names = list(models)
    times: dict[str, dict[str, list[float]]] = {n: {t: [] for t in calls[n]} for n in names}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for task in calls[names[0]]:
            for name in names:
                for _ in range(2):  # warm-up
                    calls[name][task]()
            for r in range(repeats):
                for name in names if r % 2 == 0 else names[::-1]:
                    start = time.perf_counter()
                    calls[name][task]()
                    times[name][task].append(time.perf_counter() - start)
    finally:
        torch.set_num_threads(threads)
    return {
        n: {t: round(1000 * statistics.median(v), 3) for t, v in times[n].items()} for n in names
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
    """Parameters (the whole model, tied weights once) and forward FLOPs per task
    (dlip.models.counting)."""
    from dlip.models.counting import model_info

    # both towers, whichever form a finetuned model was saved in
    info = model_info(model.config.replace(has_encoder=True, has_decoder=True))
    return {"params": info["params"]["total"], "flops": info["flops"]}
