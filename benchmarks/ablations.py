"""DLIP's ablation questions on the demo's synthetic task: which modules and kinds of KD to
distil, CLIP-KD's terms, the student's initialisation, KD during finetuning.

    python benchmarks/ablations.py --demo runs/demo [--seeds 0,1,2] [--settings all,none,...]
        [--work runs/ablations] [--budget-minutes 180] [--jobs 2] [--vqa]
        [--out benchmarks/results/ablations_cpu.json] [--md docs/ablations.md]

Every setting trains `make demo`'s student (width 64 at 64 px, the demo's plan; pretraining steps
--student-steps) from the same teacher (DEMO/teacher/pretrain/final) on the same data (DEMO/data),
then finetunes it for retrieval and captioning (and VQA with --vqa) with the demo's recipe and
evaluates the test split with `dlip eval`'s protocols. Each (setting, seed) is an ordinary `dlip
pretrain` + `dlip finetune` run under WORK/<setting>/seed<S>/, skipped when its results exist, so
an interrupted sweep resumes. Seeds change the student's initialisation and batch order (not the
data or the teacher). The sweep stops starting new runs once --budget-minutes of wall time are
spent, and says which runs it skipped.

The table (JSON + markdown) gives mean +- sd over seeds of r_mean (ITC + ITM re-rank), ITC-only
r_mean, CIDEr, BLEU-4 (and VQA accuracy), for the settings in SETTINGS.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent

# The demo's KD terms (dlip.demo.plan.KD_WEIGHTS) grouped as DLIP's Table 1 asks.
MODULES = {
    "image": ["kd_rep_image", "kd_hidden_image"],
    "text": ["kd_itc", "kd_rep_text"],
    "fusion": ["kd_itm", "kd_rep_fusion", "kd_attn_fusion", "kd_attn_cross"],
    "decoder": ["kd_lm", "kd_attn_decoder"],
}
KINDS = {
    "logits": ["kd_itc", "kd_itm", "kd_lm"],
    "features": ["kd_rep_image", "kd_rep_text", "kd_rep_fusion", "kd_hidden_image"],
    "attention": ["kd_attn_fusion", "kd_attn_cross", "kd_attn_decoder"],
}


def _kd(terms: list[str], init: str = "inherit_pruned") -> dict[str, Any]:
    return {"loss": {"kd": {"weights": dict.fromkeys(terms, 1.0)}}, "model": {"init": init}}


def settings() -> dict[str, dict[str, Any]]:
    """Setting name -> {"pretrain": config changes, "kd": needs the teacher, "finetune_kd"}.

    "all" is the demo's KD student (teacher init + every demo KD term), "none" its no-KD
    student (random init, no teacher); every other setting changes one thing of "all"."""
    from dlip.demo.plan import KD_WEIGHTS

    every = list(KD_WEIGHTS)
    out: dict[str, dict[str, Any]] = {
        "none": {"pretrain": {}, "kd": False},
        "init_only": {"pretrain": _kd([]), "kd": True},  # teacher weights, no KD term
        "all": {"pretrain": _kd(every), "kd": True},
        "all_random_init": {"pretrain": _kd(every, "random"), "kd": True},
    }
    out |= {f"module_{m}": {"pretrain": _kd(t), "kd": True} for m, t in MODULES.items()}
    out |= {f"kind_{k}": {"pretrain": _kd(t), "kd": True} for k, t in KINDS.items()}
    out["all+feat"] = {"pretrain": _kd([*every, "kd_feat"]), "kd": True}
    icl = _kd([*every, "kd_icl"])
    icl["loss"]["kd"]["teacher_queue"] = 1024
    out["all+icl_queue"] = {"pretrain": icl, "kd": True}
    out["all+finetune_kd"] = {"pretrain": _kd(every), "kd": True, "finetune_kd": True}
    # sequence-level KD: the teacher's captions of the training images as extra pairs
    out["all+teacher_captions"] = {"pretrain": _kd(every), "kd": True, "teacher_captions": True}
    return out


def _merge(base: dict[str, Any], change: dict[str, Any]) -> dict[str, Any]:
    from dlip.config import deep_merge

    return deep_merge(base, change)


# ------------------------------------------------------------------------------ one (setting, seed)
def run_one(
    demo: Path, work: Path, name: str, spec: dict[str, Any], seed: int, vqa: bool, steps: int
) -> dict:
    """Pretrain + finetune + test one student; returns its test metrics (cached on disk)."""
    from dlip.demo.pipeline import Layout, finetune_config, write_config
    from dlip.demo.plan import TASKS, VQA, DemoPlan

    root = work / name / f"seed{seed}"
    done = root / "metrics.json"
    if done.is_file():
        return json.loads(done.read_text())
    plan = replace(DemoPlan.full(), seed=seed, student_steps=steps)
    lay = Layout(root)
    lay.data = demo / "data"
    cfg = student_config(demo, lay, spec, plan)
    _pretrain(write_config(lay, "pretrain", cfg), lay.pretrain_dir("student"))
    metrics: dict[str, Any] = {}
    for task in (*TASKS, *([VQA] if vqa else [])):
        ft = finetune_config(plan, lay, "student", task)
        if spec.get("finetune_kd") and task != VQA:
            ft = finetune_kd_config(demo, ft, task)
        _finetune(write_config(lay, task, ft), task)
        res = json.loads(lay.test_results("student", task).read_text())
        if task == "retrieval":
            metrics["r_mean"] = res["metrics"]["r_mean"]
            metrics["r_mean_itc"] = res["metrics_itc"]["r_mean"]
        elif task == "caption":
            metrics["CIDEr"] = res["metrics"]["CIDEr"]
            metrics["Bleu_4"] = res["metrics"]["Bleu_4"]
        else:
            metrics["vqa"] = res["overall"]
    done.write_text(json.dumps(metrics))
    return metrics


def finetune_kd_config(demo: Path, ft: dict[str, Any], task: str) -> dict[str, Any]:
    """The demo's finetuning config of `task` + KD from the teacher's finetuned model of the
    task (retrieval: ITC + text representations; captioning: LM + decoder attention)."""
    from dlip.demo.pipeline import Layout

    teacher = Layout(demo).finetune_dir("teacher", task) / "best"
    terms = MODULES["decoder"] if task == "caption" else MODULES["text"]
    loss = _kd(terms)["loss"]  # the KD weights only: model.init is pretraining's
    return _merge(ft, {"teacher": {"checkpoint": str(teacher)}, "loss": loss})


def student_config(demo: Path, lay: Any, spec: dict[str, Any], plan: Any) -> dict[str, Any]:
    """The `dlip pretrain` config of one setting: the demo's no-KD student + the setting."""
    from dlip.demo.pipeline import Layout, pretrain_config

    cfg = _merge(pretrain_config(plan, lay, "student_nokd"), spec["pretrain"])
    if spec["kd"]:
        cfg["teacher"] = {"checkpoint": str(Layout(demo).pretrained("teacher"))}
    if spec.get("teacher_captions"):
        cfg["data"]["manifests"] = [*cfg["data"]["manifests"], str(_teacher_captions(demo))]
    cfg["run"]["run_dir"] = str(lay.pretrain_dir("student"))
    return cfg


