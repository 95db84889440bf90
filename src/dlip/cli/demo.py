"""`dlip demo`: distil a teacher into a student on synthetic data, finetune, evaluate, report.

dlip demo [--out runs/demo] [--quick] [--fresh] [--threads N] [--seed S]
"""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo", help="distil a teacher into a student on synthetic data, evaluate, report (CPU)"
    )
    p.add_argument("--out", default="runs/demo", help="run folder (default: runs/demo)")
    p.add_argument("--quick", action="store_true", help="a ~1-minute run with tiny budgets")
    p.add_argument("--fresh", action="store_true", help="delete an earlier run in --out first")
    p.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)"
    )
    p.add_argument(
        "--seed", type=int, default=0,
        help="seed of the synthetic data and of every training run (default: 0)",
    )  # fmt: skip
    p.set_defaults(func=cmd_demo)


def cmd_demo(args: argparse.Namespace) -> int:
    from dlip.demo import run_demo

    run_demo(args.out, quick=args.quick, fresh=args.fresh, threads=args.threads, seed=args.seed)
    return 0
