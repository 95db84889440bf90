"""VQA evaluation (`dlip eval vqa`): answer every question of a split with a VQA-form model,
sharded over ranks, and score with the official VQA accuracy (`dlip.eval.vqa`) when the split
has answers.

Inputs are the rows `dlip.data.vqa` reads: BLIP's `vqa_val.json` / `vqa_test.json` (images
under `--images`) or a `dlip data build vqa` jsonl. Outputs: `results.json` (overall accuracy in
%, per answer type when the annotations give it, the mode, k_test, model, data, machine),
`results.md`, and `vqa_result.json` in the official result format (`[{"question_id",
"answer"}]`, what the VQAv2 evaluation server takes for test-dev / test-std).
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from dlip.models.blip import BLIP

RESULT_FILE = "vqa_result.json"
MODES = ("rank", "generate")


def read_questions(
    data: str | Path, images: str | Path, vg_images: str | Path | None = None
) -> list[dict[str, Any]]:
    """The split's rows: a `dlip data build vqa` jsonl, or BLIP's JSON (image names joined to
    `images`, Visual Genome rows to `vg_images`); a bad row is an error, not a skip."""
    from dlip.data.rows import BuildReport
    from dlip.data.vqa import build_vqa_blip, read_vqa

    path = Path(data)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: VQA question file not found")
    if path.suffix == ".jsonl":
        rows = read_vqa(path)
    else:
        report = BuildReport()
        rows = list(build_vqa_blip([path], report=report, vqa_root=images, vg_root=vg_images))
        if report.skipped:
            raise ValueError(f"{path}: rows that cannot be evaluated: {report.skipped.summary()}")
    if not rows:
        raise ValueError(f"{path}: no questions")
    ids = [r["question_id"] for r in rows]
    if len(set(ids)) != len(ids):
        raise ValueError(f"{path}: question ids repeat")
    return rows


def read_answer_list(path: str | Path) -> list[str]:
    """BLIP's answer_list.json: a JSON list of distinct non-empty strings."""
    try:
        answers = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: answer list not found") from None
    except ValueError as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(answers, list) or not answers:
        raise ValueError(f"{path}: expected a non-empty JSON list of answers")
    bad = [a for a in answers if not isinstance(a, str) or not a.strip()]
    if bad:
        raise ValueError(f"{path}: answers must be non-empty strings, got {bad[:3]}")
    return answers


def _local_answers(
    model: BLIP, rows: Sequence[dict[str, Any]], gen: dict[str, Any], batch_size: int,
    device: torch.device, num_workers: int,
) -> list[tuple[int, str]]:  # fmt: skip
    """(row index, answer) for this rank's block of questions."""
    from torch.utils.data import DataLoader, Subset

    from dlip.data.datasets import VQAEvalDataset
    from dlip.distributed import shard_range
    from dlip.precision import autocast
    from dlip.transforms import eval_transform

    dataset = VQAEvalDataset(rows, eval_transform(model.config))
    shard = Subset(dataset, list(shard_range(len(dataset))))
    loader = DataLoader(shard, batch_size=batch_size, shuffle=False, num_workers=num_workers)
    out: list[tuple[int, str]] = []
    from dlip.progress import bar

    with torch.inference_mode(), autocast(device):
        for batch in bar(loader, desc="answers", unit="batch"):
            pixels = batch["image"].to(device, non_blocking=True)  # (B, 3, S, S)
            answers = model.answer(pixels, list(batch["question"]), **gen)
            out.extend(zip(batch["index"].tolist(), answers, strict=True))
    return out


def evaluate_vqa(
    model: BLIP,
    rows: Sequence[dict[str, Any]],
    answer_list: Sequence[str] | None = None,
    mode: str = "rank",
    k_test: int = 128,
    num_beams: int = 3,
    max_length: int = 10,
    min_length: int = 1,
    beam_scoring: str = "blip",
    batch_size: int = 32,
    device: torch.device | str | None = None,
    num_workers: int = 0,
) -> dict[str, Any]:
    """Answer every row (sharded over ranks), score on rank 0 when the rows have answers.

    Returns {"metrics", "predictions", "seconds"}: `metrics` (`vqa_accuracy`'s: overall %,
    per answer type; {} without answers) reaches every rank; `predictions` {question_id:
    answer} is filled on rank 0 only. Every rank must call it."""
    from dlip.distributed import broadcast_object, gather_lists, get_rank
    from dlip.eval.vqa import vqa_accuracy

    if isinstance(model, torch.nn.parallel.DistributedDataParallel):
        model = model.module
    if mode not in MODES:
        raise ValueError(f"mode={mode!r}: one of {MODES}")
    if mode == "rank" and not answer_list:
        raise ValueError("rank mode needs the answer list (BLIP's answer_list.json)")
    device = next(model.parameters()).device if device is None else torch.device(device)
    gen = dict(answer_list=list(answer_list) if mode == "rank" else None, k_test=k_test,
               num_beams=num_beams, max_length=max_length, min_length=min_length,
               beam_scoring=beam_scoring)  # fmt: skip
    start = time.perf_counter()
    pairs = gather_lists(_local_answers(model, rows, gen, batch_size, device, num_workers))
    outcome: dict[str, Any] = {"metrics": {}}
    predictions: dict[Any, str] = {}
    if get_rank() == 0:
        by_index = dict(pairs or [])  # padded shards repeat rows: one answer each
        if sorted(by_index) != list(range(len(rows))):
            outcome = {"error": f"gathered {len(by_index)} answers for {len(rows)} questions"}
        else:
            predictions = {rows[i]["question_id"]: by_index[i] for i in range(len(rows))}
            if all(r.get("answers") for r in rows):
                outcome["metrics"] = vqa_accuracy(predictions, rows)
    shared = broadcast_object(outcome)  # also carries a rank-0 failure: no rank waits
    if "error" in shared:
        raise RuntimeError(f"VQA evaluation failed on rank 0: {shared['error']}")
    return {"metrics": shared["metrics"], "predictions": predictions,
            "seconds": time.perf_counter() - start}  # fmt: skip


