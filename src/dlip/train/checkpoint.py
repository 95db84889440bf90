"""Training checkpoints: `run_dir/checkpoints/step_N/` with `model.safetensors` + `trainer.pt`.

`model.safetensors` holds the trainable module's weights (tied tensors once, under their
canonical names, as `dlip.models.io` stores models); load them back with
`dlip.models.io.load_strict`. `trainer.pt` holds everything else needed to resume exactly:
optimizer, the fp16 loss scaler's state (empty at other precisions), step, epoch, data
position, the best validation record, every rank's RNG states (`capture_rng_all_ranks`); there
is no scheduler state (the lr is a function of the step). It is read with
`torch.load(weights_only=True)`, so it may contain only tensors and plain containers (dict,
list, tuple, str, int, float, bool, None); `save_checkpoint` checks that before writing.

Integrity: `meta.json` names the run and records the SHA-256 of both files; a resume checks
them (`find_latest_sound`) and passes over a corrupted or unloadable checkpoint to the newest
sound one.

Atomicity: a checkpoint is written into a temp directory next to its final place (`.tmp-...`),
every file and the directory fsynced, then renamed to `step_N` in one `os.rename`. A crash at
any point leaves either no `step_N` or a complete one, and the previous checkpoints untouched;
`find_latest` ignores temp directories and the next save removes leftovers. Only rank 0 writes;
when a process group exists every rank waits at a barrier until the checkpoint is complete.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn

from dlip.distributed import is_dist, is_main_process
from dlip.models.io import WEIGHTS_FILE, unique_state_dict

CHECKPOINTS_DIR = "checkpoints"
TRAINER_FILE = "trainer.pt"
TMP_PREFIX = ".tmp-"
META_FILE = "meta.json"  # {"run_id", "step"}: which run wrote the checkpoint
_STEP_RE = re.compile(r"^step_(\d+)$")
_PLAIN = (str, int, float, bool, type(None), torch.dtype, torch.device, torch.Size)


def step_dir(run_dir: str | Path, step: int) -> Path:
    return Path(run_dir) / CHECKPOINTS_DIR / f"step_{step}"


def _complete_steps(run_dir: str | Path) -> list[tuple[int, Path]]:
    """(step, dir) of every complete checkpoint, ascending; temp and partial dirs ignored."""
    root = Path(run_dir) / CHECKPOINTS_DIR
    if not root.is_dir():
        return []
    out = []
    for d in root.iterdir():
        m = _STEP_RE.match(d.name)
        if m and d.is_dir() and (d / WEIGHTS_FILE).is_file() and (d / TRAINER_FILE).is_file():
            out.append((int(m.group(1)), d))
    return sorted(out)


def find_latest(run_dir: str | Path) -> Path | None:
    """The complete checkpoint with the highest step under `run_dir/checkpoints`, or None."""
    steps = _complete_steps(run_dir)
    return steps[-1][1] if steps else None


def _check_plain(obj: Any, where: str) -> None:
    """Raise naming the first value `torch.load(weights_only=True)` would refuse."""
    if isinstance(obj, (Tensor, *_PLAIN)):
        return
    if isinstance(obj, Mapping):
        for k, v in obj.items():
            if not isinstance(k, str | int):
                raise TypeError(f"trainer state key {where}[{k!r}] is a {type(k).__name__}")
            _check_plain(v, f"{where}[{k!r}]")
        return
    if isinstance(obj, list | tuple):
        for i, v in enumerate(obj):
            _check_plain(v, f"{where}[{i}]")
        return
    raise TypeError(
        f"trainer state {where} is a {type(obj).__module__}.{type(obj).__name__}; "
        "store only tensors and plain containers (weights_only loading refuses anything else)"
    )


def _model_tensors(model: nn.Module | Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Weights to store: a module's unique state dict, or a given state dict, CPU, unshared."""
    state = unique_state_dict(model) if isinstance(model, nn.Module) else dict(model)
    out: dict[str, Tensor] = {}
    storages: set[int] = set()
    for name, t in state.items():
        t = t.detach().to("cpu").contiguous()
        ptr = t.untyped_storage().data_ptr()
        if ptr in storages and t.numel() > 0:  # safetensors refuses tensors sharing memory
            t = t.clone()
        storages.add(t.untyped_storage().data_ptr())
        out[name] = t
    return out


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _clean_temp(root: Path) -> None:
    for d in root.glob(TMP_PREFIX + "*"):
        shutil.rmtree(d, ignore_errors=True)


def save_checkpoint(
    run_dir: str | Path,
    step: int,
    state: Mapping[str, Any],
    keep_last: int | None = 3,
    run_id: str | None = None,
) -> Path:
    """Write `run_dir/checkpoints/step_{step}/` atomically; returns its path on every rank.

    `state["model"]` (an `nn.Module`, or a state dict) goes to `model.safetensors`; every other
    entry goes to `trainer.pt`, together with `step`; `meta.json` names the run. Afterwards all
    but the newest `keep_last` complete checkpoints of the same run are deleted (`None` keeps
    all; another run's are never touched). Saving a step that already exists replaces it.
    """
    if "model" not in state:
        raise KeyError("save_checkpoint needs state['model'] (the trainable module's weights)")
    if keep_last is not None and keep_last < 1:
        raise ValueError(f"keep_last must be >= 1 or None, got {keep_last}")
    final = step_dir(run_dir, step)
    if is_main_process():
        _write(final, step, state, run_id)
        if keep_last is not None:
            own = [d for _, d in _complete_steps(run_dir) if read_run_id(d) == run_id]
            for old in own[:-keep_last]:
                shutil.rmtree(old, ignore_errors=True)
    if is_dist():
        dist.barrier()
    return final


