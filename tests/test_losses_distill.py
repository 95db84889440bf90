"""Tests for the distillation terms (dlip.losses.distill / adapters): every term against values
computed here with plain `math` on small explicit tensors, masking, temperatures, the head and
image-grid rules, layer maps, projectors, gradients, and an end-to-end run on two tiny models."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dlip
from dlip.losses.adapters import LayerMap, resample_patches, stream_layers
from dlip.losses.clipkd import TeacherKeys
from dlip.losses.distill import (
    KD_TERMS,
    ITCFeatures,
    KDAdapters,
    KDConfig,
    KDInputs,
    KDMasks,
    attention_kd,
    attention_kd_layers,
    distill_losses,
    hidden_kd,
    itc_kd,
    itm_kd,
    lm_kd,
    lm_kd_mask,
    match_heads,
    patch_kd,
    rep_kd,
)
from dlip.losses.itc import itc_loss
from dlip.models.outputs import ImageOutput, TextOutput

CLS_ID, DEC_ID, ENC_ID = 101, 30522, 30523
ALL_ON = KDConfig(weights=dict.fromkeys(KD_TERMS, 1.0))


pytestmark = pytest.mark.usefixtures("one_thread")


# --------------------------------------------------------------- independent reference math
def softmax(xs: list[float]) -> list[float]:
    m = max(xs)
    e = [math.exp(x - m) for x in xs]
    return [v / sum(e) for v in e]


def kl(p: list[float], q: list[float]) -> float:
    """KL(p || q) with 0 log 0 = 0."""
    return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q, strict=True) if pi > 0)


def matmul_t(a: list[list[float]], b: list[list[float]]) -> list[list[float]]:
    """a @ b.T on nested lists."""
    return [[sum(x * y for x, y in zip(r, c, strict=True)) for c in b] for r in a]


def t(x) -> torch.Tensor:
    return torch.tensor(x, dtype=torch.float32)


# ------------------------------------------------------------------------------------ config
def test_config_validates():
    assert KDConfig().enabled == ()
    cfg = KDConfig(weights={"kd_lm": 0.5, "kd_itc": 1, "kd_itm": 0})
    assert cfg.enabled == ("kd_itc", "kd_lm")  # KD_TERMS order, weight 0 = off
    assert cfg.weight("kd_lm") == 0.5 and cfg.weight("kd_rep_text") == 0.0
    with pytest.raises(ValueError, match=r"unknown KD term.*kd_bogus"):
        KDConfig(weights={"kd_bogus": 1.0})
    for bad in (-1.0, math.nan, math.inf, "1", True):
        with pytest.raises(ValueError, match="kd_itc"):
            KDConfig(weights={"kd_itc": bad})
    with pytest.raises(ValueError, match="rep_loss"):
        KDConfig(rep_loss="l1")
    with pytest.raises(ValueError, match="patch_pool"):
        KDConfig(patch_pool="max")
    with pytest.raises(ValueError, match="lm_temperature"):
        KDConfig(lm_temperature=0.0)
    with pytest.raises(ValueError, match="itc_temperature"):
        KDConfig(itc_temperature=-0.1)
    with pytest.raises(ValueError, match="stream"):
        KDConfig(layer_maps={"vision": [0]})


# -------------------------------------------------------------------------------- layer maps
def test_layer_map_spreads_keeping_the_first_and_last_layers():
    pairs = LayerMap.uniform("text", range(6), range(12)).pairs
    assert pairs == ((0, 0), (1, 2), (2, 4), (3, 7), (4, 9), (5, 11))
    # 4 <- 10: i * 9 / 3 = 0, 3, 6, 9.
    assert [t for _, t in LayerMap.uniform("x", range(4), range(10)).pairs] == [0, 3, 6, 9]
    assert [t for _, t in LayerMap.uniform("x", range(4), range(2)).pairs] == [0, 0, 1, 1]
    assert [t for _, t in LayerMap.uniform("x", range(5), range(1)).pairs] == [0] * 5
    assert LayerMap.uniform("x", range(3), range(3)).pairs == ((0, 0), (1, 1), (2, 2))
    assert LayerMap.uniform("x", range(1), range(12)).pairs == ((0, 11),)  # one layer: the last
    # Streams that do not start at layer 0 (the fusion layers of a fusion_layers=k model).
    assert LayerMap.uniform("fusion", range(4, 6), range(12)).pairs == ((4, 0), (5, 11))


@pytest.mark.parametrize(
    "student, teacher",
    [("dlip_small", "blip_base"), ("dlip_tiny", "blip_base"), ("dlip_tiny", "dlip_base"),
     ("test_tiny", "dlip_tiny")],
)  # fmt: skip
def test_kd_layer_maps_pair_each_layer_with_the_one_it_inherits(student, teacher):
    """One rule for `model.init=inherit` and the default KD maps: 12 -> 6 used to inherit
    0, 2, 4, 7, 9, 11 and distil towards 1, 3, 5, 7, 9, 11, pulling a copy of teacher layer 0
    towards layer 1. Where the topologies differ (test_tiny's fusion in every layer against
    dlip_tiny's last two), a stream whose inherited layers fall outside the teacher's stream
    spreads over the stream's own layers."""
    from types import SimpleNamespace

    from dlip.losses.adapters import stream_layers
    from dlip.models.init import resolve_layer_maps

    s, t = dlip.get_config(student), dlip.get_config(teacher)
    terms = ("kd_hidden_image", "kd_hidden_text", "kd_hidden_fusion", "kd_hidden_decoder")
    adapters = KDAdapters.build(KDConfig(weights=dict.fromkeys(terms, 1.0)), s, t)
    inherit = resolve_layer_maps(SimpleNamespace(config=s), SimpleNamespace(config=t))
    vision, text = inherit["vision"], inherit["text"]
    for stream in ("image", "text", "fusion", "decoder"):
        inherited = vision if stream == "image" else text
        pairs = adapters.layer_maps[stream].pairs
        s_layers, t_layers = stream_layers(s, stream), stream_layers(t, stream)
        if all(inherited[i] in t_layers for i in s_layers):
            assert pairs and all(inherited[i] == j for i, j in pairs), (stream, pairs, inherited)
        else:
            assert pairs == LayerMap.uniform(stream, s_layers, t_layers).pairs
    if (student, teacher) == ("dlip_small", "blip_base"):
        assert [j for _, j in adapters.layer_maps["text"].pairs] == [0, 2, 4, 7, 9, 11]


def test_layer_map_explicit_forms_and_errors():
    m = LayerMap.resolve("text", [0, 11], range(2), range(12))
    assert m.pairs == ((0, 0), (1, 11)) and m.teacher_layers == {0, 11}
    m = LayerMap.resolve("text", [[1, 5]], range(2), range(12))
    assert m.pairs == ((1, 5),) and m.student_layers == {1}
    assert LayerMap.resolve("text", None, range(2), range(4)).pairs == ((0, 0), (1, 3))
    with pytest.raises(ValueError, match=r"teacher layer 12 is out of range.*has 12 layers"):
        LayerMap.resolve("text", [0, 12], range(2), range(12))
    with pytest.raises(ValueError, match=r"student layer 2 is out of range.*has 2 layers"):
        LayerMap.resolve("decoder", [[2, 0]], range(2), range(12))
    with pytest.raises(ValueError, match=r"teacher layer -1"):
        LayerMap.resolve("text", [-1, 3], range(2), range(12))
    with pytest.raises(ValueError, match=r"lists 3 teacher layers.*runs 2 layers"):
        LayerMap.resolve("text", [0, 1, 2], range(2), range(12))
    with pytest.raises(ValueError, match="empty"):
        LayerMap.resolve("text", [], range(2), range(12))
    with pytest.raises(ValueError, match="list of ints or of"):
        LayerMap.resolve("text", ["a", "b"], range(2), range(12))
    # The fusion layers of a fusion_layers=1, 3-layer tower are layer 2 only.
    with pytest.raises(ValueError, match=r"student layer 0.*has 3 layers.*runs layers 2-2"):
        LayerMap.resolve("fusion", [[0, 0]], range(2, 3), range(12), depths=(3, 12))


# ------------------------------------------------------------------------- tiny model configs
def teacher_config() -> dlip.ModelConfig:
    """Wider and deeper than the student; 48 px (3x3 grid); vision 3 heads, text 4 heads."""
    base = dlip.get_config("test_tiny")
    return base.replace(
        name="kd_teacher",
        vision=dataclasses.replace(base.vision, width=48, depth=4, num_heads=3, image_size=48),
        text=dataclasses.replace(
            base.text, hidden_size=48, num_layers=4, num_heads=4, intermediate_size=96
        ),
        embed_dim=24,
    )


def student_config() -> dlip.ModelConfig:
    """test_tiny (32 px, 2x2 grid, 2 heads) with one fusion layer on one text-only layer."""
    base = dlip.get_config("test_tiny")
    return base.replace(name="kd_student", text=dataclasses.replace(base.text, fusion_layers=1))


def test_adapters_projectors_shapes_and_trainable():
    cfg = KDConfig(weights={"kd_rep_image": 1, "kd_rep_patch": 1, "kd_rep_text": 1, "kd_itc": 1})
    adapters = KDAdapters.build(cfg, student_config(), teacher_config())
    assert set(adapters.keys()) == {"kd_rep_image", "kd_rep_patch", "kd_rep_text"}
    for term in adapters:
        proj = adapters[term]
        assert isinstance(proj, nn.Linear)
        assert (proj.in_features, proj.out_features) == (32, 48)
        assert all(p.requires_grad for p in proj.parameters())
    assert adapters.layer_maps == {}
    # Equal widths -> identity, no parameters.
    same = KDAdapters.build(cfg, student_config(), student_config())
    assert all(isinstance(m, nn.Identity) for m in same.values())
    assert sum(p.numel() for p in same.parameters()) == 0
    # Saved with the student: projector weights are state, layer maps are not.
    keys = set(adapters.state_dict())
    assert keys == {f"{k}.{p}" for k in adapters for p in ("weight", "bias")}
    with pytest.raises(KeyError, match="kd_rep_fusion"):
        adapters.projector("kd_rep_fusion")


def test_adapters_layer_maps_and_taps():
    s_cfg, t_cfg = student_config(), teacher_config()
    assert stream_layers(s_cfg, "text") == range(1) and stream_layers(s_cfg, "fusion") == range(
        1, 2
    )
    assert stream_layers(t_cfg, "text") == range(4) and stream_layers(t_cfg, "fusion") == range(4)
    cfg = KDConfig(
        weights={"kd_hidden_image": 1, "kd_attn_cross": 1, "kd_attn_decoder": 1},
        layer_maps={"decoder": [1, 2]},
    )
    adapters = KDAdapters.build(cfg, s_cfg, t_cfg)
    assert adapters.layer_maps["image"].pairs == ((0, 0), (1, 3))  # as inherit copies
    assert adapters.layer_maps["fusion"].pairs == ((1, 3),)
    assert adapters.layer_maps["decoder"].pairs == ((0, 1), (1, 2))
    image = adapters.taps("image", "teacher")
    assert image.hidden == {0, 3} and image.attn == frozenset()
    fusion = adapters.taps("fusion", "student")
    assert fusion.attn == {1} and fusion.hidden == frozenset()
    assert adapters.taps("text", "student").hidden == frozenset()
    bad = dataclasses.replace(cfg, layer_maps={"decoder": [0, 4]})
    with pytest.raises(ValueError, match=r"teacher layer 4 is out of range.*has 4 layers"):
        KDAdapters.build(bad, s_cfg, t_cfg)
    no_dec = s_cfg.replace(has_decoder=False)
    with pytest.raises(ValueError, match=r"kd_attn_decoder needs the student.*has_decoder"):
        KDAdapters.build(cfg, no_dec, t_cfg)
    vocab = t_cfg.replace(text=dataclasses.replace(t_cfg.text, vocab_size=100))
    with pytest.raises(ValueError, match="kd_lm needs equal vocabularies"):
        KDAdapters.build(KDConfig(weights={"kd_lm": 1}), s_cfg, vocab)


# ----------------------------------------------------------------------------------- ITC
def test_itc_kd_hand_computed():
    s_img, s_txt, s_temp = [[1.0, 0.0], [0.0, 1.0]], [[1.0, 0.0], [0.0, 1.0]], 0.5
    t_img, t_txt, t_temp = [[1.0, 0.0], [0.6, 0.8]], [[1.0, 0.0], [0.0, 1.0]], 0.25

    def expected(teacher_temp: float) -> float:
        total = 0.0
        for s_sim, t_sim in (
            (matmul_t(s_img, s_txt), matmul_t(t_img, t_txt)),  # image -> text
            (matmul_t(s_txt, s_img), matmul_t(t_txt, t_img)),  # text -> image
        ):
            rows = [
                kl(softmax([x / teacher_temp for x in tr]), softmax([x / s_temp for x in sr]))
                for sr, tr in zip(s_sim, t_sim, strict=True)
            ]
            total += sum(rows) / len(rows)
        return total / 2

    student = ITCFeatures(t(s_img), t(s_txt), torch.tensor(s_temp))
    teacher = ITCFeatures(t(t_img), t(t_txt), torch.tensor(t_temp))
    assert itc_kd(student, teacher).item() == pytest.approx(expected(0.25), rel=1e-5)
    # A configured KD temperature replaces the teacher's temperature only.
    assert itc_kd(student, teacher, temperature=1.0).item() == pytest.approx(
        expected(1.0), rel=1e-5
    )
    assert expected(1.0) != pytest.approx(expected(0.25), rel=1e-2)
    same = itc_kd(teacher, teacher)
    assert same.item() == pytest.approx(0.0, abs=1e-7)


def test_itc_kd_over_gathered_keys_matches_one_process():
    g = torch.Generator().manual_seed(0)
    feats = [F.normalize(torch.randn(4, 8, generator=g), dim=-1) for _ in range(4)]
    s_img, s_txt, t_img, t_txt = feats
    full = itc_kd(ITCFeatures(s_img, s_txt, 0.07), ITCFeatures(t_img, t_txt, 0.05))
    per_rank = []
    for rows in (slice(0, 2), slice(2, 4)):  # two "ranks", each scoring its rows vs all keys
        student = ITCFeatures(s_img[rows], s_txt[rows], 0.07, image_all=s_img, text_all=s_txt)
        teacher = ITCFeatures(t_img[rows], t_txt[rows], 0.05, image_all=t_img, text_all=t_txt)
        per_rank.append(itc_kd(student, teacher))
    torch.testing.assert_close(torch.stack(per_rank).mean(), full)
    with pytest.raises(ValueError, match="same rows and keys"):
        itc_kd(ITCFeatures(s_img[:2], s_txt[:2], 0.07), ITCFeatures(t_img, t_txt, 0.05))


# ------------------------------------------------------------------------------- ITM / LM
def test_itm_kd_hand_computed_with_temperature():
    s, te = [[1.0, 0.0], [0.0, 2.0], [0.5, 0.5]], [[0.0, 1.0], [1.0, 1.0], [3.0, -1.0]]
    for temp in (1.0, 2.0):
        rows = [
            kl(softmax([x / temp for x in tr]), softmax([x / temp for x in sr]))
            for sr, tr in zip(s, te, strict=True)
        ]
        expected = temp**2 * sum(rows) / len(rows)
        assert itm_kd(t(s), t(te), temp).item() == pytest.approx(expected, rel=1e-5)
    assert itm_kd(t(te), t(te), 2.0).item() == pytest.approx(0.0, abs=1e-7)


def test_lm_kd_mask_excludes_pad_prompt_and_last_position():
    attention = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]])
    # Token j is a target when real and j >= prompt_length; logit position j-1 predicts it.
    assert lm_kd_mask(attention, 2).tolist() == [
        [False, True, True, False, False],
        [False, True, True, True, False],
    ]
    per_row = lm_kd_mask(attention, torch.tensor([1, 3]))
    assert per_row.tolist() == [[True, True, True, False, False], [False, False, True, True, False]]


