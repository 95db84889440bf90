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
from dlip.losses.adapters import KD_TERMS
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
        **{f"loss.kd.weights.{term}": 1.0 for term in KD_TERMS},
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
    # Token means (loss_lm, kd_lm, the text / decoder hidden-state, attention and decoder-state
    # terms): each rank weighs its mean by its share of the global batch's tokens (the ranks
    # hold different numbers here), so the DDP average is the 1-process mean over all tokens.
    # ITM and the fusion-pass terms score hard negatives drawn at random (from each rank's
    # own batch with its own generator): those cannot match and are not compared.
    drawn = {"loss", "loss_itm", "kd_itm", "kd_rep_fusion", "kd_hidden_fusion"}
    drawn |= {"kd_attn_fusion", "kd_attn_cross", "grad_norm"}
    compared = ["loss_itc", "loss_lm", *(t for t in KD_TERMS if t not in drawn)]
    assert len(compared) == 16  # kd_feat and kd_icl (gathered teacher keys) included
    for key in compared:
        assert r1[key] > 0
        assert r2[key] == pytest.approx(r1[key], rel=1e-5, abs=1e-6), key


# ------------------------------------------------------------------ one run per run directory
def test_resume_auto_starts_then_resumes(synth, tmp_path):
    """One command for the first launch and every requeue: `--resume auto` starts a run in an
    empty directory and continues it from its checkpoint afterwards."""
    run_dir = tmp_path / "auto"
    run_ok([*PRETRAIN, *overrides(synth, run_dir, 2), "--resume", "auto"])
    assert [r["step"] for r in metrics(run_dir)] == [1, 2]
    run_ok([*PRETRAIN, *overrides(synth, run_dir, 4), "--resume", "auto"])
    assert [r["step"] for r in metrics(run_dir)] == [1, 2, 3, 4]


def test_a_fresh_run_into_a_used_run_dir_is_refused_or_overwritten(synth, tmp_path):
    from dlip.cli import main

    run_dir = tmp_path / "used"
    run_ok([*PRETRAIN, *overrides(synth, run_dir, 3, **{"run.ckpt_every": 3})])
    before = (run_dir / "metrics.jsonl").read_text()
    assert main(["pretrain", *overrides(synth, run_dir, 1)]) == 2  # refused, nothing touched
    assert (run_dir / "metrics.jsonl").read_text() == before
    assert find_latest(run_dir) == run_dir / "checkpoints" / "step_3"
    # Replaced: the old run's step_3 must not outlive it (it would be the next --resume's).
    assert main(["pretrain", *overrides(synth, run_dir, 2), "run.overwrite=true"]) == 0
    assert [r["step"] for r in metrics(run_dir)] == [1, 2]
    assert find_latest(run_dir) == run_dir / "checkpoints" / "step_2"


def test_checkpoint_rotation_touches_only_its_own_run(tmp_path):
    import torch

    from dlip.train.checkpoint import read_run_id, save_checkpoint

    model = {"w": torch.zeros(2)}
    for step in (8, 10):
        save_checkpoint(tmp_path, step, {"model": model}, keep_last=None, run_id="other")
    for step in (2, 4, 6):
        save_checkpoint(tmp_path, step, {"model": model}, keep_last=2, run_id="this")
    left = sorted((tmp_path / "checkpoints").iterdir())
    assert [(d.name, read_run_id(d)) for d in left] == [
        ("step_10", "other"), ("step_4", "this"), ("step_6", "this"), ("step_8", "other"),
    ]  # fmt: skip


def test_resume_refuses_another_teacher_or_a_changed_key(synth, teacher_dir, tmp_path):
    import torch

    import dlip
    from dlip.cli import main

    kd = {"teacher.checkpoint": str(teacher_dir), "loss.kd.weights.kd_itc": 1.0}
    kd["optim.schedule"] = "cosine"  # its lr depends on max_steps
    run_dir = tmp_path / "kd"
    run_ok([*PRETRAIN, *overrides(synth, run_dir, 2, **kd)])
    other = dlip.load(teacher_dir)
    with torch.no_grad():
        other.temp.fill_(0.05)  # same architecture and size, other weights
    other_dir = dlip.save(other, tmp_path / "other_teacher")
    resume = ["--resume", "latest"]
    swapped = {**kd, "teacher.checkpoint": str(other_dir)}
    assert main(["pretrain", *overrides(synth, run_dir, 2, **swapped), *resume]) == 2
    assert main(["pretrain", *overrides(synth, run_dir, 2, **kd), "optim.lr=2.0e-3", *resume]) == 2
    assert main(["pretrain", *overrides(synth, run_dir, 4, **kd), *resume]) == 2
    assert [r["step"] for r in metrics(run_dir)] == [1, 2]  # every refusal before step 1
    # What cannot change the remaining steps may change.
    run_ok([*PRETRAIN, *overrides(synth, run_dir, 2, **kd), "run.log_every=2", *resume])
    assert [r["step"] for r in metrics(run_dir)] == [1, 2]
    assert (run_dir / "final").is_dir()


