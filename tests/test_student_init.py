"""Student initialisation (`model.init`): a timm / DeiT ViT checkpoint into the vision tower,
inheriting teacher weights by the layer map, and the trainer's `build_task` hook."""

from __future__ import annotations

import pytest
import timm
import torch
from safetensors.torch import save_file

import dlip
from dlip.config import ConfigError
from dlip.models.config import ModelConfig
from dlip.models.init import (
    apply_init,
    head_channels,
    init_from_teacher,
    init_from_timm,
    spread,
    text_layer_map,
)
from dlip.models.presets import get_config
from dlip.train.config import load
from dlip.train.pretrain import build_task
from dlip.train.task import load_teacher


def tiny(vision: dict | None = None, text: dict | None = None) -> ModelConfig:
    data = get_config("test_tiny").to_dict()
    data["vision"].update(vision or {})
    data["text"].update(text or {})
    return ModelConfig.from_dict(data)


def timm_vit(img_size: int = 32, depth: int = 2) -> torch.nn.Module:
    """A real registered timm ViT (DeiT-Tiny / ViT-Ti dims: width 192, 3 heads), shallow."""
    torch.manual_seed(3)
    return timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, img_size=img_size, depth=depth
    ).eval()


def vit_student(image_size: int = 32) -> dlip.BLIP:
    torch.manual_seed(0)
    config = tiny(vision={"width": 192, "num_heads": 3, "mlp_ratio": 4.0})
    return dlip.BLIP(config.with_image_size(image_size)).eval()


def save_deit_style(vit: torch.nn.Module, path, fmt: str):
    state = {k: v.clone() for k, v in vit.state_dict().items()}  # has head.weight / head.bias
    if fmt == "safetensors":
        save_file(state, str(path))
    else:
        torch.save({"model": state, "epoch": 300}, path)  # DeiT's released .pth layout
    return path


# ---------------------------------------------------------------------------------------- timm
@pytest.mark.parametrize("fmt", ["pth", "safetensors"])
def test_timm_checkpoint_loads_into_the_vision_tower_exactly(tmp_path, fmt):
    vit = timm_vit()
    path = save_deit_style(vit, tmp_path / f"deit.{fmt}", fmt)
    student = vit_student()
    text_before = student.text_encoder.embeddings.word_embeddings.weight.clone()
    report = init_from_timm(student, path)

    ref = vit.state_dict()
    own = student.visual_encoder.state_dict()
    assert set(own) < set(ref)
    for k in own:
        assert torch.equal(own[k], ref[k]), k
    assert report.ignored == ["head.bias", "head.weight"]
    assert len(report.copied) == len(own) and report.resized == []
    assert report.params_copied == sum(v.numel() for v in own.values())
    assert report.params_copied + report.params_random == student.num_params()
    assert "ignored head.bias, head.weight" in report.summary()
    assert torch.equal(student.text_encoder.embeddings.word_embeddings.weight, text_before)
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        tokens = student.encode_image(pixels).tokens  # (B, 1+N, D)
        expected = vit.forward_features(pixels)
    torch.testing.assert_close(tokens, expected, rtol=1e-5, atol=1e-5)


def test_timm_pos_embed_is_resized_to_the_student_grid(tmp_path):
    vit = timm_vit(img_size=64)  # 4x4 patch grid
    path = save_deit_style(vit, tmp_path / "vit64.pth", "pth")
    student = vit_student(image_size=32)  # 2x2
    report = init_from_timm(student, path)
    assert report.resized == ["pos_embed 4x4 -> 2x2"]
    pos = student.visual_encoder.pos_embed
    assert pos.shape == (1, 5, 192)
    assert torch.equal(pos[:, :1], vit.pos_embed[:, :1])  # CLS position kept as is
    grid = vit.pos_embed[:, 1:].reshape(1, 4, 4, 192).permute(0, 3, 1, 2)
    want = torch.nn.functional.interpolate(grid, size=(2, 2), mode="bicubic", align_corners=False)
    torch.testing.assert_close(pos[:, 1:], want.permute(0, 2, 3, 1).reshape(1, 4, 192))
    fc2 = student.visual_encoder.blocks[1].mlp.fc2.weight
    assert torch.equal(fc2, vit.blocks[1].mlp.fc2.weight)


