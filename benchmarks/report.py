"""Rewrite the tables of docs/benchmarks.md from benchmarks/results/*.json.

    python benchmarks/report.py [--doc docs/benchmarks.md] [--results benchmarks/results]
        [--check]

The doc's prose is hand-written; each table sits in a marked region

    <!-- table:NAME -->
    ...generated...
    <!-- /table -->

and only those regions are replaced: NAME picks a renderer (RENDERERS) and the JSON it reads.
Every rendered region starts with the machine, versions and date taken from its JSON. A region
whose JSON is missing is left as it is (reported on stderr); an unknown NAME is an error.
`--check` exits 1 when the doc is not what the JSON files render (nothing is written).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Callable
from pathlib import Path

REGION = re.compile(r"(<!-- table:([\w-]+) -->\n)(.*?)(<!-- /table -->)", re.S)
# DLIP's headline (arXiv 2308.12956), for the latency records, which do not carry it.
DLIP = {"params": 0.224, "flops": 0.248, "speedup": 2.7}
TASK_NAMES = {
    "image_embed": "image embedding",
    "itm_rerank": "ITM re-rank",
    "caption": "caption, 3 beams",
}


# ------------------------------------------------------------------------------- formatting
def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def num(value: float) -> str:
    """Three significant-ish digits without scientific notation for timings and rates."""
    if value >= 100:
        return f"{value:.0f}"
    if value >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}" if value >= 0.1 else f"{value:.3f}"


def pct(value: float | None) -> str:
    return "" if value is None else f"{value:.1%}"


def machine_line(record: dict) -> str:
    m = record["machine"]
    gpu = "no GPU" if m.get("gpu", "none") == "none" else f"GPU {m['gpu']}"
    return (
        f"*Machine: {m['cpu']}, {m['cpu_count']} cores, torch threads {m['torch_threads']}, "
        f"{gpu}; {m['platform']}; Python {m['python']}, torch {m['torch']}, dlip {m['dlip']}; "
        f"run {record.get('date', '?')}.*"
    )


# ------------------------------------------------------------------------------- size
def _size_table(record: dict, size: int) -> str:
    header = ["model", "retrieval params", "captioning params", "total params"]
    header += ["image embed", "text embed", "ITM pair", "caption token", "3-beam caption"]
    rows = []
    for r in record["models"]:
        if r["image_size"] != size:
            continue
        p, f = r["params"], r["flops"]
        cells = [f"{p[k] / 1e6:.1f}M" for k in ("retrieval", "captioning", "total")]
        keys = ("image_embed", "text_embed", "itm_pair", "caption_token", "caption_3beam")
        cells += [f"{f[k] / 1e9:.2f}" if k in f else "" for k in keys]
        rows.append([r["name"], *cells])
    return f"**{size} px** (FLOPs in GFLOPs, batch 1)\n\n" + table(header, rows)


def size_tables(record: dict) -> str:
    sizes = sorted({r["image_size"] for r in record["models"]})
    return "\n\n".join(_size_table(record, s) for s in sizes)


def size_ratios(record: dict) -> str:
    teacher = record["teacher"]
    refs = {r["image_size"]: r for r in record["models"] if r["name"] == teacher}
    header = ["model", "px", "retrieval params", "total params", "image embed FLOPs"]
    header += ["embed FLOPs (image + text)", "ITM pair FLOPs", "3-beam caption FLOPs"]
    rows = []
    for r in record["models"]:
        if r["name"] == teacher:
            continue
        v, f, ref = r["vs_teacher"], r["flops"], refs[r["image_size"]]["flops"]
        embed = (f["image_embed"] + f["text_embed"]) / (ref["image_embed"] + ref["text_embed"])
        cells = [v.get("params.retrieval"), v.get("params.total"), v.get("flops.image_embed")]
        cells += [embed, v.get("flops.itm_pair"), v.get("flops.caption_3beam")]
        rows.append([r["name"], str(r["image_size"]), *map(pct, cells)])
    pub = record.get("published")
    if pub:
        rows.append(
            ["*DLIP paper*", "?", f"*{pub['params']:.1%}*", "", "", f"*{pub['flops']:.1%}*"]
        )
        rows[-1] += ["", ""]
    return f"Relative to {teacher}.\n\n" + table(header, rows)


# ------------------------------------------------------------------------------- latency
def latency_table(record: dict) -> str:
    header = ["model", "task", "batch / k", "warmup", "repeats", "median ms", "p95 ms"]
    header += ["per item ms", "items/s"]
    rows = [
        [
            r["model"],
            TASK_NAMES.get(r["task"], r["task"]),
            str(r["batch"]),
            str(r["warmup"]),
            str(r["repeats"]),
            num(r["median_ms"]),
            num(r["p95_ms"]),
            num(r["per_item_ms"]),
            num(r["items_per_s"]),
        ]
        for r in record["rows"]
    ]
    note = (
        f"{record['device']}, {record['dtype']}, {record['image_size']} px, "
        f"weights {record['weights']}; whole run {record['total_seconds']:.0f} s."
    )
    return note + "\n\n" + table(header, rows)


def speedup_table(record: dict) -> str:
    teacher = record["teacher"]
    params = {r["model"]: r["params"] for r in record["rows"]}
    keys = list(dict.fromkeys(f"{r['task']}@{r['batch']}" for r in record["rows"]))
    labels = []
    for key in keys:
        task, n = key.split("@")
        labels.append(
            f"{TASK_NAMES.get(task, task)} ({'k' if task == 'itm_rerank' else 'batch'} {n})"
        )
    rows = []
    for model, ratios in record["speedup_vs_teacher"].items():
        cells = [f"{ratios[k]:.2f}x" if k in ratios else "" for k in keys]
        rows.append([model, pct(params[model] / params[teacher]), *cells])
    paper = [f"*{DLIP['params']:.1%}*", f"*{DLIP['speedup']}x* (task, protocol unpublished)"]
    rows.append(["*DLIP paper*", *paper, *[""] * (len(keys) - 1)])
    return f"Speed-up = {teacher} median / model median, same run.\n\n" + table(
        ["model", "params vs teacher", *labels], rows
    )


# ------------------------------------------------------------------------------- older runs
def eval_rerank(record: dict) -> str:
    r = record["rerank_vs_loop"]
    header = ["method", "pairs scored", "seconds", "speed-up", "max abs score diff", "same order"]
    rows = [
        ["loop (pair by pair)", str(r["loop_pairs"]), f"{r['loop_seconds']:.3f}", "1.00x", "", ""],
        [
            "batched, unique pairs",
            str(r["batched_unique_pairs"]),
            f"{r['batched_seconds']:.3f}",
            f"{r['speedup']:.2f}x",
            f"{r['max_abs_score_diff']:.1e}",
            str(r["same_top_k_order"]).lower(),
        ],
    ]
    note = (
        f"{r['model']}, {r['image_size']} px, {r['num_images']} images x {r['num_texts']} texts, "
        f"k = {r['k']}, itm_batch {r['itm_batch']}, {r['torch_threads']} thread(s)."
    )
    return note + "\n\n" + table(header, rows)


def eval_itm(record: dict) -> str:
    rows, first = [], None
    for r in record["itm_throughput"].values():
        first = first or r
        rows.append(
            [
                r["model"].split(" ")[0],
                f"{r['params'] / 1e6:.1f}M",
                str(r["unique_pairs"]),
                f"{r['seconds']:.3f}",
                f"{r['pairs_per_s']:.2f}",
            ]
        )
    note = (
        f"{first['image_size']} px, {first['num_images']} images x {first['num_texts']} texts, "
        f"k = {first['k']}, itm_batch {first['itm_batch']}, {first['torch_threads']} thread(s)."
    )
    return note + "\n\n" + table(["model", "params", "unique pairs", "seconds", "pairs/s"], rows)


def eval_caption(record: dict) -> str:
    rows = [
        [
            m["model"],
            f"{m['params'] / 1e6:.1f}M",
            f"{m['seconds_per_pass']:.2f}",
            f"{m['images_per_s']:.3f}",
            f"{m.get('speedup_vs_teacher', 1.0):.2f}x",
        ]
        for m in record["models"]
    ]
    header = ["model", "params", f"seconds per pass ({record['images']} images)", "images/s"]
    return table([*header, "speed-up"], rows)


def train_throughput(record: dict) -> str:
    header = ["configuration", "trainable params", "s/step (median)", "samples/s"]
    header += ["peak RSS GiB", "KD overhead"]
    rows = [
        [
            c["name"],
            f"{c['trainable_params'] / 1e6:.1f}M",
            f"{c['seconds_per_step']:.2f}",
            f"{c['samples_per_s']:.3f}",
            f"{c['peak_memory_gib']:.2f}",
            f"{c['kd_overhead_x']:.2f}x" if "kd_overhead_x" in c else "-",
        ]
        for c in record["configurations"]
    ]
    return table(header, rows)


def lm_head_step(record: dict) -> str:
    labels = list(record["trees"])
    header = ["configuration", *(f"{t} s/step" for t in labels), "speed-up"]
    rows = [
        [
            c["config"],
            *(f"{c[f'{t}_s_per_step']:.3f}" for t in labels),
            f"{c['speedup_x']:.2f}x" if "speedup_x" in c else "-",
        ]
        for c in record["configurations"]
    ]
    return table(header, rows)


def hf_speed(record: dict) -> str:
    header = ["task", "batch", "warmup", "repeats", "dlip ms", "transformers ms"]
    header += ["dlip / transformers", "parity"]
    rows = []
    for r in record["rows"]:
        if "ids_equal" in r:
            parity = f"ids equal: {r['ids_equal']}"
        else:
            parity = f"max abs diff {r['max_abs_diff']:.1e}"
        rows.append(
            [
                r["task"],
                str(r["batch"]),
                str(r["warmup"]),
                str(r["repeats"]),
                num(r["ours_ms"]),
                num(r["hf_ms"]),
                f"{r['ratio']:.2f}",
                parity,
            ]
        )
    note = f"transformers {record['transformers']}; whole run {record['total_seconds']:.0f} s."
    return note + "\n\n" + table(header, rows)


def kd_experiment(record: dict) -> str:
    names = {"teacher": "teacher", "student_kd": "student with KD"}
    names["student_nokd"] = "student without KD"
    rows = [
        [
            label,
            f"{record[key]['params'] / 1e6:.1f}M",
            f"{record[key]['loss_itc']:.3f}",
            f"{record[key]['loss_itm']:.3f}",
            f"{record[key]['loss_lm']:.3f}",
        ]
        for key, label in names.items()
    ]
    return table(["model", "params", "ITC loss", "ITM loss", "LM loss"], rows)


# ------------------------------------------------------------------------ GPU (gpu_check.sh)
def gpu_check(record: dict) -> str:
    header = ["part", "status", "seconds", "time box s", "JSON"]
    rows = [
        [p["part"], p["status"], str(p["seconds"]), str(p["time_box_s"]), f"`{p['json']}`"]
        for p in record["parts"]
    ]
    note = (
        f"nvidia-smi: {record.get('nvidia_smi') or 'n/a'}; CUDA {record.get('torch_cuda')}; "
        f"budget {record['budget_s']} s, whole run {record['elapsed_s']} s."
    )
    return note + "\n\n" + table(header, rows)


def _share(c: dict) -> str:
    if not c["with_teacher"]:
        return "-"
    return f"{pct(c.get('teacher_share_direct'))} / {pct(c.get('teacher_share_difference'))}"


def gpu_train(record: dict) -> str:
    header = ["configuration", "batch", "ms/step (median)", "samples/s"]
    header += ["teacher share (direct / difference)", "TFLOP/s", "MFU", "peak GiB", "warm-up s"]
    rows = []
    for c in record["configurations"]:
        if "seconds_per_step" not in c:
            rows.append([c["name"], str(c["batch_size"]), c.get("error", "not finished")])
            rows[-1] += [""] * (len(header) - 3)
            continue
        rows.append(
            [
                c["name"],
                str(c["batch_size"]),
                num(c["seconds_per_step"] * 1000),
                num(c["samples_per_s"]),
                _share(c),
                num(c["achieved_tflops"]),
                pct(c["mfu"]),
                f"{c['peak_memory_gib']:.2f}",
                f"{sum(c['warmup_times_s']):.1f}",
            ]
        )
    peak = record.get("peak_bf16_flops")
    compiled = f"run.compile ({record['compile_backend']})" if record["compile"] else "eager"
    note = (
        f"{record['device']}, {record['precision']}, {compiled}, {record['image_size']} px; "
        f"median of {record['timed_steps']} steps after {record['warmup_steps']} warm-up; "
        f"MFU against {peak / 1e12:.0f} TFLOP/s; status: {record['status']}."
        if peak
        else f"{record['device']}, {record['precision']}, {compiled}; status: {record['status']}."
    )
    return note + "\n\n" + table(header, rows)


def gpu_itm(record: dict) -> str:
    header = ["model", "params", "itm_batch", "unique pairs", "ms per re-rank", "pairs/s"]
    rows = [
        [r["model"], "", "", "", r["error"], ""]
        if "error" in r
        else [
            r["model"],
            f"{r['params'] / 1e6:.1f}M",
            str(r["itm_batch"]),
            str(r["unique_pairs"]),
            num(r["seconds"] * 1000),
            num(r["pairs_per_s"]),
        ]
        for r in record["rows"]
    ]
    note = (
        f"{record['device']}, {record['precision']}, {record['image_size']} px, "
        f"{record['num_images']} images x {record['num_texts']} texts, k = {record['k']}; "
        f"{record['statistic']}; status: {record['status']}."
    )
    return note + "\n\n" + table(header, rows)


def thumbnail_memory(record: dict) -> str:
    header = [
        "clients",
        "image",
        "answers",
        "server peak RSS idle",
        "peak RSS after",
        "all answered",
    ]
    row = [
        str(record["clients"]), f"{record['megapixels']:.0f} MP PNG",
        "/".join(str(s) for s in record["statuses"]), f"{record['peak_rss_gb_before']:.2f} GB",
        f"{record['peak_rss_gb_after']:.2f} GB", f"{record['seconds_all_answered']:.1f} s",
    ]  # fmt: skip
    return table(header, [row])


def vqa_latency(record: dict) -> str:
    header = ["model", "params", "px", "rank ms", "generate ms", "speed-up rank / generate"]
    rows = []
    for name, m in record["models"].items():
        s = m["speedup_vs_blip_base_vqa"]
        rows.append([
            name, f"{m['params'] / 1e6:.1f}M", str(m["image_size"]),
            num(m["median_ms"]["rank"]), num(m["median_ms"]["generate"]),
            f"{s['rank']:.2f}x / {s['generate']:.2f}x",
        ])  # fmt: skip
    note = (
        f"{record['threads']} thread(s), batch 1, median of {record['repeats']} interleaved "
        f"calls; rank over {record['answer_list']} answers, k_test {record['k_test']}; "
        "generate: 3 beams, 10 tokens; whole run "
        f"{record['seconds']:.0f} s."
    )
    return note + "\n\n" + table(header, rows)


def index_search(record: dict) -> str:
    header = ["images", "IVF lists", "build s", "exact ms", "nprobe", "recall@k", "IVF ms"]
    header.append("faster")
    rows = []
    for size in record["sizes"]:
        for v in size["ivf"]:
            rows.append([
                f"{size['n']:,}", str(size["nlist"]), f"{size['build_s']:.1f}",
                num(size["exact_ms_per_query"]), str(v["nprobe"]), f"{v['recall_at_k']:.3f}",
                num(v["ms_per_query"]), f"{v['speedup_vs_exact']:.1f}x",
            ])  # fmt: skip
    note = (
        f"{record['threads']} thread(s), dim {record['dim']}, k {record['k']}, median ms of "
        f"{record['queries']} single-query searches; data: {record['data']}; faiss "
        f"{record['faiss']}."
    )
    return note + "\n\n" + table(header, rows)


def variant_speedup_table(record: dict) -> str:
    """`dlip bench latency --variants`: each variant against its own model's fp32 rows."""
    keys = list(dict.fromkeys(f"{r['task']}@{r['batch']}" for r in record["rows"]))
    labels = [
        f"{TASK_NAMES.get(t, t)} ({'k' if t == 'itm_rerank' else 'batch'} {n})"
        for t, n in (k.split("@") for k in keys)
    ]
    rows = [
        [model, *[f"{ratios[k]:.2f}x" if k in ratios else "" for k in keys]]
        for model, ratios in record["speedup_vs_fp32"].items()
    ]
    return "Speed-up = the fp32 median / the variant's median, same run.\n\n" + table(
        ["variant", *labels], rows
    )


