"""Fixtures shared by several test files."""

from __future__ import annotations

import importlib.util
import os
import socket
import subprocess
import sys
import time
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


@pytest.fixture(scope="session")
def perturbed_tiny() -> Callable[[float], dlip.BLIP]:
    """A factory: test_tiny (seed 0) in eval mode with N(0, scale) noise on every weight, so
    that every path matters (random init leaves some near zero) and inputs get different
    outputs."""

    def make(scale: float) -> dlip.BLIP:
        torch.manual_seed(0)
        model = dlip.create_model("test_tiny").eval()
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * scale)
        return model

    return make


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A saved test_tiny model (seed 0) for the inference, index and serving tests."""
    torch.manual_seed(0)
    return dlip.save(dlip.create_model("test_tiny"), tmp_path_factory.mktemp("m") / "model")


@pytest.fixture(scope="module")
def pred(model_dir):
    from dlip.inference.predictor import Predictor

    return Predictor.load(str(model_dir), device="cpu")


_ONE_THREAD_ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
_ONE_THREAD_ENV["CUDA_VISIBLE_DEVICES"] = ""


class ServeProcess:
    """`python -m dlip serve ARGS` on a free loopback port; `wait()` until /api/info answers."""

    def __init__(self, args: list[str], log: Path) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        cmd = [sys.executable, "-m", "dlip", "serve", *args, "--port", str(self.port)]
        cmd += ["--log-level", "warning"]
        with open(log, "wb") as out:
            self.proc = subprocess.Popen(
                cmd, env=_ONE_THREAD_ENV, stdout=out, stderr=subprocess.STDOUT
            )

    def wait(self, timeout: float = 120.0) -> ServeProcess:
        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited {self.proc.returncode}:\n{self.log.read_text()}")
            try:
                if httpx.get(self.url + "/api/info", timeout=2).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"server did not start in {timeout}s:\n{self.log.read_text()}")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)


@pytest.fixture(scope="session")
def serve_process() -> type[ServeProcess]:
    """The `dlip serve` subprocess launcher (tests/test_serve.py, tests/test_index_robust.py)."""
    return ServeProcess