def test_lm_kd_hand_computed_and_masked():
    s = t([[[1.0, 0.0, 0.0], [0.0, 2.0, 1.0], [5.0, 5.0, 5.0], [1.0, -1.0, 0.0]]])  # (1, 4, 3)
    te = t([[[0.0, 0.0, 9.0], [1.0, 0.0, 0.0], [0.0, 0.0, 0.0], [2.0, 2.0, 2.0]]])
    mask = lm_kd_mask(torch.tensor([[1, 1, 1, 0]]), prompt_length=2)
    assert mask.tolist() == [[False, True, False, False]]  # only position 1 (token 2) counts
    for temp in (1.0, 3.0):
        row = kl(
            softmax([x / temp for x in (1.0, 0.0, 0.0)]),
            softmax([x / temp for x in (0.0, 2.0, 1.0)]),
        )
        expected = temp**2 * row
        assert lm_kd(s, te, mask, temp).item() == pytest.approx(expected, rel=1e-5)
    # Values at pad / prompt / last positions change nothing.
    s2, te2 = s.clone(), te.clone()
    s2[0, [0, 2, 3]] = torch.randn(3, 3)
    te2[0, [0, 2, 3]] = torch.randn(3, 3)
    torch.testing.assert_close(lm_kd(s2, te2, mask), lm_kd(s, te, mask))
    assert lm_kd(te, te, mask).item() == pytest.approx(0.0, abs=1e-7)
    assert lm_kd(s, te, torch.zeros_like(mask)).item() == 0.0
    with pytest.raises(ValueError, match="equal vocabularies"):
        lm_kd(s, te[..., :2], mask)
    # Logits gathered at the counted positions (as the tasks now run the head) give the same
    # value; a gathered row count that disagrees with the mask is refused.
    for temp in (1.0, 3.0):
        torch.testing.assert_close(lm_kd(s[mask], te[mask], mask, temp), lm_kd(s, te, mask, temp))
    with pytest.raises(ValueError, match="2 gathered logit rows for 1 counted"):
        lm_kd(s[0, :2], te[0, :2], mask)


