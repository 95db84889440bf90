"""Tests for the training infrastructure: AdamW parameter groups, lr schedules against values
computed here by hand, atomic checkpoints (round trip, exact resume, crash during save, pruning),
RNG capture, metrics.jsonl truncation on resume, throughput/ETA and loss-term reduction."""

from __future__ import annotations

import json
import math
import os
import random

import numpy as np
import pytest
import torch
from torch import nn

import dlip
from dlip.models.io import load_strict
from dlip.train import checkpoint as ckpt
from dlip.train.checkpoint import (
    capture_rng,
    find_latest,
    load_checkpoint,
    restore_rng,
    save_checkpoint,
)
from dlip.train.logging import (
    MetricsLogger,
    Throughput,
    format_eta,
    nonfinite_terms,
    reduce_terms,
    truncate_metrics,
)
from dlip.train.optim import build_optimizer, lr_at, param_groups, set_lr


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return dlip.create_model("test_tiny")


# ---------------------------------------------------------------- optimizer groups


def test_param_groups_decay_rules(tiny):
    groups = param_groups(tiny, 0.05)
    decay, no_decay = groups
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    d, nd = set(decay["names"]), set(no_decay["names"])
    assert "visual_encoder.blocks.0.attn.qkv.weight" in d
    assert "text_encoder.encoder.layer.0.intermediate.dense.weight" in d
    assert "itm_head.weight" in d and "visual_encoder.patch_embed.proj.weight" in d
    for name in (
        "temp",
        "visual_encoder.cls_token",
        "visual_encoder.pos_embed",
        "visual_encoder.blocks.0.norm1.weight",
        "visual_encoder.blocks.0.attn.qkv.bias",
        "text_encoder.embeddings.word_embeddings.weight",
        "text_encoder.embeddings.position_embeddings.weight",
        "text_encoder.embeddings.LayerNorm.weight",
        "vision_proj.bias",
    ):
        assert name in nd, name
    assert not d & nd


def test_param_groups_each_parameter_once_when_tied(tiny):
    groups = param_groups(tiny, 0.05)
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids))
    unique = {id(p) for p in tiny.parameters()}
    assert set(ids) == unique
    # the decoder shares layers with the encoder: its copies are not listed under their own name
    names = [n for g in groups for n in g["names"]]
    assert "text_decoder.bert.embeddings.word_embeddings.weight" not in names
    total = sum(p.numel() for g in groups for p in g["params"])
    assert total == sum(p.numel() for p in tiny.parameters())


def test_param_groups_skip_frozen_and_tied_embedding_head():
    emb = nn.Embedding(10, 4)
    head = nn.Linear(4, 10, bias=False)
    head.weight = emb.weight  # tied LM head: an embedding, so no decay, listed once
    frozen = nn.Linear(4, 4)
    frozen.requires_grad_(False)
    m = nn.ModuleDict({"emb": emb, "head": head, "frozen": frozen, "fc": nn.Linear(4, 4)})
    groups = param_groups(m, 0.1)
    assert groups[0]["names"] == ["fc.weight"]
    assert groups[1]["names"] == ["emb.weight", "fc.bias"]
    opt = build_optimizer(m, lr=1e-3, weight_decay=0.1, betas=(0.9, 0.98), eps=1e-6)
    assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.0]
    assert opt.param_groups[0]["betas"] == (0.9, 0.98) and opt.param_groups[0]["eps"] == 1e-6
    with pytest.raises(ValueError, match="no trainable"):
        build_optimizer(frozen, lr=1e-3, weight_decay=0.1)


# ---------------------------------------------------------------- schedules