def test_timm_missing_unexpected_and_mismatched_keys_are_named(tmp_path):
    state = {k: v.clone() for k, v in timm_vit().state_dict().items()}
    del state["blocks.1.mlp.fc1.bias"]
    state["blocks.0.ls1.gamma"] = torch.ones(192)
    path = tmp_path / "broken.safetensors"
    save_file(state, str(path))
    with pytest.raises(ValueError) as err:
        init_from_timm(vit_student(), path)
    msg = str(err.value)
    assert str(path) in msg and "blocks.1.mlp.fc1.bias" in msg and "blocks.0.ls1.gamma" in msg

    wide = timm_vit()  # width 192 vs a test_tiny student of width 32
    path = save_deit_style(wide, tmp_path / "wide.pth", "pth")
    torch.manual_seed(0)
    student = dlip.BLIP(tiny())
    with pytest.raises(ValueError, match=r"shape mismatches .*blocks\.0\.attn\.qkv\.weight"):
        init_from_timm(student, path)


def test_timm_distilled_deit_and_bad_files_are_refused(tmp_path):
    state = dict(timm_vit().state_dict())
    state["dist_token"] = torch.zeros(1, 1, 192)
    state["head_dist.weight"] = torch.zeros(1000, 192)
    path = tmp_path / "deit_distilled.pth"
    torch.save({"model": state}, path)
    with pytest.raises(ValueError, match="distilled DeiT"):
        init_from_timm(vit_student(), path)
    with pytest.raises(FileNotFoundError, match=r"nope\.pth"):
        init_from_timm(vit_student(), tmp_path / "nope.pth")
    (tmp_path / "w.npz").write_bytes(b"x")
    with pytest.raises(ValueError, match=r"unknown checkpoint format '\.npz'"):
        init_from_timm(vit_student(), tmp_path / "w.npz")
    torch.save({"epoch": 3, "args": {"lr": 1.0}}, tmp_path / "meta.pth")
    with pytest.raises(ValueError, match="container keys"):
        init_from_timm(vit_student(), tmp_path / "meta.pth")


# ------------------------------------------------------------------------------------- inherit
def test_layer_map_rule_keeps_first_and_last_and_respects_fusion_groups():
    assert spread(6, 12) == [0, 2, 4, 7, 9, 11]
    assert spread(2, 4) == [0, 3]
    assert spread(1, 5) == [4]  # one layer: the teacher's last
    assert spread(4, 2) == [0, 0, 1, 1]
    s = tiny(text={"num_layers": 4, "fusion_layers": 2}).text
    t = tiny(text={"num_layers": 12, "fusion_layers": 6}).text
    assert text_layer_map(s, t) == [0, 5, 6, 11]  # text-only among text-only, fusion among fusion
    assert text_layer_map(tiny(text={"num_layers": 3}).text, t) == [0, 6, 11]  # "all": whole stack


def test_inherit_copies_mapped_layers_exactly():
    torch.manual_seed(1)
    teacher = dlip.BLIP(tiny(vision={"depth": 4}, text={"num_layers": 4}))
    torch.manual_seed(2)
    student = dlip.BLIP(tiny())
    report = init_from_teacher(student, teacher)
    assert report.kept_random == {}
    assert report.params_copied == student.num_params() and report.params_random == 0
    t_state, s_state = teacher.state_dict(), student.state_dict()
    for i, j in enumerate([0, 3]):  # round(i * 3 / 1)
        for sub in ("norm1.weight", "attn.qkv.weight", "mlp.fc2.bias"):
            s_name, t_name = f"visual_encoder.blocks.{i}.{sub}", f"visual_encoder.blocks.{j}.{sub}"
            assert torch.equal(s_state[s_name], t_state[t_name])
        for prefix in ("text_encoder", "text_decoder.bert"):  # decoder-only self-attention too
            for sub in ("attention.self.query.weight", "crossattention.output.dense.weight",
                        "intermediate.dense.bias", "output.LayerNorm.weight"):  # fmt: skip
                s_name = f"{prefix}.encoder.layer.{i}.{sub}"
                assert torch.equal(s_state[s_name], t_state[f"{prefix}.encoder.layer.{j}.{sub}"])
    for name in ("visual_encoder.pos_embed", "text_encoder.embeddings.word_embeddings.weight",
                 "itm_head.weight", "vision_proj.bias", "text_decoder.cls.predictions.bias",
                 "temp"):  # fmt: skip
        assert torch.equal(s_state[name], t_state[name]), name
    # tying survives: the decoder still shares the encoder's cross-attention and LM embeddings
    assert (
        student.text_decoder.bert.encoder.layer[1].crossattention
        is student.text_encoder.encoder.layer[1].crossattention
    )
    assert student.text_decoder.cls.predictions.decoder.weight is (
        student.text_encoder.embeddings.word_embeddings.weight
    )
    assert not torch.equal(s_state["visual_encoder.blocks.1.attn.qkv.weight"],
                           t_state["visual_encoder.blocks.1.attn.qkv.weight"])  # fmt: skip