# -------------------------------------------------------------------------- representations
def test_rep_kd_cos_and_mse_hand_computed():
    ident = nn.Identity()
    assert rep_kd(t([[1.0, 0.0]]), t([[1.0, 1.0]]), ident, "cos").item() == pytest.approx(
        1 - 1 / math.sqrt(2), rel=1e-6
    )
    assert rep_kd(t([[1.0, 2.0]]), t([[0.0, 0.0]]), ident, "mse").item() == pytest.approx(2.5)
    proj = nn.Linear(1, 2)  # width 1 -> 2 with fixed weights: P s = (3, 3) for s = 3
    with torch.no_grad():
        proj.weight.fill_(1.0)
        proj.bias.zero_()
    assert rep_kd(t([[3.0]]), t([[1.0, 1.0]]), proj, "cos").item() == pytest.approx(0.0, abs=1e-6)
    assert rep_kd(t([[3.0]]), t([[1.0, 1.0]]), proj, "mse").item() == pytest.approx(4.0)
    # Per-token masked mean (decoder states): token 1 is padding.
    s, te = t([[[1.0, 0.0], [7.0, 7.0]]]), t([[[0.0, 1.0], [-3.0, 2.0]]])
    mask = torch.tensor([[1, 0]])
    assert rep_kd(s, te, ident, "mse", mask).item() == pytest.approx(1.0)
    assert rep_kd(s, te, ident, "cos", mask).item() == pytest.approx(1.0)
    s[0, 1], te[0, 1] = torch.tensor([-5.0, 1.0]), torch.tensor([4.0, 4.0])
    assert rep_kd(s, te, ident, "mse", mask).item() == pytest.approx(1.0)
    with pytest.raises(ValueError, match="shape"):
        rep_kd(t([[1.0, 0.0]]), t([[1.0, 0.0, 0.0]]), ident)


