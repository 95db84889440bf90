"""BLIP's VQA answer loss (salesforce/BLIP models/blip_vqa.py, BLIP_VQA.forward with train=True).

Every (question, answer) pair of a batch is decoded: `[DEC] answer [SEP]` cross-attending its
question's states. An answer's loss is its label-smoothed (0.1) token cross-entropy summed over
its tokens (`[SEP]` counted, padding not), times the answer's weight (VQAv2: its share of the
10 annotations; Visual Genome QA: 0.2); the batch loss is the sum over answers divided by the
number of questions, not of answers.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from dlip.models.vqa import answer_targets, answer_token_loss


@dataclass
class VQALossOutput:
    loss: Tensor  # scalar
    logits: Tensor  # (A, Ta-1, V) predictions of answer tokens 1..Ta-1
    targets: Tensor  # (A, Ta-1) next-token ids, -100 where not counted
    per_answer: Tensor  # (A,) summed smoothed token CE, before the weights

    @property
    def terms(self) -> dict[str, Tensor]:
        return {"loss_vqa": self.loss}


def vqa_loss(
    logits: Tensor,  # (A, Ta, V) from the answer decoder over `answer_ids`
    answer_ids: Tensor,  # (A, Ta) [DEC] answer [SEP] + padding
    answer_mask: Tensor,  # (A, Ta)
    weights: Tensor,  # (A,)
    num_questions: int,
    label_smoothing: float = 0.1,
) -> VQALossOutput:
    """sum_a weight_a * CE_a / num_questions (BLIP's)."""
    if num_questions < 1:
        raise ValueError(f"num_questions must be >= 1, got {num_questions}")
    if weights.shape != answer_ids.shape[:1]:
        raise ValueError(f"weights {tuple(weights.shape)} for {answer_ids.shape[0]} answers")
    logits = logits[:, :-1]  # position t predicts token t+1
    targets = answer_targets(answer_ids, answer_mask)
    per_answer = answer_token_loss(logits, targets, label_smoothing)  # (A,)
    loss = (weights.float() * per_answer).sum() / num_questions
    return VQALossOutput(loss, logits, targets, per_answer)