def test_cosine_schedule_values():
    kw = dict(schedule="cosine", base_lr=1e-3, min_lr=1e-5, warmup_lr=1e-6, warmup_steps=10)
    kw["total_steps"] = 110
    assert lr_at(0, **kw) == pytest.approx(1e-6)
    assert lr_at(5, **kw) == pytest.approx(1e-6 + (1e-3 - 1e-6) * 0.5)
    assert lr_at(10, **kw) == pytest.approx(1e-3)
    # halfway through the cosine: (base + min) / 2
    assert lr_at(60, **kw) == pytest.approx((1e-3 + 1e-5) / 2)
    # a quarter: min + (base - min) * (1 + cos(pi/4)) / 2
    assert lr_at(35, **kw) == pytest.approx(1e-5 + (1e-3 - 1e-5) * (1 + math.sqrt(0.5)) / 2)
    assert lr_at(110, **kw) == pytest.approx(1e-5)
    assert lr_at(500, **kw) == pytest.approx(1e-5)


def test_step_schedule_values_blip():
    kw = dict(schedule="step", base_lr=3e-4, min_lr=1e-6, warmup_lr=1e-6, warmup_steps=3000)
    kw.update(steps_per_epoch=5000, decay_rate=0.9)
    assert lr_at(0, **kw) == pytest.approx(1e-6)
    assert lr_at(1500, **kw) == pytest.approx(1e-6 + (3e-4 - 1e-6) / 2)
    assert lr_at(3000, **kw) == pytest.approx(3e-4)
    assert lr_at(4999, **kw) == pytest.approx(3e-4)
    assert lr_at(5000, **kw) == pytest.approx(2.7e-4)
    assert lr_at(12_345, **kw) == pytest.approx(3e-4 * 0.81)
    assert lr_at(5000 * 100, **kw) == pytest.approx(1e-6)  # 3e-4 * 0.9**100 < min_lr
    # a warmup longer than an epoch is cut at the epoch boundary
    short = dict(kw, steps_per_epoch=1000)
    assert lr_at(999, **short) == pytest.approx(1e-6 + (3e-4 - 1e-6) * 999 / 3000)
    assert lr_at(1000, **short) == pytest.approx(2.7e-4)


def test_schedule_errors():
    with pytest.raises(ValueError, match="unknown schedule"):
        lr_at(0, schedule="linear", base_lr=1.0)
    with pytest.raises(ValueError, match="total_steps"):
        lr_at(0, schedule="cosine", base_lr=1.0)
    with pytest.raises(ValueError, match="steps_per_epoch"):
        lr_at(0, schedule="step", base_lr=1.0)


def test_set_lr():
    m = nn.Linear(3, 3)
    opt = build_optimizer(m, lr=1.0, weight_decay=0.0)
    opt.param_groups[1]["lr_scale"] = 0.5
    set_lr(opt, 0.02)
    assert [g["lr"] for g in opt.param_groups] == [0.02, 0.01]


# ---------------------------------------------------------------- checkpoints


def _net():
    return nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.Linear(8, 2))


def _train_step(net, opt, x):
    opt.zero_grad()
    loss = net(x).pow(2).mean()
    loss.backward()
    opt.step()


def test_checkpoint_round_trip_resumes_exactly(tmp_path):
    torch.manual_seed(1)
    net = _net()
    opt = build_optimizer(net, lr=1e-2, weight_decay=0.1)
    xs = [torch.randn(5, 4) for _ in range(3)]
    _train_step(net, opt, xs[0])
    _train_step(net, opt, xs[1])
    state = {"model": net, "optimizer": opt.state_dict(), "epoch": 1, "data_position": 7}
    path = save_checkpoint(tmp_path, 2, {**state, "rng": capture_rng()})
    assert path == tmp_path / "checkpoints" / "step_2"
    _train_step(net, opt, xs[2])  # the uninterrupted run

    torch.manual_seed(99)
    fresh = _net()
    fresh_opt = build_optimizer(fresh, lr=1e-2, weight_decay=0.1)
    model_state, trainer = load_checkpoint(find_latest(tmp_path))
    load_strict(fresh, model_state, "test")
    fresh_opt.load_state_dict(trainer["optimizer"])
    assert trainer["step"] == 2 and trainer["epoch"] == 1 and trainer["data_position"] == 7
    assert int(fresh_opt.state_dict()["state"][0]["step"]) == 2
    _train_step(fresh, fresh_opt, xs[2])
    for a, b in zip(net.parameters(), fresh.parameters(), strict=True):
        assert torch.equal(a, b)


