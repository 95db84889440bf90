"""Finetuning for retrieval and captioning on the pretraining loop (`dlip finetune`).

    dlip finetune retrieval --config configs/finetune/retrieval_coco.yaml \
        model.checkpoint=runs/pretrain/final data.image_root=/data/coco
    dlip finetune caption --config configs/finetune/caption_coco.yaml model.checkpoint=...
    torchrun --nproc_per_node=8 -m dlip finetune retrieval --config ...   (DDP)

What differs from pretraining is only what the task module runs and what the loop is given:

- retrieval: ITC whose positives are every caption of the same image (`image_idx`, also in
  the momentum queue) + ITM with hard negatives that never pick a caption of the same image,
  optionally from all ranks (`loss.itm_all_ranks`, BLIP COCO); no LM.
- caption: LM on `prompt + caption`, the prompt's tokens given and not predicted
  (`prompt_length` = [DEC] + prompt tokens, BLIP's 4 for "a picture of "); generation in
  validation starts from the same prompt.
- vqa: BLIP_VQA's answer loss (dlip.train.vqa, which holds its task, data and validation).
- optional KD from a finetuned teacher: the same `loss.kd` terms and weights as pretraining
  (retrieval: ITC/ITM/encoder terms; caption: LM/decoder terms; a term of the other task is a
  config error).
- validation every `eval.every_epochs` epochs (and after the last step) with `dlip eval`'s
  functions; the best student by r_mean (retrieval) or CIDEr + BLEU-4 (caption) is kept in
  run_dir/best/; with `data.test`, run_dir/test/results.json is the best model's test result.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch.utils.data import DataLoader

from dlip.data.karpathy import EvalSet
from dlip.losses.adapters import terms_of
from dlip.models.blip import BLIP
from dlip.train.config import FinetuneConfig
from dlip.train.loop import Job, run
from dlip.train.task import PretrainTask, load_student, start_adapters

VAL_SAMPLES = 3  # captions logged at each caption validation

# KD terms of the other task are config errors (image terms serve both).
_FOREIGN_TERMS = {"retrieval": terms_of("decoder"), "caption": terms_of("text", "fusion")}


def prompt_length(prompt: str) -> int:
    """[DEC] + the prompt's tokens (BLIP: len(tokenizer(prompt).input_ids) - 1 = 4)."""
    from dlip.tokenizer import get_tokenizer

    ids = get_tokenizer()([prompt], padding="longest")["input_ids"][0]  # [CLS] ... [SEP]
    return int(ids.shape[0]) - 1


def build_task(cfg: FinetuneConfig, teacher: BLIP | None = None) -> PretrainTask:
    """The finetuning task module: the pretraining task with this task's objectives."""
    wrong = sorted(set(cfg.kd_config().enabled) & _FOREIGN_TERMS[cfg.task])
    if teacher is not None and wrong:
        raise ValueError(f"KD terms {wrong} do not belong to {cfg.task} finetuning; set them to 0")
    student = load_student(cfg)
    adapters = start_adapters(cfg, student, teacher)
    plen = prompt_length(cfg.eval.prompt) if cfg.task == "caption" else 0
    return PretrainTask(cfg, student, teacher, adapters, cfg.objectives, prompt_length=plen)


def train_rows(cfg: FinetuneConfig) -> list[dict[str, Any]]:
    """Rows of every train file: Karpathy json (joined to the image root) or manifest jsonl.
    Missing images and empty captions are skipped and counted (printed), as `dlip data`."""
    from dlip.data.common import read_manifest
    from dlip.data.karpathy import build_karpathy
    from dlip.data.manifest import BuildReport

    files, _, _, root = cfg.data.files()
    rows: list[dict[str, Any]] = []
    for f in files:
        if not Path(f).is_file():
            raise FileNotFoundError(f"data.train: {f} not found")
        if f.endswith(".jsonl"):
            rows.extend(read_manifest(f))
            continue
        report = BuildReport()
        # Images and captions are checked as they are loaded (skips counted in the run's
        # metrics), not all at start-up.
        rows.extend(build_karpathy(f, root, report=report, check_files=False, check_captions=False))
        if report.skipped:
            print(f"{f}: {report.skipped.summary()}")
    if not rows:
        raise ValueError(f"data.train {list(files)}: no usable rows")
    return rows


