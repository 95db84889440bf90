"""`dlip bench size|latency|all`: run the benchmarks and write their JSON records."""

from __future__ import annotations

import argparse
from pathlib import Path


def write_record(record: dict, path: Path) -> Path:
    from dlip.fileio import write_json

    write_json(path, record)
    print(f"wrote {path}")
    return path


def _models(spec: str) -> list[str]:
    from dlip.models.presets import list_presets

    names = [n.strip() for n in spec.split(",") if n.strip()]
    unknown = [n for n in names if n not in list_presets()]
    if not names or unknown:
        raise ValueError(
            f"--models: unknown preset(s) {unknown or spec!r}; see dlip.list_presets()"
        )
    return names


def cmd_bench(args: argparse.Namespace) -> int:
    out_dir = Path(args.out_dir)
    if args.what in ("size", "all"):
        from dlip.benchmarks.size import run_size, summary

        record = run_size()
        print(summary(record))
        write_record(record, out_dir / "model_size.json")
    if args.what in ("latency", "all"):
        from dlip.benchmarks.latency import run_latency

        record = run_latency(
            _models(args.models),
            device=args.device,
            image_size=args.image_size,
            threads=args.threads,
            warmup=args.warmup,
            repeats=args.repeats,
            teacher=args.teacher,
        )
        for model, ratios in record["speedup_vs_teacher"].items():
            print(
                f"{model} vs {args.teacher}: "
                + ", ".join(f"{k} {v:.2f}x" for k, v in ratios.items())
            )
        write_record(record, out_dir / f"latency_{record['device']}.json")
    return 0
