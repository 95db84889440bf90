"""VQA finetuning (`dlip finetune vqa`): BLIP_VQA's recipe on the finetuning loop.

    dlip finetune vqa --config configs/finetune/vqa.yaml model.checkpoint=runs/pretrain/final \
        data.image_root=/data/coco data.vg_root=/data/vg
    dlip finetune vqa --config configs/finetune/tiny_synth_vqa.yaml    (offline, synthetic)

The student starts as BLIP_VQA does from a pretraining checkpoint (`io.task_form(model, "vqa")`)
or is a VQA model already. Each step encodes the questions with the image-grounded text encoder
(`[ENC]` first), decodes every (question, answer) pair and takes `losses.vqa.vqa_loss` (BLIP's
weighted answer loss). With `teacher.checkpoint` (a finetuned VQA model) the KD terms of the
image, the question encoder (the `fusion` stream: `[ENC]` state, hidden states, self- and
cross-attention maps) and the answer decoder (`decoder` stream; `kd_lm` on the answer tokens)
are added; text-only and ITC / ITM terms have nothing to read here and are config errors.
Validation answers data.val (rank mode over data.answer_list, or generate) and the best model by
VQA accuracy is kept; with data.test, run_dir/test/ gets `dlip eval vqa`'s files.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from dlip.losses.adapters import KDAdapters, KDConfig, terms_of
from dlip.losses.distill import KDInputs, KDMasks, distill_losses, lm_kd_mask, token_mask
from dlip.losses.vqa import vqa_loss
from dlip.models.blip import BLIP
from dlip.train.config import FinetuneConfig
from dlip.train.task import load_student, start_adapters, teacher_view, weighted_by_tokens

# KD terms that read the unimodal text pass or the ITC / ITM heads: none exists in VQA.
FOREIGN_TERMS = terms_of("text") | {"kd_itm"}


def vqa_inputs(batch: Mapping[str, Any], tokenizer: Any, device: Any) -> dict[str, Tensor]:
    """A collated VQA batch -> the task's inputs in BLIP's layout: questions (B, Tq) with
    `[ENC]` first, every answer of every question (A, Ta) `[DEC] answer [SEP]`, weights (A,),
    answers per question (B,)."""
    from dlip.data.datasets import flatten_answers
    from dlip.models.vqa import answer_inputs, question_inputs

    flat = flatten_answers(dict(batch))
    q_ids, q_mask = question_inputs(tokenizer, list(batch["question"]), device)
    a_ids, a_mask = answer_inputs(tokenizer, flat["answers"], device)
    return {
        "image": batch["image"].to(device, non_blocking=True),
        "question_ids": q_ids, "question_mask": q_mask, "answer_ids": a_ids,
        "answer_mask": a_mask, "weights": flat["weights"].to(device),
        "n_answers": flat["n_answers"].to(device),
    }  # fmt: skip


class VQATask(nn.Module):
    """Student (VQA form) + KD adapters; the frozen teacher attached, not registered (as
    `PretrainTask`, whose loop contract it keeps: `student`, `teacher`, `student_m`,
    `use_itm`, `after_step`)."""

    use_itm = False  # one question per batch suffices (no ITM negatives)
    student_m = None  # no momentum encoder in VQA

    def __init__(
        self,
        cfg: FinetuneConfig,
        student: BLIP,
        teacher: BLIP | None = None,
        adapters: KDAdapters | None = None,
    ) -> None:
        super().__init__()
        if not student.config.vqa:
            raise ValueError(f"VQA finetuning needs a VQA-form student, got {student.config.name}")
        if teacher is not None and not teacher.config.vqa:
            raise ValueError(
                f"teacher.checkpoint={cfg.teacher.checkpoint}: VQA KD needs a finetuned VQA "
                f"teacher (vqa=true), got {teacher.config.name!r}"
            )
        self.kd: KDConfig = cfg.kd_config() if teacher is not None else KDConfig()
        self.student = student
        self.adapters = adapters if adapters is not None else KDAdapters()
        object.__setattr__(self, "teacher", teacher)  # out of parameters(), DDP, checkpoints
        if teacher is not None:
            teacher.requires_grad_(False).eval()

    def train(self, mode: bool = True) -> VQATask:
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()
        return self

    def after_step(self) -> None:
        """Nothing to update after a step (no temperature, no momentum encoder)."""

    def _passes(self, model: BLIP, batch: Mapping[str, Tensor], side: str) -> KDInputs:
        """Image, question encoder and answer decoder passes, tapped for `side`'s KD."""
        a = self.adapters
        pixels = batch["image"]
        if side == "teacher":  # its own size and normalisation of the same crop
            pixels = teacher_view(pixels, self.student.config, model.config)
            pixels = pixels.to(next(model.parameters()).dtype)
        q_ids, q_mask, n = batch["question_ids"], batch["question_mask"], batch["n_answers"]
        image = model.encode_image(pixels, taps=a.taps("image", side))
        question = model.multimodal(image.tokens, q_ids, q_mask, taps=a.taps("fusion", side))
        states = question.tokens.repeat_interleave(n, dim=0)  # (A, Tq, D): one per answer
        decoder = model.decode(
            states, batch["answer_ids"], batch["answer_mask"], taps=a.taps("decoder", side),
            source_mask=q_mask.repeat_interleave(n, dim=0),
        )  # fmt: skip
        keep = lm_kd_mask(batch["answer_mask"])  # (A, Ta) positions that predict a token
        logits = model.text_decoder.cls(decoder.tokens[keep])  # (N, V)
        return KDInputs(image=image, fusion=question, decoder=decoder, lm_logits=logits)

    def forward(self, batch: Mapping[str, Tensor], alpha: float = 0.0) -> dict[str, Tensor]:
        """Unweighted terms: loss_vqa and every enabled kd_* (`alpha` is unused)."""
        student = self._passes(self.student, batch, "student")
        assert student.lm_logits is not None
        out = vqa_loss(student.lm_logits, batch["answer_ids"], batch["answer_mask"],
                       batch["weights"], num_questions=batch["question_ids"].shape[0])  # fmt: skip
        terms = dict(out.terms)
        if self.teacher is None or not self.kd.enabled:
            return terms
        with torch.no_grad():
            teacher = self._passes(self.teacher, batch, "teacher")
        a_mask = batch["answer_mask"]
        masks = KDMasks(fusion=batch["question_mask"], decoder=a_mask, lm=lm_kd_mask(a_mask))
        kd = distill_losses(student, teacher, self.adapters, self.kd, masks)
        counted = {t: token_mask(t, masks) for t in kd}
        return weighted_by_tokens(terms | kd, {t: m for t, m in counted.items() if m is not None})


