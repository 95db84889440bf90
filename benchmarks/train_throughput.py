"""Training throughput of distillation pretraining: blip_base -> dlip_small and -> dlip_base.

    python benchmarks/train_throughput.py [--batch-size 4] [--steps 3] [--warmup 1]
        [--students dlip_small,dlip_base] [--out benchmarks/results/train_throughput_cpu.json]

Each configuration is a recipe of configs/pretrain/ (model.init=random, no data) timed through
the trainer's own code: `build_task` + `build_optimizer` + `train_step` (teacher passes under
no_grad with the taps the recipe's KD terms ask for, student forward, every loss, backward,
AdamW step, momentum update). The teacher is a random-init blip_base written with `dlip.save`
to a temporary directory and read back with `load_teacher`, as a run does; on CUDA it is cast
to bf16 and the step runs under bf16 autocast, as `dlip.train.loop.run` does. Batches are
synthetic and in memory (random pixels; random token ids as [CLS] ... [SEP] + padding, lengths
random up to data.max_length), so the numbers exclude data loading. Every student is also
timed without a teacher (BLIP objectives only) to show the KD overhead.

Reported per configuration: seconds/step (median of `--steps` timed steps after `--warmup`
untimed ones), samples/s (batch / median), peak memory during the timed steps (CUDA:
torch.cuda.max_memory_allocated; CPU: peak resident set size of the process, VmHWM reset
through /proc/self/clear_refs before each configuration where Linux allows it, else
ru_maxrss, which only grows) and, on CUDA, MFU = FLOPs of one step (torch.utils.flop_counter,
teacher passes included) / median seconds / the device's dense bf16 peak (null if unknown).
"""

from __future__ import annotations

import argparse
import gc
import json
import resource
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

import dlip
from dlip.fileio import machine
from dlip.precision import autocast_dtype
from dlip.tokenizer import Tokenizer
from dlip.train.config import PretrainConfig, load
from dlip.train.loop import seed_everything, train_step
from dlip.train.optim import build_optimizer
from dlip.train.pretrain import build_task
from dlip.train.task import load_teacher

TEACHER = "blip_base"
RECIPES = {
    "dlip_small": "configs/pretrain/dlip_small_from_blip_base.yaml",
    "dlip_base": "configs/pretrain/dlip_base_from_blip_base.yaml",
}
# Dense bf16 tensor-core peak, FLOP/s (vendor datasheets, SXM parts; no sparsity).
PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12}
IMAGE_SIZE = 224
# Steps and epoch length handed to the lr schedule (warmup region; any values would do).
STEPS_PER_EPOCH, TOTAL_STEPS = 1000, 20000


# ------------------------------------------------------------------------------------ config
def recipe(student: str, teacher_dir: str | None, batch_size: int) -> PretrainConfig:
    """The student's recipe at `batch_size`, random init, no data; no teacher: KD weights 0."""
    path = Path(__file__).resolve().parent.parent / RECIPES[student]
    overrides = [
        "model.init=random",
        f"model.image_size={IMAGE_SIZE}",
        "data.manifests=[]",
        "data.weights=[]",
        "data.synth_dir=unused",  # validate() wants a data source; nothing is read
        f"data.batch_size={batch_size}",
        f"teacher.checkpoint={teacher_dir if teacher_dir else 'null'}",
    ]
    if teacher_dir is None:
        kd = load(path, overrides[:-1], validate=False).kd_config()
        overrides += [f"loss.kd.weights.{term}=0" for term in kd.enabled]
    return load(path, overrides)


def synthetic_batch(batch_size: int, max_length: int, vocab: int, device) -> dict[str, Tensor]:
    """Random pixels and [CLS] w ... w [SEP] [PAD]... ids; the first row is full length."""
    lengths = torch.randint(5, max_length + 1, (batch_size,))
    lengths[0] = max_length
    ids = torch.randint(1000, min(vocab, Tokenizer.dec_token_id), (batch_size, max_length))
    positions = torch.arange(max_length).expand(batch_size, -1)
    mask = (positions < lengths[:, None]).long()
    ids[:, 0] = Tokenizer.cls_token_id
    ids[positions == (lengths[:, None] - 1)] = Tokenizer.sep_token_id
    ids[mask == 0] = Tokenizer.pad_token_id
    return {
        "image": torch.randn(batch_size, 3, IMAGE_SIZE, IMAGE_SIZE, device=device),
        "input_ids": ids.to(device),
        "attention_mask": mask.to(device),
    }


