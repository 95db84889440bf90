"""Image-text retrieval evaluation with BLIP's protocol (salesforce/BLIP train_retrieval.py,
`evaluation`; LAVIS copies it as `compute_sim_matrix`).

1. Features: normalised ITC features of every image and every text (`pre_caption`, 35 tokens),
   and the vision tokens of the images, under `torch.inference_mode`.
2. ITC: `sims = image_feat @ text_feat.T`, raw cosine (not divided by the temperature).
3. Re-rank: each image's top-k texts and each text's top-k images are scored
   `itm_logits[:, 1] + cosine` (the raw positive logit, as BLIP); every other entry is -100
   (BLIP's fill). k is clamped to the number of candidates in each direction.
4. Recall@{1,5,10} both ways (`recall_at_k`).

Batching. The ITM pairs of both directions are pooled, deduplicated (a pair that is both in an
image's top-k and in a text's top-k is scored once) and run `itm_batch` pairs per forward, the
image tokens gathered by index, the texts with [ENC] first and trimmed to the chunk's longest.
Pairs run grouped by text; with `fusion_layers=k` (ALBEF / DLIP topology) the text-only layers
run once per distinct text of a chunk and only the k fusion layers per pair.

Sharding and memory. Ranks own contiguous blocks of images (`shard_range`). A rank encodes only
its images and keeps only their tokens: n_images / world_size x N x Dv, bf16 on CUDA (about
0.9 GB per 1,000 ViT-B/384 images), fp32 on CPU (BLIP's whole COCO 5K: 8.9 GB). ITC features
(small) are all-gathered, so every rank holds the same `sims` and the same candidate lists. A
rank scores exactly the candidate pairs whose image it owns -- for i2t rows and t2i rows alike,
so it never needs another rank's tokens -- and the compact (rows, k) score tables are summed by
all-reduce (each entry is written by one rank, the others add 0.0, so the sum is exact).
Texts are sharded for encoding and all-gathered too. Host memory beyond the tokens is the two
dense score matrices (n_images x n_texts fp32 each, 0.5 GB for COCO 5K), as in BLIP.

The forwards run at the current precision (`dlip.precision.using`; by default bf16 autocast on
CUDA, fp32 on CPU); similarities and scores are kept in fp32.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor

from dlip.data.karpathy import EvalSet
from dlip.models.blip import BLIP

FILL = -100.0  # BLIP's score for entries outside the re-ranked top-k
TEXT_LENGTH = 35  # BLIP pads / truncates eval texts to 35 tokens
RECALL_KS = (1, 5, 10)


# ------------------------------------------------------------------------------- recall
def _as_numpy(scores: Any, name: str, shape: tuple[int, int]) -> np.ndarray:
    if isinstance(scores, Tensor):
        scores = scores.detach().float().cpu().numpy()
    arr = np.asarray(scores, dtype=np.float32)
    if arr.shape != shape:
        raise ValueError(f"{name}: expected shape {shape}, got {arr.shape}")
    if np.isnan(arr).any():
        raise ValueError(f"{name}: contains NaN")
    return arr


def _recalls(ranks: np.ndarray, prefix: str) -> dict[str, float]:
    out = {f"{prefix}_r{k}": float(100.0 * np.mean(ranks < k)) for k in RECALL_KS}
    out[f"{prefix}_r_mean"] = float(np.mean([out[f"{prefix}_r{k}"] for k in RECALL_KS]))
    return out


def recall_at_k(
    scores_i2t: Any,  # (n_images, n_texts) array or tensor
    scores_t2i: Any,  # (n_texts, n_images)
    img2txt: Sequence[Sequence[int]],
    txt2img: Sequence[int],
    chunk: int = 1024,
) -> dict[str, float]:
    """BLIP's recall: txt_r1/5/10 (image->text), img_r1/5/10 (text->image), their means, r_mean.

    Rank of a query = the number of non-ground-truth candidates scoring >= its best
    ground-truth candidate (0 = first). Image->text takes the best of the image's captions
    (other ground-truth captions never push it down); text->image has one ground-truth image.
    Ties are broken against the ground truth: a wrong candidate scoring exactly the same ranks
    above it. So the result does not depend on the order of the candidates (BLIP's
    `np.argsort(score)[::-1]` does), and a constant scorer gets no credit; e.g. a ground truth
    left at -100 outside the re-ranked top-k ranks below every other candidate.
    Values are percentages: `R@K = 100 * mean(rank < K)`.
    """
    n_img, n_txt = len(img2txt), len(txt2img)
    i2t = _as_numpy(scores_i2t, "scores_i2t", (n_img, n_txt))
    t2i = _as_numpy(scores_t2i, "scores_t2i", (n_txt, n_img))
    gt_img = np.asarray(txt2img, dtype=np.int64)
    if n_txt and (gt_img.min() < 0 or gt_img.max() >= n_img):
        raise ValueError(f"txt2img: image indices must lie in [0, {n_img})")
    ranks_i2t = np.empty(n_img, dtype=np.int64)
    for start in range(0, n_img, chunk):  # chunks bound the (rows, n_texts) temporaries
        rows = range(start, min(start + chunk, n_img))
        gt = np.zeros((len(rows), n_txt), dtype=bool)
        for r, i in enumerate(rows):
            if len(img2txt[i]) == 0:
                raise ValueError(f"img2txt[{i}]: image {i} has no ground-truth text")
            gt[r, list(img2txt[i])] = True
        block = i2t[start : rows.stop]
        best = np.where(gt, block, -np.inf).max(axis=1, keepdims=True)  # (rows, 1)
        ranks_i2t[start : rows.stop] = ((block >= best) & ~gt).sum(axis=1)
    gt_scores = t2i[np.arange(n_txt), gt_img][:, None]  # (n_txt, 1)
    ranks_t2i = (t2i >= gt_scores).sum(axis=1) - 1  # minus the ground truth itself
    out = {**_recalls(ranks_i2t, "txt"), **_recalls(ranks_t2i, "img")}
    out["r_mean"] = (out["txt_r_mean"] + out["img_r_mean"]) / 2
    return out


# ------------------------------------------------------------------------------- features
def _autocast(device: torch.device):
    """The forwards' autocast at the current precision (`dlip.precision.using`; default
    "auto": bf16 on CUDA, fp32 on CPU)."""
    from dlip.precision import autocast

    return autocast(device)


def _all_gather(t: Tensor) -> Tensor:
    from dlip.distributed import all_gather_no_grad

    return all_gather_no_grad(t)


def image_features(
    model: BLIP,
    eval_set: EvalSet,
    rows: range,
    batch_size: int,
    device: torch.device,
    num_workers: int = 0,
) -> tuple[Tensor, Tensor]:
    """Normalised ITC features (n, E) fp32 and vision tokens (n, N, Dv) of images `rows`.

    Tokens stay on `device`: bf16 on CUDA (half the memory), fp32 on CPU.
    """
    from torch.utils.data import DataLoader, Subset

    from dlip.data.datasets import EvalImageDataset
    from dlip.transforms import eval_transform

    dataset = Subset(EvalImageDataset(eval_set, eval_transform(model.config)), list(rows))
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=num_workers)
    token_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    feats, tokens = [], []
    from dlip.progress import bar

    with torch.inference_mode(), _autocast(device):
        for batch in bar(loader, desc="image features", unit="batch"):
            out = model.encode_image(batch["image"].to(device, non_blocking=True))
            feats.append(out.feat.float())  # (B, E)
            tokens.append(out.tokens.to(token_dtype))  # (B, N, Dv)
    if not feats:  # an empty shard (more ranks than images)
        v = model.config.vision
        return (
            torch.zeros(0, model.config.embed_dim, device=device),
            torch.zeros(0, v.num_tokens, v.width, dtype=token_dtype, device=device),
        )
    return torch.cat(feats), torch.cat(tokens)


def tokenize_texts(texts: Sequence[str], max_length: int = TEXT_LENGTH) -> tuple[Tensor, Tensor]:
    """(n, max_length) ids with [CLS] first and the attention mask, padded to max_length."""
    from dlip.tokenizer import get_tokenizer

    enc = get_tokenizer()(list(texts), max_length=max_length, padding="max_length")
    return enc["input_ids"], enc["attention_mask"]


def text_features(
    model: BLIP, ids: Tensor, mask: Tensor, batch_size: int, device: torch.device
) -> Tensor:
    """Normalised unimodal ITC features (n, E) fp32 of the given ([CLS]-first) texts."""
    from dlip.progress import bar

    feats = [torch.zeros(0, model.config.embed_dim, device=device)]
    with torch.inference_mode(), _autocast(device):
        for start in bar(range(0, ids.shape[0], batch_size), desc="text features", unit="batch"):
            b_ids, b_mask = _trim(ids[start : start + batch_size], mask[start : start + batch_size])
            feats.append(model.encode_text(b_ids.to(device), b_mask.to(device)).feat.float())
    return torch.cat(feats)


def _trim(ids: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """Drop the padding columns no row of the batch uses (masked keys change nothing)."""
    length = max(int(mask.sum(dim=1).max()), 1) if mask.numel() else 1
    return ids[:, :length], mask[:, :length]


# ------------------------------------------------------------------------------- re-rank
@dataclass
class Candidates:
    """Each image's top-k texts and each text's top-k images by ITC similarity."""

    i2t: Tensor  # (n_images, k_i2t) text indices
    t2i: Tensor  # (n_texts, k_t2i) image indices


def top_candidates(sims: Tensor, k: int) -> Candidates:
    """Top-k by `sims` (n_images, n_texts) both ways; k clamped to the candidates available."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    k_i2t, k_t2i = min(k, sims.shape[1]), min(k, sims.shape[0])
    return Candidates(
        i2t=sims.topk(k_i2t, dim=1).indices,
        t2i=sims.t().topk(k_t2i, dim=1).indices,
    )


