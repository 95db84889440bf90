"""Caption generation with a KV cache: greedy and beam search.

Beam search keeps transformers' mechanics in both modes: lengths count the prompt; `min_length`
masks EOS while the sequence (prompt included) is shorter; the candidates are the top
2*num_beams continuations of the running beams; an EOS candidate finishes only if it ranks
within the top num_beams; the next running beams are the best num_beams other candidates.
Greedy applies the repetition penalty to raw logits, beam search to log-probs, as transformers
does. The two `beam_scoring` modes differ in how a finished hypothesis is scored and when an
item is done (K = num_beams, lp = length_penalty, L0 = prompt length, cur = sequence length
before this step's token):

- "blip" (default): transformers v4.15, which BLIP's published captions came from
  (salesforce/BLIP models/blip.py `generate` -> `text_decoder.generate(num_beams=3, ...)`
  with transformers==4.15; generation_beam_search.py `BeamSearchScorer.process`,
  `BeamHypotheses.add` / `is_done`, `BeamSearchScorer.finalize`). An EOS candidate is added
  before its EOS is appended: score = sum(log p) / cur**lp, cur = L0 + generated tokens
  without the EOS. After each step an item is done when K hypotheses are finished and the
  worst of them >= max(this step's 2K candidate sums) / cur**lp (early_stopping=False, as
  BLIP); a done item takes no more hypotheses. At max_length the running beams of items not
  done are added, scored sum / max_length**lp. The returned ids get the EOS back.
- "hf": transformers 5.x (`_update_finished_beams`, `_check_early_stop_heuristic`), which
  dlip matches id for id (tests/test_convert.py): score = sum(log p) / (generated tokens, EOS
  counted, prompt not)**lp; at max_length the top-K candidates finish the same way; an item
  stops when all K are finished and the best running beam's sum / (its generated
  tokens)**lp cannot beat the worst of them.

The rules differ systematically, not in rare near-ties. With lp = 1, an EOS-ended caption of
m tokens is divided by m + 1 under "hf" and by L0 + m under "blip" (L0 = 4 for BLIP's
"[DEC] a picture of"), so a caption of m2 > m1 tokens beats a shorter one only if its (more
negative) sum is within a factor (m2 + 1) / (m1 + 1) of the shorter's under "hf", but within
the smaller factor (L0 + m2) / (L0 + m1) under "blip": "blip" favours shorter captions
(tests/test_beam_scoring.py has a decoder where the two pick different captions).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from dlip.models.text import KVCache

NEG = -1.0e9  # "impossible" score, as transformers uses


def _repetition_penalty(scores: Tensor, seqs: Tensor, penalty: float) -> Tensor:
    """CTRL penalty on tokens already in each row: negative scores * p, positive / p."""
    if penalty == 1.0:
        return scores
    picked = scores.gather(1, seqs)
    picked = torch.where(picked < 0, picked * penalty, picked / penalty)
    return scores.scatter(1, seqs, picked)


class _Decoder:
    """Runs the model's decoder one chunk at a time over a KV cache."""

    def __init__(self, model, image_tokens: Tensor, source_mask: Tensor | None = None) -> None:
        self.model = model
        self.image = image_tokens  # (B', N, D); None after the first call (K/V cached)
        self.source_mask = source_mask  # (B', N) 1 = attend (VQA: question padding 0)
        self.cache = KVCache.empty(model.config.text.num_layers)

    def step(self, ids: Tensor, total_len: int) -> Tensor:
        """(B', T) new ids -> (B', V) float32 logits of the last position."""
        g = prompt_group(ids, self.image)
        if g > 1:  # the prompt once per image, not once per beam: rows b*g..b*g+g-1 equal
            ids = ids[::g]
        mask = torch.ones(ids.shape[0], total_len, dtype=torch.long, device=ids.device)
        states = self.model.decode(
            self.image, ids, mask, cache=self.cache, source_mask=self.source_mask
        ).tokens[:, -1:]
        self.image = None
        logits = self.model.text_decoder.cls(states)[:, -1].float()  # (B' / g, V)
        if g > 1:
            self.cache.self_kv = [_repeat_rows(kv, g) for kv in self.cache.self_kv]
            logits = logits.repeat_interleave(g, 0)
        return logits

    def reorder(self, rows: Tensor) -> None:
        """Beam bookkeeping: cache row r becomes old row rows[r]; self-attention only, the
        beams of one image share its cross-attention keys / values."""
        self.cache.reorder(rows, cross=False)


def _repeat_rows(kv: tuple[Tensor, Tensor] | None, g: int) -> tuple[Tensor, Tensor] | None:
    """(B, H, T, d) keys and values -> (B*g, H, T, d), each row g times in a row."""
    return None if kv is None else (kv[0].repeat_interleave(g, 0), kv[1].repeat_interleave(g, 0))