def build_loader(cfg: FinetuneConfig, model_config: Any) -> DataLoader:
    from dlip.data.datasets import CaptionTrainDataset, RetrievalTrainDataset
    from dlip.data.loader import make_loader
    from dlip.data.synthdir import synthesize_once
    from dlip.transforms import train_transform

    d = cfg.data
    if d.synth_dir is not None:
        size = d.image_size_synth or model_config.vision.image_size
        synthesize_once(d.synth_dir, d.synth_images, cfg.run.seed, size)
    transform = train_transform(model_config, d.min_scale, d.rand_augment, d.hflip)
    rows = train_rows(cfg)
    if cfg.task == "retrieval":
        dataset: Any = RetrievalTrainDataset(rows, transform, max_words=d.max_words)
    else:
        dataset = CaptionTrainDataset(rows, transform, d.max_words, prompt=cfg.eval.prompt)
    return make_loader(
        dataset, d.batch_size, shuffle=True, num_workers=d.num_workers, seed=cfg.run.seed,
        drop_last=True,
    )  # fmt: skip


def load_split(cfg: FinetuneConfig, split: str) -> EvalSet | None:
    from dlip.data.karpathy import load_eval_set

    _, val, test, root = cfg.data.files()
    path = val if split == "val" else test
    return None if path is None else load_eval_set(path, root)


def check_eval_splits(cfg: FinetuneConfig, test: bool = True) -> None:
    """Read data.val (and data.test when the run will test) and open every image's header,
    before step 1: a missing, unreadable or non-image evaluation file would otherwise end the
    run at its first validation, after an epoch of training. (A file truncated past its header
    is found only when it is decoded, at validation: decoding every image here would cost a
    COCO run minutes at each start.)"""
    from dlip.data.common import check_headers

    for split in ("val", "test") if test else ("val",):
        eval_set = load_split(cfg, split)  # a missing image file: FileNotFoundError
        check_headers([] if eval_set is None else eval_set.images, f"data.{split}")


def validate_fn(cfg: FinetuneConfig):
    """`validate(task, epoch)` for the loop: val metrics + `score` on rank 0 (every rank runs),
    at the run's precision."""
    eval_set: dict[str, EvalSet | None] = {}

    def validate(task: PretrainTask, epoch: int) -> dict[str, Any] | None:
        if "val" not in eval_set:
            eval_set["val"] = load_split(cfg, "val")
        split = eval_set["val"]
        assert split is not None  # validate() requires data.val
        from dlip.precision import using

        with using(cfg.run.precision):
            return evaluate(cfg, task.student, split)

    return validate


def evaluate(cfg: FinetuneConfig, model: BLIP, split: EvalSet) -> dict[str, Any]:
    """The protocol's metrics and the selection `score` (r_mean; CIDEr + Bleu_4); captioning
    adds `samples`, the first VAL_SAMPLES captions with a reference each."""
    e = cfg.eval
    device = next(model.parameters()).device
    if cfg.task == "retrieval":
        from dlip.eval.retrieval import evaluate_retrieval

        out = evaluate_retrieval(
            model, split, k=e.k_test, batch_size=e.batch_size, itm_batch=e.itm_batch,
            device=device, max_words=cfg.data.max_words,
        )  # fmt: skip
        metrics = dict(out["metrics"]) | {f"itc_{k}": v for k, v in out["metrics_itc"].items()}
        return metrics | {"score": metrics["r_mean"]}
    from dlip.eval.captioning import evaluate_captions, references_of

    out = evaluate_captions(
        model, split, prompt=e.prompt, num_beams=e.num_beams, max_length=e.max_length,
        min_length=e.min_length, batch_size=e.batch_size, device=device,
        beam_scoring=e.beam_scoring,
    )  # fmt: skip
    metrics = dict(out.get("metrics") or {})
    if not metrics:  # ranks other than 0 get no metrics
        return {"score": 0.0}
    refs = references_of(split)
    samples = [  # the loop logs these beside the metrics (train.log, tensorboard, wandb)
        {"image": i, "caption": c, "reference": refs[i][0]}
        for i, c in list(out["predictions"].items())[:VAL_SAMPLES]
    ]
    return metrics | {"score": metrics["CIDEr"] + metrics["Bleu_4"], "samples": samples}


