"""Fixtures shared by several test files."""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import pytest
import torch

import dlip
from dlip.models.config import ModelConfig
from dlip.models.presets import get_config


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a test module (`pytestmark = pytest.mark.usefixtures(...)`):
    more only cost time at tiny sizes and thrash on a loaded 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def benchmark_script() -> Callable[[str], ModuleType]:
    """Import a script of benchmarks/ (not a package) by name: `benchmark_script("report")`."""
    root = Path(__file__).resolve().parents[1] / "benchmarks"

    def load(name: str) -> ModuleType:
        spec = importlib.util.spec_from_file_location(f"benchmarks_{name}", root / f"{name}.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module

    return load


@pytest.fixture(scope="session")
def teacher_dir(tmp_path_factory):
    """A teacher a little wider and deeper than test_tiny, saved as a dlip model."""
    data = get_config("test_tiny").to_dict()
    data["vision"].update(width=64, depth=3, num_heads=4)
    data["text"].update(hidden_size=64, num_layers=3, num_heads=4, intermediate_size=128)
    torch.manual_seed(1)
    teacher = dlip.BLIP(ModelConfig.from_dict(data))
    return dlip.save(teacher, tmp_path_factory.mktemp("teacher") / "model")
