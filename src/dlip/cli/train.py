"""`dlip pretrain` and `dlip finetune`: run configs from a yaml diff and key=value overrides.

    dlip pretrain --config configs/pretrain/tiny_synth.yaml run_dir=runs/s [--resume latest]
    dlip finetune retrieval|caption|vqa --config YAML model.checkpoint=DIR [--resume latest]
    torchrun --nproc_per_node=N -m dlip pretrain ...   (the same arguments, DDP)

`pretrain_main(argv)` / `finetune_main(argv)` run a command from an argument list and let
errors raise (tests and scripts call them; `dlip` itself prints errors and returns 2).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any

from dlip.cli.common import parse_args


def _run_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default=None, help="run yaml (differences from the defaults)")
    from dlip.cli.completion import config_key_completer

    keys = p.add_argument("overrides", nargs="*", help="key=value, e.g. run_dir=DIR optim.lr=1e-4")
    keys.completer = config_key_completer  # type: ignore[attr-defined]
    p.add_argument(
        "--resume",
        choices=["latest", "auto"],
        default=None,
        help="latest: continue run_dir's run; auto: continue it if it has a checkpoint, else "
        "start (one command for the first launch and every requeue)",
    )
    p.add_argument(
        "--print-config",
        action="store_true",
        help="print the resolved config (every key with its type, default and meaning) as "
        "YAML that runs as given (--config FILE), and exit",
    )


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("pretrain", help="distillation pretraining (one process or torchrun)")
    _run_arguments(p)
    p.set_defaults(func=cmd_pretrain)

    p = sub.add_parser("finetune", help="finetune for retrieval, captioning or VQA (torchrun too)")
    p.add_argument("task", choices=["retrieval", "caption", "vqa"])
    _run_arguments(p)
    p.add_argument("--no-test", action="store_true", help="skip the final data.test eval")
    p.set_defaults(func=cmd_finetune)


def cmd_pretrain(args: argparse.Namespace) -> int:
    from dlip.distributed import close_process_group
    from dlip.train.config import load
    from dlip.train.pretrain import pretrain

    if args.print_config:
        return _print_config(load(args.config, args.overrides, validate=False), "dlip pretrain")
    pretrain(load(args.config, args.overrides), resume=args.resume)
    close_process_group()
    return 0


def cmd_finetune(args: argparse.Namespace) -> int:
    from dlip.distributed import close_process_group
    from dlip.train.finetune import finetune, load_config

    if args.print_config:
        cfg = load_config(args.task, args.config, args.overrides, validate=False)
        return _print_config(cfg, f"dlip finetune {args.task}")
    cfg = load_config(args.task, args.config, args.overrides)
    finetune(cfg, resume=args.resume, test=not args.no_test)
    close_process_group()
    return 0


def _print_config(cfg: Any, command: str) -> int:
    """Print the annotated config; one that would not run yet says why in its header."""
    from dlip.config import ConfigError
    from dlip.config_doc import annotated_yaml

    header = (
        f"{command}: the resolved config (defaults <- --config <- key=value overrides).\n"
        f"Each key: value  # type; default; meaning. Runs as given: {command} --config FILE"
    )
    try:
        cfg.validate()
    except ConfigError as err:
        header += f"\nNOT RUNNABLE YET: {err}"
    print(annotated_yaml(cfg, header), end="")
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dlip")
    register(parser.add_subparsers(dest="command", required=True))
    return parser


def pretrain_main(argv: Sequence[str] | None = None) -> int:
    """`dlip pretrain ARGS` as a function; errors raise."""
    return cmd_pretrain(parse_args(_parser(), ["pretrain", *(argv or [])]))


def finetune_main(argv: Sequence[str] | None = None) -> int:
    """`dlip finetune TASK ARGS` as a function; errors raise."""
    return cmd_finetune(parse_args(_parser(), ["finetune", *(argv or [])]))
