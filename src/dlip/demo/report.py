"""The demo's report: RUN/report.md, RUN/loss_curves.png, RUN/accuracy_vs_latency.png and
thumbnails of the captioned images in RUN/samples/."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from dlip.demo.plan import MODELS
from dlip.fileio import atomic_write_text

LABELS = {"teacher": "teacher", "student_kd": "student + KD", "student_nokd": "student, no KD"}
COLOURS = {"teacher": "tab:blue", "student_kd": "tab:green", "student_nokd": "tab:red"}
BLIP_LOSSES = ("loss_itc", "loss_itm", "loss_lm")


def pretrain_curves(root: Path) -> dict[str, dict[str, list[tuple[int, float]]]]:
    """{model: {loss name: [(step, value)]}} from each pretraining run's metrics.jsonl."""
    curves: dict[str, dict[str, list[tuple[int, float]]]] = {}
    for model in MODELS:
        # the training loop truncates rows past the checkpoint on resume: one row per step
        lines = (root / model / "pretrain" / "metrics.jsonl").read_text().splitlines()
        rows = [json.loads(line) for line in lines]
        curves[model] = {
            name: [(int(r["step"]), float(r[name])) for r in rows] for name in BLIP_LOSSES
        }
    return curves


def plot_losses(root: Path, out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    curves = pretrain_curves(root)
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for ax, name in zip(axes, BLIP_LOSSES, strict=True):
        for model in MODELS:
            points = curves[model][name]
            ax.plot([p[0] for p in points], [p[1] for p in points], label=LABELS[model],
                    color=COLOURS[model])  # fmt: skip
        ax.set_title(f"pretraining {name[5:].upper()} loss (train batches)")
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def plot_accuracy_latency(results: dict[str, Any], out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rerank = next(k for k in results["teacher"]["latency_ms"] if k.startswith("itm_rerank"))
    panels = (
        ("r_mean", rerank, f"retrieval r_mean vs ITM re-rank latency ({rerank[11:]})"),
        ("CIDEr", "caption_3beam", "captioning CIDEr vs 3-beam caption latency"),
    )
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, (metric, task, title) in zip(axes, panels, strict=True):
        for model in MODELS:
            r = results[model]
            x, y = r["latency_ms"][task], r[metric]
            ax.scatter([x], [y], s=60, color=COLOURS[model], label=LABELS[model])
            ax.annotate(f" {LABELS[model]}", (x, y), fontsize=8)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("batch-1 latency, ms (CPU)")
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def thumbnails(results: dict[str, Any], out_dir: Path, size: int = 128) -> dict[str, str]:
    """Copies of the captioned images, at most `size` px, for the report; {name: relative path}."""
    from PIL import Image

    out_dir.mkdir(parents=True, exist_ok=True)
    rel = {}
    for name, path in results["sample_images"].items():
        with Image.open(path) as im:
            im = im.convert("RGB")
            im.thumbnail((size, size))
            if min(im.size) < 64:  # the synthetic images are 64 px: show them larger
                im = im.resize((2 * im.width, 2 * im.height), Image.Resampling.NEAREST)
            im.save(out_dir / f"{name}.jpg", quality=90)
        rel[name] = f"{out_dir.name}/{name}.jpg"
    return rel


def _fmt_flops(n: float) -> str:
    return f"{n / 1e6:.1f}M"


def results_table(results: dict[str, Any]) -> list[str]:
    lat = results["teacher"]["latency_ms"]
    rerank = next(k for k in lat if k.startswith("itm_rerank"))
    head = (
        "| model | params | FLOPs image / ITM pair / caption | latency ms image / "
        f"re-rank {rerank[11:]} / caption | TR@1 | TR@5 | TR@10 | IR@1 | IR@5 | IR@10 | r_mean "
        "| r_mean ITC only | BLEU-4 | CIDEr | VQA % |"
    )
    rows = [head, "|" + "---|" * 16]
    for model in MODELS:
        r = results[model]
        f, ms = r["flops"], r["latency_ms"]
        flops = " / ".join(_fmt_flops(f[k]) for k in ("image_embed", "itm_pair", "caption_3beam"))
        times = " / ".join(f"{ms[k]:.1f}" for k in ("image_embed", rerank, "caption_3beam"))
        recalls = " | ".join(f"{r[k]:.1f}" for k in (
            "txt_r1", "txt_r5", "txt_r10", "img_r1", "img_r5", "img_r10"))  # fmt: skip
        rows.append(
            f"| {LABELS[model]} | {r['params'] / 1e6:.2f}M | {flops} | {times} | {recalls} "
            f"| **{r['r_mean']:.2f}** | {r['itc_only']['r_mean']:.2f} | {r['Bleu_4']:.3f} "
            f"| {r['CIDEr']:.3f} | {r['vqa_overall']:.2f} |"
        )
    return rows


def share_table(results: dict[str, Any]) -> list[str]:
    rows = [
        "| student | params | image FLOPs | speed-up image / re-rank / caption | r_mean kept "
        "| CIDEr kept | BLEU-4 kept | VQA kept |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for model in MODELS[1:]:
        s = results["share_of_teacher"][model]
        speed = " / ".join(f"{v:.2f}x" for k, v in s.items() if k.startswith("speedup_"))
        rows.append(
            f"| {LABELS[model]} | {s['params']:.1%} | {s['flops_image_embed']:.1%} | {speed} "
            f"| {s['r_mean']:.1%} | {s['CIDEr']:.1%} | {s['Bleu_4']:.1%} | {s['vqa_overall']:.1%} |"
        )
    return rows


def samples_table(results: dict[str, Any], thumbs: dict[str, str]) -> list[str]:
    refs = results["sample_references"]
    rows = ["| image | reference | " + " | ".join(LABELS[m] for m in MODELS) + " |"]
    rows.append("|" + "---|" * (2 + len(MODELS)))
    for name, rel in thumbs.items():
        ref = refs[name][0] if name in refs else "(bundled photo: not in the training domain)"
        caps = " | ".join(results[m]["samples"][name] for m in MODELS)
        rows.append(f"| ![{name}]({rel}) | {ref} | {caps} |")
    return rows


def verdict(results: dict[str, Any]) -> str:
    kd, nokd = results["student_kd"]["r_mean"], results["student_nokd"]["r_mean"]
    t = results["teacher"]["r_mean"]
    word = "above" if kd > nokd else "not above"
    return (
        f"The KD student's test r_mean ({kd:.2f}) is **{word}** the no-KD student's ({nokd:.2f}); "
        f"the teacher's is {t:.2f}, so the KD student keeps "
        f"{results['share_of_teacher']['student_kd']['r_mean']:.1%} of it."
    )


def write_report(results: dict[str, Any], root: Path) -> Path:
    plot_losses(root, root / "loss_curves.png")
    plot_accuracy_latency(results, root / "accuracy_vs_latency.png")
    thumbs = thumbnails(results, root / "samples")
    plan, m = results["demo"], results["machine"]
    total = sum(results["stage_seconds"].values())
    lines = [
        f"# dlip demo ({plan['name']}): distilling a BLIP teacher into a smaller student",
        "",
        f"{results['date']} on {m['cpu']} ({m['cpu_count']} cores), torch {m['torch']}. "
        f"Synthetic data: {plan['train_images']} training images (5 captions each), "
        f"{plan['test_images']} test images; teacher {plan['teacher_steps']} pretraining steps, "
        f"each student {plan['student_steps']}; every model then finetuned "
        f"{plan['finetune_steps']} steps for retrieval and for captioning, {plan['vqa_steps']} for "
        f"VQA. Training stages took {total:.0f}s.",
        "",
        verdict(results),
        "",
        "## Test split, after finetuning (`dlip eval` metrics)",
        "",
        *results_table(results),
        "",
        "TR = text retrieval (image -> text), IR = image retrieval; R@k in %, r_mean = mean of the",
        f"six; re-ranked by ITM over the top {plan['k_test']} ITC candidates (BLIP's protocol). "
        "FLOPs are forward FLOPs at batch 1; latency is the batch-1 median on this machine, one "
        "thread, the three models' calls interleaved (the caption: 3 beams, a fixed 20 tokens, "
        "as `dlip bench latency`). The two students have the same shapes: the gap between their "
        "latencies is the measurement's noise. VQA % = the official VQA accuracy on the test "
        "split's synthetic questions (colour, shape at a relation, count, yes/no), answers ranked "
        "from the set's answer list (BLIP's rank mode), after VQA finetuning of each model's "
        "BLIP_VQA form.",
        "",
        "## Student vs teacher",
        "",
        *share_table(results),
        "",
        "## Pretraining losses",
        "",
        "![loss curves](loss_curves.png)",
        "",
        "![accuracy vs latency](accuracy_vs_latency.png)",
        "",
        '## Sample captions (3 beams, prompt "a picture of")',
        "",
        *samples_table(results, thumbs),
        "",
        "Each model was trained only on synthetic shapes, so captions of the real photos show",
        "what the models know (shapes, colours), not a useful caption.",
        "",
        "## Reproduce",
        "",
        f"`dlip demo{' --quick' if plan['name'] == 'quick' else ''} --out {root}`: every stage "
        f"is a plain dlip run whose config is in {root / 'configs'}.",
    ]
    out = root / "report.md"
    atomic_write_text(out, "\n".join(lines) + "\n")
    return out
