"""Training and evaluation at reduced precision on CPU (torch's CPU autocast runs bf16 and fp16):
the forwards autocast, the loss math stays float32, fp16 scales the loss (a gradient scaler,
checkpointed with the run), and the losses stay within a stated tolerance of float32."""

from __future__ import annotations

import json
import math

import pytest
import torch

from dlip.cli.train import finetune_main, pretrain_main
from dlip.data.synthetic import synthesize
from dlip.losses.adapters import KD_TERMS, KDAdapters, KDConfig
from dlip.losses.distill import ITCFeatures, KDInputs, distill_losses
from dlip.losses.itc import itc_loss
from dlip.models.outputs import ImageOutput
from dlip.precision import autocast, autocast_dtype, float32_math, using
from dlip.train.checkpoint import find_latest, load_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")
# bf16 keeps 8 bits of mantissa. Measured at step 1 (test_tiny, every KD term): terms of 0.01
# and more within 0.2% of float32 (kd_itm, 0.0025: 1%); the attention KD terms, ~1e-4 at
# init, within 5e-5 absolute. Asserted: 2% relative or 1e-3 absolute.
BF16_REL = 2e-2


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth_precision")
    synthesize(out, 24, seed=0, image_size=32, captions_per_image=2, n_val=4, n_test=4)
    return out


def _rows(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _pretrain_args(synth, run_dir, precision: str, teacher_dir=None, steps: int = 2) -> list[str]:
    items = {
        "run_dir": run_dir, "max_steps": steps, "model.preset": "test_tiny",
        "data.synth_dir": synth, "data.batch_size": 4, "data.num_workers": 0,
        "data.max_length": 20, "data.hflip": "false", "data.rand_augment": "false",
        "loss.queue_size": 16, "optim.warmup_steps": 0, "optim.lr": "1.0e-4",
        "run.log_every": 1, "run.ckpt_every": 1, "run.device": "cpu", "run.precision": precision,
    }  # fmt: skip
    if teacher_dir is not None:
        items["teacher.checkpoint"] = teacher_dir
        items.update({f"loss.kd.weights.{t}": 1.0 for t in KD_TERMS})
    return [f"{k}={v}" for k, v in items.items()]


def test_precision_names_and_dtypes():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert autocast_dtype(cpu, "auto") is None and autocast_dtype(cuda, "auto") == torch.bfloat16
    assert autocast_dtype(cpu, "bf16") == torch.bfloat16
    assert autocast_dtype(cpu, "fp16") == torch.float16 and autocast_dtype(cpu, "fp32") is None
    with using("bf16"):
        assert autocast_dtype(cpu) == torch.bfloat16
    assert autocast_dtype(cpu) is None
    with pytest.raises(ValueError, match="precision 'fp8'"):
        autocast_dtype(cpu, "fp8")


def test_loss_math_is_float32_under_autocast():
    """ITC similarities and KD math under CPU bf16 autocast equal their float32 values: CPU
    autocast would compute every matmul (and keep softmax) in bf16."""
    torch.manual_seed(0)
    img = torch.nn.functional.normalize(torch.randn(8, 16), dim=-1)
    txt = torch.nn.functional.normalize(torch.randn(8, 16), dim=-1)
    temp = torch.tensor(0.07)
    ref = itc_loss(img, txt, temp).loss
    with autocast(torch.device("cpu"), "bf16"):
        low = itc_loss(img, txt, temp).loss
        assert torch.is_autocast_enabled("cpu")
        with float32_math():
            assert not torch.is_autocast_enabled("cpu")
    assert low.dtype == torch.float32
    assert low.item() == pytest.approx(ref.item(), rel=1e-6)

    kd = KDConfig(weights={"kd_itc": 1.0, "kd_rep_image": 1.0})
    from dlip.models.presets import get_config

    config = get_config("test_tiny")
    adapters = KDAdapters.build(kd, config, config)
    tokens_s = torch.randn(2, 5, config.vision.width)
    tokens_t = torch.randn(2, 5, config.vision.width)

    def inputs(tokens, image, text):
        return KDInputs(
            image=ImageOutput(tokens=tokens, feat=image), itc=ITCFeatures(image, text, temp)
        )

    s_in, t_in = inputs(tokens_s, img[:2], txt[:2]), inputs(tokens_t, img[2:4], txt[2:4])
    ref_kd = distill_losses(s_in, t_in, adapters, kd)
    with autocast(torch.device("cpu"), "bf16"):
        s_low = inputs(tokens_s.bfloat16(), img[:2], txt[:2])  # a bf16 forward's outputs
        low_kd = distill_losses(s_low, t_in, adapters, kd)
    for term in ref_kd:
        assert low_kd[term].dtype == torch.float32
        assert low_kd[term].item() == pytest.approx(ref_kd[term].item(), rel=1e-2), term


def test_pretraining_with_kd_in_bf16_matches_fp32(synth, teacher_dir, tmp_path):
    runs = {}
    for precision in ("fp32", "bf16"):
        run_dir = tmp_path / precision
        assert pretrain_main(_pretrain_args(synth, run_dir, precision, teacher_dir)) == 0
        runs[precision] = _rows(run_dir)
    one, low = runs["fp32"][0], runs["bf16"][0]  # step 1: the same weights, data and draws
    for key in ("loss", "loss_itc", "loss_itm", "loss_lm", *KD_TERMS):
        assert math.isfinite(low[key]), key
        assert low[key] == pytest.approx(one[key], rel=BF16_REL, abs=1e-3), key
    assert all(math.isfinite(r["loss"]) for r in runs["bf16"])


def test_fp16_scales_the_loss_and_resumes_exactly(synth, tmp_path):
    straight, cut = tmp_path / "straight", tmp_path / "cut"
    assert pretrain_main(_pretrain_args(synth, straight, "fp16", steps=4)) == 0
    assert pretrain_main(_pretrain_args(synth, cut, "fp16", steps=2)) == 0
    _, state = load_checkpoint(find_latest(cut))
    assert state["scaler"]["scale"] > 1  # fp16: a loss scale, saved with the run
    assert pretrain_main([*_pretrain_args(synth, cut, "fp16", steps=4), "--resume", "latest"]) == 0
    a, b = _rows(straight), _rows(cut)
    assert [r["step"] for r in b] == [1, 2, 3, 4]
    for ra, rb in zip(a, b, strict=True):
        assert math.isfinite(ra["loss"])
        assert rb["loss"] == pytest.approx(ra["loss"], abs=1e-6), ra["step"]


@pytest.mark.parametrize("task", ["retrieval", "caption"])
def test_finetuning_and_evaluation_in_bf16(task, synth, tmp_path):
    run_dir = tmp_path / task
    items = {
        "run_dir": run_dir, "model.preset": "test_tiny", "data.synth_dir": synth,
        "data.batch_size": 4, "data.num_workers": 0, "data.hflip": "false",
        "data.rand_augment": "false", "loss.momentum_distill": "false", "run.max_steps": 2,
        "run.device": "cpu", "run.precision": "bf16", "eval.k_test": 4, "eval.batch_size": 8,
    }  # fmt: skip
    assert finetune_main([task, *(f"{k}={v}" for k, v in items.items())]) == 0
    assert all(math.isfinite(r.get("loss", 0.0)) for r in _rows(run_dir))
    result = json.loads((run_dir / "test" / "results.json").read_text())
    assert result["settings"]["precision"] == "bf16"
    metric = "r_mean" if task == "retrieval" else "CIDEr"
    assert math.isfinite(result["metrics"][metric])
