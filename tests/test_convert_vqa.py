"""Conversion of the VQA form: transformers' BlipForQuestionAnswering both ways (numbers checked
against transformers itself) and BLIP's own BLIP_VQA checkpoint layout, strictly."""

from __future__ import annotations

import pytest
import torch

import dlip
from dlip.cli import main
from dlip.models import vqa
from dlip.models.io import CheckpointError
from dlip.tokenizer import get_tokenizer
from test_convert import _hf_config, _salesforce_state, _save_pth

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("one_thread")

SEP = 102
# Equal token counts, so transformers' generate (which attends to question padding) and dlip's
# (which masks it) see the same inputs; the padded batch is checked on the encoder and logits.
SAME_LENGTH = ["what color is the cat?", "how many dogs are there?"]
PADDED = ["what is it?", "what color is the car next to the red house?"]
ANSWERS = ["yes", "two", "a red car", "blue"]


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("vqa")
    torch.manual_seed(0)
    hf = transformers.BlipForQuestionAnswering(_hf_config(vision_width=32)).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    hf.save_pretrained(str(tmp / "hf"))
    assert main(["convert", str(tmp / "hf"), "--from", "hf", "--out", str(tmp / "ours")]) == 0
    return hf, dlip.load(tmp / "ours").eval()


@pytest.fixture(scope="module")
def pixels():
    torch.manual_seed(1)
    return torch.randn(2, 3, 32, 32)


def _cut(row: list[int]) -> list[int]:
    end = next((i for i in range(1, len(row)) if row[i] == SEP), len(row) - 1)
    return row[: end + 1]


def test_the_hf_config_becomes_the_vqa_form(pair):
    c = pair[1].config
    assert c.vqa and c.has_encoder and c.has_decoder and not c.text.tie_decoder
    assert (c.vision.width, c.text.hidden_size, c.text.num_heads) == (32, 32, 4)


@torch.no_grad()
@pytest.mark.parametrize("questions", [SAME_LENGTH, PADDED])
def test_question_states_and_answer_logits_match_hf(pair, pixels, questions):
    hf, ours = pair
    tok = get_tokenizer()
    ids, mask = vqa.question_inputs(tok, questions)  # [ENC] first: given to HF as it is
    image = hf.vision_model(pixel_values=pixels).last_hidden_state
    ref_q = hf.text_encoder(input_ids=ids, attention_mask=mask, encoder_hidden_states=image)
    ref_q = ref_q.last_hidden_state
    states = ours.multimodal(ours.encode_image(pixels).tokens, ids, mask).tokens
    torch.testing.assert_close(states, ref_q, atol=1e-5, rtol=0)
    a_ids, a_mask = vqa.answer_inputs(tok, ANSWERS[:2])
    got = vqa.answer_logits(ours, states, mask, a_ids, a_mask)
    # transformers' decoder ignores encoder_attention_mask (5.x), i.e. attends to question
    # padding; BLIP masks it. Masking equals cutting the padding off, which HF then matches.
    for b in range(len(questions)):
        n = int(mask[b].sum())
        ref = hf.text_decoder(input_ids=a_ids[b : b + 1], attention_mask=a_mask[b : b + 1],
                              encoder_hidden_states=ref_q[b : b + 1, :n]).logits  # fmt: skip
        assert (got[b : b + 1] - ref).abs().max() < 1e-4, b


@torch.no_grad()
def test_generated_answer_ids_match_hf(pair, pixels):
    hf, ours = pair
    tok = get_tokenizer()
    ids, mask = vqa.question_inputs(tok, SAME_LENGTH)
    assert mask.all()
    eos, bias_hf = tok.sep_token_id, hf.text_decoder.cls.predictions.bias
    bias_ours = ours.text_decoder.cls.predictions.bias
    lengths = set()
    for boost, beams in ((0.0, 3), (4.0, 3), (4.0, 1), (8.0, 2)):
        bias_hf[eos] += boost
        bias_ours[eos] += boost
        try:
            ref = hf.generate(input_ids=ids, pixel_values=pixels, attention_mask=mask,
                              num_beams=beams, max_length=10, min_length=1)  # fmt: skip
            states = ours.multimodal(ours.encode_image(pixels).tokens, ids, mask).tokens
            got = vqa.generate_answer_ids(ours, states, mask, tok, beams, 10, 1, "hf")
        finally:
            bias_hf[eos] -= boost
            bias_ours[eos] -= boost
        assert [_cut(r) for r in ref.tolist()] == got, (boost, beams)
        lengths |= {len(r) for r in got}
    assert len(lengths) > 1  # some answers ended by [SEP], some ran to max_length