def file_sha256(path: Path) -> str:
    import hashlib

    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 23), b""):
            digest.update(block)
    return digest.hexdigest()


def checkpoint_problem(checkpoint: Path) -> str | None:
    """Why `checkpoint` cannot be resumed from (a file whose SHA-256 differs from the one
    recorded when it was written, or that does not load), or None when it is sound.
    Checkpoints written before digests were recorded are checked by loading only."""
    meta = checkpoint / META_FILE
    recorded = json.loads(meta.read_text()).get("sha256", {}) if meta.is_file() else {}
    for name, digest in recorded.items():
        if file_sha256(checkpoint / name) != digest:
            return f"{name} does not match its SHA-256 (corrupted after it was written)"
    try:
        load_checkpoint(checkpoint)
    except Exception as err:  # any unreadable file: try the previous checkpoint
        return f"cannot be loaded ({type(err).__name__}: {err})"
    return None


def find_latest_sound(run_dir: str | Path) -> tuple[Path | None, list[str]]:
    """The newest complete checkpoint that passes `checkpoint_problem`, and a line per newer
    one passed over (with its problem)."""
    passed_over = []
    for _, path in reversed(_complete_steps(run_dir)):
        problem = checkpoint_problem(path)
        if problem is None:
            return path, passed_over
        passed_over.append(f"{path.name}: {problem}")
    return None, passed_over


def read_run_id(checkpoint: Path) -> str | None:
    """The id of the run that wrote `checkpoint` (None for checkpoints without meta.json)."""
    meta = checkpoint / META_FILE
    return json.loads(meta.read_text()).get("run_id") if meta.is_file() else None


def _write(final: Path, step: int, state: Mapping[str, Any], run_id: str | None) -> None:
    from safetensors.torch import save_file

    trainer = {k: v for k, v in state.items() if k != "model"}
    if trainer.setdefault("step", step) != step:
        raise ValueError(f"state['step']={trainer['step']} but saving step {step}")
    _check_plain(trainer, "state")
    root = final.parent
    root.mkdir(parents=True, exist_ok=True)
    _clean_temp(root)  # leftovers of a save killed earlier
    tmp = root / f"{TMP_PREFIX}{final.name}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        save_file(
            _model_tensors(state["model"]), str(tmp / WEIGHTS_FILE), metadata={"format": "pt"}
        )
        torch.save(trainer, tmp / TRAINER_FILE)
        digests = {f: file_sha256(tmp / f) for f in (WEIGHTS_FILE, TRAINER_FILE)}
        meta = {"run_id": run_id, "step": step, "sha256": digests}
        (tmp / META_FILE).write_text(json.dumps(meta) + "\n")
        for f in (tmp / WEIGHTS_FILE, tmp / TRAINER_FILE, tmp / META_FILE):
            _fsync(f)
        _fsync(tmp)
        old = None
        if final.exists():  # rename cannot replace a non-empty directory: move it aside first
            old = root / f"{TMP_PREFIX}old-{final.name}-{uuid.uuid4().hex[:8]}"
            os.rename(final, old)
        os.rename(tmp, final)
        _fsync(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def load_checkpoint(path: str | Path) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """(model_state, trainer_state) of a `step_N` directory, on CPU.

    Load `model_state` with `dlip.models.io.load_strict(module, model_state, str(path))` (it
    restores tied names); `trainer_state` is read with `weights_only=True`.
    """
    from dlip.fileio import load_safetensors

    path = Path(path)
    for f in (WEIGHTS_FILE, TRAINER_FILE):
        if not (path / f).is_file():
            raise FileNotFoundError(f"{path / f} not found: not a complete checkpoint directory")
    model_state = load_safetensors(path / WEIGHTS_FILE)
    trainer_state = torch.load(path / TRAINER_FILE, map_location="cpu", weights_only=True)
    return model_state, trainer_state


def capture_rng() -> dict[str, Any]:
    """Python, numpy, torch CPU (and CUDA, when available) RNG states as weights_only-safe data."""
    version, internal, gauss_next = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": [version, list(internal), gauss_next],
        "numpy": [name, keys.tolist(), int(pos), int(has_gauss), float(cached)],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def capture_rng_all_ranks() -> list[dict[str, Any]]:
    """Every rank's `capture_rng()`, indexed by rank (call on every rank; one entry without a
    process group), so a multi-process resume continues each rank's own random draws."""
    state = capture_rng()
    if not is_dist():
        return [state]
    states: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(states, state)
    return states


def rng_of_rank(saved: Any, rank: int, world: int) -> Mapping[str, Any]:
    """This rank's saved RNG state: its own entry of a per-rank list of the same world size,
    else rank 0's (a checkpoint of another world size, or of the older one-state format)."""
    if isinstance(saved, list):
        return saved[rank] if len(saved) == world else saved[0]
    return saved


def restore_rng(state: Mapping[str, Any]) -> None:
    """Inverse of `capture_rng`; CUDA states are restored only when the device count matches."""
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda")
    if cuda is not None and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