def _variants(ms: dict[str, float], ref: str) -> str:
    """'shared 12.3 ms (1.40x), ...' against ms[ref]."""
    return ", ".join(f"{k} {num(v)} ms ({ms[ref] / v:.2f}x)" for k, v in ms.items() if k != ref)


def _speed_check(r: dict) -> str:
    text = f"{r['model']} t{r['threads']}: ids shared = per-beam "
    text += str(r["caption_ids_equal_shared_vs_per_beam"])
    if r.get("onnx"):
        text += f", ONNX = PyTorch {r['onnx']['caption_ids_equal_onnx_vs_torch']}"
    text += f", ITM shared = per-pair {r['itm_scores_equal']}"
    return text + f", pixels PIL vs torchvision.io max diff {r['preprocess_max_abs_diff']}"


def inference_speed(record: dict) -> str:
    header = ["model", "threads", "workload", "reference ms", "variants: ms (speed-up)"]
    rows = []
    for r in record["speed"]:
        onnx = r.get("onnx") or {}

        def both(key: str, r: dict = r, onnx: dict = onnx) -> dict[str, float]:
            return r[key] | onnx.get(key, {})

        work = [
            ("caption, 3 beams, 20 tokens", "per_beam", both("caption_3beam_ms")),
            ("image embed, batch 1", "fp32", both("image_embed_b1_ms")),
            ("image embed, batch 8", "fp32", both("image_embed_b8_ms")),
            ("ITM re-rank, 2 images x 16 texts", "per_pair", r["itm_rerank_2x16_ms"]),
            ("JPEG bytes -> pixels (384x255 photo)", "pil", r["preprocess_ms"]),
        ]
        for name, ref, ms in work:
            rows.append([r["model"], str(r["threads"]), name, f"{ref} {num(ms[ref])}",
                         _variants(ms, ref)])  # fmt: skip
    checks = "; ".join(_speed_check(r) for r in record["speed"])
    size = record["speed"][0]["image_size"]
    note = f"Random preset weights at {size} px, calls interleaved, median ms. Checks: {checks}."
    return note + "\n\n" + table(header, rows)


