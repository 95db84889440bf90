"""`dlip data ...`: build manifests from what the real tools write, merge, shard, synthesize.

    dlip data synth --out DIR --n N [--seed S] [--image-size 64] [--overwrite]
    dlip data shard MANIFEST --out DIR [--max-side 384] [--shard-size 1000] [--workers N]

Parsers only import argparse; each command imports its library module when it runs.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def add_data_parser(sub: argparse._SubParsersAction) -> None:
    data = sub.add_parser("data", help="prepare data: manifests, shards, synthetic set")
    cmds = data.add_subparsers(dest="data_command", required=True)

    p = cmds.add_parser("synth", help="procedurally generated image-caption dataset")
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--n", required=True, type=int, help="number of images (all splits)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--overwrite", action="store_true", help="replace an earlier synth output")
    p.set_defaults(func="dlip.data.cli:cmd_synth")

    p = cmds.add_parser("shard", help="write webdataset shards from a manifest (resumable)")
    p.add_argument("manifest", type=Path)
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--max-side", type=int, default=384, help="re-encode so the longest side <= N")
    p.add_argument("--shard-size", type=int, default=1000, help="samples per shard")
    p.add_argument("--quality", type=int, default=95, help="JPEG quality")
    p.add_argument("--workers", type=int, default=0, help="encoding processes (0 = inline)")
    p.add_argument("--no-resume", action="store_true", help="start over instead of resuming")
    p.set_defaults(func="dlip.data.cli:cmd_shard")


def cmd_synth(args: argparse.Namespace) -> int:
    from dlip.data.synthetic import synthesize

    report = synthesize(
        args.out, args.n, seed=args.seed, image_size=args.image_size, overwrite=args.overwrite
    )
    print(report.summary())
    return 0


def cmd_shard(args: argparse.Namespace) -> int:
    from dlip.data.shards import write_shards

    report = write_shards(
        args.manifest,
        args.out,
        max_side=args.max_side,
        shard_size=args.shard_size,
        quality=args.quality,
        resume=not args.no_resume,
        workers=args.workers,
    )
    print(report.summary())
    if not report.complete:
        print("incomplete: run the same command again to resume")
        return 1
    return 0
