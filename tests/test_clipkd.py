"""CLIP-KD's terms (kd_feat, kd_icl) by hand, and the teacher-feature queue through the task."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dlip
from dlip.config import ConfigError
from dlip.data.synthetic import synthesize
from dlip.losses.clipkd import TeacherKeys, feature_kd, icl_kd
from dlip.losses.itc import itc_loss
from dlip.tokenizer import get_tokenizer
from dlip.train.config import load
from dlip.train.loop import to_inputs
from dlip.train.pretrain import build_loader, build_task
from dlip.train.task import load_teacher

pytestmark = pytest.mark.usefixtures("one_thread")


def unit(*rows):
    return F.normalize(torch.tensor(rows, dtype=torch.float32), dim=-1)


def test_feature_kd_is_the_mean_squared_distance_of_unit_embeddings():
    s_img, s_txt = unit([1.0, 0.0], [0.0, 1.0]), unit([1.0, 1.0], [1.0, 0.0])
    t_img, t_txt = unit([0.0, 1.0], [0.0, 1.0]), unit([1.0, 1.0], [0.0, 1.0])
    ident = nn.Identity()
    # image rows: |(1,0)-(0,1)|^2 = 2 and 0; text rows: 0 and 2 -> means 1 and 1 -> 1
    assert feature_kd(s_img, s_txt, t_img, t_txt, ident, ident).item() == pytest.approx(1.0)
    assert feature_kd(t_img, t_txt, t_img, t_txt, ident, ident).item() == pytest.approx(0.0)
    # Another width: a linear map, re-normalised; gradient reaches it and the student only.
    proj = nn.Linear(2, 3)
    s = s_img.clone().requires_grad_(True)
    t3 = unit([1.0, 2.0, 3.0], [0.0, 0.0, 1.0])
    loss = feature_kd(s, s, t3, t3, proj, proj)
    loss.backward()
    want = (F.normalize(proj(s_img), dim=-1) - t3).pow(2).sum(-1).mean()
    assert loss.item() == pytest.approx(want.item(), rel=1e-6)
    assert proj.weight.grad.abs().sum() > 0 and s.grad.abs().sum() > 0


def test_icl_kd_scores_student_queries_against_teacher_keys():
    torch.manual_seed(0)
    s_img, s_txt = F.normalize(torch.randn(3, 4), dim=-1), F.normalize(torch.randn(3, 4), dim=-1)
    t_img, t_txt = F.normalize(torch.randn(5, 4), dim=-1), F.normalize(torch.randn(5, 4), dim=-1)
    ident, temp = nn.Identity(), 0.2
    keys = TeacherKeys(t_img, t_txt)  # 3 batch keys + 2 queued ones
    got = icl_kd(s_img, s_txt, keys, temp, ident, ident)
    want = 0.0
    for i in range(3):  # row i's positive is teacher key i; every key is in the denominator
        for q, k in ((s_img, t_txt), (s_txt, t_img)):
            logits = [float(q[i] @ k[j]) / temp for j in range(5)]
            want += -(logits[i] - math.log(sum(math.exp(x) for x in logits))) / 6
    assert got.item() == pytest.approx(want, rel=1e-5)
    # Identical features and no queue: exactly the symmetric in-batch ITC loss.
    same = icl_kd(s_img, s_txt, TeacherKeys(s_img, s_txt), temp, ident, ident)
    itc = itc_loss(s_img, s_txt, torch.tensor(temp))
    assert same.item() == pytest.approx(itc.loss.item(), rel=1e-6)
    # Image ids: a key showing the same image shares the target with the own column.
    ids = TeacherKeys(t_img, t_txt, idx=torch.tensor([0, 0, 1, -100, 7]),
                      row_idx=torch.tensor([0, 0, 1]))  # fmt: skip
    logp = F.log_softmax(s_img @ t_txt.T / temp, dim=1)
    i2t = -(logp[0, :2].mean() + logp[1, :2].mean() + logp[2, 2]) / 3
    logp = F.log_softmax(s_txt @ t_img.T / temp, dim=1)
    t2i = -(logp[0, :2].mean() + logp[1, :2].mean() + logp[2, 2]) / 3
    got_ids = icl_kd(s_img, s_txt, ids, temp, ident, ident)
    assert got_ids.item() == pytest.approx(((i2t + t2i) / 2).item(), rel=1e-5)


# --------------------------------------------------------------------- through the real task
@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth_clipkd")
    synthesize(out, 20, seed=0, image_size=32, captions_per_image=2)
    return out


def test_the_teacher_queue_keys_earlier_teacher_embeddings(synth, tmp_path):
    torch.manual_seed(0)
    teacher_dir = dlip.save(dlip.create_model("test_tiny"), tmp_path / "teacher")
    items = {
        "run_dir": tmp_path / "run", "max_steps": 1, "data.synth_dir": synth,
        "data.batch_size": 4, "data.num_workers": 0, "data.max_length": 20,
        "data.hflip": "false", "data.rand_augment": "false", "loss.momentum_distill": "false",
        "teacher.checkpoint": teacher_dir, "model.preset": "test_tiny",
        "loss.kd.weights.kd_icl": 1.0, "loss.kd.weights.kd_feat": 1.0,
        "loss.kd.teacher_queue": 6,
    }  # fmt: skip
    cfg = load(None, [f"{k}={v}" for k, v in items.items()])
    task = build_task(cfg, load_teacher(cfg)).eval()
    assert {"embed_image", "embed_text"} <= set(task.adapters)
    q = task.teacher_queue
    assert q is not None and q.size == 6 and "teacher_queue.image_queue" in task.state_dict()
    loader = build_loader(cfg, task.student.config)
    loader.set_epoch(0)
    raw = list(loader)
    assert len(raw) >= 2
    batches = [to_inputs(b, get_tokenizer(), 20, "cpu") for b in raw[:2]]
    first = task(batches[0])
    assert first["kd_icl"] > 0 and first["kd_feat"] > 0
    with torch.no_grad():  # the queue now holds the teacher's embeddings of batch 1
        t = task.teacher
        want_img = t.encode_image(batches[0]["image"]).feat
        want_txt = t.encode_text(batches[0]["input_ids"], batches[0]["attention_mask"]).feat
    assert int(q.ptr) == 4
    torch.testing.assert_close(q.image_queue[:, :4].T, want_img)
    torch.testing.assert_close(q.text_queue[:, :4].T, want_txt)
    # The second batch is keyed against its own 4 teacher embeddings + the 6 queued ones.
    seen = []
    original = task._teacher_keys
    task._teacher_keys = lambda itc, idx: seen.append(original(itc, idx)) or seen[-1]
    task(batches[1])
    keys = seen[0]
    assert keys.image.shape[0] == 4 + 6
    torch.testing.assert_close(keys.image[4:8], want_img)
    assert int(q.ptr) == 2  # wrapped around: 4 + 4 rows in a queue of 6


def test_teacher_queue_must_be_a_non_negative_int():
    from dlip.losses.adapters import KDConfig

    with pytest.raises(ValueError, match="teacher_queue"):
        KDConfig(teacher_queue=-1)
    with pytest.raises(ValueError, match="teacher_queue"):
        KDConfig(teacher_queue=2.5)


def test_momentum_columns_switch_the_itc_columns_to_blips(synth, tmp_path):
    """loss.momentum_columns=true: the batch columns are the momentum encoder's features (BLIP);
    at step 0 the momentum copy equals the student, so the loss is the same, but the columns
    carry no gradient. Without momentum distillation the setting is refused."""
    grads, losses = [], []
    for columns in ("false", "true"):
        items = {
            "run_dir": tmp_path / f"run_{columns}", "max_steps": 1, "data.synth_dir": synth,
            "data.batch_size": 4, "data.num_workers": 0, "data.max_length": 20,
            "data.hflip": "false", "data.rand_augment": "false", "loss.queue_size": 8,
            "model.preset": "test_tiny", "loss.momentum_columns": columns, "loss.itm": 0,
            "loss.lm": 0,
        }  # fmt: skip
        cfg = load(None, [f"{k}={v}" for k, v in items.items()])
        torch.manual_seed(0)
        task = build_task(cfg).eval()
        loader = build_loader(cfg, task.student.config)
        loader.set_epoch(0)
        batch = to_inputs(next(iter(loader)), get_tokenizer(), 20, "cpu")
        loss = task(batch)["loss_itc"]
        loss.backward()
        losses.append(loss.item())
        grads.append(task.student.text_proj.weight.grad.clone())
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)
    assert not torch.allclose(grads[0], grads[1])
    bad = {"loss.momentum_distill": "false", "loss.momentum_columns": "true"}
    with pytest.raises(ConfigError, match=r"loss\.momentum_columns"):
        load(None, [f"{k}={v}" for k, v in bad.items()])
