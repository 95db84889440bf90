"""Tests for dlip.config and the named presets: strict keys, validation, JSON round trips."""

from __future__ import annotations

import dataclasses
import json
from importlib import resources

import pytest
import torch

import dlip
from dlip.config import ConfigError
from dlip.models.blip import BLIP
from dlip.models.config import ModelConfig, TextConfig, VisionConfig

PRESETS = ["blip_base", "blip_base_vqa", "blip_large", "dlip_base", "dlip_base_vqa", "dlip_small",
           "dlip_small_vqa", "dlip_tiny", "dlip_tiny_vqa", "test_tiny"]  # fmt: skip


def preset_json(name: str) -> dict:
    return json.loads(resources.files("dlip").joinpath(f"configs/models/{name}.json").read_text())


# ------------------------------------------------------------------------------------- keys
@pytest.mark.parametrize(
    ("data", "key", "where"),
    [
        ({"embed_dimm": 256}, "embed_dimm", "config"),
        ({"vision": {"widht": 768}}, "widht", "vision"),
        ({"text": {"num_layer": 6}}, "num_layer", "text"),
        ({"text": {"hidden_size": 32, "fusion_layer": 1}}, "fusion_layer", "text"),
    ],
)
def test_unknown_keys_are_named(data, key, where):
    with pytest.raises(ConfigError, match=rf"{where}: unknown key\(s\) \['{key}'\]"):
        ModelConfig.from_dict(data)


def test_unknown_key_message_lists_known_keys():
    with pytest.raises(ConfigError) as err:
        ModelConfig.from_dict({"vision": {"depth": 2, "dpeth": 3}}, source="my.json")
    msg = str(err.value)
    assert msg.startswith("my.json: vision: unknown key(s) ['dpeth']")
    assert "'depth'" in msg and "'patch_size'" in msg


def test_sections_must_be_objects():
    with pytest.raises(ConfigError, match="vision: expected a JSON object, got list"):
        ModelConfig.from_dict({"vision": [1, 2]})
    with pytest.raises(ConfigError, match="text: expected a JSON object, got int"):
        ModelConfig.from_dict({"text": 3})


@pytest.mark.parametrize("data", [[], "blip_base", 3], ids=["empty_list", "str", "int"])
def test_top_level_must_be_an_object(data, tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ConfigError, match="expected a JSON object"):
        ModelConfig.load(path)


def test_from_dict_does_not_mutate_its_input():
    data = {"vision": {"depth": 2}, "text": {"num_layers": 2}, "image_mean": [0.5, 0.5, 0.5]}
    snapshot = json.loads(json.dumps(data))
    cfg = ModelConfig.from_dict(data)
    assert data == snapshot
    assert cfg.vision.depth == 2 and cfg.text.num_layers == 2
    assert cfg.image_mean == (0.5, 0.5, 0.5)
    assert cfg.vision.width == VisionConfig().width  # unspecified fields take defaults


# ------------------------------------------------------------------------------------- values
@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"vision": {"width": 100, "num_heads": 12}}, "vision.width 100 is not divisible by"),
        (
            {"vision": {"image_size": 200, "patch_size": 16}},
            "image_size 200 is not a multiple of 16",
        ),
        ({"text": {"hidden_size": 100, "num_heads": 12}}, "text.hidden_size 100 is not divisible"),
        ({"text": {"fusion_layers": 0}}, r"fusion_layers .* got 0"),
        ({"text": {"num_layers": 4, "fusion_layers": 5}}, r"int in \[1, 4\], got 5"),
        ({"text": {"fusion_layers": "some"}}, "fusion_layers='some' is not of type"),
        ({"text": {"fusion_layers": True}}, "fusion_layers=True is not of type"),
        ({"text": {"fusion_layers": 1.0}}, "fusion_layers=1.0 is not of type"),
        ({"has_encoder": False, "has_decoder": False}, "needs has_encoder or has_decoder"),
        (
            {"max_text_length": 65, "text": {"max_position_embeddings": 64}},
            "max_text_length 65 exceeds text.max_position_embeddings 64",
        ),
    ],
)
def test_bad_values_raise(data, message):
    with pytest.raises(ConfigError, match=message):
        ModelConfig.from_dict(data)


def test_boundary_values_are_accepted():
    cfg = ModelConfig.from_dict(
        {"text": {"num_layers": 4, "fusion_layers": 4, "max_position_embeddings": 35}}
    )
    assert cfg.text.text_only_layers == 0
    assert cfg.max_text_length == cfg.text.max_position_embeddings
    assert ModelConfig(has_encoder=False).has_decoder
    assert ModelConfig(has_decoder=False).has_encoder


