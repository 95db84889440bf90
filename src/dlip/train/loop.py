"""The training loop of every run: one short `train_step`, and `run` around it (process group,
data, checkpoints, resume, logging, validation). What a kind of run trains is a `Job`:
pretraining's is `dlip.train.pretrain.JOB`, finetuning's is built in `dlip.train.finetune`. The
loop imports neither.

Resume (`--resume latest`, or `--resume auto` = resume when a checkpoint exists, else start;
the rules of a run directory are in dlip.train.rundir): the newest complete
`run_dir/checkpoints/step_N` restores the task (student, adapters, momentum encoder, queue),
the optimizer, the step, the epoch and the number of loader batches consumed in it, and every
rank's RNG states. Data order is a function of (seed, epoch) (`make_loader`), so the resumed
epoch skips its consumed batches by index, without loading them. The lr schedule is a function
of the step (no scheduler state). A resume with another teacher, or a config change that would
alter the remaining steps (e.g. `run.max_steps` under a cosine schedule), is refused.

A NaN/inf term stops the run before the optimizer step, naming the step and the term; nothing
is saved then, so the last good checkpoint stays the latest.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, Sampler

from dlip.config import to_plain
from dlip.data.common import SkipCounts
from dlip.data.loader import batch_size_of
from dlip.distributed import (
    all_reduce_max,
    barrier,
    broadcast_object,
    get_rank,
    get_world_size,
    is_dist,
    is_main_process,
    setup_device,
)
from dlip.fileio import write_json
from dlip.losses.itc import alpha_at
from dlip.models.blip import BLIP
from dlip.precision import autocast, autocast_dtype, gradient_scaler
from dlip.train.checkpoint import (
    capture_rng_all_ranks,
    find_latest,
    find_latest_sound,
    load_checkpoint,
    read_run_id,
    restore_rng,
    rng_of_rank,
    save_checkpoint,
)
from dlip.train.config import PretrainConfig, save_resolved
from dlip.train.logging import (
    MetricsLogger,
    Throughput,
    nonfinite_terms,
    progress_bar,
    progress_postfix,
    reduce_terms,
    skip_metrics,
    skip_totals,
)
from dlip.train.optim import build_optimizer, lr_at, set_lr
from dlip.train.reporters import ConsoleCopy
from dlip.train.rundir import (
    TEACHER_FILE,
    RunDirError,
    RunLock,
    check_config,
    check_teacher,
    clear_run,
    holds_a_run,
    new_run_id,
    resolve_resume,
)
from dlip.train.task import PretrainTask, load_teacher, save_student, teacher_identity


class NonFiniteLoss(RuntimeError):
    """A loss term became NaN or inf; the message names the step and the terms."""


def loss_weights(cfg: PretrainConfig) -> dict[str, float]:
    kd = cfg.kd_config() if cfg.teacher.checkpoint else None
    kd_weights = {t: kd.weight(t) for t in kd.enabled} if kd else {}
    return {
        "loss_itc": cfg.loss.itc,
        "loss_itm": cfg.loss.itm,
        "loss_lm": cfg.loss.lm,
        "loss_vqa": cfg.loss.vqa,
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
    scaler: torch.amp.GradScaler | None = None,  # the run's (fp16); None: a fresh one
) -> dict[str, float]:
    """One optimizer step over `micro_batches` (gradient accumulation) under the run's
    precision; returns the terms, `loss` and `lr`, averaged over micro-batches and ranks.
    Raises NonFiniteLoss before stepping when a term is NaN/inf."""
    o = cfg.optim
    lr = lr_at(
        step, schedule=o.schedule, base_lr=o.lr, min_lr=o.min_lr, warmup_lr=o.warmup_lr,
        warmup_steps=o.warmup_steps, total_steps=total_steps, steps_per_epoch=steps_per_epoch,
        decay_rate=o.decay_rate,
    )  # fmt: skip
    set_lr(optimizer, lr)
    alpha = 0.0
    if task.student_m is not None:  # BLIP's ramp: 2 epochs in pretraining, 1 in finetuning
        alpha = alpha_at(step, steps_per_epoch, cfg.loss.alpha, cfg.loss.alpha_ramp_epochs)
    weights = loss_weights(cfg)
    device = next(task.parameters()).device
    scaler = scaler or gradient_scaler(device, cfg.run.precision)
    sums: dict[str, Tensor] = {}
    n = len(micro_batches)
    for i, batch in enumerate(micro_batches):
        last = i == n - 1
        sync = contextlib.nullcontext() if last or not isinstance(model, DDP) else model.no_sync()
        with sync:
            with autocast(device, cfg.run.precision):
                terms = model(batch, alpha=alpha)
                loss = total_loss(terms, weights)
            scaler.scale(loss / n).backward()  # fp16: scaled so small gradients survive
        for name, value in {"loss": loss, **terms}.items():
            sums[name] = sums.get(name, 0.0) + value.detach().float() / n
    metrics = reduce_terms(sums)
    bad = nonfinite_terms(metrics)
    if bad:
        values = ", ".join(f"{k}={metrics[k]}" for k in bad)
        raise NonFiniteLoss(f"non-finite loss at step {step + 1}: {values}; run stopped")
    params = [p for p in task.parameters() if p.requires_grad]
    scaler.unscale_(optimizer)  # clip the true gradients (a no-op without fp16)
    if o.grad_clip is not None:
        metrics["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(params, o.grad_clip))
    scaler.step(optimizer)  # fp16: skipped when a gradient overflowed, then the scale shrinks
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    task.after_step()  # temperature clamp, momentum encoder update
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


def to_inputs(batch: Mapping[str, Any], tokenizer, max_length: int, device) -> dict[str, Tensor]:
    """A collated batch -> the task's inputs (captions tokenized here, never in forward);
    `image_idx` (retrieval finetuning) is passed through; VQA batches (a "question" field) get
    BLIP's question / answer layout (`dlip.train.vqa.vqa_inputs`)."""
    if "question" in batch:
        from dlip.train.vqa import vqa_inputs

        return vqa_inputs(batch, tokenizer, device)
    tok = tokenizer(batch["caption"], max_length=max_length, padding="longest")
    out = {
        "image": batch["image"].to(device, non_blocking=True),
        "input_ids": tok["input_ids"].to(device),
        "attention_mask": tok["attention_mask"].to(device),
    }
    if "image_idx" in batch:
        out["image_idx"] = torch.as_tensor(batch["image_idx"]).to(device)
    return out


