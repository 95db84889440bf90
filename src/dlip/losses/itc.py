"""Image-text contrastive loss (BLIP's ITA) over all ranks, with optional momentum distillation.

Each rank scores its local rows against the columns of every rank (features all-gathered with
gradient), so the negatives are the whole global batch and 2 ranks x B/2 give the same loss as
1 rank x B. Optionally, as BLIP: a queue of past momentum features adds negatives, and soft
targets from a momentum encoder (`alpha`) replace part of the one-hot targets.

The trainer owns the momentum encoder and the queue: per step it calls `momentum_update`,
computes `image_feat_m`/`text_feat_m` under no_grad, calls `itc_loss`, then
`queue.enqueue(image_feat_m, text_feat_m, image_idx)` (after the loss, so a batch never scores
against itself in the queue).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dlip.distributed import (
    all_gather_no_grad,
    all_gather_with_grad,
    gather_sizes,
    rank_offset,
)
from dlip.precision import float32_math

TEMP_MIN, TEMP_MAX = 0.001, 0.5  # BLIP's clamp of the learnable temperature


@dataclass
class ITCOutput:
    loss: Tensor  # scalar, mean of the i2t and t2i terms
    sim_i2t: Tensor  # (B, G) detached logits: local images vs the G gathered batch texts
    sim_t2i: Tensor  # (B, G) detached logits: local texts vs the G gathered batch images
    offset: int  # global index of this rank's first row (local row i is column offset + i)
    temp: Tensor  # detached clamped temperature used

    @property
    def terms(self) -> dict[str, Tensor]:
        return {"loss_itc": self.loss}


def clamp_temp(temp: Tensor, lo: float = TEMP_MIN, hi: float = TEMP_MAX) -> Tensor:
    """The temperature's value clamped to [lo, hi], with the gradient passed straight through.

    BLIP clamps the parameter in place before each forward and then uses it, so the gradient
    reaches it even at a bound. A plain `temp.clamp()` in the graph would give zero gradient at
    and beyond the bounds (torch's clamp backward excludes them) and could freeze the
    temperature for good. Pair this with `clamp_temp_` after each optimizer step to also keep
    the parameter itself in range, which makes the whole thing BLIP's rule.
    """
    clamped = temp.detach().clamp(lo, hi)
    return clamped + (temp - temp.detach())  # value exactly `clamped`, d/dtemp = 1


@torch.no_grad()
def clamp_temp_(temp: Tensor, lo: float = TEMP_MIN, hi: float = TEMP_MAX) -> None:
    """Clamp the temperature parameter in place (outside autograd, e.g. after optimizer.step)."""
    temp.clamp_(lo, hi)


def alpha_at(step: int, steps_per_epoch: int, alpha: float = 0.4, ramp_epochs: float = 2) -> float:
    """BLIP's distillation weight: linear from 0 to `alpha` over the first `ramp_epochs` epochs.

    `step` counts optimizer steps from the start of training (epoch * steps_per_epoch + i).
    Pretraining ramps over 2 epochs, retrieval finetuning over 1; `ramp_epochs=0` disables it.
    """
    if ramp_epochs <= 0:
        return alpha
    if steps_per_epoch <= 0:
        raise ValueError(f"steps_per_epoch must be positive, got {steps_per_epoch}")
    return alpha * min(1.0, step / (ramp_epochs * steps_per_epoch))


@torch.no_grad()
def momentum_update(model: nn.Module, model_m: nn.Module, m: float = 0.995) -> None:
    """EMA of parameters, `p_m = m * p_m + (1 - m) * p`, matched by name (BLIP: m = 0.995).

    Pass the unwrapped modules (not DDP), e.g. the student and its momentum deep copy, or one
    sub-module pair at a time. Shared (tied) parameters are updated once.
    """
    params = dict(model.named_parameters())
    params_m = dict(model_m.named_parameters())
    if params.keys() != params_m.keys():
        diff = sorted(params.keys() ^ params_m.keys())
        raise ValueError(f"momentum_update: parameter names differ, e.g. {diff[:5]}")
    for name, p_m in params_m.items():
        p_m.lerp_(params[name].detach(), 1.0 - m)  # p_m + (1-m)(p - p_m)


class FeatureQueue(nn.Module):
    """BLIP's queues of past momentum features (and image indices) used as extra negatives.

    Buffers (saved with the training state): `image_queue`, `text_queue` (D, Q) L2-normalised
    random at init, as BLIP; `idx_queue` (1, Q) image indices, -100 (matches nothing) until
    written; `ptr` (1,) the next column to write.

    `enqueue` writes the all-gathered batch at `ptr` and wraps around the end, so any global
    batch size works (BLIP asserts `queue_size % batch_size == 0`, which breaks on short or
    odd-sized batches). A batch larger than the queue keeps only its last Q rows.
    """

    def __init__(self, dim: int, size: int) -> None:
        super().__init__()
        if size < 1:
            raise ValueError(f"queue size must be positive, got {size}")
        self.register_buffer("image_queue", F.normalize(torch.randn(dim, size), dim=0))
        self.register_buffer("text_queue", F.normalize(torch.randn(dim, size), dim=0))
        self.register_buffer("idx_queue", torch.full((1, size), -100, dtype=torch.long))
        self.register_buffer("ptr", torch.zeros(1, dtype=torch.long))

    @property
    def size(self) -> int:
        return self.image_queue.shape[1]

    @torch.no_grad()
    def enqueue(self, image_feat: Tensor, text_feat: Tensor, idx: Tensor | None = None) -> None:
        """Write this step's momentum features of every rank: (B, D) each, idx (B,) or None."""
        sizes = gather_sizes(image_feat.shape[0], image_feat.device)
        images = all_gather_no_grad(image_feat, sizes)  # (G, D)
        texts = all_gather_no_grad(text_feat, sizes)
        if idx is None:
            ids = torch.full((images.shape[0],), -100, dtype=torch.long, device=images.device)
        else:
            ids = all_gather_no_grad(idx.reshape(-1).long(), sizes)  # (G,)
        self.write(images, texts, ids)

    @torch.no_grad()
    def write(self, images: Tensor, texts: Tensor, ids: Tensor) -> None:
        """Write already-global rows (G, D), (G, D), (G,) at `ptr`, wrapping around."""
        q, n = self.size, images.shape[0]
        start = int(self.ptr.item())
        if n > q:  # only the newest q rows can survive; earlier ones would be overwritten
            images, texts, ids = images[-q:], texts[-q:], ids[-q:]
            start = (start + n - q) % q
        cols = (start + torch.arange(images.shape[0], device=self.ptr.device)) % q  # (min(n,q),)
        self.image_queue[:, cols] = images.T.to(self.image_queue.dtype)
        self.text_queue[:, cols] = texts.T.to(self.text_queue.dtype)
        self.idx_queue[0, cols] = ids.to(self.idx_queue.dtype)
        self.ptr[0] = (start + images.shape[0]) % q


def soft_cross_entropy(logits: Tensor, target: Tensor) -> Tensor:
    """mean_rows( -sum_cols log_softmax(logits) * target ); target rows sum to 1."""
    return -(F.log_softmax(logits, dim=1) * target).sum(dim=1).mean()


def positive_targets(
    n_rows: int,
    n_cols: int,
    offset: int,
    device: torch.device,
    image_idx: Tensor | None = None,
    idx_cols: Tensor | None = None,
) -> Tensor:
    """(n_rows, n_cols) hard targets, rows summing to 1.

    Without indices: one-hot at each row's own column `offset + i` (pretraining).
    With `image_idx` (n_rows,) and `idx_cols` (n_cols,): every column showing the same image is
    a positive (retrieval finetuning: several captions per image), weighted equally.
    """
    if image_idx is None:
        target = torch.zeros(n_rows, n_cols, device=device)
        rows = torch.arange(n_rows, device=device)
        target[rows, offset + rows] = 1.0
        return target
    assert idx_cols is not None
    pos = (image_idx.reshape(-1, 1) == idx_cols.reshape(1, -1)).float()  # (n_rows, n_cols)
    return pos / pos.sum(dim=1, keepdim=True)  # own column always matches, so sum >= 1


@float32_math()
def itc_loss(
    image_feat: Tensor,  # (B, D) L2-normalised online image features of this rank
    text_feat: Tensor,  # (B, D) L2-normalised online text features
    temp: Tensor,  # the model's raw temperature parameter; clamped here
    *,
    image_feat_m: Tensor | None = None,  # (B, D) momentum-encoder features, no grad
    text_feat_m: Tensor | None = None,
    queue: FeatureQueue | None = None,  # past momentum features appended as columns
    alpha: float = 0.0,  # weight of the momentum soft targets (see alpha_at)
    image_idx: Tensor | None = None,  # (B,) image ids: same-image pairs are all positives
    momentum_columns: bool = False,
) -> ITCOutput:
    """BLIP ITC: local rows vs [gathered batch ; queue] columns, both directions averaged.

    Columns of the batch part are the online features of all ranks, gathered with gradient (the
    negatives are global and both towers get gradient from both sides). `momentum_columns=True`
    uses the gathered momentum features there instead, exactly as BLIP (gradient then flows
    through the rows only). Similarities are computed in float32.

    Targets: one-hot (or same-`image_idx` positives, the queue's `idx_queue` included), mixed
    as `alpha * softmax(momentum sims) + (1 - alpha) * hard` when `alpha > 0`; the momentum sims
    are the momentum rows against the momentum columns (gathered batch + queue).
    """
    n = image_feat.shape[0]
    t = clamp_temp(temp).float()
    sizes = gather_sizes(n, image_feat.device)
    offset = rank_offset(sizes)
    use_m = image_feat_m is not None and text_feat_m is not None
    if (image_feat_m is None) != (text_feat_m is None):
        raise ValueError("pass both image_feat_m and text_feat_m, or neither")
    if (alpha > 0 or momentum_columns) and not use_m:
        raise ValueError("alpha > 0 and momentum_columns need image_feat_m and text_feat_m")

    if use_m:
        img_m = all_gather_no_grad(image_feat_m, sizes).float()  # (G, D)
        txt_m = all_gather_no_grad(text_feat_m, sizes).float()
    if momentum_columns:
        img_cols, txt_cols = img_m, txt_m
    else:
        img_cols = all_gather_with_grad(image_feat, sizes).float()  # (G, D)
        txt_cols = all_gather_with_grad(text_feat, sizes).float()
    g = img_cols.shape[0]
    if queue is not None:  # (G + Q, D): queue columns carry no gradient
        img_cols = torch.cat([img_cols, queue.image_queue.T.float()])
        txt_cols = torch.cat([txt_cols, queue.text_queue.T.float()])

    sim_i2t = image_feat.float() @ txt_cols.T / t  # (B, G + Q)
    sim_t2i = text_feat.float() @ img_cols.T / t

    with torch.no_grad():
        idx_cols = None
        if image_idx is not None:
            idx_cols = all_gather_no_grad(image_idx.reshape(-1).long(), sizes)  # (G,)
            if queue is not None:
                idx_cols = torch.cat([idx_cols, queue.idx_queue[0]])
        target = positive_targets(n, sim_i2t.shape[1], offset, sim_i2t.device, image_idx, idx_cols)
        target_i2t = target_t2i = target
        if alpha > 0:
            img_m_cols, txt_m_cols = img_m, txt_m
            if queue is not None:
                img_m_cols = torch.cat([img_m, queue.image_queue.T.float()])
                txt_m_cols = torch.cat([txt_m, queue.text_queue.T.float()])
            tm = t.detach()
            sim_i2t_m = image_feat_m.float() @ txt_m_cols.T / tm  # (B, G + Q)
            sim_t2i_m = text_feat_m.float() @ img_m_cols.T / tm
            target_i2t = alpha * sim_i2t_m.softmax(dim=1) + (1 - alpha) * target
            target_t2i = alpha * sim_t2i_m.softmax(dim=1) + (1 - alpha) * target

    loss = (soft_cross_entropy(sim_i2t, target_i2t) + soft_cross_entropy(sim_t2i, target_t2i)) / 2
    return ITCOutput(
        loss=loss,
        sim_i2t=sim_i2t[:, :g].detach(),
        sim_t2i=sim_t2i[:, :g].detach(),
        offset=offset,
        temp=t.detach(),
    )
