"""BLIP's VQA form at inference (salesforce/BLIP models/blip_vqa.py, `BLIP_VQA`).

A question is encoded by the image-grounded text encoder with `[ENC]` first (cross-attention
to the image tokens); the answer decoder, with its own weights, starts from `[DEC]` and
cross-attends the question encoder's last states, the question's padding masked. Two modes:

- rank (BLIP's default for VQAv2): the first answer token's probability after `[DEC]` scores
  every candidate of the answer list; the top `k_test` are re-scored by the whole answer's
  label-smoothed (0.1) token cross-entropy summed over its tokens, `[SEP]` included, as BLIP's
  `rank_answer` does (its BertLMHeadModel always smooths), and the lowest wins.
- generate: beam search from `[DEC]` (3 beams, max length 10 and min length 1 counting
  `[DEC]`), ended by `[SEP]`; the beam scoring rule is dlip.models.generation's.

One deliberate difference from BLIP: its generate mode lets the decoder attend to the question
padding (its `question_atts` are all ones there), so an answer depends on the longest question
in the batch; dlip masks the padding in both modes (identical for a batch of one question, or
equal-length questions). transformers' `BlipForQuestionAnswering.generate` does the same as
BLIP and also leaves `[ENC]` to the caller; dlip puts it first as BLIP does.
"""

from __future__ import annotations

from functools import lru_cache
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor

from dlip.models.generation import beam_search, check_beam_scoring, decode_captions, token_by_token

if TYPE_CHECKING:
    from dlip.models.blip import BLIP
    from dlip.tokenizer import Tokenizer

IGNORE = -100
QUESTION_LENGTH = 35  # BLIP tokenizes questions with max_length=35
RANK_ROWS = 1024  # answer rows per re-scoring forward: bounds the (rows, T, V) logits


def question_inputs(
    tokenizer: Tokenizer, questions: list[str], device: torch.device | str = "cpu"
) -> tuple[Tensor, Tensor]:
    """(B, Tq) ids with `[ENC]` first, longest padding, at most 35 tokens; and the mask."""
    enc = tokenizer(questions, max_length=QUESTION_LENGTH, padding="longest", truncation=True)
    ids = enc["input_ids"].to(device)
    ids[:, 0] = tokenizer.enc_token_id
    return ids, enc["attention_mask"].to(device)


def answer_inputs(
    tokenizer: Tokenizer, answers: list[str], device: torch.device | str = "cpu"
) -> tuple[Tensor, Tensor]:
    """(A, Ta) ids `[DEC] answer [SEP]`, longest padding, not truncated (BLIP); and the mask."""
    enc = tokenizer(answers, padding="longest", truncation=False)
    ids = enc["input_ids"].to(device)
    ids[:, 0] = tokenizer.bos_token_id
    return ids, enc["attention_mask"].to(device)


@lru_cache(maxsize=4)
def _candidates(tokenizer: Tokenizer, answers: tuple[str, ...]) -> tuple[Tensor, Tensor]:
    """`answer_inputs` of an answer list on the CPU, tokenized once per list: evaluation and
    serving rank every batch against the same list (BLIP's: 3,128 answers)."""
    return answer_inputs(tokenizer, list(answers))


def answer_targets(answer_ids: Tensor, answer_mask: Tensor) -> Tensor:
    """(A, Ta-1) next-token targets of answer rows: padding ignored, `[SEP]` counted."""
    targets = answer_ids[:, 1:].masked_fill(answer_mask[:, 1:] == 0, IGNORE)
    return targets


def answer_token_loss(logits: Tensor, targets: Tensor, label_smoothing: float = 0.1) -> Tensor:
    """(A, Ta-1, V) logits, (A, Ta-1) targets -> (A,) summed token cross-entropy per answer
    (BLIP's BertLMHeadModel with reduction='none'), float32."""
    per_token = F.cross_entropy(
        logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE,
        label_smoothing=label_smoothing, reduction="none",
    )  # fmt: skip
    return per_token.view(targets.shape).sum(dim=1)


def answer_logits(
    model: BLIP, question_states: Tensor, question_mask: Tensor, ids: Tensor, mask: Tensor
) -> Tensor:
    """(A, Ta, V) next-token logits of answer rows; row a reads question_states[a]."""
    states = model.decode(question_states, ids, mask, source_mask=question_mask).tokens
    return model.text_decoder.cls(states)


