"""Run logging: `metrics.jsonl`, optional tensorboard, throughput/ETA, the progress bar, and the
cross-rank reduction of loss terms.

`metrics.jsonl` has one JSON object per logged step (`step`, `loss`, every loss term under its
own key, `lr`, `samples_per_s`, `epoch`, and `time`, the wall clock in seconds since the epoch),
flushed at every write. A resumed run truncates the file to the lines with `step <=` the
resumed step, so the file never holds a step twice and reads as one uninterrupted run.
Only rank 0 writes. The same records go to the loggers of `run.report_to` (tensorboard, wandb:
`dlip.train.reporters`) and, as one line each, to run_dir/train.log when a console copy runs.
"""

from __future__ import annotations

import json
import math
import time
from collections import deque
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from dlip.data.common import REASONS
from dlip.distributed import get_world_size, is_dist, is_main_process
from dlip.fileio import atomic_write_text

METRICS_FILE = "metrics.jsonl"


def _scalar(value: Any) -> Any:
    if isinstance(value, Tensor):
        return value.item()
    return value


def truncate_metrics(path: str | Path, last_step: int) -> int:
    """Keep the lines of `path` with `step <= last_step` (and no broken last line); returns the
    number kept. The file is rewritten atomically; a missing file is left missing."""
    path = Path(path)
    if not path.is_file():
        return 0
    kept = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # a write cut by a kill: only ever the last line
            continue
        if isinstance(record, dict) and record.get("step", math.inf) <= last_step:
            kept.append(line)
    atomic_write_text(path, "".join(line + "\n" for line in kept))
    return len(kept)


class MetricsLogger:
    """Append one JSON line per `log(step, metrics)` to `run_dir/metrics.jsonl` and pass the
    record to the `report_to` loggers (and a line to `console`'s train.log).

    `resume_step=None` starts a new file (a fresh run); `resume_step=N` keeps the lines of
    steps <= N and appends after them. Disabled (every call a no-op) off rank 0 by default.
    `run_id` and `config` name the wandb run and hold its config.
    """

    def __init__(
        self,
        run_dir: str | Path,
        enabled: bool | None = None,
        resume_step: int | None = None,
        report_to: Sequence[str] = ("jsonl",),
        run_id: str | None = None,
        config: Mapping[str, Any] | None = None,
        wandb_project: str = "dlip",
        console: Any = None,
    ) -> None:
        from dlip.train.reporters import TensorboardReporter, WandbReporter, check_report_to

        self.enabled = is_main_process() if enabled is None else enabled
        self.path = Path(run_dir) / METRICS_FILE
        self._file = None
        self.reporters: list[Any] = []
        self.console = console
        if not self.enabled:
            return
        check_report_to(report_to)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is None:
            self.path.write_text("")
        else:
            truncate_metrics(self.path, resume_step)
        self._file = self.path.open("a")
        if "tensorboard" in report_to:
            self.reporters.append(TensorboardReporter(Path(run_dir), resume_step))
        if "wandb" in report_to:
            self.reporters.append(WandbReporter(Path(run_dir), run_id, wandb_project, config or {}))

    def log(self, step: int, metrics: Mapping[str, Any]) -> dict[str, Any] | None:
        """Write `{"step": step, **metrics, "time": now}`; tensors become Python numbers."""
        if not self.enabled or self._file is None:
            return None
        record = {"step": int(step), **{k: _scalar(v) for k, v in metrics.items()}}
        record.setdefault("time", time.time())
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        for reporter in self.reporters:
            reporter.log(int(step), record)
        if self.console is not None:
            from dlip.progress import shown

            if shown():  # the bar is on the terminal: the line goes to train.log only
                self.console.line(console_line(record))
            else:  # no bar (a log file, a pipe): the console gets it, train.log by the copy
                print(console_line(record), flush=True)
        return record

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        for reporter in self.reporters:
            reporter.close()
        self.reporters = []

    def __enter__(self) -> MetricsLogger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def console_line(record: Mapping[str, Any]) -> str:
    """One metrics record as train.log's line: `step 50 | loss 3.21 | lr 0.0001 | ...`, and
    the sample captions below it."""
    cells = [f"step {record['step']}"]
    for key, value in record.items():
        if key in ("step", "time", "val_samples"):
            continue
        cells.append(f"{key} {value:.4g}" if isinstance(value, float) else f"{key} {value}")
    lines = [" | ".join(cells)]
    for s in record.get("val_samples") or []:
        lines.append(f"  {s['image']}: {s['caption']!r} (reference: {s['reference']!r})")
    return "\n".join(lines)