def _itm_chunk(
    model: BLIP, image_tokens: Tensor, img: Tensor, text_ids: Tensor, text_mask: Tensor,
    txt: Tensor, share: bool,
) -> Tensor:  # fmt: skip
    """(B, 2) ITM logits of image_tokens[img[b]] with text txt[b]. With `share`, each distinct
    image of the chunk has its cross-attention keys / values projected once (BLIP.image_kv).
    With `fusion_layers=k` the text-only layers run once per distinct text of the chunk (they
    never see the image), then the k fusion layers per pair. The same numbers as
    `itm_logits` on the gathered pairs, less work."""
    device = image_tokens.device
    ids, mask = _trim(text_ids[txt], text_mask[txt])
    ids, mask = ids.to(device), mask.to(device)
    img = img.to(device)
    if not isinstance(model, BLIP):  # ONNX Runtime (dlip.inference.ort): the itm graph
        return model.itm_logits(image_tokens[img], ids, mask)
    uniq, index = torch.unique(img, return_inverse=True)
    if not share or uniq.numel() == img.numel():  # nothing shared: one image row per pair
        uniq, index = img, None
    tokens = image_tokens[uniq]  # (U, N, Dv) distinct images, or (B, N, Dv) per pair
    if model.config.text.fusion_layers == "all":
        return model.itm_logits(tokens, ids, mask, image_index=index)
    u_txt, inverse = torch.unique(txt, return_inverse=True)
    length = ids.shape[1]
    u_ids, u_mask = text_ids[u_txt, :length].to(device), text_mask[u_txt, :length].to(device)
    states = model.encode_text(u_ids, u_mask).tokens[inverse.to(device)]  # (B, T, H)
    fused = model.multimodal(tokens, ids, mask, text_tokens=states, image_index=index).tokens
    return model.itm_head(fused[:, 0])  # fused: (B, T, H)