def test_best(cfg: FinetuneConfig, run_dir: Path) -> Path | None:
    """`dlip eval` of run_dir/best on data.test -> run_dir/test/results.json (+ .md)."""
    _, _, test, root = cfg.data.files()
    if test is None:
        return None
    best = run_dir / "best"
    if not best.is_dir():
        raise FileNotFoundError(f"{best}: no best checkpoint was saved (no validation ran)")
    e, out = cfg.eval, run_dir / "test"
    shared = {"batch_size": e.batch_size, "num_workers": 0, "device": cfg.run.device}
    shared["precision"] = cfg.run.precision
    if cfg.task == "retrieval":
        from dlip.eval.retrieval import run_retrieval_eval

        run_retrieval_eval(
            str(best), test, str(root or "."), out, k=e.k_test, itm_batch=e.itm_batch,
            max_words=cfg.data.max_words, **shared,
        )  # fmt: skip
    else:
        from dlip.eval.captioning import run_caption_eval

        run_caption_eval(
            str(best), test, str(root or "."), out, prompt=e.prompt, num_beams=e.num_beams,
            max_length=e.max_length, min_length=e.min_length, beam_scoring=e.beam_scoring,
            **shared,
        )  # fmt: skip
    return out / "results.json"


# ------------------------------------------------------------------------------------ the run
def load_config(
    task: str, path: str | None, overrides: Sequence[str], validate: bool = True
) -> FinetuneConfig:
    """The run config; the yaml's `task` (if any) must be the command's."""
    from dlip.config import ConfigError
    from dlip.train.config import load

    cfg = load(path, overrides, validate=False, cls=FinetuneConfig)
    if path is not None and cfg.task != task and _yaml_sets_task(path):
        raise ConfigError(f"{path} is a {cfg.task} config; `dlip finetune {task}` cannot run it")
    return load(path, [*overrides, f"task={task}"], validate=validate, cls=FinetuneConfig)


def _yaml_sets_task(path: str) -> bool:
    import yaml

    data = yaml.safe_load(Path(path).read_text()) or {}
    return isinstance(data, dict) and "task" in data


def finetune(cfg: FinetuneConfig, resume: str | None = None, test: bool = True) -> Path:
    """Finetune as `cfg` says, then (with `test` and data.test) evaluate the best model on the
    test split; returns run_dir/final."""

    if cfg.task == "vqa":
        return _finetune_vqa(cfg, resume, test)

    def loader_then_check(cfg: FinetuneConfig, model_config: Any) -> DataLoader:
        out = build_loader(cfg, model_config)  # builds data.synth_dir first when it is absent
        check_eval_splits(cfg, test)
        return out

    job = Job(build_task=build_task, build_loader=loader_then_check, validate=validate_fn(cfg))
    final = run(cfg, job, resume=resume)
    if test:
        test_best(cfg, Path(cfg.run.run_dir))
    return final


def _finetune_vqa(cfg: FinetuneConfig, resume: str | None, test: bool) -> Path:
    from dlip.train import vqa

    def loader_then_check(cfg: FinetuneConfig, model_config: Any) -> DataLoader:
        out = vqa.build_vqa_loader(cfg, model_config)  # builds the synthetic set first
        vqa.check_vqa_splits(cfg, test)
        return out

    job = Job(vqa.build_vqa_task, loader_then_check, vqa.validate_vqa_fn(cfg))  # type: ignore[arg-type]
    final = run(cfg, job, resume=resume)
    if test:
        vqa.test_best_vqa(cfg, Path(cfg.run.run_dir))
    return final