def test_inherit_with_a_narrower_text_tower_copies_only_what_fits(capsys):
    torch.manual_seed(1)
    teacher = dlip.BLIP(tiny(vision={"image_size": 64}))  # 4x4 grid: pos_embed is resampled
    torch.manual_seed(2)
    student = dlip.BLIP(tiny(text={"hidden_size": 16, "intermediate_size": 32}))
    before = student.text_encoder.encoder.layer[0].attention.self.query.weight.clone()
    report = apply_init(student, "inherit", teacher)
    line = capsys.readouterr().out
    assert line.startswith("model.init=inherit: copied ") and "kept random" in line
    copied = {n for n, _ in report.copied}
    assert "visual_encoder.blocks.1.attn.qkv.weight" in copied and "vision_proj.weight" in copied
    assert not any(n.startswith("text_encoder.") for n in copied)
    assert "itm_head.weight" in report.kept_random and "text_proj.weight" in report.kept_random
    assert report.kept_random["text_encoder.encoder.layer.0.attention.self.query.weight"] == (
        "shape differs (text_encoder.encoder.layer.0.attention.self.query.weight)"
    )
    assert report.resized == ["visual_encoder.pos_embed 4x4 -> 2x2"]
    assert torch.equal(student.text_encoder.encoder.layer[0].attention.self.query.weight, before)
    total = student.num_params()
    assert report.params_copied + report.params_random == total and report.params_random > 0


def test_inherit_pruned_cuts_whole_heads_and_leading_channels(capsys):
    """model.init=inherit_pruned (TinyCLIP-style): a narrower student takes, in every tensor,
    the teacher's leading channels of the residual / MLP dims and whole heads of attention
    (the first 2 of 3 teacher heads, the leading 16 of 24 channels of each)."""
    assert head_channels(2, 16, 3, 24).tolist() == [*range(16), *range(24, 40)]
    assert head_channels(2, 32, 3, 24) is None  # student heads wider than the teacher's
    torch.manual_seed(1)
    wide = {"width": 72, "num_heads": 3, "depth": 3}
    teacher = dlip.BLIP(
        tiny(
            vision=wide,
            text={"hidden_size": 72, "num_heads": 3, "intermediate_size": 96, "num_layers": 3},
        )
    )
    torch.manual_seed(2)
    student = dlip.BLIP(tiny())  # width 32, 2 heads of 16, 2 layers in both towers
    report = apply_init(student, "inherit_pruned", teacher)
    assert "cut from wider teacher tensors" in capsys.readouterr().out
    assert report.kept_random == {} and report.params_random == 0
    s, t = student.state_dict(), teacher.state_dict()
    heads = head_channels(2, 16, 3, 24)
    q = "text_encoder.encoder.layer.{}.attention.self.query.weight"
    assert torch.equal(s[q.format(1)], t[q.format(2)][heads][:, :32])  # layers 0, 1 <- 0, 2
    o = "text_encoder.encoder.layer.0.crossattention.output.dense.weight"
    assert torch.equal(s[o], t[o][:32][:, heads])
    kv = "text_encoder.encoder.layer.0.crossattention.self.key.weight"  # reads image tokens
    assert torch.equal(s[kv], t[kv][heads][:, :32])
    qkv = "visual_encoder.blocks.0.attn.qkv.weight"
    assert torch.equal(s[qkv], t[qkv][torch.cat([heads, heads + 72, heads + 144])][:, :32])
    ffn = "text_encoder.encoder.layer.0.intermediate.dense.weight"
    assert torch.equal(s[ffn], t[ffn][:64, :32])
    emb = "text_encoder.embeddings.word_embeddings.weight"
    assert torch.equal(s[emb], t[emb][:, :32])
    assert torch.equal(s["visual_encoder.pos_embed"], t["visual_encoder.pos_embed"][..., :32])
    # plain inherit copies none of these (shapes differ) and keeps them random
    fresh = dlip.BLIP(tiny())
    with pytest.raises(ValueError, match="no student weight matrix"):
        init_from_teacher(fresh, teacher)


