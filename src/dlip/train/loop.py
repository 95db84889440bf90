"""The pretraining loop: one short `train_step`, and `run` around it (process group, data,
checkpoints, resume, logging). `dlip pretrain` (dlip.train.pretrain) calls `run`.

Resume (`--resume latest`): the newest complete `run_dir/checkpoints/step_N` restores the task
(student, adapters, momentum encoder, queue), the optimizer, the step, the epoch and the number
of loader batches consumed in it, and the RNG states. Data order is a function of (seed, epoch)
(`make_loader`), so the resumed epoch skips its consumed batches by index, without loading
them. The lr schedule is a function of the step (no scheduler state); keep `run.max_steps`
fixed across a resume when the schedule is cosine (its length depends on it). RNG states are
rank 0's: a multi-process resume continues the same data, not the same random draws.

A NaN/inf term stops the run before the optimizer step, naming the step and the term; nothing
is saved then, so the last good checkpoint stays the latest.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, Sampler

from dlip.fileio import write_json
from dlip.losses.itc import alpha_at, clamp_temp_, momentum_update
from dlip.train.checkpoint import (
    capture_rng,
    find_latest,
    load_checkpoint,
    restore_rng,
    save_checkpoint,
)
from dlip.train.config import PretrainConfig, save_resolved
from dlip.train.distributed import (
    get_rank,
    get_world_size,
    is_dist,
    is_main_process,
    setup_device,
)
from dlip.train.logging import (
    MetricsLogger,
    Throughput,
    nonfinite_terms,
    progress_bar,
    progress_postfix,
    reduce_terms,
)
from dlip.train.optim import build_optimizer, lr_at, set_lr
from dlip.train.pretrain import (
    PretrainTask,
    build_task,
    load_teacher,
    seed_everything,
    teacher_identity,
)


class NonFiniteLoss(RuntimeError):
    """A loss term became NaN or inf; the message names the step and the terms."""


def loss_weights(cfg: PretrainConfig) -> dict[str, float]:
    kd = cfg.kd_config() if cfg.teacher.checkpoint else None
    kd_weights = {t: kd.weight(t) for t in kd.enabled} if kd else {}
    return {
        "loss_itc": cfg.loss.itc,
        "loss_itm": cfg.loss.itm,
        "loss_lm": cfg.loss.lm,
        **kd_weights,
    }


def total_loss(terms: Mapping[str, Tensor], weights: Mapping[str, float]) -> Tensor:
    """THE weighted sum of the run: sum over terms of weight * term."""
    return sum(weights[name] * value for name, value in terms.items())


# ----------------------------------------------------------------------------------- the step
def train_step(
    model: nn.Module,  # the task, or DDP(task)
    task: PretrainTask,
    optimizer: torch.optim.Optimizer,
    micro_batches: Sequence[Mapping[str, Tensor]],
    cfg: PretrainConfig,
    step: int,  # optimizer steps done before this one (0-based)
    steps_per_epoch: int,
    total_steps: int,
) -> dict[str, float]:
    """One optimizer step over `micro_batches` (gradient accumulation); returns the terms,
    `loss` and `lr`, averaged over micro-batches and ranks. Raises NonFiniteLoss before
    stepping when a term is NaN/inf."""
    o = cfg.optim
    lr = lr_at(
        step, schedule=o.schedule, base_lr=o.lr, min_lr=o.min_lr, warmup_lr=o.warmup_lr,
        warmup_steps=o.warmup_steps, total_steps=total_steps, steps_per_epoch=steps_per_epoch,
        decay_rate=o.decay_rate,
    )  # fmt: skip
    set_lr(optimizer, lr)
    alpha = alpha_at(step, steps_per_epoch, cfg.loss.alpha) if task.student_m is not None else 0.0
    weights = loss_weights(cfg)
    device = next(task.parameters()).device
    use_bf16 = device.type == "cuda" and cfg.run.bf16
    sums: dict[str, Tensor] = {}
    n = len(micro_batches)
    for i, batch in enumerate(micro_batches):
        last = i == n - 1
        sync = contextlib.nullcontext() if last or not isinstance(model, DDP) else model.no_sync()
        autocast = torch.autocast("cuda", torch.bfloat16) if use_bf16 else contextlib.nullcontext()
        with sync:
            with autocast:
                terms = model(batch, alpha=alpha)
                loss = total_loss(terms, weights)
            (loss / n).backward()
        for name, value in {"loss": loss, **terms}.items():
            sums[name] = sums.get(name, 0.0) + value.detach().float() / n
    metrics = reduce_terms(sums)
    bad = nonfinite_terms(metrics)
    if bad:
        values = ", ".join(f"{k}={metrics[k]}" for k in bad)
        raise NonFiniteLoss(f"non-finite loss at step {step + 1}: {values}; run stopped")
    params = [p for p in task.parameters() if p.requires_grad]
    if o.grad_clip is not None:
        metrics["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(params, o.grad_clip))
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if task.use_itc:  # a captioning-only student has no temperature
        clamp_temp_(task.student.temp)
    if task.student_m is not None:
        momentum_update(task.student, task.student_m, cfg.loss.momentum)
    metrics["lr"] = lr
    return metrics


# ---------------------------------------------------------------------------------- the data
class _SkipSampler(Sampler[int]):
    """The first `skip` indices of `sampler`'s (seed, epoch) order left out (a resumed epoch)."""

    def __init__(self, sampler: Sampler[int], skip: int) -> None:
        self.sampler, self.skip = sampler, skip

    def __iter__(self) -> Iterator[int]:
        return iter(list(self.sampler)[self.skip :])

    def __len__(self) -> int:
        return max(0, len(self.sampler) - self.skip)