class Throughput:
    """Samples/s and steps/s over the last `window` steps, and the ETA of the remaining steps.

    Call `tick(samples)` after each optimizer step with the samples it consumed (global batch).
    `now` is injectable for tests; it defaults to `time.perf_counter()`.
    """

    def __init__(self, window: int = 20) -> None:
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        self._marks: deque[tuple[float, int]] = deque(maxlen=window + 1)

    def start(self, now: float | None = None) -> None:
        """Mark the start time (before the first step), so the first tick already has a rate."""
        self._marks.clear()
        self._marks.append((time.perf_counter() if now is None else now, 0))

    def tick(self, samples: int, now: float | None = None) -> None:
        self._marks.append((time.perf_counter() if now is None else now, samples))

    def _span(self) -> tuple[float, int, int] | None:
        if len(self._marks) < 2:
            return None
        dt = self._marks[-1][0] - self._marks[0][0]
        if dt <= 0:
            return None
        samples = sum(s for _, s in list(self._marks)[1:])
        return dt, samples, len(self._marks) - 1

    @property
    def samples_per_s(self) -> float:
        span = self._span()
        return 0.0 if span is None else span[1] / span[0]

    @property
    def steps_per_s(self) -> float:
        span = self._span()
        return 0.0 if span is None else span[2] / span[0]

    def eta_s(self, remaining_steps: int) -> float:
        """Seconds left for `remaining_steps` at the current rate (inf before any rate)."""
        rate = self.steps_per_s
        return math.inf if rate == 0 else max(0, remaining_steps) / rate


def format_eta(seconds: float) -> str:
    """`H:MM:SS` (or `?` when unknown)."""
    if not math.isfinite(seconds):
        return "?"
    s = round(seconds)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def progress_bar(total: int, initial: int = 0, enabled: bool | None = None, desc: str = "train"):
    """A tqdm bar over optimizer steps, drawn where `dlip.progress.shown()` (rank 0, stderr a
    terminal); update its postfix with `bar.set_postfix(progress_postfix(...))`."""
    from tqdm.auto import tqdm

    from dlip.progress import shown

    enabled = shown() if enabled is None else enabled
    return tqdm(
        total=total, initial=initial, desc=desc, unit="step", dynamic_ncols=True,
        disable=not enabled,
    )  # fmt: skip


def progress_postfix(
    loss: float,
    throughput: Throughput,
    remaining_steps: int,
    skipped: Mapping[str, int] | None = None,
) -> dict[str, str]:
    """The progress line's fields; `skipped` (samples by reason, all ranks) shows as
    `12 (missing_file 9, too_large 3)`, the most frequent reasons first."""
    out = {
        "loss": f"{loss:.4f}",
        "samples/s": f"{throughput.samples_per_s:.1f}",
        "eta": format_eta(throughput.eta_s(remaining_steps)),
    }
    if skipped:
        top = sorted(skipped.items(), key=lambda kv: (-kv[1], kv[0]))
        out["skipped"] = f"{sum(skipped.values())} ({', '.join(f'{k} {n}' for k, n in top)})"
    return out


SKIP_KEYS = (*REASONS, "unknown")  # what a batch's `skipped` counter may hold


def skip_totals(local: Mapping[str, int], device: torch.device) -> dict[str, int]:
    """Skipped samples by reason over every rank (call on every rank at the same step)."""
    counts = torch.tensor([int(local.get(k, 0)) for k in SKIP_KEYS], device=device)
    if is_dist():
        torch.distributed.all_reduce(counts)
    return {k: int(n) for k, n in zip(SKIP_KEYS, counts.tolist(), strict=True) if n}


def skip_metrics(totals: Mapping[str, int]) -> dict[str, int]:
    """metrics.jsonl fields: `skipped` (all reasons) and `skipped_<reason>` since step 1."""
    return {"skipped": sum(totals.values()), **{f"skipped_{k}": v for k, v in totals.items()}}


def reduce_terms(terms: Mapping[str, Tensor | float]) -> dict[str, float]:
    """Mean of each scalar term over ranks, as Python floats (the values themselves in one
    process). One all-reduce for all terms; every rank must pass the same keys. A NaN on any
    rank makes the mean NaN on every rank, so all ranks stop together."""
    if not is_dist():
        return {k: float(_scalar(v)) for k, v in terms.items()}
    keys = list(terms)
    device = next((v.device for v in terms.values() if isinstance(v, Tensor)), torch.device("cpu"))
    if dist.get_backend() == "nccl" and device.type != "cuda":
        device = torch.device("cuda", torch.cuda.current_device())
    vec = torch.stack(
        [torch.as_tensor(_scalar(terms[k]), dtype=torch.float64).to(device) for k in keys]
    )  # fmt: skip
    dist.all_reduce(vec, op=dist.ReduceOp.SUM)
    vec = vec / get_world_size()
    return dict(zip(keys, vec.tolist(), strict=True))


def nonfinite_terms(terms: Mapping[str, Tensor | float]) -> list[str]:
    """Names of the terms whose value is NaN or +-inf, in the given order."""
    return [k for k, v in terms.items() if not math.isfinite(float(_scalar(v)))]
