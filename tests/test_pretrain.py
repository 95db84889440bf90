"""End-to-end pretraining on CPU with tiny models and a tiny synthetic set: metrics and final
model of a no-teacher run, the KD contract (terms, frozen teacher, gradients), exact resume,
and the errors raised before step 1."""

from __future__ import annotations

import json
import math

import pytest
import torch

import dlip
from dlip.cli.train import pretrain_main as main
from dlip.config import ConfigError
from dlip.data.synthetic import synthesize
from dlip.losses.adapters import KD_TERMS
from dlip.models.config import ModelConfig
from dlip.models.presets import get_config
from dlip.tokenizer import get_tokenizer
from dlip.train.checkpoint import find_latest, load_checkpoint
from dlip.train.config import load
from dlip.train.loop import loss_weights, to_inputs, total_loss, train_step
from dlip.train.optim import build_optimizer
from dlip.train.pretrain import build_loader, build_task
from dlip.train.task import load_teacher

KD_ON = list(KD_TERMS)  # every term, each weight 1


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth")
    synthesize(out, 40, seed=0, image_size=32, captions_per_image=2)
    return out


def overrides(synth, run_dir, steps=3, **extra) -> list[str]:
    items = {
        "run_dir": str(run_dir),
        "max_steps": steps,
        "model.preset": "test_tiny",
        "data.synth_dir": str(synth),
        "data.batch_size": 4,
        "data.num_workers": 0,
        "data.max_length": 20,
        "data.hflip": "false",
        "data.rand_augment": "false",
        "loss.queue_size": 16,
        "optim.warmup_steps": 2,
        "optim.lr": "1.0e-3",
        "optim.grad_clip": 1.0,
        "run.log_every": 1,
        "run.ckpt_every": 2,
        **extra,
    }
    return [f"{k}={v}" for k, v in items.items()]


def kd_overrides(teacher_dir) -> dict[str, object]:
    out: dict[str, object] = {"teacher.checkpoint": str(teacher_dir)}
    out.update({f"loss.kd.weights.{t}": 1.0 for t in KD_ON})
    return out


