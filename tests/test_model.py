"""Tests for the BLIP model contract: shapes, masks, taps, topology, tying, gradients, KV cache,
image resizing, generation and the saved-model form. CPU only, tiny models."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import dlip
from dlip.models import generation, io, text, vision
from dlip.models.blip import BLIP
from dlip.models.config import ModelConfig, TextConfig, VisionConfig
from dlip.models.outputs import Taps
from dlip.models.text import KVCache
from dlip.models.vision import resize_pos_embed
from dlip.tokenizer import get_tokenizer

CLS_ID, SEP_ID, DEC_ID, ENC_ID = 101, 102, 30522, 30523
B, T = 2, 7  # batch and text length used throughout


# ------------------------------------------------------------------------------------- helpers
def small_config(vocab_size: int = 100, **text_changes) -> ModelConfig:
    """A tiny custom model whose vision width (24) differs from the text width (32)."""
    fields = dict(
        vocab_size=vocab_size,
        hidden_size=32,
        num_layers=3,
        num_heads=2,
        intermediate_size=48,
        max_position_embeddings=24,
        fusion_layers=1,
        tie_decoder=True,
    )
    fields.update(text_changes)
    return ModelConfig(
        name="small",
        vision=VisionConfig(
            width=24, depth=2, num_heads=2, mlp_ratio=2.0, patch_size=8, image_size=16
        ),
        text=TextConfig(**fields),
        embed_dim=8,
        max_text_length=16,
    )


def with_text(cfg: ModelConfig, **changes) -> ModelConfig:
    return cfg.replace(text=dataclasses.replace(cfg.text, **changes))


def build(cfg: ModelConfig | str, seed: int = 0) -> BLIP:
    torch.manual_seed(seed)
    model = dlip.create_model(cfg)
    return model.eval()


def pixels(model: BLIP, batch: int = B, seed: int = 1) -> torch.Tensor:
    size = model.config.vision.image_size
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def text_ids(model: BLIP, first: int, length: int = T, batch: int = B, seed: int = 2):
    """(ids, mask): random ids with `first` at position 0; row 1 has its last 3 tokens padded."""
    vocab = min(model.config.text.vocab_size, 2000)
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, vocab, (batch, length), generator=g)
    ids[:, 0] = first
    mask = torch.ones(batch, length, dtype=torch.long)
    if batch > 1:
        mask[1, length - 3 :] = 0
        ids[1, length - 3 :] = 0
    return ids, mask


def first_ids(model: BLIP) -> tuple[int, int, int]:
    """(cls, enc, dec) ids valid for the model's vocab."""
    v = model.config.text.vocab_size
    return (CLS_ID, ENC_ID, DEC_ID) if v > ENC_ID else (1, 2, 3)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny() -> BLIP:
    """The test_tiny preset in eval mode; read-only (tests that mutate build their own)."""
    return build("test_tiny")


@pytest.fixture(scope="module")
def fused() -> BLIP:
    """3 text layers, the last one fusing (ALBEF / DLIP topology)."""
    return build(small_config(fusion_layers=1))


# ------------------------------------------------------------------------------------- shapes
def test_output_shapes_and_dtypes(tiny):
    cls_id, enc_id, dec_id = first_ids(tiny)
    px = pixels(tiny)
    img = tiny.encode_image(px)
    assert img.tokens.shape == (B, 1 + 4, 32) and img.tokens.dtype == torch.float32
    assert img.feat.shape == (B, 16) and img.feat.dtype == torch.float32
    assert img.hidden == {} and img.attn == {}

    ids, mask = text_ids(tiny, cls_id)
    txt = tiny.encode_text(ids, mask)
    assert txt.tokens.shape == (B, T, 32) and txt.tokens.dtype == torch.float32
    assert txt.feat.shape == (B, 16)
    assert txt.hidden == {} and txt.attn == {} and txt.cross_attn == {}

    ids, mask = text_ids(tiny, enc_id)
    mm = tiny.multimodal(img.tokens, ids, mask)
    assert mm.tokens.shape == (B, T, 32)
    itm = tiny.itm_logits(img.tokens, ids, mask)
    assert itm.shape == (B, 2) and itm.dtype == torch.float32
    torch.testing.assert_close(itm, tiny.itm_head(mm.tokens[:, 0]), rtol=0, atol=0)

    ids, mask = text_ids(tiny, dec_id)
    dec = tiny.decode(img.tokens, ids, mask)
    assert dec.tokens.shape == (B, T, 32)
    lm = tiny.lm_logits(img.tokens, ids, mask)
    assert lm.shape == (B, T, 30524) and lm.dtype == torch.float32
    torch.testing.assert_close(lm, tiny.text_decoder.cls(dec.tokens), rtol=0, atol=0)