def test_inherit_with_nothing_compatible_is_an_error():
    torch.manual_seed(1)
    teacher = dlip.BLIP(tiny(vision={"width": 64, "num_heads": 4}, text={"hidden_size": 64}))
    student = dlip.BLIP(tiny(text={"hidden_size": 16, "intermediate_size": 32}))
    with torch.no_grad():
        student.temp.fill_(0.3)  # the scalar would fit: an error must leave it untouched
    with pytest.raises(ValueError, match="no student weight matrix has a same-shaped teacher"):
        init_from_teacher(student, teacher)
    assert student.temp.item() == pytest.approx(0.3)
    with pytest.raises(ValueError, match="needs a teacher"):
        apply_init(student, "inherit", None)
    assert apply_init(student, "random", teacher) is None


# ----------------------------------------------------------------------------------- trainer
def test_build_task_inherits_from_the_teacher_before_the_momentum_copy(teacher_dir, tmp_path):
    # conftest's teacher: vision width 64 / depth 3, text width 64 / 3 layers (test_tiny x2 wide)
    args = [
        f"run_dir={tmp_path / 'run'}",
        f"data.synth_dir={tmp_path}",
        f"teacher.checkpoint={teacher_dir}",
        "model.preset=test_tiny",
        "model.init=inherit",
        "model.arch.vision.width=64",
        "model.arch.vision.num_heads=4",
        "model.arch.text.hidden_size=16",
        "model.arch.text.intermediate_size=32",
        "data.max_length=20",
    ]
    cfg = load(None, args)
    teacher = load_teacher(cfg)
    task = build_task(cfg, teacher)
    s, t = task.student.state_dict(), teacher.state_dict()
    fc1 = "visual_encoder.blocks.{}.mlp.fc1.weight"
    assert torch.equal(s[fc1.format(1)], t[fc1.format(2)])  # student 0, 1 <- teacher 0, 2
    assert not torch.equal(s["itm_head.weight"][:, :16], t["itm_head.weight"][:, :16])
    momentum = task.student_m.state_dict()  # starts from the inherited weights too
    assert torch.equal(momentum[fc1.format(1)], t[fc1.format(2)])

    bad = load(None, [*args[:4], "model.init=timm:" + str(tmp_path / "missing.pth")])
    with pytest.raises(FileNotFoundError, match=r"missing\.pth"):
        build_task(bad, None)


def test_temp_init_sets_the_itc_temperature_of_the_student_and_its_momentum_copy(tmp_path):
    args = [f"run_dir={tmp_path / 'run'}", f"data.synth_dir={tmp_path}", "model.preset=test_tiny"]
    default = build_task(load(None, args))
    assert default.student.temp.item() == pytest.approx(0.07)  # BLIP's
    task = build_task(load(None, [*args, "model.temp_init=0.3"]))
    assert task.student.temp.item() == pytest.approx(0.3)
    assert task.student_m.temp.item() == pytest.approx(0.3)
    assert task.student.temp.requires_grad  # still learned
    with pytest.raises(ConfigError, match=r"model\.temp_init"):
        load(None, [*args, "model.temp_init=0.9"])  # outside the loss's clamp


