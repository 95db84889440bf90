"""Shell completion (argcomplete): `dlip completion bash|zsh|fish` prints the hook to source;
`key=value` overrides of `dlip pretrain|finetune` complete to the config's dotted keys.

    eval "$(dlip completion bash)"        # e.g. in ~/.bashrc; zsh and fish alike

The config keys come from the config classes, which import torch (seconds); they are cached in
$XDG_CACHE_HOME/dlip (~/.cache/dlip) under a stamp of the files that define them, so only the
first completion after an upgrade pays for it.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

SHELLS = ("bash", "zsh", "fish")
# The files whose fields make the config keys: a change to one renews the cache.
_KEY_SOURCES = ("config.py", "train/config.py", "train/sections.py", "losses/adapters.py")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "completion",
        help="print the shell completion hook (bash, zsh, fish)",
        description="Print the script that makes your shell complete dlip's commands, options "
        "and config keys; source it from your shell's startup file.",
    )
    p.add_argument("shell", choices=SHELLS)
    p.set_defaults(func=cmd_completion)


def cmd_completion(args: argparse.Namespace) -> int:
    import argcomplete

    print(argcomplete.shellcode(["dlip"], shell=args.shell))
    return 0


def complete(parser: argparse.ArgumentParser) -> None:
    """When the shell asks (argcomplete's environment), print completions and exit."""
    if "_ARGCOMPLETE" not in os.environ:
        return
    import argcomplete

    argcomplete.autocomplete(parser)


def config_key_completer(prefix: str, parsed_args: argparse.Namespace, **_: Any) -> list[str]:
    """`key=` for every config key starting with `prefix` (finetune's keys when a task is
    given, pretraining's otherwise); after the `=`, nothing to suggest."""
    if "=" in prefix:
        return []
    kind = "finetune" if getattr(parsed_args, "task", None) else "pretrain"
    return [f"{key}=" for key in config_keys(kind) if key.startswith(prefix)]


def config_keys(kind: str, cache_dir: Path | None = None) -> list[str]:
    """Every dotted key of PretrainConfig ("pretrain") or FinetuneConfig ("finetune")."""
    root = Path(__file__).resolve().parent.parent
    stamp = [[s, (root / s).stat().st_mtime_ns, (root / s).stat().st_size] for s in _KEY_SOURCES]
    base = cache_dir or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "dlip"
    path = base / "config_keys.json"
    try:
        cached = json.loads(path.read_text())
        if cached["stamp"] == stamp:  # lists, as JSON reads them back
            return cached[kind]
    except (OSError, ValueError, KeyError, TypeError):
        pass
    from dlip.config import key_paths
    from dlip.train.config import ALIASES, FinetuneConfig, PretrainConfig

    keys = {
        "pretrain": key_paths(PretrainConfig) + sorted(ALIASES),
        "finetune": key_paths(FinetuneConfig) + sorted(ALIASES),
    }
    try:
        base.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"stamp": stamp, **keys}))
    except OSError:  # a read-only home: complete anyway, uncached
        pass
    return keys[kind]