@dataclass(frozen=True)
class Job:
    """What a kind of run plugs into `run`. `build_task(cfg, teacher)` -> the task module;
    `build_loader(cfg, model_config)` -> the training loader; `validate(task, epoch)` runs on
    every rank and returns metrics with a `score` (higher is better) on rank 0; the best
    score's student is saved to run_dir/best. No `validate`: no validation."""

    build_task: Callable[[Any, BLIP | None], PretrainTask]
    build_loader: Callable[[Any, Any], DataLoader]
    validate: Callable[[PretrainTask, int], dict[str, Any] | None] | None = None


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@dataclass
class Run:
    """A run's state between setup and the last step: what the epoch loop reads and updates."""

    cfg: Any
    job: Job
    run_dir: Path
    device: torch.device
    teacher: BLIP | None
    task: PretrainTask
    model: nn.Module  # the task, or DDP(task)
    loader: DataLoader
    optimizer: torch.optim.Optimizer
    steps_per_epoch: int
    total_steps: int
    teacher_id: dict[str, Any]  # teacher.json: what a resume must match
    step: int = 0
    epoch: int = 0
    consumed: int = 0  # loader batches of `epoch` already trained on
    best: dict[str, Any] = field(default_factory=lambda: {"score": None, "validated_step": -1})
    run_id: str = ""  # names the run's checkpoints (rotation touches only these)
    scaler: torch.amp.GradScaler | None = None  # loss scaling under fp16 (disabled otherwise)
    skips: SkipCounts = field(default_factory=SkipCounts)  # this rank's skipped samples
    shown_skips: dict[str, int] = field(default_factory=dict)  # all ranks', at the last log