def test_features_are_unit_norm(tiny):
    img = tiny.encode_image(pixels(tiny))
    ids, mask = text_ids(tiny, CLS_ID)
    txt = tiny.encode_text(ids, mask)
    ones = torch.ones(B)
    torch.testing.assert_close(img.feat.norm(dim=-1), ones, atol=1e-6, rtol=0)
    torch.testing.assert_close(txt.feat.norm(dim=-1), ones, atol=1e-6, rtol=0)
    # feat is the normalised projection of CLS, not of some other token
    expected = F.normalize(tiny.vision_proj(img.tokens[:, 0]), dim=-1)
    torch.testing.assert_close(img.feat, expected, atol=1e-6, rtol=0)
    expected = F.normalize(tiny.text_proj(txt.tokens[:, 0]), dim=-1)
    torch.testing.assert_close(txt.feat, expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("model_name", ["tiny", "fused"])
def test_padding_is_masked(model_name, request):
    model = request.getfixturevalue(model_name)
    cls_id, enc_id, dec_id = first_ids(model)
    image = model.encode_image(pixels(model)).tokens
    real = slice(0, T - 3)  # row 1's real positions

    def changed(ids):
        ids = ids.clone()
        ids[1, T - 3 :] = torch.tensor([7, 8, 9])
        return ids

    ids, mask = text_ids(model, cls_id)
    a, b = model.encode_text(ids, mask), model.encode_text(changed(ids), mask)
    torch.testing.assert_close(a.tokens[:, real], b.tokens[:, real], atol=1e-6, rtol=0)
    torch.testing.assert_close(a.feat, b.feat, atol=1e-6, rtol=0)
    assert not torch.allclose(a.tokens[1, T - 3 :], b.tokens[1, T - 3 :])  # the change did land

    ids, mask = text_ids(model, enc_id)
    a = model.multimodal(image, ids, mask).tokens
    b = model.multimodal(image, changed(ids), mask).tokens
    torch.testing.assert_close(a[:, real], b[:, real], atol=1e-6, rtol=0)

    ids, mask = text_ids(model, dec_id)
    a = model.lm_logits(image, ids, mask)
    b = model.lm_logits(image, changed(ids), mask)
    torch.testing.assert_close(a[:, real], b[:, real], atol=1e-5, rtol=0)


def test_decoder_is_causal(tiny):
    image = tiny.encode_image(pixels(tiny)).tokens
    ids, _ = text_ids(tiny, DEC_ID)
    mask = torch.ones_like(ids)
    later = ids.clone()
    later[:, 4] = 1234
    a, b = tiny.lm_logits(image, ids, mask), tiny.lm_logits(image, later, mask)
    torch.testing.assert_close(a[:, :4], b[:, :4], atol=1e-5, rtol=0)
    assert not torch.allclose(a[:, 4:], b[:, 4:], atol=1e-3)
    # the encoder is bidirectional: the same change does reach earlier positions there
    a, b = tiny.encode_text(ids, mask).tokens, tiny.encode_text(later, mask).tokens
    assert not torch.allclose(a[:, :4], b[:, :4], atol=1e-4)


# ------------------------------------------------------------------------------------- taps
def test_text_taps_do_not_change_results(tiny):
    image = tiny.encode_image(pixels(tiny)).tokens
    ids, mask = text_ids(tiny, CLS_ID)
    a, b = tiny.encode_text(ids, mask), tiny.encode_text(ids, mask, taps=[0, 1])
    torch.testing.assert_close(a.tokens, b.tokens, atol=1e-6, rtol=0)
    torch.testing.assert_close(a.feat, b.feat, atol=1e-6, rtol=0)
    a, b = tiny.multimodal(image, ids, mask), tiny.multimodal(image, ids, mask, taps=[0, 1])
    torch.testing.assert_close(a.tokens, b.tokens, atol=1e-6, rtol=0)
    a, b = tiny.decode(image, ids, mask), tiny.decode(image, ids, mask, taps=[0, 1])
    torch.testing.assert_close(a.tokens, b.tokens, atol=1e-6, rtol=0)
    assert (
        sorted(b.hidden) == [0, 1] and sorted(b.attn) == [0, 1] and sorted(b.cross_attn) == [0, 1]
    )
    torch.testing.assert_close(b.hidden[1], b.tokens, atol=0, rtol=0)  # last layer = output


def test_text_attention_probabilities(tiny):
    image = tiny.encode_image(pixels(tiny)).tokens  # (B, 5, 32)
    ids, mask = text_ids(tiny, ENC_ID)
    image_mask = torch.ones(B, 5, dtype=torch.long)
    image_mask[0, 3:] = 0
    out = tiny.multimodal(image, ids, mask, image_mask=image_mask, taps=[0, 1])
    for i in (0, 1):
        probs, cross = out.attn[i], out.cross_attn[i]
        assert probs.shape == (B, 2, T, T)
        assert cross.shape == (B, 2, T, 5)
        torch.testing.assert_close(probs.sum(-1), torch.ones(B, 2, T), atol=1e-5, rtol=0)
        torch.testing.assert_close(cross.sum(-1), torch.ones(B, 2, T), atol=1e-5, rtol=0)
        assert torch.all(probs[1, :, :, T - 3 :] == 0)  # padded keys get nothing
        assert torch.all(probs[1, :, :, : T - 3] > 0)
        assert torch.all(cross[0, :, :, 3:] == 0)  # masked image tokens get nothing
        assert torch.all(cross[1] > 0)

    dec = tiny.decode(image, ids, torch.ones_like(ids), taps=[-1])
    assert sorted(dec.attn) == [1]
    upper = torch.triu(torch.ones(T, T, dtype=torch.bool), diagonal=1)
    assert torch.all(dec.attn[1][..., upper] == 0)  # causal: no future keys
    assert torch.all(dec.attn[1][..., ~upper] > 0)

    unimodal = tiny.encode_text(ids, mask, taps=[0, 1])
    assert unimodal.cross_attn == {}  # unimodal text never cross-attends


def test_taps_select_what_is_asked(tiny):
    ids, mask = text_ids(tiny, CLS_ID)
    out = tiny.encode_text(ids, mask, taps=[-1])
    assert sorted(out.hidden) == [1] and sorted(out.attn) == [1]
    out = tiny.encode_text(ids, mask, taps=[-2, 1])
    assert sorted(out.hidden) == [0, 1]
    out = tiny.encode_text(ids, mask, taps=Taps(hidden=frozenset({0})))
    assert sorted(out.hidden) == [0] and out.attn == {}
    out = tiny.encode_text(ids, mask, taps=Taps(attn=frozenset({-1})))
    assert out.hidden == {} and sorted(out.attn) == [1]


@pytest.mark.parametrize("bad", [2, -3, 100])
def test_out_of_range_taps_raise(tiny, bad):
    ids, mask = text_ids(tiny, CLS_ID)
    with pytest.raises(IndexError, match=f"tap layer {bad} is not among the layers"):
        tiny.encode_text(ids, mask, taps=[bad])
    with pytest.raises(IndexError, match=f"tap layer {bad}"):
        tiny.decode(None, ids, mask, taps=[bad])
    with pytest.raises(IndexError, match=f"tap layer {bad}"):
        tiny.encode_image(pixels(tiny), taps=[bad])


def test_taps_resolve():
    taps = Taps.of([0, -1]).resolve(range(4))
    assert taps.hidden == {0, 3} and taps.attn == {0, 3}
    assert Taps.of(None) == Taps()
    with pytest.raises(IndexError, match=r"not among the layers this call runs \(range\(0, 4\)\)"):
        Taps.of([4]).resolve(range(4))
    # Negative indices count back from the end of the layers the call runs.
    assert Taps.of([-1]).resolve(range(2, 6)).hidden == {5}
    assert Taps.of([-1]).resolve(range(0, 3)).hidden == {2}
    with pytest.raises(IndexError):
        Taps.of([1]).resolve(range(2, 6))


def test_vision_taps(tiny):
    px = pixels(tiny)
    plain = tiny.encode_image(px)
    tapped = tiny.encode_image(px, taps=[0, -1])
    torch.testing.assert_close(plain.tokens, tapped.tokens, atol=1e-6, rtol=0)
    torch.testing.assert_close(plain.feat, tapped.feat, atol=1e-6, rtol=0)
    assert sorted(tapped.hidden) == [0, 1] and sorted(tapped.attn) == [0, 1]
    for i in (0, 1):
        assert tapped.hidden[i].shape == (B, 5, 32)
        assert tapped.attn[i].shape == (B, 2, 5, 5)
        torch.testing.assert_close(tapped.attn[i].sum(-1), torch.ones(B, 2, 5), atol=1e-5, rtol=0)
    # hidden states are pre-norm: the final norm of the last one gives the output tokens
    final = tiny.visual_encoder.norm(tapped.hidden[1])
    torch.testing.assert_close(final, plain.tokens, atol=1e-6, rtol=0)
    assert not torch.allclose(tapped.hidden[1], plain.tokens, atol=1e-3)
    # a hidden-only tap computes no probabilities
    only_hidden = tiny.encode_image(px, taps=Taps(hidden=frozenset({0})))
    assert sorted(only_hidden.hidden) == [0] and only_hidden.attn == {}


# ------------------------------------------------------------------------------------- topology
def test_fusion_topology_parameters(fused):
    enc_layers = fused.text_encoder.encoder.layer
    dec_layers = fused.text_decoder.bert.encoder.layer
    assert [layer.crossattention is None for layer in enc_layers] == [True, True, False]
    assert [layer.crossattention is None for layer in dec_layers] == [True, True, False]
    names = {n for n, _ in fused.named_parameters()}
    assert "text_encoder.encoder.layer.2.crossattention.self.key.weight" in names
    assert not any(n.startswith("text_encoder.encoder.layer.1.crossattention") for n in names)
    key = enc_layers[2].crossattention.self.key.weight
    assert key.shape == (32, 24)  # keys project the 24-wide image tokens


def test_fusion_encode_text_runs_text_only_layers(fused):
    ids, mask = text_ids(fused, 1)
    out = fused.encode_text(ids, mask, taps=[0, 1])
    assert sorted(out.hidden) == [0, 1]
    torch.testing.assert_close(out.hidden[1], out.tokens, atol=0, rtol=0)

    # the same computation by hand: embeddings, then layers 0 and 1, no image
    enc = fused.text_encoder
    x = enc.embeddings(ids)
    self_mask = text.additive_mask(mask[:, None, None, :], x.dtype)
    for layer in enc.encoder.layer[:2]:
        x = layer(x, self_mask, None, None, None, None, False)[0]
    torch.testing.assert_close(out.tokens, x, atol=1e-6, rtol=0)
    # running the third layer too (its cross-attention skipped without an image) differs
    x3 = enc.encoder.layer[2](x, self_mask, None, None, None, None, False)[0]
    assert not torch.allclose(out.tokens, x3, atol=1e-3)


def test_fusion_taps_follow_the_layers_each_call_runs(fused):
    image = fused.encode_image(pixels(fused)).tokens
    ids, mask = text_ids(fused, 1)
    assert sorted(fused.encode_text(ids, mask, taps=[-1]).hidden) == [1]  # last text-only layer
    with pytest.raises(IndexError, match="tap layer 2"):
        fused.encode_text(ids, mask, taps=[2])  # a fusion layer: unimodal text never runs it
    unimodal = fused.encode_text(ids, mask).tokens
    reused = fused.multimodal(image, ids, mask, taps=[-1], text_tokens=unimodal)
    assert sorted(reused.cross_attn) == [2]
    with pytest.raises(IndexError, match="tap layer 0"):
        fused.multimodal(image, ids, mask, taps=[0], text_tokens=unimodal)


def test_fusion_multimodal_reuses_text_tokens_exactly(fused):
    image = fused.encode_image(pixels(fused)).tokens
    ids, mask = text_ids(fused, 1)
    unimodal = fused.encode_text(ids, mask)
    full = fused.multimodal(image, ids, mask).tokens
    reused = fused.multimodal(image, ids, mask, text_tokens=unimodal.tokens).tokens
    assert torch.equal(full, reused)
    # the fusion layer does look at the image
    other = fused.multimodal(image.flip(0), ids, mask, text_tokens=unimodal.tokens).tokens
    assert not torch.allclose(other, reused, atol=1e-4)
    # and the reused path really starts from text_tokens (a different start, a different result)
    shifted = fused.multimodal(image, ids, mask, text_tokens=unimodal.tokens + 1.0).tokens
    assert not torch.allclose(shifted, reused, atol=1e-4)


def test_fusion_all_unimodal_skips_cross_attention(tiny):
    ids, mask = text_ids(tiny, CLS_ID)
    out = tiny.encode_text(ids, mask, taps=[0, 1])
    assert sorted(out.hidden) == [0, 1]  # every layer runs
    image = tiny.encode_image(pixels(tiny)).tokens
    with_image = tiny.multimodal(image, ids, mask).tokens
    assert not torch.allclose(out.tokens, with_image, atol=1e-4)
    assert all(layer.crossattention is not None for layer in tiny.text_encoder.encoder.layer)


# ------------------------------------------------------------------------------------- tying
def _param_ids(module: torch.nn.Module) -> set[int]:
    return {id(p) for p in module.parameters()}


@pytest.mark.parametrize("cfg", [dlip.get_config("test_tiny"), small_config()], ids=["all", "k1"])
def test_tied_decoder_shares_all_but_self_attention(cfg):
    model = build(cfg)
    enc, dec = model.text_encoder, model.text_decoder
    assert dec.bert.embeddings is enc.embeddings
    for e, d in zip(enc.encoder.layer, dec.bert.encoder.layer, strict=True):
        assert d.crossattention is e.crossattention
        assert d.intermediate is e.intermediate
        assert d.output is e.output
        assert d.attention is not e.attention
        assert not (_param_ids(d.attention) & _param_ids(e.attention))
    lm_weight = dec.cls.predictions.decoder.weight
    assert lm_weight is enc.embeddings.word_embeddings.weight
    shared = _param_ids(enc) & _param_ids(dec)
    assert shared == _param_ids(enc) - {
        id(p) for e in enc.encoder.layer for p in e.attention.parameters()
    }


@pytest.mark.parametrize("cfg", [dlip.get_config("test_tiny"), small_config()], ids=["all", "k1"])
def test_untied_decoder_shares_nothing(cfg):
    model = build(with_text(cfg, tie_decoder=False))
    enc, dec = model.text_encoder, model.text_decoder
    assert not (_param_ids(enc) & _param_ids(dec))
    assert dec.bert.embeddings is not enc.embeddings
    # the LM head is still tied to the decoder's own word embeddings
    assert dec.cls.predictions.decoder.weight is dec.bert.embeddings.word_embeddings.weight


@pytest.mark.parametrize("cfg", [dlip.get_config("test_tiny"), small_config()], ids=["all", "k1"])
def test_tied_param_count_difference(cfg):
    t, dv = cfg.text, cfg.vision.width
    d, inner, cross_layers = t.hidden_size, t.intermediate_size, cfg.text.num_layers
    if t.fusion_layers != "all":
        cross_layers = t.fusion_layers
    embeddings = t.vocab_size * d + t.max_position_embeddings * d + 2 * d
    cross = (d * d + d) + 2 * (dv * d + d) + (d * d + d) + 2 * d  # q, k, v, dense, LayerNorm
    ffn = (d * inner + inner) + (inner * d + d) + 2 * d  # intermediate, output dense, LayerNorm
    expected = embeddings + cross_layers * cross + t.num_layers * ffn
    tied, untied = build(cfg), build(with_text(cfg, tie_decoder=False))
    assert untied.num_params() - tied.num_params() == expected
    # num_params counts each tied tensor once
    assert tied.num_params() == sum(p.numel() for p in tied.parameters())
    assert tied.num_params(["text_decoder."]) < untied.num_params(["text_decoder."])


def test_encoder_or_decoder_only_forms():
    enc_only = build(small_config().replace(has_decoder=False))
    assert not hasattr(enc_only, "text_decoder")
    image = enc_only.encode_image(pixels(enc_only)).tokens
    ids, mask = text_ids(enc_only, 1)
    assert enc_only.itm_logits(image, ids, mask).shape == (B, 2)
    with pytest.raises(RuntimeError, match="has_decoder=False"):
        enc_only.lm_logits(image, ids, mask)

    dec_only = build(small_config().replace(has_encoder=False))
    for name in ("text_encoder", "text_proj", "vision_proj", "itm_head", "temp"):
        assert not hasattr(dec_only, name)
    img = dec_only.encode_image(pixels(dec_only))
    assert img.feat is None
    assert dec_only.lm_logits(img.tokens, ids, mask).shape == (B, T, 100)
    with pytest.raises(RuntimeError, match="has_encoder=False"):
        dec_only.encode_text(ids, mask)
    # without an encoder the decoder owns every layer, even with tie_decoder=True
    layer0 = dec_only.text_decoder.bert.encoder.layer[0]
    assert layer0.intermediate is not None and layer0.output is not None


def test_parameter_names_follow_blip(tiny):
    names = set(tiny.state_dict())
    for name in (
        "temp",
        "visual_encoder.cls_token",
        "visual_encoder.pos_embed",
        "visual_encoder.patch_embed.proj.weight",
        "visual_encoder.blocks.1.attn.qkv.weight",
        "visual_encoder.blocks.1.mlp.fc2.bias",
        "visual_encoder.norm.weight",
        "text_encoder.embeddings.word_embeddings.weight",
        "text_encoder.embeddings.position_embeddings.weight",
        "text_encoder.embeddings.LayerNorm.weight",
        "text_encoder.encoder.layer.0.attention.self.query.weight",
        "text_encoder.encoder.layer.0.attention.output.dense.weight",
        "text_encoder.encoder.layer.0.attention.output.LayerNorm.bias",
        "text_encoder.encoder.layer.1.crossattention.self.value.bias",
        "text_encoder.encoder.layer.1.intermediate.dense.weight",
        "text_encoder.encoder.layer.1.output.LayerNorm.weight",
        "text_decoder.bert.encoder.layer.0.attention.self.key.weight",
        "text_decoder.cls.predictions.transform.dense.weight",
        "text_decoder.cls.predictions.transform.LayerNorm.weight",
        "text_decoder.cls.predictions.decoder.weight",
        "text_decoder.cls.predictions.bias",
        "vision_proj.weight",
        "text_proj.bias",
        "itm_head.weight",
    ):
        assert name in names, name


# ------------------------------------------------------------------------------------- gradients
def _loss(model: BLIP) -> torch.Tensor:
    """ITC + ITM + LM terms, weighted by fixed random tensors so no gradient cancels."""
    cls_id, enc_id, dec_id = first_ids(model)
    g = torch.Generator().manual_seed(3)
    img = model.encode_image(pixels(model))
    ids, mask = text_ids(model, cls_id)
    txt = model.encode_text(ids, mask)
    sim = img.feat @ txt.feat.T
    ids_enc = ids.clone()
    ids_enc[:, 0] = enc_id
    itm = model.itm_logits(img.tokens, ids_enc, mask)
    ids_dec = ids.clone()
    ids_dec[:, 0] = dec_id
    lm = model.lm_logits(img.tokens, ids_dec, mask)
    loss = (sim * torch.randn(sim.shape, generator=g)).sum()
    loss = loss + (itm * torch.randn(itm.shape, generator=g)).sum()
    return loss + (lm * torch.randn(lm.shape, generator=g)).sum()


@pytest.mark.parametrize(
    "cfg",
    [
        dlip.get_config("test_tiny"),
        with_text(dlip.get_config("test_tiny"), tie_decoder=False),
        small_config(fusion_layers=1),
    ],
    ids=["tied", "untied", "k1"],
)
def test_every_parameter_gets_a_gradient(cfg):
    model = build(with_text(cfg, dropout=0.0)).train()
    _loss(model).backward()
    no_grad = {n for n, p in model.named_parameters() if p.grad is None}
    assert no_grad == {"temp"}  # the ITC temperature is used by the loss, not by any forward
    for name, p in model.named_parameters():
        if p.grad is None:
            continue
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name
    pos = model.text_encoder.embeddings.position_embeddings.weight.grad
    assert torch.all(pos[T:] == 0)  # positions past the text get zero, not None
    assert torch.all(pos[:T].abs().sum(-1) > 0)


def test_grad_checkpointing_matches(monkeypatch):
    cfg = with_text(dlip.get_config("test_tiny"), dropout=0.0)
    plain = build(cfg).train()
    loss_plain = _loss(plain)
    loss_plain.backward()

    calls = {"text": 0, "vision": 0}

    def spy(kind, real):
        def wrapped(*args, **kwargs):
            calls[kind] += 1
            return real(*args, **kwargs)

        return wrapped

    monkeypatch.setattr(text, "checkpoint", spy("text", text.checkpoint))
    monkeypatch.setattr(vision, "checkpoint", spy("vision", vision.checkpoint))
    ckpt = build(cfg).train()
    ckpt.set_grad_checkpointing(True)
    assert ckpt.text_encoder.grad_checkpointing and ckpt.text_decoder.bert.grad_checkpointing
    loss_ckpt = _loss(ckpt)
    loss_ckpt.backward()
    assert calls == {"text": 6, "vision": 2}  # 2 layers x (unimodal, ITM, LM); 2 ViT blocks

    torch.testing.assert_close(loss_ckpt, loss_plain, atol=1e-5, rtol=0)
    grads = dict(ckpt.named_parameters())
    for name, p in plain.named_parameters():
        q = grads[name]
        if p.grad is None:
            assert q.grad is None, name
        else:
            torch.testing.assert_close(q.grad, p.grad, atol=1e-5, rtol=1e-5, msg=name)

    # eval mode does not checkpoint
    calls.update(text=0, vision=0)
    ckpt.eval()
    with torch.no_grad():
        _loss(ckpt)
    assert calls == {"text": 0, "vision": 0}


# ------------------------------------------------------------------------------------- KV cache
@pytest.mark.parametrize("model_name", ["tiny", "fused"])
def test_kv_cache_chunks_equal_full_decode(model_name, request):
    model = request.getfixturevalue(model_name)
    image = model.encode_image(pixels(model)).tokens
    ids, _ = text_ids(model, first_ids(model)[2])
    mask = torch.ones_like(ids)
    full = model.decode(image, ids, mask).tokens

    cache = KVCache.empty(model.config.text.num_layers)
    assert cache.length == 0
    first = model.decode(image, ids[:, :3], mask[:, :3], cache=cache).tokens
    assert cache.length == 3
    second = model.decode(None, ids[:, 3:], mask, cache=cache).tokens
    assert cache.length == T
    torch.testing.assert_close(torch.cat([first, second], 1), full, atol=1e-5, rtol=0)
    # cross-attention K/V are cached only where a layer cross-attends
    expected = [model.config.text.has_cross_attention(i) for i in range(len(cache.cross_kv))]
    assert [kv is not None for kv in cache.cross_kv] == expected

    # one token at a time too
    cache = KVCache.empty(model.config.text.num_layers)
    steps = [
        model.decode(image if i == 0 else None, ids[:, i : i + 1], mask[:, : i + 1], cache=cache)
        for i in range(T)
    ]
    stepped = torch.cat([s.tokens for s in steps], 1)
    torch.testing.assert_close(stepped, full, atol=1e-5, rtol=0)


def test_kv_cache_reorder(tiny):
    image = tiny.encode_image(pixels(tiny)).tokens
    ids, _ = text_ids(tiny, DEC_ID)
    mask = torch.ones_like(ids)
    cache = KVCache.empty(2)
    tiny.decode(image, ids[:, :3], mask[:, :3], cache=cache)
    before_self = [kv[0].clone() for kv in cache.self_kv]
    before_cross = [kv[1].clone() for kv in cache.cross_kv]
    index = torch.tensor([1, 1, 0])
    cache.reorder(index)
    for old, kv in zip(before_self, cache.self_kv, strict=True):
        assert kv[0].shape[0] == 3
        assert torch.equal(kv[0], old[index])
    for old, kv in zip(before_cross, cache.cross_kv, strict=True):
        assert torch.equal(kv[1], old[index])
    # continuing from the reordered cache equals decoding the reordered rows from scratch
    rest = tiny.decode(None, ids[index, 3:], mask[index], cache=cache).tokens
    full = tiny.decode(image[index], ids[index], mask[index]).tokens
    torch.testing.assert_close(rest, full[:, 3:], atol=1e-5, rtol=0)


# ------------------------------------------------------------------------------------- image size
def test_set_image_size():
    model = build("test_tiny")
    old_pos = model.visual_encoder.pos_embed.detach().clone()
    old_block = model.visual_encoder.blocks[0].attn.qkv.weight.detach().clone()
    model.set_image_size(64)
    assert model.config.vision.image_size == 64
    pos = model.visual_encoder.pos_embed
    assert pos.shape == (1, 1 + 16, 32)
    assert torch.equal(pos[:, 0], old_pos[:, 0])  # CLS position unchanged
    assert torch.equal(model.visual_encoder.blocks[0].attn.qkv.weight, old_block)
    out = model.encode_image(pixels(model))
    assert out.tokens.shape == (B, 17, 32)
    with pytest.raises(ValueError, match="64x64"):
        model.encode_image(torch.zeros(1, 3, 32, 32))
    # and back: the grid is resampled from the 4x4 one, CLS still the original
    model.set_image_size(32)
    assert model.visual_encoder.pos_embed.shape == (1, 5, 32)
    assert torch.equal(model.visual_encoder.pos_embed[:, 0], old_pos[:, 0])


def test_wrong_image_size_rejected(tiny):
    with pytest.raises(ValueError, match=r"expects 32x32 pixels, got \(48, 48\)"):
        tiny.encode_image(torch.zeros(1, 3, 48, 48))


def test_set_image_size_keeps_dtype():
    model = build("test_tiny").to(torch.bfloat16)
    model.set_image_size(64)
    out = model.encode_image(torch.zeros(1, 3, 64, 64, dtype=torch.bfloat16))
    assert out.tokens.dtype == torch.bfloat16


def test_set_image_size_keeps_eval_and_frozen_state():
    model = build("test_tiny").eval().requires_grad_(False)
    model.set_image_size(64)
    assert not model.visual_encoder.training
    assert not any(p.requires_grad for p in model.parameters())


def test_resize_pos_embed():
    torch.manual_seed(0)
    pe = torch.randn(1, 1 + 16, 8)
    assert torch.equal(resize_pos_embed(pe, 4), pe)
    # a linear ramp over the grid survives 4 -> 8 -> 4 approximately
    ys, xs = torch.meshgrid(torch.arange(4.0), torch.arange(4.0), indexing="ij")
    grid = torch.stack([xs, ys, xs + 2 * ys], -1).reshape(1, 16, 3)
    ramp = torch.cat([torch.full((1, 1, 3), 7.0), grid], 1)
    up = resize_pos_embed(ramp, 8)
    assert up.shape == (1, 65, 3)
    assert torch.equal(up[:, 0], ramp[:, 0])
    # the upsampled ramp is monotone along x
    up_grid = up[0, 1:].reshape(8, 8, 3)
    assert torch.all(up_grid[:, 1:, 0] > up_grid[:, :-1, 0])
    back = resize_pos_embed(up, 4)
    torch.testing.assert_close(back, ramp, atol=0.05, rtol=0)
    with pytest.raises(ValueError, match="not a square grid"):
        resize_pos_embed(torch.zeros(1, 1 + 15, 3), 4)


# ------------------------------------------------------------------------------------- generation
def test_generate_greedy_and_beam():
    model = build("test_tiny").train()
    px = pixels(model)
    for beams in (1, 3):
        caps = model.generate(px, num_beams=beams, max_length=10, min_length=5)
        assert isinstance(caps, list) and len(caps) == B
        assert all(isinstance(c, str) and c for c in caps)
        assert model.generate(px, num_beams=beams, max_length=10, min_length=5) == caps
        assert model.training  # train mode restored
        assert all(m.training for m in model.modules())
    model.eval()
    model.generate(px, num_beams=1, max_length=8)
    assert not model.training


def test_generate_text_is_decoded_ids_without_prompt(tiny, monkeypatch):
    """Captions are the generated ids decoded (BLIP's 4.x cleanup), prompt stripped."""
    tok = get_tokenizer()
    prompt = [DEC_ID, 1037, 3861, 1997]  # [DEC] a picture of
    words = tok.encode("a man's red hat, near the dog")[1:-1]
    fake = [[*prompt, *words, 102], [*prompt, *words[:3]]]  # EOS-ended / cut by max_length
    monkeypatch.setattr(generation, "generate_ids", lambda *a, **k: fake)
    caps = tiny.generate(pixels(tiny)[:2])
    assert caps == ["a man's red hat, near the dog", "a man '"]


def test_generate_max_length_too_short():
    model = build("test_tiny").train()
    prompt_len = len(get_tokenizer().encode(model.config.prompt)) - 1  # [DEC] + prompt words
    with pytest.raises(ValueError, match="max_length"):
        model.generate(pixels(model), max_length=prompt_len)
    assert model.training
    with pytest.raises(ValueError, match="max_length"):
        model.generate(pixels(model), num_beams=1, max_length=prompt_len - 1)


def test_greedy_matches_uncached_argmax(tiny):
    """Greedy generation with the KV cache equals a naive loop over full decodes."""
    tok = get_tokenizer()
    px = pixels(tiny)
    max_length, min_length = 10, 6
    rows = generation.generate_ids(tiny, px, "a picture of ", 1, max_length, min_length, 1.0, tok)
    prompt = generation.prompt_ids(tok, "a picture of ", B, torch.device("cpu"))
    assert prompt[0].tolist() == [DEC_ID, 1037, 3861, 1997]
    image = tiny.encode_image(px).tokens
    for b in range(B):
        seq = prompt[b : b + 1]
        while seq.shape[1] < max_length:
            logits = tiny.lm_logits(image[b : b + 1], seq, torch.ones_like(seq))[:, -1]
            if seq.shape[1] < min_length:
                logits[:, SEP_ID] = float("-inf")
            seq = torch.cat([seq, logits.argmax(-1, keepdim=True)], 1)
            if seq[0, -1] == SEP_ID:
                break
        assert rows[b] == seq[0].tolist()


def test_beam_search_matches_uncached_reference(tiny):
    """With min_length = max_length no beam can end early, and beam search reduces to: keep the
    k best running sums of log-probs, return the best at max_length. Checked against full decodes
    without a cache (so a wrong cache reorder shows)."""
    tok = get_tokenizer()
    px = pixels(tiny)
    k, max_length = 3, 9
    rows = generation.generate_ids(tiny, px, "a picture of ", k, max_length, max_length, 1.0, tok)
    image = tiny.encode_image(px).tokens
    prompt = [DEC_ID, 1037, 3861, 1997]
    for b in range(B):
        beams = [(0.0, prompt)]
        while len(beams[0][1]) < max_length:
            seqs = torch.tensor([seq for _, seq in beams])
            img = image[b : b + 1].expand(len(beams), -1, -1)
            logp = tiny.lm_logits(img, seqs, torch.ones_like(seqs))[:, -1].log_softmax(-1)
            logp[:, SEP_ID] = float("-inf")
            top = logp.topk(k, dim=-1)
            cands = [
                (score + s, [*seq, t])
                for (score, seq), vals, toks in zip(
                    beams, top.values.tolist(), top.indices.tolist(), strict=True
                )
                for s, t in zip(vals, toks, strict=True)
            ]
            beams = sorted(cands, key=lambda c: -c[0])[:k]
        assert rows[b] == beams[0][1]


def test_beam_search_rows():
    model = build("test_tiny")
    tok = get_tokenizer()
    rows = generation.generate_ids(model, pixels(model), "a picture of ", 3, 9, 6, 1.0, tok)
    assert len(rows) == B
    for row in rows:
        assert row[:4] == [DEC_ID, 1037, 3861, 1997]
        assert 6 <= len(row) <= 9
        assert SEP_ID not in row[:-1]


# ------------------------------------------------------------------------------------- save / load
def _outputs(model: BLIP) -> list[torch.Tensor]:
    cls_id, enc_id, dec_id = first_ids(model)
    img = model.encode_image(pixels(model))
    out = [img.tokens]
    if model.config.has_encoder:
        ids, mask = text_ids(model, cls_id)
        out += [img.feat, model.encode_text(ids, mask).feat]
        out.append(model.itm_logits(img.tokens, text_ids(model, enc_id)[0], mask))
    if model.config.has_decoder:
        ids, mask = text_ids(model, dec_id)
        out.append(model.lm_logits(img.tokens, ids, mask))
    return out


@pytest.mark.parametrize(
    "cfg",
    [
        dlip.get_config("test_tiny"),
        small_config(tie_decoder=False),
        small_config().replace(has_decoder=False),
        small_config().replace(has_encoder=False),
    ],
    ids=["tiny", "untied", "encoder_only", "decoder_only"],
)
def test_save_load_round_trip(cfg, tmp_path):
    model = build(cfg)
    assert dlip.save(model, tmp_path / "m") == tmp_path / "m"
    loaded = dlip.load(tmp_path / "m")
    assert not loaded.training
    assert loaded.config == model.config
    assert json.loads((tmp_path / "m" / "config.json").read_text()) == model.config.to_dict() | {
        "image_mean": list(model.config.image_mean),
        "image_std": list(model.config.image_std),
    }
    for a, b in zip(_outputs(model), _outputs(loaded), strict=True):
        assert torch.equal(a, b)
    # tying survives loading (structure comes from the config)
    if cfg.has_encoder and cfg.has_decoder and cfg.text.tie_decoder:
        lm = loaded.text_decoder.cls.predictions.decoder.weight
        assert lm is loaded.text_encoder.embeddings.word_embeddings.weight


def test_saved_file_stores_tied_tensors_once(tiny, tmp_path):
    dlip.save(tiny, tmp_path)
    with safe_open(str(tmp_path / "model.safetensors"), framework="pt") as f:
        keys = set(f.keys())
    assert len(keys) == len(list(tiny.parameters()))  # unique tensors
    assert len(keys) < len(tiny.state_dict())
    assert "text_encoder.embeddings.word_embeddings.weight" in keys
    assert "text_decoder.cls.predictions.decoder.weight" not in keys
    assert "text_decoder.bert.embeddings.word_embeddings.weight" not in keys
    assert "text_decoder.bert.encoder.layer.0.crossattention.self.query.weight" not in keys
    assert "text_decoder.bert.encoder.layer.0.attention.self.query.weight" in keys
    assert "temp" in keys
    assert not list(tmp_path.glob("*.tmp"))
    assert io.alias_map(tiny)["text_decoder.cls.predictions.decoder.weight"] == (
        "text_encoder.embeddings.word_embeddings.weight"
    )


def test_load_renamed_key_names_both(tiny, tmp_path):
    dlip.save(tiny, tmp_path)
    path = tmp_path / "model.safetensors"
    state = load_file(str(path))
    state["itm_head.wieght"] = state.pop("itm_head.weight")
    save_file(state, str(path))
    with pytest.raises(io.CheckpointError) as err:
        dlip.load(tmp_path)
    msg = str(err.value)
    assert "missing keys (1): ['itm_head.weight']" in msg
    assert "unexpected keys (1): ['itm_head.wieght']" in msg
    assert str(path) in msg


def test_load_shape_mismatch_names_both_shapes(tiny, tmp_path):
    dlip.save(tiny, tmp_path)
    path = tmp_path / "model.safetensors"
    state = load_file(str(path))
    state["text_proj.weight"] = torch.zeros(16, 31)
    save_file(state, str(path))
    with pytest.raises(io.CheckpointError) as err:
        dlip.load(tmp_path)
    msg = str(err.value)
    assert "text_proj.weight: checkpoint (16, 31) vs model (16, 32)" in msg
    assert "missing" not in msg and "unexpected" not in msg


def test_load_strict_rejects_duplicate_tied_key(tiny):
    """A state dict that also carries an alias of a tied tensor is rejected, naming it."""
    state = io.unique_state_dict(tiny)
    state["text_decoder.cls.predictions.decoder.weight"] = state[
        "text_encoder.embeddings.word_embeddings.weight"
    ]
    with pytest.raises(
        io.CheckpointError, match=r"text_decoder\.cls\.predictions\.decoder\.weight"
    ):
        io.load_strict(build("test_tiny"), state, "test")


def test_load_missing_paths(tiny, tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(FileNotFoundError, match="nope"):
        dlip.load(missing)
    dlip.save(tiny, tmp_path / "m")
    (tmp_path / "m" / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"model\.safetensors"):
        dlip.load(tmp_path / "m")
