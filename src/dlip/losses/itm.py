"""Image-text matching loss (BLIP's ITM) with hard negatives sampled from the ITC similarities.

For each text one negative image and for each image one negative text are drawn (no grad) with
probability softmax(ITC logits) over the non-positive candidates, then the image-grounded
encoder scores 3B pairs: B positives, B (text, negative image), B (negative text, image).

Sampling never crashes: BLIP's `torch.multinomial` fails with "invalid multinomial
distribution" on NaN/inf similarities (fp16 overflow) or rows with every weight zero. Here
non-finite similarities are sanitised first, and a row with no valid negative (every
candidate shows the same image) draws uniformly among the other samples.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from dlip.distributed import (
    all_gather_no_grad,
    all_gather_with_grad,
    all_reduce_max,
    gather_sizes,
    rank_offset,
)
from dlip.tokenizer import Tokenizer

ItmFn = Callable[[Tensor, Tensor, Tensor], Tensor]  # (image_tokens, ids, mask) -> (n, 2)

_BIG = 1e4  # finite stand-in for +-inf logits before the softmax


@dataclass
class ITMOutput:
    loss: Tensor  # scalar cross-entropy over the 3B pairs
    logits: Tensor  # (3B, 2) student logits: [positives; text+neg image; neg text+image]
    labels: Tensor  # (3B,) [1]*B + [0]*2B
    neg_image_idx: Tensor  # (B,) candidate-pool index of each text's negative image
    neg_text_idx: Tensor  # (B,) candidate-pool index of each image's negative text
    across_ranks: bool  # pool = all ranks' samples (True) or this rank's (False)

    @property
    def terms(self) -> dict[str, Tensor]:
        return {"loss_itm": self.loss}


def with_first_token(input_ids: Tensor, token_id: int) -> Tensor:
    """Copy of (B, T) ids with position 0 ([CLS]) replaced: [ENC] for ITM, [DEC] for LM."""
    ids = input_ids.clone()
    ids[:, 0] = token_id
    return ids


@torch.no_grad()
def sample_negatives(
    sim: Tensor,  # (B, C) logits of each row against the C candidates
    own: Tensor,  # (B,) column of each row's own pair
    positive: Tensor | None = None,  # (B, C) bool, True = not a negative (own forced True)
    generator: torch.Generator | None = None,
) -> Tensor:
    """One negative column per row, drawn with probability softmax(sim) over the negatives.

    NaN similarities count as 0 and +-inf as +-1e4, so the weights are always finite. A row
    whose candidates are all positive falls back to a uniform draw among the columns other
    than its own (the least-bad negative; only retrieval batches of one image can hit this).
    Needs at least 2 candidates. `generator` must live on `sim`'s device.
    """
    n_rows, n_cols = sim.shape
    if n_cols < 2:
        raise ValueError(
            f"ITM hard negatives need at least 2 samples to choose from, got {n_cols}: use "
            "drop_last=True for training batches, or sample negatives across ranks"
        )
    rows = torch.arange(n_rows, device=sim.device)
    own_mask = torch.zeros(n_rows, n_cols, dtype=torch.bool, device=sim.device)
    own_mask[rows, own] = True
    pos = own_mask if positive is None else positive.bool() | own_mask
    s = torch.nan_to_num(sim.float(), nan=0.0, posinf=_BIG, neginf=-_BIG).clamp(-_BIG, _BIG)
    weights = s.masked_fill(pos, float("-inf")).softmax(dim=1)  # all-positive row -> NaN
    has_negative = (~pos).any(dim=1, keepdim=True)  # (B, 1)
    uniform = (~own_mask).float()  # every other sample, weight 1
    weights = torch.where(has_negative, weights, uniform)
    return torch.multinomial(weights, 1, generator=generator).squeeze(1)  # (B,)


def build_itm_batch(
    image_tokens: Tensor,  # (B, N, Dv)
    input_ids: Tensor,  # (B, T) with [ENC] first
    attention_mask: Tensor,  # (B, T)
    neg_image_idx: Tensor,  # (B,) pool index of each text's negative image
    neg_text_idx: Tensor,  # (B,) pool index of each image's negative text
    across_ranks: bool = False,
) -> tuple[Tensor, Tensor, Tensor]:
    """(3B, N, Dv) images, (3B, T') ids and masks: positives, text+neg image, neg text+image.

    With `across_ranks` the pool is all ranks' samples: image tokens are gathered with gradient
    (as BLIP's `negative_all_rank`), ids and masks right-padded to the longest rank's length.
    A teacher scores the same pairs by calling this with its own image tokens and the
    student's sampled indices (every rank must then call it too).
    """
    img_pool, ids_pool, mask_pool = image_tokens, input_ids, attention_mask
    if across_ranks:
        sizes = gather_sizes(image_tokens.shape[0], image_tokens.device)
        t_max = all_reduce_max(input_ids.shape[1], input_ids.device)
        pad = (0, t_max - input_ids.shape[1])
        input_ids = F.pad(input_ids, pad, value=Tokenizer.pad_token_id)
        attention_mask = F.pad(attention_mask, pad, value=0)
        img_pool = all_gather_with_grad(image_tokens, sizes)  # (G, N, Dv)
        ids_pool = all_gather_no_grad(input_ids, sizes)  # (G, T')
        mask_pool = all_gather_no_grad(attention_mask, sizes)
    images = torch.cat([image_tokens, img_pool[neg_image_idx], image_tokens])
    ids = torch.cat([input_ids, input_ids, ids_pool[neg_text_idx]])
    mask = torch.cat([attention_mask, attention_mask, mask_pool[neg_text_idx]])
    return images, ids, mask


def itm_loss(
    itm_fn: ItmFn,  # e.g. model.itm_logits
    image_tokens: Tensor,  # (B, N, Dv) vision tokens of this rank (with grad)
    input_ids: Tensor,  # (B, T) tokenized text ([CLS] first; replaced by [ENC] here)
    attention_mask: Tensor,  # (B, T) 1 = token, 0 = pad
    sim_i2t: Tensor,  # (B, G) ITC logits, local images vs gathered texts (ITCOutput)
    sim_t2i: Tensor,  # (B, G) ITC logits, local texts vs gathered images
    *,
    offset: int = 0,  # ITCOutput.offset: column of local row 0 in the sims
    image_idx: Tensor | None = None,  # (B,) image ids: same-image pairs are never negatives
    across_ranks: bool = False,
    enc_token_id: int = Tokenizer.enc_token_id,
    generator: torch.Generator | None = None,
) -> ITMOutput:
    """BLIP ITM: hard negatives from the ITC logits, 3B pairs scored, labels [1]*B + [0]*2B.

    Negatives come from this rank's batch (BLIP pretraining) or, with `across_ranks`, from the
    global batch (retrieval finetuning's `negative_all_rank`; every rank must call this).
    """
    n = image_tokens.shape[0]
    if across_ranks:
        sizes = gather_sizes(n, image_tokens.device)
        pool_offset = rank_offset(sizes)
        s_i2t, s_t2i = sim_i2t, sim_t2i  # (B, G) every column is a candidate
        if sim_i2t.shape[1] != sum(sizes) or pool_offset != offset:
            raise ValueError("across_ranks needs the ITC sims over the whole gathered batch")
        idx_pool = None if image_idx is None else all_gather_no_grad(image_idx.reshape(-1), sizes)
    else:
        pool_offset = 0
        s_i2t = sim_i2t[:, offset : offset + n]  # (B, B) this rank's block
        s_t2i = sim_t2i[:, offset : offset + n]
        if s_i2t.shape[1] != n:
            raise ValueError(f"sims of shape {tuple(sim_i2t.shape)} lack columns {offset}+{n}")
        idx_pool = None if image_idx is None else image_idx.reshape(-1)

    own = pool_offset + torch.arange(n, device=sim_i2t.device)  # (B,)
    positive = None
    if image_idx is not None:
        positive = image_idx.reshape(-1, 1) == idx_pool.reshape(1, -1)  # (B, pool)
    neg_image_idx = sample_negatives(s_t2i, own, positive, generator)  # per text
    neg_text_idx = sample_negatives(s_i2t, own, positive, generator)  # per image

    ids = with_first_token(input_ids, enc_token_id)
    batch = build_itm_batch(
        image_tokens, ids, attention_mask, neg_image_idx, neg_text_idx, across_ranks
    )
    logits = itm_fn(*batch)  # (3B, 2)
    labels = torch.cat([torch.ones(n), torch.zeros(2 * n)]).to(logits.device, torch.long)
    loss = F.cross_entropy(logits.float(), labels)
    return ITMOutput(loss, logits, labels, neg_image_idx, neg_text_idx, across_ranks)
