"""`dlip info`: parameters per module and FLOPs, against numbers known from BLIP and DLIP."""

from __future__ import annotations

import json
from functools import cache

import pytest

import dlip
from dlip.cli import main
from dlip.models.counting import model_info


@cache
def _info(name: str, image_size: int | None = None) -> dict:
    cfg = dlip.get_config(name)
    return model_info(cfg.with_image_size(image_size) if image_size else cfg)


def test_blip_base_params_match_blip():
    p = _info("blip_base")["params"]
    # ViT-B/16: 12 blocks of 7,087,872 + embeddings/norm (timm vit_base_patch16_224: 85.80M).
    assert p["vision"] == 85_798_656
    # Cross-attention of 12 layers, each q/out 768x768 + k/v 768x768 (+ biases, LayerNorm).
    assert p["fusion"] == 12 * (4 * (768 * 768 + 768) + 2 * 768)
    # BLIP_Retrieval 223.5M, BLIP_Decoder 223.7M, BLIP_Pretrain 252.4M (tied decoder, no momentum).
    assert round(p["retrieval"] / 1e6, 1) == 223.5
    assert round(p["captioning"] / 1e6, 1) == 223.7
    assert round(p["total"] / 1e6, 1) == 252.4
    # Decoder-only: 12 self-attention blocks + LM head transform + bias.
    self_attn = 4 * (768 * 768 + 768) + 2 * 768
    head = 768 * 768 + 768 + 2 * 768 + 30524
    assert p["decoder_only"] == 12 * self_attn + head
    assert p["heads"] == 2 * (768 * 256 + 256) + (768 * 2 + 2) + 1  # + temp
    assert p["total"] == p["vision"] + p["text"] + p["fusion"] + p["decoder_only"] + p["heads"]


def test_student_params():
    small = _info("dlip_small")["params"]
    # The DLIP V2 student: retrieval 55.07M, captioning 55.05M, 58.8M unique.
    assert round(small["retrieval"] / 1e6, 2) == 55.07
    assert round(small["captioning"] / 1e6, 2) == 55.05
    assert round(small["total"] / 1e6, 1) == 58.8
    assert small["vision"] == 21_665_664  # ViT-S/16
    base = _info("dlip_base")["params"]
    assert 98e6 < base["retrieval"] < 100e6 and 110e6 < base["total"] < 115e6
    tiny = _info("dlip_tiny")["params"]
    assert tiny["vision"] == 5_524_416  # ViT-Ti/16


def test_flops_match_known_counts():
    base, small = _info("blip_base")["flops"], _info("dlip_small")["flops"]
    # published fvcore GMACs (x2 = FLOPs): ViT-B 17.56, BERT-base 30 tokens 2.57.
    assert base["image_embed"] == pytest.approx(2 * 17.56e9, rel=2e-3)
    assert base["text_embed"] == pytest.approx(2 * 2.57e9, rel=3e-3)
    assert small["image_embed"] == pytest.approx(9.20e9, rel=2e-3)  # ViT-S/16, flop_counter
    big = _info("blip_base", 384)["flops"]
    assert big["image_embed"] == pytest.approx(2 * 55.48e9, rel=3e-3)
    assert small["itm_pair"] < base["itm_pair"] / 4
    assert 0 < base["caption_token"] < base["text_embed"] / 10


def test_fusion_topology_changes_the_split():
    tiny = _info("dlip_tiny")["params"]  # 4 text layers, last 2 fuse: fusion = 2 whole layers
    cfg = dlip.get_config("dlip_tiny").text
    d, ffn = cfg.hidden_size, cfg.intermediate_size
    layer_self_ffn = 4 * (d * d + d) + 2 * d + (d * ffn + ffn) + (ffn * d + d) + 2 * d
    cross = (d * d + d) + 2 * (192 * d + d) + (d * d + d) + 2 * d
    assert tiny["fusion"] == 2 * (layer_self_ffn + cross)


def test_info_cli_json_with_ratios(capsys):
    assert main(["info", "dlip_small", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["teacher"]["name"] == "blip_base"
    ratio = out["ratios"]["params.total"]
    assert ratio == pytest.approx(out["params"]["total"] / out["teacher"]["params"]["total"])
    assert 0.2 < ratio < 0.25


def test_info_cli_table(capsys):
    assert main(["info", "dlip_base", "--image-size", "384"]) == 0
    text = capsys.readouterr().out
    assert "dlip_base @ 384px" in text and "vs teacher blip_base" in text
    assert "retrieval" in text and "caption_token" in text and "%" in text


def test_info_unknown_model(capsys):
    assert main(["info", "no_such_model"]) == 2
    assert "unknown model preset 'no_such_model'" in capsys.readouterr().err


def test_info_of_a_vqa_model_compares_with_blips_vqa(capsys):
    """dlip_tiny_vqa's vision width (192) differs from its text width (256): its answer decoder
    reads text-width question states, which the FLOP count must follow (it used to feed the
    decoder image tokens and fail)."""
    assert main(["info", "dlip_tiny_vqa", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["teacher"]["name"] == "blip_base_vqa"
    assert set(out["flops"]) == {"image_embed", "question_encode", "answer_token"}
    assert out["params"]["heads"] == 0 and out["params"]["retrieval"] == 0
    model = dlip.create_model("dlip_tiny_vqa")
    assert out["params"]["total"] == sum(p.numel() for p in model.parameters())
    assert 0 < out["flops"]["answer_token"] < out["flops"]["question_encode"]