def test_checkpoint_tied_model_and_weights_only(tmp_path, tiny):
    path = save_checkpoint(tmp_path, 5, {"model": tiny, "scaler": {"scale": 65536.0}})
    from safetensors.torch import load_file

    weights = load_file(str(path / "model.safetensors"))
    assert "text_decoder.bert.embeddings.word_embeddings.weight" not in weights
    assert "text_encoder.embeddings.word_embeddings.weight" in weights
    trainer = torch.load(path / "trainer.pt", weights_only=True)
    assert trainer == {"scaler": {"scale": 65536.0}, "step": 5}
    torch.manual_seed(3)
    other = dlip.create_model("test_tiny")
    load_strict(other, load_checkpoint(path)[0], str(path))
    for (n, a), b in zip(tiny.state_dict().items(), other.state_dict().values(), strict=True):
        assert torch.equal(a, b), n


def test_checkpoint_refuses_non_plain_state(tmp_path):
    with pytest.raises(TypeError, match=r"state\['bad'\]\[0\]"):
        save_checkpoint(tmp_path, 1, {"model": _net(), "bad": [np.zeros(2)]})
    with pytest.raises(ValueError, match="step"):
        save_checkpoint(tmp_path, 1, {"model": _net(), "step": 2})
    assert find_latest(tmp_path) is None


def test_rng_capture_restore_and_weights_only(tmp_path):
    random.seed(5)
    np.random.seed(5)
    torch.manual_seed(5)
    random.gauss(0, 1)  # a cached gaussian is part of the python state
    state = capture_rng()
    expected = (torch.rand(3), np.random.rand(3), random.random(), random.gauss(0, 1))
    torch.save(state, tmp_path / "rng.pt")
    loaded = torch.load(tmp_path / "rng.pt", weights_only=True)
    torch.rand(10), np.random.rand(10), random.random()
    restore_rng(loaded)
    got = (torch.rand(3), np.random.rand(3), random.random(), random.gauss(0, 1))
    assert torch.equal(got[0], expected[0])
    np.testing.assert_array_equal(got[1], expected[1])
    assert got[2:] == expected[2:]


def test_crash_during_save_leaves_previous_intact(tmp_path, monkeypatch):
    net = _net()
    save_checkpoint(tmp_path, 1, {"model": net})
    before = (tmp_path / "checkpoints" / "step_1" / "model.safetensors").read_bytes()

    def boom(src, dst):
        raise OSError("disk died")

    monkeypatch.setattr(ckpt.os, "rename", boom)
    with pytest.raises(OSError, match="disk died"):
        save_checkpoint(tmp_path, 2, {"model": net})
    monkeypatch.undo()
    root = tmp_path / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["step_1"]  # no step_2, no temp dir
    assert find_latest(tmp_path) == root / "step_1"
    assert (root / "step_1" / "model.safetensors").read_bytes() == before


def test_killed_save_leftovers_ignored_then_cleaned(tmp_path, monkeypatch):
    net = _net()
    save_checkpoint(tmp_path, 1, {"model": net})
    root = tmp_path / "checkpoints"
    # a SIGKILL mid-save: a full-looking temp dir, and a step dir missing trainer.pt
    stale = root / ".tmp-step_9-deadbeef"
    stale.mkdir()
    for f in ("model.safetensors", "trainer.pt"):
        (stale / f).write_bytes(b"x")
    (root / "step_8").mkdir()
    (root / "step_8" / "model.safetensors").write_bytes(b"x")
    assert find_latest(tmp_path) == root / "step_1"
    save_checkpoint(tmp_path, 2, {"model": net})
    assert not stale.exists()
    assert find_latest(tmp_path) == root / "step_2"


def test_resave_same_step_replaces(tmp_path):
    save_checkpoint(tmp_path, 3, {"model": _net(), "epoch": 0})
    save_checkpoint(tmp_path, 3, {"model": _net(), "epoch": 1})
    assert load_checkpoint(find_latest(tmp_path))[1]["epoch"] == 1
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step_3"]


