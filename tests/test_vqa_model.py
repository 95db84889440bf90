"""The VQA form (BLIP_VQA): config rules, the answer loss, rank and generate modes against plain
re-implementations, question padding, and the form made from a pretraining model."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F

import dlip
from dlip.config import ConfigError
from dlip.losses.distill import lm_kd_mask
from dlip.losses.vqa import vqa_loss
from dlip.models import vqa
from dlip.models.blip import BLIP
from dlip.models.io import task_form, vqa_form
from dlip.tokenizer import get_tokenizer
from test_beam_scoring import REFERENCES

pytestmark = pytest.mark.usefixtures("one_thread")

ANSWERS = ["yes", "no", "red", "blue", "green", "2", "3", "red circle", "a big blue square",
           "left of the triangle", "none"]  # fmt: skip
QUESTIONS = ["what color is the circle?", "is there a square?", "how many shapes are there?"]


@pytest.fixture(scope="module")
def tok():
    return get_tokenizer()


@pytest.fixture(scope="module")
def model() -> BLIP:
    torch.manual_seed(0)
    m = dlip.create_model(dlip.get_config("test_tiny").vqa_form()).eval()
    with torch.no_grad():  # livelier text towers than BERT init: answers differ by question
        for name, p in m.named_parameters():
            if name.startswith(("text_encoder", "text_decoder")) and "LayerNorm" not in name:
                p.add_(torch.randn_like(p))
    return m


@pytest.fixture(scope="module")
def pixels() -> torch.Tensor:
    torch.manual_seed(1)
    return torch.randn(3, 3, 32, 32)


def _states(model, tok, pixels, questions):
    ids, mask = vqa.question_inputs(tok, questions)
    return model.multimodal(model.encode_image(pixels).tokens, ids, mask).tokens, mask


# -------------------------------------------------------------------------------- the form
def test_config_rules():
    base = dlip.get_config("test_tiny")
    form = base.vqa_form()
    assert form.vqa and not form.text.tie_decoder and form.has_encoder and form.has_decoder
    assert not form.has_itc and base.has_itc
    with pytest.raises(ConfigError, match="tie_decoder=false"):
        base.replace(vqa=True)
    with pytest.raises(ConfigError, match="has_encoder and has_decoder"):
        form.replace(has_encoder=False)
    assert dlip.get_config("blip_base_vqa") == dlip.get_config("blip_base").vqa_form().replace(
        name="blip_base_vqa"
    ).with_image_size(480)


def test_module_names_are_blip_vqas(model):
    names = set(model.state_dict())
    assert not any(n.startswith(("vision_proj", "text_proj", "itm_head", "temp")) for n in names)
    assert "text_encoder.encoder.layer.0.crossattention.self.key.weight" in names
    # the answer decoder is untied and reads (hidden)-wide question states
    key = model.text_decoder.bert.encoder.layer[0].crossattention.self.key
    assert key.weight.shape == (32, 32)
    assert key is not model.text_encoder.encoder.layer[0].crossattention.self.key
    enc_ff = model.text_encoder.encoder.layer[0].intermediate.dense.weight
    assert model.text_decoder.bert.encoder.layer[0].intermediate.dense.weight is not enc_ff


def test_captioning_and_itc_calls_are_refused(model, pixels):
    with pytest.raises(RuntimeError, match="VQA form"):
        model.generate(pixels)
    with pytest.raises(RuntimeError, match="VQA form"):
        model.encode_text(torch.ones(1, 4, dtype=torch.long), torch.ones(1, 4))
    with pytest.raises(ValueError, match="not a VQA form"):
        dlip.create_model("test_tiny").answer(pixels[:1], ["what?"])


# -------------------------------------------------------------------------------- the loss
def test_loss_is_blips_weighted_sum_over_questions(model, tok, pixels):
    # two questions: the first with 3 distinct answers, the second with 1 (BLIP's n = [3, 1])
    answers, weights, n = ["red", "blue", "red circle", "yes"], [0.6, 0.3, 0.1, 1.0], [3, 1]
    states, qmask = _states(model, tok, pixels[:2], QUESTIONS[:2])
    states, qmask = (
        states.repeat_interleave(torch.tensor(n), 0),
        qmask.repeat_interleave(torch.tensor(n), 0),
    )
    ids, amask = vqa.answer_inputs(tok, answers)
    logits = vqa.answer_logits(model, states, qmask, ids, amask)
    out = vqa_loss(logits, ids, amask, torch.tensor(weights), num_questions=2)
    want = 0.0
    for a, (answer, w) in enumerate(zip(answers, weights, strict=True)):
        row = [tok.bos_token_id, *tok.encode(answer)[1:]]  # [DEC] answer [SEP], unpadded
        one = torch.tensor([row])
        lg = vqa.answer_logits(model, states[a : a + 1], qmask[a : a + 1], one,
                               torch.ones_like(one))  # fmt: skip
        ce = F.cross_entropy(lg[0, :-1], one[0, 1:], label_smoothing=0.1, reduction="sum")
        want += w * ce.item()
    assert out.loss.item() == pytest.approx(want / 2, rel=1e-5)
    assert out.per_answer.shape == (4,) and set(out.terms) == {"loss_vqa"}
    with pytest.raises(ValueError, match="weights"):
        vqa_loss(logits, ids, amask, torch.ones(3), 2)
    # The head run at the counted positions only (how train.vqa calls it): same loss.
    keep = lm_kd_mask(amask)  # (A, Ta)
    assert keep.sum() < keep.numel()  # padding and the last position are left out
    packed = vqa_loss(logits[keep], ids, amask, torch.tensor(weights), num_questions=2)
    assert packed.loss.item() == pytest.approx(out.loss.item(), rel=1e-6)
    torch.testing.assert_close(packed.per_answer, out.per_answer)
    with pytest.raises(ValueError, match="logit rows"):
        vqa_loss(logits[keep][1:], ids, amask, torch.tensor(weights), num_questions=2)


# -------------------------------------------------------------------------------- rank mode
def _full_scores(model, tok, state, qmask, answers) -> list[float]:
    """Each answer scored alone (no padding, no batching): -summed smoothed CE."""
    out = []
    for answer in answers:
        one = torch.tensor([[tok.bos_token_id, *tok.encode(answer)[1:]]])
        lg = vqa.answer_logits(model, state, qmask, one, torch.ones_like(one))
        out.append(-F.cross_entropy(lg[0, :-1], one[0, 1:], label_smoothing=0.1,
                                    reduction="sum").item())  # fmt: skip
    return out


@torch.no_grad()
def test_rank_with_k_at_least_the_list_scores_every_answer(model, tok, pixels):
    got = model.answer(pixels, QUESTIONS, ANSWERS, k_test=len(ANSWERS) + 5)
    states, qmask = _states(model, tok, pixels, QUESTIONS)
    for b, answer in enumerate(got):
        scores = _full_scores(model, tok, states[b : b + 1], qmask[b : b + 1], ANSWERS)
        assert answer == ANSWERS[max(range(len(ANSWERS)), key=scores.__getitem__)]
    assert len(set(got)) > 1  # the questions get different answers: the check has teeth


@torch.no_grad()
def test_rank_keeps_the_top_k_by_first_token_probability(model, tok, pixels):
    k = 3
    got = model.answer(pixels, QUESTIONS, ANSWERS, k_test=k)
    states, qmask = _states(model, tok, pixels, QUESTIONS)
    for b, answer in enumerate(got):
        start = torch.tensor([[tok.bos_token_id]])
        probs = vqa.answer_logits(model, states[b : b + 1], qmask[b : b + 1], start,
                                  torch.ones_like(start))[0, 0].softmax(-1)  # fmt: skip
        first = [probs[tok.encode(a)[1]].item() for a in ANSWERS]
        top = sorted(range(len(ANSWERS)), key=lambda i: -first[i])[:k]
        scores = _full_scores(model, tok, states[b : b + 1], qmask[b : b + 1],
                              [ANSWERS[i] for i in top])  # fmt: skip
        assert answer == ANSWERS[top[max(range(k), key=scores.__getitem__)]]
    assert got != model.answer(pixels, QUESTIONS, ANSWERS, k_test=len(ANSWERS))  # k mattered


@torch.no_grad()
def test_rank_rows_are_chunked_without_changing_answers(model, pixels, monkeypatch):
    want = model.answer(pixels, QUESTIONS, ANSWERS, k_test=8)
    monkeypatch.setattr(vqa, "RANK_ROWS", 5)  # 24 re-scored rows in 5 forwards
    assert model.answer(pixels, QUESTIONS, ANSWERS, k_test=8) == want


# ---------------------------------------------------------------------------- generate mode
def _table(model, state, qmask):
    def table(seq: tuple) -> torch.Tensor:
        ids = torch.tensor([seq])
        return vqa.answer_logits(model, state, qmask, ids, torch.ones_like(ids))[0, -1].float(
        ).log_softmax(-1)  # fmt: skip

    return table


@torch.no_grad()
def test_generate_equals_step_by_step_decoding(model, tok, pixels):
    states, qmask = _states(model, tok, pixels, QUESTIONS)
    eos, bias = tok.sep_token_id, model.text_decoder.cls.predictions.bias
    for boost in (0.0, 9.0):  # answers running to max_length, and answers ended by [SEP]
        bias[eos] += boost
        try:
            greedy = vqa.generate_answer_ids(model, states, qmask, tok, num_beams=1)
            for scoring in ("blip", "hf"):
                beams = vqa.generate_answer_ids(model, states, qmask, tok, 3, 10, 1, scoring)
                for b in range(len(QUESTIONS)):
                    table = _table(model, states[b : b + 1], qmask[b : b + 1])
                    want = REFERENCES[scoring](table, [tok.bos_token_id], eos, 3, 10, 1)[1]
                    assert beams[b] == want, (scoring, boost, b)
            for b in range(len(QUESTIONS)):  # greedy: argmax of an uncached decode per step
                seq = [tok.bos_token_id]
                table = _table(model, states[b : b + 1], qmask[b : b + 1])
                while len(seq) < 10 and (len(seq) == 1 or seq[-1] != eos):
                    seq.append(int(table(tuple(seq)).argmax()))
                assert greedy[b] == seq
        finally:
            bias[eos] -= boost


@torch.no_grad()
def test_answers_do_not_depend_on_the_batch_padding(model, pixels):
    """The question padding is masked in the answer decoder, in both modes."""
    long_q = "is the small red circle to the left of the big blue square in this picture?"
    batch_questions = [QUESTIONS[0], long_q]
    for answer_list in (None, ANSWERS):
        alone = model.answer(pixels[:1], QUESTIONS[:1], answer_list, k_test=4)
        batched = model.answer(pixels[:2], batch_questions, answer_list, k_test=4)
        assert batched[0] == alone[0]


def test_answer_checks_its_arguments(model, pixels):
    with pytest.raises(ValueError, match="2 images but 1 questions"):
        model.answer(pixels[:2], ["what?"])
    with pytest.raises(ValueError, match="answer_list is empty"):
        model.answer(pixels[:1], ["what?"], [])
    with pytest.raises(ValueError, match="beam_scoring"):
        model.answer(pixels[:1], ["what?"], beam_scoring="4.15")


def test_questions_get_blips_pre_question_and_enc(tok):
    ids, mask = vqa.question_inputs(tok, ["What COLOR is it?!", "how many?"])
    assert ids[0, 0] == tok.enc_token_id and ids[1, 0] == tok.enc_token_id
    assert tok.decode(ids[0, 1:], skip_special_tokens=True) == "what color is it?!"
    assert mask.tolist()[1][-1] == 0  # padded to the longest
    a_ids, _ = vqa.answer_inputs(tok, ["yes", "red circle"])
    assert a_ids[:, 0].tolist() == [tok.bos_token_id] * 2
    assert a_ids[0].tolist()[:3] == [tok.bos_token_id, tok.encode("yes")[1], tok.sep_token_id]


# ---------------------------------------------------------------------------- from pretraining
def test_vqa_form_of_a_pretraining_model_copies_blips_way():
    torch.manual_seed(0)
    pre = dlip.create_model("test_tiny")
    out = task_form(pre, "vqa")
    assert out.config.vqa and task_form(out, "vqa") is out
    ps, vs = pre.state_dict(), out.state_dict()
    for k, v in vs.items():  # every tensor copied (widths equal: cross-attention too)
        assert torch.equal(v, ps[k]), k
    # the decoder's cross-attention came from the (tied) encoder's, now an own copy
    dec_key = out.text_decoder.bert.encoder.layer[1].crossattention.self.key.weight
    assert torch.equal(dec_key, pre.text_encoder.encoder.layer[1].crossattention.self.key.weight)
    assert dec_key is not out.text_encoder.encoder.layer[1].crossattention.self.key.weight
    with pytest.raises(ValueError, match="VQA form"):
        task_form(out, "retrieval")
    with pytest.raises(ValueError, match="has_encoder=False"):
        vqa_form(dlip.create_model("test_tiny", has_encoder=False))


def test_vqa_form_names_what_starts_fresh_when_widths_differ():
    cfg = dlip.get_config("test_tiny")
    pre = dlip.create_model(cfg.replace(vision=cfg.vision.__class__(
        width=48, depth=2, num_heads=2, mlp_ratio=2.0, image_size=32)))  # fmt: skip
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = vqa_form(pre)
    (w,) = [c for c in caught if "BERT init" in str(c.message)]
    assert "crossattention.self.key.weight" in str(w.message) and "48 != text width 32" in str(
        w.message
    )
    assert out.text_decoder.bert.encoder.layer[0].crossattention.self.key.weight.shape == (32, 32)
