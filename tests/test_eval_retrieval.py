"""Retrieval evaluation: recall on hand-built score matrices (best of 5 captions, ties against
the ground truth), the batched ITM re-rank against a pair-by-pair loop, `dlip eval retrieval`
end to end, 2 gloo processes equal to 1, and clear errors on bad input."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch

import dlip
from dlip.cli import main
from dlip.data.datasets import eval_texts
from dlip.data.karpathy import load_eval_set
from dlip.data.synthetic import synthesize
from dlip.eval.retrieval import (
    FILL,
    evaluate_retrieval,
    image_features,
    recall_at_k,
    rerank,
    text_features,
    tokenize_texts,
)
from dlip.losses.itm import with_first_token
from dlip.models.config import ModelConfig
from dlip.models.presets import get_config
from dlip.tokenizer import get_tokenizer

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
KEYS = [f"{d}_{m}" for d in ("txt", "img") for m in ("r1", "r5", "r10", "r_mean")] + ["r_mean"]


# ------------------------------------------------------------------------------- recall
def test_recall_best_of_five_captions_and_ties_against_the_ground_truth():
    # 4 images x 5 captions: image i owns texts 5i..5i+4. Non-GT scores 0 unless set.
    img2txt = [list(range(5 * i, 5 * i + 5)) for i in range(4)]
    txt2img = [i for i in range(4) for _ in range(5)]
    i2t = np.full((4, 20), -1.0)
    i2t[0, [0, 1, 2, 3, 4]] = [0.2, 0.9, 0.9, 0.1, -0.5]  # best GT 0.9 (two GTs tie): rank 0
    i2t[1, [5, 6, 7, 8, 9]] = [0.1, 0.1, 0.5, 0.9, 0.1]  # best GT is text 8 at 0.9 ...
    i2t[1, [0, 1, 2]] = 0.95  # ... 3 wrong texts above it ...
    i2t[1, 12] = 0.9  # ... and one tied with it (counts against): rank 4
    i2t[2, 10:15] = 0.3  # all five GTs equal
    i2t[2, [0, 1, 2, 3, 4, 5, 6, 7]] = 0.8  # 8 wrong above ...
    i2t[2, 19] = 0.3  # ... one tied: rank 9
    i2t[3, :] = FILL  # constant row (GTs outside the re-ranked top-k): rank 15 = all wrong ones
    # texts -> 4 images: GT 0 unless set; wrong images -1 unless set.
    t2i = np.full((20, 4), -1.0)
    t2i[np.arange(20), txt2img] = 0.0
    t2i[1, 3] = 0.0  # a tie with one wrong image: rank 1
    t2i[2, [1, 2, 3]] = 5.0  # rank 3 (text 2's GT is image 0)
    t2i[7, :] = 7.0  # constant row: rank 3
    # By hand: i2t ranks (0, 4, 9, 15); t2i ranks 0 for 17 texts, 1, 3, 3.
    expected = {
        "txt_r1": 25.0, "txt_r5": 50.0, "txt_r10": 75.0, "txt_r_mean": 50.0,
        "img_r1": 85.0, "img_r5": 100.0, "img_r10": 100.0, "img_r_mean": 95.0,
        "r_mean": 72.5,
    }  # fmt: skip
    got = recall_at_k(i2t, t2i, img2txt, txt2img)
    assert list(got) == list(expected)
    assert got == pytest.approx(expected, abs=1e-9)
    # Tensors are accepted, with the same answer.
    assert recall_at_k(torch.tensor(i2t), torch.tensor(t2i), img2txt, txt2img) == got


def test_recall_text_to_image_ranks_at_the_k_boundaries():
    # 12 images, one caption each (identity maps). Row t: GT 0, `above` wrong images at +1,
    # `tied` at 0, the rest at -1.
    n = 12
    layout = {0: (0, 0), 1: (0, 1), 2: (4, 0), 3: (3, 2), 4: (9, 0), 5: (10, 0), 6: (0, 11)}
    t2i = np.full((n, n), -1.0)
    np.fill_diagonal(t2i, 0.0)
    for t, (above, tied) in layout.items():
        wrong = [j for j in range(n) if j != t]
        t2i[t, wrong[:above]] = 1.0
        t2i[t, wrong[above : above + tied]] = 0.0
    # ranks: 0, 1, 4, 5, 9, 10, 11, then 0 for texts 7..11
    i2t = np.eye(n)  # image -> text perfect: every rank 0
    got = recall_at_k(i2t, t2i, [[i] for i in range(n)], list(range(n)))
    assert got["txt_r1"] == got["txt_r10"] == 100.0
    assert got["img_r1"] == pytest.approx(100 * 6 / 12)  # ranks 0 (x6)
    assert got["img_r5"] == pytest.approx(100 * 8 / 12)  # + ranks 1, 4
    assert got["img_r10"] == pytest.approx(100 * 10 / 12)  # + ranks 5, 9
    # Permuting the candidates (with the maps) changes nothing: no order-dependent tie-break.
    perm = np.random.default_rng(0).permutation(n)
    maps = [[i] for i in range(n)], list(range(n))
    assert recall_at_k(i2t[perm][:, perm], t2i[perm][:, perm], *maps) == got


def test_recall_rejects_bad_shapes_nan_and_images_without_captions():
    with pytest.raises(ValueError, match="scores_i2t: expected shape"):
        recall_at_k(np.zeros((2, 3)), np.zeros((2, 2)), [[0], [1]], [0, 1])
    with pytest.raises(ValueError, match="scores_t2i: contains NaN"):
        recall_at_k(np.zeros((2, 2)), np.full((2, 2), np.nan), [[0], [1]], [0, 1])
    with pytest.raises(ValueError, match=r"img2txt\[1\]"):
        recall_at_k(np.zeros((2, 2)), np.zeros((2, 2)), [[0, 1], []], [0, 0])


# ------------------------------------------------------------------------------- re-rank
@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Hundreds of tiny forwards: with 2 threads on a busy 2-core machine each op waits for a
    scheduler slice (~15 ms), with 1 thread a pair takes a few ms."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth")
    synthesize(out, 20, seed=0, image_size=32, n_val=2, n_test=12, captions_per_image=1)
    return out


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return dlip.create_model("test_tiny").eval()


@pytest.fixture(scope="module")
def fused():
    """test_tiny with ALBEF/DLIP topology: 1 text-only layer, then 1 fusion layer."""
    data = get_config("test_tiny").to_dict()
    data["text"]["fusion_layers"] = 1
    torch.manual_seed(0)
    return dlip.BLIP(ModelConfig.from_dict(data)).eval()


@pytest.fixture(scope="module")
def tiny_dir(tiny, tmp_path_factory):
    return dlip.save(tiny, tmp_path_factory.mktemp("tiny") / "model")


def _slow_rerank(model, tokens, ids, mask, sims, k):
    """BLIP's loop, one pair per forward: per image its ITC top-k texts, per text its top-k
    images, score = ITM positive logit + cosine, everything else -100."""
    n_img, n_txt = sims.shape
    i2t = torch.full((n_img, n_txt), FILL)
    t2i = torch.full((n_txt, n_img), FILL)

    def score(i: int, t: int) -> float:
        logits = model.itm_logits(tokens[i : i + 1], ids[t : t + 1], mask[t : t + 1])
        return float(logits[0, 1]) + float(sims[i, t])

    with torch.no_grad():
        for i in range(n_img):
            for t in torch.argsort(sims[i], descending=True)[: min(k, n_txt)].tolist():
                i2t[i, t] = score(i, t)
        for t in range(n_txt):
            for i in torch.argsort(sims[:, t], descending=True)[: min(k, n_img)].tolist():
                t2i[t, i] = score(i, t)
    return i2t, t2i


# k=13 > 12 images: text -> image clamped to 12. "fused": text-only layers run once per text.
@pytest.mark.parametrize("which, k", [("tiny", 4), ("tiny", 13), ("fused", 6)])
def test_batched_rerank_equals_the_pair_by_pair_loop(synth, request, which, k):
    tiny = request.getfixturevalue(which)
    eval_set = load_eval_set(synth / "test.json", synth)
    n_img, n_txt = len(eval_set.images), len(eval_set.captions)
    assert (n_img, n_txt) == (12, 60)
    feat, tokens = image_features(tiny, eval_set, range(n_img), 5, torch.device("cpu"))
    ids, mask = tokenize_texts(eval_texts(eval_set))
    assert ids.shape == (n_txt, 35)
    txt_feat = text_features(tiny, ids, mask, 7, torch.device("cpu"))
    sims = feat @ txt_feat.t()
    itm_ids = with_first_token(ids, get_tokenizer().enc_token_id)
    fast_i2t, fast_t2i = rerank(tiny, tokens, itm_ids, mask, sims, k=k, itm_batch=7)
    slow_i2t, slow_t2i = _slow_rerank(tiny, tokens, itm_ids, mask, sims, k)
    torch.testing.assert_close(fast_i2t, slow_i2t, atol=1e-5, rtol=0)
    torch.testing.assert_close(fast_t2i, slow_t2i, atol=1e-5, rtol=0)
    assert int((fast_i2t != FILL).sum()) == n_img * min(k, n_txt)
    assert int((fast_t2i != FILL).sum()) == n_txt * min(k, n_img)
    kk = min(k, n_img)
    for fast, slow in ((fast_i2t, slow_i2t), (fast_t2i, slow_t2i)):
        assert torch.equal(fast.topk(kk, dim=1).indices, slow.topk(kk, dim=1).indices)
    # The re-rank really re-ranks: the ITM order differs from the ITC order somewhere.
    assert not torch.equal(fast_i2t.topk(kk).indices, sims.topk(kk).indices)

    result = evaluate_retrieval(tiny, eval_set, k=k, batch_size=5, itm_batch=7, device="cpu")
    torch.testing.assert_close(result["scores_i2t"], fast_i2t, atol=1e-5, rtol=0)
    torch.testing.assert_close(result["scores_t2i"], fast_t2i, atol=1e-5, rtol=0)
    assert result["metrics"] == recall_at_k(slow_i2t, slow_t2i, eval_set.img2txt, eval_set.txt2img)
    assert result["metrics_itc"] == recall_at_k(sims, sims.t(), eval_set.img2txt, eval_set.txt2img)
    assert (result["k_i2t"], result["k_t2i"]) == (min(k, n_txt), min(k, n_img))


# ------------------------------------------------------------------------------- command
def _cli_args(synth, model_dir, out, *extra):
    return [
        "eval", "retrieval", "--model", str(model_dir), "--data", str(synth / "test.json"),
        "--images", str(synth), "--out", str(out), "--device", "cpu", "--num-workers", "0",
        "--batch-size", "5", "--itm-batch", "9", "--k", "5", *extra,
    ]  # fmt: skip


def test_cli_writes_results_json_and_markdown(synth, tiny, tiny_dir, tmp_path):
    out = tmp_path / "out"
    assert main(_cli_args(synth, tiny_dir, out)) == 0
    record = json.loads((out / "results.json").read_text())
    assert record["task"] == "retrieval"
    assert record["world_size"] == 1 and "cpu" in record["machine"]
    assert record["model"]["checkpoint"] == str(tiny_dir.resolve())
    assert record["dataset"]["num_images"] == 12 and record["dataset"]["num_texts"] == 60
    assert record["dataset"]["name"] == "test"
    settings = record["settings"]
    assert (settings["k"], settings["itm_batch"], settings["batch_size"]) == (5, 9, 5)
    assert (settings["image_size"], settings["max_words"]) == (32, 30)
    assert list(record["metrics"]) == KEYS and list(record["metrics_itc"]) == KEYS
    assert {"image_features", "text_features", "itc", "rerank", "total"} <= set(record["seconds"])
    eval_set = load_eval_set(synth / "test.json", synth)
    direct = evaluate_retrieval(tiny, eval_set, k=5, batch_size=5, itm_batch=9, device="cpu")
    assert record["metrics"] == pytest.approx(direct["metrics"])
    assert record["metrics_itc"] == pytest.approx(direct["metrics_itc"])
    md = (out / "results.md").read_text()
    assert "| ITC |" in md and "| ITC + ITM re-rank (k=5) |" in md and "txt_r1" in md


def test_cli_image_size_override_is_recorded(synth, tiny_dir, tmp_path):
    out = tmp_path / "out"
    assert main(_cli_args(synth, tiny_dir, out, "--image-size", "48")) == 0
    record = json.loads((out / "results.json").read_text())
    assert record["settings"]["image_size"] == 48
    assert record["model"]["config"]["vision"]["image_size"] == 48


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_gloo_processes_give_the_one_process_metrics(synth, tiny_dir, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    args = _cli_args(synth, tiny_dir, two)
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
        "--master_addr=127.0.0.1", f"--master_port={_free_port()}", "-m", "dlip", *args,
    ]  # fmt: skip
    proc = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert main(_cli_args(synth, tiny_dir, one)) == 0
    r1 = json.loads((one / "results.json").read_text())
    r2 = json.loads((two / "results.json").read_text())
    assert (r1["world_size"], r2["world_size"]) == (1, 2)
    assert r2["metrics"] == pytest.approx(r1["metrics"], abs=1e-9)
    assert r2["metrics_itc"] == pytest.approx(r1["metrics_itc"], abs=1e-9)


@pytest.mark.parametrize("flag", ["--k", "--itm-batch", "--batch-size"])
def test_cli_rejects_non_positive_sizes(synth, tiny_dir, tmp_path, capsys, flag):
    assert main([*_cli_args(synth, tiny_dir, tmp_path / "o"), flag, "0"]) == 2
    assert f"{flag} must be >= 1" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_cli_missing_data_file_is_a_clear_error(synth, tiny_dir, tmp_path, capsys):
    args = _cli_args(synth, tiny_dir, tmp_path / "o")
    args[args.index("--data") + 1] = str(tmp_path / "nope.json")
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "nope.json" in err and "no such file" in err


def test_library_rejects_k_below_one(synth, tiny):
    eval_set = load_eval_set(synth / "test.json", synth)
    with pytest.raises(ValueError, match="k=0"):
        evaluate_retrieval(tiny, eval_set, k=0, device="cpu")
