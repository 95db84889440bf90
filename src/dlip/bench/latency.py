"""Latency and throughput, teacher vs students, measured in one run.

Per model (random preset weights: speed depends on shapes, not values) and row, `warmup`
untimed calls, then `repeats` timed calls; the record keeps every time, the median, the
nearest-rank p95 (= the max when repeats < 20) and the median per item. Rows:
- `image_embed` (batch 1, 32): `encode_image` on pixel tensors -> ITC feature and tokens
  (decoding and resizing images are not included).
- `itm_rerank` (k = 16, 128): BLIP's re-rank of one query image's top-k texts given the
  image tokens and ITC similarities, exactly `dlip.eval.retrieval.rerank` (ITM of the k pairs
  in one batch, [ENC] first, trimmed to the longest text; with `fusion_layers=k` the text-only
  layers once per text). Texts are 9-word captions (11 tokens).
- `caption` (batch 1, 8): `generate_ids` with 3 beams and a fixed length of 20 tokens (prompt
  included; min_length = max_length = 20), the length `dlip.models.counting`'s
  `caption_3beam` FLOPs count: random weights would stop at arbitrary lengths, which would
  make models incomparable.
Variants (`variants`, CPU only beyond fp32), each timed as its own model "NAME+VARIANT":
`int8` (dynamic int8 linear layers, dlip.inference.quant), `onnx` and `onnx_int8` (the model
exported by dlip.inference.onnx, float32 or `--quantize int8`, run by ONNX Runtime through
dlip.inference.ort, same threads). The default fp32 rows already share an image's
cross-attention keys / values across beams and re-ranked texts.
Speed-ups are teacher median / model median for the same row, from this one run;
`speedup_vs_fp32` gives each variant against its own model's fp32 rows.
On CPU everything is fp32 with `threads` intra-op threads; on CUDA the calls run under bf16
autocast and each timed call is bracketed by torch.cuda.synchronize.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime, timezone
from typing import Any

import torch
from torch import Tensor

from dlip.fileio import machine
from dlip.models.blip import BLIP

TEACHER = "blip_base"
CAPTION = {"num_beams": 3, "max_length": 20, "min_length": 20}
# (task, batch or k) -> (warm-up, timed) calls. CPU: few repeats of the slow rows keep a
# one-thread run of the four models under ~8 minutes; CUDA calls are cheap.
ROWS_CPU = {
    ("image_embed", 1): (1, 7),
    ("image_embed", 32): (1, 3),
    ("itm_rerank", 16): (1, 5),
    ("itm_rerank", 128): (1, 2),
    ("caption", 1): (1, 5),
    ("caption", 8): (1, 2),
}
ROWS_CUDA = {row: (5, 30) for row in ROWS_CPU}
_WORDS = (
    ("brown", "small", "young", "red", "white", "tall", "green", "black"),
    ("dog", "cat", "man", "car", "bird", "woman", "bus", "horse"),
    ("running", "sleeping", "riding", "parked", "sitting", "standing", "waiting", "eating"),
    ("beach", "sofa", "street", "road", "fence", "bridge", "field", "river"),
)


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (a measured value, no interpolation)."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


def candidate_texts(k: int) -> list[str]:
    """k distinct caption-like texts (11 tokens with [CLS] and [SEP])."""
    limit = math.prod(len(choices) for choices in _WORDS)
    if not 1 <= k <= limit:
        raise ValueError(f"k must be in 1..{limit} (distinct candidate texts), got {k}")
    out = []
    for i in range(k):
        words = []
        for choices in _WORDS:  # i in mixed radix: consecutive texts differ in the first word
            i, j = divmod(i, len(choices))
            words.append(choices[j])
        adj, noun, verb, place = words
        out.append(f"a {adj} {noun} is {verb} near the {place} today")
    return out


def time_calls(fn: Callable[[], object], warmup: int, repeats: int, cuda: bool) -> list[float]:
    """Seconds of each of `repeats` calls after `warmup` untimed ones."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return times


@contextmanager
def run_mode(device: torch.device) -> Iterator[None]:
    """Inference mode; on CUDA also bf16 autocast (CPU stays fp32)."""
    cuda = device.type == "cuda"
    with torch.inference_mode(), torch.autocast("cuda", torch.bfloat16, enabled=cuda):
        yield


