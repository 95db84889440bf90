"""Parameters and forward FLOPs of every preset at 224 and 384 px, with student/teacher ratios.

    python benchmarks/model_size.py [--out benchmarks/results/model_size.json]

Counting is exact and machine-independent (meta device, torch.utils.flop_counter); the JSON
still names the machine and versions it was produced with. What is counted: see dlip.bench.
"""

from __future__ import annotations

import argparse
import json
from datetime import datetime, timezone
from pathlib import Path

import dlip
from dlip.bench import machine, model_info

TEACHER = "blip_base"


def run(sizes: tuple[int, ...] = (224, 384)) -> dict:
    rows = []
    for size in sizes:
        teacher = model_info(dlip.get_config(TEACHER).with_image_size(size))
        for name in dlip.list_presets():
            info = model_info(dlip.get_config(name).with_image_size(size))
            info["vs_teacher"] = {
                f"{group}.{key}": round(value / teacher[group][key], 4)
                for group in ("params", "flops")
                for key, value in info[group].items()
                if teacher[group].get(key)
            }
            rows.append(info)
    return {
        "benchmark": "model_size",
        "teacher": TEACHER,
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(),
        "models": rows,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="benchmarks/results/model_size.json")
    args = parser.parse_args()
    result = run()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    for row in result["models"]:
        r, total = row["vs_teacher"], row["params"]["total"]
        print(
            f"{row['name']:<11}{row['image_size']:>4}px  params {total / 1e6:7.1f}M "
            f"({r['params.total']:6.1%})  image GFLOPs {row['flops']['image_embed'] / 1e9:7.2f} "
            f"({r['flops.image_embed']:6.1%})  ITM pair {r.get('flops.itm_pair', 0):6.1%}"
        )


if __name__ == "__main__":
    main()
