"""Finetuning under torchrun (2 processes, gloo) from a pretraining checkpoint: a model with
both towers, of which each task trains one. DDP refuses parameters that get no gradient
("Expected to have finished reduction in the prior iteration"), so the task must train the
form of the model it uses, as BLIP's finetuning classes do."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest

import dlip
from dlip.data.synthetic import synthesize
from dlip.train.config import FinetuneConfig, load
from dlip.train.finetune import load_student

KD = {
    "retrieval": {"loss.kd.weights.kd_itc": 1.0, "loss.kd.weights.kd_itm": 1.0},
    "caption": {"loss.kd.weights.kd_lm": 1.0, "loss.kd.weights.kd_rep_decoder": 1.0},
}


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth_ft_ddp")
    synthesize(out, 24, seed=0, image_size=32, captions_per_image=2, n_val=4, n_test=4)
    return out


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """What `dlip pretrain` leaves in run_dir/final: a saved model with encoder and decoder."""
    model = dlip.create_model("test_tiny")
    assert model.config.has_encoder and model.config.has_decoder
    return dlip.save(model, tmp_path_factory.mktemp("pretrained") / "final")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _overrides(synth, pretrained, run_dir, **extra) -> list[str]:
    items = {
        "run_dir": run_dir, "model.checkpoint": pretrained, "data.synth_dir": synth,
        "data.batch_size": 4, "data.num_workers": 0, "data.hflip": "false",
        "data.rand_augment": "false", "loss.momentum_distill": "false", "run.max_steps": 2,
        "run.log_every": 1, "run.device": "cpu", "eval.k_test": 4, "eval.batch_size": 8, **extra,
    }  # fmt: skip
    return [f"{k}={v}" for k, v in items.items()]


@pytest.mark.parametrize("kd", [False, True], ids=["no_kd", "kd"])
@pytest.mark.parametrize("task", ["retrieval", "caption"])
def test_two_process_finetune_from_a_pretraining_checkpoint(
    task, kd, synth, pretrained, teacher_dir, tmp_path
):
    run_dir = tmp_path / "run"
    extra = {"teacher.checkpoint": teacher_dir, **KD[task]} if kd else {}
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
        "--master_addr=127.0.0.1", f"--master_port={_free_port()}",
        "-m", "dlip", "finetune", task, *_overrides(synth, pretrained, run_dir, **extra),
        "--no-test",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2]
    loss = "loss_itc" if task == "retrieval" else "loss_lm"
    assert all(r[loss] > 0 for r in steps)
    if kd:
        assert all(r[term.rsplit(".", 1)[-1]] > 0 for r in steps for term in KD[task])
    assert any("val_score" in r for r in rows)
    final = dlip.load(run_dir / "final")  # the task's form: the tower it trained
    assert final.config.has_encoder == (task == "retrieval")
    assert final.config.has_decoder == (task == "caption")


@pytest.mark.parametrize("task", ["retrieval", "caption"])
def test_the_task_form_keeps_the_pretrained_weights(task, pretrained):
    """Dropping the unused tower keeps every tensor the task uses, bit for bit."""
    overrides = [f"task={task}", f"model.checkpoint={pretrained}"]
    cfg = load(None, overrides, validate=False, cls=FinetuneConfig)
    student = load_student(cfg)
    full = dlip.load(pretrained).state_dict()
    kept = student.state_dict()
    assert kept and set(kept) < set(full)
    for name, value in kept.items():
        assert value.equal(full[name]), name
    prefix = "text_decoder." if task == "retrieval" else "text_encoder."
    assert not any(k.startswith(prefix) for k in kept)