def test_resample_patches_rule():
    # 2x2 -> 1x1 is the mean of the 4 patches; CLS is kept.
    x = t([[[9.0, 9.0], [1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 1.0]]])  # (1, 1+4, 2)
    torch.testing.assert_close(resample_patches(x, 2, dim=1), t([[[9.0, 9.0], [0.5, 0.5]]]))
    assert resample_patches(x, 5, dim=1) is x  # same grid: untouched
    # Upsampling a constant grid keeps it constant.
    const = torch.full((1, 1 + 4, 3), 2.0)
    torch.testing.assert_close(resample_patches(const, 1 + 9, dim=1), torch.full((1, 10, 3), 2.0))
    # mass=True keeps each attention row a distribution with the same CLS probability.
    probs = torch.rand(2, 3, 4, 1 + 9).softmax(-1)
    out = resample_patches(probs, 1 + 4, dim=3, mass=True)
    torch.testing.assert_close(out.sum(-1), torch.ones(2, 3, 4))
    torch.testing.assert_close(out[..., 0], probs[..., 0])
    with pytest.raises(ValueError, match="square grid"):
        resample_patches(torch.zeros(1, 1 + 3, 2), 5, dim=1)


def test_patch_kd_token_mean_and_grid_mismatch():
    ident = nn.Identity()
    student = t([[[0.0, 0.0], [1.0, 0.0]]])  # CLS + one patch (1x1 grid)
    teacher = t([[[5.0, 5.0], [1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 1.0]]])  # 2x2 grid
    # The teacher grid is resampled to 1x1 = mean patch (0.5, 0.5): cos = 1/sqrt(2).
    expected = 1 - 1 / math.sqrt(2)
    assert patch_kd(student, teacher, ident, "cos", "token").item() == pytest.approx(expected)
    assert patch_kd(student, teacher, ident, "cos", "mean").item() == pytest.approx(expected)
    # Equal grids, per token: patches (1,0)->(0,1) cos 0 and (1,1)->(1,1) cos 1 -> mean 0.5.
    s2 = t([[[0.0, 0.0], [1.0, 0.0], [1.0, 1.0], [1.0, 0.0], [1.0, 1.0]]])
    t2 = t([[[3.0, 3.0], [0.0, 1.0], [1.0, 1.0], [0.0, 1.0], [1.0, 1.0]]])
    assert patch_kd(s2, t2, ident, "cos", "token").item() == pytest.approx(0.5)
    # Mean over patches: (1, 0.5) vs (0.5, 1).
    assert patch_kd(s2, t2, ident, "mse", "mean").item() == pytest.approx(0.25)