def _teacher_captions(demo: Path) -> Path:
    """The demo teacher's captions (its finetuned captioner, 3 beams) of the training images,
    made once: `dlip data teacher-captions`."""
    out = demo / "teacher_captions.jsonl"
    if not out.is_file():
        from dlip.demo.pipeline import Layout
        from dlip.inference.pseudo import teacher_captions

        captioner = Layout(demo).finetune_dir("teacher", "caption") / "best"
        print(teacher_captions(captioner, demo / "data/manifest.jsonl", out).summary())
    return out


def _pretrain(path: Path, run_dir: Path) -> None:
    from dlip.demo.pipeline import pretrain

    pretrain(path, run_dir)


def _finetune(path: Path, task: str) -> None:
    from dlip.demo.pipeline import finetune

    cfg = yaml.safe_load(path.read_text())
    finetune(path, task, Path(cfg["run"]["run_dir"]))


# ------------------------------------------------------------------------------------ the sweep
def _init_worker(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)


def _task(job: tuple, deadline: float) -> tuple[dict | None, float]:
    """One (setting, seed) unless the wall-time budget ran out before it started."""
    if time.time() > deadline:
        return None, 0.0
    t0 = time.perf_counter()
    return run_one(*job), time.perf_counter() - t0


def sweep(args: argparse.Namespace, log: Callable[[str], None] = print) -> dict[str, Any]:
    table = settings()
    names = [n for n in args.settings.split(",") if n] if args.settings else list(table)
    unknown = sorted(set(names) - set(table))
    if unknown:
        raise SystemExit(f"unknown settings {unknown}; choose from {sorted(table)}")
    demo = args.demo.resolve()
    if not (demo / "teacher/pretrain/final/model.safetensors").is_file():
        raise SystemExit(f"{demo}: no demo run with a pretrained teacher (run `dlip demo`)")
    if any(table[n].get("teacher_captions") for n in names):
        _teacher_captions(demo)  # once, before workers could race to write it
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    # seed-major: a cut-off sweep still has every setting at some seeds
    keys = [(name, seed) for seed in seeds for name in names]
    jobs = [
        (demo, args.work.resolve(), n, table[n], s, args.vqa, args.student_steps) for n, s in keys
    ]
    start, deadline = time.perf_counter(), time.time() + args.budget_minutes * 60
    results: dict[str, dict[int, dict]] = {}
    skipped: list[str] = []
    for (name, seed), (m, seconds) in zip(keys, _run_all(jobs, deadline, args), strict=True):
        if m is None:
            skipped.append(f"{name}/seed{seed}")
            continue
        results.setdefault(name, {})[seed] = m
        log(f"{name} seed {seed}: {json.dumps(m)} ({seconds:.0f} s)")
    return {
        "settings": {n: _stats(results.get(n, {})) for n in names},
        "per_seed": results,
        "skipped": skipped,
        "wall_minutes": round((time.perf_counter() - start) / 60, 1),
        "budget_minutes": args.budget_minutes,
        "jobs": getattr(args, "jobs", 1),
    }