def test_resume_errors_name_the_teacher_and_the_key(synth, teacher_dir, tmp_path, capsys):
    from dlip.cli import main

    kd = {"teacher.checkpoint": str(teacher_dir), "loss.kd.weights.kd_itc": 1.0}
    run_dir = tmp_path / "named"
    run_ok([*PRETRAIN, *overrides(synth, run_dir, 1, **kd)])
    capsys.readouterr()
    assert main(["pretrain", *overrides(synth, run_dir, 1), "--resume", "latest"]) == 2
    err = capsys.readouterr().err
    assert "teacher" in err and "checkpoint" in err
    code = main(["pretrain", *overrides(synth, run_dir, 1, **kd), "data.batch_size=2", "--resume",
                 "latest"])  # fmt: skip
    assert code == 2
    assert "data.batch_size: was 4, now 2" in capsys.readouterr().err


def _children(pid: int) -> list[int]:
    """Direct children of `pid` (from /proc)."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


def _worker_of_rank(agent: int, rank: int) -> int | None:
    """The torchrun worker process (a descendant of the launcher) whose RANK is `rank`."""
    todo = _children(agent)
    while todo:
        pid = todo.pop()
        try:
            env = (Path("/proc") / str(pid) / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"RANK={rank}".encode() in env and b"LOCAL_RANK=" + str(rank).encode() in env:
            return pid
        todo += _children(pid)
    return None


def test_torchrun_restarts_a_killed_rank_and_resumes_exactly(synth, tmp_path):
    """`torchrun --max-restarts=1 ... --resume auto`: one rank SIGKILLed mid-run, the agent
    restarts both workers, they resume from the last checkpoint, and every logged term equals
    the uninterrupted 2-process run's (each rank's RNG state is checkpointed, so dropout and
    ITM negative sampling continue as they would have)."""
    steps, kill_at = 10, 4

    def launch(run_dir: Path, **popen: object) -> subprocess.Popen:
        cmd = [
            sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
            "--max-restarts=1", "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{free_port()}",
            "-m", "dlip", "pretrain", *overrides(synth, run_dir, steps, **{"run.ckpt_every": 2}),
            "--resume", "auto",
        ]  # fmt: skip
        # its own session: a failed test kills the launcher and its workers together
        return subprocess.Popen(cmd, env=ENV, text=True, start_new_session=True, **popen)  # type: ignore[arg-type]

    straight, cut = tmp_path / "straight", tmp_path / "cut"
    ref = launch(straight, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, err = ref.communicate(timeout=300)
    assert ref.returncode == 0, err[-3000:]
    job = launch(cut, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while not any(r["step"] >= kill_at for r in metrics(cut)):
            assert job.poll() is None, "the run ended before it could be killed"
            assert time.monotonic() < deadline, "no metrics row for the kill step in time"
            time.sleep(0.005)
        victim = _worker_of_rank(job.pid, 1)
        assert victim is not None
        os.kill(victim, signal.SIGKILL)
        _, err = job.communicate(timeout=180)
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
            job.wait()
    assert job.returncode == 0, err[-3000:]  # restarted by the agent, finished
    a, b = metrics(straight), metrics(cut)
    assert [r["step"] for r in a] == [r["step"] for r in b] == list(range(1, steps + 1))
    for ra, rb in zip(a, b, strict=True):
        for key in TERMS:
            assert rb[key] == pytest.approx(ra[key], abs=1e-6), (ra["step"], key)


_WRITER = """
import sys, torch
from dlip.train.checkpoint import save_checkpoint
run_dir = sys.argv[1]
big = torch.randn(4_000_000)  # 16 MB: a write takes long enough to be cut
for step in range(1, 1000):
    state = {"model": {"w": big + step}, "head": big[:4].clone(), "note": step}
    save_checkpoint(run_dir, step, state, keep_last=2, run_id="w")
