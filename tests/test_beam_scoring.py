"""Beam search's two finished-hypothesis rules (dlip.models.generation): "blip", the default
(transformers v4.15 as BLIP ran it: sum / (prompt + generated tokens, EOS not counted)) and "hf"
(transformers 5.x: sum / generated tokens, EOS counted). Each is checked against hand-computed
scores on a decoder whose log-probabilities are set by hand, and against a plain one-item
re-implementation of its transformers version on random decoders and on a tiny real model."""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable

import pytest
import torch

import dlip
import dlip.models.generation as generation
from dlip.inference.predictor import Predictor
from dlip.models.blip import BLIP
from dlip.tokenizer import get_tokenizer

EOS, V = 1, 6
PROMPT = [0, 4, 5, 4]  # four tokens, as [DEC] + "a picture of"
Table = Callable[[tuple], torch.Tensor]  # sequence so far -> (V,) next-token log-probs

pytestmark = pytest.mark.usefixtures("one_thread")


class _TableDecoder:
    """Stands in for generation._Decoder: log-probs are a function of the sequence so far."""

    def __init__(self, table: Table) -> None:
        self.table, self.seqs = table, []

    def reorder(self, rows: torch.Tensor) -> None:
        self.seqs = [list(self.seqs[i]) for i in rows.tolist()]

    def step(self, ids: torch.Tensor, total_len: int) -> torch.Tensor:
        if not self.seqs:
            self.seqs = [row.tolist() for row in ids]
        else:
            for seq, new in zip(self.seqs, ids[:, -1].tolist(), strict=True):
                seq.append(new)
        return torch.stack([self.table(tuple(s)) for s in self.seqs])  # (B', V) log-probs


def _run(monkeypatch, table: Table, scoring: str | None, k: int = 2, max_length: int = 9,
         min_length: int = 5, lp: float = 1.0) -> list[int]:  # fmt: skip
    """dlip's beam search on `table`; scoring None leaves the default. -> generated ids."""
    monkeypatch.setattr(generation, "_Decoder", lambda *_: _TableDecoder(table))
    kw = {} if scoring is None else {"beam_scoring": scoring}
    prompt, image = torch.tensor([PROMPT]), torch.zeros(1, 1, 1)
    out = generation.beam_search(
        None, image, prompt, k, max_length, min_length, 1.0, EOS, length_penalty=lp, **kw
    )
    return out[0][len(PROMPT) :]


# ------------------------------------------------------------------ plain one-item references
def _candidates(table: Table, beams: list, k: int, cur: int, min_length: int, eos: int) -> list:
    """The top 2K (sum, sequence, token) continuations, best first (EOS masked < min_length)."""
    cands = []
    for seq, total in beams:
        logp = table(tuple(seq)).double().clone()
        if cur < min_length:
            logp[eos] = -math.inf
        vals, toks = logp.topk(2 * k)  # the global top 2K lie within each beam's top 2K
        cands += [(total + v, seq, t) for v, t in zip(vals.tolist(), toks.tolist(), strict=True)]
    return sorted(cands, key=lambda c: -c[0])[: 2 * k]


def _keep_best(hyps: list, score: float, seq: list[int], k: int) -> None:
    hyps.append((score, seq))
    hyps.sort(key=lambda h: -h[0])
    del hyps[k:]


def _reference_415(table: Table, prompt: list[int], eos: int, k: int, max_length: int,
                   min_length: int, lp: float = 1.0) -> tuple[float, list[int]]:  # fmt: skip
    """transformers v4.15 for one item, early_stopping False (BeamSearchScorer.process /
    finalize, BeamHypotheses.add / is_done) -> (best score, prompt + generated [+ EOS])."""
    beams = [(list(prompt), 0.0)] + [(list(prompt), -1e9)] * (k - 1)
    hyps: list[tuple[float, list[int]]] = []
    done, cur = False, len(prompt)
    while True:
        top, running = _candidates(table, beams, k, cur, min_length, eos), []
        for rank, (total, seq, t) in enumerate(top):
            if t != eos:
                running.append(([*seq, t], total))
            elif rank < k and not done:  # add(input_ids[beam], sum): the EOS not yet appended
                _keep_best(hyps, total / len(seq) ** lp, seq, k)
            if len(running) == k:
                break
        if not done and len(hyps) == k:  # is_done(next_scores.max(), cur_len)
            done = hyps[-1][0] >= top[0][0] / cur**lp
        beams, cur = running, cur + 1
        if done or cur >= max_length:
            break
    if not done:  # finalize: the running beams, over their full length
        for seq, total in beams:
            _keep_best(hyps, total / len(seq) ** lp, seq, k)
    score, best = hyps[0]
    return score, ([*best, eos] if len(best) < max_length else best)


