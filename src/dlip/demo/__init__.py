"""`dlip demo`: the whole DLIP story on synthetic data, on a CPU, with nothing downloaded.

    dlip demo [--out runs/demo] [--quick] [--fresh] [--threads N] [--seed S]
    dlip.demo.run_demo("runs/demo", quick=True)  # the same from Python

A BLIP-shaped teacher is pretrained from scratch; a student with ~3x fewer image FLOPs is distilled
from it (KD) and, for comparison, trained without KD for the same steps; all three are finetuned
for retrieval, captioning and VQA (the synthetic questions) and evaluated with `dlip eval`'s
protocols on the held-out test split.
RUN/results.json, RUN/report.md and RUN/*.png hold the outcome (see dlip.demo.report). Stages
live in dlip.demo.pipeline, sizes in dlip.demo.plan.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from dlip.demo.plan import MODELS, TASKS, DemoPlan

TIMINGS_FILE = "timings.json"
SYNTH_SAMPLES = 4  # synthetic test images captioned in the report


def run_demo(
    out: str | Path = "runs/demo",
    quick: bool = False,
    fresh: bool = False,
    threads: int | None = None,
    seed: int = 0,
) -> Path:
    """The whole demo into `out` (resumed when its folder holds an interrupted run of the same
    plan; `fresh` deletes an earlier demo run first); `seed` sets the synthetic data and every
    run's seed. Returns the report's path."""
    import torch

    from dlip.demo.pipeline import PLAN_FILE, Layout, pin_plan, run_stages, stages

    plan = replace(DemoPlan.quick() if quick else DemoPlan.full(), seed=seed)
    lay = Layout(Path(out).resolve())
    if fresh and lay.root.exists():
        if not (lay.root / PLAN_FILE).is_file():
            raise SystemExit(f"--fresh: {lay.root} is not a demo run folder (no {PLAN_FILE})")
        shutil.rmtree(lay.root)
    pin_plan(plan, lay)
    if threads is not None:
        torch.set_num_threads(threads)
    print(f"dlip demo ({plan.name}) -> {lay.root}   torch threads: {torch.get_num_threads()}")
    start = time.perf_counter()
    from dlip.eval.captioning import meteor_session

    with meteor_session():  # one METEOR process for the six caption evaluations
        seconds = _merge_timings(lay.root, run_stages(stages(plan, lay)))
    print("\n== [report] measuring size, FLOPs, latency and sample captions", flush=True)
    results = collect(plan, lay, seconds, time.perf_counter() - start)
    from dlip.demo.report import write_report

    report = write_report(results, lay.root)
    print(f"\n{summary(results)}\nreport: {report}\nresults: {lay.root / 'results.json'}")
    return report


def _merge_timings(root: Path, now: dict[str, float]) -> dict[str, float]:
    """Stage seconds across resumed invocations (a stage's last complete run counts)."""
    from dlip.fileio import write_json

    path = root / TIMINGS_FILE
    seconds = json.loads(path.read_text()) if path.is_file() else {}
    seconds.update(now)
    write_json(path, seconds)
    return seconds


def _entry(
    lay, model: str, pair: tuple[Any, Any], latency: dict[str, float], images: dict[str, Path]
) -> dict[str, Any]:
    """One model's row of results.json: size, latency, test metrics, sample captions.
    `pair`: its best finetuned (retrieval, caption) models."""
    from dlip.demo.measure import sample_captions, size_and_flops
    from dlip.demo.plan import VQA

    ret = json.loads(lay.test_results(model, "retrieval").read_text())
    cap = json.loads(lay.test_results(model, "caption").read_text())
    vqa = json.loads(lay.test_results(model, VQA).read_text())
    return {
        **size_and_flops(pair[0]),
        "latency_ms": latency,
        **ret["metrics"],
        **cap["metrics"],
        "itc_only": ret["metrics_itc"],
        "vqa_overall": vqa["overall"],
        "vqa_per_answer_type": vqa["per_answer_type"],
        "samples": sample_captions(pair[1], images),
        "models": {task: str(lay.finetune_dir(model, task) / "best") for task in (*TASKS, VQA)},
    }


def sample_images(lay) -> tuple[dict[str, Path], dict[str, list[str]]]:
    """The bundled photos and the first synthetic test images (with their reference captions)."""
    from dlip.demo.measure import PHOTOS, bundled_photo

    images = {name: bundled_photo(name) for name in PHOTOS}
    refs: dict[str, list[str]] = {}
    for row in json.loads((lay.data / "test.json").read_text())[:SYNTH_SAMPLES]:
        name = Path(row["image"]).stem
        images[name], refs[name] = lay.data / row["image"], row["caption"]
    return images, refs


def collect(plan: DemoPlan, lay, seconds: dict[str, float], wall: float) -> dict[str, Any]:
    from dlip.fileio import machine, write_json

    images, refs = sample_images(lay)
    results: dict[str, Any] = {
        "demo": plan.to_dict(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "machine": machine(),
        "stage_seconds": seconds,
        "this_invocation_seconds": round(wall, 1),
    }
    from dlip.demo.measure import latency_ms
    from dlip.models.io import load

    pairs = {m: tuple(load(lay.finetune_dir(m, t) / "best") for t in TASKS) for m in MODELS}
    latency = latency_ms(pairs, plan.k_test, plan.latency_repeats)
    for model in MODELS:
        results[model] = _entry(lay, model, pairs[model], latency[model], images)
    results["share_of_teacher"] = {m: shares(results["teacher"], results[m]) for m in MODELS[1:]}
    results["sample_images"] = {n: str(p) for n, p in images.items()}
    results["sample_references"] = refs
    write_json(lay.root / "results.json", results)
    return results


def shares(teacher: dict[str, Any], student: dict[str, Any]) -> dict[str, float]:
    """Student / teacher ratios: size and compute (lower is cheaper), latency speed-up, and the
    share of the teacher's test score kept (r_mean, CIDEr, BLEU-4, VQA accuracy)."""
    out = {
        "params": student["params"] / teacher["params"],
        "flops_image_embed": student["flops"]["image_embed"] / teacher["flops"]["image_embed"],
    }
    for task, ms in teacher["latency_ms"].items():
        out[f"speedup_{task}"] = ms / student["latency_ms"][task]
    for metric in ("r_mean", "CIDEr", "Bleu_4", "vqa_overall"):
        out[metric] = student[metric] / teacher[metric] if teacher[metric] > 0 else float("nan")
    return {k: round(v, 4) for k, v in out.items()}


def summary(results: dict[str, Any]) -> str:
    lines = [f"{'model':<14}{'params':>10}{'r_mean':>9}{'CIDEr':>8}{'BLEU-4':>8}{'VQA %':>8}"]
    for m in MODELS:
        r = results[m]
        lines.append(
            f"{m:<14}{r['params'] / 1e6:>9.2f}M{r['r_mean']:>9.2f}{r['CIDEr']:>8.3f}"
            f"{r['Bleu_4']:>8.3f}{r['vqa_overall']:>8.2f}"
        )
    kd, nokd = results["student_kd"]["r_mean"], results["student_nokd"]["r_mean"]
    verdict = "above" if kd > nokd else "NOT above"
    lines.append(f"KD student r_mean {kd:.2f} is {verdict} the no-KD student's {nokd:.2f}")
    return "\n".join(lines)