def _mean_pairwise_cosine(x: torch.Tensor) -> float:
    x = torch.nn.functional.normalize(x, dim=-1)
    n = x.shape[0]
    return float(((x @ x.T).sum() - n) / (n * n - n))


def test_text_value_output_std_makes_cls_depend_on_the_words_at_init(tmp_path):
    """BERT's N(0, 0.02) leaves a small from-scratch text tower's ITC feature almost the same
    for every caption (the ITC plateau); redrawing the attention value / output maps with
    model.text_value_output_std=0.1 makes the captions' features differ at step 0."""
    from dlip.tokenizer import get_tokenizer

    captions = ["a red circle left of a blue square", "a green star above a white cross",
                "there is a big black diamond and, on its left, a small yellow disc",
                "a photo of a purple triangle below an orange block"]  # fmt: skip
    enc = get_tokenizer()(captions, max_length=30)
    args = [f"run_dir={tmp_path / 'run'}", f"data.synth_dir={tmp_path}", "model.preset=test_tiny",
            "model.arch.text.hidden_size=96", "model.arch.text.num_heads=4",
            "model.arch.text.intermediate_size=192", "model.arch.text.num_layers=4"]  # fmt: skip
    cos = {}
    for std in (None, 0.1):
        torch.manual_seed(0)
        extra = [] if std is None else [f"model.text_value_output_std={std}"]
        task = build_task(load(None, [*args, *extra]))
        s = task.student.eval()
        with torch.no_grad():
            cos[std] = _mean_pairwise_cosine(s.encode_text(**enc).feat)
        value = s.text_encoder.encoder.layer[3].crossattention.self.value.weight
        query = s.text_encoder.encoder.layer[3].attention.self.query.weight
        assert query.std().item() == pytest.approx(0.02, rel=0.1)  # untouched: BERT's
        assert value.std().item() == pytest.approx(std or 0.02, rel=0.1)
    assert cos[None] > 0.999 and cos[0.1] < 0.99, cos
    with pytest.raises(ConfigError, match=r"model\.text_value_output_std"):
        load(None, [*args, "model.text_value_output_std=0"])


def test_per_tower_init_timm_vision_and_teacher_text(teacher_dir, tmp_path, capsys):
    """model.init=timm:PATH with model.init_text=inherit: the ViT from the timm file, the text
    towers and heads from the teacher (DLIP-style), each reported; text-only init is refused
    for a timm file."""
    vit = timm_vit(img_size=32)
    path = save_deit_style(vit, tmp_path / "deit.safetensors", "safetensors")
    args = [
        f"run_dir={tmp_path / 'run'}", f"data.synth_dir={tmp_path}",
        f"teacher.checkpoint={teacher_dir}", "model.preset=test_tiny",
        f"model.init=timm:{path}", "model.init_text=inherit",
        "model.arch.vision.width=192", "model.arch.vision.num_heads=3",
        "model.arch.vision.mlp_ratio=4.0", "model.arch.text.hidden_size=64",
        "model.arch.text.num_heads=4", "model.arch.text.intermediate_size=128",
        "data.max_length=20",
    ]  # fmt: skip
    cfg = load(None, args)
    teacher = load_teacher(cfg)
    s = build_task(cfg, teacher).student.state_dict()
    out = capsys.readouterr().out
    assert "model.init (vision)=timm:" in out and "model.init_text=inherit: copied" in out
    v = vit.state_dict()
    assert torch.equal(s["visual_encoder.blocks.1.attn.qkv.weight"], v["blocks.1.attn.qkv.weight"])
    t = teacher.state_dict()
    q = "text_encoder.encoder.layer.{}.attention.self.query.weight"
    assert torch.equal(s[q.format(1)], t[q.format(2)])  # student 0, 1 <- teacher 0, 2
    assert torch.equal(s["text_proj.weight"], t["text_proj.weight"])
    assert not torch.equal(s["vision_proj.weight"][:, :64], t["vision_proj.weight"])  # width
    with pytest.raises(ConfigError, match=r"model\.init_text"):
        load(None, [*args[:5], "model.init_text=timm:x"])
    with pytest.raises(ValueError, match="vision tower only"):
        apply_init(dlip.BLIP(tiny()), f"timm:{path}", None, tower="text")