def epoch_batches(loader: DataLoader, epoch: int, skip_batches: int) -> Iterator[dict[str, Any]]:
    """The loader's batches of `epoch`, the first `skip_batches` left out without loading."""
    loader.set_epoch(epoch)
    if skip_batches == 0:
        yield from loader
        return
    if hasattr(loader, "iter_from"):  # webdataset (dlip.train.wds_loader): read past them
        yield from loader.iter_from(skip_batches)
        return
    sampler = _SkipSampler(loader.sampler, skip_batches * loader.batch_size)
    yield from DataLoader(
        loader.dataset, batch_size=loader.batch_size, sampler=sampler,
        num_workers=loader.num_workers, collate_fn=loader.collate_fn,
        drop_last=loader.drop_last, pin_memory=loader.pin_memory, generator=loader.generator,
    )  # fmt: skip


def build_loader(cfg: PretrainConfig, image_config) -> DataLoader:
    """The training loader; builds `data.synth_dir` first (rank 0) when it is absent."""
    from torch.utils.data import ConcatDataset

    from dlip.data.datasets import ManifestDataset
    from dlip.data.loader import make_loader
    from dlip.train.wds_loader import build_wds_loader, check_sources
    from dlip.transforms import train_transform

    d = cfg.data
    manifests = [Path(m) for m in d.manifests]
    if d.synth_dir is not None:
        from dlip.data.synthetic import synthesize_once

        size = image_config.vision.image_size
        synth = synthesize_once(d.synth_dir, d.synth_images, cfg.run.seed, size)
        manifests.insert(0, synth / "manifest.jsonl")
    transform = train_transform(image_config, d.min_scale, d.rand_augment, d.hflip)
    shard_dirs = check_sources(manifests)  # dirs and jsonl files mixed: ValueError
    if shard_dirs:
        return build_wds_loader(cfg, transform, shard_dirs)
    if d.weights:
        raise ValueError("data.weights (weighted sampling) needs shard dirs (`dlip data shard`)")
    for m in manifests:
        if not m.is_file():
            raise FileNotFoundError(f"data manifest {m} not found")
    sets = [ManifestDataset(m, transform, max_words=d.max_words) for m in manifests]
    dataset = sets[0] if len(sets) == 1 else ConcatDataset(sets)
    return make_loader(
        dataset, d.batch_size, shuffle=True, num_workers=d.num_workers,
        seed=cfg.run.seed, drop_last=True,
    )  # fmt: skip