# ------------------------------------------------------------------------------------ memory
def _vm_hwm() -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def reset_peak(device: torch.device) -> str:
    """Reset the peak counter; returns how peak memory is measured on this device."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return "torch.cuda.max_memory_allocated"
    try:
        Path("/proc/self/clear_refs").write_text("5")  # Linux: VmHWM := current RSS
        if _vm_hwm() is not None:
            return "VmHWM (peak RSS, reset per configuration)"
    except OSError:
        pass
    return "ru_maxrss (process peak RSS since start)"


def peak_bytes(device: torch.device, method: str) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated()
    if method.startswith("VmHWM"):
        return _vm_hwm() or 0
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16.items() if k in name), None)


# ------------------------------------------------------------------------------------- timing
def step_flops(model, task, optimizer, batch, cfg) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        train_step(model, task, optimizer, [batch], cfg, 0, STEPS_PER_EPOCH, TOTAL_STEPS)
    return counter.get_total_flops()


def bench_one(
    cfg: PretrainConfig, teacher, device: torch.device, warmup: int, steps: int, seed: int
) -> dict[str, Any]:
    seed_everything(seed)
    task = build_task(cfg, teacher).to(device).train()
    o = cfg.optim
    optimizer = build_optimizer(task, o.lr, o.weight_decay, tuple(o.betas), o.eps)
    d = cfg.data
    vocab = task.student.config.text.vocab_size
    batches = [synthetic_batch(d.batch_size, d.max_length, vocab, device) for _ in range(2)]
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    for i in range(warmup):
        train_step(task, task, optimizer, [batches[i % 2]], cfg, i, STEPS_PER_EPOCH, TOTAL_STEPS)
    sync()
    gc.collect()
    method = reset_peak(device)
    times, losses = [], []
    for i in range(steps):
        t0 = time.perf_counter()
        metrics = train_step(
            task, task, optimizer, [batches[i % 2]], cfg, warmup + i, STEPS_PER_EPOCH, TOTAL_STEPS
        )
        sync()
        times.append(time.perf_counter() - t0)
        losses.append(metrics["loss"])
    peak = peak_bytes(device, method)
    median = statistics.median(times)
    row: dict[str, Any] = {
        "student": cfg.model.preset,
        "teacher": TEACHER if teacher is not None else None,
        "kd_terms": list(task.kd.enabled),
        "max_length": d.max_length,
        "momentum_distill": cfg.loss.momentum_distill,
        "trainable_params": sum(p.numel() for p in task.parameters() if p.requires_grad),
        "seconds_per_step": round(median, 4),
        "samples_per_s": round(d.batch_size / median, 3),
        "step_times_s": [round(t, 4) for t in times],
        "peak_memory_bytes": peak,
        "peak_memory_gib": round(peak / 2**30, 3),
        "peak_memory_method": method,
        "loss": [round(x, 4) for x in losses],
    }
    if device.type == "cuda":
        flops = step_flops(task, task, optimizer, batches[0], cfg)
        peak_f = peak_flops(device)
        row["flops_per_step"] = flops
        row["achieved_tflops"] = round(flops / median / 1e12, 2)
        row["peak_bf16_flops"] = peak_f
        row["mfu"] = round(flops / median / peak_f, 4) if peak_f else None
    del task, optimizer, batches
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def run(args: argparse.Namespace) -> dict[str, Any]:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    students = [s.strip() for s in args.students.split(",") if s.strip()]
    for s in students:
        if s not in RECIPES:
            raise SystemExit(f"unknown student {s!r}; choose from {sorted(RECIPES)}")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(args.seed)
        dlip.save(dlip.create_model(TEACHER), tmp)  # random init, written as a real teacher
        gc.collect()
        for student in students:
            cfg = recipe(student, tmp, args.batch_size)
            teacher = load_teacher(cfg)
            # as dlip.train.loop.setup: the teacher takes the run's autocast dtype
            teacher.to(device, autocast_dtype(device, cfg.run.precision) or torch.float32)
            for with_teacher in (True, False):
                c = cfg if with_teacher else recipe(student, None, args.batch_size)
                label = f"{TEACHER} -> {student}" if with_teacher else f"{student} (no teacher)"
                print(f"{label}: ...", flush=True)
                row = bench_one(
                    c, teacher if with_teacher else None, device, args.warmup, args.steps,
                    args.seed,
                )  # fmt: skip
                row["name"] = label
                rows.append(row)
                print(
                    f"{label:<28} {row['seconds_per_step']:8.3f} s/step "
                    f"{row['samples_per_s']:8.2f} samples/s  peak {row['peak_memory_gib']:.2f} GiB"
                    + (f"  MFU {row['mfu']}" if "mfu" in row else ""),
                    flush=True,
                )
            del teacher
            gc.collect()
    for student in students:  # KD overhead: with-teacher step time / no-teacher step time
        kd, plain = (r for r in rows if r["student"] == student)
        kd["kd_overhead_x"] = round(kd["seconds_per_step"] / plain["seconds_per_step"], 3)
    return {
        "benchmark": "train_throughput",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(),
        "torch": torch.__version__,
        "device": str(device),
        "precision": "bf16 autocast, bf16 teacher" if device.type == "cuda" else "fp32",
        "teacher": f"{TEACHER} (random init, dlip.save -> load_teacher)",
        "batch_size": args.batch_size,
        "image_size": IMAGE_SIZE,
        "warmup_steps": args.warmup,
        "timed_steps": args.steps,
        "statistic": "median of timed steps",
        "data": "synthetic in-memory batches (no data loading)",
        "configurations": rows,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch-size", type=int, default=4, help="per step (ITM needs >= 2)")
    parser.add_argument("--steps", type=int, default=3, help="timed steps (median reported)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    parser.add_argument("--students", default="dlip_small,dlip_base", help="comma-separated")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="default: results/train_throughput_<dev>.json")
    args = parser.parse_args()
    if args.steps < 1 or args.warmup < 0 or args.batch_size < 2:
        parser.error("need --steps >= 1, --warmup >= 0 and --batch-size >= 2")
    result = run(args)
    dev = "cuda" if result["device"].startswith("cuda") else "cpu"
    out = Path(args.out or Path(__file__).parent / "results" / f"train_throughput_{dev}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