def _reference_hf5(table: Table, prompt: list[int], eos: int, k: int, max_length: int,
                   min_length: int, lp: float = 1.0) -> tuple[float, list[int]]:  # fmt: skip
    """transformers 5.x for one item, early_stopping False (_update_finished_beams,
    _check_early_stop_heuristic) -> (best score, prompt + generated [+ EOS])."""
    l0 = len(prompt)
    beams = [(list(prompt), 0.0)] + [(list(prompt), -1e9)] * (k - 1)
    hyps: list[tuple[float, list[int]]] = []
    improvable, cur = True, l0
    while True:
        top, running = _candidates(table, beams, k, cur, min_length, eos), []
        for rank, (total, seq, t) in enumerate(top):
            if t == eos or cur + 1 >= max_length:  # stops: scored over generated, EOS counted
                if rank < k and improvable:
                    _keep_best(hyps, total / (cur + 1 - l0) ** lp, [*seq, t], k)
            else:
                running.append(([*seq, t], total))
        beams, cur = running[:k], cur + 1
        if cur >= max_length:
            break
        if len(hyps) == k:
            improvable = beams[0][1] / (cur - l0) ** lp > hyps[-1][0]
        if not improvable:
            break
    return hyps[0]


REFERENCES = {"blip": _reference_415, "hf": _reference_hf5}


# --------------------------------------------------------------- a hand-set decoder: rules differ
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


# short = [EOS]: sum -1.2; long = [2, 2, EOS]: sum -0.5 - 0.2 - 1.5 = -2.2.
# hf:   short -1.2 / 1 (EOS counted) = -1.2;       long -2.2 / 3 = -0.733: the long one wins.
# blip: short -1.2 / 4 (prompt, no EOS) = -0.3;   long -2.2 / (4 + 2) = -0.367: the short wins.
# Every other ending is worse under both (e.g. [2, 2, 0, EOS]: -0.5 - 0.2 - 1.705 - 3.0 = -5.4,
# hf -5.4 / 4 = -1.35, blip -5.4 / 7 = -0.77).
HAND = {"hf": ([2, 2, EOS], -2.2 / 3), "blip": ([EOS], -1.2 / 4)}


def test_hand_computed_sums():
    def total(gen: list[int]) -> float:
        seq = list(PROMPT)
        out = 0.0
        for t in gen:
            out += float(_short_or_long(tuple(seq))[t])
            seq.append(t)
        return out

    assert total([EOS]) == pytest.approx(-1.2)
    assert total([2, 2, EOS]) == pytest.approx(-2.2)
    assert total([2, 2, 0, EOS]) == pytest.approx(-5.4, abs=0.01)


@pytest.mark.parametrize("scoring", ["hf", "blip"])
def test_the_rules_pick_different_captions(monkeypatch, scoring):
    want, score = HAND[scoring]
    assert _run(monkeypatch, _short_or_long, scoring, min_length=1) == want
    ref_score, ref_ids = REFERENCES[scoring](_short_or_long, PROMPT, EOS, 2, 9, 1)
    assert ref_ids == [*PROMPT, *want]
    assert ref_score == pytest.approx(score, abs=1e-6)


def test_default_is_blip(monkeypatch):
    assert _run(monkeypatch, _short_or_long, None, min_length=1) == HAND["blip"][0]
    entry_points = [generation.beam_search, generation.generate_ids,
                    generation.generate_captions, BLIP.generate, Predictor.caption]  # fmt: skip
    for fn in entry_points:
        assert inspect.signature(fn).parameters["beam_scoring"].default == "blip", fn


def test_an_unknown_rule_is_refused(monkeypatch):
    with pytest.raises(ValueError, match=r"beam_scoring='hf5'.*'blip', 'hf'"):
        _run(monkeypatch, _short_or_long, "hf5")


# ---------------------------------------------------------------- random decoders: both rules
def _random_table(seed: int) -> Table:
    def table(seq: tuple) -> torch.Tensor:
        g = torch.Generator().manual_seed(hash((seed, seq)) % 2**31)
        return (torch.randn(V, generator=g) * 2).log_softmax(-1)

    return table


SETTINGS = [(2, 9, 5, 1.0), (3, 8, 4, 1.0), (3, 12, 6, 1.0), (2, 10, 5, 0.5), (3, 11, 5, 2.0)]


@pytest.mark.parametrize("seed", range(40))
def test_both_rules_equal_their_transformers_version(monkeypatch, seed):
    table = _random_table(seed)
    for k, max_length, min_length, lp in SETTINGS:
        for scoring, reference in REFERENCES.items():
            _, want = reference(table, PROMPT, EOS, k, max_length, min_length, lp)
            got = _run(monkeypatch, table, scoring, k, max_length, min_length, lp)
            assert got == want[len(PROMPT) :], (scoring, k, max_length, min_length, lp)


