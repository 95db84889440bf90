"""dlip: distill BLIP-class vision-language models into small, fast students.

Public names resolve lazily, so `import dlip.tokenizer` does not pay for torch + timm.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "BLIP": "dlip.models.blip",
    "ModelConfig": "dlip.models.config",
    "TextConfig": "dlip.models.config",
    "VisionConfig": "dlip.models.config",
    "create_model": "dlip.models.presets",
    "get_config": "dlip.models.presets",
    "list_presets": "dlip.models.presets",
    "load": "dlip.models.io",
    "save": "dlip.models.io",
    "Tokenizer": "dlip.tokenizer",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'dlip' has no attribute {name!r}")
