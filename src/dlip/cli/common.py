"""What the command modules share: parsing that lets `key=value` overrides follow options."""

from __future__ import annotations

import argparse
import math
from collections.abc import Sequence


def parse_args(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> argparse.Namespace:
    """`parser.parse_args(argv)`, except that `key=value` overrides may also follow options
    (`dlip finetune retrieval --config X optim.lr=1e-4`): argparse alone leaves those unparsed
    once the optional positional list was consumed before the option."""
    args, extra = parser.parse_known_args(argv)  # --help exits here, before torch is imported
    if extra:
        if hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extra):
            args.overrides = [*args.overrides, *extra]
        else:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return args


# Commands with long loops: their tqdm bars (dlip.progress) show on a terminal unless
# --no-progress is given.
PROGRESS_COMMANDS = (
    "convert", "caption", "embed", "index build", "export onnx", "data build img2dataset",
    "data build vg", "data build karpathy", "data build vqa", "data build flickr30k-csv",
    "data merge", "data shard", "data teacher-captions", "eval retrieval", "eval caption",
    "eval vqa",
)  # fmt: skip


def add_no_progress(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()) -> None:
    """`--no-progress` on every command of PROGRESS_COMMANDS that lacks one."""
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    for action in subs:
        for name, sub in action.choices.items():
            add_no_progress(sub, (*path, name))
    has = any("--no-progress" in a.option_strings for a in parser._actions)
    if " ".join(path) in PROGRESS_COMMANDS and not has:
        parser.add_argument(
            "--no-progress", action="store_true",
            help="no progress bar (bars only ever show when stderr is a terminal)",
        )  # fmt: skip


def positive_number(text: str) -> float:
    """argparse type: a finite number > 0 (`inf`, `nan`, 0 and negatives are refused)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be a finite number > 0")
    return value


# dlip.models.generation.BEAM_SCORINGS, spelled out so `--help` stays torch-free (a test checks)
BEAM_SCORINGS = ("blip", "hf")


def add_beam_scoring(p: argparse.ArgumentParser) -> None:
    """`--beam-scoring blip|hf`: how beam search scores finished hypotheses."""
    p.add_argument(
        "--beam-scoring",
        default="blip",
        choices=BEAM_SCORINGS,
        help="blip: transformers 4.15's rule, which BLIP's published numbers came from "
        "(default); hf: transformers 5.x's, for id parity with transformers",
    )
