"""`dlip demo`'s stages: synthetic data -> teacher -> KD / no-KD students -> finetune + eval.

Resumable by construction: a stage whose output exists is skipped, and an interrupted training
stage continues from its newest checkpoint (`--resume latest` of the training loop). The plan
is pinned in RUN/plan.json, so a rerun with other settings is refused instead of mixing runs.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from dlip.demo.plan import (
    FINETUNE_LR,
    IMAGE_SIZE,
    KD_WEIGHTS,
    MODELS,
    STUDENT_ARCH,
    STUDENT_KD_INIT,
    STUDENT_PRESET,
    TASKS,
    TEACHER_ARCH,
    TEMP_INIT,
    TEXT_VALUE_OUTPUT_STD,
    VQA,
    DemoPlan,
)
from dlip.fileio import atomic_write_text, write_json

PLAN_FILE = "plan.json"


@dataclass(frozen=True)
class Stage:
    title: str
    output: Path  # exists <=> the stage is done
    run: Callable[[], None]
    command: str  # the equivalent dlip command, for the report


class Layout:
    """Where everything of one demo run lives."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.data = root / "data"
        self.configs = root / "configs"

    def pretrain_dir(self, model: str) -> Path:
        return self.root / model / "pretrain"

    def finetune_dir(self, model: str, task: str) -> Path:
        return self.root / model / task

    def pretrained(self, model: str) -> Path:
        return self.pretrain_dir(model) / "final"

    def test_results(self, model: str, task: str) -> Path:
        return self.finetune_dir(model, task) / "test" / "results.json"


# ------------------------------------------------------------------------------------- configs
def _data_section(plan: DemoPlan) -> dict[str, Any]:
    # Synthetic captions name positions and colours: no flips, crops or colour augmentation.
    return {
        "batch_size": plan.batch_size, "num_workers": 0, "hflip": False,
        "rand_augment": False, "min_scale": 1.0,
    }  # fmt: skip


