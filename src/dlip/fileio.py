"""Small file helpers shared by the data, model and training code."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write `text` to `path` via a sibling temp file and a rename: a kill never leaves a half
    file (indexes, resolved configs and metrics are read back on resume)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
    return path


def write_json(path: str | Path, data: Any) -> Path:
    """`data` as indented JSON, written atomically (`atomic_write_text`)."""
    return atomic_write_text(path, json.dumps(data, indent=2) + "\n")
