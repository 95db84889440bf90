"""Finetuning (`dlip finetune retrieval|caption`) on CPU with tiny models and synthetic data:
what each task trains (image-index positives, the masked prompt), validation and the best
checkpoint, the final test evaluation, KD from a teacher, and the errors raised before step 1."""

from __future__ import annotations

import json

import pytest
import torch

import dlip
from dlip.cli.train import finetune_main as main
from dlip.config import ConfigError
from dlip.data.synthetic import synthesize
from dlip.eval.common import RESULTS_JSON
from dlip.losses.itc import itc_loss
from dlip.losses.lm import lm_loss
from dlip.tokenizer import get_tokenizer
from dlip.train.config import FinetuneConfig, load
from dlip.train.finetune import build_task, load_config, prompt_length

RECALL_KEYS = {"txt_r1", "txt_r5", "txt_r10", "txt_r_mean", "img_r1", "img_r5", "img_r10"}
RECALL_KEYS |= {"img_r_mean", "r_mean"}
CAPTION_KEYS = {"Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr"}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth_ft")
    synthesize(out, 24, seed=0, image_size=32, captions_per_image=2, n_val=5, n_test=5)
    return out


def overrides(synth, run_dir, **extra) -> list[str]:
    items = {
        "run_dir": str(run_dir),
        "model.preset": "test_tiny",
        "data.synth_dir": str(synth),
        "data.batch_size": 4,
        "data.num_workers": 0,
        "data.hflip": "false",
        "data.rand_augment": "false",
        "loss.momentum_distill": "false",
        "optim.lr": "1.0e-3",
        "eval.k_test": 4,
        "eval.batch_size": 8,
        "run.epochs": 1,
        "run.log_every": 1,
        **extra,
    }
    return [f"{k}={v}" for k, v in items.items()]


def _batch(captions: list[str], size: int = 32) -> dict[str, torch.Tensor]:
    tok = get_tokenizer()(captions, max_length=30, padding="longest")
    torch.manual_seed(0)
    return {"image": torch.randn(len(captions), 3, size, size), **tok}


def test_prompt_length_is_blips_four_tokens():
    assert prompt_length("a picture of ") == 4  # [DEC] a picture of


def test_caption_task_trains_lm_only_with_the_prompt_masked(synth, tmp_path):
    cfg = load_config("caption", None, overrides(synth, tmp_path))
    task = build_task(cfg).eval()  # eval: no dropout, so the manual losses match
    assert task.prompt_length == 4 and not task.use_itc and task.student_m is None
    batch = _batch(["a picture of a red circle left of a blue square"] * 2)
    terms = task(batch)
    assert set(terms) == {"loss_lm"}
    s = task.student
    image = s.encode_image(batch["image"]).tokens
    decode = lambda im, i, m: s.decode(im, i, m).tokens  # noqa: E731
    args = (decode, s.text_decoder.cls, image, batch["input_ids"], batch["attention_mask"])
    masked = lm_loss(*args, prompt_length=4).loss
    unmasked = lm_loss(*args, prompt_length=0).loss
    assert float(terms["loss_lm"].detach()) == pytest.approx(float(masked.detach()), rel=1e-6)
    assert abs(masked.item() - unmasked.item()) > 1e-4  # the prompt's tokens were not counted


def test_retrieval_task_counts_captions_of_one_image_as_positives(synth, tmp_path):
    cfg = load_config("retrieval", None, overrides(synth, tmp_path))
    task = build_task(cfg).eval()
    assert not task.use_lm
    batch = _batch(["a red circle", "a crimson disc", "a blue square", "a green star"])
    batch["image_idx"] = torch.tensor([0, 0, 1, 2])  # rows 0 and 1 show the same image
    terms = task(batch)
    assert set(terms) == {"loss_itc", "loss_itm"}
    s = task.student
    img, txt = s.encode_image(batch["image"]).feat, s.encode_text(**_text(batch)).feat
    with_idx = itc_loss(img, txt, s.temp, image_idx=batch["image_idx"]).loss
    one_hot = itc_loss(img, txt, s.temp).loss
    assert terms["loss_itc"].item() == pytest.approx(with_idx.item(), rel=1e-6)
    assert abs(with_idx.item() - one_hot.item()) > 1e-5


