"""Does distillation help? A tiny teacher, a student with KD and the same student without KD.

    python benchmarks/kd_experiment.py [--work runs/kd_experiment] [--teacher-steps 800]
                                       [--student-steps 300] [--images 1000]

All three runs use `dlip pretrain` on `dlip data synth` output: the teacher first, from scratch
with the BLIP objectives only (configs/pretrain/tiny_synth_teacher.yaml), then the student of
configs/pretrain/tiny_synth.yaml twice for the same number of steps: with its KD terms, and with
every KD weight set to 0 and no teacher. Each model is then scored on the held-out val split with
the BLIP losses (ITC, ITM with hard negatives from a fixed generator, LM), batches holding one
caption per image so in-batch ITC positives are unambiguous. Results go to
benchmarks/results/kd_experiment.json and docs/kd_experiment.md, whatever they are.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import yaml

import dlip
from dlip.cli.train import pretrain_main as pretrain
from dlip.data.karpathy import load_eval_set
from dlip.fileio import machine
from dlip.losses.itc import itc_loss
from dlip.losses.itm import itm_loss
from dlip.losses.lm import lm_loss
from dlip.tokenizer import get_tokenizer, pre_caption
from dlip.transforms import eval_transform, load_image

TEACHER_YAML = "configs/pretrain/tiny_synth_teacher.yaml"
STUDENT_YAML = "configs/pretrain/tiny_synth.yaml"


def train(config: str, run_dir: Path, steps: int, synth: Path, images: int, *extra: str) -> Path:
    common = [f"run_dir={run_dir}", f"max_steps={steps}", f"data.synth_dir={synth}"]
    common.append(f"data.synth_images={images}")
    start = time.perf_counter()
    if pretrain(["--config", config, *common, *extra]) != 0:
        raise RuntimeError(f"dlip pretrain failed for {run_dir}")
    print(f"{run_dir.name}: {steps} steps in {time.perf_counter() - start:.0f}s")
    return run_dir / "final"


def no_kd_overrides() -> list[str]:
    weights = yaml.safe_load(Path(STUDENT_YAML).read_text())["loss"]["kd"]["weights"]
    return ["teacher.checkpoint=null"] + [f"loss.kd.weights.{k}=0" for k in weights]


@torch.no_grad()
def held_out_losses(model_dir: Path, synth: Path, batch_size: int = 32) -> dict[str, float]:
    """Mean BLIP losses on the val split, over batches of distinct images."""
    model = dlip.load(model_dir).eval()
    tok, tf = get_tokenizer(), eval_transform(model.config)
    ev = load_eval_set(synth / "val.json", synth)
    pixels = torch.stack([tf(load_image(p)) for p in ev.images])  # (N, 3, S, S)
    gen = torch.Generator().manual_seed(0)
    sums, batches = {"loss_itc": 0.0, "loss_itm": 0.0, "loss_lm": 0.0}, 0
    for k in range(min(len(t) for t in ev.img2txt)):  # the k-th caption of every image
        for start in range(0, len(ev.images), batch_size):
            idx = list(range(start, min(start + batch_size, len(ev.images))))
            if len(idx) < 2:
                continue
            texts = [pre_caption(ev.captions[ev.img2txt[i][k]]) for i in idx]
            enc = tok(texts, max_length=30)
            ids, mask = enc["input_ids"], enc["attention_mask"]
            image = model.encode_image(pixels[idx])
            text = model.encode_text(ids, mask)
            itc = itc_loss(image.feat, text.feat, model.temp)
            itm = itm_loss(
                model.itm_logits, image.tokens, ids, mask, itc.sim_i2t, itc.sim_t2i, generator=gen
            )
            lm = lm_loss(
                lambda im, i, m: model.decode(im, i, m).tokens, model.text_decoder.cls,
                image.tokens, ids, mask,
            )  # fmt: skip
            for name, out in (("loss_itc", itc), ("loss_itm", itm), ("loss_lm", lm)):
                sums[name] += float(out.loss)
            batches += 1
    return {name: value / batches for name, value in sums.items()} | {"params": model.num_params()}


def report(result: dict, out_md: Path) -> None:
    rows = [
        "| model | params | held-out ITC | held-out ITM | held-out LM |",
        "|---|---|---|---|---|",
    ]
    for name in ("teacher", "student_kd", "student_nokd"):
        r = result[name]
        rows.append(
            f"| {name} | {r['params'] / 1e6:.2f}M | {r['loss_itc']:.4f} | {r['loss_itm']:.4f} "
            f"| {r['loss_lm']:.4f} |"
        )
    kd, nokd = result["student_kd"], result["student_nokd"]
    better = [t for t in ("loss_itc", "loss_itm", "loss_lm") if kd[t] < nokd[t]]
    m = result["machine"]
    text = [
        "# Distillation on synthetic data: student with KD vs without",
        "",
        f"Produced by `python benchmarks/kd_experiment.py` on {m['cpu']} ({m['cpu_count']} cores),"
        f" torch {m['torch']}, {result['date']}. Teacher {result['teacher_steps']} steps from "
        f"scratch; each student {result['student_steps']} steps; {result['images']} synthetic "
        "images; losses on the held-out val split (lower is better).",
        "",
        *rows,
        "",
        f"The KD student is lower than the no-KD student on {len(better)} of 3 held-out losses"
        f" ({', '.join(better) or 'none'}).",
        "",
    ]
    out_md.write_text("\n".join(text))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, default=Path("runs/kd_experiment"))
    parser.add_argument("--teacher-steps", type=int, default=800)
    parser.add_argument("--student-steps", type=int, default=300)
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/kd_experiment.json"))
    parser.add_argument("--doc", type=Path, default=Path("docs/kd_experiment.md"))
    args = parser.parse_args()
    torch.manual_seed(0)
    synth, w = args.work / "synth", args.work
    teacher = train(TEACHER_YAML, w / "teacher", args.teacher_steps, synth, args.images)
    kd = [f"teacher.checkpoint={teacher}"]
    student_kd = train(STUDENT_YAML, w / "student_kd", args.student_steps, synth, args.images, *kd)
    student_nokd = train(
        STUDENT_YAML, w / "student_nokd", args.student_steps, synth, args.images, *no_kd_overrides()
    )
    result = {
        "benchmark": "kd_experiment",
        "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "machine": machine(),
        "teacher_steps": args.teacher_steps,
        "student_steps": args.student_steps,
        "images": args.images,
        "teacher": held_out_losses(teacher, synth),
        "student_kd": held_out_losses(student_kd, synth),
        "student_nokd": held_out_losses(student_nokd, synth),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    report(result, args.doc)
    print(args.doc.read_text())


if __name__ == "__main__":
    main()