def to_inputs(batch: Mapping[str, Any], tokenizer, max_length: int, device) -> dict[str, Tensor]:
    """A collated batch -> the task's inputs (captions tokenized here, never in forward);
    `image_idx` (retrieval finetuning) is passed through."""
    tok = tokenizer(batch["caption"], max_length=max_length, padding="longest")
    out = {
        "image": batch["image"].to(device, non_blocking=True),
        "input_ids": tok["input_ids"].to(device),
        "attention_mask": tok["attention_mask"].to(device),
    }
    if "image_idx" in batch:
        out["image_idx"] = torch.as_tensor(batch["image_idx"]).to(device)
    return out


@dataclass
class Job:
    """What a kind of run plugs into `run`: pretraining by default, finetuning in
    dlip.train.finetune. `validate(task, epoch)` runs on every rank and returns metrics with a
    `score` (higher is better) on rank 0; the best score's student is saved to run_dir/best."""

    build_task: Callable[[Any, Any], PretrainTask] = build_task
    build_loader: Callable[[Any, Any], DataLoader] = build_loader
    validate: Callable[[PretrainTask, int], dict[str, float] | None] | None = None


# ------------------------------------------------------------------------------------ the run
def init_distributed(cfg: PretrainConfig) -> torch.device:
    """Process group only when WORLD_SIZE > 1 (torchrun); the device of this process."""
    return setup_device(cfg.run.device)