def _text(batch):
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}


@pytest.mark.slow
def test_retrieval_finetune_validates_keeps_the_best_and_tests_it(synth, tmp_path):
    run_dir = tmp_path / "run"
    assert main(["retrieval", *overrides(synth, run_dir, **{"run.epochs": 2})]) == 0
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").open()]
    val = [r for r in rows if "val_r_mean" in r]
    assert [r["epoch"] for r in val] == [1, 2]  # after each epoch
    best = json.loads((run_dir / "best.json").read_text())
    assert best["score"] == max(r["val_r_mean"] for r in val)
    assert set(best["metrics"]) >= RECALL_KEYS
    assert dlip.load(run_dir / "best").config.vision.image_size == 32
    result = json.loads((run_dir / "test" / RESULTS_JSON).read_text())
    assert result["task"] == "retrieval" and result["settings"]["k"] == 4
    assert set(result["metrics"]) >= RECALL_KEYS and set(result["metrics_itc"]) >= RECALL_KEYS
    assert result["model"]["checkpoint"] == str((run_dir / "best").resolve())


@pytest.mark.slow
def test_caption_finetune_from_a_checkpoint_with_kd(synth, teacher_dir, tmp_path):
    start = dlip.save(dlip.create_model("test_tiny"), tmp_path / "start")
    extra = {
        "model.preset": "null",
        "model.checkpoint": str(start),
        "teacher.checkpoint": str(teacher_dir),
        "loss.kd.weights.kd_lm": 1.0,
        "loss.kd.weights.kd_rep_decoder": 1.0,
        "max_steps": 3,
    }
    run_dir = tmp_path / "run"
    assert main(["caption", *overrides(synth, run_dir, **extra)]) == 0
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").open()]
    train = [r for r in rows if "loss" in r]
    assert all(r["kd_lm"] > 0 and r["kd_rep_decoder"] > 0 and r["loss_lm"] > 0 for r in train)
    val = [r for r in rows if "val_CIDEr" in r]
    assert len(val) == 1 and val[0]["val_score"] == pytest.approx(
        val[0]["val_CIDEr"] + val[0]["val_Bleu_4"]
    )
    result = json.loads((run_dir / "test" / RESULTS_JSON).read_text())
    assert result["task"] == "caption" and set(result["metrics"]) >= CAPTION_KEYS
    assert result["settings"]["prompt"] == "a picture of "
    assert result["settings"]["beam_scoring"] == "blip"  # BLIP's rule unless eval.beam_scoring


def test_config_errors_come_before_training(synth, tmp_path, teacher_dir):
    base = overrides(synth, tmp_path)
    with pytest.raises(ConfigError, match="exactly one of model"):
        load_config("retrieval", None, [*base, f"model.checkpoint={tmp_path}"])
    bad = [*base, "data.synth_dir=null", f"data.train=[{tmp_path}/missing.json]"]
    with pytest.raises(ConfigError, match=r"data.train\[0\].*not found"):
        load_config("retrieval", None, bad)
    with pytest.raises(ConfigError, match=r"unknown key .eval\.beams."):
        load_config("caption", None, [*base, "eval.beams=3"])
    yaml_file = tmp_path / "cap.yaml"
    yaml_file.write_text("task: caption\n")
    with pytest.raises(ConfigError, match="is a caption config"):
        load_config("retrieval", str(yaml_file), base)
    kd = [*base, f"teacher.checkpoint={teacher_dir}", "loss.kd.weights.kd_lm=1"]
    cfg = load_config("retrieval", None, kd)
    teacher = dlip.load(teacher_dir)
    with pytest.raises(ValueError, match="do not belong to retrieval"):
        build_task(cfg, teacher)
    assert isinstance(load(None, base, cls=FinetuneConfig), FinetuneConfig)