def rank_answers(
    model: BLIP,
    question_states: Tensor,  # (B, Tq, D)
    question_mask: Tensor,  # (B, Tq)
    cand_ids: Tensor,  # (N, Ta) [DEC] answer [SEP] + padding
    cand_mask: Tensor,  # (N, Ta)
    k: int,
) -> Tensor:
    """(B,) index of each question's answer in the candidate list (BLIP's rank_answer)."""
    b, n = question_states.shape[0], cand_ids.shape[0]
    k = min(k, n)
    start = cand_ids[:1, :1].expand(b, 1)  # (B, 1) [DEC]
    first = answer_logits(model, question_states, question_mask, start, torch.ones_like(start))
    probs = first[:, 0].float().softmax(dim=-1)  # (B, V)
    top = probs.index_select(1, cand_ids[:, 1]).topk(k, dim=1).indices  # (B, k)
    ids, mask = cand_ids[top].flatten(0, 1), cand_mask[top].flatten(0, 1)  # (B*k, Ta)
    states = question_states.repeat_interleave(k, dim=0)  # (B*k, Tq, D)
    atts = question_mask.repeat_interleave(k, dim=0)
    loss = torch.cat([
        answer_token_loss(
            answer_logits(model, states[i : i + RANK_ROWS], atts[i : i + RANK_ROWS],
                          ids[i : i + RANK_ROWS], mask[i : i + RANK_ROWS])[:, :-1],
            answer_targets(ids[i : i + RANK_ROWS], mask[i : i + RANK_ROWS]),
        )
        for i in range(0, ids.shape[0], RANK_ROWS)
    ]).view(b, k)  # fmt: skip
    return top.gather(1, loss.argmin(dim=1, keepdim=True))[:, 0]


def generate_answer_ids(
    model: BLIP,
    question_states: Tensor,  # (B, Tq, D)
    question_mask: Tensor,  # (B, Tq)
    tokenizer: Tokenizer,
    num_beams: int = 3,
    max_length: int = 10,
    min_length: int = 1,
    beam_scoring: str = "blip",
) -> list[list[int]]:
    """[DEC] + generated (+ [SEP]) per question; lengths count [DEC], as BLIP's."""
    check_beam_scoring(beam_scoring)
    if max_length < 2:
        raise ValueError(f"max_length {max_length} leaves no room after [DEC]")
    start = torch.full((question_states.shape[0], 1), tokenizer.bos_token_id,
                       dtype=torch.long, device=question_states.device)  # fmt: skip
    eos = tokenizer.sep_token_id
    if num_beams == 1:
        return token_by_token(model, question_states, start, max_length, min_length, 1.0, eos,
                              lambda logits: logits.argmax(dim=-1),
                              source_mask=question_mask)  # fmt: skip
    return beam_search(model, question_states, start, num_beams, max_length, min_length, 1.0,
                       eos, beam_scoring=beam_scoring, source_mask=question_mask)  # fmt: skip


@torch.no_grad()
def answer(
    model: BLIP,
    pixels: Tensor,  # (B, 3, S, S) normalised
    questions: list[str],
    answer_list: list[str] | None = None,
    k_test: int = 128,
    num_beams: int = 3,
    max_length: int = 10,
    min_length: int = 1,
    beam_scoring: str = "blip",
    tokenizer: Tokenizer | None = None,
) -> list[str]:
    """One answer per (image, question): ranked from `answer_list`, or generated without one.
    Questions go through BLIP's `pre_question` first (as its dataset does)."""
    from dlip.tokenizer import get_tokenizer, pre_question

    if not model.config.vqa:
        raise ValueError(f"model {model.config.name!r} is not a VQA form (config vqa=false)")
    if len(questions) != pixels.shape[0]:
        raise ValueError(f"{pixels.shape[0]} images but {len(questions)} questions")
    if answer_list is not None and not answer_list:
        raise ValueError("answer_list is empty")
    if k_test < 1:
        raise ValueError(f"k_test must be >= 1, got {k_test}")
    check_beam_scoring(beam_scoring)
    tok = tokenizer or get_tokenizer()
    was_training = model.training
    model.eval()
    try:
        ids, mask = question_inputs(tok, [pre_question(q) for q in questions], pixels.device)
        image = model.encode_image(pixels).tokens
        states = model.multimodal(image, ids, mask).tokens  # (B, Tq, D)
        if answer_list is None:
            rows = generate_answer_ids(model, states, mask, tok, num_beams, max_length,
                                       min_length, beam_scoring)  # fmt: skip
            return decode_captions(tok, rows, "")
        cand_ids, cand_mask = (t.to(pixels.device) for t in _candidates(tok, tuple(answer_list)))
        best = rank_answers(model, states, mask, cand_ids, cand_mask, k_test)
        return [answer_list[i] for i in best.tolist()]
    finally:
        model.train(was_training)