class Workloads:
    """The calls the rows time, for one model on one device (inputs built once, untimed)."""

    def __init__(self, model: BLIP, device: torch.device, image_size: int, k_max: int) -> None:
        from dlip.eval.retrieval import tokenize_texts
        from dlip.losses.itm import with_first_token
        from dlip.tokenizer import get_tokenizer

        self.model, self.device = model, device
        self.tokenizer = get_tokenizer()
        gen = torch.Generator().manual_seed(0)
        self.pixels = torch.randn(32, 3, image_size, image_size, generator=gen).to(device)
        ids, mask = tokenize_texts(candidate_texts(k_max))  # (k, 35), [CLS] first
        self.text_ids = with_first_token(ids, self.tokenizer.enc_token_id)  # [ENC] for ITM
        self.text_mask = mask
        self.sims = torch.rand(1, k_max, generator=gen).to(device)  # (1, k) ITC cosine
        with run_mode(device):
            self.image_tokens = model.encode_image(self.pixels[:1]).tokens  # (1, N, Dv)

    def image_embed(self, batch: int) -> Tensor:
        with run_mode(self.device):
            return self.model.encode_image(self.pixels[:batch]).feat  # (B, E)

    def itm_rerank(self, k: int) -> tuple[Tensor, Tensor]:
        """One image's top-k texts re-ranked (rerank adds its own inference mode / autocast)."""
        from dlip.eval.retrieval import rerank

        ids, mask, sims = self.text_ids[:k], self.text_mask[:k], self.sims[:, :k]
        return rerank(self.model, self.image_tokens, ids, mask, sims, k=k, itm_batch=k)

    def caption(self, batch: int) -> list[list[int]]:
        from dlip.models.generation import generate_ids

        with run_mode(self.device):
            return generate_ids(
                self.model,
                self.pixels[:batch],
                self.model.config.prompt,
                repetition_penalty=1.0,
                tokenizer=self.tokenizer,
                **CAPTION,
            )

    def call(self, task: str, n: int) -> Callable[[], object]:
        """Row (task, n) as a no-argument call: n = batch, or k for the re-rank."""
        method = {"image_embed": self.image_embed, "itm_rerank": self.itm_rerank}.get(
            task, self.caption
        )
        return lambda: method(n)


VARIANTS = ("fp32", "int8", "onnx", "onnx_int8")


def variant_model(model: BLIP, variant: str, workdir: str) -> Any:
    """The model run as `variant` (see the module docstring); ONNX exports go to workdir."""
    from pathlib import Path

    if variant == "fp32":
        return model
    if variant == "int8":
        from dlip.inference.quant import quantize_model

        return quantize_model(model, "int8", torch.device("cpu"), torch.float32)
    from dlip.inference.onnx import export_onnx, quantize_onnx_dir
    from dlip.inference.ort import OnnxBLIP

    root = Path(workdir) / model.config.name
    if not (root / "onnx" / "manifest.json").is_file():  # onnx and onnx_int8 share one export
        export_onnx(model, root / "onnx")
    if variant == "onnx_int8":
        quantize_onnx_dir(root / "onnx", root / "onnx_int8")
    return OnnxBLIP(root / variant)


def bench_model(
    name: str,
    device: torch.device,
    image_size: int,
    rows: dict[tuple[str, int], tuple[int, int]],
    variants: Sequence[str] = ("fp32",),
) -> list[dict]:
    """Time every row for preset `name` (random weights, seed 0) in each variant."""
    import tempfile

    from dlip.models.presets import create_model

    torch.manual_seed(0)
    model = create_model(name, image_size=image_size).eval().to(device)
    params = sum(p.numel() for p in model.parameters())
    out = []
    with tempfile.TemporaryDirectory() as tmp:
        for variant in variants:
            label = name if variant == "fp32" else f"{name}+{variant}"
            run = variant_model(model, variant, tmp)
            out += _time_rows(label, run, device, image_size, rows, params)
    return out