def metrics(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_no_teacher_run_logs_checkpoints_and_saves_a_loadable_student(synth, tmp_path):
    run_dir = tmp_path / "run"
    assert main(overrides(synth, run_dir)) == 0  # momentum distillation on (the default)
    rows = metrics(run_dir)
    assert [r["step"] for r in rows] == [1, 2, 3]
    for r in rows:
        for key in ("loss", "loss_itc", "loss_itm", "loss_lm", "samples_per_s", "lr"):
            assert math.isfinite(r[key]), key
        assert r["loss"] == pytest.approx(r["loss_itc"] + r["loss_itm"] + r["loss_lm"], rel=1e-5)
        assert not any(k.startswith("kd_") for k in r)
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step_2", "step_3"]
    model_state, state = load_checkpoint(find_latest(run_dir))
    assert state["step"] == 3 and state["consumed"] == 3
    assert any(k.startswith("queue.") for k in model_state)  # momentum state is resumed too
    student = dlip.load(run_dir / "final")
    assert student.config.name == "test_tiny"
    assert not student.training
    assert (run_dir / "config.yaml").is_file() and (run_dir / "teacher.json").is_file()


def test_kd_run_logs_every_term_and_never_touches_the_teacher(synth, teacher_dir, tmp_path):
    run_dir = tmp_path / "kd"
    args = overrides(synth, run_dir, steps=2, **kd_overrides(teacher_dir))
    assert main([*args, "loss.momentum_distill=false"]) == 0
    for r in metrics(run_dir):
        for term in KD_ON:
            assert math.isfinite(r[term]) and r[term] > 0, (term, r[term])
    model_state, _ = load_checkpoint(find_latest(run_dir))
    assert {k.split(".")[0] for k in model_state} == {"student", "adapters"}
    assert dlip.load(run_dir / "final").config.name == "test_tiny"


def test_kd_step_grads_every_student_and_adapter_param_only(synth, teacher_dir, tmp_path):
    cfg = load(None, overrides(synth, tmp_path / "g", **kd_overrides(teacher_dir)))
    teacher = load_teacher(cfg)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    torch.manual_seed(0)
    task = build_task(cfg, teacher).train()
    assert not teacher.training  # the task's train() keeps the teacher in eval mode
    assert task.student_m is not None and not any(p.requires_grad for p in teacher.parameters())
    loader = build_loader(cfg, task.student.config)
    loader.set_epoch(0)
    batch = to_inputs(next(iter(loader)), get_tokenizer(), cfg.data.max_length, "cpu")

    terms = task(batch)
    assert set(KD_ON) <= set(terms)
    total_loss(terms, loss_weights(cfg)).backward()
    no_grad = [n for n, p in task.named_parameters() if p.requires_grad and p.grad is None]
    assert no_grad == []
    assert all(p.grad is None for p in teacher.parameters())
    assert all(p.grad is None for p in task.student_m.parameters())

    optimizer = build_optimizer(task, 1e-3, 0.05)
    in_optimizer = {id(p) for g in optimizer.param_groups for p in g["params"]}
    assert not in_optimizer & {id(p) for p in teacher.parameters()}
    assert not in_optimizer & {id(p) for p in task.student_m.parameters()}
    optimizer.zero_grad()
    for step in range(2):
        train_step(task, task, optimizer, [batch], cfg, step, 10, 10)
    after = teacher.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # bit-identical


def test_resume_reproduces_the_uninterrupted_losses(synth, tmp_path):
    straight, cut = tmp_path / "straight", tmp_path / "cut"
    extra = {"run.ckpt_every": 100}  # step schedule: the lr does not depend on max_steps
    assert main(overrides(synth, straight, steps=6, **extra)) == 0
    assert main(overrides(synth, cut, steps=3, **extra)) == 0
    assert main([*overrides(synth, cut, steps=6, **extra), "--resume", "latest"]) == 0
    a, b = metrics(straight), metrics(cut)
    assert [r["step"] for r in b] == [1, 2, 3, 4, 5, 6]
    for ra, rb in zip(a, b, strict=True):
        for key in ("loss", "loss_itc", "loss_itm", "loss_lm", "lr"):
            assert rb[key] == pytest.approx(ra[key], abs=1e-6), (ra["step"], key)


def test_setup_errors_come_before_step_one(synth, teacher_dir, tmp_path):
    run_dir = tmp_path / "err"
    missing = tmp_path / "no_such_teacher"
    args = overrides(synth, run_dir, **kd_overrides(teacher_dir))
    with pytest.raises(FileNotFoundError, match=r"teacher\.checkpoint"):
        main([*args, f"teacher.checkpoint={missing}"])
    with pytest.raises(ConfigError, match=r"optim\.lrr"):
        main([*overrides(synth, run_dir), "optim.lrr=0.1"])
    with pytest.raises(ValueError, match="out of range"):
        main([*args, "loss.kd.layer_maps.image=[0, 7]"])
    wide_vocab = tmp_path / "vocab_teacher"
    data = get_config("test_tiny").to_dict()
    data["text"]["vocab_size"] = 30600
    dlip.save(dlip.BLIP(ModelConfig.from_dict(data)), wide_vocab)
    with pytest.raises(ValueError, match="tokenizer mismatch"):
        main([*args, f"teacher.checkpoint={wide_vocab}"])
    assert not (run_dir / "metrics.jsonl").exists()
    assert not (run_dir / "checkpoints").exists()


def test_cli_reports_setup_errors(synth, tmp_path, capsys):
    from dlip.cli import main as cli_main

    rc = cli_main(["pretrain", *overrides(synth, tmp_path / "c"), "teacher.checkpoint=/nope"])
    assert rc == 2
    assert "teacher.checkpoint" in capsys.readouterr().err


def test_torchrun_two_processes_gloo(synth, teacher_dir, tmp_path):
    import os
    import socket
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    run_dir = tmp_path / "ddp"
    args = overrides(synth, run_dir, steps=2, **kd_overrides(teacher_dir))
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
        "--master_addr=127.0.0.1", f"--master_port={port}",
        "-m", "dlip", "pretrain", *args, "run.device=cpu",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = metrics(run_dir)
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:
        for term in ("loss_itc", "loss_itm", "loss_lm", *KD_ON):
            assert math.isfinite(r[term]) and r[term] > 0, (term, r[term])
        assert r["samples_per_s"] > 0
    assert dlip.load(run_dir / "final").config.name == "test_tiny"