def test_validation_runs_on_replace():
    cfg = ModelConfig()
    with pytest.raises(ConfigError, match="has_encoder or has_decoder"):
        cfg.replace(has_encoder=False, has_decoder=False)
    with pytest.raises(ConfigError, match="image_size 100"):
        cfg.with_image_size(100)
    assert cfg.with_image_size(384).vision.image_size == 384
    assert cfg.vision.image_size == 224  # frozen: the original is untouched
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.embed_dim = 3


@pytest.mark.parametrize(
    "data",
    [
        {"vision": {"width": "768"}},  # raises TypeError from the % check
        {"vision": {"patch_size": 0}},  # raises ZeroDivisionError
        {"embed_dim": "256"},  # accepted silently
        {"has_encoder": "false"},  # accepted silently (a truthy string)
    ],
    ids=["str_width", "zero_patch", "str_embed_dim", "str_bool"],
)
def test_wrong_types_raise_config_error(data):
    with pytest.raises(ConfigError):
        ModelConfig.from_dict(data)


def test_config_error_is_a_value_error():
    assert issubclass(ConfigError, ValueError)


# ------------------------------------------------------------------------------------- derived
def test_derived_properties():
    v = VisionConfig(image_size=384, patch_size=16)
    assert v.grid == 24 and v.num_tokens == 24 * 24 + 1
    t = TextConfig(num_layers=6, fusion_layers=2)
    assert t.text_only_layers == 4
    assert [t.has_cross_attention(i) for i in range(6)] == [False] * 4 + [True] * 2
    t = TextConfig(num_layers=3)
    assert t.text_only_layers == 3
    assert all(t.has_cross_attention(i) for i in range(3))


# ------------------------------------------------------------------------------------- JSON
def test_json_round_trip(tmp_path):
    cfg = ModelConfig(
        name="custom_rt",
        vision=VisionConfig(width=64, depth=3, num_heads=4, patch_size=8, image_size=64),
        text=TextConfig(
            hidden_size=64, num_layers=3, num_heads=4, fusion_layers=1, tie_decoder=False
        ),
        embed_dim=32,
        has_decoder=False,
        image_mean=(0.5, 0.25, 0.125),
        max_text_length=20,
        prompt="a photo of ",
    )
    path = tmp_path / "cfg.json"
    cfg.save(path)
    loaded = ModelConfig.load(path)
    assert loaded == cfg
    assert isinstance(loaded.image_mean, tuple) and isinstance(loaded.vision, VisionConfig)
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    data = json.loads(path.read_text())
    assert data["text"]["fusion_layers"] == 1 and data["has_decoder"] is False
    assert path.read_text().endswith("}\n")