def pretrain_config(plan: DemoPlan, lay: Layout, model: str) -> dict[str, Any]:
    """The `dlip pretrain` yaml of one of the three models."""
    steps = plan.teacher_steps if model == "teacher" else plan.student_steps
    # From scratch the text tower's [CLS] first ignores the words and ITC sits at ln(batch):
    # wider value / output maps at init, a softer initial temperature and no dropout leave
    # that plateau in ~60 steps instead of ~270 (docs/demo.md). The same for all three models.
    arch: dict[str, Any] = {
        "preset": STUDENT_PRESET, "image_size": IMAGE_SIZE, "temp_init": TEMP_INIT,
        "text_value_output_std": TEXT_VALUE_OUTPUT_STD,
        "arch": TEACHER_ARCH if model == "teacher" else STUDENT_ARCH,
    }  # fmt: skip
    cfg: dict[str, Any] = {
        "model": arch,
        "data": {"manifests": [str(lay.data / "manifest.jsonl")], **_data_section(plan)},
        "loss": {"momentum_distill": False},  # a 1000-image set needs no 57600-feature queue
        # Small models from scratch take a larger lr than BLIP's 3e-4 (which starts from BERT).
        "optim": {
            "lr": 1.0e-3,
            "warmup_steps": min(50, max(1, steps // 5)),
            "schedule": "cosine",
            "min_lr": 1.0e-5,
        },
        "run": {
            "run_dir": str(lay.pretrain_dir(model)),
            "max_steps": steps,
            "log_every": max(1, min(10, steps // 8)),
            "ckpt_every": 50,
            "seed": plan.seed,
        },
    }
    if model == "student_kd":
        cfg["model"]["init"] = STUDENT_KD_INIT
        cfg["teacher"] = {"checkpoint": str(lay.pretrained("teacher"))}
        cfg["loss"]["kd"] = {"weights": dict(KD_WEIGHTS)}
    return cfg


def finetune_config(plan: DemoPlan, lay: Layout, model: str, task: str) -> dict[str, Any]:
    """The `dlip finetune` yaml: the same short recipe for every model, no KD."""
    d = lay.data
    steps = plan.vqa_steps if task == VQA else plan.finetune_steps
    pre = "vqa_" if task == VQA else ""
    files = {
        "train": [str(d / f"{pre}train.json")],
        "val": str(d / f"{pre}val.json"),
        "test": str(d / f"{pre}test.json"),
        "image_root": str(d),
    }
    if task == VQA:
        files["answer_list"] = str(d / "answer_list.json")
    return {
        "task": task,
        "model": {"checkpoint": str(lay.pretrained(model)), "image_size": IMAGE_SIZE},
        "data": {**files, **_data_section(plan)},
        "loss": {"momentum_distill": False, "itm_all_ranks": False},
        "optim": {"lr": FINETUNE_LR[task]},
        "eval": {"k_test": plan.k_test, "batch_size": 64},
        "run": {
            "run_dir": str(lay.finetune_dir(model, task)),
            "max_steps": steps,
            "log_every": max(1, min(10, steps // 4)),
            "ckpt_every": 50,
            "seed": plan.seed,
        },
    }


def write_config(lay: Layout, name: str, cfg: dict[str, Any]) -> Path:
    path = lay.configs / f"{name}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, yaml.safe_dump(cfg, sort_keys=False))
    return path


# -------------------------------------------------------------------------------------- stages
def make_data(plan: DemoPlan, lay: Layout) -> None:
    from dlip.data.synthetic import synthesize

    n = plan.train_images + plan.val_images + plan.test_images
    report = synthesize(
        lay.data,
        n,
        seed=plan.seed,
        image_size=IMAGE_SIZE,
        n_val=plan.val_images,
        n_test=plan.test_images,
        contrast=0.0,
        max_objects=2,
        overwrite=True,
    )
    print(f"images {report.images}, captions {report.captions} -> {lay.data}")
    from dlip.data.synth_vqa import synthesize_vqa

    questions = synthesize_vqa(lay.data, seed=plan.seed)
    print("VQA questions: " + ", ".join(f"{s} {n}" for s, n in questions.items()))


def _resume(run_dir: Path) -> str:
    """`--resume auto`: continue an interrupted stage from its checkpoint, else start it (a
    stage killed before its first checkpoint starts over)."""
    from dlip.train.checkpoint import find_latest

    latest = find_latest(run_dir)
    if latest is not None:
        print(f"resuming from {latest}")
    return "auto"


def pretrain(path: Path, run_dir: Path) -> None:
    """`dlip pretrain --config PATH [--resume latest]`."""
    from dlip.train.config import load
    from dlip.train.pretrain import pretrain as run_pretrain

    run_pretrain(load(path), resume=_resume(run_dir))


def finetune(path: Path, task: str, run_dir: Path) -> None:
    """`dlip finetune TASK --config PATH [--resume latest]` (trains, then tests the best)."""
    from dlip.train.finetune import finetune as run_finetune
    from dlip.train.finetune import load_config

    run_finetune(load_config(task, str(path), []), resume=_resume(run_dir))


def stages(plan: DemoPlan, lay: Layout) -> list[Stage]:
    """Every stage in order; configs are written now, so the commands can be shown."""
    synth = f"dlip data synth (seed {plan.seed}, contrast 0, 2 objects) -> {lay.data}"
    data = lay.data / "answer_list.json"  # written last (after the images and captions)
    out = [Stage("synthetic data", data, lambda: make_data(plan, lay), synth)]
    titles = {
        "teacher": "pretrain the teacher from scratch (ITC + ITM + LM)",
        "student_kd": "distill the student from the teacher (BLIP losses + KD terms)",
        "student_nokd": "train the same student without KD (BLIP losses only)",
    }
    for model in MODELS:
        path = write_config(lay, f"pretrain_{model}", pretrain_config(plan, lay, model))
        out.append(
            Stage(
                titles[model],
                lay.pretrained(model) / "model.safetensors",
                lambda p=path, m=model: pretrain(p, lay.pretrain_dir(m)),
                f"dlip pretrain --config {path}",
            )
        )
    for model in MODELS:
        for task in (*TASKS, VQA):
            path = write_config(lay, f"{task}_{model}", finetune_config(plan, lay, model, task))
            out.append(
                Stage(
                    f"finetune + evaluate {model} for {task}",
                    lay.test_results(model, task),
                    lambda p=path, m=model, t=task: finetune(p, t, lay.finetune_dir(m, t)),
                    f"dlip finetune {task} --config {path}",
                )
            )
    return out


def pin_plan(plan: DemoPlan, lay: Layout) -> None:
    """Write RUN/plan.json, or check that an earlier run of RUN used the same plan."""
    path = lay.root / PLAN_FILE
    if path.is_file():
        before = json.loads(path.read_text())
        if before != plan.to_dict():
            raise SystemExit(
                f"{lay.root} holds a demo run with other settings ({before.get('name')!r} plan, "
                f"{path}); use another --out, or --fresh to start over"
            )
        return
    lay.root.mkdir(parents=True, exist_ok=True)
    write_json(path, plan.to_dict())


def run_stages(todo: list[Stage]) -> dict[str, float]:
    """Run what is not done yet, with a header per stage; returns seconds per stage run now."""
    seconds: dict[str, float] = {}
    for i, stage in enumerate(todo, 1):
        header = f"[{i}/{len(todo)}] {stage.title}"
        if stage.output.exists():
            print(f"\n== {header}: done earlier ({stage.output})")
            continue
        print(f"\n== {header}\n   {stage.command}", flush=True)
        start = time.perf_counter()
        stage.run()
        seconds[stage.title] = round(time.perf_counter() - start, 1)
        print(f"   done in {seconds[stage.title]:.0f}s", flush=True)
    return seconds