def run(cfg: Any, resume: str | None = None, job: Job | None = None) -> Path:
    """Train as `cfg` says (a PretrainConfig, or a FinetuneConfig with its `job`); returns
    `run_dir/final`. Errors in the setup come before step 1."""
    job = job or Job()
    teacher = load_teacher(cfg)  # missing path: FileNotFoundError, before anything is built
    device = init_distributed(cfg)
    run_dir = Path(cfg.run.run_dir)
    seed_everything(cfg.run.seed + get_rank())
    task = job.build_task(cfg, teacher)  # vocab mismatch / layer map out of range: ValueError
    task.to(device).train()
    if cfg.run.compile:  # after .to(): compiled blocks keep their parameters
        n = task.student.compile_blocks()
        if is_main_process():
            print(f"run.compile: torch.compile on {n} student blocks (first steps compile)")
    if teacher is not None:
        bf16 = device.type == "cuda" and cfg.teacher.bf16
        teacher.to(device, torch.bfloat16 if bf16 else torch.float32)
    loader = job.build_loader(cfg, task.student.config)
    steps_per_epoch = len(loader) // cfg.optim.accum_steps
    if steps_per_epoch < 1:
        raise ValueError(
            f"an epoch has {len(loader)} batches of {cfg.data.batch_size}, fewer than "
            f"optim.accum_steps={cfg.optim.accum_steps}: add data or shrink the batch"
        )
    total_steps = cfg.run.max_steps or cfg.run.epochs * steps_per_epoch
    o = cfg.optim
    optimizer = build_optimizer(task, o.lr, o.weight_decay, tuple(o.betas), o.eps)

    step, epoch, consumed, rng = 0, 0, 0, None
    best: dict[str, Any] = {"score": None, "validated_step": -1}
    if resume == "latest":
        latest = find_latest(run_dir)
        if latest is None:
            raise FileNotFoundError(f"--resume latest: no checkpoint under {run_dir}/checkpoints")
        from dlip.models.io import load_strict

        model_state, state = load_checkpoint(latest)
        load_strict(task, model_state, str(latest))
        optimizer.load_state_dict(state["optimizer"])
        step, epoch, consumed, rng = state["step"], state["epoch"], state["consumed"], state["rng"]
        best = state.get("best", best)
    if is_main_process():
        save_resolved(cfg, run_dir)
        write_json(run_dir / "teacher.json", teacher_identity(cfg, teacher))

    model: nn.Module = task
    if is_dist():  # only the task (student + adapters) is wrapped; the teacher never is
        model = DDP(task, device_ids=[device.index] if device.type == "cuda" else None)
    from dlip.tokenizer import get_tokenizer

    tokenizer = get_tokenizer()
    logger = MetricsLogger(run_dir, resume_step=step if resume else None)
    bar = progress_bar(total_steps, initial=step)
    speed = Throughput()
    global_batch = cfg.data.batch_size * cfg.optim.accum_steps * get_world_size()
    if rng is not None:
        restore_rng(rng)  # last, after everything that draws random numbers was built
    speed.start()
    try:
        while step < total_steps:
            group: list[dict[str, Tensor]] = []
            for batch in epoch_batches(loader, epoch, consumed):
                consumed += 1
                batch.pop("skipped", None)
                group.append(to_inputs(batch, tokenizer, cfg.data.max_length, device))
                if len(group) < cfg.optim.accum_steps:
                    continue
                metrics = train_step(
                    model, task, optimizer, group, cfg, step, steps_per_epoch, total_steps
                )
                group, step = [], step + 1
                speed.tick(global_batch)
                metrics.update(samples_per_s=speed.samples_per_s, epoch=epoch)
                if step % cfg.run.log_every == 0 or step == total_steps:
                    logger.log(step, metrics)
                bar.update(1)
                bar.set_postfix(progress_postfix(metrics["loss"], speed, total_steps - step))
                if step % cfg.run.ckpt_every == 0 or step == total_steps:
                    _save(run_dir, cfg, task, optimizer, step, epoch, consumed, teacher, best)
                if step >= total_steps:
                    break
            else:
                epoch, consumed = epoch + 1, 0
                if job.validate is not None and epoch % cfg.eval.every_epochs == 0:
                    _validate(job, task, run_dir, step, epoch, best, logger)
        if job.validate is not None and best["validated_step"] != step:
            done = epoch + (1 if consumed >= len(loader) else 0)  # epochs completed
            _validate(job, task, run_dir, step, done, best, logger)  # the run's last state
    finally:
        bar.close()
        logger.close()
    final = run_dir / "final"
    if is_main_process():
        from dlip.models.io import save

        save(task.student, final)
    if is_dist():
        dist.barrier()
    return final


def _validate(job, task, run_dir, step, epoch, best, logger) -> None:
    """Validate (every rank), log `val_*` (rank 0), keep the best student in run_dir/best."""
    from dlip.models.io import save

    task.eval()
    try:
        metrics = job.validate(task, epoch)
    finally:
        task.train()
    best["validated_step"] = step
    if is_main_process() and metrics is not None:
        score = float(metrics["score"])
        logger.log(step, {f"val_{k}": v for k, v in metrics.items()} | {"epoch": epoch})
        if best["score"] is None or score > best["score"]:
            best.update(score=score, step=step, epoch=epoch, metrics=dict(metrics))
            save(task.student, run_dir / "best")
            write_json(run_dir / "best.json", best)
    if is_dist():
        dist.barrier()


def _save(run_dir, cfg, task, optimizer, step, epoch, consumed, teacher, best=None) -> Path:
    state = {
        "best": best,
        "model": task,
        "optimizer": optimizer.state_dict(),
        "epoch": epoch,
        "consumed": consumed,  # loader batches of `epoch` already trained on
        "rng": capture_rng(),
        "teacher": str(teacher_identity(cfg, teacher)["checkpoint"]),
    }
    return save_checkpoint(run_dir, step, state, keep_last=cfg.run.keep_last)
