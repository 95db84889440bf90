"""One run per run directory: start, resume, requeue, and what a resume may not change.

- `--resume latest` continues the newest complete checkpoint (an error when there is none);
  `--resume auto` does that when a checkpoint exists and starts the run otherwise, so one
  command serves the first launch and every requeue (Slurm, torchrun --max-restarts).
- A fresh start into a directory that holds another run (a checkpoint, metrics.jsonl or a
  final model) is refused with how to continue it (`--resume latest|auto`) or replace it
  (`run.overwrite=true`, which deletes that run's files, and only those). `--resume auto`
  with leftovers but no checkpoint (a run killed before its first checkpoint) starts over.
- Each run has an id, kept in every checkpoint (`meta.json`); rotation (`run.keep_last`)
  deletes only the run's own checkpoints.
- At a resume the teacher must be the run's (teacher.json: path, name, size, digest) and the
  resolved config (config.yaml) may differ only in keys that cannot change what the remaining
  steps compute (`RESUME_MUTABLE`; `run.max_steps` / `run.epochs` too when the lr schedule
  does not depend on the run's length). Anything else is refused, naming the key.
"""

from __future__ import annotations

import json
import shutil
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from dlip.config import RESOLVED_NAME, to_plain

TEACHER_FILE = "teacher.json"
# What a run writes into its run_dir (removed by run.overwrite=true, nothing else is).
RUN_FILES = ("checkpoints", "metrics.jsonl", "final", "best", "best.json", TEACHER_FILE,
             RESOLVED_NAME, "tensorboard", "wandb", "train.log", "test")  # fmt: skip
# Keys a resume may change: logging, checkpoint cadence, loader workers, evaluation batching.
RESUME_MUTABLE = frozenset({
    "run.log_every", "run.ckpt_every", "run.keep_last", "run.overwrite", "data.num_workers",
    "eval.batch_size", "eval.itm_batch", "run.report_to", "run.wandb_project",
})  # fmt: skip
# Keys that set the run's length: free to change unless the lr schedule depends on it.
RUN_LENGTH = frozenset({"run.max_steps", "run.epochs"})


class RunDirError(ValueError):
    """The run directory does not fit the command: another run, or a resume that cannot be
    exact. The message says how to proceed."""


def new_run_id() -> str:
    return uuid.uuid4().hex[:12]


def holds_a_run(run_dir: Path) -> list[str]:
    """The files of a run found in `run_dir` (empty: nothing to lose)."""
    marks = ("checkpoints", "metrics.jsonl", "final", "best")
    return [name for name in marks if (run_dir / name).exists()]


def resolve_resume(run_dir: Path, resume: str | None, overwrite: bool, latest: Path | None):
    """The effective mode: "latest" (resume `latest`) or None (start). Raises RunDirError when
    a fresh start would mix with another run, or `--resume latest` has nothing to resume."""
    if resume not in (None, "latest", "auto"):
        raise ValueError(f"--resume {resume!r}: use 'latest' or 'auto'")
    if resume == "auto":
        return "latest" if latest is not None else None
    if resume == "latest":
        if latest is None:
            raise FileNotFoundError(
                f"--resume latest: no checkpoint under {run_dir}/checkpoints "
                "(--resume auto starts the run when there is none)"
            )
        return "latest"
    found = holds_a_run(run_dir)
    if found and not overwrite:
        raise RunDirError(
            f"{run_dir} holds another run ({', '.join(found)}); continue it with --resume "
            "latest (or --resume auto), replace it with run.overwrite=true, or choose another "
            "run_dir"
        )
    return None


def clear_run(run_dir: Path) -> None:
    """Delete a previous run's files from `run_dir` (rank 0 only; nothing else is touched)."""
    for name in RUN_FILES:
        path = run_dir / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


def check_teacher(run_dir: Path, identity: Mapping[str, Any]) -> None:
    """Refuse a resume whose teacher is not the run's: the same weights (SHA-256, size, name;
    the directory may have moved) or, for records without a digest, the same path."""
    path = run_dir / TEACHER_FILE
    if not path.is_file():
        return
    saved = json.loads(path.read_text())
    keys = ["name", "weights_bytes", "weights_sha256"]
    if not ("weights_sha256" in saved and "weights_sha256" in identity):
        keys = ["checkpoint", "name", "weights_bytes"]
    for key in keys:
        if saved.get(key) != identity.get(key):
            raise RunDirError(
                f"--resume: the teacher differs from this run's ({key}: was {saved.get(key)!r}, "
                f"now {identity.get(key)!r}); resume with the run's teacher, or start a new "
                "run_dir"
            )


def check_config(run_dir: Path, cfg: Any) -> None:
    """Refuse a resume whose config changes a key that breaks exactness, naming it."""
    path = run_dir / RESOLVED_NAME
    if not path.is_file():
        return
    old = _flatten(yaml.safe_load(path.read_text()) or {})
    new = _flatten(to_plain(cfg))
    default = _flatten(to_plain(type(cfg)()))
    allowed = set(RESUME_MUTABLE)
    if cfg.optim.schedule == "step":  # lr by epoch: the run's length does not enter it
        allowed |= RUN_LENGTH

    # A key added since the run started counts as its default; a field the code no longer has
    # does not act. Entries of mapping fields (loss.kd.weights.*) are compared one by one.
    def known(key: str) -> bool:
        return key in default or any(key.startswith(f"{d}.") for d in default)

    keys = [k for k in old.keys() | new.keys() if known(k)]
    changed = sorted(k for k in keys if old.get(k, default.get(k)) != new.get(k, default.get(k)))
    bad = [k for k in changed if k not in allowed]
    if bad:
        was, now = (lambda k: old.get(k, default.get(k))), (lambda k: new.get(k, default.get(k)))
        details = "; ".join(f"{k}: was {was(k)!r}, now {now(k)!r}" for k in bad)
        raise RunDirError(
            f"--resume: {details}. A resumed run must keep these (they change what the "
            f"remaining steps compute); restore them, or start a new run_dir"
        )


def _flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, Mapping) and value:
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


# ------------------------------------------------------------------------------- the run lock
LOCK_FILE = ".lock"


class RunLock:
    """An exclusive lock on `run_dir` for a run's life (rank 0 holds it): a second run into the
    same directory is refused, naming the holder, instead of the two deleting each other's
    checkpoints. `flock` is released by the kernel when the holder dies (SIGKILL included), so
    a killed run never leaves a stale lock; on network file systems without `flock` support
    the lock may not reach other nodes (the requeue of one job is the usual case, and is
    fine)."""

    def __init__(self, run_dir: Path) -> None:
        self.path = run_dir / LOCK_FILE
        self._fd: int | None = None

    def acquire(self) -> None:
        """Take the lock or raise RunDirError naming who holds it."""
        import fcntl
        import os
        import socket
        import sys
        import time

        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            holder = self.path.read_text(errors="replace").strip() or "another process"
            raise RunDirError(
                f"{self.path.parent} is in use by a running dlip run ({holder}); wait for it "
                "to end, stop it, or choose another run_dir"
            ) from None
        me = f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%F %T')}: "
        os.ftruncate(fd, 0)
        os.write(fd, (me + " ".join(sys.argv)[:500] + "\n").encode())
        self._fd = fd

    def release(self) -> None:
        import os

        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor releases the flock
            self._fd = None