def test_hidden_kd_layer_map_and_padding():
    layer_map = LayerMap("text", ((0, 1), (1, 3)))
    ident = nn.Identity()
    student = {0: torch.zeros(1, 2, 2), 1: torch.ones(1, 2, 2)}
    teacher = {i: torch.full((1, 2, 2), float(v)) for i, v in enumerate([-9, 2, 99, 0])}
    # pair (0, 1): (0 - 2)^2 = 4; pair (1, 3): (1 - 0)^2 = 1 -> mean 2.5
    assert hidden_kd(student, teacher, layer_map, ident, "mse").item() == pytest.approx(2.5)
    mask = torch.tensor([[1, 0]])
    student[1][0, 1], teacher[3][0, 1] = torch.tensor([8.0, -8.0]), torch.tensor([3.0, 1.0])
    assert hidden_kd(student, teacher, layer_map, ident, "mse", mask).item() == pytest.approx(2.5)
    with pytest.raises(ValueError, match=r"no tapped layer 3.*adapters.taps\('text', 'teacher'\)"):
        hidden_kd(student, {1: teacher[1]}, layer_map, ident)


# ------------------------------------------------------------------------------- attention
def test_attention_kd_hand_computed_no_softmax():
    te = t([[[[0.5, 0.5], [0.9, 0.1]]]])  # (B=1, H=1, Tq=2, Tk=2) probabilities
    s = t([[[[0.25, 0.75], [0.5, 0.5]]]])
    expected = (kl([0.5, 0.5], [0.25, 0.75]) + kl([0.9, 0.1], [0.5, 0.5])) / 2
    assert attention_kd(s, te).item() == pytest.approx(expected, rel=1e-5)
    assert attention_kd(te, te).item() == pytest.approx(0.0, abs=1e-7)