def itm_pair_scores(
    model: BLIP,
    image_tokens: Tensor,  # (n_local, N, Dv) tokens of the images pairs_img points into
    text_ids: Tensor,  # (n_texts, T) with [ENC] first
    text_mask: Tensor,  # (n_texts, T)
    pairs_img: Tensor,  # (P,) rows of image_tokens
    pairs_txt: Tensor,  # (P,) rows of text_ids
    itm_batch: int = 128,
    share_image_kv: bool = True,
) -> Tensor:
    """(P,) raw ITM positive logits of the pairs (input order), fp32, `itm_batch` per forward.
    Pairs run sorted by image (an image's k candidate texts share its cross-attention K/V
    with `share_image_kv`), by text with `fusion_layers=k` (text-only layers once per text)."""
    if itm_batch < 1:
        raise ValueError(f"itm_batch must be >= 1, got {itm_batch}")
    device = image_tokens.device
    fused = not isinstance(model, BLIP) or model.config.text.fusion_layers == "all"
    key = pairs_img.cpu() if fused else pairs_txt.cpu()
    order = torch.argsort(key, stable=True)
    pairs_img, pairs_txt = pairs_img.cpu()[order], pairs_txt.cpu()[order]
    from dlip.progress import bar

    out = [torch.zeros(0, device=device)]
    chunks = range(0, pairs_img.numel(), itm_batch)
    if device.type != "cuda":
        image_tokens = image_tokens.float()
    with torch.inference_mode(), _autocast(device):
        for start in bar(chunks, desc=f"ITM re-rank ({pairs_img.numel()} pairs)", unit="batch"):
            img = pairs_img[start : start + itm_batch]
            txt = pairs_txt[start : start + itm_batch].to(text_ids.device)
            logits = _itm_chunk(
                model, image_tokens, img, text_ids, text_mask, txt, share_image_kv
            )  # (B, 2)
            out.append(logits[:, 1].float())
    scores = torch.cat(out)
    return torch.empty_like(scores).scatter_(0, order.to(device), scores)


