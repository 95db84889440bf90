"""Training step time with the LM head on every position vs only where a token counts.

    git archive <old-commit> src | tar -x -C /tmp/before     # the tree to compare against
    python benchmarks/lm_head_step.py --trees before=/tmp/before/src,after=src \
        [--rounds 3] [--steps 4] [--out benchmarks/results/lm_head_step_cpu.json]

The decoder's head projects to BERT's 30,524-word vocabulary; run at every position of a
(B, T) batch it costs B*T*D*V multiply-adds forward (and twice that backward) plus a
30,524-way softmax per position, whatever the layers cost. Only non-pad, non-prompt targets
count, so dlip gathers the decoder's states there before the head (dlip.losses.lm). This
script measures what that buys, timing the trainer's own `train_step` (forward, every loss,
backward, AdamW, momentum update) under each source tree in turn, in separate processes
(`PYTHONPATH=<tree>`), alternated over `--rounds` so drift of the machine hits both alike.

Configurations (random init: weights do not change the cost):
- demo_teacher: `dlip demo`'s teacher pretraining (width 96, 4+4 layers, 64 px, batch 32,
  ITC + ITM + LM, no KD);
- demo_student_kd: the demo's KD student (test_tiny, 64 px, batch 32) with every KD term of
  the demo, against a random demo-shaped teacher;
- dlip_small_kd: configs/pretrain/dlip_small_from_blip_base.yaml (blip_base teacher, 224 px,
  batch 4).
Captions are the demo's synthetic captions (`dlip.data.synthetic`), tokenized as a run does,
so padding is as in training. Per tree and configuration: the median seconds per step over
all rounds (each round: 1 untimed step, then `--steps` timed ones).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ("demo_teacher", "demo_student_kd", "dlip_small_kd")
STEPS_PER_EPOCH, TOTAL_STEPS = 1000, 20000  # handed to the lr schedule; any values would do


# ------------------------------------------------------------------------- child: one tree
def _captions(n: int, seed: int) -> list[str]:
    import numpy as np

    from dlip.data.synthetic import caption_scene, sample_scenes

    rng = np.random.default_rng(seed)
    scenes = sample_scenes(n, rng, contrast=0.0, max_objects=2)
    return [caption_scene(s, rng) for s in scenes]


def _batch(cfg: Any, image_size: int, seed: int) -> dict[str, Any]:
    import torch

    from dlip.tokenizer import Tokenizer, pre_caption

    b = cfg.data.batch_size
    enc = Tokenizer.default()(
        [pre_caption(c) for c in _captions(b, seed)], max_length=cfg.data.max_length
    )
    gen = torch.Generator().manual_seed(seed)
    return {
        "image": torch.randn(b, 3, image_size, image_size, generator=gen),
        "input_ids": enc["input_ids"],
        "attention_mask": enc["attention_mask"],
    }


def _config(name: str, tmp: Path) -> tuple[Any, int]:
    """The PretrainConfig of configuration `name` (teachers written under `tmp`), image size."""
    import dlip
    from dlip.demo.pipeline import Layout, pretrain_config, write_config
    from dlip.demo.plan import IMAGE_SIZE, DemoPlan
    from dlip.train.config import load

    data = ["data.manifests=[]", "data.weights=[]", "data.synth_dir=unused"]
    if name == "dlip_small_kd":
        teacher = tmp / "blip_base"
        if not teacher.exists():
            dlip.save(dlip.create_model("blip_base"), teacher)
        path = ROOT / "configs/pretrain/dlip_small_from_blip_base.yaml"
        extra = ["model.init=random", "model.image_size=224", "data.batch_size=4"]
        return load(path, [*extra, *data, f"teacher.checkpoint={teacher}"]), 224
    lay = Layout(tmp / "demo")
    model = "teacher" if name == "demo_teacher" else "student_kd"
    raw = pretrain_config(DemoPlan.full(), lay, model)
    path = write_config(lay, name, raw)
    if model == "student_kd" and not lay.pretrained("teacher").exists():
        from dlip.train.pretrain import build_task

        teacher_cfg = load(write_config(lay, "t", pretrain_config(DemoPlan.full(), lay, "teacher")),
                           data, validate=False)  # fmt: skip
        dlip.save(build_task(teacher_cfg).student, lay.pretrained("teacher"))
    return load(path, data), IMAGE_SIZE


def child(names: list[str], steps: int, seed: int) -> dict[str, list[float]]:
    import torch

    from dlip.train.loop import seed_everything, train_step
    from dlip.train.optim import build_optimizer
    from dlip.train.pretrain import build_task
    from dlip.train.task import load_teacher

    out: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            cfg, size = _config(name, Path(tmp))
            seed_everything(seed)
            teacher = load_teacher(cfg)
            task = build_task(cfg, teacher).train()
            o = cfg.optim
            opt = build_optimizer(task, o.lr, o.weight_decay, tuple(o.betas), o.eps)
            batch = _batch(cfg, size, seed)
            times = []
            for i in range(steps + 1):
                t0 = time.perf_counter()
                train_step(task, task, opt, [batch], cfg, i, STEPS_PER_EPOCH, TOTAL_STEPS)
                if i:  # the first step warms caches and allocators
                    times.append(time.perf_counter() - t0)
            out[name] = times
            del task, opt, teacher
            torch.cuda.empty_cache() if torch.cuda.is_available() else None
    return out


# ------------------------------------------------------------------------ parent: all trees
def parent(args: argparse.Namespace) -> dict[str, Any]:
    trees = dict(item.split("=", 1) for item in args.trees.split(","))
    names = [n for n in args.configs.split(",") if n]
    times: dict[str, dict[str, list[float]]] = {t: {n: [] for n in names} for t in trees}
    for r in range(args.rounds):
        for label, src in trees.items():
            env = {**os.environ, "PYTHONPATH": str(Path(src).resolve())}
            cmd = [sys.executable, __file__, "--child", ",".join(names), "--steps",
                   str(args.steps), "--seed", str(args.seed)]  # fmt: skip
            done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
            got = json.loads(done.stdout.strip().splitlines()[-1])
            for n in names:
                times[label][n] += got[n]
            print(f"round {r + 1} {label}: " + ", ".join(
                f"{n} {statistics.median(got[n]):.3f} s" for n in names), flush=True)  # fmt: skip
    rows = []
    for n in names:
        row: dict[str, Any] = {"config": n}
        for label in trees:
            row[f"{label}_s_per_step"] = round(statistics.median(times[label][n]), 4)
            row[f"{label}_step_times_s"] = [round(t, 4) for t in times[label][n]]
        if len(trees) == 2:
            a, b = (row[f"{label}_s_per_step"] for label in trees)
            row["speedup_x"] = round(a / b, 3)
        rows.append(row)
    from dlip.fileio import machine

    return {
        "benchmark": "lm_head_step",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(),
        "trees": trees,
        "rounds": args.rounds,
        "timed_steps_per_round": args.steps,
        "statistic": "median step time over all rounds (separate processes, alternated)",
        "precision": "fp32, CPU",
        "configurations": rows,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--trees", default=f"current={ROOT / 'src'}", help="label=src_dir,...")
    p.add_argument("--configs", default=",".join(CONFIGS))
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/lm_head_step_cpu.json")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child is not None:
        print(json.dumps(child(args.child.split(","), args.steps, args.seed)))
        return
    result = parent(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    for row in result["configurations"]:
        print(json.dumps({k: v for k, v in row.items() if not k.endswith("times_s")}))


if __name__ == "__main__":
    main()
