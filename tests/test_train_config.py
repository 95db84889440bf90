"""Tests for dlip.train.config: defaults <- yaml <- dotted overrides, strict keys and types."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from dlip.config import ConfigError
from dlip.losses.adapters import KDConfig
from dlip.train.config import PretrainConfig, load, parse_override, save_resolved

RECIPES = Path(__file__).resolve().parents[1] / "configs" / "pretrain"
DATA = ["data.manifests=[a.jsonl]"]  # the one thing the defaults leave unset


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(text)
    return path


# ---------------------------------------------------------------------------------- defaults
def test_defaults_are_blips_pretraining_recipe():
    c = load(None, DATA)
    assert c == dataclasses.replace(
        PretrainConfig(), data=dataclasses.replace(PretrainConfig().data, manifests=("a.jsonl",))
    )
    assert (c.optim.lr, c.optim.min_lr, c.optim.warmup_steps, c.optim.weight_decay) == (
        3e-4,
        1e-6,
        3000,
        0.05,
    )
    assert (c.loss.queue_size, c.loss.alpha, c.loss.momentum, c.data.max_words) == (
        57600,
        0.4,
        0.995,
        30,
    )
    assert c.teacher.checkpoint is None and c.kd_config().enabled == ()
    assert c.model_config().name == "dlip_small"


def test_defaults_without_data_fail_before_training():
    with pytest.raises(ConfigError, match="no training data"):
        load()


# ---------------------------------------------------------------------------------- recipes
@pytest.mark.parametrize(
    ("name", "overrides"),
    [
        ("tiny_synth_teacher", []),
        ("tiny_synth", ["teacher.checkpoint=runs/tiny_teacher/final"]),
        ("dlip_small_from_blip_base", []),
        ("dlip_base_from_blip_base", []),
    ],
)
def test_recipes_load(name, overrides):
    c = load(RECIPES / f"{name}.yaml", overrides)
    assert c.model_config()  # the student resolves
    assert isinstance(c.kd_config(), KDConfig)


def test_tiny_synth_needs_teacher_on_command_line():
    with pytest.raises(ConfigError, match=r"kd weights set but teacher\.checkpoint is empty"):
        load(RECIPES / "tiny_synth.yaml")


def test_tiny_student_is_smaller_than_tiny_teacher():
    teacher = load(RECIPES / "tiny_synth_teacher.yaml").model_config()
    student = load(RECIPES / "tiny_synth.yaml", ["teacher.checkpoint=t"]).model_config()
    assert student.vision.width < teacher.vision.width
    assert student.text.num_layers < teacher.text.num_layers
    assert student.vision.image_size == teacher.vision.image_size == 64


def test_teacher_recipe_has_no_teacher():
    c = load(RECIPES / "tiny_synth_teacher.yaml")
    assert c.teacher.checkpoint is None and c.data.synth_dir == "runs/synth"


def test_seed_recipe_numbers():
    c = load(RECIPES / "dlip_small_from_blip_base.yaml")
    assert (c.optim.lr, c.optim.weight_decay, c.data.batch_size) == (5e-4, 0.02, 288)
    assert len(c.data.manifests) == len(c.data.weights) == 4
    assert c.model.timm_checkpoint == "checkpoints/deit_small_patch16_224.pth"
    assert set(c.kd_config().enabled) >= {"kd_itc", "kd_lm", "kd_attn_cross"}


# -------------------------------------------------------------------------------- overrides
def test_overrides_of_every_kind(tmp_path):
    c = load(
        None,
        [
            "optim.lr=1e-4",  # YAML 1.1 would read this as a str
            "run.max_steps=10",
            "teacher.checkpoint=runs/t/final",
            "data.manifests=[a.jsonl,b.jsonl]",
            "data.weights=[1, 3]",  # ints into float fields
            "optim.betas=[0.9, 0.98]",
            "loss.kd.weights={kd_itc: 1, kd_lm: 0.5}",
            "loss.kd.weights.kd_rep_image=2",  # into a mapping, merged
            "loss.kd.layer_maps.text=[1, 3]",
            "model.arch.text.num_layers=2",
            "optim.grad_clip=null",
            "run_dir=runs/x",
            "max_steps=7",  # later wins
        ],
    )
    assert c.optim.lr == 1e-4 and isinstance(c.optim.lr, float)
    assert c.teacher.checkpoint == "runs/t/final"
    assert c.data.manifests == ("a.jsonl", "b.jsonl") and c.data.weights == (1.0, 3.0)
    assert c.optim.betas == (0.9, 0.98) and c.optim.grad_clip is None
    assert dict(c.loss.kd.weights) == {"kd_itc": 1.0, "kd_lm": 0.5, "kd_rep_image": 2.0}
    assert c.loss.kd.layer_maps == {"text": [1, 3]}
    assert c.model_config().text.num_layers == 2
    assert (c.run.run_dir, c.run.max_steps) == ("runs/x", 7)


def test_yaml_diff_keeps_other_defaults(tmp_path):
    path = write(tmp_path, "optim:\n  lr: 1e-3\ndata:\n  synth_dir: s\n")
    c = load(path, ["optim.warmup_steps=5"])
    assert (c.optim.lr, c.optim.warmup_steps, c.optim.weight_decay) == (1e-3, 5, 0.05)


def test_parse_override_aliases_and_errors():
    assert parse_override("run_dir=d") == ("run.run_dir", "d")
    assert parse_override("max_steps=3") == ("run.max_steps", 3)
    assert parse_override("teacher.checkpoint=") == ("teacher.checkpoint", None)
    with pytest.raises(ConfigError, match="not key=value"):
        parse_override("optim.lr")


# ------------------------------------------------------------------------------ unknown keys
@pytest.mark.parametrize(
    ("override", "key", "close", "level"),
    [
        ("optimm.lr=1", "optimm", "optim", "top level"),
        ("optim.lrr=1", "optim.lrr", "optim.lr", "optim"),
        ("loss.kd.temprature=2", "loss.kd.temprature", "loss.kd.lm_temperature", "loss.kd"),
    ],
)
def test_unknown_override_key_is_named(override, key, close, level):
    want = rf"unknown key '{key}' \(did you mean {close}\?\); valid keys at {level}: \["
    with pytest.raises(ConfigError, match=want) as e:
        load(None, [*DATA, override])
    assert "override" in str(e.value)


def test_unknown_yaml_key_is_named_with_file(tmp_path):
    path = write(tmp_path, "data:\n  synth_dir: s\n  batchsize: 8\n")
    with pytest.raises(ConfigError) as e:
        load(path)
    msg = str(e.value)
    assert str(path) in msg and "'data.batchsize'" in msg and "'batch_size'" in msg


def test_unknown_kd_term_and_arch_key():
    with pytest.raises(ConfigError, match=r"loss.kd: unknown KD term\(s\) \['kd_foo'\]"):
        load(None, [*DATA, "loss.kd.weights.kd_foo=1"], validate=False)
    with pytest.raises(ConfigError, match=r"model.arch: vision: unknown key\(s\) \[.dpeth.\]"):
        load(None, [*DATA, "model.arch.vision.dpeth=2"])


def test_section_given_a_scalar():
    with pytest.raises(ConfigError, match="optim must be a mapping"):
        load(None, ["optim=3"])


# -------------------------------------------------------------------------------------- types
@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("optim.lr=abc", "optim.lr='abc' is not a finite number"),
        ("data.batch_size=2.5", "data.batch_size=2.5 is not an int"),
        ("data.hflip=1", "data.hflip=1 is not a bool"),
        ("run.max_steps=ten", "run.max_steps='ten' is not an int or null"),
        (
            "optim.schedule=linear",
            "optim.schedule='linear' is not one of 'cosine', 'cosine_epoch', 'step'",
        ),
        ("optim.betas=[0.9]", "optim.betas="),
        ("data.manifests=a.jsonl", "data.manifests='a.jsonl' is not a list of a str"),
        ("loss.kd.rep_loss=3", "loss.kd.rep_loss=3 is not a str"),
        ("model.init=timm", "model.init='timm'"),
        ("optim.lr=-1", "optim.lr=-1.0 must be > 0"),
    ],
)
def test_type_and_range_errors_name_the_key(override, message):
    with pytest.raises(ConfigError) as e:
        load(None, [*DATA, override])
    assert message in str(e.value)


# -------------------------------------------------------------------------------- cross-field
@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["loss.kd.weights.kd_itc=1"], "kd weights set but teacher.checkpoint is empty"),
        (["model.init=inherit"], "model.init=inherit needs teacher.checkpoint"),
        (["data.batch_size=1"], "ITM needs >= 2"),
        (["loss.queue_size=0"], "loss.queue_size must be > 0"),
        (["loss.itc=0", "loss.itm=0", "loss.lm=0"], "nothing to train"),
        (["optim.warmup_steps=-1"], "optim.warmup_steps=-1 must be >= 0"),
        (["optim.accum_steps=0"], "optim.accum_steps=0 must be >= 1"),
        (["data.weights=[1, 2]"], "data.weights has 2 entries for 1 data.manifests"),
        (["model.preset=nope"], "model.preset: unknown model preset 'nope'"),
        (["model.image_size=50"], "model.image_size"),
        (["data.max_length=600"], "data.max_length=600 exceeds"),
    ],
)
def test_cross_field_errors(overrides, message):
    with pytest.raises(ConfigError) as e:
        load(None, [*DATA, *overrides])
    assert message in str(e.value)


def test_batch_of_one_is_fine_without_itm():
    assert load(None, [*DATA, "data.batch_size=1", "loss.itm=0"]).data.batch_size == 1


def test_validate_lists_every_problem():
    with pytest.raises(ConfigError) as e:
        load(None, ["data.batch_size=1", "loss.kd.weights.kd_lm=1"])
    msg = str(e.value)
    assert "no training data" in msg and "ITM needs" in msg and "teacher.checkpoint" in msg


# ----------------------------------------------------------------------- resolved config, KD
@pytest.mark.parametrize("name", ["tiny_synth", "dlip_small_from_blip_base"])
def test_resolved_config_round_trips(tmp_path, name):
    c = load(RECIPES / f"{name}.yaml", ["teacher.checkpoint=t", "loss.kd.layer_maps.text=[1,0]"])
    path = save_resolved(c, tmp_path / "run")
    assert path == tmp_path / "run" / "config.yaml"
    assert load(path) == c
    assert PretrainConfig.from_dict(c.to_dict()) == c


def test_kd_config_has_the_weights():
    c = load(
        None,
        [
            *DATA,
            "teacher.checkpoint=t",
            "loss.kd.weights={kd_itc: 2, kd_attn_cross: 0.5}",
            "loss.kd.lm_temperature=2",
            "loss.kd.rep_loss=mse",
        ],
    )
    kd = c.kd_config()
    assert isinstance(kd, KDConfig)
    assert kd.enabled == ("kd_itc", "kd_attn_cross")
    assert (kd.weight("kd_itc"), kd.weight("kd_attn_cross"), kd.weight("kd_lm")) == (2.0, 0.5, 0)
    assert (kd.lm_temperature, kd.rep_loss) == (2.0, "mse")
