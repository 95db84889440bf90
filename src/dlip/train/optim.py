"""AdamW parameter groups and learning-rate schedules as pure functions of the optimizer step.

Weight decay: norms, biases, embeddings (`nn.Embedding` weights, ViT `pos_embed` / `cls_token`)
and the contrastive temperature `temp` are not decayed; every other weight is. (BLIP itself
decays everything; decaying `temp` or LayerNorm gains only pulls them towards 0, which is wrong
for both.) Tied parameters (the decoder's shared layers and embeddings) appear in exactly one
group, under their first name, and frozen parameters (a teacher) in none.

Schedules: `lr_at(step, ...)` maps the global optimizer step to a learning rate and `set_lr`
writes it into the optimizer before each step. The schedule has no state besides the step
counter, so resuming needs only the step: no `LambdaLR` whose `last_epoch` must be restored.

Gradient accumulation and contrastive negatives: with `accum_steps` micro-batches per optimizer
step, the gradients of the micro-batches are summed, but each micro-batch's ITC softmax and ITM
hard-negative mining see only that micro-batch's samples (times the world size, after the
all-gather), never the whole accumulated batch. A micro-batch of B on N ranks gives each sample
N*B - 1 negatives whatever `accum_steps` is, so accumulation is not equivalent to a bigger batch
for ITC/ITM (or the ITC KD term, whose teacher similarity matrix is just as wide): it averages
more small-batch contrastive losses, it does not make the contrastive problem harder. The LM loss
and the per-sample KD terms are unaffected (up to the averaging weights). To get more negatives,
raise the micro-batch or the number of ranks, not the accumulation.
"""

from __future__ import annotations

import math

import torch
from torch import nn

NO_DECAY_NAMES = ("pos_embed", "cls_token", "temp")


def _no_decay_ids(module: nn.Module) -> set[int]:
    """ids of parameters that are never decayed: embedding tables and named special tokens."""
    ids = set()
    for sub in module.modules():
        if isinstance(sub, nn.Embedding):
            ids.add(id(sub.weight))
    for name, p in module.named_parameters(remove_duplicate=False):
        if name.rsplit(".", 1)[-1] in NO_DECAY_NAMES:
            ids.add(id(p))
    return ids


def param_groups(module: nn.Module, weight_decay: float) -> list[dict]:
    """Two AdamW groups: `decay` (weights of Linear/Conv/...) and `no_decay` (the rest).

    No decay for parameters with fewer than 2 dimensions (biases, norm gains, the scalar `temp`),
    `nn.Embedding` weights (also when tied to an LM head), `pos_embed` and `cls_token`. Each
    trainable parameter appears once even when tied; `requires_grad=False` ones are left out.
    Each group carries `names` (canonical parameter names) for inspection; torch ignores it.
    """
    no_decay_ids = _no_decay_ids(module)
    seen: set[int] = set()
    decay: list[tuple[str, nn.Parameter]] = []
    no_decay: list[tuple[str, nn.Parameter]] = []
    for name, p in module.named_parameters(remove_duplicate=False):
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        if p.ndim < 2 or id(p) in no_decay_ids:
            no_decay.append((name, p))
        else:
            decay.append((name, p))
    groups = [
        {
            "params": [p for _, p in decay],
            "names": [n for n, _ in decay],
            "weight_decay": weight_decay,
        },
        {
            "params": [p for _, p in no_decay],
            "names": [n for n, _ in no_decay],
            "weight_decay": 0.0,
        },
    ]
    return [g for g in groups if g["params"]]


def build_optimizer(
    module: nn.Module,
    lr: float,
    weight_decay: float,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
) -> torch.optim.AdamW:
    """AdamW over `param_groups(module, weight_decay)`; the lr is then driven by `set_lr`."""
    groups = param_groups(module, weight_decay)
    if not groups:
        raise ValueError("the module has no trainable parameters (all requires_grad=False)")
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)


def lr_at(
    step: int,
    *,
    schedule: str,
    base_lr: float,
    min_lr: float = 0.0,
    warmup_lr: float = 0.0,
    warmup_steps: int = 0,
    total_steps: int | None = None,
    steps_per_epoch: int | None = None,
    decay_rate: float = 0.9,
) -> float:
    """Learning rate for global optimizer step `step` (0-based: the lr used by the first step).

    Warmup (both schedules): linear from `warmup_lr` at step 0 towards `base_lr`, reached at
    `warmup_steps`.

    - `"cosine"`: after warmup, cosine from `base_lr` down to `min_lr` at `total_steps`, then
      `min_lr`.
    - `"cosine_epoch"` (BLIP finetuning): constant within an epoch,
      `min_lr + 0.5 * (base_lr - min_lr) * (1 + cos(pi * epoch / epochs))` with
      epochs = ceil(total_steps / steps_per_epoch); warmup as above.
    - `"step"` (BLIP pretraining): epoch = step // steps_per_epoch; the warmup happens only
      within epoch 0 (a warmup longer than an epoch is cut at the epoch boundary, as in BLIP);
      otherwise `max(min_lr, base_lr * decay_rate**epoch)`.
    """
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    if schedule == "cosine":
        if total_steps is None:
            raise ValueError("the cosine schedule needs total_steps")
        if step < warmup_steps:
            return warmup_lr + (base_lr - warmup_lr) * step / warmup_steps
        span = total_steps - warmup_steps
        progress = 1.0 if span <= 0 else min(1.0, (step - warmup_steps) / span)
        return min_lr + 0.5 * (base_lr - min_lr) * (1.0 + math.cos(math.pi * progress))
    if schedule == "cosine_epoch":
        if total_steps is None or not steps_per_epoch or steps_per_epoch < 1:
            raise ValueError("the cosine_epoch schedule needs total_steps and steps_per_epoch")
        if step < warmup_steps:
            return warmup_lr + (base_lr - warmup_lr) * step / warmup_steps
        epochs = math.ceil(total_steps / steps_per_epoch)
        progress = min(1.0, (step // steps_per_epoch) / epochs)
        return min_lr + 0.5 * (base_lr - min_lr) * (1.0 + math.cos(math.pi * progress))
    if schedule == "step":
        if not steps_per_epoch or steps_per_epoch < 1:
            raise ValueError("the step schedule needs steps_per_epoch >= 1")
        epoch = step // steps_per_epoch
        if epoch == 0 and step < warmup_steps:
            return warmup_lr + (base_lr - warmup_lr) * step / warmup_steps
        return max(min_lr, base_lr * decay_rate**epoch)
    raise ValueError(f"unknown schedule {schedule!r}; expected 'cosine', 'cosine_epoch' or 'step'")


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Write `lr` into every param group (times the group's `lr_scale`, when it has one)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
