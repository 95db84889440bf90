"""Small helpers every layer shares: atomic file writes, and `machine()`, the hardware and
versions every measurement and results file names."""

from __future__ import annotations

import json
import os
import platform
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


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> dict[str, str]:
    """The hardware and versions a measurement was made with (every results JSON names it)."""
    import torch

    from dlip import __version__

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    return {
        "platform": platform.platform(),
        "cpu": cpu_name(),
        "cpu_count": str(os.cpu_count()),
        "torch_threads": str(torch.get_num_threads()),
        "gpu": gpu,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "dlip": __version__,
    }


def load_safetensors(path: str | Path, device: str = "cpu") -> dict[str, Any]:
    """The tensors of a .safetensors file; a missing file is FileNotFoundError and a truncated
    or corrupt one a ValueError, both naming the file (safetensors' own errors name neither
    the file nor what to do)."""
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found")
    try:
        return load_file(str(path), device=device)
    except Exception as err:  # SafetensorError, or OSError on a bad read / mmap
        raise ValueError(f"{path}: not a readable safetensors file ({err})") from None
