"""Progress bars for long work (evaluation, data builds, conversion, export, batch inference).

A bar is tqdm on stderr, drawn only when stderr is a terminal, on rank 0, and not switched off
(`--no-progress` of the commands, `set_enabled(False)`): a log file or a pipe gets nothing per
item, only what the command prints when it is done.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable
from typing import Any

_enabled = True


def set_enabled(enabled: bool) -> None:
    """Turn every bar of this process on or off (the CLI's `--no-progress`)."""
    global _enabled
    _enabled = enabled


def shown() -> bool:
    """Whether a bar would be drawn now: enabled, rank 0 and stderr a terminal."""
    from dlip.distributed import is_main_process

    isatty = getattr(sys.stderr, "isatty", None)
    return _enabled and is_main_process() and bool(isatty and isatty())


def bar(
    iterable: Iterable | None = None,
    total: int | None = None,
    desc: str = "",
    unit: str = "it",
    **kwargs: Any,
) -> Any:
    """A tqdm bar; a silent one where `shown()` is false or there is a single step."""
    from tqdm.auto import tqdm

    if total is None and hasattr(iterable, "__len__"):
        total = len(iterable)  # type: ignore[arg-type]
    single = total is not None and total < 2  # one step: a bar would say nothing
    return tqdm(
        iterable, total=total, desc=desc, unit=unit, disable=single or not shown(),
        dynamic_ncols=True, leave=False, **kwargs,
    )  # fmt: skip