def int8_accuracy(record: dict) -> str:
    header = ["demo model / task", "metric", "float32", "int8", "int8 - float32"]
    rows = []
    for name, row in (record.get("accuracy") or {}).items():
        for metric in row["fp32"]:
            rows.append([name, metric, f"{row['fp32'][metric]:.3f}", f"{row['int8'][metric]:.3f}",
                         f"{row['delta'][metric]:+.3f}"])  # fmt: skip
    return table(header, rows)


def serve_load(record: dict) -> str:
    header = ["threads", "max batch", "requests", "requests/s", "p50 s", "p95 s", "batches"]
    header += ["largest", "identical to single", "speed-up"]
    rows = []
    for name, res in record["results"].items():
        for setting in ("max_batch_1", "max_batch_8"):
            r = res[setting]
            b = r["batching"]
            gain = f"{res['speedup_requests_per_s']:.2f}x" if setting == "max_batch_8" else "1"
            rows.append([
                name.split("_")[1], setting.split("_")[-1], str(r["requests"]),
                f"{r['requests_per_s']:.2f}", f"{r['p50_s']:.2f}", f"{r['p95_s']:.2f}",
                str(b["batches"]), str(b["largest"]), str(r["identical_to_single"]), gain,
            ])  # fmt: skip
    note = (
        f"`{record['model']}`, {record['clients']} concurrent clients x "
        f"{record['requests_per_client']} captions each on loopback."
    )
    return note + "\n\n" + table(header, rows)


