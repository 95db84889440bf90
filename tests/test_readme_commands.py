"""Every `dlip ...` command in the README's bash blocks parses as written, reaches a command
function, and the run configs it names load with its overrides (the commands themselves need
real data and checkpoints; the Python example runs in test_readme.py)."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from dlip.cli import parse
from dlip.train.config import FinetuneConfig, PretrainConfig, load

ROOT = Path(__file__).resolve().parents[1]


def readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    out = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.strip()
            if line.startswith("dlip "):
                out.append(line.split(" #")[0].strip())
    return out


def test_readme_shows_every_command_group():
    groups = {shlex.split(c)[1] for c in readme_commands()}
    assert {"pretrain", "finetune", "eval", "data", "convert", "serve", "export"} <= groups


@pytest.mark.parametrize("command", readme_commands())
def test_readme_command_parses_and_its_config_loads(command):
    args = parse(shlex.split(command)[1:])
    assert callable(args.func) and args.func.__module__.startswith("dlip.cli.")
    if getattr(args, "config", None):
        cls = FinetuneConfig if args.command == "finetune" else PretrainConfig
        overrides = [*args.overrides, *([f"task={args.task}"] if cls is FinetuneConfig else [])]
        cfg = load(ROOT / args.config, overrides, validate=False, cls=cls)
        assert isinstance(cfg, cls)
