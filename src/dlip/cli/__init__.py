# PYTHON_ARGCOMPLETE_OK
"""`dlip` command line: the only place argparse lives. Thin: parse, then call library functions.

    dlip info MODEL [--image-size N] [--json] [--teacher blip_base]
    dlip convert SRC --from salesforce --arch blip_base --out DIR
    dlip convert SRC_DIR --from hf --out DIR
    dlip convert MODEL_DIR --to hf --out DIR
    dlip data {build,merge,export-json,shard,synth} ...
    dlip pretrain --config YAML [key=value ...] [--resume latest]
    dlip finetune retrieval|caption|vqa --config YAML [key=value ...] [--resume latest]
    dlip eval retrieval|caption|vqa --model DIR --data JSON --images ROOT --out DIR
    dlip caption|embed|itm|vqa|index build|search ...  (inference: dlip.inference.Predictor)
    dlip serve --model M [--index DIR] --port P [--host 127.0.0.1]
    dlip export onnx MODEL --out DIR [--opset N] [--image-size N] [--atol 1e-4]
    dlip demo [--quick] [--out runs/demo]
    dlip bench size|latency|all [--out-dir benchmarks/results] [--models ...] [--device cpu|cuda]
    dlip completion bash|zsh|fish   (shell completion: eval "$(dlip completion bash)")

One module per command group (models, data, train, evaluate, inference, demo, bench), each with a
`register(sub)` that adds its parsers and a `cmd_*` function per command. The modules import
only argparse and the standard library at the top; a command imports its library code when it
runs, so `dlip ... --help` never pays for torch. Every command's help ends with examples
(`cli.examples`); completion is argcomplete's, with config keys for `key=value` overrides.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from dlip.cli import bench, completion, data, demo, evaluate, inference, models, train
from dlip.cli.common import add_no_progress, parse_args
from dlip.cli.examples import add_examples

GROUPS = (models, demo, train, inference, data, evaluate, bench, completion)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dlip", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for group in GROUPS:
        group.register(sub)
    add_examples(parser)
    add_no_progress(parser)
    return parser


def parse(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse the command line (`key=value` overrides may follow options)."""
    return parse_args(build_parser(), argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; a bad input (ValueError, missing file, checkpoint mismatch) prints
    `dlip CMD: error: ...` and returns 2."""
    parser = build_parser()
    completion.complete(parser)  # answers the shell and exits when it asks for completions
    args = parse_args(parser, argv)
    from dlip.progress import set_enabled

    set_enabled(not getattr(args, "no_progress", False))
    from dlip.models.io import CheckpointError

    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, CheckpointError) as err:
        print(f"dlip {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
