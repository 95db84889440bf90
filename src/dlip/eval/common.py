"""What both evaluations share: the model's identity and the results files.

`dlip eval retrieval|caption --out DIR` writes DIR/results.json (every metric and what produced
it: checkpoint, model config, dataset, settings, machine, date) and DIR/results.md (a markdown
table of the same metrics). Only rank 0 writes.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from dlip.fileio import atomic_write_text, write_json
from dlip.models.blip import BLIP

RESULTS_JSON = "results.json"
RESULTS_MD = "results.md"


def describe_model(spec: str, model: BLIP) -> dict[str, Any]:
    """The checkpoint's identity for results.json."""
    path = Path(spec)
    return {
        "checkpoint": str(path.resolve()) if path.is_dir() else None,
        "preset": None if path.is_dir() else spec,
        "name": model.config.name,
        "params": model.num_params(),
        "config": model.config.to_dict(),
    }


def results_record(task: str, **fields: Any) -> dict[str, Any]:
    """The common head of results.json: task, date, machine, then the task's fields."""
    from dlip.distributed import get_world_size
    from dlip.fileio import machine

    return {
        "task": task,
        "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "machine": machine(),
        "world_size": get_world_size(),
        **fields,
    }


def markdown_table(rows: Mapping[str, Mapping[str, float]], digits: int = 2) -> str:
    """{row name: {metric: value}} -> a markdown table, metrics as columns (first row's order)."""
    columns = list(next(iter(rows.values())))
    lines = ["| | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for name, metrics in rows.items():
        cells = [f"{metrics[c]:.{digits}f}" if c in metrics else "-" for c in columns]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_results(out_dir: str | Path, record: Mapping[str, Any], markdown: str) -> Path:
    """DIR/results.json and DIR/results.md, each written atomically; returns the json path."""
    out = Path(out_dir)
    atomic_write_text(out / RESULTS_MD, markdown.rstrip() + "\n")
    return write_json(out / RESULTS_JSON, record)


def open_model(spec: str, device: torch.device, image_size: int | None = None) -> BLIP:
    """The model to evaluate: `spec` resolved (saved directory or preset), on `device`, in
    eval mode, at `image_size` when given (pos_embed resized)."""
    from dlip.models.io import resolve

    model = resolve(spec).to(device)
    if image_size:
        model.set_image_size(image_size)
    return model


def dataset_record(data: str, images: str, name: str | None, eval_set: Any) -> dict[str, Any]:
    """results.json's `dataset`: the split's files, name, and how many images and texts."""
    return {
        "data": str(Path(data).resolve()),
        "images": str(Path(images).resolve()),
        "name": name or Path(data).stem,
        "num_images": len(eval_set.images),
        "num_texts": len(eval_set.captions),
    }
