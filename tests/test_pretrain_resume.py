"""`dlip pretrain` through its real entry point, as subprocesses on CPU (tiny models, tiny
synthetic set): a run killed with SIGKILL mid-way and resumed with `--resume latest` logs the
uninterrupted run's losses, and a 2-process gloo torchrun run's first-step ITC / KD terms equal
a 1-process run's on the same samples (the all-gathers are right)."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dlip.data.synthetic import synthesize
from dlip.train.checkpoint import TMP_PREFIX, TRAINER_FILE, find_latest, load_checkpoint

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
PRETRAIN = [sys.executable, "-m", "dlip", "pretrain"]
TERMS = ("loss", "loss_itc", "loss_itm", "loss_lm", "lr")


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth")
    synthesize(out, 40, seed=0, image_size=32, captions_per_image=2)
    return out


@pytest.fixture(scope="module")
def small_synth(tmp_path_factory):
    """8 images, one caption each: one batch of 8 is the whole set, whatever the order."""
    out = tmp_path_factory.mktemp("small_synth")
    synthesize(out, 10, seed=0, image_size=32, n_val=1, n_test=1, captions_per_image=1)
    return out


def overrides(synth: Path, run_dir: Path, steps: int, **extra: object) -> list[str]:
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
        "data.min_scale": 1.0,
        "loss.momentum_distill": "false",
        "optim.warmup_steps": 2,
        "optim.lr": "1.0e-3",
        "optim.grad_clip": 1.0,
        "optim.schedule": "step",  # a function of the step, not of max_steps
        "run.log_every": 1,
        "run.ckpt_every": 1,
        "run.device": "cpu",
        **extra,
    }
    return [f"{k}={v}" for k, v in items.items()]


def metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:  # a line being written while we read
            break
    return rows


def run_ok(cmd: list[str], timeout: float = 120) -> None:
    out = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, out.stderr[-3000:]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ------------------------------------------------------------------------------------ SIGKILL
def test_sigkill_mid_run_then_resume_reproduces_the_uninterrupted_losses(synth, tmp_path):
    steps, kill_at = 8, 3
    straight, cut = tmp_path / "straight", tmp_path / "cut"
    # The uninterrupted run goes alongside the one to kill.
    ref = subprocess.Popen(
        [*PRETRAIN, *overrides(synth, straight, steps)],
        env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    victim = subprocess.Popen(
        [*PRETRAIN, *overrides(synth, cut, steps)],
        env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 90
        while not any(r["step"] >= kill_at for r in metrics(cut)):
            assert victim.poll() is None, "the run ended before it could be killed"
            assert time.monotonic() < deadline, "no metrics row for the kill step in time"
            time.sleep(0.005)
        victim.send_signal(signal.SIGKILL)
        assert victim.wait(timeout=30) == -signal.SIGKILL  # killed, not finished
    finally:
        if victim.poll() is None:
            victim.kill()
            victim.wait()
    _, err = ref.communicate(timeout=120)
    assert ref.returncode == 0, err[-3000:]

    logged = max(r["step"] for r in metrics(cut))
    assert kill_at <= logged < steps, logged  # the kill landed mid-run
    assert not (cut / "final").exists()
    root = cut / "checkpoints"
    for d in root.iterdir():  # a step_N directory is complete; anything partial is a temp dir
        if re.fullmatch(r"step_\d+", d.name):
            assert (d / "model.safetensors").is_file() and (d / TRAINER_FILE).is_file(), d
        else:
            assert d.name.startswith(TMP_PREFIX), d
    latest = find_latest(cut)
    assert latest is not None
    _, state = load_checkpoint(latest)  # complete and readable: the resume starts from it
    resumed_from = state["step"]
    assert latest.name == f"step_{resumed_from}"
    assert kill_at - 1 <= resumed_from < steps  # step k-1 was saved before step k was logged
    assert resumed_from <= logged

    run_ok([*PRETRAIN, *overrides(synth, cut, steps), "--resume", "latest"])
    a, b = metrics(straight), metrics(cut)
    assert [r["step"] for r in a] == list(range(1, steps + 1))
    assert [r["step"] for r in b] == list(range(1, steps + 1))
    assert (cut / "final").is_dir()
    after = [(ra, rb) for ra, rb in zip(a, b, strict=True) if ra["step"] > resumed_from]
    assert len(after) == steps - resumed_from
    for ra, rb in after:
        for key in TERMS:
            assert rb[key] == pytest.approx(ra[key], abs=1e-6), (ra["step"], key)


# ---------------------------------------------------------------------------- all-gather (DDP)
def test_two_processes_first_step_itc_and_kd_equal_one_process(small_synth, teacher_dir, tmp_path):
    n = sum(1 for _ in (small_synth / "manifest.jsonl").open())
    assert n == 8
    # The 1-process sampler (EpochSampler) and DistributedSampler shuffle with different seeds,
    # so the first global batches are the same samples only when one batch is the whole set:
    # 1 x 8 and 2 x 4, compared as sets (ITC and its KD are invariant to the batch order).
    # No randomness in the terms compared: text dropout 0 (the teacher is in eval mode), full
    # crops of square images (scale (1, 1) leaves no crop to draw), no flips or RandAugment.
    extra = {
        "teacher.checkpoint": str(teacher_dir),
        "loss.kd.weights.kd_itc": 1.0,
        "loss.kd.weights.kd_lm": 1.0,
        "model.arch": "{text: {dropout: 0.0}}",
    }
    one, two = tmp_path / "one", tmp_path / "two"
    single = subprocess.Popen(
        [*PRETRAIN, *overrides(small_synth, one, 1, **extra), "data.batch_size=8"],
        env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    ddp = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
        "--master_addr=127.0.0.1", f"--master_port={free_port()}",
        "-m", "dlip", "pretrain", *overrides(small_synth, two, 1, **extra), "data.batch_size=4",
    ]  # fmt: skip
    run_ok(ddp, timeout=300)
    _, err = single.communicate(timeout=120)
    assert single.returncode == 0, err[-3000:]
    (r1,) = metrics(one)
    (r2,) = metrics(two)
    assert r1["step"] == r2["step"] == 1
    assert r2["samples_per_s"] > 0
    # loss_lm and kd_lm are token means: each rank weighs its mean by its share of the global
    # batch's tokens (the ranks hold different numbers here), so the DDP average is the
    # 1-process mean over all tokens.
    for key in ("loss_itc", "kd_itc", "loss_lm", "kd_lm"):
        assert r1[key] > 0
        assert r2[key] == pytest.approx(r1[key], rel=1e-5, abs=1e-6), key