def score_candidates(
    model: BLIP,
    image_tokens: Tensor,  # (len(image_rows), N, Dv)
    text_ids: Tensor,  # (n_texts, T), [ENC] first
    text_mask: Tensor,
    sims: Tensor,  # (n_images, n_texts)
    cand: Candidates,
    itm_batch: int = 128,
    image_rows: range | None = None,
) -> tuple[Tensor, Tensor]:
    """ITM + cosine for the candidates whose image is in `image_rows` (default: all images).

    Returns (n_images, k_i2t) and (n_texts, k_t2i) tables aligned with `cand`; entries of
    other images are 0.0 (another rank's, summed in later). A pair that is a candidate both
    ways is scored once.
    """
    n_img, n_txt = sims.shape
    rows = range(n_img) if image_rows is None else image_rows
    device = sims.device
    i2t_img = torch.arange(n_img, device=device)[:, None].expand_as(cand.i2t)
    t2i_txt = torch.arange(n_txt, device=device)[:, None].expand_as(cand.t2i)
    # Pair key = image * n_texts + text, i2t candidates first, then t2i.
    keys = torch.cat(
        [(i2t_img * n_txt + cand.i2t).flatten(), (cand.t2i * n_txt + t2i_txt).flatten()]
    )
    pair_img = keys // n_txt
    mine = (pair_img >= rows.start) & (pair_img < rows.stop)
    unique, inverse = torch.unique(keys[mine], return_inverse=True)
    u_img, u_txt = unique // n_txt, unique % n_txt
    logits = itm_pair_scores(
        model, image_tokens, text_ids, text_mask, u_img - rows.start, u_txt, itm_batch
    )
    flat = torch.zeros(keys.numel(), device=device)
    flat[mine] = (logits.to(device) + sims[u_img, u_txt].float())[inverse]
    split = cand.i2t.numel()
    return flat[:split].view_as(cand.i2t), flat[split:].view_as(cand.t2i)


