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
