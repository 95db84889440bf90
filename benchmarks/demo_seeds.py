"""`make demo`'s numbers over several seeds: mean +- sd of what docs/demo.md claims.

    python benchmarks/demo_seeds.py [--seeds 0,1,2] [--work runs/demo_seeds]
        [--out benchmarks/results/demo_seeds_cpu.json]

Each seed is a full `dlip demo --fresh --seed S` in its own process (new synthetic data, new
initialisations, new batch order; the plan is otherwise `make demo`'s), timed end to end. From
each run's results.json it reads, per model: test r_mean after ITC + ITM re-ranking, the
ITC-only r_mean (so the ITM gain), CIDEr, BLEU-4 and VQA accuracy; and the shares the issue
asks about: the KD student's r_mean and CIDEr as a share of the teacher's, and the KD student's
r_mean lead over the no-KD student. Writes the per-seed rows, mean and sample sd (n-1) to JSON
and prints a markdown table. A seed whose run folder already holds results.json (same plan) is
read, not rerun, unless --rerun.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
MODELS = ("teacher", "student_kd", "student_nokd")


def run_seed(seed: int, work: Path, rerun: bool) -> tuple[dict[str, Any], float | None]:
    out = work / f"seed{seed}"
    results = out / "results.json"
    seconds = None
    if rerun or not results.is_file():
        start = time.perf_counter()
        cmd = [sys.executable, "-m", "dlip", "demo", "--fresh", "--seed", str(seed),
               "--out", str(out)]  # fmt: skip
        if not out.exists():
            cmd.remove("--fresh")
        subprocess.run(cmd, check=True)
        seconds = round(time.perf_counter() - start, 1)
    return json.loads(results.read_text()), seconds


def row(seed: int, r: dict[str, Any], seconds: float | None) -> dict[str, Any]:
    """The numbers of one seed's results.json."""
    wall = seconds or r.get("this_invocation_seconds")
    out: dict[str, Any] = {"seed": seed, "wall_seconds": wall}
    for m in MODELS:
        x = r[m]
        out[f"{m}_r_mean"] = x["r_mean"]
        out[f"{m}_r_mean_itc"] = x["itc_only"]["r_mean"]
        out[f"{m}_itm_gain"] = x["r_mean"] - x["itc_only"]["r_mean"]
        out[f"{m}_CIDEr"] = x["CIDEr"]
        out[f"{m}_Bleu_4"] = x["Bleu_4"]
        out[f"{m}_vqa"] = x.get("vqa_overall")
    t, kd, nokd = (r[m] for m in MODELS)
    out["kd_r_mean_share"] = kd["r_mean"] / t["r_mean"]
    out["kd_CIDEr_share"] = kd["CIDEr"] / t["CIDEr"] if t["CIDEr"] else None
    out["kd_lead_over_nokd"] = kd["r_mean"] - nokd["r_mean"]
    return out


def summarise(rows: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    keys = [k for k in rows[0] if k not in ("seed",)]
    stats = {}
    for k in keys:
        values = [r[k] for r in rows if r.get(k) is not None]
        if not values:
            continue
        sd = statistics.stdev(values) if len(values) > 1 else 0.0
        stats[k] = {"mean": statistics.fmean(values), "sd": sd, "n": len(values)}
    return stats


def table(stats: dict[str, dict[str, float]]) -> str:
    def ms(key: str, scale: float = 1.0, digits: int = 2) -> str:
        s = stats.get(key)
        if s is None:
            return "-"
        return f"{s['mean'] * scale:.{digits}f} ± {s['sd'] * scale:.{digits}f}"

    lines = [
        "| model | r_mean | r_mean ITC only | ITM gain | CIDEr | BLEU-4 | VQA % |",
        "|---|---|---|---|---|---|---|",
    ]
    for m in MODELS:
        lines.append(
            f"| {m} | {ms(f'{m}_r_mean')} | {ms(f'{m}_r_mean_itc')} | {ms(f'{m}_itm_gain')} | "
            f"{ms(f'{m}_CIDEr', digits=3)} | {ms(f'{m}_Bleu_4', digits=3)} | {ms(f'{m}_vqa')} |"
        )
    lines += [
        "",
        f"KD student's share of the teacher's r_mean: {ms('kd_r_mean_share', 100, 1)} %; of its "
        f"CIDEr: {ms('kd_CIDEr_share', 100, 1)} %; KD lead over no-KD: "
        f"{ms('kd_lead_over_nokd')} r_mean points; wall time per demo "
        f"{ms('wall_seconds', 1 / 60, 1)} min.",
    ]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--work", type=Path, default=ROOT / "runs/demo_seeds")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/demo_seeds_cpu.json")
    p.add_argument("--rerun", action="store_true", help="rerun seeds that have results")
    args = p.parse_args()
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    rows = []
    for seed in seeds:
        results, seconds = run_seed(seed, args.work, args.rerun)
        rows.append(row(seed, results, seconds))
        print(json.dumps(rows[-1]), flush=True)
    from dlip.fileio import machine

    stats = summarise(rows)
    record = {
        "benchmark": "demo_seeds",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(),
        "seeds": seeds,
        "statistic": "mean and sample standard deviation over seeds",
        "rows": rows,
        "summary": stats,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    print(table(stats))


if __name__ == "__main__":
    main()