def dense_scores(
    sims: Tensor, cand: Candidates, s_i2t: Tensor, s_t2i: Tensor
) -> tuple[Tensor, Tensor]:
    """The (n_images, n_texts) and (n_texts, n_images) matrices: scores on candidates, -100 off."""
    n_img, n_txt = sims.shape
    i2t = torch.full((n_img, n_txt), FILL, device=sims.device).scatter_(1, cand.i2t, s_i2t)
    t2i = torch.full((n_txt, n_img), FILL, device=sims.device).scatter_(1, cand.t2i, s_t2i)
    return i2t, t2i


def rerank(
    model: BLIP,
    image_tokens: Tensor,  # (n_images, N, Dv), every image
    text_ids: Tensor,  # (n_texts, T), [ENC] first
    text_mask: Tensor,
    sims: Tensor,  # (n_images, n_texts) ITC cosine
    k: int,
    itm_batch: int = 128,
) -> tuple[Tensor, Tensor]:
    """One process's BLIP re-rank: dense (i2t, t2i) score matrices, -100 outside the top-k."""
    cand = top_candidates(sims, k)
    s_i2t, s_t2i = score_candidates(model, image_tokens, text_ids, text_mask, sims, cand, itm_batch)
    return dense_scores(sims, cand, s_i2t, s_t2i)


