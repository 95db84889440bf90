"""VQA finetuning (`dlip finetune vqa`) and evaluation (`dlip eval vqa`) on CPU with tiny models
and the synthetic questions: the task's loss is BLIP's, KD from a VQA teacher (every term zero
against an identical teacher), validation / best / test files, 2 processes with gloo, and the
errors raised before step 1."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest
import torch

import dlip
from dlip.cli import main as dlip_main
from dlip.cli.train import finetune_main as main
from dlip.config import ConfigError
from dlip.data.synth_vqa import synthesize_vqa
from dlip.data.synthetic import synthesize
from dlip.eval.common import RESULTS_JSON
from dlip.eval.vqa_eval import RESULT_FILE
from dlip.losses.vqa import vqa_loss
from dlip.models import vqa as vqa_model
from dlip.tokenizer import get_tokenizer
from dlip.train.finetune import load_config
from dlip.train.vqa import build_vqa_task, vqa_inputs

pytestmark = pytest.mark.usefixtures("one_thread")

KD = {
    "loss.kd.weights.kd_lm": 1.0, "loss.kd.weights.kd_rep_fusion": 1.0,
    "loss.kd.weights.kd_hidden_decoder": 1.0, "loss.kd.weights.kd_attn_cross": 1.0,
    "loss.kd.weights.kd_attn_decoder": 1.0, "loss.kd.weights.kd_rep_image": 1.0,
}  # fmt: skip


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth_vqa")
    synthesize(out, 24, seed=0, image_size=32, captions_per_image=2, n_val=4, n_test=4)
    synthesize_vqa(out, seed=0)
    return out


@pytest.fixture(scope="module")
def vqa_teacher(tmp_path_factory):
    torch.manual_seed(5)
    model = dlip.create_model(dlip.get_config("test_tiny").vqa_form())
    return dlip.save(model, tmp_path_factory.mktemp("vqa_teacher") / "teacher")


def overrides(synth, run_dir, **extra) -> list[str]:
    items = {
        "run_dir": str(run_dir), "model.preset": "test_tiny", "data.synth_dir": str(synth),
        "data.batch_size": 4, "data.num_workers": 0, "data.hflip": "false",
        "data.rand_augment": "false", "loss.momentum_distill": "false", "optim.lr": "1.0e-3",
        "eval.batch_size": 8, "eval.vqa_k_test": 4, "run.max_steps": 3, "run.log_every": 1,
        **extra,
    }  # fmt: skip
    return [f"{k}={v}" for k, v in items.items()]


def _batch(synth, n: int = 3) -> dict:
    rows = json.loads((synth / "vqa_train.json").read_text())[:n]
    torch.manual_seed(0)
    batch = {
        "image": torch.randn(n, 3, 32, 32), "question": [r["question"] for r in rows],
        "answers": [["red", "blue"], ["2"], ["yes", "no", "3"]][:n],
        "weights": [[0.7, 0.3], [1.0], [0.5, 0.3, 0.2]][:n],
    }  # fmt: skip
    return vqa_inputs(batch, get_tokenizer(), "cpu")


def test_the_task_loss_is_blips(synth, tmp_path):
    cfg = load_config("vqa", None, overrides(synth, tmp_path))
    task = build_vqa_task(cfg).eval()
    assert task.student.config.vqa and not task.use_itm
    batch = _batch(synth)
    assert batch["n_answers"].tolist() == [2, 1, 3] and batch["answer_ids"].shape[0] == 6
    assert (batch["question_ids"][:, 0] == get_tokenizer().enc_token_id).all()
    terms = task(batch)
    assert set(terms) == {"loss_vqa"}
    s = task.student
    states = s.multimodal(s.encode_image(batch["image"]).tokens, batch["question_ids"],
                          batch["question_mask"]).tokens  # fmt: skip
    n = batch["n_answers"]
    logits = vqa_model.answer_logits(
        s, states.repeat_interleave(n, 0), batch["question_mask"].repeat_interleave(n, 0),
        batch["answer_ids"], batch["answer_mask"],
    )  # fmt: skip
    want = vqa_loss(logits, batch["answer_ids"], batch["answer_mask"], batch["weights"], 3)
    assert float(terms["loss_vqa"].detach()) == pytest.approx(float(want.loss), rel=1e-6)


def test_an_identical_teacher_gives_zero_for_every_kd_term(synth, tmp_path, vqa_teacher):
    """Wiring end to end: a teacher that is the student itself, through the real task forward
    with the KD terms on, gives every term ~0 (equal widths: the projectors are identities,
    and the layer maps pair each layer with itself)."""
    student_dir = tmp_path / "student"
    dlip.save(dlip.load(vqa_teacher), student_dir)
    kd = KD
    cfg = load_config("vqa", None, overrides(
        synth, tmp_path / "run", **{"model.preset": "null", "model.checkpoint": student_dir,
                                    "teacher.checkpoint": vqa_teacher, **kd}))  # fmt: skip
    task = build_vqa_task(cfg, dlip.load(vqa_teacher)).eval()
    terms = task(_batch(synth))
    kd_terms = {k: float(v) for k, v in terms.items() if k.startswith("kd_")}
    assert set(kd_terms) == {k.rsplit(".", 1)[-1] for k in kd}
    assert all(abs(v) < 1e-6 for v in kd_terms.values()), kd_terms
    assert float(terms["loss_vqa"]) > 0


def test_finetune_validates_keeps_the_best_and_tests(synth, tmp_path):
    run_dir = tmp_path / "run"
    assert main(["vqa", *overrides(synth, run_dir)]) == 0
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").open()]
    train = [r for r in rows if "loss" in r]
    assert len(train) == 3 and all(r["loss_vqa"] > 0 for r in train)
    val = [r for r in rows if "val_score" in r]
    assert len(val) == 1 and val[0]["val_score"] == val[0]["val_vqa_overall"]
    assert {"val_vqa_yes/no", "val_vqa_number", "val_vqa_other"} <= set(val[0])
    assert dlip.load(run_dir / "best").config.vqa
    result = json.loads((run_dir / "test" / RESULTS_JSON).read_text())
    assert result["task"] == "vqa" and result["settings"]["mode"] == "rank"
    assert 0 <= result["overall"] <= 100 and set(result["per_answer_type"]) <= {
        "yes/no",
        "number",
        "other",
    }
    official = json.loads((run_dir / "test" / RESULT_FILE).read_text())
    test_ids = [r["question_id"] for r in json.loads((synth / "vqa_test.json").read_text())]
    assert [o["question_id"] for o in official] == test_ids
    answers = set(json.loads((synth / "answer_list.json").read_text()))
    assert all(o["answer"] in answers for o in official)  # rank mode answers from the list


def test_kd_finetune_logs_every_term(synth, tmp_path, vqa_teacher):
    run_dir = tmp_path / "run"
    extra = {"teacher.checkpoint": vqa_teacher, "run.max_steps": 2, **KD}
    assert main(["vqa", *overrides(synth, run_dir, **extra), "--no-test"]) == 0
    train = [r for r in map(json.loads, (run_dir / "metrics.jsonl").open()) if "loss" in r]
    for term in KD:
        assert all(r[term.rsplit(".", 1)[-1]] > 0 for r in train), term


def test_config_errors_come_before_training(synth, tmp_path, vqa_teacher):
    base = overrides(synth, tmp_path)
    with pytest.raises(ConfigError, match=r"loss\.vqa=0 trains nothing"):
        load_config("vqa", None, [*base, "loss.vqa=0"])
    bare = [o for o in base if not o.startswith("data.synth_dir")]
    data = [f"data.train=[{synth}/vqa_train.json]", f"data.val={synth}/vqa_val.json",
            f"data.image_root={synth}"]  # fmt: skip
    with pytest.raises(ConfigError, match=r"needs data\.answer_list"):
        load_config("vqa", None, [*bare, *data])
    with pytest.raises(ConfigError, match=r"data\.answer_list: .*missing\.json not found"):
        load_config("vqa", None, [*bare, *data, f"data.answer_list={tmp_path}/missing.json"])
    assert load_config("vqa", None, [*bare, *data, "eval.vqa_mode=generate"]).task == "vqa"
    cfg = load_config("vqa", None, [*base, f"teacher.checkpoint={vqa_teacher}",
                                    "loss.kd.weights.kd_itc=1.0"])  # fmt: skip
    with pytest.raises(ValueError, match=r"\['kd_itc'\] do not belong to vqa"):
        build_vqa_task(cfg, dlip.load(vqa_teacher))
    pre = tmp_path / "pretraining_teacher"
    dlip.save(dlip.create_model("test_tiny"), pre)
    cfg = load_config("vqa", None, [*base, f"teacher.checkpoint={pre}",
                                    "loss.kd.weights.kd_lm=1.0"])  # fmt: skip
    with pytest.raises(ValueError, match="finetuned VQA teacher"):
        build_vqa_task(cfg, dlip.load(pre))
    retrieval_of_vqa = [*base, "model.preset=dlip_tiny_vqa"]
    with pytest.raises(ConfigError, match="not a VQA model"):
        load_config("retrieval", None, retrieval_of_vqa)


# ----------------------------------------------------------------------------- dlip eval vqa
@pytest.mark.parametrize("mode", ["rank", "generate"])
def test_eval_vqa_writes_results_and_the_official_file(synth, tmp_path, vqa_teacher, mode):
    out = tmp_path / "out"
    args = ["eval", "vqa", "--model", str(vqa_teacher), "--data", str(synth / "vqa_val.json"),
            "--images", str(synth), "--out", str(out), "--mode", mode, "--device", "cpu",
            "--num-workers", "0", "--batch-size", "3", "--k-test", "5"]  # fmt: skip
    if mode == "rank":
        args += ["--answers", str(synth / "answer_list.json")]
    assert dlip_main(args) == 0
    record = json.loads((out / RESULTS_JSON).read_text())
    rows = json.loads((synth / "vqa_val.json").read_text())
    assert record["task"] == "vqa" and record["settings"]["mode"] == mode
    assert record["settings"]["k_test"] == (5 if mode == "rank" else None)
    assert record["data"]["questions"] == len(rows) and "machine" in record
    assert record["model"]["name"] == "test_tiny" and isinstance(record["overall"], float)
    official = json.loads((out / RESULT_FILE).read_text())
    assert [o["question_id"] for o in official] == [r["question_id"] for r in rows]
    assert all(set(o) == {"question_id", "answer"} for o in official)
    assert "VQA accuracy" in (out / "results.md").read_text()


def test_eval_vqa_refuses_bad_inputs_before_loading(synth, tmp_path, capsys):
    pre = tmp_path / "pre"
    dlip.save(dlip.create_model("test_tiny"), pre)
    base = ["eval", "vqa", "--data", str(synth / "vqa_val.json"), "--images", str(synth),
            "--out", str(tmp_path / "o"), "--device", "cpu", "--num-workers", "0"]  # fmt: skip
    assert dlip_main([*base, "--model", str(pre), "--mode", "generate"]) == 2
    assert "is not a VQA model" in capsys.readouterr().err
    assert dlip_main([*base, "--model", str(pre)]) == 2
    assert "--mode rank needs --answers" in capsys.readouterr().err
    bad = tmp_path / "answers.json"
    bad.write_text('{"not": "a list"}')
    assert dlip_main([*base, "--model", str(pre), "--answers", str(bad)]) == 2
    assert "expected a non-empty JSON list" in capsys.readouterr().err


# ------------------------------------------------------------------------ two processes, gloo
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("kd", [False, True], ids=["no_kd", "kd"])
def test_two_process_vqa_finetune(kd, synth, tmp_path, vqa_teacher):
    pretrained = dlip.save(dlip.create_model("test_tiny"), tmp_path / "final")
    run_dir = tmp_path / "run"
    extra = {"model.preset": "null", "model.checkpoint": pretrained, "run.max_steps": 2,
             "run.device": "cpu"}  # fmt: skip
    if kd:
        extra |= {"teacher.checkpoint": vqa_teacher, **KD}
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
        "--master_addr=127.0.0.1", f"--master_port={_free_port()}",
        "-m", "dlip", "finetune", "vqa", *overrides(synth, run_dir, **extra),
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2]
    assert [r for r in rows if "val_vqa_overall" in r]
    result = json.loads((run_dir / "test" / RESULTS_JSON).read_text())
    assert result["world_size"] == 2 and result["data"]["questions"] == len(
        json.loads((synth / "vqa_test.json").read_text())
    )