def build_vqa_task(cfg: FinetuneConfig, teacher: BLIP | None = None) -> VQATask:
    wrong = sorted(set(cfg.kd_config().enabled) & FOREIGN_TERMS)
    if teacher is not None and wrong:
        raise ValueError(f"KD terms {wrong} do not belong to vqa finetuning; set them to 0")
    student = load_student(cfg)
    return VQATask(cfg, student, teacher, start_adapters(cfg, student, teacher))


# ------------------------------------------------------------------------------------ the data
def prepare_synthetic(cfg: FinetuneConfig, image_size: int) -> None:
    """Build data.synth_dir (images, captions) once and its VQA files (rank 0)."""
    from dlip.data.synth_vqa import synthesize_vqa
    from dlip.data.synthdir import synthesize_once
    from dlip.distributed import barrier, is_main_process

    d = cfg.data
    assert d.synth_dir is not None
    synthesize_once(d.synth_dir, d.synth_images, cfg.run.seed, image_size)
    if is_main_process() and not (Path(d.synth_dir) / "answer_list.json").is_file():
        synthesize_vqa(d.synth_dir, seed=cfg.run.seed)
    barrier()


def train_rows(cfg: FinetuneConfig) -> list[dict[str, Any]]:
    """Rows of every train file: `dlip data build vqa` jsonl, or BLIP's JSON read as that
    command reads it (bad rows skipped and counted, printed)."""
    from dlip.data.rows import BuildReport
    from dlip.data.vqa import build_vqa_blip, read_vqa

    files, _, _, root = cfg.data.files(vqa=True)
    rows: list[dict[str, Any]] = []
    for f in files:
        if not Path(f).is_file():
            raise FileNotFoundError(f"data.train: {f} not found")
        if f.endswith(".jsonl"):
            rows.extend(read_vqa(f))
            continue
        report = BuildReport()
        rows.extend(build_vqa_blip([f], report=report, vqa_root=root, vg_root=cfg.data.vg_root,
                                   check_files=False))  # fmt: skip
        if report.skipped:
            print(f"{f}: {report.skipped.summary()}")
    if not rows:
        raise ValueError(f"data.train {list(files)}: no usable VQA rows")
    return rows


