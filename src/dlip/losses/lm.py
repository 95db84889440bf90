"""Image-grounded language-modelling loss (BLIP's LM): [DEC] first, label smoothing 0.1.

Position t of the decoder predicts token t+1, so targets are the ids shifted left by one; pads
and prompt tokens are ignored (-100), and the loss is the mean over the tokens that count.

The LM head (a 30,524-way projection) runs only at the positions that count: the decoder's
states are gathered there first. At caption lengths most positions are padding or prompt, and
the head, its softmax and their gradients dominate a small model's step (docs/benchmarks.md).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor

from dlip.losses.itm import with_first_token
from dlip.tokenizer import Tokenizer

DecodeFn = Callable[[Tensor, Tensor, Tensor], Tensor]  # (image_tokens, ids, mask) -> (B, T, D)
HeadFn = Callable[[Tensor], Tensor]  # (N, D) decoder states -> (N, V) next-token logits

IGNORE = -100  # torch's default ignore_index


@dataclass
class LMOutput:
    loss: Tensor  # scalar, mean over counted tokens
    logits: Tensor  # (N, V) at the counted positions only, in row-major order of `mask`
    targets: Tensor  # (B, T-1) next-token ids, IGNORE where not counted
    mask: Tensor  # (B, T-1) bool, True = counted (LM KD gathers the teacher's states here)

    @property
    def terms(self) -> dict[str, Tensor]:
        return {"loss_lm": self.loss}


def lm_targets(
    input_ids: Tensor,  # (B, T)
    attention_mask: Tensor,  # (B, T) 1 = token, 0 = pad
    prompt_length: int = 0,
    pad_id: int | None = Tokenizer.pad_token_id,
) -> Tensor:
    """(B, T-1) targets for logits[:, :-1]: targets[:, t] = input_ids[:, t + 1] or IGNORE.

    Ignored: padding (attention_mask 0, or id == `pad_id`) and the prompt. `prompt_length` is
    BLIP's: the number of leading input positions ([DEC] plus the prompt's words, e.g. 4 for
    "a picture of ") whose tokens are given, not predicted, so the first target that counts is
    input_ids[:, prompt_length].
    """
    targets = input_ids[:, 1:].clone()  # (B, T-1)
    ignore = attention_mask[:, 1:] == 0
    if pad_id is not None:
        ignore |= targets == pad_id
    targets[ignore] = IGNORE
    if prompt_length > 1:
        targets[:, : prompt_length - 1] = IGNORE  # tokens 1..prompt_length-1 are the prompt
    return targets


def token_cross_entropy(logits: Tensor, targets: Tensor, label_smoothing: float = 0.1) -> Tensor:
    """Mean label-smoothed CE over counted tokens: (B, T, V), (B, T) -> scalar, float32.

    Zero (not NaN) when no token counts, so a batch of empty captions cannot poison a step.
    """
    loss_sum = F.cross_entropy(
        logits.flatten(0, 1).float(),
        targets.flatten(),
        ignore_index=IGNORE,
        label_smoothing=label_smoothing,
        reduction="sum",
    )
    return loss_sum / (targets != IGNORE).sum().clamp(min=1)


def lm_loss(
    decode_fn: DecodeFn,  # e.g. lambda img, i, m: model.decode(img, i, m).tokens
    head: HeadFn,  # e.g. model.text_decoder.cls
    image_tokens: Tensor,  # (B, N, Dv) vision tokens
    input_ids: Tensor,  # (B, T) tokenized text ([CLS] first; replaced by [DEC] here)
    attention_mask: Tensor,  # (B, T) 1 = token, 0 = pad
    *,
    prompt_length: int = 0,  # see lm_targets; 0 in pretraining
    dec_token_id: int = Tokenizer.dec_token_id,
    pad_id: int | None = Tokenizer.pad_token_id,
    label_smoothing: float = 0.1,  # BLIP's
) -> LMOutput:
    """BLIP LM: decode [DEC]-first ids with causal self-attention and cross-attention, then the
    head at the counted positions only (equal to the full head's logits there)."""
    ids = with_first_token(input_ids, dec_token_id)
    states = decode_fn(image_tokens, ids, attention_mask)[:, :-1]  # (B, T-1, D)
    targets = lm_targets(input_ids, attention_mask, prompt_length, pad_id)
    mask = targets != IGNORE  # (B, T-1)
    logits = head(states[mask])  # (N, V)
    loss = token_cross_entropy(logits[None], targets[mask][None], label_smoothing)
    return LMOutput(loss, logits, targets, mask)