# ------------------------------------------------------------------------------------ the run
def run(cfg: Any, job: Job, resume: str | None = None) -> Path:
    """Train as `cfg` says (a PretrainConfig with pretraining's job, or a FinetuneConfig with
    finetuning's); `resume`: None, "latest" or "auto". Returns `run_dir/final`. Errors in the
    setup and refusals of the run directory come before step 1."""
    run_dir = Path(cfg.run.run_dir)
    mode = resolve_resume(run_dir, resume, cfg.run.overwrite, find_latest(run_dir))
    r = setup(cfg, job)
    lock = RunLock(r.run_dir)
    refused = None
    if is_main_process():  # rank 0 holds the lock for the run; every rank hears a refusal
        try:
            lock.acquire()
        except RunDirError as err:
            refused = str(err)
    refused = broadcast_object(refused)
    if refused:
        raise RunDirError(refused)
    try:
        return _run_locked(r, mode)
    finally:
        lock.release()


def _run_locked(r: Run, mode: str | None) -> Path:
    """The run once its directory is locked: resume or start, train, save run_dir/final."""
    cfg, rng = r.cfg, None
    if mode == "latest":
        check_teacher(r.run_dir, r.teacher_id)
        check_config(r.run_dir, cfg)
        rng = resume_from_latest(r)
    else:
        if is_main_process() and holds_a_run(r.run_dir):  # allowed: overwrite, or auto
            clear_run(r.run_dir)
        barrier()
        r.run_id = new_run_id()
    if is_main_process():
        save_resolved(cfg, r.run_dir)
        write_json(r.run_dir / TEACHER_FILE, r.teacher_id)
    if is_dist():  # only the task (student + adapters) is wrapped; the teacher never is
        r.model = wrap_ddp(r.task, r.device)
    with console_copy(r.run_dir, resume=bool(mode)) as console:
        logger = MetricsLogger(
            r.run_dir, resume_step=r.step if mode else None, report_to=cfg.run.report_to,
            run_id=r.run_id, config=to_plain(cfg), wandb_project=cfg.run.wandb_project,
            console=console,
        )  # fmt: skip
        if rng is not None:  # last, after everything that draws random numbers was built
            restore_rng(rng_of_rank(rng, get_rank(), get_world_size()))
        try:
            train_epochs(r, logger)
        finally:
            logger.close()
        skipped = SkipCounts(skip_totals(r.skips, r.device))  # every rank: a collective
        if is_main_process():
            print(f"samples {skipped.summary()} over the run (by reason)", flush=True)
    final = r.run_dir / "final"
    if is_main_process():
        save_student(r.task, final)
    barrier()
    return final


@contextlib.contextmanager
def console_copy(run_dir: Path, resume: bool) -> Iterator[ConsoleCopy | None]:
    """run_dir/train.log: rank 0's console while it trains (other ranks: nothing)."""
    if not is_main_process():
        yield None
        return
    with ConsoleCopy(run_dir, resume) as console:
        yield console


def wrap_ddp(task: PretrainTask, device: torch.device) -> DDP:
    """DDP without the per-forward buffer broadcast: the task's buffers (the momentum queue,
    up to ~118 MB at BLIP's 57,600 entries) are the same on every rank by construction, so
    re-sending rank 0's before every forward would only cost bandwidth. Synced once at init."""
    import inspect

    no_resync = "forward_sync_buffers" in inspect.signature(DDP.__init__).parameters
    option = {"forward_sync_buffers": False} if no_resync else {"broadcast_buffers": False}
    return DDP(task, device_ids=[device.index] if device.type == "cuda" else None, **option)


