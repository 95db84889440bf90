"""Beam search projects an item's cross-attention keys / values once and shares them across
its beams (the beams' queries folded onto one source): ids identical to projecting them per
beam, for captions and for VQA answers whose question padding masks the source; and the cross
attention itself equals the per-row computation to float precision."""

from __future__ import annotations

import pytest
import torch

from dlip.models.generation import beam_search, prompt_ids
from dlip.models.text import Attention
from dlip.tokenizer import get_tokenizer

CASES = [(3, 20, 5, 1.0), (4, 12, 2, 1.3), (2, 16, 8, 1.0), (5, 10, 1, 1.0)]


@pytest.fixture(scope="module")
def tiny(perturbed_tiny):
    return perturbed_tiny(0.2)  # large enough that the images get different captions


@torch.no_grad()
@pytest.mark.parametrize("scoring", ["blip", "hf"])
def test_shared_image_kv_gives_the_same_captions(tiny, scoring):
    tok = get_tokenizer()
    image = tiny.encode_image(torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1)))
    ids = prompt_ids(tok, "a picture of", 3, torch.device("cpu"))
    for beams, max_len, min_len, penalty in CASES:
        args = (tiny, image.tokens, ids, beams, max_len, min_len, penalty, tok.sep_token_id)
        shared = beam_search(*args, beam_scoring=scoring)
        per_beam = beam_search(*args, beam_scoring=scoring, share_image_kv=False)
        assert shared == per_beam, (beams, max_len)
        assert len({tuple(r) for r in shared}) > 1  # the images get different captions


@torch.no_grad()
def test_shared_source_kv_with_a_padding_mask_gives_the_same_answers(tiny):
    vqa, tok = tiny, get_tokenizer()
    g = torch.Generator().manual_seed(3)
    states = 3 * torch.randn(3, 7, vqa.config.vision.width, generator=g)  # (B, Tq, D) padded
    mask = torch.tensor([[1] * 7, [1] * 4 + [0] * 3, [1] * 2 + [0] * 5])
    start = torch.full((3, 1), tok.bos_token_id, dtype=torch.long)
    args = (vqa, states, start, 3, 8, 1, 1.0, tok.sep_token_id)
    shared = beam_search(*args, source_mask=mask)
    assert shared == beam_search(*args, source_mask=mask, share_image_kv=False)
    unmasked = beam_search(*args)
    assert unmasked != shared  # the mask matters, so it was applied


def test_grouped_cross_attention_equals_per_row(tiny):
    layer = next(block.crossattention for block in tiny.text_decoder.bert.encoder.layer)
    assert isinstance(layer, Attention)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(6, 5, tiny.config.text.hidden_size, generator=g)  # 2 sources x 3 beams
    source = torch.randn(2, 9, tiny.config.vision.width, generator=g)
    keep = torch.tensor([[0.0] * 9, [0.0] * 6 + [torch.finfo(torch.float32).min] * 3])
    mask = keep[:, None, None, :]  # (2, 1, 1, 9) additive
    with torch.no_grad():
        out, probs, (k, _) = layer(x, mask, source=source, need_probs=True)
        rows = source.repeat_interleave(3, 0)  # the per-beam copy BLIP makes
        ref, ref_probs, _ = layer(x, mask.repeat_interleave(3, 0), source=rows, need_probs=True)
        fast, _, _ = layer(x, mask, source=source)  # scaled_dot_product_attention path
    assert k.shape[0] == 2  # projected once per source
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=0)
    torch.testing.assert_close(probs, ref_probs, atol=1e-6, rtol=0)
    torch.testing.assert_close(fast, ref, atol=1e-5, rtol=0)
    assert probs[3:, :, :, 6:].abs().max() == 0  # the second source's padding is masked


@torch.no_grad()
@pytest.mark.parametrize("fusion", ["all", 1])
def test_itm_rerank_shares_image_kv_with_the_same_scores(perturbed_tiny, fusion):
    """BLIP's re-rank scores each image with its k candidate texts: with the image's
    cross-attention K/V projected once (grouped runs and gathered rows, chunks of 7 pairs
    cutting across images) the logits equal projecting it per pair."""
    import dataclasses

    from dlip.eval.retrieval import itm_pair_scores

    model = perturbed_tiny(0.2)
    if fusion != "all":  # DLIP's topology: text-only layers, then one fused layer
        text = dataclasses.replace(model.config.text, fusion_layers=fusion)
        cfg = dataclasses.replace(model.config, text=text)
        torch.manual_seed(0)
        model = type(model)(cfg).eval()
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    g = torch.Generator().manual_seed(5)
    image = model.encode_image(torch.randn(4, 3, 32, 32, generator=g)).tokens  # (4, N, Dv)
    ids = torch.randint(1000, 2000, (6, 9), generator=g)
    ids[:, 0] = get_tokenizer().enc_token_id
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    # i2t: each image with 3 texts; t2i: texts with images in no regular pattern
    pairs_img = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3, 2, 0, 3, 1, 1, 0])
    pairs_txt = torch.tensor([0, 1, 2, 3, 4, 5, 1, 0, 5, 2, 4, 3, 0, 5, 5, 0, 2, 4])
    args = (model, image, ids, mask, pairs_img, pairs_txt)
    shared = itm_pair_scores(*args, itm_batch=7)
    per_pair = itm_pair_scores(*args, itm_batch=7, share_image_kv=False)
    direct = model.itm_logits(image[pairs_img], ids[pairs_txt], mask[pairs_txt])[:, 1]
    assert torch.allclose(shared, per_pair, atol=1e-5)
    assert torch.allclose(shared, direct, atol=1e-5)
    assert shared.std() > 0.01  # the pairs score differently
    grouped = model.itm_logits(image[:2], ids[:6], mask[:6], image_index=pairs_img[:6])
    assert torch.allclose(grouped[:, 1], direct[:6], atol=1e-5)  # the folded-query path
