"""The Python parts of benchmarks/gpu_check.sh: distillation step and ITM re-rank throughput
on a GPU (on CPU with a tiny preset in the tests), and the run's summary.

    python benchmarks/gpu_bench.py train [--compile] [--batch-sizes 64,256] --out FILE.json
    python benchmarks/gpu_bench.py itm [--presets blip_base,dlip_small] --out FILE.json
    python benchmarks/gpu_bench.py summary --parts PARTS.tsv --results DIR --out gpu_check.json

`train`: a recipe of configs/pretrain/ (default blip_base -> dlip_small, random init, no data)
through the trainer's own `build_task`, `build_optimizer`, `train_step`, as (and with the
helpers of) benchmarks/train_throughput.py: the teacher a random preset through `dlip.save` ->
`load_teacher`, synthetic in-memory batches; on CUDA a bf16 teacher and bf16 autocast
(run.precision=auto); `--compile` = run.compile (`BLIP.compile_blocks`). Each batch size runs
with the teacher and without (KD weights 0). Per row: step time (median of timed steps after
the warm-up, each closed by torch.cuda.synchronize), samples/s, FLOPs (torch.utils.
flop_counter over one eager step, teacher passes included), MFU = FLOPs / step time / the
card's dense bf16 peak (PEAK_BF16), peak memory (torch.cuda.max_memory_allocated; CPU: peak
RSS) and the teacher's share: `direct` = its passes in the step (`PretrainTask._teacher_inputs`
between CUDA events: no sync mid-step) / step time; `difference` = (t_with - t_without) /
t_with, which also charges the KD losses and adapters to the teacher.
`itm`: `dlip.eval.retrieval.score_candidates` (BLIP's re-rank, batched, deduplicated) of
random-weight presets on random image tokens, caption-like texts and random ITC similarities:
unique pairs / median seconds per `--itm-batches`, feature extraction excluded.
Each record names the machine (`dlip.fileio.machine()`, GPU included) and is rewritten after
every row; a SIGTERM (gpu_check.sh's time box) writes it with status "timeout".
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from datetime import datetime, timezone
from functools import cache, partial
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

import torch

import dlip
from dlip.fileio import machine, write_json

if TYPE_CHECKING:
    from torch.optim import Optimizer

    from dlip.models.blip import BLIP
    from dlip.train.config import PretrainConfig
    from dlip.train.task import PretrainTask

ROOT = Path(__file__).resolve().parent.parent
# Dense bf16 tensor-core peak, FLOP/s, by a substring of the CUDA device name; first match
# wins, so the specific names come first. NVIDIA datasheets (the "with sparsity" figure / 2).
PEAK_BF16 = (("H200 NVL", 835e12), ("H200", 989e12), ("H100 NVL", 835e12))
PEAK_BF16 += (("H100 PCIe", 756e12), ("H100", 989e12), ("A100", 312e12))  # H100: SXM
PEAK_SOURCE = "NVIDIA datasheets: dense bf16 tensor-core peak (without sparsity)"
# Epoch and run length handed to the lr schedule (any values would do: warm-up region).
STEPS_PER_EPOCH, TOTAL_STEPS = 1000, 20000


class TimeBox(BaseException):
    """gpu_check.sh's `timeout` sent SIGTERM; not an Exception, so no per-row handler eats it."""


def _on_sigterm(signum: int, frame: object) -> None:
    raise TimeBox("SIGTERM (time box)")