def test_keep_last_prunes_oldest(tmp_path):
    net = _net()
    for step in (10, 2, 30, 40):  # numeric order, not string order
        save_checkpoint(tmp_path, step, {"model": net}, keep_last=2)
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["step_30", "step_40"]
    save_checkpoint(tmp_path, 50, {"model": net}, keep_last=1)
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step_50"]
    with pytest.raises(ValueError, match="keep_last"):
        save_checkpoint(tmp_path, 60, {"model": net}, keep_last=0)


def test_load_checkpoint_incomplete_dir(tmp_path):
    (tmp_path / "step_1").mkdir()
    with pytest.raises(FileNotFoundError, match=r"model\.safetensors"):
        load_checkpoint(tmp_path / "step_1")
    assert find_latest(tmp_path / "nothing") is None


# ---------------------------------------------------------------- logging


def _steps(path):
    return [json.loads(line)["step"] for line in path.read_text().splitlines()]


def test_metrics_logger_lines_and_resume(tmp_path):
    with MetricsLogger(tmp_path, enabled=True) as log:
        for step in range(1, 6):
            rec = log.log(step, {"loss": torch.tensor(1.5), "loss_itc": 0.5, "lr": 1e-4})
    path = tmp_path / "metrics.jsonl"
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["step"] for r in lines] == [1, 2, 3, 4, 5]
    assert lines[0]["loss"] == 1.5 and lines[0]["loss_itc"] == 0.5 and lines[0]["lr"] == 1e-4
    assert rec["step"] == 5 and isinstance(lines[0]["time"], float)
    with path.open("a") as f:
        f.write('{"step": 6, "lo')  # a write cut by SIGKILL
    with MetricsLogger(tmp_path, enabled=True, resume_step=3) as log:
        log.log(4, {"loss": 2.0})
    assert _steps(path) == [1, 2, 3, 4]
    assert json.loads(path.read_text().splitlines()[-1])["loss"] == 2.0
    MetricsLogger(tmp_path, enabled=True).close()  # a fresh run starts over
    assert path.read_text() == ""


def test_metrics_logger_disabled_writes_nothing(tmp_path):
    log = MetricsLogger(tmp_path / "run", enabled=False)
    assert log.log(1, {"loss": 1.0}) is None
    assert not (tmp_path / "run").exists()
    assert truncate_metrics(tmp_path / "missing.jsonl", 3) == 0


def test_throughput_and_eta():
    tp = Throughput(window=2)
    assert tp.samples_per_s == 0.0 and tp.eta_s(5) == math.inf
    tp.start(now=0.0)
    tp.tick(8, now=1.0)
    assert tp.samples_per_s == 8.0
    tp.tick(8, now=2.0)
    tp.tick(16, now=2.5)  # window of 2 steps: (8 + 16) samples over 1.5 s
    assert tp.samples_per_s == pytest.approx(16.0)
    assert tp.steps_per_s == pytest.approx(2 / 1.5)
    assert tp.eta_s(4) == pytest.approx(3.0)
    assert format_eta(3725.4) == "1:02:05" and format_eta(math.inf) == "?"


def test_reduce_terms_single_process_and_nonfinite():
    terms = {"loss_itc": torch.tensor(1.25), "kd_itc": torch.tensor(0.5), "loss_lm": 3.0}
    out = reduce_terms(terms)
    assert out == {"loss_itc": 1.25, "kd_itc": 0.5, "loss_lm": 3.0}
    assert all(type(v) is float for v in out.values())
    bad = {"loss_itc": 1.0, "kd_attn": torch.tensor(float("nan")), "loss_lm": float("-inf")}
    assert nonfinite_terms(bad) == ["kd_attn", "loss_lm"]
    assert nonfinite_terms(out) == []


def test_only_rank0_writes(tmp_path, monkeypatch):
    monkeypatch.setattr(ckpt, "is_main_process", lambda: False)
    path = save_checkpoint(tmp_path, 1, {"model": _net()})
    assert path == tmp_path / "checkpoints" / "step_1" and not path.exists()
    assert not os.path.exists(tmp_path / "checkpoints")