def _run_all(jobs: list[tuple], deadline: float, args: argparse.Namespace) -> Iterator[tuple]:
    """Results in job order: in this process, or in --jobs spawned workers that split the cores
    (tiny models use threads poorly, so two 1-thread runs beat one 2-thread run)."""
    n = getattr(args, "jobs", 1)
    if n <= 1:
        yield from (_task(job, deadline) for job in jobs)
        return
    import multiprocessing as mp
    import os
    from concurrent.futures import ProcessPoolExecutor

    threads = max(1, (os.cpu_count() or 1) // n)
    ctx = mp.get_context("spawn")  # fresh interpreters: no forked torch thread pools
    with ProcessPoolExecutor(n, ctx, _init_worker, (threads,)) as ex:
        futures = [ex.submit(_task, job, deadline) for job in jobs]
        yield from (f.result() for f in futures)


def _stats(per_seed: dict[int, dict[str, float]]) -> dict[str, dict[str, float]]:
    out = {}
    for key in ("r_mean", "r_mean_itc", "CIDEr", "Bleu_4", "vqa"):
        values = [m[key] for m in per_seed.values() if key in m]
        if values:
            sd = statistics.stdev(values) if len(values) > 1 else 0.0
            out[key] = {"mean": statistics.fmean(values), "sd": sd, "n": len(values)}
    return out


def markdown(record: dict[str, Any]) -> str:
    def ms(s: dict[str, Any], key: str, digits: int) -> str:
        x = s.get(key)
        return "-" if x is None else f"{x['mean']:.{digits}f} ± {x['sd']:.{digits}f} (n={x['n']})"

    lines = [
        "| setting | r_mean | r_mean ITC only | CIDEr | BLEU-4 | VQA % |",
        "|---|---|---|---|---|---|",
    ]
    for name, s in record["settings"].items():
        lines.append(
            f"| {name} | {ms(s, 'r_mean', 2)} | {ms(s, 'r_mean_itc', 2)} | {ms(s, 'CIDEr', 3)} | "
            f"{ms(s, 'Bleu_4', 3)} | {ms(s, 'vqa', 1)} |"
        )
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--demo", type=Path, default=ROOT / "runs/demo")
    p.add_argument("--work", type=Path, default=ROOT / "runs/ablations")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--settings", default="", help="comma-separated names (default: all)")
    p.add_argument("--budget-minutes", type=float, default=180.0)
    p.add_argument("--vqa", action="store_true", help="also finetune and test VQA")
    p.add_argument(
        "--jobs", type=int, default=1, help="runs at once, each in its own process (cores split)"
    )
    p.add_argument(
        "--student-steps", type=int, default=200,
        help="pretraining steps per student (the demo: 400; 200 fits 15 settings x 3 seeds "
        "in ~2.7 h of a 2-core CPU)",
    )  # fmt: skip
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/ablations_cpu.json")
    p.add_argument("--md", type=Path, default=None, help="also write the table here")
    args = p.parse_args()
    from dlip.fileio import machine

    record = sweep(args)
    record |= {
        "benchmark": "ablations",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(),
        "demo": str(args.demo),
        "seeds": args.seeds,
        "student_steps": args.student_steps,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    table = markdown(record)
    if args.md is not None:
        args.md.write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