# region name -> (results file, renderer)
RENDERERS: dict[str, tuple[str, Callable[[dict], str]]] = {
    "size": ("model_size.json", size_tables),
    "size_ratios": ("model_size.json", size_ratios),
    "latency_cpu": ("latency_cpu.json", latency_table),
    "speedup_cpu": ("latency_cpu.json", speedup_table),
    "latency_cuda": ("latency_cuda.json", latency_table),
    "speedup_cuda": ("latency_cuda.json", speedup_table),
    "eval_rerank": ("eval_retrieval_cpu.json", eval_rerank),
    "eval_itm": ("eval_retrieval_cpu.json", eval_itm),
    "eval_caption": ("eval_caption_cpu.json", eval_caption),
    "train_throughput": ("train_throughput_cpu.json", train_throughput),
    "lm_head_step": ("lm_head_step_cpu.json", lm_head_step),
    "hf_speed": ("hf_speed_cpu.json", hf_speed),
    "hf_speed_2t": ("hf_speed_cpu_2t.json", hf_speed),
    "kd_experiment": ("kd_experiment.json", kd_experiment),
    "gpu_check": ("gpu_check.json", gpu_check),
    "gpu_train_eager": ("gpu_train_eager.json", gpu_train),
    "gpu_train_compile": ("gpu_train_compile.json", gpu_train),
    "gpu_itm": ("gpu_itm.json", gpu_itm),
    "thumbnail_memory": ("thumbnail_memory.json", thumbnail_memory),
    "thumbnail_memory_before": ("thumbnail_memory_before.json", thumbnail_memory),
    "vqa_latency": ("vqa_latency_cpu.json", vqa_latency),
    "index_search": ("index_search_cpu.json", index_search),
    "inference_speed": ("inference_speed_cpu.json", inference_speed),
    "latency_variants": ("latency_variants_cpu.json", latency_table),
    "latency_variants_speedup": ("latency_variants_cpu.json", variant_speedup_table),
    "int8_accuracy": ("inference_speed_cpu.json", int8_accuracy),
    "serve_load": ("serve_load_cpu.json", serve_load),
}


