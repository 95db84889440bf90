"""Evaluation with the standard protocols: retrieval (ITC + ITM re-rank), captioning (BLEU,
METEOR, ROUGE-L, CIDEr) and VQA accuracy.

    results = dlip.eval.evaluate("retrieval", "runs/ret/best", "coco/test.json", "coco/", "out/")
    results["metrics"]["r_mean"]
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

TASKS = ("retrieval", "caption", "vqa")


def evaluate(
    task: str, model: str | Path, data: str | Path, images: str | Path, out: str | Path,
    **settings: Any,
) -> dict[str, Any]:  # fmt: skip
    """`dlip eval TASK` from Python: evaluate `model` (a directory or preset) on the Karpathy /
    VQA json `data` with images under `images`; writes out/results.json (+ .md) and returns it.
    `settings`: the task function's keywords (retrieval: k, itm_batch, batch_size, ...;
    caption: num_beams, prompt, ...; vqa: mode, answers, ...), e.g. `evaluate(..., k=128)`."""
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    if task == "retrieval":
        from dlip.eval.retrieval import run_retrieval_eval as fn
    elif task == "caption":
        from dlip.eval.captioning import run_caption_eval as fn
    else:
        from dlip.eval.vqa_eval import run_vqa_eval as fn
    path = fn(str(model), str(data), str(images), out, **settings)
    return json.loads(Path(path or Path(out) / "results.json").read_text())
