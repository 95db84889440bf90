"""Named architectures: one JSON per preset in dlip/configs/models (also at configs/models)."""

from __future__ import annotations

from importlib import resources
from typing import Any

from dlip.config import ConfigError
from dlip.models.config import ModelConfig

_PRESET_DIR = "configs/models"


def list_presets() -> list[str]:
    files = resources.files("dlip").joinpath(_PRESET_DIR).iterdir()
    return sorted(f.name.removesuffix(".json") for f in files if f.name.endswith(".json"))


def get_config(name: str, **changes: Any) -> ModelConfig:
    """The preset's ModelConfig; `changes` replace top-level fields (e.g. has_decoder=False)."""
    path = resources.files("dlip").joinpath(f"{_PRESET_DIR}/{name}.json")
    if not path.is_file():
        raise ConfigError(f"unknown model preset {name!r}; presets are {list_presets()}")
    config = ModelConfig.load(path)
    return config.replace(**changes) if changes else config


def create_model(name: str | ModelConfig, image_size: int | None = None, **changes: Any):
    """A randomly initialised BLIP from a preset name or a ModelConfig."""
    from dlip.models.blip import BLIP

    config = name if isinstance(name, ModelConfig) else get_config(name)
    if changes:
        config = config.replace(**changes)
    if image_size is not None:
        config = config.with_image_size(image_size)
    return BLIP(config)