def test_attention_kd_padded_keys_and_queries():
    te = t([[[[0.5, 0.5], [0.9, 0.1]]]])
    s = t([[[[0.25, 0.75], [0.5, 0.5]]]])
    base = attention_kd(s, te).item()
    # A third, padded key and a third, padded query row, with arbitrary values.
    te3 = t([[[[0.4, 0.4, 0.2], [0.72, 0.08, 0.2], [0.1, 0.1, 0.8]]]])
    s3 = t([[[[0.2, 0.6, 0.2], [0.45, 0.45, 0.1], [0.3, 0.3, 0.4]]]])
    keys, queries = torch.tensor([[1, 1, 0]]), torch.tensor([[1, 1, 0]])
    assert attention_kd(s3, te3, keys, queries).item() == pytest.approx(base, rel=1e-5)
    s3[0, 0, :, 2], te3[0, 0, :, 2] = 0.7, 0.01  # padded key column changes
    s3[0, 0, 2], te3[0, 0, 2] = t([0.9, 0.05, 0.05]), t([0.05, 0.9, 0.05])  # padded row
    assert attention_kd(s3, te3, keys, queries).item() == pytest.approx(base, rel=1e-5)
    assert attention_kd(s3, te3).item() != pytest.approx(base, rel=1e-3)  # the masks matter


def test_attention_kd_causal_zeros():
    te = t([[[[1.0, 0.0], [0.5, 0.5]]]])  # decoder: query 0 sees key 0 only
    s = t([[[[1.0, 0.0], [0.25, 0.75]]]])
    expected = (0.0 + kl([0.5, 0.5], [0.25, 0.75])) / 2
    out = attention_kd(s, te, key_mask=torch.ones(1, 2), query_mask=torch.ones(1, 2))
    assert out.item() == pytest.approx(expected, rel=1e-5)


def test_head_rule_groups_when_divisible_else_averages():
    s = t([[[[0.5, 0.5]], [[0.6, 0.4]]]])  # (1, Hs=2, 1, 2)
    # Ht=4 -> teacher heads (0, 1) and (2, 3) averaged: (0.3, 0.7) and (0.7, 0.3)
    te4 = t([[[[0.2, 0.8]], [[0.4, 0.6]], [[0.9, 0.1]], [[0.5, 0.5]]]])
    expected = (kl([0.3, 0.7], [0.5, 0.5]) + kl([0.7, 0.3], [0.6, 0.4])) / 2
    assert attention_kd(s, te4).item() == pytest.approx(expected, rel=1e-5)
    assert match_heads(s, te4)[1].shape == (1, 2, 1, 2)
    te3 = te4[:, :3]  # Ht=3, Hs=2: both head-averaged: (0.5, 0.5) vs (0.55, 0.45)
    expected = kl([0.5, 0.5], [0.55, 0.45])
    assert attention_kd(s, te3).item() == pytest.approx(expected, abs=1e-6)
    a, b = match_heads(s, te3)
    assert a.shape == b.shape == (1, 1, 1, 2)