"""


@pytest.mark.parametrize("delay", [0.4, 0.7, 1.1])
def test_sigkill_during_a_checkpoint_write_leaves_the_previous_one_loadable(tmp_path, delay):
    writer = subprocess.Popen([sys.executable, "-c", _WRITER, str(tmp_path)], env=ENV)
    deadline = time.monotonic() + 60
    while find_latest(tmp_path) is None:  # after the import and the first save
        assert writer.poll() is None and time.monotonic() < deadline
        time.sleep(0.01)
    time.sleep(delay)
    writer.send_signal(signal.SIGKILL)
    writer.wait(timeout=30)
    latest = find_latest(tmp_path)
    assert latest is not None
    model, state = load_checkpoint(latest)  # complete: both files, readable
    step = state["step"]
    assert latest.name == f"step_{step}" and state["note"] == step
    assert model["w"][:4].equal(state["head"] + step)  # the weights of that very step


def test_resume_ignores_keys_added_or_removed_since_the_run_started(synth, tmp_path):
    """A run saved by an older dlip resumes: a key it lacks counts as its default, a key the
    code no longer has is ignored (refusing them would strand every run at an upgrade)."""
    import yaml

    run_dir = tmp_path / "older"
    run_ok([*PRETRAIN, *overrides(synth, run_dir, 2)])
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    del saved["data"]["num_samples"]  # added since
    saved["run"]["bf16"] = True  # removed since
    (run_dir / "config.yaml").write_text(yaml.safe_dump(saved))
    run_ok([*PRETRAIN, *overrides(synth, run_dir, 3), "--resume", "latest"])
    assert [r["step"] for r in metrics(run_dir)] == [1, 2, 3]


def test_a_second_run_into_a_locked_run_dir_is_refused(synth, tmp_path):
    """Two runs in one run_dir used to delete each other's checkpoints; `--resume auto` with no
    checkpoint yet would even have cleared the running run's files. The second is refused,
    naming the holder, and a killed holder leaves no stale lock."""
    run_dir = tmp_path / "locked"
    first = subprocess.Popen(
        [*PRETRAIN, *overrides(synth, run_dir, 400, **{"run.ckpt_every": 1000})],
        env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 90
        while not metrics(run_dir):
            assert first.poll() is None and time.monotonic() < deadline
            time.sleep(0.02)
        second = [*PRETRAIN, *overrides(synth, run_dir, 400), "--resume", "auto"]
        out = subprocess.run(second, env=ENV, capture_output=True, text=True, timeout=120)
        assert out.returncode == 2, out.stderr[-2000:]
        assert "in use by a running dlip run" in out.stderr and f"pid {first.pid}" in out.stderr
        assert first.poll() is None  # the first run goes on, its files untouched
        assert metrics(run_dir)
    finally:
        first.kill()
        first.wait()
    run_ok([*PRETRAIN, *overrides(synth, run_dir, 2), "run.overwrite=true"])  # lock released
    assert [r["step"] for r in metrics(run_dir)] == [1, 2]


def test_resume_passes_over_corrupt_checkpoints_to_the_newest_sound_one(synth, tmp_path):
    """Zeroed bytes inside the newest weights (which still load) and a truncated trainer state
    in the one before: the resume says so and continues from the newest sound checkpoint,
    logging the uninterrupted run's losses."""
    straight, cut = tmp_path / "straight", tmp_path / "cut"
    run_ok([*PRETRAIN, *overrides(synth, straight, 5)])
    run_ok([*PRETRAIN, *overrides(synth, cut, 4, **{"run.keep_last": 3})])
    step4 = cut / "checkpoints" / "step_4" / "model.safetensors"
    data = bytearray(step4.read_bytes())
    data[len(data) // 2 : len(data) // 2 + 5000] = bytes(5000)  # 5 KB of zeros, header intact
    step4.write_bytes(bytes(data))
    trainer3 = cut / "checkpoints" / "step_3" / TRAINER_FILE
    trainer3.write_bytes(trainer3.read_bytes()[:100])
    out = subprocess.run(
        [*PRETRAIN, *overrides(synth, cut, 5, **{"run.keep_last": 3}), "--resume", "latest"],
        env=ENV, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    assert "passing over checkpoint step_4: model.safetensors does not match" in out.stdout
    assert "passing over checkpoint step_3: " in out.stdout
    assert "resuming from step_2" in out.stdout
    a, b = metrics(straight), metrics(cut)
    assert [r["step"] for r in b] == [1, 2, 3, 4, 5]
    for ra, rb in zip(a, b, strict=True):
        for key in TERMS:
            assert rb[key] == pytest.approx(ra[key], abs=1e-6), (ra["step"], key)
