"""BLIP's VQA answer loss (salesforce/BLIP models/blip_vqa.py, BLIP_VQA.forward with train=True).

Every (question, answer) pair of a batch is decoded: `[DEC] answer [SEP]` cross-attending its
question's states. An answer's loss is its label-smoothed (0.1) token cross-entropy summed over
its tokens (`[SEP]` counted, padding not), times the answer's weight (VQAv2: its share of the
10 annotations; Visual Genome QA: 0.2); the batch loss is the sum over answers divided by the
number of questions, not of answers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor

from dlip.models.vqa import IGNORE, answer_targets


@dataclass
class VQALossOutput:
    loss: Tensor  # scalar
    logits: Tensor  # (N, V) predictions of the counted answer tokens (row-major)
    targets: Tensor  # (A, Ta-1) next-token ids, -100 where not counted
    per_answer: Tensor  # (A,) summed smoothed token CE, before the weights

    @property
    def terms(self) -> dict[str, Tensor]:
        return {"loss_vqa": self.loss}


def vqa_loss(
    logits: Tensor,  # (A, Ta, V) over `answer_ids`, or (N, V) at the counted positions only
    answer_ids: Tensor,  # (A, Ta) [DEC] answer [SEP] + padding
    answer_mask: Tensor,  # (A, Ta)
    weights: Tensor,  # (A,)
    num_questions: int,
    label_smoothing: float = 0.1,
) -> VQALossOutput:
    """sum_a weight_a * CE_a / num_questions (BLIP's).

    The counted positions (position t predicts answer token t+1; padding not counted) are
    those of `distill.lm_kd_mask(answer_mask)`; gathering the decoder's states there before
    the head (as `train.vqa` does) gives the same loss at a fraction of the head's cost."""
    if num_questions < 1:
        raise ValueError(f"num_questions must be >= 1, got {num_questions}")
    if weights.shape != answer_ids.shape[:1]:
        raise ValueError(f"weights {tuple(weights.shape)} for {answer_ids.shape[0]} answers")
    targets = answer_targets(answer_ids, answer_mask)  # (A, Ta-1)
    keep = targets != IGNORE
    if logits.dim() == 3:
        logits = logits[:, :-1][keep]  # (N, V)
    if logits.shape[0] != int(keep.sum()):
        raise ValueError(f"{logits.shape[0]} logit rows for {int(keep.sum())} answer tokens")
    per_token = F.cross_entropy(
        logits.float(), targets[keep], label_smoothing=label_smoothing, reduction="none"
    )  # (N,)
    rows = keep.nonzero()[:, 0]  # (N,) the answer of each counted token
    per_answer = per_token.new_zeros(answer_ids.shape[0]).index_add(0, rows, per_token)  # (A,)
    loss = (weights.float() * per_answer).sum() / num_questions
    return VQALossOutput(loss, logits, targets, per_answer)