def test_attention_layers_image_grid_mismatch():
    layer_map = LayerMap("fusion", ((0, 1),))
    # Cross-attention: text query -> image keys; teacher 1+4 keys, student 1+1.
    teacher = {0: torch.rand(1, 1, 1, 5), 1: t([[[[0.2, 0.2, 0.2, 0.2, 0.2]]]])}
    student = {0: t([[[[0.2, 0.8]]]])}  # the teacher's patch mass 0.8 lands on one patch
    out = attention_kd_layers(student, teacher, layer_map, image_keys=True)
    assert out.item() == pytest.approx(0.0, abs=1e-6)
    student = {0: t([[[[0.5, 0.5]]]])}
    out = attention_kd_layers(student, teacher, layer_map, image_keys=True)
    assert out.item() == pytest.approx(kl([0.2, 0.8], [0.5, 0.5]), rel=1e-5)
    # Vision self-attention: queries resampled too; the patch query row is the mean patch row.
    rows = [[0.5, 0.5, 0, 0, 0], [0.1, 0.9, 0, 0, 0], [0.1, 0, 0.9, 0, 0], [0.1, 0, 0, 0.9, 0]]
    rows.append([0.1, 0, 0, 0, 0.9])
    teacher = {1: t([[rows]])}  # (1, 1, 5, 5)
    student = {0: t([[[[0.5, 0.5], [0.3, 0.7]]]])}
    out = attention_kd_layers(student, teacher, layer_map, image_queries=True, image_keys=True)
    expected = (kl([0.5, 0.5], [0.5, 0.5]) + kl([0.1, 0.9], [0.3, 0.7])) / 2
    assert out.item() == pytest.approx(expected, rel=1e-5)


# --------------------------------------------------------------------- orchestration on models
def build(config: dlip.ModelConfig, seed: int) -> dlip.BLIP:
    torch.manual_seed(seed)
    return dlip.create_model(config)


def batch(image_size: int = 48, b: int = 2, length: int = 6):
    g = torch.Generator().manual_seed(3)
    pixels = torch.randn(b, 3, image_size, image_size, generator=g)
    body = torch.randint(1000, 2000, (b, length), generator=g)
    mask = torch.ones(b, length, dtype=torch.long)
    mask[1, -2:] = 0  # row 1 is padded
    body[1, -2:] = 0
    ids = {}
    for name, first in (("cls", CLS_ID), ("enc", ENC_ID), ("dec", DEC_ID)):
        ids[name] = body.clone()
        ids[name][:, 0] = first
    return pixels, ids, mask


def forward(model, adapters, side, pixels, ids, mask) -> KDInputs:
    size = model.config.vision.image_size
    if pixels.shape[-1] != size:  # a model that sees another size gets its input re-made
        pixels = F.interpolate(pixels, size=(size, size), mode="bilinear", antialias=True)
    image = model.encode_image(pixels, taps=adapters.taps("image", side))
    text = model.encode_text(ids["cls"], mask, taps=adapters.taps("text", side))
    fusion = model.multimodal(image.tokens, ids["enc"], mask, taps=adapters.taps("fusion", side))
    decoder = model.decode(image.tokens, ids["dec"], mask, taps=adapters.taps("decoder", side))
    return KDInputs(
        image=image,
        text=text,
        fusion=fusion,
        decoder=decoder,
        itc=ITCFeatures(image.feat, text.feat, model.temp),
        itm_logits=model.itm_head(fusion.tokens[:, 0]),
        lm_logits=model.text_decoder.cls(decoder.tokens),
        keys=TeacherKeys(image.feat, text.feat) if side == "teacher" else None,  # kd_icl
    )


def masks_for(ids, mask) -> KDMasks:
    return KDMasks(text=mask, decoder=mask, lm=lm_kd_mask(mask, prompt_length=1))


def test_end_to_end_every_term_finite_positive_and_gradients():
    s_cfg, t_cfg = student_config(), teacher_config()
    student, teacher = build(s_cfg, 0).train(), build(t_cfg, 1).eval().requires_grad_(False)
    adapters = KDAdapters.build(ALL_ON, s_cfg, t_cfg)
    pixels, ids, mask = batch()
    with torch.no_grad():
        t_in = forward(teacher, adapters, "teacher", pixels, ids, mask)
    s_in = forward(student, adapters, "student", pixels, ids, mask)
    assert s_in.image.tokens.shape[1] == 5 and t_in.image.tokens.shape[1] == 10  # 2x2 vs 3x3
    losses = distill_losses(s_in, t_in, adapters, ALL_ON, masks_for(ids, mask))
    assert list(losses) == list(KD_TERMS)
    for term, value in losses.items():
        assert value.dim() == 0 and torch.isfinite(value), term
        assert value.item() > 0, term
    sum(losses.values()).backward()
    for name, p in adapters.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert all(p.grad is None for p in teacher.parameters())
    assert student.visual_encoder.blocks[0].attn.qkv.weight.grad.abs().sum() > 0
    assert student.text_decoder.bert.encoder.layer[1].attention.self.query.weight.grad is not None
    assert student.temp.grad is not None  # kd_itc reaches the student's own temperature