def build_vqa_loader(cfg: FinetuneConfig, model_config: Any) -> DataLoader:
    from dlip.data.datasets import VQATrainDataset
    from dlip.data.loader import make_loader
    from dlip.transforms import train_transform

    d = cfg.data
    if d.synth_dir is not None:
        prepare_synthetic(cfg, d.image_size_synth or model_config.vision.image_size)
    transform = train_transform(model_config, d.min_scale, d.rand_augment, d.hflip)
    dataset = VQATrainDataset(train_rows(cfg), transform)
    return make_loader(dataset, d.batch_size, shuffle=True, num_workers=d.num_workers,
                       seed=cfg.run.seed, drop_last=True)  # fmt: skip


def load_questions(cfg: FinetuneConfig, split: str) -> list[dict[str, Any]] | None:
    from dlip.eval.vqa_eval import read_questions

    _, val, test, root = cfg.data.files(vqa=True)
    path = val if split == "val" else test
    return None if path is None else read_questions(path, root or ".", cfg.data.vg_root)


def check_vqa_splits(cfg: FinetuneConfig, test: bool = True) -> None:
    """Read data.val (and data.test), the answer list, and open every image's header before
    step 1 (as the other tasks' `check_eval_splits`)."""
    from dlip.data.common import check_headers
    from dlip.eval.vqa_eval import read_answer_list

    if cfg.data.answers_file():
        read_answer_list(cfg.data.answers_file())
    for split in ("val", "test") if test else ("val",):
        rows = load_questions(cfg, split) or []
        check_headers(sorted({r["image"] for r in rows}), f"data.{split}")


def validate_vqa_fn(cfg: FinetuneConfig):
    """`validate(task, epoch)`: VQA accuracy on data.val, `score` = overall accuracy."""
    cache: dict[str, Any] = {}

    def validate(task: VQATask, epoch: int) -> dict[str, float] | None:
        from dlip.eval.vqa_eval import evaluate_vqa, read_answer_list
        from dlip.precision import using

        if "val" not in cache:
            answers = cfg.data.answers_file()
            cache["val"] = load_questions(cfg, "val")
            cache["answers"] = read_answer_list(answers) if answers else None
        e = cfg.eval
        with using(cfg.run.precision):
            out = evaluate_vqa(
                task.student, cache["val"], cache["answers"], e.vqa_mode, e.vqa_k_test,
                e.num_beams, e.answer_max_length, e.answer_min_length, e.beam_scoring,
                e.batch_size,
            )  # fmt: skip
        metrics = out["metrics"]
        if not metrics:
            return {"score": 0.0}  # ranks other than 0
        flat = {"vqa_overall": metrics["overall"]}
        flat |= {f"vqa_{t}": v for t, v in metrics.get("per_answer_type", {}).items()}
        return flat | {"score": metrics["overall"]}

    return validate


def test_best_vqa(cfg: FinetuneConfig, run_dir: Path) -> Path | None:
    """`dlip eval vqa` of run_dir/best on data.test -> run_dir/test/."""
    from dlip.eval.vqa_eval import run_vqa_eval

    _, _, test, root = cfg.data.files(vqa=True)
    if test is None:
        return None
    best = run_dir / "best"
    if not best.is_dir():
        raise FileNotFoundError(f"{best}: no best checkpoint was saved (no validation ran)")
    e = cfg.eval
    return run_vqa_eval(
        str(best), test, str(root or "."), run_dir / "test", mode=e.vqa_mode,
        answers=cfg.data.answers_file(), k_test=e.vqa_k_test, num_beams=e.num_beams,
        max_length=e.answer_max_length, min_length=e.answer_min_length,
        beam_scoring=e.beam_scoring, vg_images=cfg.data.vg_root, batch_size=e.batch_size,
        device=cfg.run.device, num_workers=0, precision=cfg.run.precision,
    )  # fmt: skip