def render(doc: str, results: Path, log: Callable[[str], None] = print) -> str:
    """`doc` with every marked region re-rendered from the JSON files under `results`."""

    def replace(match: re.Match) -> str:
        opening, name, _body, closing = match.groups()
        if name not in RENDERERS:
            raise ValueError(f"unknown table region {name!r}; known: {', '.join(RENDERERS)}")
        file, renderer = RENDERERS[name]
        path = results / file
        if not path.is_file():
            log(f"table:{name}: {path} missing, region kept as it was")
            return match.group(0)
        record = json.loads(path.read_text())
        text = f"{machine_line(record)} Source: `{path.as_posix()}`.\n\n{renderer(record)}\n"
        return opening + text + closing

    return REGION.sub(replace, doc)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--doc", type=Path, default=Path("docs/benchmarks.md"))
    parser.add_argument("--results", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--check", action="store_true", help="exit 1 if the doc is stale")
    args = parser.parse_args(argv)
    doc = args.doc.read_text()
    new = render(doc, args.results, log=lambda msg: print(msg, file=sys.stderr))
    if args.check:
        print(f"{args.doc}: {'up to date' if new == doc else 'stale'}")
        return 0 if new == doc else 1
    args.doc.write_text(new)
    print(f"wrote {args.doc} ({len(REGION.findall(new))} tables)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
