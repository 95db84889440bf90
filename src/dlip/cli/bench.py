"""`dlip bench size|latency|all`: run the benchmarks (dlip.bench) and write their JSON records.

dlip bench size|latency|all [--out-dir benchmarks/results] [--models ...] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "bench",
        help="params/FLOPs per task, latency teacher vs students -> JSON records",
        description="size: params and FLOPs of the presets at 224/384 px vs blip_base. latency: "
        "one run, warm-up then medians: image embedding, ITM re-rank of k texts, 3-beam captions.",
    )
    p.add_argument("what", choices=["size", "latency", "all"])
    p.add_argument("--out-dir", default="benchmarks/results", help="where the JSON records go")
    p.add_argument(
        "--models",
        default="blip_base,dlip_base,dlip_small,dlip_tiny",
        help="latency: presets to time (size counts every preset but test_tiny)",
    )
    p.add_argument("--teacher", default="blip_base", help="latency speed-ups are against this")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N] (cuda: bf16 autocast)")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (CPU)")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--warmup", type=int, default=None, help="untimed calls per row (all rows)")
    p.add_argument("--repeats", type=int, default=None, help="timed calls per row (all rows)")
    p.add_argument(
        "--variants", default="fp32",
        help="latency: comma list of fp32, int8, onnx, onnx_int8 (CPU; each its own rows)",
    )  # fmt: skip
    p.set_defaults(func=cmd_bench)


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
        from dlip.bench.size import run_size, summary

        record = run_size()
        print(summary(record))
        write_record(record, out_dir / "model_size.json")
    if args.what in ("latency", "all"):
        from dlip.bench.latency import run_latency

        record = run_latency(
            _models(args.models),
            device=args.device,
            image_size=args.image_size,
            threads=args.threads,
            warmup=args.warmup,
            repeats=args.repeats,
            teacher=args.teacher,
            variants=[v.strip() for v in args.variants.split(",") if v.strip()],
        )
        for model, ratios in record["speedup_vs_teacher"].items():
            print(
                f"{model} vs {args.teacher}: "
                + ", ".join(f"{k} {v:.2f}x" for k, v in ratios.items())
            )
        write_record(record, out_dir / f"latency_{record['device']}.json")
    return 0