def prompt_group(ids: Tensor, image: Tensor | None) -> int:
    """g > 1 when the first step gives g identical prompt rows per image (beam search with
    shared image K/V); 1 otherwise (later steps, greedy, or one image row per beam)."""
    if image is None or ids.shape[0] <= image.shape[0] or ids.shape[0] % image.shape[0]:
        return 1
    g = ids.shape[0] // image.shape[0]
    rows = ids.view(image.shape[0], g, -1)
    return g if bool((rows == rows[:, :1]).all()) else 1


def stepper(model, image_tokens: Tensor, source_mask: Tensor | None = None):
    """The decoder loop's stepper: the model's own when it brings one (`step_decoder`, e.g.
    dlip.inference.ort's ONNX Runtime graphs), else `_Decoder` over its PyTorch modules."""
    make = getattr(model, "step_decoder", None)
    if make is not None:
        return make(image_tokens, source_mask)
    return _Decoder(model, image_tokens, source_mask)


@torch.no_grad()
def token_by_token(
    model,
    image_tokens: Tensor,  # (B, N, D)
    prompt: Tensor,  # (B, L0) ids starting with [DEC]
    max_length: int,
    min_length: int,
    repetition_penalty: float,
    eos_id: int,
    choose: Callable[[Tensor], Tensor],  # (B, V) adjusted logits -> (B,) next ids
    source_mask: Tensor | None = None,  # (B, N) cross-attention mask (VQA question padding)
) -> list[list[int]]:
    """One token per row and step over the KV cache until every row has ended: greedy search
    with `choose=argmax`, nucleus sampling with `choose=nucleus(top_p, ...)`."""
    dec = stepper(model, image_tokens, source_mask)
    seqs = prompt
    done = torch.zeros(prompt.shape[0], dtype=torch.bool, device=prompt.device)
    logits = dec.step(prompt, prompt.shape[1])
    while seqs.shape[1] < max_length:
        logits = _repetition_penalty(logits, seqs, repetition_penalty)
        if seqs.shape[1] < min_length:
            logits[:, eos_id] = float("-inf")
        nxt = choose(logits)  # (B,)
        nxt = torch.where(done, torch.full_like(nxt, eos_id), nxt)
        seqs = torch.cat([seqs, nxt[:, None]], dim=1)
        done |= nxt == eos_id
        if done.all():
            break
        logits = dec.step(nxt[:, None], seqs.shape[1])
    return [_trim(row, eos_id) for row in seqs.tolist()]


def argmax(logits: Tensor) -> Tensor:
    """Greedy choice: (B, V) -> (B,)."""
    return logits.argmax(dim=-1)


def nucleus(
    top_p: float, temperature: float = 1.0, generator: torch.Generator | None = None
) -> Callable[[Tensor], Tensor]:
    """Nucleus (top-p) choice: (B, V) logits -> (B,) ids drawn from the smallest set with
    probability >= top_p, after dividing by `temperature`; `generator` makes it reproducible."""

    def choose(logits: Tensor) -> Tensor:
        probs = (logits / temperature).softmax(-1)
        sorted_p, order = probs.sort(dim=-1, descending=True)
        cum = sorted_p.cumsum(-1)
        sorted_p = sorted_p.masked_fill(cum - sorted_p >= top_p, 0.0)  # the first always stays
        pick = torch.multinomial(sorted_p, 1, generator=generator)  # (B, 1), renormalises
        return order.gather(1, pick)[:, 0]

    return choose


def _trim(row: list[int], eos_id: int, start: int = 1) -> list[int]:
    """Cut after the first EOS following the prompt start."""
    for i in range(start, len(row)):
        if row[i] == eos_id:
            return row[: i + 1]
    return row


BEAM_SCORINGS = ("blip", "hf")


def check_beam_scoring(beam_scoring: str) -> None:
    """Raise ValueError unless `beam_scoring` is one of BEAM_SCORINGS."""
    if beam_scoring not in BEAM_SCORINGS:
        raise ValueError(f"beam_scoring={beam_scoring!r}: expected one of {BEAM_SCORINGS}")


def _merge_finished(fin: list[Tensor], cand_seq: Tensor, norm: Tensor, ok: Tensor, cur: int):
    """Keep the best K of the finished set and the eligible (`ok`) candidates, whose
    length-normalised scores are `norm`; fin = [seq (B,K,cur+1), score, len, done]."""
    k = fin[1].shape[1]
    norm = norm + (~ok).float() * NEG
    merged_seq = torch.cat([fin[0], cand_seq], 1)
    merged_score = torch.cat([fin[1], norm], 1)
    merged_len = torch.cat([fin[2], torch.full_like(norm, cur + 1)], 1)
    merged_done = torch.cat([fin[3], ok], 1)
    best = merged_score.topk(k, dim=1).indices
    return [
        merged_seq.gather(1, best[..., None].expand(-1, -1, cur + 1)),
        merged_score.gather(1, best), merged_len.gather(1, best), merged_done.gather(1, best),
    ]  # fmt: skip