def _markdown(name: str, metrics: dict[str, Any], mode: str) -> str:
    if not metrics:
        return f"# VQA ({mode})\n\nNo answers in the split: see {RESULT_FILE}."
    row = {"overall": metrics["overall"], **metrics.get("per_answer_type", {})}
    from dlip.eval.common import markdown_table

    return "\n".join([f"# VQA ({mode})", "", markdown_table({name: row}), "",
                      "VQA accuracy in % (the official evaluation's)."])  # fmt: skip


def run_vqa_eval(
    model: str,
    data: str,
    images: str,
    out: str | Path,
    *,
    mode: str = "rank",
    answers: str | None = None,
    k_test: int = 128,
    num_beams: int = 3,
    max_length: int = 10,
    min_length: int = 1,
    beam_scoring: str = "blip",
    vg_images: str | None = None,
    batch_size: int = 32,
    image_size: int | None = None,
    device: str = "auto",
    num_workers: int = 2,
    precision: str = "auto",
) -> Path | None:
    """`dlip eval vqa`: answer, score, write out/results.json, results.md and vqa_result.json;
    returns the json path on rank 0 (None on other ranks)."""
    from dlip.distributed import is_main_process, setup_device
    from dlip.eval.common import describe_model, open_model, results_record, write_results
    from dlip.fileio import atomic_write_text
    from dlip.models.generation import check_beam_scoring
    from dlip.precision import using

    start = time.perf_counter()
    check_beam_scoring(beam_scoring)
    if mode not in MODES:
        raise ValueError(f"--mode {mode!r}: one of {MODES}")
    if mode == "rank" and answers is None:
        raise ValueError("--mode rank needs --answers (BLIP's answer_list.json)")
    answer_list = read_answer_list(answers) if answers else None
    rows = read_questions(data, images, vg_images)  # before the model loads: fail fast
    dev = setup_device(device)
    blip = open_model(model, dev, image_size)
    if not blip.config.vqa:
        raise ValueError(f"--model {model}: {blip.config.name!r} is not a VQA model (vqa=false)")
    with using(precision):
        result = evaluate_vqa(
            blip, rows, answer_list, mode, k_test, num_beams, max_length, min_length,
            beam_scoring, batch_size, dev, num_workers,
        )  # fmt: skip
    if not is_main_process():
        return None
    official = [{"question_id": q, "answer": a} for q, a in result["predictions"].items()]
    settings = {"mode": mode, "k_test": k_test if mode == "rank" else None,
                "num_beams": num_beams, "max_length": max_length, "min_length": min_length,
                "beam_scoring": beam_scoring, "image_size": blip.config.vision.image_size,
                "batch_size": batch_size, "precision": precision,
                "answers": str(Path(answers).resolve()) if answers else None}  # fmt: skip
    metrics = result["metrics"]
    record = results_record(
        "vqa", model=describe_model(model, blip),
        data={"data": str(Path(data).resolve()), "images": str(Path(images).resolve()),
              "questions": len(rows), "answer_list": len(answer_list or [])},
        settings=settings, overall=metrics.get("overall"),
        per_answer_type=metrics.get("per_answer_type"), metrics=metrics,
        seconds={"answering": result["seconds"], "total": time.perf_counter() - start},
    )  # fmt: skip
    atomic_write_text(Path(out) / RESULT_FILE, json.dumps(official) + "\n")
    path = write_results(out, record, _markdown(blip.config.name, metrics, mode))
    shown = f"VQA accuracy {metrics['overall']:.2f}%" if metrics else "no answers to score"
    print(f"{shown} ({len(rows)} questions, {mode})\nwrote {path}", flush=True)
    return path
