"""What both evaluations share: the model, the device, the results files.

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


def load_eval_model(spec: str, device: torch.device) -> BLIP:
    """A saved model directory (strict load) or a preset name (random weights), in eval mode."""
    from dlip.models.io import load
    from dlip.models.presets import create_model, list_presets

    if Path(spec).is_dir():
        model = load(spec)
    elif spec in list_presets():
        model = create_model(spec)
    else:
        raise FileNotFoundError(
            f"--model {spec!r}: not a saved model directory nor a preset ({list_presets()})"
        )
    return model.to(device).eval()


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
    from dlip.bench import machine
    from dlip.train.distributed import get_world_size

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