# ------------------------------------------------------------------------------- evaluation
def _sum_over_ranks(t: Tensor) -> Tensor:
    from dlip.distributed import is_dist

    if is_dist():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def evaluate_retrieval(
    model: BLIP,
    eval_set: EvalSet,
    k: int = 256,
    batch_size: int = 64,
    itm_batch: int = 128,
    device: torch.device | str | None = None,
    max_words: int = 30,
    num_workers: int = 0,
) -> dict[str, Any]:
    """ITC and ITC + ITM re-rank recall on `eval_set`; every rank must call it.

    Returns {"metrics" (re-ranked), "metrics_itc", "scores_i2t", "scores_t2i" (re-ranked, CPU
    fp32), "sims" (ITC, CPU), "k_i2t", "k_t2i", "seconds"}; the same on every rank.
    """
    from dlip.data.datasets import eval_texts
    from dlip.distributed import shard_range
    from dlip.losses.itm import with_first_token
    from dlip.tokenizer import get_tokenizer

    if k < 1 or batch_size < 1 or itm_batch < 1:
        got = f"k={k}, batch_size={batch_size}, itm_batch={itm_batch}"
        raise ValueError(f"k, batch_size and itm_batch must be >= 1 (got {got})")
    if not getattr(model.config, "has_itc", True):
        name = model.config.name
        raise ValueError(f"model {name!r} has no text encoder / ITM head (not a retrieval form)")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    was_training = model.training
    model.eval()
    seconds: dict[str, float] = {}
    t0 = time.perf_counter()
    image_rows = shard_range(len(eval_set.images))
    img_feat, tokens = image_features(model, eval_set, image_rows, batch_size, device, num_workers)
    img_feat = _all_gather(img_feat)  # (n_images, E)
    seconds["image_features"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    ids, mask = tokenize_texts(eval_texts(eval_set, max_words))
    text_rows = shard_range(ids.shape[0])
    sl = slice(text_rows.start, text_rows.stop)
    txt_feat = _all_gather(text_features(model, ids[sl], mask[sl], batch_size, device))
    seconds["text_features"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    sims = img_feat @ txt_feat.t()  # (n_images, n_texts) raw cosine
    metrics_itc = recall_at_k(sims, sims.t(), eval_set.img2txt, eval_set.txt2img)
    cand = top_candidates(sims, k)
    seconds["itc"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    itm_ids = with_first_token(ids, get_tokenizer().enc_token_id)
    s_i2t, s_t2i = score_candidates(model, tokens, itm_ids, mask, sims, cand, itm_batch, image_rows)
    s_i2t, s_t2i = _sum_over_ranks(s_i2t.contiguous()), _sum_over_ranks(s_t2i.contiguous())
    scores_i2t, scores_t2i = dense_scores(sims, cand, s_i2t, s_t2i)
    seconds["rerank"] = time.perf_counter() - t0
    del tokens
    model.train(was_training)
    return {
        "metrics": recall_at_k(scores_i2t, scores_t2i, eval_set.img2txt, eval_set.txt2img),
        "metrics_itc": metrics_itc,
        "scores_i2t": scores_i2t.cpu(),
        "scores_t2i": scores_t2i.cpu(),
        "sims": sims.cpu(),
        "k_i2t": cand.i2t.shape[1],
        "k_t2i": cand.t2i.shape[1],
        "seconds": seconds,
    }


# ------------------------------------------------------------------------ evaluation to a folder
def _check_settings(**values: int | None) -> None:
    for name, value in values.items():
        if value is not None and value < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {value}")


def run_retrieval_eval(
    model: str,
    data: str,
    images: str,
    out: str | Path,
    *,
    k: int = 256,
    itm_batch: int = 128,
    batch_size: int = 64,
    max_words: int = 30,
    image_size: int | None = None,
    device: str = "auto",
    num_workers: int = 2,
    dataset: str | None = None,
    precision: str = "auto",
) -> Path | None:
    """`dlip eval retrieval`: `model` (a saved directory or a preset) on the Karpathy-format
    split `data` (images under `images`) -> out/results.json + results.md; returns the json
    path on rank 0 (None on other ranks). Under torchrun every rank takes part."""
    from dlip.data.karpathy import DATASETS, load_eval_set
    from dlip.distributed import is_dist, is_main_process, setup_device
    from dlip.eval.common import (
        dataset_record,
        describe_model,
        markdown_table,
        open_model,
        results_record,
        write_results,
    )
    from dlip.precision import using

    _check_settings(
        k=k, itm_batch=itm_batch, batch_size=batch_size, max_words=max_words,
        image_size=image_size,
    )  # fmt: skip
    if not Path(data).is_file():
        raise FileNotFoundError(f"--data {data}: no such file")
    t_start = time.perf_counter()
    eval_set = load_eval_set(data, images, dataset=dataset if dataset in DATASETS else None)
    dev = setup_device(device)
    blip = open_model(model, dev, image_size)
    with using(precision):
        result = evaluate_retrieval(
            blip, eval_set, k=k, batch_size=batch_size, itm_batch=itm_batch, device=dev,
            max_words=max_words, num_workers=num_workers,
        )  # fmt: skip
    path = None
    if is_main_process():
        settings = {
            "k": k, "k_i2t": result["k_i2t"], "k_t2i": result["k_t2i"], "itm_batch": itm_batch,
            "image_size": blip.config.vision.image_size, "batch_size": batch_size,
            "max_words": max_words, "text_length": TEXT_LENGTH,
            "precision": precision,
        }  # fmt: skip
        record = results_record(
            "retrieval",
            model=describe_model(model, blip),
            dataset=dataset_record(data, images, dataset, eval_set),
            settings=settings,
            metrics=result["metrics"],
            metrics_itc=result["metrics_itc"],
            seconds={**result["seconds"], "total": time.perf_counter() - t_start},
        )
        table = markdown_table(
            {"ITC": result["metrics_itc"], f"ITC + ITM re-rank (k={k})": result["metrics"]}
        )
        path = write_results(out, record, table)
        print(table)
        print(f"wrote {path}")
    if is_dist():
        dist.barrier()
    return path
