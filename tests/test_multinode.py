"""Multi-node pretraining, run for real on one machine: two torchrun launchers ("nodes", one
process each) meet through torchrun's c10d rendezvous on loopback and train one run in one
shared run_dir, as cluster nodes on shared storage do. World size 2 either way, so the same
data partition, seeds and reductions: the losses must equal those of one launcher with two
processes. docs/scaling.md shows these same command lines."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

import dlip
from dlip.data.synthetic import synthesize

# Logit KD of ITC, ITM and LM, image representations, cross-attention maps: the KD terms that
# read gathered features (kd_itc) and the sampled ITM pairs (kd_itm) travel across nodes too.
KD_TERMS = ("kd_itc", "kd_itm", "kd_lm", "kd_rep_image", "kd_attn_cross")
COMPARED = ("loss", "loss_itc", "loss_itm", "loss_lm", *KD_TERMS, "grad_norm", "lr", "epoch")
TIMEOUT_S = 240  # per run (both launchers together); a healthy run takes well under a minute
# One thread per worker (2 shared cores); no GPU; gloo's sockets on loopback only.
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "GLOO_SOCKET_IFNAME": "lo"}
TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synth_multinode")
    # 6 training images x 2 captions: one batch per rank per epoch, so step 2 is epoch 1's
    # (a new shuffle) and the partition is compared across an epoch boundary too.
    synthesize(out, 16, seed=0, image_size=32, captions_per_image=2)
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pretrain_args(synth: Path, teacher_dir: Path, run_dir: Path) -> list[str]:
    items = {
        "run_dir": run_dir, "max_steps": 2, "model.preset": "test_tiny",
        "data.synth_dir": synth, "data.batch_size": 4, "data.num_workers": 0,
        "data.max_length": 20, "data.hflip": "false", "data.rand_augment": "false",
        "loss.queue_size": 16,  # momentum distillation on (the default): the queue is shared too
        "optim.warmup_steps": 2, "optim.lr": "1.0e-3", "optim.grad_clip": 1.0,
        "run.log_every": 1, "run.ckpt_every": 100, "run.device": "cpu",
        "teacher.checkpoint": teacher_dir, **{f"loss.kd.weights.{t}": 1.0 for t in KD_TERMS},
    }  # fmt: skip
    return ["-m", "dlip", "pretrain", *(f"{k}={v}" for k, v in items.items())]


def descendants(pid: int) -> list[int]:
    """Every live descendant of `pid` (torchrun starts its workers in sessions of their own, so
    killing the launcher's process group would miss them)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue  # exited while we read
        children.setdefault(ppid, []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        kids = children.get(todo.pop(), [])
        out += kids
        todo += kids
    return out


def stop(procs: list[subprocess.Popen]) -> None:
    """Terminate launchers still running (torchrun then stops its workers), then kill whatever
    of them and their workers is left: nothing outlives a failed test."""
    alive = [p for p in procs if p.poll() is None]
    tree = [pid for p in alive for pid in descendants(p.pid)]
    for p in alive:
        p.terminate()
    for p in alive:
        try:
            p.wait(timeout=15)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
    for pid in tree:
        with contextlib.suppress(ProcessLookupError):  # already gone
            os.kill(pid, signal.SIGKILL)


def launch(cmds: list[list[str]], logs: Path) -> None:
    """Start every launcher at once, wait until all exit (or one fails, or TIMEOUT_S passes),
    stop the rest; fails with the log tails unless every launcher exited 0."""
    paths = [logs / f"launcher_{i}.log" for i in range(len(cmds))]
    procs: list[subprocess.Popen] = []
    try:
        for cmd, path in zip(cmds, paths, strict=True):
            with path.open("w") as log:  # the child keeps its own copy of the descriptor
                procs.append(subprocess.Popen(cmd, env=ENV, stdout=log, stderr=subprocess.STDOUT))
        deadline = time.monotonic() + TIMEOUT_S
        while time.monotonic() < deadline:
            codes = [p.poll() for p in procs]
            if all(c is not None for c in codes) or any(c not in (None, 0) for c in codes):
                break  # done, or one failed: the other would wait for its peer until a timeout
            time.sleep(0.2)
    finally:
        stop(procs)
    texts = [p.read_text() for p in paths]
    report = [
        f"launcher {i}: rc={p.returncode}\n{t[-2000:]}"
        for i, (p, t) in enumerate(zip(procs, texts, strict=True))
    ]
    # Every launcher's tail: a stopped peer (rc -15) is not the cause, the other one's log is.
    assert all(p.returncode == 0 for p in procs), "\n".join(report)


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_two_node_rendezvous_matches_one_node_two_processes(synth, teacher_dir, tmp_path):
    one_node, two_nodes = tmp_path / "one_node", tmp_path / "two_nodes"
    single = [
        *TORCHRUN, "--nnodes=1", "--nproc_per_node=2",
        "--master_addr=127.0.0.1", f"--master_port={free_port()}",
        *pretrain_args(synth, teacher_dir, one_node),
    ]  # fmt: skip
    launch([single], tmp_path)

    port, run_id = free_port(), uuid.uuid4().hex

    def node(is_host: bool) -> list[str]:
        # Both launchers' address matches the endpoint, so torchrun would let them race to host
        # the rendezvous store; is_host says which one does (on a cluster: the endpoint's node).
        # --local-addr: the address the workers' process group bootstraps on (MASTER_ADDR).
        return [
            *TORCHRUN, "--nnodes=2", "--nproc_per_node=1", "--rdzv-backend=c10d",
            f"--rdzv-endpoint=127.0.0.1:{port}", f"--rdzv-id={run_id}",
            f"--rdzv-conf=is_host={str(is_host).lower()}", "--local-addr=127.0.0.1",
            *pretrain_args(synth, teacher_dir, two_nodes),
        ]  # fmt: skip

    logs = tmp_path / "nodes"
    logs.mkdir()
    launch([node(True), node(False)], logs)

    a, b = metrics(one_node), metrics(two_nodes)
    assert [r["step"] for r in b] == [1, 2]  # written once: only global rank 0 writes
    for ra, rb in zip(a, b, strict=True):
        for key in COMPARED:
            assert rb[key] == pytest.approx(ra[key], rel=1e-6, abs=1e-9), (ra["step"], key)
    assert a[1]["loss"] != pytest.approx(a[0]["loss"], rel=1e-6)  # step 2 saw the update
    assert sorted(p.name for p in (two_nodes / "checkpoints").iterdir()) == ["step_2"]
    assert dlip.load(two_nodes / "final").config.name == "test_tiny"