def _blip_finish(
    fin: list[Tensor],
    cand: tuple[Tensor, Tensor, Tensor],
    may_improve: Tensor,
    cur: int,
    last: bool,
    eos_id: int,
    length_penalty: float,
) -> tuple[list[Tensor], Tensor]:
    """One step of transformers 4.15's bookkeeping (BeamHypotheses / BeamSearchScorer, the
    version BLIP ran): an EOS candidate ranked in the top K finishes scored sum / cur**lp (its
    tokens without the EOS, prompt included); the item is done once K are finished and none
    beats max(candidate sums) / cur**lp; at max_length the K best non-EOS candidates (the
    running beams) finish scored sum / (cur + 1)**lp unless the item is done."""
    cand_seq, cand_score, token = cand
    k = fin[1].shape[1]
    is_eos = token == eos_id  # (B, 2K)
    top = torch.arange(cand_score.shape[1], device=cand_score.device) < k
    ok = is_eos & top & may_improve
    fin = _merge_finished(fin, cand_seq, cand_score / float(cur) ** length_penalty, ok, cur)
    best = cand_score.max(dim=1, keepdim=True).values / float(cur) ** length_penalty
    full = fin[3].all(dim=1, keepdim=True)
    may_improve = may_improve & ~(full & (fin[1].min(dim=1, keepdim=True).values >= best))
    if last:
        running = (cand_score + is_eos.float() * NEG).topk(k, dim=1).indices
        chosen = torch.zeros_like(is_eos).scatter(1, running, True) & ~is_eos
        norm = cand_score / float(cur + 1) ** length_penalty
        fin = _merge_finished(fin, cand_seq, norm, chosen & may_improve, cur)
    return fin, may_improve


@torch.no_grad()
def beam_search(
    model,
    image_tokens: Tensor,  # (B, N, D)
    prompt: Tensor,  # (B, L0)
    num_beams: int,
    max_length: int,
    min_length: int,
    repetition_penalty: float,
    eos_id: int,
    length_penalty: float = 1.0,
    beam_scoring: str = "blip",
    source_mask: Tensor | None = None,  # (B, N) cross-attention mask (VQA question padding)
    share_image_kv: bool = True,
) -> list[list[int]]:
    """Best finished id row per item: prompt + generated (+ EOS when it ended by EOS).
    `beam_scoring` is "blip" (transformers 4.15, as BLIP ran it) or "hf" (transformers 5.x);
    the module docstring gives both rules. `share_image_kv`: an item's cross-attention keys /
    values are projected once for its K beams (False: once per beam, as BLIP and transformers
    do by repeating the image; the same ids, K times the projection work)."""
    check_beam_scoring(beam_scoring)
    b, l0 = prompt.shape
    k, dev = num_beams, prompt.device
    # one image (and source mask) per item: its cross-attention keys / values are projected
    # once and shared by its K beams (text.Attention._grouped), not once per beam
    reps = 1 if share_image_kv else k
    mask = None if source_mask is None else source_mask.repeat_interleave(reps, dim=0)
    dec = stepper(model, image_tokens.repeat_interleave(reps, dim=0), mask)
    run_seq = prompt.repeat_interleave(k, dim=0).view(b, k, l0)  # (B, K, L)
    run_score = torch.zeros(b, k, device=dev)
    run_score[:, 1:] = NEG  # all beams start identical: only the first may expand
    fin = [run_seq.clone(), torch.full((b, k), NEG, device=dev)]  # seq, score, len, done
    fin += [torch.full((b, k), l0, device=dev), torch.zeros(b, k, dtype=torch.bool, device=dev)]
    may_improve = torch.ones(b, 1, dtype=torch.bool, device=dev)
    top_mask = torch.arange(2 * k, device=dev) < k  # EOS candidates must rank in the top K
    cur = l0
    logits = dec.step(run_seq.flatten(0, 1), cur)  # (B*K, V)
    while True:
        logp = _repetition_penalty(
            logits.log_softmax(-1), run_seq.flatten(0, 1), repetition_penalty
        )
        if cur < min_length:
            logp[:, eos_id] = float("-inf")
        vocab = logp.shape[-1]
        acc = (logp.view(b, k, vocab) + run_score[..., None]).view(b, k * vocab)
        cand_score, cand = acc.topk(2 * k, dim=1)  # (B, 2K)
        src_beam, token = cand // vocab, cand % vocab
        cand_seq = torch.cat(
            [run_seq.gather(1, src_beam[..., None].expand(-1, -1, cur)), token[..., None]], 2
        )
        hits = (token == eos_id) | (cur + 1 >= max_length)  # (B, 2K)

        # Running beams: the best K candidates that did not stop.
        keep = (cand_score + hits.float() * NEG).topk(k, dim=1).indices  # (B, K)
        run_seq = cand_seq.gather(1, keep[..., None].expand(-1, -1, cur + 1))
        run_score = (cand_score + hits.float() * NEG).gather(1, keep)
        beam_src = src_beam.gather(1, keep)  # (B, K) which old beam each new one extends

        fin[0] = torch.cat([fin[0], torch.zeros_like(fin[0][..., :1])], 2)  # pad to cur+1
        if beam_scoring == "blip":
            fin, may_improve = _blip_finish(
                fin, (cand_seq, cand_score, token), may_improve, cur, cur + 1 >= max_length,
                eos_id, length_penalty,
            )  # fmt: skip
            cur += 1
        else:  # transformers 5.x: generated tokens only, EOS counted
            norm = cand_score / float(cur + 1 - l0) ** length_penalty
            fin = _merge_finished(fin, cand_seq, norm, hits & top_mask & may_improve, cur)
            cur += 1
            best_running = run_score[:, :1] / float(cur - l0) ** length_penalty
            worst_done = torch.where(fin[3], fin[1].min(dim=1, keepdim=True).values, NEG)
            may_improve &= (best_running > worst_done).any(dim=1, keepdim=True)
        if not may_improve.any() or hits.all():
            break
        flat_src = (beam_src + torch.arange(b, device=dev)[:, None] * k).flatten()
        dec.reorder(flat_src)  # beams of one image share its cross K/V
        logits = dec.step(run_seq[:, :, -1].reshape(-1, 1), cur)
    lengths = fin[2][:, 0].long().tolist()
    return [fin[0][i, 0, : lengths[i]].tolist() for i in range(b)]