def test_load_errors(tmp_path):
    with pytest.raises(ConfigError, match=r"model config not found: .*nope\.json"):
        ModelConfig.load(tmp_path / "nope.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ConfigError, match=r"bad\.json: not valid JSON"):
        ModelConfig.load(bad)
    typo = tmp_path / "typo.json"
    typo.write_text('{"text": {"hiden_size": 8}}')
    with pytest.raises(ConfigError, match=r"typo\.json: text: unknown key\(s\) \['hiden_size'\]"):
        ModelConfig.load(typo)


# ------------------------------------------------------------------------------------- presets
def test_list_presets():
    assert dlip.list_presets() == PRESETS


@pytest.mark.parametrize("name", PRESETS)
def test_preset_loads_with_exactly_its_fields(name):
    cfg = dlip.get_config(name)
    data = preset_json(name)
    assert data["name"] == name == cfg.name
    # every field the JSON sets is a real field and arrives unchanged
    for key, value in data.items():
        if key in ("vision", "text"):
            section = getattr(cfg, key)
            for sub, sub_value in value.items():
                assert getattr(section, sub) == sub_value, f"{name}: {key}.{sub}"
                assert type(getattr(section, sub)) is type(sub_value), f"{name}: {key}.{sub}"
        else:
            got = getattr(cfg, key)
            assert (list(got) if isinstance(got, tuple) else got) == value, f"{name}: {key}"
    # the architecture is pinned by the file, not by defaults
    assert {"name", "vision", "text", "embed_dim"} <= set(data)
    assert {"width", "depth", "num_heads", "patch_size", "image_size"} <= set(data["vision"])
    assert {"vocab_size", "hidden_size", "num_layers", "num_heads", "intermediate_size"} <= set(
        data["text"]
    )
    # and saving it reproduces the same config
    assert ModelConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


def test_unknown_preset_lists_presets():
    with pytest.raises(ConfigError, match="unknown model preset 'blip_huge'") as err:
        dlip.get_config("blip_huge")
    for name in PRESETS:
        assert name in str(err.value)


def test_get_config_changes():
    cfg = dlip.get_config("dlip_small", has_decoder=False, prompt="a photo of ")
    assert not cfg.has_decoder and cfg.prompt == "a photo of " and cfg.name == "dlip_small"
    assert cfg.text == dlip.get_config("dlip_small").text
    with pytest.raises(TypeError):
        dlip.get_config("dlip_small", not_a_field=1)


def test_blip_base_preset():
    cfg = dlip.get_config("blip_base")
    t, v = cfg.text, cfg.vision
    assert (t.num_layers, t.hidden_size, t.num_heads, t.vocab_size) == (12, 768, 12, 30524)
    assert (t.intermediate_size, t.fusion_layers, t.tie_decoder) == (3072, "all", True)
    assert t.layer_norm_eps == 1e-12
    assert (v.width, v.depth, v.num_heads, v.patch_size, v.image_size) == (768, 12, 12, 16, 224)
    assert v.layer_norm_eps == 1e-6
    assert cfg.embed_dim == 256
    assert cfg.has_encoder and cfg.has_decoder


def test_blip_large_preset():
    v = dlip.get_config("blip_large").vision
    assert (v.width, v.depth, v.num_heads) == (1024, 24, 16)


def test_dlip_small_preset():
    cfg = dlip.get_config("dlip_small")
    t, v = cfg.text, cfg.vision
    assert (t.num_layers, t.hidden_size, t.num_heads, t.intermediate_size) == (6, 384, 12, 3072)
    assert (v.width, v.depth, v.num_heads, v.patch_size) == (384, 12, 6, 16)  # ViT-S/16
    assert cfg.embed_dim == 256


def test_test_tiny_preset():
    cfg = dlip.get_config("test_tiny")
    assert cfg.vision.image_size == 32 and cfg.vision.depth == 2 and cfg.vision.width == 32
    assert cfg.text.num_layers == 2 and cfg.text.hidden_size == 32
    assert cfg.text.max_position_embeddings == 64 and cfg.max_text_length <= 64


def _meta_model(name: str, **changes) -> BLIP:
    with torch.device("meta"):
        return BLIP(dlip.get_config(name, **changes))


def test_blip_base_structure_on_meta():
    model = _meta_model("blip_base")
    assert len(model.visual_encoder.blocks) == 12
    assert model.visual_encoder.pos_embed.shape == (1, 197, 768)
    layers = model.text_encoder.encoder.layer
    assert len(layers) == 12
    assert all(layer.crossattention is not None for layer in layers)
    assert layers[0].crossattention.self.key.weight.shape == (768, 768)
    assert layers[0].intermediate.dense.weight.shape == (3072, 768)
    emb = model.text_encoder.embeddings
    assert emb.word_embeddings.weight.shape == (30524, 768)
    assert emb.position_embeddings.weight.shape == (512, 768)
    assert model.vision_proj.weight.shape == (256, 768) and model.itm_head.weight.shape == (2, 768)
    dec = model.text_decoder
    assert dec.bert.encoder.layer[5].output is layers[5].output
    assert dec.cls.predictions.decoder.weight is emb.word_embeddings.weight


def test_student_presets_structure_on_meta():
    base = _meta_model("dlip_base", has_decoder=False)
    # the text tower (768) cross-attends to a ViT-S (384)
    assert base.text_encoder.encoder.layer[0].crossattention.self.key.weight.shape == (768, 384)
    assert len(base.text_encoder.encoder.layer) == 6
    assert not hasattr(base, "text_decoder")

    tiny = _meta_model("dlip_tiny")
    layers = tiny.text_encoder.encoder.layer
    assert [layer.crossattention is None for layer in layers] == [True, True, False, False]
    assert layers[3].crossattention.self.value.weight.shape == (256, 192)
    assert tiny.visual_encoder.pos_embed.shape == (1, 197, 192)
    assert tiny.text_proj.weight.shape == (256, 256)


def test_create_model_options():
    torch.manual_seed(0)
    model = dlip.create_model("test_tiny", image_size=64, has_decoder=False)
    assert model.config.vision.image_size == 64 and not model.config.has_decoder
    assert model.visual_encoder.pos_embed.shape == (1, 17, 32)
    assert not hasattr(model, "text_decoder")
    cfg = dlip.get_config("test_tiny", has_encoder=False)
    assert not hasattr(dlip.create_model(cfg), "text_encoder")
