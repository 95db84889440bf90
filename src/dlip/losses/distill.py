"""Knowledge-distillation terms: a frozen teacher's outputs -> named scalar losses for a student.

Each term is a function returning one unweighted scalar; `distill_losses` computes the terms a
`KDConfig` enables (weight > 0) and returns them by name (`KD_TERMS`); the trainer multiplies
by the weights and sums in one visible place. Teacher tensors are detached here (the teacher
also runs under no_grad); all math is float32 whatever the autocast dtype.

Terms (KL is always KL(teacher || student), the teacher's distribution as the target):

- `kd_itc`: ITC affinity KD, in-batch (or over gathered keys) image->text and text->image.
- `kd_itm`: KL on the 2-way ITM logits of the same rows (positives and hard negatives).
- `kd_lm`: KL on the decoder's next-token distributions, pad and prompt positions masked.
- `kd_rep_*`: image CLS, patch tokens, unimodal text CLS, fusion `[ENC]` state, decoder states;
  1 - cosine or MSE through the learnable projectors of `KDAdapters` (never the ITC heads).
- `kd_hidden_*`: hidden states of mapped layers (`LayerMap`), through one projector per stream.
- `kd_feat`, `kd_icl`: CLIP-KD's feature mimicry and contrastive terms (`losses.clipkd`).
- `kd_attn_*`: attention probability maps of mapped layers: vision self-attention (`image`),
  unimodal text self-attention (`text`), the image-grounded encoder's self-attention
  (`fusion`) and cross-attention (`cross`), the decoder's causal self-attention (`decoder`).

Rules (an unofficial DLIP V2 re-implementation, github.com/jfan1256/distill-blip, applied a
second softmax to attention probabilities and left padding in the maps: the counter-examples):

- Attention maps arrive as probabilities; they are never put through softmax again. KL uses
  log(clamp(p_student, eps)) and xlogy for the teacher's zeros.
- Padding: padded keys are removed from both maps and each row is renormalised over the valid
  keys (so whatever sits in a padded column cannot matter), and padded query rows get weight 0.
  The causal decoder needs nothing more: future keys are zero in both maps.
- Unequal head counts: when Ht is a multiple of Hs, the teacher's heads are averaged in groups
  of Ht/Hs consecutive heads (teacher heads g*k .. g*k+k-1 -> student head g); otherwise both
  maps are averaged over all heads and compared as one map. A mean of attention distributions
  is a distribution, so KL stays well defined.
- Image size: a teacher that sees another image size has another patch grid; its tokens, and
  its attention maps along both image axes, are resampled to the student's grid
  (`resample_patches`: CLS kept, antialiased bilinear on the grid, probability mass kept
  along attention keys). Text lengths must match (one tokenizer; anything else is an error).
- Layer terms average over the mapped (student, teacher) layer pairs, so a term's scale does
  not grow with depth.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dlip.losses.adapters import (
    KD_TERMS,
    PATCH_POOLS,
    REP_LOSSES,
    STREAMS,
    KDAdapters,
    KDConfig,
    LayerMap,
    resample_patches,
)
from dlip.losses.clipkd import EMBED_PROJECTORS, TeacherKeys, feature_kd, icl_kd
from dlip.models.outputs import ImageOutput, TextOutput
from dlip.precision import float32_math

__all__ = [
    "KD_TERMS",
    "ITCFeatures",
    "KDAdapters",
    "KDConfig",
    "KDInputs",
    "KDMasks",
    "LayerMap",
    "attention_kd",
    "attention_kd_layers",
    "distill_losses",
    "hidden_kd",
    "itc_kd",
    "itm_kd",
    "kl_logits",
    "lm_kd",
    "lm_kd_mask",
    "match_heads",
    "patch_kd",
    "rep_kd",
]


# ------------------------------------------------------------------------------------- inputs
@dataclass
class ITCFeatures:
    """One model's ITC features. `image_all` / `text_all`: the same features gathered from
    every rank (the caller gathers); then local rows are scored against all gathered columns,
    and the mean over ranks of the local terms equals the single-process term."""

    image: Tensor  # (B, E) L2-normalised vision_proj(CLS), this rank's rows
    text: Tensor  # (B, E) L2-normalised text_proj(CLS)
    temp: Tensor | float  # the model's ITC temperature (the ITC loss owns its clamp)
    image_all: Tensor | None = None  # (G, E) gathered images: keys of text->image; None = in-batch
    text_all: Tensor | None = None  # (G, E) gathered texts: keys of image->text; None = in-batch


@dataclass
class KDInputs:
    """What one model (student or teacher) produced for a batch; a term reads only its fields.

    - image: `encode_image(pixels, taps=adapters.taps("image", side))`
    - text: `encode_text(cls_ids, mask, taps=adapters.taps("text", side))`
    - fusion: `multimodal(image.tokens, enc_ids, mask, taps=adapters.taps("fusion", side))`
      on the same rows for both models ([ENC] first; positives and negatives as chosen)
    - decoder: `decode(image.tokens, dec_ids, mask, taps=adapters.taps("decoder", side))`
    - itc: features and temperature; itm_logits (N, 2) of the same rows for both models;
      lm_logits (N, V) = the decoder's LM head on `decoder.tokens` at the positions
      `KDMasks.lm` marks (row-major), the only ones LM KD reads.
    """

    image: ImageOutput | None = None
    text: TextOutput | None = None
    fusion: TextOutput | None = None
    decoder: TextOutput | None = None
    itc: ITCFeatures | None = None
    itm_logits: Tensor | None = None
    lm_logits: Tensor | None = None
    keys: TeacherKeys | None = None  # teacher side, kd_icl: batch (+ queue) ITC embeddings


@dataclass
class KDMasks:
    """Masks shared by both models (same token ids). 1/True = real token; None = all real."""

    text: Tensor | None = None  # (B, T) attention mask of the unimodal text pass
    fusion: Tensor | None = None  # (B', T) of the multimodal pass; None = `text`
    decoder: Tensor | None = None  # (B, T) attention mask of the decoder pass
    lm: Tensor | None = None  # (B, T) over logit positions: True where the next token counts


def lm_kd_mask(attention_mask: Tensor, prompt_length: int | Tensor = 0) -> Tensor:
    """(B, T) bool over logit positions: position t predicts token t+1 and counts when token
    t+1 is real (not padding) and not part of the prompt (`prompt_length` counts [DEC] and
    the prompt tokens, as BLIP; an int or a (B,) tensor). The last position predicts nothing."""
    b, t = attention_mask.shape
    pos = torch.arange(t, device=attention_mask.device)
    prompt = torch.as_tensor(prompt_length, device=attention_mask.device).reshape(-1, 1)
    target_ok = attention_mask.bool() & (pos[None] >= prompt)  # (B, T) token j is a target
    mask = torch.zeros(b, t, dtype=torch.bool, device=attention_mask.device)
    mask[:, :-1] = target_ok[:, 1:]
    return mask


# ------------------------------------------------------------------------------ logit terms
def kl_logits(student: Tensor, teacher: Tensor, temperature: float = 1.0) -> Tensor:
    """(..., C) logits -> (...) KL(softmax(teacher/T) || softmax(student/T)) in float32."""
    s = F.log_softmax(student.float() / temperature, dim=-1)
    t = F.log_softmax(teacher.detach().float() / temperature, dim=-1)
    return (t.exp() * (t - s)).sum(-1)


def itc_kd(student: ITCFeatures, teacher: ITCFeatures, temperature: float | None = None) -> Tensor:
    """ITC affinity KD: mean over rows of KL between the teacher's and the student's
    image->text and text->image similarity distributions, the two directions averaged.

    Each model's similarities come from its own features and its own temperature (or
    `temperature` for the teacher), so the two embedding spaces are never mixed. The student's
    momentum queue is deliberately left out: a teacher target over student queue entries
    would score the teacher's features against another model's space (DLIP V2's bug). No T^2
    factor: these temperatures are the models' contrastive temperatures, not a softening.
    """
    t_temp = teacher.temp if temperature is None else temperature
    pairs = []
    for side in (student, teacher):
        texts = side.text if side.text_all is None else side.text_all
        images = side.image if side.image_all is None else side.image_all
        pairs.append((side.image.float() @ texts.float().T, side.text.float() @ images.float().T))
    (s_i2t, s_t2i), (t_i2t, t_t2i) = pairs
    if s_i2t.shape != t_i2t.shape or s_t2i.shape != t_t2i.shape:
        raise ValueError(
            f"kd_itc: student and teacher similarity shapes differ "
            f"({tuple(s_i2t.shape)} vs {tuple(t_i2t.shape)}); give both the same rows and keys"
        )
    i2t = kl_logits(s_i2t / student.temp, t_i2t / t_temp).mean()
    t2i = kl_logits(s_t2i / student.temp, t_t2i / t_temp).mean()
    return (i2t + t2i) / 2


def itm_kd(student: Tensor, teacher: Tensor, temperature: float = 1.0) -> Tensor:
    """(N, 2) ITM logits of the same rows -> T^2 * mean KL of the softened 2-way distributions."""
    _same_shape("kd_itm", student, teacher)
    return kl_logits(student, teacher, temperature).mean() * temperature**2


def lm_kd(
    student: Tensor, teacher: Tensor, mask: Tensor | None = None, temperature: float = 1.0
) -> Tensor:
    """Next-token logits -> T^2 * mean over counted positions of KL between the softened
    teacher and student distributions. Logits are (B, T, V) with `mask` (B, T) marking the
    counted positions (see `lm_kd_mask`), or already gathered there: (N, V), `mask` then only
    checks the count."""
    if student.shape[-1] != teacher.shape[-1]:
        raise ValueError(
            f"kd_lm needs equal vocabularies: student {student.shape[-1]}, "
            f"teacher {teacher.shape[-1]}"
        )
    _same_shape("kd_lm", student, teacher)
    s, t = student.flatten(0, -2), teacher.flatten(0, -2)  # (N, V)
    if mask is not None and student.dim() == mask.dim() + 1:
        keep = mask.bool()
        s, t = student[keep], teacher[keep]  # (N, V): only counted positions reach float32
    elif mask is not None and s.shape[0] != int(mask.sum()):
        raise ValueError(
            f"kd_lm: {s.shape[0]} gathered logit rows for {int(mask.sum())} counted positions"
        )
    if s.shape[0] == 0:
        return student.sum() * 0.0
    return kl_logits(s, t, temperature).mean() * temperature**2


# ---------------------------------------------------------------------- representation terms
def rep_kd(
    student: Tensor,
    teacher: Tensor,
    projector: nn.Module,
    kind: str = "cos",
    mask: Tensor | None = None,
) -> Tensor:
    """(..., Ds) student, (..., Dt) teacher -> mean over vectors of 1 - cos(P s, t) ("cos") or
    of mean_d (P s - t)^2 ("mse"); `mask` (same leading shape, 1 = counts) weights vectors."""
    s = projector(student.float())  # float32 math: the projector's weights are float32
    t = teacher.detach().float()
    _same_shape("representation KD (after the projector)", s, t)
    if kind == "cos":
        per = 1.0 - F.cosine_similarity(s, t, dim=-1, eps=1e-8)
    elif kind == "mse":
        per = (s - t).pow(2).mean(-1)
    else:
        raise ValueError(f"representation loss {kind!r}; choose one of {REP_LOSSES}")
    return masked_mean(per, mask)


def patch_kd(
    student: Tensor, teacher: Tensor, projector: nn.Module, kind: str = "cos", pool: str = "token"
) -> Tensor:
    """Image tokens (B, 1+Ns, Ds) vs (B, 1+Nt, Dt), CLS first. "token": per patch, after the
    teacher's grid is resampled to the student's (`resample_patches`); "mean": mean patches."""
    if pool == "mean":
        return rep_kd(student[:, 1:].mean(1), teacher[:, 1:].mean(1), projector, kind)
    if pool != "token":
        raise ValueError(f"patch pool {pool!r}; choose one of {PATCH_POOLS}")
    teacher = resample_patches(teacher.detach(), student.shape[1], dim=1)
    return rep_kd(student[:, 1:], teacher[:, 1:], projector, kind)


def hidden_kd(
    student: Mapping[int, Tensor],
    teacher: Mapping[int, Tensor],
    layer_map: LayerMap,
    projector: nn.Module,
    kind: str = "mse",
    mask: Tensor | None = None,
    image: bool = False,
) -> Tensor:
    """Hidden states {layer: (B, T, D)} of mapped layers -> mean over pairs of `rep_kd` per
    token (`mask` (B, T) excludes padding). `image`: the teacher's grid is resampled."""
    losses = []
    for s_layer, t_layer in layer_map.pairs:
        s = _tap(student, s_layer, layer_map.stream, "student", "hidden")
        t = _tap(teacher, t_layer, layer_map.stream, "teacher", "hidden").detach()
        if image:
            t = resample_patches(t, s.shape[1], dim=1)
        losses.append(rep_kd(s, t, projector, kind, mask))
    return torch.stack(losses).mean()


# --------------------------------------------------------------------------- attention terms
def match_heads(student: Tensor, teacher: Tensor) -> tuple[Tensor, Tensor]:
    """(B, Hs, Tq, Tk), (B, Ht, Tq, Tk) -> maps with equal head counts (module docstring rule):
    Ht a multiple of Hs -> teacher heads averaged in Hs groups of Ht/Hs consecutive heads;
    otherwise both averaged over all heads, leaving one head each."""
    hs, ht = student.shape[1], teacher.shape[1]
    if ht % hs == 0:
        b, _, tq, tk = teacher.shape
        return student, teacher.reshape(b, hs, ht // hs, tq, tk).mean(2)
    return student.mean(1, keepdim=True), teacher.mean(1, keepdim=True)


def attention_kd(
    student: Tensor,
    teacher: Tensor,
    key_mask: Tensor | None = None,
    query_mask: Tensor | None = None,
    eps: float = 1e-8,
) -> Tensor:
    """KL(teacher || student) between attention PROBABILITIES (B, H, Tq, Tk), summed over keys,
    averaged over heads (after `match_heads`) and valid query rows.

    key_mask (B, Tk), 1 = real key: padded keys are zeroed in both maps and each row is
    renormalised over the valid keys. query_mask (B, Tq), 1 = real query: padded rows are
    excluded from the mean. No softmax is applied: the inputs already are distributions.
    """
    s, t = match_heads(student.float(), teacher.detach().float())
    if s.shape != t.shape:
        raise ValueError(
            f"attention KD: maps differ after head matching ({tuple(s.shape)} vs "
            f"{tuple(t.shape)}); text lengths must match"
        )
    if key_mask is not None:
        keep = key_mask[:, None, None, :].to(s.dtype)  # (B, 1, 1, Tk)
        s = s * keep / (s * keep).sum(-1, keepdim=True).clamp_min(eps)
        t = t * keep / (t * keep).sum(-1, keepdim=True).clamp_min(eps)
    rows = (torch.xlogy(t, t) - t * s.clamp_min(eps).log()).sum(-1)  # (B, H, Tq)
    weights = None if query_mask is None else query_mask[:, None, :].expand_as(rows)
    return masked_mean(rows, weights)


def attention_kd_layers(
    student: Mapping[int, Tensor],
    teacher: Mapping[int, Tensor],
    layer_map: LayerMap,
    key_mask: Tensor | None = None,
    query_mask: Tensor | None = None,
    image_queries: bool = False,
    image_keys: bool = False,
    eps: float = 1e-8,
) -> Tensor:
    """`attention_kd` averaged over the mapped layer pairs. `image_queries` / `image_keys`:
    that axis holds image tokens, and the teacher's grid is resampled to the student's."""
    losses = []
    for s_layer, t_layer in layer_map.pairs:
        s = _tap(student, s_layer, layer_map.stream, "student", "attention")
        t = _tap(teacher, t_layer, layer_map.stream, "teacher", "attention").detach()
        if image_queries:
            t = resample_patches(t, s.shape[2], dim=2)  # rows mix convexly: still distributions
        if image_keys:
            t = resample_patches(t, s.shape[3], dim=3, mass=True)
        losses.append(attention_kd(s, t, key_mask, query_mask, eps))
    return torch.stack(losses).mean()


# ----------------------------------------------------------------------------- orchestration
@float32_math()
def distill_losses(
    student: KDInputs,
    teacher: KDInputs,
    adapters: KDAdapters,
    cfg: KDConfig,
    masks: KDMasks | None = None,
) -> dict[str, Tensor]:
    """Every enabled term (weight > 0), unweighted, by name. A missing input or tap is a
    ValueError naming the term; a field a disabled term would read is never touched."""
    masks = masks or KDMasks()
    return {
        term: _TERMS[term](term, student, teacher, adapters, cfg, masks) for term in cfg.enabled
    }


TermFn = Callable[[str, KDInputs, KDInputs, KDAdapters, KDConfig, KDMasks], Tensor]


def _itc(term, s, t, a, cfg, m) -> Tensor:
    return itc_kd(*_need(s, t, "itc", term), cfg.itc_temperature)


def _itm(term, s, t, a, cfg, m) -> Tensor:
    return itm_kd(*_need(s, t, "itm_logits", term), cfg.itm_temperature)


def _lm(term, s, t, a, cfg, m) -> Tensor:
    return lm_kd(*_need(s, t, "lm_logits", term), m.lm, cfg.lm_temperature)


def _embed(term, s, t, a, cfg, m) -> Tensor:
    (s_itc, t_itc), proj = _need(s, t, "itc", term), EMBED_PROJECTORS
    p_image, p_text = (a.projector(name) for name in proj)
    if term == "kd_feat":
        return feature_kd(s_itc.image, s_itc.text, t_itc.image, t_itc.text, p_image, p_text)
    if t.keys is None:
        raise ValueError(f"{term} needs the teacher's keys (KDInputs.keys)")
    return icl_kd(s_itc.image, s_itc.text, t.keys, s_itc.temp, p_image, p_text)


def _rep(term, s, t, a, cfg, m, stream: str) -> Tensor:
    s_out, t_out = _need(s, t, stream, term)
    proj = a.projector(term)
    if term == "kd_rep_patch":
        return patch_kd(s_out.tokens, t_out.tokens, proj, cfg.rep_loss, cfg.patch_pool)
    if stream == "decoder":  # every decoder state, padding excluded
        return rep_kd(s_out.tokens, t_out.tokens, proj, cfg.rep_loss, _stream_mask(m, stream))
    return rep_kd(s_out.tokens[:, 0], t_out.tokens[:, 0], proj, cfg.rep_loss)  # CLS / [ENC]


def _hidden(term, s, t, a, cfg, m, stream: str) -> Tensor:
    s_out, t_out = _need(s, t, stream, term)
    return hidden_kd(
        s_out.hidden,
        t_out.hidden,
        _layer_map(a, stream, term),
        a.projector(term),
        cfg.hidden_loss,
        _stream_mask(m, stream),
        image=stream == "image",
    )


def _attn(term, s, t, a, cfg, m, stream: str, cross: bool = False) -> Tensor:
    s_out, t_out = _need(s, t, stream, term)
    mask = _stream_mask(m, stream)
    name = "cross_attn" if cross else "attn"
    return attention_kd_layers(
        getattr(s_out, name),
        getattr(t_out, name),
        _layer_map(a, stream, term),
        key_mask=None if cross else mask,  # image keys carry no padding
        query_mask=mask,
        image_queries=stream == "image",
        image_keys=cross or stream == "image",
        eps=cfg.eps,
    )


_TERMS: dict[str, TermFn] = {
    "kd_itc": _itc,
    "kd_itm": _itm,
    "kd_lm": _lm,
    "kd_feat": _embed,
    "kd_icl": _embed,
    "kd_rep_image": partial(_rep, stream="image"),
    "kd_rep_patch": partial(_rep, stream="image"),
    "kd_rep_text": partial(_rep, stream="text"),
    "kd_rep_fusion": partial(_rep, stream="fusion"),
    "kd_rep_decoder": partial(_rep, stream="decoder"),
    **{f"kd_hidden_{s}": partial(_hidden, stream=s) for s in STREAMS},
    **{f"kd_attn_{s}": partial(_attn, stream=s) for s in ("image", "text", "decoder")},
    "kd_attn_fusion": partial(_attn, stream="fusion"),
    "kd_attn_cross": partial(_attn, stream="fusion", cross=True),
}
assert set(_TERMS) == set(KD_TERMS)


def token_mask(term: str, masks: KDMasks) -> Tensor | None:
    """The mask over text tokens that `term` averages over, or None when it is a mean over
    samples, rows or image tokens (a count fixed per sample). Under DDP a token mean must be
    weighted by the rank's share of the global batch's tokens (dlip.train.task), since ranks
    hold different numbers of real tokens."""
    if term == "kd_lm":
        return masks.lm
    kind = KD_TERMS[term]
    if kind.stream == "image" or kind.kind in ("logits", "embed"):
        return None
    if kind.kind == "rep" and kind.stream != "decoder":  # one [CLS] / [ENC] per sample
        return None
    return _stream_mask(masks, kind.stream)


# ---------------------------------------------------------------------------------- helpers
def masked_mean(x: Tensor, mask: Tensor | None = None) -> Tensor:
    """Mean of `x` over entries where `mask` (broadcast to x's leading dims) is nonzero."""
    if mask is None:
        return x.mean()
    w = mask.to(x.dtype)
    w = w.reshape(*w.shape, *([1] * (x.dim() - w.dim()))).expand_as(x)
    return (x * w).sum() / w.sum().clamp_min(1.0)


def _same_shape(what: str, student: Tensor, teacher: Tensor) -> None:
    if student.shape != teacher.shape:
        raise ValueError(
            f"{what}: student shape {tuple(student.shape)} != teacher shape {tuple(teacher.shape)}"
        )


def _need(student: KDInputs, teacher: KDInputs, name: str, term: str) -> tuple[Any, Any]:
    """(student.name, teacher.name), or a ValueError naming the term and the missing field."""
    for side, inputs in (("student", student), ("teacher", teacher)):
        if getattr(inputs, name) is None:
            raise ValueError(f"{term} needs the {side}'s KDInputs.{name}")
    return getattr(student, name), getattr(teacher, name)


def _tap(taps: Mapping[int, Tensor], layer: int, stream: str, side: str, what: str) -> Tensor:
    if layer not in taps:
        raise ValueError(
            f"KD {stream} {what}: the {side} output has no tapped layer {layer} (has "
            f"{sorted(taps)}); run the {side} with taps=adapters.taps({stream!r}, {side!r})"
        )
    return taps[layer]


def _layer_map(adapters: KDAdapters, stream: str, term: str) -> LayerMap:
    if stream not in adapters.layer_maps:
        raise ValueError(f"{term}: KDAdapters has no '{stream}' layer map; build it with {term} on")
    return adapters.layer_maps[stream]


def _stream_mask(masks: KDMasks, stream: str) -> Tensor | None:
    if stream == "image":
        return None
    if stream == "fusion" and masks.fusion is None:
        return masks.text
    return getattr(masks, stream)