def _time_rows(
    name: str,
    model: Any,
    device: torch.device,
    image_size: int,
    rows: dict[tuple[str, int], tuple[int, int]],
    params: int,
) -> list[dict]:
    k_max = max([n for task, n in rows if task == "itm_rerank"], default=1)
    work = Workloads(model, device, image_size, k_max)
    out = []
    for (task, n), (warmup, repeats) in rows.items():
        secs = time_calls(work.call(task, n), warmup, repeats, device.type == "cuda")
        median = statistics.median(secs)
        row = {
            "model": name,
            "params": params,
            "task": task,
            "batch": n,  # images (embed, caption) or candidate texts k (re-rank)
            "warmup": warmup,
            "repeats": repeats,
            "median_ms": 1000 * median,
            "p95_ms": 1000 * percentile(secs, 95),
            "per_item_ms": 1000 * median / n,
            "items_per_s": n / median,
            "times_ms": [round(1000 * s, 3) for s in secs],
        }
        print(f"{name:<11}{task:<12}{n:>4}  median {row['median_ms']:10.1f} ms", flush=True)
        out.append(row)
    return out


def variant_speedups(rows: list[dict]) -> dict[str, dict[str, float]]:
    """Per NAME+VARIANT label: {"task@batch": fp32 median of NAME / the variant median}."""
    out: dict[str, dict[str, float]] = {}
    for label in sorted({r["model"] for r in rows if "+" in r["model"]}):
        base = label.split("+")[0]
        out |= speedups([r for r in rows if r["model"] in (base, label)], base)
    return out


def speedups(rows: list[dict], teacher: str) -> dict[str, dict[str, float]]:
    """model -> {"task@batch": teacher median / model median} for rows the teacher has."""
    ref = {(r["task"], r["batch"]): r["median_ms"] for r in rows if r["model"] == teacher}
    out: dict[str, dict[str, float]] = {}
    for r in rows:
        key = (r["task"], r["batch"])
        if r["model"] != teacher and key in ref:
            out.setdefault(r["model"], {})[f"{key[0]}@{key[1]}"] = ref[key] / r["median_ms"]
    return out


def run_latency(
    models: list[str],
    device: str = "cpu",
    image_size: int = 224,
    threads: int | None = None,
    warmup: int | None = None,
    repeats: int | None = None,
    teacher: str = TEACHER,
    variants: Sequence[str] = ("fp32",),
) -> dict:
    """The latency record of `models` on `device`; `warmup` / `repeats` replace the table's."""
    dev = torch.device(device)
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown or not variants:
        raise ValueError(f"--variants {list(variants)}: choose from {VARIANTS}")
    if dev.type != "cpu" and list(variants) != ["fp32"]:
        raise ValueError(f"--variants {list(variants)}: int8 and ONNX Runtime rows are CPU only")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: torch sees no CUDA device")
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"--device must be cpu or cuda[:N], got {device!r}")
    if threads is not None:
        if threads < 1:
            raise ValueError(f"--threads must be >= 1, got {threads}")
        torch.set_num_threads(threads)
    for name, value in (("warmup", warmup), ("repeats", repeats)):
        if value is not None and value < (0 if name == "warmup" else 1):
            raise ValueError(f"--{name} too small: {value}")
    table = ROWS_CUDA if dev.type == "cuda" else ROWS_CPU
    rows_plan = {
        row: (plan[0] if warmup is None else warmup, plan[1] if repeats is None else repeats)
        for row, plan in table.items()
    }
    start = time.perf_counter()
    rows = [r for name in models for r in bench_model(name, dev, image_size, rows_plan, variants)]
    return {
        "benchmark": "latency",
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"),
        "machine": machine(),
        "device": dev.type,
        "dtype": "bfloat16 autocast" if dev.type == "cuda" else "float32",
        "image_size": image_size,
        "weights": "random (preset init, seed 0)",
        "caption": {**CAPTION, "prompt": "the model's (a picture of )"},
        "itm_rerank": "dlip.eval.retrieval.rerank of one image against k texts, itm_batch = k",
        "statistic": "median of the timed calls; p95 nearest-rank (= max when repeats < 20)",
        "teacher": teacher,
        "total_seconds": time.perf_counter() - start,
        "rows": rows,
        "variants": list(variants),
        "speedup_vs_teacher": speedups(rows, teacher),
        "speedup_vs_fp32": variant_speedups(rows),
    }
