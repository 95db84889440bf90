"""Beam search's two finished-hypothesis rules: "hf" (transformers 5.x: sum / generated tokens
with EOS) and "blip" (transformers 4.15, which BLIP's published numbers came from: sum / all
tokens without EOS, prompt included), on a decoder whose log-probabilities are set by hand."""

from __future__ import annotations

import math

import pytest
import torch

import dlip.models.generation as generation

EOS, V = 1, 6
PROMPT = [0, 4, 5, 4]  # four tokens, as [DEC] + "a picture of"


class _TableDecoder:
    """Stands in for generation._Decoder: log-probs are a function of the sequence so far."""

    def __init__(self, table) -> None:
        self.table, self.seqs = table, []
        outer = self

        class _Cache:
            def reorder(self, rows, cross: bool) -> None:
                outer.seqs = [list(outer.seqs[i]) for i in rows.tolist()]

        self.cache = _Cache()

    def step(self, ids: torch.Tensor, total_len: int) -> torch.Tensor:
        if not self.seqs:
            self.seqs = [row.tolist() for row in ids]
        else:
            for seq, new in zip(self.seqs, ids[:, -1].tolist(), strict=True):
                seq.append(new)
        return torch.stack([self.table(tuple(s)) for s in self.seqs])  # (B', V) log-probs


def _run(monkeypatch, table, scoring: str, k: int = 2, max_length: int = 9, min_length: int = 5):
    monkeypatch.setattr(generation, "_Decoder", lambda model, image: _TableDecoder(table))
    prompt = torch.tensor([PROMPT])
    image = torch.zeros(1, 1, 1)
    out = generation.beam_search(None, image, prompt, k, max_length, min_length, 1.0, EOS,
                                 beam_scoring=scoring)  # fmt: skip
    return out[0][len(PROMPT) :]


def _logp(**p: float) -> torch.Tensor:
    """Log-probs over V tokens: the named ones as given, the rest sharing what is left."""
    named = {int(k[1:]): v for k, v in p.items()}
    rest = (1 - sum(math.exp(v) for v in named.values())) / (V - len(named))
    return torch.tensor([named.get(t, math.log(rest)) for t in range(V)])


def _short_or_long(seq: tuple) -> torch.Tensor:
    gen = seq[len(PROMPT) :]
    if gen == ():
        return _logp(t1=-1.2, t2=-0.5)  # EOS now (the short caption) or token 2
    if gen == (2,):
        return _logp(t2=-0.2, t1=-6.0)
    if gen == (2, 2):
        return _logp(t1=-1.5, t3=-3.0)  # EOS after "2 2" (the long caption)
    return _logp(t1=-3.0)  # elsewhere each token costs >= 1.66 nats and EOS 3


def test_the_rules_pick_different_captions(monkeypatch):
    # short = [EOS]: sum -1.2; long = [2, 2, EOS]: sum -0.5 - 0.2 - 1.5 = -2.2.
    # hf: short -1.2 / 1 = -1.2, long -2.2 / 3 = -0.733: the long one wins.
    # blip: short -1.2 / 4 = -0.3 (4 prompt tokens, EOS not counted), long -2.2 / 6 = -0.367:
    # the short one wins. Every other ending is worse under both (e.g. [2, 2, 0, EOS]:
    # -0.5 - 0.2 - 1.705 - 3.0 = -5.4, hf -1.35, blip -0.77).
    assert _run(monkeypatch, _short_or_long, "hf", min_length=1) == [2, 2, EOS]
    assert _run(monkeypatch, _short_or_long, "blip", min_length=1) == [EOS]


def _reference_415(table, k: int, max_length: int, min_length: int) -> list[int]:
    """transformers 4.15's beam search for one item, written plainly (BeamSearchScorer.process,
    BeamHypotheses.add / is_done, finalize), length_penalty 1, early_stopping False."""
    beams = [(list(PROMPT), 0.0)] + [(list(PROMPT), -1e9)] * (k - 1)
    hyps: list[tuple[float, list[int]]] = []
    done, cur = False, len(PROMPT)

    def add(seq: list[int], total: float) -> None:
        hyps.append((total / len(seq), seq))
        hyps.sort(key=lambda h: -h[0])
        del hyps[k:]

    while True:
        cands = []
        for seq, total in beams:
            logp = table(tuple(seq)).clone()
            if cur < min_length:
                logp[EOS] = -math.inf
            cands += [(total + float(logp[t]), seq, t) for t in range(V)]
        cands.sort(key=lambda c: -c[0])
        top, running = cands[: 2 * k], []
        for rank, (total, seq, t) in enumerate(top):
            if t == EOS:
                if rank < k and not done:
                    add(seq, total)
            else:
                running.append(([*seq, t], total))
            if len(running) == k:
                break
        if not done and len(hyps) == k:
            done = hyps[-1][0] >= top[0][0] / cur
        beams, cur = running, cur + 1
        if done or cur >= max_length:
            break
    if not done:
        for seq, total in beams:
            add(seq, total)
    best = hyps[0][1]
    return ([*best, EOS] if len(best) < max_length else best)[len(PROMPT) :]


def _random_table(seed: int):
    def table(seq: tuple) -> torch.Tensor:
        g = torch.Generator().manual_seed(hash((seed, seq)) % 2**31)
        return (torch.randn(V, generator=g) * 2).log_softmax(-1)

    return table


@pytest.mark.parametrize("seed", range(40))
def test_blip_rule_equals_transformers_4_15(monkeypatch, seed):
    table = _random_table(seed)
    for k, max_length, min_length in [(2, 9, 5), (3, 8, 4), (3, 12, 6)]:
        want = _reference_415(table, k, max_length, min_length)
        assert _run(monkeypatch, table, "blip", k, max_length, min_length) == want


def test_an_unknown_rule_is_refused(monkeypatch):
    with pytest.raises(ValueError, match="beam_scoring='hf5'"):
        _run(monkeypatch, _short_or_long, "hf5")


def test_blip_generate_takes_either_rule():
    """On a real (random, tiny) model both rules run end to end and return captions."""
    import dlip

    torch.manual_seed(0)
    model = dlip.create_model("test_tiny").eval()
    pixels = torch.randn(2, 3, 32, 32)
    for scoring in ("hf", "blip"):
        captions = model.generate(pixels, num_beams=3, max_length=12, beam_scoring=scoring)
        assert len(captions) == 2 and all(isinstance(c, str) for c in captions)
    with pytest.raises(ValueError, match="beam_scoring"):
        model.generate(pixels, num_beams=3, beam_scoring="4.15")
