"""Distillation pretraining (`dlip pretrain`): the student, the data and the run.

One process (CPU or one GPU, no torch.distributed):

    dlip pretrain --config configs/pretrain/tiny_synth_teacher.yaml run_dir=runs/teacher
    dlip pretrain --config configs/pretrain/tiny_synth.yaml teacher.checkpoint=runs/teacher/final
    dlip pretrain --config configs/pretrain/tiny_synth.yaml --resume latest

Several processes (DDP; gloo on CPU, nccl on CUDA), the same arguments:

    torchrun --nproc_per_node=4 -m dlip pretrain \
        --config configs/pretrain/dlip_small_from_blip_base.yaml teacher.checkpoint=DIR

From Python: `pretrain(load("configs/pretrain/tiny_synth.yaml", ["run_dir=DIR"]))`. The task
(student + KD adapters, frozen teacher beside it) is `dlip.train.task.PretrainTask`; the loop
that trains it is `dlip.train.loop.run`, given this module's `JOB`.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch.utils.data import DataLoader

from dlip.models.blip import BLIP
from dlip.models.config import ModelConfig
from dlip.train.config import PretrainConfig
from dlip.train.loop import Job, run
from dlip.train.task import PretrainTask, build_adapters


def build_task(cfg: PretrainConfig, teacher: BLIP | None = None) -> PretrainTask:
    """Student (+ adapters for `teacher`) as one PretrainTask; every check that can fail before
    step 1 (vocab mismatch, layer maps, missing towers) fails here."""
    from dlip.models.init import apply_inits, redraw_value_output
    from dlip.models.presets import create_model

    student_config = cfg.model_config()
    adapters = build_adapters(cfg, student_config, teacher)
    student = create_model(student_config)
    if cfg.model.text_value_output_std is not None:
        redraw_value_output(student, cfg.model.text_value_output_std)
    m = cfg.model
    apply_inits(student, m.init, m.init_text, teacher)  # before PretrainTask's momentum copy
    if cfg.model.temp_init is not None and student.config.has_itc:
        with torch.no_grad():
            student.temp.fill_(cfg.model.temp_init)
    student.set_grad_checkpointing(cfg.model.grad_checkpointing)
    return PretrainTask(cfg, student, teacher, adapters)


def build_loader(cfg: PretrainConfig, image_config: ModelConfig) -> DataLoader:
    """The training loader; builds `data.synth_dir` first (rank 0) when it is absent.

    `data.manifests` are either jsonl manifests (map-style) or webdataset sources (shard dirs,
    img2dataset folders, .tar patterns, URLs, pipe: commands; dlip.train.wds_loader)."""
    from torch.utils.data import ConcatDataset

    from dlip.data.datasets import ManifestDataset
    from dlip.data.loader import make_loader
    from dlip.train.wds_loader import build_wds_loader, check_sources
    from dlip.transforms import train_transform

    d = cfg.data
    entries = list(d.manifests)  # strings: Path() would fold the // of a URL
    if d.synth_dir is not None:
        from dlip.data.synthdir import synthesize_once

        size = image_config.vision.image_size
        synth = synthesize_once(d.synth_dir, d.synth_images, cfg.run.seed, size)
        entries.insert(0, str(synth / "manifest.jsonl"))
    transform = train_transform(image_config, d.min_scale, d.rand_augment, d.hflip)
    if check_sources(entries):  # jsonl manifests and webdataset sources mixed: ValueError
        return build_wds_loader(cfg, transform, entries)
    if d.weights:
        raise ValueError(
            "data.weights (weighted sampling) needs shard dirs or other webdataset sources"
        )
    if any(n is not None for n in d.num_samples):
        raise ValueError("data.num_samples is for webdataset sources: manifest rows are counted")
    manifests = [Path(m) for m in entries]
    for m in manifests:
        if not m.is_file():
            raise FileNotFoundError(f"data manifest {m} not found")
    sets = [ManifestDataset(m, transform, max_words=d.max_words) for m in manifests]
    dataset = sets[0] if len(sets) == 1 else ConcatDataset(sets)
    return make_loader(
        dataset, d.batch_size, shuffle=True, num_workers=d.num_workers,
        seed=cfg.run.seed, drop_last=True,
    )  # fmt: skip


# What pretraining plugs into the loop (no per-epoch validation).
JOB = Job(build_task=build_task, build_loader=build_loader)


def pretrain(cfg: PretrainConfig, resume: str | None = None) -> Path:
    """Train as `cfg` says (`resume="latest"`: continue run_dir's run); returns run_dir/final."""
    return run(cfg, JOB, resume=resume)