def setup(cfg: Any, job: Job) -> Run:
    """Teacher, process group, seeded task, loader and optimizer; every config or data problem
    raises here, before step 1."""
    teacher = load_teacher(cfg)  # missing path: FileNotFoundError, before anything is built
    device = setup_device(cfg.run.device)  # a process group only when WORLD_SIZE > 1
    seed_everything(cfg.run.seed + get_rank())
    task = job.build_task(cfg, teacher)  # vocab mismatch / layer map out of range: ValueError
    task.to(device).train()
    if cfg.run.compile:  # after .to(): compiled blocks keep their parameters
        n = task.student.compile_blocks()
        if is_main_process():
            print(f"run.compile: torch.compile on {n} student blocks (first steps compile)")
    if teacher is not None:  # frozen: its weights may take the forwards' low-precision dtype
        teacher.to(device, autocast_dtype(device, cfg.run.precision) or torch.float32)
    loader = job.build_loader(cfg, task.student.config)
    steps_per_epoch = len(loader) // cfg.optim.accum_steps
    if steps_per_epoch < 1:
        raise ValueError(
            f"an epoch has {len(loader)} batches of {cfg.data.batch_size}, fewer than "
            f"optim.accum_steps={cfg.optim.accum_steps}: add data or shrink the batch"
        )
    o = cfg.optim
    optimizer = build_optimizer(task, o.lr, o.weight_decay, tuple(o.betas), o.eps)
    return Run(
        cfg, job, Path(cfg.run.run_dir), device, teacher, task, task, loader, optimizer,
        steps_per_epoch, total_steps=cfg.run.max_steps or cfg.run.epochs * steps_per_epoch,
        # rank 0 reads the teacher's weights once for its digest (not every rank on a requeue)
        teacher_id=broadcast_object(teacher_identity(cfg, teacher) if is_main_process() else None),
        scaler=gradient_scaler(device, cfg.run.precision),
    )  # fmt: skip


def resume_from_latest(r: Run) -> dict[str, Any]:
    """Restore the newest complete checkpoint into `r` (task, optimizer, position, best);
    returns its RNG states, restored by the caller once everything is built."""
    from dlip.models.io import load_strict

    latest, passed_over = find_latest_sound(r.run_dir)
    for line in passed_over:
        print(f"--resume: passing over checkpoint {line}", flush=True)
    if latest is None:
        raise RunDirError(f"--resume: no sound checkpoint under {r.run_dir}/checkpoints")
    if passed_over and is_main_process():
        print(f"--resume: resuming from {latest.name}, the newest sound checkpoint", flush=True)
    model_state, state = load_checkpoint(latest)
    r.run_id = read_run_id(latest) or new_run_id()
    load_strict(r.task, model_state, str(latest))
    r.optimizer.load_state_dict(state["optimizer"])
    if state.get("scaler") and r.scaler is not None:
        r.scaler.load_state_dict(state["scaler"])
    r.step, r.epoch, r.consumed = state["step"], state["epoch"], state["consumed"]
    if is_main_process():  # the run's totals continue on rank 0 (summed over ranks at logs)
        r.skips = SkipCounts(state.get("skipped", {}))
    r.best = state.get("best", r.best)
    return state["rng"]