def test_random_decoders_do_tell_the_rules_apart():
    """The rules disagree often (not in rare ties). "blip" then picks a shorter row, or at
    max_length a cut-off running beam (scored over max_length) over a row whose EOS came at the
    last step (scored over max_length - 1 without its EOS, so a smaller divisor)."""
    shorter = cut = differ = 0
    for seed in range(40):
        table = _random_table(seed)
        for k, max_length, min_length, lp in SETTINGS:
            if lp != 1.0:
                continue
            blip = _reference_415(table, PROMPT, EOS, k, max_length, min_length)[1]
            hf = _reference_hf5(table, PROMPT, EOS, k, max_length, min_length)[1]
            differ += blip != hf
            shorter += len(blip) < len(hf)
            cut += len(blip) == len(hf) == max_length and blip[-1] != EOS and hf[-1] == EOS
    assert differ >= 10 and shorter + cut == differ and shorter > cut, (differ, shorter, cut)


# -------------------------------------------------------------------------- a tiny real model
@pytest.fixture(scope="module")
def tiny() -> BLIP:
    torch.manual_seed(0)
    return dlip.create_model("test_tiny").eval()


@torch.no_grad()
def test_real_model_equals_both_references(tiny):
    """generate_ids (KV cache, batch of 2) against the plain references run on uncached full
    decodes; the [SEP] logit is raised so that beams end at various lengths."""
    tok = get_tokenizer()
    torch.manual_seed(1)
    pixels = torch.randn(2, 3, 32, 32)
    image = tiny.encode_image(pixels).tokens
    prompt = generation.prompt_ids(tok, "a picture of ", 1, torch.device("cpu"))[0].tolist()
    eos, bias = tok.sep_token_id, tiny.text_decoder.cls.predictions.bias
    # (K, max_length, min_length, boost): cut at max_length; EOS-ended; the rules differ (x2)
    cases = [(3, 12, 5, 0.2), (2, 10, 6, 0.5), (2, 10, 6, 0.6), (4, 9, 1, 0.5)]
    found: dict[str, list] = {"blip": [], "hf": []}
    for k, max_length, min_length, boost in cases:
        bias[eos] += boost
        try:
            for scoring, reference in REFERENCES.items():
                rows = generation.generate_ids(tiny, pixels, "a picture of ", k, max_length,
                                               min_length, 1.0, tok, scoring)  # fmt: skip
                for b, row in enumerate(rows):

                    def table(seq: tuple, b: int = b) -> torch.Tensor:
                        ids = torch.tensor([seq])
                        logits = tiny.lm_logits(image[b : b + 1], ids, torch.ones_like(ids))
                        return logits[0, -1].float().log_softmax(-1)

                    want = reference(table, prompt, eos, k, max_length, min_length)[1]
                    assert row == want, (scoring, k, max_length, min_length, b)
                found[scoring].append(rows)
        finally:
            bias[eos] -= boost
    assert sum(b != h for b, h in zip(found["blip"], found["hf"], strict=True)) >= 2
    assert any(len(r) == 12 for r in found["blip"][0])  # the first case runs to the end


def test_entry_points_take_either_rule(tiny):
    pixels = torch.randn(2, 3, 32, 32)
    for scoring in ("hf", "blip"):
        captions = tiny.generate(pixels, num_beams=3, max_length=12, beam_scoring=scoring)
        assert len(captions) == 2 and all(isinstance(c, str) for c in captions)
    assert tiny.generate(pixels, num_beams=3, max_length=12) == tiny.generate(
        pixels, num_beams=3, max_length=12, beam_scoring="blip"
    )
    for beams in (1, 3):  # refused even where greedy search ignores it
        with pytest.raises(ValueError, match="beam_scoring"):
            tiny.generate(pixels, num_beams=beams, beam_scoring="4.15")


def test_predictor_passes_the_rule_through(tiny, monkeypatch):
    seen: list[str] = []

    def fake(*args, **kw) -> list[str]:
        seen.append(args[8] if len(args) > 8 else kw.get("beam_scoring", "default"))
        return ["a caption"]

    monkeypatch.setattr(generation, "generate_captions", fake)
    pred = Predictor(tiny)
    image = torch.zeros(32, 32, 3, dtype=torch.uint8).numpy()
    assert pred.caption([image]) == ["a caption"]
    pred.caption([image], beam_scoring="hf")
    assert seen == ["blip", "hf"]


def test_cli_and_config_offer_the_same_rules():
    from dlip.cli.common import BEAM_SCORINGS
    from dlip.config import ConfigError
    from dlip.train.sections import EvalSection

    assert BEAM_SCORINGS == generation.BEAM_SCORINGS
    assert EvalSection().beam_scoring == "blip"
    assert EvalSection(beam_scoring="hf").beam_scoring == "hf"
    with pytest.raises(ConfigError, match=r"eval\.beam_scoring='4\.15'"):
        EvalSection(beam_scoring="4.15")