def test_roundtrip_dlip_hf_dlip(tmp_path, pixels):
    torch.manual_seed(3)
    model = dlip.create_model(dlip.get_config("test_tiny").vqa_form()).eval()
    dlip.save(model, tmp_path / "ours")
    out, back_dir = str(tmp_path / "hf"), str(tmp_path / "back")
    assert main(["convert", str(tmp_path / "ours"), "--to", "hf", "--out", out]) == 0
    assert (tmp_path / "hf" / "config.json").is_file()  # one form: no sub-directory
    assert main(["convert", out, "--from", "hf", "--out", back_dir]) == 0
    back = dlip.load(tmp_path / "back")
    original = model.state_dict()
    assert set(back.state_dict()) == set(original)
    for key, tensor in back.state_dict().items():
        assert torch.equal(tensor, original[key]), key
    hf = transformers.BlipForQuestionAnswering.from_pretrained(str(tmp_path / "hf")).eval()
    ids, mask = vqa.question_inputs(get_tokenizer(), SAME_LENGTH)
    with torch.no_grad():
        ref = hf.generate(input_ids=ids, pixel_values=pixels, attention_mask=mask, num_beams=3,
                          max_length=10, min_length=1)  # fmt: skip
        states = model.multimodal(model.encode_image(pixels).tokens, ids, mask).tokens
        got = vqa.generate_answer_ids(model, states, mask, get_tokenizer(), 3, 10, 1, "hf")
    assert [_cut(r) for r in ref.tolist()] == got


def test_export_refuses_what_transformers_cannot_hold(tmp_path, capsys):
    cfg = dlip.get_config("test_tiny")
    wide = cfg.replace(vision=cfg.vision.__class__(width=48, depth=2, num_heads=2,
                                                   mlp_ratio=2.0, image_size=32))  # fmt: skip
    dlip.save(dlip.create_model(wide.vqa_form()), tmp_path / "wide")
    args = ["convert", str(tmp_path / "wide"), "--to", "hf", "--out", str(tmp_path / "x")]
    assert main(args) == 2
    assert "text width 32 != vision width 48" in capsys.readouterr().err
    dlip.save(dlip.create_model(cfg.vqa_form()), tmp_path / "vqa")
    args = ["convert", str(tmp_path / "vqa"), "--to", "hf", "--out", str(tmp_path / "y")]
    assert main([*args, "--form", "captioning"]) == 2
    assert "has no captioning form (its forms: vqa)" in capsys.readouterr().err
    dlip.save(dlip.create_model(cfg), tmp_path / "pre")
    args = ["convert", str(tmp_path / "pre"), "--to", "hf", "--out", str(tmp_path / "z")]
    assert main([*args, "--form", "vqa"]) == 2


# ------------------------------------------------------------------------- BLIP's own layout
def test_salesforce_vqa_layout_converts_strictly(tmp_path):
    state = _salesforce_state("vqa", 4)
    src = _save_pth(state, tmp_path / "model_base_vqa_capfilt_large.pth")
    out = tmp_path / "out"
    args = ["convert", str(src), "--from", "salesforce", "--arch", "test_tiny", "--out", str(out)]
    assert main(args) == 0
    model = dlip.load(out)
    assert model.config.vqa and model.config.vision.image_size == 64
    ours = model.state_dict()
    for key, tensor in state.items():
        if key.endswith(("position_ids", "predictions.decoder.bias")):
            continue
        assert torch.equal(ours[key], tensor), key
    # the decoder is its own: its copy of a layer differs from the encoder's
    k = "encoder.layer.0.intermediate.dense.weight"
    assert not torch.equal(ours[f"text_encoder.{k}"], ours[f"text_decoder.bert.{k}"])
    assert model.answer(torch.randn(1, 3, 64, 64), ["what is it?"], ANSWERS)[0] in ANSWERS


def test_salesforce_vqa_with_an_extra_key_is_refused(tmp_path):
    state = _salesforce_state("vqa", 2)
    state["text_encoder.pooler.dense.weight"] = torch.zeros(32, 32)
    src = _save_pth(state, tmp_path / "vqa.pth")
    with pytest.raises(CheckpointError, match="pooler"):
        from dlip.models.convert import convert_salesforce

        convert_salesforce(src, "test_tiny")


def test_key_sets_are_blip_vqas():
    """BLIP_VQA (salesforce/BLIP models/blip_vqa.py) at test_tiny sizes: ViT, BertModel without
    pooler, BertLMHeadModel; the layout helper writes exactly those keys, and dlip's VQA form
    holds them all (less the position-id buffers and BERT's duplicate LM bias)."""
    state = _salesforce_state("vqa", 2)
    model = dlip.create_model(dlip.get_config("test_tiny").vqa_form())
    extra = {k for k in state if k.endswith(("position_ids", "predictions.decoder.bias"))}
    assert set(state) - extra == set(model.state_dict())
    assert not any(k.startswith(("vision_proj", "text_proj", "itm_head", "temp")) for k in state)
