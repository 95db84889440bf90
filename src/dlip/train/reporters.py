"""Where a run's records go besides metrics.jsonl (`run.report_to`), and the run's train.log.

`run.report_to` lists `jsonl` (always on), `tensorboard` (run_dir/tensorboard) and `wandb`
(Weights & Biases; `WANDB_MODE=offline` writes run_dir/wandb/offline-run-* without a network,
`wandb sync` uploads it later). A listed logger whose package does not import is a config
error (the config is checked before anything is built). A resumed run continues the same
wandb run (its id is the run's id).

Records are `metrics.jsonl` rows: numbers become scalars; `val_samples` (a few captions with
their references, logged at each caption validation) becomes a text table.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TextIO

from dlip.config import ConfigError

REPORTERS = ("jsonl", "tensorboard", "wandb")
CONSOLE_LOG = "train.log"
_INSTALL = {"tensorboard": "pip install 'dlip[train]'", "wandb": "pip install 'dlip[log]'"}


def check_report_to(report_to: Sequence[str]) -> None:
    """Each listed logger's package imports (the run config's validation calls it)."""
    for name in report_to:
        try:
            if name == "tensorboard":
                from torch.utils.tensorboard import SummaryWriter  # noqa: F401
            elif name == "wandb":
                import wandb  # noqa: F401
        except ImportError as err:
            raise ConfigError(
                f"run.report_to lists {name}, which does not import ({err}): "
                f"{_INSTALL[name]}, or drop it from run.report_to"
            ) from err


def _numbers(record: Mapping[str, Any]) -> dict[str, float]:
    return {
        k: v
        for k, v in record.items()
        if k not in ("step", "time") and isinstance(v, int | float) and not isinstance(v, bool)
    }


def samples_markdown(samples: Sequence[Mapping[str, str]]) -> str:
    """`val_samples` rows -> a markdown table (image, caption, a reference)."""
    rows = ["| image | caption | reference |", "|---|---|---|"]
    rows += [f"| {s['image']} | {s['caption']} | {s['reference']} |" for s in samples]
    return "\n".join(rows)


class TensorboardReporter:
    """Scalars and the sample captions as text, in run_dir/tensorboard (resumed: events after
    the resumed step are purged, like metrics.jsonl's lines)."""

    def __init__(self, run_dir: Path, resume_step: int | None) -> None:
        from torch.utils.tensorboard import SummaryWriter

        purge = None if resume_step is None else resume_step + 1
        self.writer = SummaryWriter(str(run_dir / "tensorboard"), purge_step=purge)

    def log(self, step: int, record: Mapping[str, Any]) -> None:
        for key, value in _numbers(record).items():
            self.writer.add_scalar(key, value, step)
        if record.get("val_samples"):
            self.writer.add_text("val_samples", samples_markdown(record["val_samples"]), step)

    def close(self) -> None:
        self.writer.close()


class WandbReporter:
    """A wandb run in run_dir/wandb named after the run directory, with the resolved config."""

    def __init__(
        self, run_dir: Path, run_id: str | None, project: str, config: Mapping[str, Any]
    ) -> None:
        import wandb

        self.wandb = wandb
        self.run = wandb.init(
            project=project, name=run_dir.name, id=run_id, resume="allow", dir=str(run_dir),
            config=dict(config),
        )  # fmt: skip

    def log(self, step: int, record: Mapping[str, Any]) -> None:
        data: dict[str, Any] = dict(_numbers(record))
        if record.get("val_samples"):
            cols = ["image", "caption", "reference"]
            rows = [[s[c] for c in cols] for s in record["val_samples"]]
            data["val_samples"] = self.wandb.Table(columns=cols, data=rows)
        if data:
            self.run.log(data, step=step)

    def close(self) -> None:
        self.run.finish()


class ConsoleCopy:
    """Copy this process's stdout and stderr into run_dir/train.log while the run trains.

    Progress-bar redraws (writes holding a carriage return) stay on the terminal only; the log
    gets a line per metrics record instead (`line`). A resumed run appends."""

    def __init__(self, run_dir: Path, resume: bool) -> None:
        run_dir.mkdir(parents=True, exist_ok=True)
        self.file = (run_dir / CONSOLE_LOG).open("a" if resume else "w")
        self._saved: tuple[TextIO, TextIO] | None = None

    def __enter__(self) -> ConsoleCopy:
        self._saved = (sys.stdout, sys.stderr)
        sys.stdout = _Tee(sys.stdout, self.file)  # type: ignore[assignment]
        sys.stderr = _Tee(sys.stderr, self.file)  # type: ignore[assignment]
        return self

    def line(self, text: str) -> None:
        self.file.write(text.rstrip("\n") + "\n")
        self.file.flush()

    def __exit__(self, *exc: object) -> None:
        if self._saved is not None:
            sys.stdout, sys.stderr = self._saved
        self.file.close()


class _Tee:
    def __init__(self, stream: TextIO, file: TextIO) -> None:
        self.stream, self.file = stream, file

    def write(self, text: str) -> int:
        if "\r" not in text and not self.file.closed:
            self.file.write(text)
            self.file.flush()
        return self.stream.write(text)

    def flush(self) -> None:
        self.stream.flush()

    def __getattr__(self, name: str) -> Any:  # isatty, fileno, encoding, ... of the stream
        return getattr(self.stream, name)