@cache
def tt() -> ModuleType:
    """benchmarks/train_throughput.py (a script, imported by path; it imports the trainer, so
    only the train part pays for it): synthetic_batch, reset_peak, peak_bytes, step_flops."""
    path = ROOT / "benchmarks" / "train_throughput.py"
    spec = importlib.util.spec_from_file_location("_bench_train_throughput", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def peak_bf16(device: torch.device, override: float | None) -> tuple[float | None, str | None]:
    """(peak FLOP/s, where it comes from) for MFU; (None, None) on CPU or an unknown card."""
    if override:
        return override, "--peak-flops"
    if device.type != "cuda":
        return None, None
    name = torch.cuda.get_device_name(device)
    for key, value in PEAK_BF16:
        if key in name:
            return value, f"{PEAK_SOURCE}; matched {key!r} in {name!r}"
    return None, None


def free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ------------------------------------------------------------------------------------- train
def train_config(args: argparse.Namespace, teacher_dir: str | None, batch: int) -> PretrainConfig:
    """The recipe at `batch`, random init, no data; without a teacher every KD weight is 0."""
    from dlip.train.config import load

    path = ROOT / args.recipe  # an absolute recipe path stays as it is
    overrides = ["model.init=random", f"model.image_size={args.image_size}", "data.manifests=[]"]
    overrides += ["data.weights=[]", "data.synth_dir=unused"]  # validate() wants a data source
    overrides += [f"data.batch_size={batch}", f"run.compile={str(args.compile).lower()}"]
    overrides += [f"teacher.checkpoint={teacher_dir or 'null'}"]
    if teacher_dir is None:
        kd = load(path, overrides[:-1], validate=False).kd_config()
        overrides += [f"loss.kd.weights.{term}=0" for term in kd.enabled]
    return load(path, overrides)


class TeacherTimer:
    """Seconds spent in the task's teacher passes; CUDA events, so nothing syncs mid-step."""

    def __init__(self, task: PretrainTask, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.spans: list[tuple[Any, Any]] = []
        inner = task._teacher_inputs

        def timed(*a: Any, **kw: Any) -> Any:
            start = self._mark()
            out = inner(*a, **kw)
            self.spans.append((start, self._mark()))
            return out

        task._teacher_inputs = timed  # instance attribute: shadows the method for this task

    def _mark(self) -> Any:
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def pop(self) -> float:
        """Seconds of the passes since the last pop (call after synchronising)."""
        if self.cuda:
            total = sum(a.elapsed_time(b) for a, b in self.spans) / 1000
        else:
            total = sum(b - a for a, b in self.spans)
        self.spans = []
        return total


def _batch(cfg: PretrainConfig, vocab: int, image_size: int, device: torch.device) -> dict:
    """train_throughput's synthetic batch, at this run's image size."""
    d = cfg.data
    batch = tt().synthetic_batch(d.batch_size, d.max_length, vocab, device)
    batch["image"] = torch.randn(d.batch_size, 3, image_size, image_size, device=device)
    return batch


def time_steps(
    task: PretrainTask, optimizer: Optimizer, batches: list[dict], cfg: PretrainConfig,
    device: torch.device, warmup: int, steps: int,
) -> dict[str, Any]:  # fmt: skip
    """Warm-up (compiles, when compiling) and timed steps: each step's and its teacher's time."""
    from dlip.train.loop import train_step

    timer = TeacherTimer(task, device) if task.teacher is not None else None

    def step(i: int) -> tuple[float, float]:
        t0 = time.perf_counter()
        m = train_step(
            task, task, optimizer, [batches[i % 2]], cfg, i, STEPS_PER_EPOCH, TOTAL_STEPS
        )
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        took = time.perf_counter() - t0
        losses.append(round(m["loss"], 4))
        return took, timer.pop() if timer else 0.0

    losses: list[float] = []
    warm = [step(i)[0] for i in range(warmup)]
    free(device)
    method = tt().reset_peak(device)
    times, teacher = zip(*(step(warmup + i) for i in range(steps)), strict=True)
    return {
        "warmup_times_s": [round(t, 4) for t in warm],
        "step_times_s": [round(t, 4) for t in times],
        "teacher_times_s": [round(t, 4) for t in teacher] if timer else None,
        "peak_memory_bytes": tt().peak_bytes(device, method),
        "peak_memory_method": method,
        "loss": losses,
    }


def train_row(
    args: argparse.Namespace, cfg: PretrainConfig, teacher: BLIP | None, device: torch.device,
    peak: float | None,
) -> dict[str, Any]:  # fmt: skip
    """One configuration: build, count FLOPs (eager), compile if asked, time."""
    from dlip.train.loop import seed_everything
    from dlip.train.optim import build_optimizer
    from dlip.train.pretrain import build_task

    seed_everything(args.seed)
    task = build_task(cfg, teacher).to(device).train()
    o = cfg.optim
    optimizer = build_optimizer(task, o.lr, o.weight_decay, tuple(o.betas), o.eps)
    vocab = task.student.config.text.vocab_size
    batches = [_batch(cfg, vocab, args.image_size, device) for _ in range(2)]
    flops = tt().step_flops(task, task, optimizer, batches[0], cfg)
    compiled = task.student.compile_blocks(backend=args.compile_backend) if args.compile else 0
    row = {"trainable_params": sum(p.numel() for p in task.parameters() if p.requires_grad)}
    row.update(kd_terms=list(task.kd.enabled), compiled_blocks=compiled)
    row.update(time_steps(task, optimizer, batches, cfg, device, args.warmup, args.steps))
    if args.compile:  # graphs so far in this process: a fall-back to eager shows up here
        row["dynamo_stats"] = dict(torch._dynamo.utils.counters["stats"])
    median = statistics.median(row["step_times_s"])
    row["seconds_per_step"] = round(median, 5)
    row["samples_per_s"] = round(cfg.data.batch_size / median, 2)
    if row["teacher_times_s"]:
        row["teacher_seconds_per_step"] = round(statistics.median(row["teacher_times_s"]), 5)
        row["teacher_share_direct"] = round(row["teacher_seconds_per_step"] / median, 4)
    row["flops_per_step"] = flops
    row["achieved_tflops"] = round(flops / median / 1e12, 3)
    row["mfu"] = round(flops / median / peak, 4) if peak else None
    row["peak_memory_gib"] = round(row["peak_memory_bytes"] / 2**30, 3)
    del task, optimizer, batches
    return row


def teacher_shares(rows: list[dict]) -> None:
    """Fill each with-teacher row's `teacher_share_difference` from its batch's no-teacher row."""
    plain = {r["batch_size"]: r for r in rows if not r["with_teacher"] and "seconds_per_step" in r}
    for r in rows:
        other = plain.get(r["batch_size"])
        if r["with_teacher"] and other and "seconds_per_step" in r:
            t_with, t_without = r["seconds_per_step"], other["seconds_per_step"]
            r["teacher_share_difference"] = round((t_with - t_without) / t_with, 4)
            r["kd_overhead_x"] = round(t_with / t_without, 3)


def train_meta(args: argparse.Namespace, device: torch.device, peak: float | None) -> dict:
    """What every row of a train record shares."""
    bf16 = device.type == "cuda"
    return {
        "precision": "bf16 autocast, bf16 teacher (run.precision=auto)" if bf16 else "fp32",
        "compile": args.compile,
        "compile_backend": args.compile_backend if args.compile else None,
        "recipe": args.recipe,
        "teacher": f"{args.teacher} (random init, dlip.save -> load_teacher)",
        "image_size": args.image_size,
        "warmup_steps": args.warmup,
        "timed_steps": args.steps,
        "statistic": "median of timed steps, each bracketed by torch.cuda.synchronize",
        "data": "synthetic in-memory batches (no data loading)",
        "peak_bf16_flops": peak,
        "flops_method": "torch.utils.flop_counter, one eager step, teacher passes included",
        "teacher_share_method": "direct: teacher passes (CUDA events) / step; difference: "
        "(t_with - t_without) / t_with",
    }


def run_train(args: argparse.Namespace, record: dict, save: Callable[[], None]) -> None:
    from dlip.train.task import load_teacher

    device = torch.device(args.device)
    peak, source = peak_bf16(device, args.peak_flops)
    rows: list[dict] = []
    record.update(train_meta(args, device, peak), peak_bf16_source=source, configurations=rows)
    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(args.seed)
        dlip.save(dlip.create_model(args.teacher), tmp)  # random init, written as a real teacher
        teacher = load_teacher(train_config(args, tmp, 2))
        teacher.to(device, torch.bfloat16 if device.type == "cuda" else torch.float32)
        for batch, with_teacher in ((b, t) for b in args.batch_sizes for t in (True, False)):
            cfg = train_config(args, tmp if with_teacher else None, batch)
            student = cfg.model.preset
            name = f"{args.teacher} -> {student}" if with_teacher else f"{student} (no teacher)"
            row = {"name": name, "batch_size": batch, "with_teacher": with_teacher}
            rows.append(row)
            print(f"{name}, batch {batch}, compile {args.compile}: ...", flush=True)
            try:
                row.update(train_row(args, cfg, teacher if with_teacher else None, device, peak))
            except Exception as e:  # an OOM at one batch size keeps the other rows
                row["error"] = f"{type(e).__name__}: {e}"[:500]
                traceback.print_exc()
            free(device)
            teacher_shares(rows)
            save()
            print(json.dumps({k: v for k, v in row.items() if not k.endswith("_s")}), flush=True)


# --------------------------------------------------------------------------------------- itm
def unique_pairs(cand: Any, n_texts: int) -> int:
    """Pairs score_candidates runs: both directions' candidates, each pair once."""
    n_img = cand.i2t.shape[0]
    i2t = torch.arange(n_img, device=cand.i2t.device)[:, None] * n_texts + cand.i2t
    t2i = cand.t2i * n_texts + torch.arange(n_texts, device=cand.t2i.device)[:, None]
    return int(torch.cat([i2t.flatten(), t2i.flatten()]).unique().numel())


def itm_rows(args: argparse.Namespace, preset: str, device: torch.device) -> list[dict]:
    """One preset's re-rank, once per itm_batch: median seconds of `--repeats` timed calls."""
    from dlip.bench.latency import candidate_texts, time_calls
    from dlip.eval.retrieval import score_candidates, tokenize_texts, top_candidates
    from dlip.losses.itm import with_first_token
    from dlip.tokenizer import get_tokenizer

    torch.manual_seed(args.seed)
    model = dlip.create_model(preset, image_size=args.image_size).eval().to(device)
    gen = torch.Generator().manual_seed(args.seed)
    cuda = device.type == "cuda"
    with torch.inference_mode(), torch.autocast("cuda", torch.bfloat16, enabled=cuda):
        pixels = torch.randn(args.images, 3, args.image_size, args.image_size, generator=gen)
        chunks = [model.encode_image(p.to(device)).tokens for p in pixels.split(64)]
        tokens = torch.cat(chunks).to(torch.bfloat16 if cuda else torch.float32)  # as eval keeps
    ids, mask = tokenize_texts(candidate_texts(args.texts))  # CPU, as evaluate_retrieval
    ids = with_first_token(ids, get_tokenizer().enc_token_id)
    sims = torch.rand(args.images, args.texts, generator=gen).to(device)
    cand = top_candidates(sims, args.k)
    pairs = unique_pairs(cand, args.texts)
    rows = []
    for itm_batch in args.itm_batches:
        free(device)
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
        call = partial(score_candidates, model, tokens, ids, mask, sims, cand, itm_batch)
        secs = time_calls(call, 1, args.repeats, cuda)
        median = statistics.median(secs)
        peak = torch.cuda.max_memory_allocated(device) if cuda else None
        row = {"model": preset, "params": model.num_params(), "itm_batch": itm_batch}
        row.update(unique_pairs=pairs, times_s=[round(t, 4) for t in secs])
        row.update(seconds=round(median, 4), pairs_per_s=round(pairs / median, 1))
        rows.append({**row, "peak_memory_gib": round(peak / 2**30, 3) if peak else None})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def run_itm(args: argparse.Namespace, record: dict, save: Callable[[], None]) -> None:
    device = torch.device(args.device)
    rows: list[dict] = []
    cuda = device.type == "cuda"
    record.update(precision="bf16 autocast, bf16 image tokens" if cuda else "fp32")
    record.update(image_size=args.image_size, num_images=args.images, num_texts=args.texts)
    record.update(
        k=args.k,
        texts="9-word caption-like texts (11 tokens), [ENC] first",
        sims="random (uniform): they pick the candidates, not the cost",
        statistic=f"median of {args.repeats} timed calls after 1 warm-up",
        rows=rows,
    )
    for preset in args.presets:
        try:
            rows += itm_rows(args, preset, device)
        except Exception as e:
            rows.append({"model": preset, "error": f"{type(e).__name__}: {e}"[:500]})
            traceback.print_exc()
        free(device)
        save()


# ----------------------------------------------------------------------------------- summary
def part_status(rc: str, path: Path) -> str:
    """gpu_check.sh's exit code of a part, refined by what its JSON says."""
    if rc == "skip":
        return "skipped: the script's time budget was spent"
    record = json.loads(path.read_text()) if path.is_file() else {}
    rows = record.get("configurations") or record.get("rows") or []
    if rc in ("124", "137") or record.get("status") == "timeout":
        return f"timeout ({len(rows)} rows written)" if rows else "timeout"
    if rc != "0":
        return f"failed (exit {rc})"
    if not record:
        return "failed (no JSON written)"
    errors = sum(1 for r in rows if "error" in r)
    return f"ok, {errors} row(s) failed" if errors else "ok"


def nvidia_smi() -> str | None:
    query = "name,memory.total,driver_version,clocks.max.sm,power.limit"
    try:
        cmd = ["nvidia-smi", f"--query-gpu={query}", "--format=csv,noheader"]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=20).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None


def headline(results: Path, part: dict) -> str:
    """One line of numbers per part for the end of the log."""
    path = results / part["json"]
    record = json.loads(path.read_text()) if path.is_file() else {}
    bits = []
    for r in record.get("configurations", []):
        if "seconds_per_step" in r:
            mfu = f", MFU {r['mfu']:.1%}" if r.get("mfu") is not None else ""
            ms = r["seconds_per_step"] * 1e3
            bits.append(f"{r['name']} b{r['batch_size']}: {ms:.1f} ms{mfu}")
    for r in record.get("rows", []):
        if "pairs_per_s" in r:
            bits.append(f"{r['model']} itm_batch {r['itm_batch']}: {r['pairs_per_s']:.0f} pairs/s")
    return "; ".join(bits)


def run_summary(args: argparse.Namespace, record: dict, save: Callable[[], None]) -> None:
    results = Path(args.results)
    parts = []
    for line in Path(args.parts).read_text().splitlines():
        name, file, rc, seconds, box = line.split("\t")
        status = part_status(rc, results / file)
        part = {"part": name, "json": file, "status": status, "seconds": int(seconds)}
        parts.append({**part, "time_box_s": int(box)})
    record.update(budget_s=args.budget, elapsed_s=args.elapsed, nvidia_smi=nvidia_smi())
    record.update(torch_cuda=torch.version.cuda, parts=parts)
    for p in parts:
        print(f"{p['part']:<14} {p['status']:<28} {p['seconds']:>4} s  {headline(results, p)}")


# --------------------------------------------------------------------------------------- cli
def _names(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def _ints(text: str) -> list[int]:
    return [int(x) for x in _names(text)]


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    train = sub.add_parser("train", help="distillation step throughput, teacher share, MFU")
    train.add_argument("--recipe", default="configs/pretrain/dlip_small_from_blip_base.yaml")
    train.add_argument("--teacher", default="blip_base", help="preset, random init")
    train.add_argument("--batch-sizes", type=_ints, default=[64, 256], help="comma-separated")
    train.add_argument("--warmup", type=int, default=3, help="untimed steps (compile happens here)")
    train.add_argument("--steps", type=int, default=20, help="timed steps (median reported)")
    train.add_argument("--compile", action="store_true", help="run.compile: student blocks")
    train.add_argument("--compile-backend", default="inductor")
    train.add_argument("--peak-flops", type=float, default=None, help="MFU's peak, FLOP/s")
    itm = sub.add_parser("itm", help="ITM re-rank throughput (pairs/s)")
    itm.add_argument("--presets", type=_names, default=["blip_base", "dlip_small"])
    itm.add_argument("--images", type=int, default=128)
    itm.add_argument("--texts", type=int, default=640)
    itm.add_argument("--k", type=int, default=64)
    itm.add_argument("--itm-batches", type=_ints, default=[128, 512])
    itm.add_argument("--repeats", type=int, default=3)
    for p in (train, itm):
        p.add_argument("--device", default="cuda")
        p.add_argument("--image-size", type=int, default=224)
        p.add_argument("--seed", type=int, default=0)
    summary = sub.add_parser("summary", help="gpu_check.sh's parts -> gpu_check.json")
    summary.add_argument("--parts", required=True, help="TSV: part, json, rc, seconds, box")
    summary.add_argument("--results", required=True, help="where the parts' JSON are")
    summary.add_argument("--budget", type=int, default=0)
    summary.add_argument("--elapsed", type=int, default=0)
    for p in (train, itm, summary):
        p.add_argument("--out", required=True, help="the JSON record to write")
    args = parser.parse_args(argv)
    if args.cmd == "train" and (args.steps < 1 or args.warmup < 0 or min(args.batch_sizes) < 2):
        parser.error("train needs --steps >= 1, --warmup >= 0 and batch sizes >= 2 (ITM)")
    return args


RUNS = {"train": run_train, "itm": run_itm, "summary": run_summary}


def main(argv: list[str] | None = None) -> int:
    """Run one part; the record is written even when the part fails or is timed out."""
    args = parse(argv)
    out = Path(args.out)
    date = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    name = "gpu_check" if args.cmd == "summary" else f"gpu_{args.cmd}"
    record: dict[str, Any] = {"benchmark": name, "status": "running", "date": date}
    record.update(machine=machine(), device=getattr(args, "device", None))
    signal.signal(signal.SIGTERM, _on_sigterm)
    start, rc = time.perf_counter(), 0
    try:
        write_json(out, record)
        RUNS[args.cmd](args, record, lambda: write_json(out, record))
        record["status"] = "complete"
    except TimeBox:
        record["status"], rc = "timeout", 124
    except Exception as e:
        record["status"], rc = f"failed: {type(e).__name__}: {e}"[:500], 1
        traceback.print_exc()
    finally:
        record["total_seconds"] = round(time.perf_counter() - start, 1)
        write_json(out, record)
    print(f"wrote {out} ({record['status']})", flush=True)
    return rc


if __name__ == "__main__":
    sys.exit(main())
