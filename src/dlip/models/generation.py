"""Caption generation with a KV cache: greedy and beam search.

The search follows transformers' (5.x) semantics exactly, so dlip and HF produce the same ids
for the same weights (tested): lengths count the prompt; `min_length` masks EOS while the
sequence (prompt included) is shorter; beam candidates are the top 2*num_beams continuations;
an EOS candidate joins the finished set only if it ranks within the top num_beams; a finished
hypothesis scores sum(log p) / generated_tokens**length_penalty (EOS counted, prompt not); the
search stops when no running beam can beat the worst finished one at its current length, or at
`max_length`. Greedy applies the repetition penalty to raw logits, beam search to log-probs,
as transformers does. (BLIP ran transformers 4.15, which divided by the length including the
prompt; with its 4-token prompt the chosen caption can differ in rare near-ties.)
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

    def __init__(self, model, image_tokens: Tensor) -> None:
        self.model = model
        self.image = image_tokens  # (B', N, D); None after the first call (K/V cached)
        self.cache = KVCache.empty(model.config.text.num_layers)

    def step(self, ids: Tensor, total_len: int) -> Tensor:
        """(B', T) new ids -> (B', V) float32 logits of the last position."""
        mask = torch.ones(ids.shape[0], total_len, dtype=torch.long, device=ids.device)
        states = self.model.decode(self.image, ids, mask, cache=self.cache).tokens[:, -1:]
        self.image = None
        return self.model.text_decoder.cls(states)[:, -1].float()


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
) -> list[list[int]]:
    """One token per row and step over the KV cache until every row has ended: greedy search
    with `choose=argmax`, nucleus sampling with `choose=nucleus(top_p, ...)`."""
    dec = _Decoder(model, image_tokens)
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
) -> list[list[int]]:
    b, l0 = prompt.shape
    k, dev = num_beams, prompt.device
    dec = _Decoder(model, image_tokens.repeat_interleave(k, dim=0))
    run_seq = prompt.repeat_interleave(k, dim=0).view(b, k, l0)  # (B, K, L)
    run_score = torch.zeros(b, k, device=dev)
    run_score[:, 1:] = NEG  # all beams start identical: only the first may expand
    fin_seq = run_seq.clone()
    fin_len = torch.full((b, k), l0, device=dev)
    fin_score = torch.full((b, k), NEG, device=dev)
    fin_done = torch.zeros(b, k, dtype=torch.bool, device=dev)
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

        # Finished set: merge stopping candidates (length-normalised) into the best K so far.
        norm = cand_score / float(cur + 1 - l0) ** length_penalty
        norm = norm + (~may_improve).float() * NEG + (~(hits & top_mask)).float() * NEG
        fin_seq = torch.cat([fin_seq, torch.zeros_like(fin_seq[..., :1])], 2)  # pad to cur+1
        merged_seq = torch.cat([fin_seq, cand_seq], 1)
        merged_score = torch.cat([fin_score, norm], 1)
        merged_len = torch.cat([fin_len, torch.full_like(norm, cur + 1)], 1)
        merged_done = torch.cat([fin_done, hits & top_mask], 1)
        best = merged_score.topk(k, dim=1).indices
        fin_seq = merged_seq.gather(1, best[..., None].expand(-1, -1, cur + 1))
        fin_score, fin_len = merged_score.gather(1, best), merged_len.gather(1, best)
        fin_done = merged_done.gather(1, best)

        cur += 1
        best_running = run_score[:, :1] / float(cur - l0) ** length_penalty
        worst_done = torch.where(fin_done, fin_score.min(dim=1, keepdim=True).values, NEG)
        may_improve &= (best_running > worst_done).any(dim=1, keepdim=True)
        if not may_improve.any() or hits.all():
            break
        flat_src = (beam_src + torch.arange(b, device=dev)[:, None] * k).flatten()
        dec.cache.reorder(flat_src, cross=False)  # beams of one image share its K/V
        logits = dec.step(run_seq[:, :, -1].reshape(-1, 1), cur)
    lengths = fin_len[:, 0].long().tolist()
    return [fin_seq[i, 0, : lengths[i]].tolist() for i in range(b)]


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
) -> list[list[int]]:
    """Token ids per image: [DEC] + prompt + generated (+ [SEP] when it ended by EOS)."""
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
        model, image, ids, num_beams, max_length, min_length, repetition_penalty, eos
    )


def generate_captions(
    model,
    pixels: Tensor,
    prompt: str,
    num_beams: int,
    max_length: int,
    min_length: int,
    repetition_penalty: float,
    tokenizer=None,
) -> list[str]:
    if tokenizer is None:
        from dlip.tokenizer import get_tokenizer

        tokenizer = get_tokenizer()
    was_training = model.training
    model.eval()
    try:
        rows = generate_ids(
            model, pixels, prompt, num_beams, max_length, min_length, repetition_penalty, tokenizer
        )
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