def prompt_ids(tokenizer, prompt: str, batch: int, device: torch.device) -> Tensor:
    """[DEC] + prompt tokens, without the trailing [SEP] (BLIP): (B, L0)."""
    ids = tokenizer.encode(prompt)[:-1]
    ids[0] = tokenizer.bos_token_id
    return torch.tensor([ids] * batch, dtype=torch.long, device=device)


@torch.no_grad()
def generate_ids(
    model,
    pixels: Tensor,
    prompt: str,
    num_beams: int,
    max_length: int,
    min_length: int,
    repetition_penalty: float,
    tokenizer,
    beam_scoring: str = "blip",
) -> list[list[int]]:
    """Token ids per image: [DEC] + prompt + generated (+ [SEP] when it ended by EOS).
    `beam_scoring` ("blip" or "hf", see the module docstring) is checked even for greedy."""
    check_beam_scoring(beam_scoring)
    image = model.encode_image(pixels).tokens
    ids = prompt_ids(tokenizer, prompt, pixels.shape[0], pixels.device)
    if max_length <= ids.shape[1]:
        raise ValueError(
            f"max_length {max_length} leaves no room after a {ids.shape[1]}-token prompt"
        )
    eos = tokenizer.sep_token_id
    if num_beams == 1:
        return token_by_token(
            model, image, ids, max_length, min_length, repetition_penalty, eos, argmax
        )
    return beam_search(
        model, image, ids, num_beams, max_length, min_length, repetition_penalty, eos,
        beam_scoring=beam_scoring,
    )  # fmt: skip


def generate_captions(
    model,
    pixels: Tensor,
    prompt: str,
    num_beams: int,
    max_length: int,
    min_length: int,
    repetition_penalty: float,
    tokenizer=None,
    beam_scoring: str = "blip",
) -> list[str]:
    if tokenizer is None:
        from dlip.tokenizer import get_tokenizer

        tokenizer = get_tokenizer()
    was_training = model.training
    model.eval()
    try:
        rows = generate_ids(
            model, pixels, prompt, num_beams, max_length, min_length, repetition_penalty,
            tokenizer, beam_scoring,
        )  # fmt: skip
    finally:
        model.train(was_training)
    return decode_captions(tokenizer, rows, prompt)


def decode_captions(tokenizer, rows: list[list[int]], prompt: str) -> list[str]:
    """Generated id rows -> caption texts with the prompt stripped."""
    # BLIP decoded with transformers 4.x, whose BERT cleanup joins "man ' s" -> "man's".
    texts = tokenizer.batch_decode(
        rows, skip_special_tokens=True, clean_up_tokenization_spaces=True
    )
    return [t[len(prompt) :].strip() if t.startswith(prompt.strip()) else t.strip() for t in texts]
