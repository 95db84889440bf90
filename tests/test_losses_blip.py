"""BLIP objectives (ITC, ITM, LM) and their distributed helpers, against hand-computed values.

The expected numbers are written out from the definitions (math / plain torch ops), never by
calling the code under test a second way. A 2-process gloo run on CPU checks that gathering is
right: 2 ranks x B/2 give the loss and gradients of 1 rank x B.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F

import dlip
from dlip import distributed as D
from dlip.losses.itc import (
    FeatureQueue,
    alpha_at,
    clamp_temp,
    clamp_temp_,
    itc_loss,
    momentum_update,
)
from dlip.losses.itm import build_itm_batch, itm_loss, sample_negatives, with_first_token
from dlip.losses.lm import lm_loss, lm_targets, token_cross_entropy
from dlip.tokenizer import Tokenizer

torch.set_num_threads(1)

ENC, DEC = Tokenizer.enc_token_id, Tokenizer.dec_token_id


def lse(*xs: float) -> float:
    return math.log(sum(math.exp(x) for x in xs))


@pytest.fixture(scope="module")
def tiny() -> dlip.BLIP:
    torch.manual_seed(0)
    return dlip.create_model("test_tiny").eval()  # no dropout: values comparable across calls


# ----------------------------------------------------------------------------------------- ITC
def test_itc_matches_hand_computed_2x2():
    img = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    txt = torch.tensor([[0.6, 0.8], [1.0, 0.0]])
    # sims / 0.1: i2t = [[6, 10], [8, 0]], t2i = its transpose [[6, 8], [10, 0]]
    i2t = ((lse(6, 10) - 6) + (lse(8, 0) - 0)) / 2
    t2i = ((lse(6, 8) - 6) + (lse(10, 0) - 0)) / 2
    out = itc_loss(img, txt, torch.tensor(0.1))
    assert out.loss.item() == pytest.approx((i2t + t2i) / 2, rel=1e-6)
    assert out.terms.keys() == {"loss_itc"}
    assert out.offset == 0
    torch.testing.assert_close(out.sim_i2t, torch.tensor([[6.0, 10.0], [8.0, 0.0]]))
    torch.testing.assert_close(out.sim_t2i, torch.tensor([[6.0, 8.0], [10.0, 0.0]]))
    assert not out.sim_i2t.requires_grad


def test_itc_3x3_with_queue_columns():
    s = 1 / math.sqrt(2)
    img = torch.tensor([[1.0, 0.0], [0.0, 1.0], [s, s]])
    txt = torch.tensor([[0.0, 1.0], [1.0, 0.0], [s, -s]])
    queue = FeatureQueue(dim=2, size=1)
    queue.image_queue.copy_(torch.tensor([[-1.0], [0.0]]))
    queue.text_queue.copy_(torch.tensor([[0.0], [-1.0]]))
    t = 0.5
    # i2t rows: img_i . [txt_0, txt_1, txt_2, tq] / t ; the target is column i
    i2t_rows = [[0, 1, s, 0], [1, 0, -s, -1], [s, s, 0, -s]]
    t2i_rows = [[0, 1, s, 0], [1, 0, s, -1], [s, -s, 0, -s]]
    expect = 0.0
    for rows in (i2t_rows, t2i_rows):
        for i, row in enumerate(rows):
            logits = [v / t for v in row]
            expect += (lse(*logits) - logits[i]) / 3 / 2
    out = itc_loss(img, txt, torch.tensor(t), queue=queue)
    assert out.loss.item() == pytest.approx(expect, rel=1e-6)
    assert out.sim_i2t.shape == (3, 3)  # batch columns only (the ITM candidates)


def test_temp_clamped_with_gradient():
    for raw, used in [(0.0001, 0.001), (0.07, 0.07), (0.9, 0.5), (0.5, 0.5)]:
        temp = torch.tensor(raw, requires_grad=True)
        value = clamp_temp(temp)
        assert value.item() == pytest.approx(used, rel=1e-6)
        value.backward()
        assert temp.grad.item() == 1.0  # straight through, even at or beyond a bound
    img = F.normalize(torch.randn(3, 4, generator=torch.Generator().manual_seed(0)), dim=1)
    txt = F.normalize(torch.randn(3, 4, generator=torch.Generator().manual_seed(1)), dim=1)
    temp = torch.nn.Parameter(torch.tensor(5.0))
    loss = itc_loss(img, txt, temp).loss
    assert loss.item() == pytest.approx(itc_loss(img, txt, torch.tensor(0.5)).loss.item())
    loss.backward()
    assert temp.grad is not None and temp.grad.item() != 0.0
    clamp_temp_(temp)
    assert temp.item() == 0.5 and temp.requires_grad


def test_itc_momentum_distillation_targets():
    img = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    txt = torch.tensor([[0.6, 0.8], [1.0, 0.0]])
    img_m = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    txt_m = torch.tensor([[0.8, 0.6], [0.0, 1.0]])
    alpha, t = 0.4, 0.1

    def softmax(*xs):
        z = sum(math.exp(x) for x in xs)
        return [math.exp(x) / z for x in xs]

    def mix(soft, i):  # alpha * softmax(momentum row) + (1 - alpha) * one-hot(i)
        return [alpha * p + (1 - alpha) * (j == i) for j, p in enumerate(soft)]

    # momentum sims / t: i2t_m = img_m @ txt_m.T / t = [[8, 0], [6, 10]]
    #                    t2i_m = txt_m @ img_m.T / t = [[8, 6], [0, 10]]
    targets_i2t = [mix(softmax(8, 0), 0), mix(softmax(6, 10), 1)]
    targets_t2i = [mix(softmax(8, 6), 0), mix(softmax(0, 10), 1)]
    assert targets_i2t[0][0] == pytest.approx(0.4 * 0.99966 + 0.6, abs=1e-5)

    def soft_ce(rows, targets):  # online logits vs soft targets, mean over rows
        total = 0.0
        for logits, target in zip(rows, targets, strict=True):
            total -= sum(tg * (x - lse(*logits)) for x, tg in zip(logits, target, strict=True))
        return total / 2

    # online logits: i2t = [[6, 10], [8, 0]], t2i = [[6, 8], [10, 0]]
    expect = (soft_ce([[6, 10], [8, 0]], targets_i2t) + soft_ce([[6, 8], [10, 0]], targets_t2i)) / 2
    out = itc_loss(img, txt, torch.tensor(t), image_feat_m=img_m, text_feat_m=txt_m, alpha=alpha)
    assert out.loss.item() == pytest.approx(expect, rel=1e-6)
    # alpha = 0: momentum features change nothing but the queue they would feed
    plain = itc_loss(img, txt, torch.tensor(t)).loss
    zero = itc_loss(img, txt, torch.tensor(t), image_feat_m=img_m, text_feat_m=txt_m).loss
    assert zero.item() == pytest.approx(plain.item())
    with pytest.raises(ValueError, match="alpha"):
        itc_loss(img, txt, torch.tensor(t), alpha=0.4)


def test_itc_momentum_columns_are_blip_exact():
    img = torch.tensor([[1.0, 0.0], [0.0, 1.0]], requires_grad=True)
    txt = torch.tensor([[0.6, 0.8], [1.0, 0.0]], requires_grad=True)
    img_m = torch.tensor([[0.0, 1.0], [1.0, 0.0]])
    txt_m = torch.tensor([[0.0, 1.0], [1.0, 0.0]])
    out = itc_loss(
        img, txt, torch.tensor(0.1), image_feat_m=img_m, text_feat_m=txt_m, momentum_columns=True
    )
    # i2t = img @ txt_m.T / t = [[0, 10], [10, 0]]; t2i = txt @ img_m.T / t = [[8, 6], [0, 10]]
    expect = ((lse(0, 10) - 0 + lse(10, 0) - 0) / 2 + (lse(8, 6) - 8 + lse(0, 10) - 10) / 2) / 2
    assert out.loss.item() == pytest.approx(expect, rel=1e-6)


def test_itc_same_image_positives_include_queue():
    img = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])  # rows 0 and 1 show image 7
    txt = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
    idx = torch.tensor([7, 7, 3])
    t = 0.5
    i2t = [[2, 0, 1.2], [2, 0, 1.2], [0, 2, 1.6]]  # img @ txt.T / t
    t2i = [[2, 2, 0], [0, 0, 2], [1.2, 1.2, 1.6]]
    targets = [[0.5, 0.5, 0], [0.5, 0.5, 0], [0, 0, 1]]

    def soft_ce(rows, tg_rows):
        return sum(
            -sum(tg * (x - lse(*r)) for x, tg in zip(r, tg_row, strict=True))
            for r, tg_row in zip(rows, tg_rows, strict=True)
        ) / len(rows)

    out = itc_loss(img, txt, torch.tensor(t), image_idx=idx)
    expect = (soft_ce(i2t, targets) + soft_ce(t2i, targets)) / 2
    assert out.loss.item() == pytest.approx(expect, rel=1e-6)

    # a queue entry of image 3 is a positive for row 2 (weights 1/2 each), of image 9 for nobody
    queue = FeatureQueue(dim=2, size=2)
    queue.image_queue.copy_(torch.tensor([[0.0, 1.0], [1.0, 0.0]]))  # columns (0, 1), (1, 0)
    queue.text_queue.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0]]))  # columns (1, 0), (0, 1)
    queue.idx_queue.copy_(torch.tensor([[3, 9]]))
    i2t_q = [[*i2t[0], 2, 0], [*i2t[1], 2, 0], [*i2t[2], 0, 2]]
    t2i_q = [[*t2i[0], 0, 2], [*t2i[1], 2, 0], [*t2i[2], 1.6, 1.2]]
    targets_q = [[0.5, 0.5, 0, 0, 0], [0.5, 0.5, 0, 0, 0], [0, 0, 0.5, 0.5, 0]]
    out = itc_loss(img, txt, torch.tensor(t), image_idx=idx, queue=queue)
    expect = (soft_ce(i2t_q, targets_q) + soft_ce(t2i_q, targets_q)) / 2
    assert out.loss.item() == pytest.approx(expect, rel=1e-6)


def test_feature_queue_wraps_for_any_batch_size():
    queue = FeatureQueue(dim=2, size=5)
    assert torch.allclose(queue.image_queue.norm(dim=0), torch.ones(5))
    assert (queue.idx_queue == -100).all() and queue.ptr.item() == 0
    written = []
    for step, n in enumerate([2, 2, 2]):  # 5 % 2 != 0: BLIP would assert here
        rows = torch.arange(n, dtype=torch.float32) + 10 * step
        feats = torch.stack([rows, -rows], dim=1)  # (n, 2), value tags its step and row
        queue.enqueue(feats, feats * 2, torch.arange(n) + 10 * step)
        written.append(rows)
    # columns 0-1 step 0, 2-3 step 1, 4 and then 0 step 2 (wrapped): ptr = 6 % 5 = 1
    assert queue.ptr.item() == 1
    torch.testing.assert_close(queue.image_queue[0], torch.tensor([21.0, 1.0, 10.0, 11.0, 20.0]))
    torch.testing.assert_close(queue.image_queue[1], -queue.image_queue[0])
    torch.testing.assert_close(queue.text_queue, 2 * queue.image_queue)
    assert queue.idx_queue.tolist() == [[21, 1, 10, 11, 20]]
    # a batch larger than the queue: only its newest 5 rows survive, in order, from ptr + 2
    rows = torch.arange(7, dtype=torch.float32) + 100
    queue.enqueue(torch.stack([rows, rows], 1), torch.stack([rows, rows], 1))
    assert queue.ptr.item() == (1 + 7) % 5
    # rows 102..106 land at columns 3, 4, 0, 1, 2
    assert queue.image_queue[0].tolist() == [104.0, 105.0, 106.0, 102.0, 103.0]
    assert queue.idx_queue.tolist() == [[-100] * 5]  # no idx given: matches nothing
    assert set(dict(queue.named_buffers())) == {"image_queue", "text_queue", "idx_queue", "ptr"}


def test_alpha_ramp_and_momentum_update():
    assert alpha_at(0, 100) == 0.0
    assert alpha_at(100, 100) == pytest.approx(0.2)
    assert alpha_at(150, 100, ramp_epochs=1) == pytest.approx(0.4)
    assert alpha_at(10_000, 100) == pytest.approx(0.4)
    assert alpha_at(0, 100, ramp_epochs=0) == 0.4

    model = torch.nn.Linear(2, 1)
    model_m = torch.nn.Linear(2, 1)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[1.0, 2.0]]))
        model.bias.fill_(3.0)
        model_m.weight.zero_()
        model_m.bias.fill_(1.0)
    momentum_update(model, model_m, m=0.9)
    torch.testing.assert_close(model_m.weight, torch.tensor([[0.1, 0.2]]))
    torch.testing.assert_close(model_m.bias, torch.tensor([0.9 + 0.3]))
    assert model.weight.tolist() == [[1.0, 2.0]]  # the online model is untouched
    with pytest.raises(ValueError, match="names differ"):
        momentum_update(model, torch.nn.Linear(2, 1, bias=False))


# ---------------------------------------------------------------------------- distributed helpers
def test_single_process_gathers_are_identity():
    assert not D.is_dist() and D.get_rank() == 0 and D.get_world_size() == 1
    assert D.gather_sizes(3) == [3] and D.rank_offset([3]) == 0 and D.all_reduce_max(4) == 4
    x = torch.tensor([[1.0, 2.0], [3.0, 4.0]], requires_grad=True)
    y = D.all_gather_with_grad(x)
    assert y is x
    (y * torch.tensor([[1.0, 2.0], [3.0, 4.0]])).sum().backward()
    assert x.grad.tolist() == [[1.0, 2.0], [3.0, 4.0]]
    z = D.all_gather_no_grad(x)
    assert not z.requires_grad and z.tolist() == x.tolist()


def _features(n: int, seed: int) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    feats = [F.normalize(torch.randn(n, 8, generator=g), dim=1) for _ in range(4)]
    queue = FeatureQueue(dim=8, size=5)
    queue.image_queue.copy_(F.normalize(torch.randn(8, 5, generator=g), dim=0))
    queue.text_queue.copy_(F.normalize(torch.randn(8, 5, generator=g), dim=0))
    queue.idx_queue.copy_(torch.tensor([[0, 5, 9, 2, 7]]))
    return (*feats, queue)


def _itc_runs(img, txt, img_m, txt_m, queue, idx, rows):
    """[plain, momentum + queue + idx] ITC losses and feature grads for batch `rows`."""
    results = []
    for extra in (
        {},
        {
            "image_feat_m": img_m[rows],
            "text_feat_m": txt_m[rows],
            "queue": queue,
            "alpha": 0.4,
            "image_idx": idx[rows],
        },
    ):
        i, t = img[rows].clone().requires_grad_(), txt[rows].clone().requires_grad_()
        temp = torch.tensor(0.07, requires_grad=True)
        out = itc_loss(i, t, temp, **extra)
        out.loss.backward()
        results.append((out.loss.detach(), i.grad, t.grad, temp.grad, out.sim_i2t, out.offset))
    return results


def _worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    torch.distributed.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world
    )
    try:
        res: dict[str, object] = {}
        # (a) uneven rows (2 on rank 0, 3 on rank 1); rank r's loss weights the gathered rows
        # by w_r, so the gradient of rank r's rows is (w_0 + w_1) on its slice
        x = (torch.arange(2 + rank, dtype=torch.float32) + 10 * rank).requires_grad_()
        y = D.all_gather_with_grad(x)
        w = torch.arange(5, dtype=torch.float32) * (rank + 1)
        (w * y).sum().backward()
        res["gathered"], res["grad"] = y.detach(), x.grad
        # (b) ITC over 2 ranks x 2 rows
        img, txt, img_m, txt_m, queue = _features(4, seed=0)
        idx = torch.tensor([0, 1, 1, 5])
        rows = slice(2 * rank, 2 * rank + 2)
        res["itc"] = _itc_runs(img, txt, img_m, txt_m, queue, idx, rows)
        # the queue receives both ranks' rows in rank order
        queue.enqueue(img_m[rows], txt_m[rows], idx[rows])
        res["queue"] = (queue.image_queue.clone(), queue.idx_queue.clone(), queue.ptr.clone())
        # ITM negatives across ranks: image tokens tag their global sample index
        tokens = torch.full((2, 3, 4), 0.0) + torch.arange(2 * rank, 2 * rank + 2).view(2, 1, 1)
        ids = torch.tensor([[101, 7 + 2 * rank, 102], [101, 8 + 2 * rank, 102]])
        mask = torch.ones(2, 3, dtype=torch.long)
        sim = torch.zeros(2, 4)
        seen = []
        itm = itm_loss(
            lambda im, i, m: seen.append((im, i, m)) or torch.zeros(len(i), 2),
            tokens,
            ids,
            mask,
            sim,
            sim,
            offset=2 * rank,
            across_ranks=True,
            generator=torch.Generator().manual_seed(rank),
        )
        res["itm"] = (itm.neg_image_idx, itm.neg_text_idx, *seen[0])
        torch.save(res, f"{out_dir}/rank{rank}.pt")
    finally:
        torch.distributed.destroy_process_group()


def test_two_process_gloo_matches_one_process(tmp_path):
    torch.multiprocessing.spawn(
        _worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True
    )
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1))

    # (a) all_gather_with_grad: values in rank order, gradient = sum of both ranks' weights
    expect = torch.tensor([0.0, 1.0, 10.0, 11.0, 12.0])
    assert r0["gathered"].tolist() == expect.tolist() == r1["gathered"].tolist()
    w_sum = torch.arange(5, dtype=torch.float32) * 3  # w_0 + w_1
    assert r0["grad"].tolist() == w_sum[:2].tolist() and r1["grad"].tolist() == w_sum[2:].tolist()

    # (b) ITC: mean of the ranks' losses == one process on all 4 rows; grads of the summed
    # per-rank losses == 2x the one-process grads (DDP's averaging then makes them equal)
    img, txt, img_m, txt_m, queue = _features(4, seed=0)
    idx = torch.tensor([0, 1, 1, 5])
    ref = _itc_runs(img, txt, img_m, txt_m, queue, idx, slice(0, 4))
    for k, (one, a, b) in enumerate(zip(ref, r0["itc"], r1["itc"], strict=True)):
        loss, gi, gt, gtemp, sim, _ = one
        assert ((a[0] + b[0]) / 2).item() == pytest.approx(loss.item(), rel=1e-5), k
        torch.testing.assert_close(torch.cat([a[1], b[1]]) / 2, gi, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(torch.cat([a[2], b[2]]) / 2, gt, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close((a[3] + b[3]) / 2, gtemp, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(torch.cat([a[4], b[4]]), sim)  # rows vs all 4 columns
        assert (a[5], b[5]) == (0, 2)

    # the queue got all 4 momentum rows (wrapping at 5) on both ranks
    q_img, q_idx, ptr = r0["queue"]
    assert ptr.item() == 4 and q_idx.tolist() == [[0, 1, 1, 5, 7]]
    torch.testing.assert_close(q_img[:, :4], img_m.T)
    torch.testing.assert_close(r1["queue"][0], q_img)

    # ITM across ranks: negatives are global indices != own; the scored batch uses them
    for rank, r in enumerate((r0, r1)):
        neg_img, neg_txt, images, ids, _ = r["itm"]
        own = torch.arange(2) + 2 * rank
        assert (neg_img != own).all() and (neg_txt != own).all()
        assert images[2:4, 0, 0].tolist() == neg_img.float().tolist()  # token value = index
        assert ids[4:, 1].tolist() == (neg_txt + 7).tolist()  # id 7 + global index
        assert (ids[:, 0] == ENC).all()


# ----------------------------------------------------------------------------------------- ITM
def test_sample_negatives_never_pick_positive_and_follow_weights():
    g = torch.Generator().manual_seed(0)
    sim = torch.randn(6, 6, generator=g) * 5
    sim.diagonal().fill_(100.0)  # the positive dominates softmax: it must still be excluded
    for _ in range(20):
        neg = sample_negatives(sim, torch.arange(6), generator=g)
        assert (neg != torch.arange(6)).all()
    # one overwhelming negative per row is always chosen
    sim = torch.full((3, 3), -50.0)
    sim[0, 2] = sim[1, 0] = sim[2, 0] = 50.0
    sim.diagonal().fill_(80.0)
    assert sample_negatives(sim, torch.arange(3), generator=g).tolist() == [2, 0, 0]
    # same-image pairs (rows 0, 1 show image 4) are positives too
    idx = torch.tensor([4, 4, 5, 6])
    pos = idx[:, None] == idx[None, :]
    sim = torch.zeros(4, 4)
    sim[0, 1] = sim[1, 0] = 40.0  # the same-image pair has the highest similarity
    for _ in range(20):
        neg = sample_negatives(sim, torch.arange(4), pos, generator=g)
        assert (idx[neg] != idx).all()
    a = sample_negatives(sim, torch.arange(4), pos, generator=torch.Generator().manual_seed(3))
    b = sample_negatives(sim, torch.arange(4), pos, generator=torch.Generator().manual_seed(3))
    assert a.tolist() == b.tolist()


def test_sample_negatives_survive_nan_inf_and_degenerate_rows():
    g = torch.Generator().manual_seed(0)
    own = torch.arange(4)
    bad = [
        torch.full((4, 4), float("nan")),
        torch.zeros(4, 4),
        torch.tensor(
            [[float("inf")] * 4, [float("-inf")] * 4, [1e30] * 4, [float("nan"), 1, 2, 3]]
        ),
    ]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for sim in bad:
            for _ in range(10):
                neg = sample_negatives(sim, own, generator=g)
                assert (neg != own).all() and ((neg >= 0) & (neg < 4)).all()
        # +inf on a negative: that negative wins, like the finite +1e4 it stands for
        sim = torch.zeros(4, 4)
        sim[:, 3] = float("inf")
        sim[3, 0] = float("inf")
        assert sample_negatives(sim, own, generator=g).tolist() == [3, 3, 3, 0]
        # every candidate shows the same image: uniform among the other samples
        pos = torch.ones(3, 3, dtype=torch.bool)
        picks = torch.stack(
            [sample_negatives(torch.zeros(3, 3), own[:3], pos, g) for _ in range(60)]
        )
        assert (picks != own[:3]).all()
        assert {int(v) for v in picks[:, 0]} == {1, 2}  # both others get drawn
    with pytest.raises(ValueError, match="at least 2"):  # B = 1: there is no negative at all
        sample_negatives(torch.zeros(1, 1), torch.zeros(1, dtype=torch.long))


def test_itm_batch_layout_labels_and_loss():
    tokens = torch.arange(3, dtype=torch.float32).view(3, 1, 1).expand(3, 2, 4)  # value = sample
    ids = torch.tensor([[101, 11, 102], [101, 12, 0], [101, 13, 102]])
    mask = (ids != 0).long()
    sim = torch.zeros(3, 3)
    sim[:, 2] = 30.0  # everyone's favourite negative is sample 2; sample 2 prefers 0 then
    sim[2, 0] = 30.0
    calls = []
    logits = torch.tensor([[0.1, 0.9], [0.3, 0.2], [1.0, -1.0], [0.0, 0.5], [2.0, 0.0]] * 2)[:9]

    def fake_itm(im, i, m):
        calls.append((im, i, m))
        return logits

    out = itm_loss(fake_itm, tokens, ids, mask, sim, sim, generator=torch.Generator())
    assert out.neg_image_idx.tolist() == [2, 2, 0] and out.neg_text_idx.tolist() == [2, 2, 0]
    im, i, m = calls[0]
    assert im[:, 0, 0].tolist() == [0, 1, 2, 2, 2, 0, 0, 1, 2]  # positives, neg images, positives
    assert (i[:, 0] == ENC).all()
    assert i[:, 1].tolist() == [11, 12, 13, 11, 12, 13, 13, 13, 11]  # texts, texts, neg texts
    assert m.tolist()[7] == [1, 1, 1] and m.tolist()[1] == [1, 1, 0]
    assert ids[0, 0] == 101  # caller's ids untouched
    assert out.labels.tolist() == [1, 1, 1, 0, 0, 0, 0, 0, 0]
    expect = 0.0
    for row, label in zip(logits.tolist(), out.labels.tolist(), strict=True):
        expect += (lse(*row) - row[label]) / 9
    assert out.loss.item() == pytest.approx(expect, rel=1e-6)
    assert out.terms.keys() == {"loss_itm"}
    # a teacher scores the same pairs from the sampled indices
    t_im, t_i, t_m = build_itm_batch(
        tokens * 10, with_first_token(ids, ENC), mask, out.neg_image_idx, out.neg_text_idx
    )
    torch.testing.assert_close(t_im, im * 10)
    assert t_i.tolist() == i.tolist() and t_m.tolist() == m.tolist()
    with pytest.raises(ValueError, match="at least 2"):
        itm_loss(fake_itm, tokens[:1], ids[:1], mask[:1], sim[:1, :1], sim[:1, :1])


def test_itm_with_tiny_model_gives_gradient(tiny):
    torch.manual_seed(0)
    pixels = torch.randn(3, 3, 32, 32)
    ids = torch.tensor([[101, 2000, 2001, 102], [101, 2002, 102, 0], [101, 2003, 2004, 102]])
    mask = (ids != 0).long()
    image = tiny.encode_image(pixels)
    text = tiny.encode_text(ids, mask)
    itc = itc_loss(image.feat, text.feat, tiny.temp)
    out = itm_loss(
        tiny.itm_logits,
        image.tokens,
        ids,
        mask,
        itc.sim_i2t,
        itc.sim_t2i,
        offset=itc.offset,
        generator=torch.Generator().manual_seed(0),
    )
    assert out.logits.shape == (9, 2) and torch.isfinite(out.loss)
    tiny.zero_grad()
    (out.loss + itc.loss).backward()
    assert tiny.itm_head.weight.grad.abs().sum() > 0
    assert tiny.temp.grad is not None and tiny.temp.grad != 0
    assert tiny.visual_encoder.pos_embed.grad.abs().sum() > 0


# ------------------------------------------------------------------------------------------ LM
def test_lm_targets_mask_pads_and_prompt():
    # [CLS] a picture of dog [SEP] [PAD]; BLIP's prompt_length for "a picture of " is 4
    ids = torch.tensor([[101, 1037, 3861, 1997, 3899, 102, 0], [101, 3899, 102, 0, 0, 0, 0]])
    mask = (ids != 0).long()
    assert lm_targets(ids, mask).tolist() == [
        [1037, 3861, 1997, 3899, 102, -100],
        [3899, 102, -100, -100, -100, -100],
    ]
    assert lm_targets(ids, mask, prompt_length=4).tolist() == [
        [-100, -100, -100, 3899, 102, -100],
        [-100, -100, -100, -100, -100, -100],
    ]
    # a pad id inside the attention mask is still ignored; pad_id=None trusts the mask alone
    mask[1, 3] = 1
    assert lm_targets(ids, mask)[1].tolist()[2] == -100
    assert lm_targets(ids, mask, pad_id=None)[1].tolist()[2] == 0


def test_token_cross_entropy_label_smoothing():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 3, 5, generator=g)
    targets = torch.tensor([[1, 4, -100], [-100, 0, 2]])
    eps, total, count = 0.1, 0.0, 0
    for b in range(2):
        for t in range(3):
            y = int(targets[b, t])
            if y == -100:
                continue
            row = logits[b, t].tolist()
            logp = [x - lse(*row) for x in row]
            total += (1 - eps) * -logp[y] + eps * -sum(logp) / len(logp)
            count += 1
    got = token_cross_entropy(logits, targets, label_smoothing=eps)
    assert got.item() == pytest.approx(total / count, rel=1e-6)
    torch_ce = F.cross_entropy(logits.reshape(6, 5), targets.reshape(6), label_smoothing=0.1)
    assert got.item() == pytest.approx(torch_ce.item(), rel=1e-6)
    assert token_cross_entropy(logits, torch.full((2, 3), -100)).item() == 0.0


def test_lm_loss_with_tiny_model(tiny):
    torch.manual_seed(0)
    image = tiny.encode_image(torch.randn(2, 3, 32, 32))
    ids = torch.tensor([[101, 1037, 3861, 1997, 3899, 102], [101, 1037, 3861, 1997, 102, 0]])
    mask = (ids != 0).long()
    seen = []

    def spy(im, i, m):
        seen.append(i)
        return tiny.decode(im, i, m).tokens

    rows = []

    def head(states):
        rows.append(states.shape[0])
        return tiny.text_decoder.cls(states)

    out = lm_loss(spy, head, image.tokens, ids, mask, prompt_length=4)
    assert (seen[0][:, 0] == DEC).all() and seen[0][:, 1:].tolist() == ids[:, 1:].tolist()
    assert rows == [3]  # the 30k-way head ran at the 3 counted positions only, not all 10
    assert out.logits.shape == (3, tiny.config.text.vocab_size)
    assert out.mask.tolist() == [
        [False, False, False, True, True],
        [False, False, False, True, False],
    ]
    # same logits and value as the full head by torch's own CE on the 3 counted tokens
    full = tiny.lm_logits(image.tokens, seen[0], mask).detach()
    picked = torch.stack([full[0, 3], full[0, 4], full[1, 3]])
    torch.testing.assert_close(out.logits.detach(), picked, atol=1e-5, rtol=1e-5)
    ref = F.cross_entropy(picked, torch.tensor([3899, 102, 102]), label_smoothing=0.1)
    assert out.loss.item() == pytest.approx(ref.item(), rel=1e-5)
    assert out.terms.keys() == {"loss_lm"}
    tiny.zero_grad()
    out.loss.backward()
    dec = tiny.text_decoder
    assert dec.cls.predictions.decoder.weight.grad.abs().sum() > 0  # LM head (tied embeddings)
    assert tiny.visual_encoder.pos_embed.grad.abs().sum() > 0  # through cross-attention
