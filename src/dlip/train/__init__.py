"""Training: run configs, the distillation task, the generic loop, the pretraining and finetuning
jobs, checkpoints, optimizer and logging.

The Python API (what `dlip pretrain` / `dlip finetune` run):

    cfg = dlip.train.configure("pretrain", "configs/pretrain/tiny_synth.yaml", {"run.epochs": 2})
    final = dlip.train.run(cfg)  # -> run_dir/final, a `dlip.load`-able model directory
    ft = dlip.train.configure("retrieval", None, {"model.checkpoint": str(final), ...})
    dlip.train.run(ft)  # -> run_dir/final; also run_dir/best and run_dir/test/results.json
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

KINDS = ("pretrain", "retrieval", "caption", "vqa")


def configure(
    kind: str, path: str | Path | None = None, overrides: Mapping[str, Any] | None = None
) -> Any:
    """The validated run config of `kind` ("pretrain" or a finetuning task): the defaults <-
    the yaml at `path` <- `overrides` ({dotted key: Python value}, e.g. {"optim.lr": 1e-4,
    "teacher.checkpoint": None}). Errors are `dlip.config.ConfigError`s naming the key."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    items = [f"{key}={json.dumps(value)}" for key, value in (overrides or {}).items()]
    if kind == "pretrain":
        from dlip.train.config import load

        return load(None if path is None else str(path), items)
    from dlip.train.finetune import load_config

    return load_config(kind, None if path is None else str(path), items)


def run(cfg: Any, resume: str | None = None, test: bool = True) -> Path:
    """Train as `cfg` says (a `configure(...)`): pretraining or the finetuning task it names;
    `resume="latest"` / `"auto"` as the CLI's --resume; `test`: finetuning evaluates its best
    checkpoint on data.test. Returns run_dir/final."""
    from dlip.train.config import FinetuneConfig, PretrainConfig

    if isinstance(cfg, PretrainConfig):
        from dlip.train.pretrain import pretrain

        return pretrain(cfg, resume=resume)
    if isinstance(cfg, FinetuneConfig):
        from dlip.train.finetune import finetune

        return finetune(cfg, resume=resume, test=test)
    got = type(cfg).__name__
    raise TypeError(f"run() takes a config from dlip.train.configure(...), got {got}")