def test_identical_student_and_teacher_give_zero():
    cfg = student_config()
    model = build(cfg, 0).eval()
    adapters = KDAdapters.build(ALL_ON, cfg, cfg)  # equal widths: identity projectors
    pixels, ids, mask = batch(image_size=32)
    with torch.no_grad():
        a = forward(model, adapters, "student", pixels, ids, mask)
        b = forward(model, adapters, "teacher", pixels, ids, mask)
    losses = distill_losses(a, b, adapters, ALL_ON, masks_for(ids, mask))
    assert set(losses) == set(KD_TERMS)
    # kd_icl is a cross-entropy: against identical keys, the model's own in-batch ITC loss
    itc = itc_loss(a.itc.image, a.itc.text, model.temp).loss
    assert losses.pop("kd_icl").item() == pytest.approx(itc.item(), rel=1e-5)
    for term, value in losses.items():
        assert abs(value.item()) < 1e-5, term


def test_gradients_reach_student_inputs_not_teacher():
    layer_map = LayerMap.uniform("text", range(1), range(1))
    adapters = KDAdapters(
        {"kd_rep_text": nn.Linear(2, 3), "kd_hidden_text": nn.Linear(2, 3)}, {"text": layer_map}
    )
    g = torch.Generator().manual_seed(0)

    def leaf(*shape):
        return torch.randn(*shape, generator=g).requires_grad_(True)

    s_att, t_att = leaf(1, 2, 3, 3), leaf(1, 4, 3, 3)
    s_text = TextOutput(
        tokens=leaf(1, 3, 2), hidden={0: leaf(1, 3, 2)}, attn={0: s_att.softmax(-1)}
    )
    t_text = TextOutput(
        tokens=leaf(1, 3, 3), hidden={0: leaf(1, 3, 3)}, attn={0: t_att.softmax(-1)}
    )
    s_in = KDInputs(text=s_text, itm_logits=leaf(3, 2), lm_logits=leaf(1, 3, 5))
    t_in = KDInputs(text=t_text, itm_logits=leaf(3, 2), lm_logits=leaf(1, 3, 5))
    cfg = KDConfig(
        weights=dict.fromkeys(
            ("kd_itm", "kd_lm", "kd_rep_text", "kd_hidden_text", "kd_attn_text"), 1.0
        )
    )
    losses = distill_losses(s_in, t_in, adapters, cfg, KDMasks(text=torch.tensor([[1, 1, 0]])))
    sum(losses.values()).backward()
    for x in (s_text.tokens, s_text.hidden[0], s_att, s_in.itm_logits, s_in.lm_logits):
        assert x.grad is not None and x.grad.abs().sum() > 0
    for x in (t_text.tokens, t_text.hidden[0], t_att, t_in.itm_logits, t_in.lm_logits):
        assert x.grad is None
    assert all(p.grad is not None for p in adapters.parameters())


def test_distill_losses_only_enabled_terms_and_clear_errors():
    cfg = KDConfig(weights={"kd_itm": 2.0, "kd_lm": 0.0})
    s_in, t_in = KDInputs(itm_logits=t([[1.0, 0.0]])), KDInputs(itm_logits=t([[0.0, 1.0]]))
    losses = distill_losses(s_in, t_in, KDAdapters(), cfg)
    assert list(losses) == ["kd_itm"]  # unweighted: the trainer applies the weights
    expected = kl(softmax([0.0, 1.0]), softmax([1.0, 0.0]))
    assert losses["kd_itm"].item() == pytest.approx(expected, rel=1e-5)
    with pytest.raises(ValueError, match=r"kd_itm needs the teacher's KDInputs.itm_logits"):
        distill_losses(s_in, KDInputs(), KDAdapters(), cfg)
    cfg = KDConfig(weights={"kd_attn_text": 1.0})
    text = TextOutput(tokens=torch.zeros(1, 2, 2))
    with pytest.raises(ValueError, match="no 'text' layer map"):
        distill_losses(KDInputs(text=text), KDInputs(text=text), KDAdapters(), cfg)
    with pytest.raises(ValueError, match="no tapped layer"):
        adapters = KDAdapters(layer_maps={"text": LayerMap("text", ((0, 0),))})
        distill_losses(KDInputs(text=text), KDInputs(text=text), adapters, cfg)
    image = ImageOutput(tokens=torch.zeros(1, 5, 2), feat=None)
    assert image.attn == {}