def train_epochs(r: Run, logger: MetricsLogger) -> None:
    """Epochs until `total_steps`: steps, logs, checkpoints, validation after each epoch
    (every `eval.every_epochs`) and after the last step."""
    from dlip.tokenizer import get_tokenizer

    cfg, tokenizer = r.cfg, get_tokenizer()
    bar = progress_bar(r.total_steps, initial=r.step)
    speed = Throughput()
    global_batch = cfg.data.batch_size * cfg.optim.accum_steps * get_world_size()
    speed.start()
    try:
        while r.step < r.total_steps:
            group: list[dict[str, Tensor]] = []
            for batch in epoch_batches(r.loader, r.epoch, r.consumed):
                r.consumed += 1
                r.skips.update(batch.pop("skipped", {}))
                if _too_small(r, batch_size_of(batch)):
                    continue  # consumed, not trained on: the same on a resumed replay
                group.append(to_inputs(batch, tokenizer, cfg.data.max_length, r.device))
                if len(group) < cfg.optim.accum_steps:
                    continue
                metrics = train_step(
                    r.model, r.task, r.optimizer, group, cfg, r.step, r.steps_per_epoch,
                    r.total_steps, r.scaler,
                )  # fmt: skip
                group, r.step = [], r.step + 1
                speed.tick(global_batch)
                metrics.update(samples_per_s=speed.samples_per_s, epoch=r.epoch)
                if r.step % cfg.run.log_every == 0 or r.step == r.total_steps:
                    skipped = skip_totals(r.skips, r.device)  # every rank, same steps
                    logger.log(r.step, metrics | skip_metrics(skipped))
                    r.shown_skips = skipped
                bar.update(1)
                remaining = r.total_steps - r.step
                bar.set_postfix(progress_postfix(metrics["loss"], speed, remaining, r.shown_skips))
                if r.step % cfg.run.ckpt_every == 0 or r.step == r.total_steps:
                    _save(r)
                if r.step >= r.total_steps:
                    break
            else:
                r.epoch, r.consumed = r.epoch + 1, 0
                if r.job.validate is not None and r.epoch % cfg.eval.every_epochs == 0:
                    _validate(r, r.epoch, logger)
        if r.job.validate is not None and r.best["validated_step"] != r.step:
            done = r.epoch + (1 if r.consumed >= len(r.loader) else 0)  # epochs completed
            _validate(r, done, logger)  # the run's last state
    finally:
        bar.close()


def _too_small(r: Run, n: int) -> bool:
    """Whether a batch that skipped samples left too few to train on: none, or one when ITM
    needs a negative. Skipped on every rank alike (DDP needs the same steps everywhere), so a
    run never ends on bad samples; data order stays a function of (seed, epoch), so an exact
    resume replays the same skips."""
    need = 2 if r.task.use_itm else 1
    return all_reduce_max(int(n < need), r.device) > 0


def _validate(r: Run, epoch: int, logger: MetricsLogger) -> None:
    """Validate (every rank), log `val_*` (rank 0), keep the best student in run_dir/best."""

    assert r.job.validate is not None
    r.task.eval()
    try:
        metrics = r.job.validate(r.task, epoch)
    finally:
        r.task.train()
    best = r.best
    best["validated_step"] = r.step
    if is_main_process() and metrics is not None:
        metrics = dict(metrics)
        samples = metrics.pop("samples", None)  # a few captions: logged, not kept in best.json
        score = float(metrics["score"])
        shown = {"val_samples": samples} if samples else {}
        logger.log(r.step, {f"val_{k}": v for k, v in metrics.items()} | {"epoch": epoch} | shown)
        if best["score"] is None or score > best["score"]:
            best.update(score=score, step=r.step, epoch=epoch, metrics=dict(metrics))
            save_student(r.task, r.run_dir / "best")
            write_json(r.run_dir / "best.json", best)
    if is_dist():
        dist.barrier()


def _save(r: Run) -> Path:
    state = {
        "best": r.best,
        "model": r.task,
        "optimizer": r.optimizer.state_dict(),
        "scaler": r.scaler.state_dict() if r.scaler is not None else {},  # fp16's loss scale
        "epoch": r.epoch,
        "consumed": r.consumed,  # loader batches of `epoch` already trained on
        "rng": capture_rng_all_ranks(),  # every rank's, indexed by rank
        "skipped": skip_totals(r.skips, r.device),  # all ranks' counts so far
        "teacher": str(r.teacher_id["checkpoint"]),
    }
    return save_checkpoint(r.run_dir, r.step, state, r.cfg.run.keep_last, r.run_id)
