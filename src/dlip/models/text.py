"""Text tower: BERT post-LN layers as BLIP's MED, with per-layer optional cross-attention.

Module and parameter names follow BLIP's (`embeddings.word_embeddings`,
`encoder.layer.N.attention.self.query`, `...crossattention...`, `cls.predictions...`) so that a
Salesforce checkpoint maps onto this code by a thin, strict key map.

One `TextModel` serves three uses: unimodal text (self-attention only), the image-grounded
encoder (cross-attention in the fusion layers) and the causal decoder. A decoder built with
`shared=encoder` reuses every encoder module except the self-attention blocks (BLIP's tying).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from dlip.models.config import TextConfig
from dlip.models.outputs import NO_TAPS, Taps, TextOutput

KV = tuple[Tensor, Tensor]  # (B, H, T, d) keys and values


@dataclass
class KVCache:
    """Keys/values of past decoder tokens (self-attention) and of the image (cross-attention)."""

    self_kv: list[KV | None]
    cross_kv: list[KV | None]

    @classmethod
    def empty(cls, num_layers: int) -> KVCache:
        return cls([None] * num_layers, [None] * num_layers)

    @property
    def length(self) -> int:
        kv = next((kv for kv in self.self_kv if kv is not None), None)
        return 0 if kv is None else kv[0].shape[2]

    def reorder(self, index: Tensor, cross: bool = True) -> None:
        """Keep batch rows `index` (beam search): (B,) -> rows of every cached tensor.

        `cross=False` leaves the image keys/values alone: valid when `index` only permutes
        rows that share an image (beams of one caption), and it saves copying (B, H, N, d)
        per layer per step.
        """
        self.self_kv = [None if kv is None else (kv[0][index], kv[1][index]) for kv in self.self_kv]
        if cross:
            self.cross_kv = [
                None if kv is None else (kv[0][index], kv[1][index]) for kv in self.cross_kv
            ]


def additive_mask(keep: Tensor, dtype: torch.dtype) -> Tensor:
    """Bool/0-1 mask (1 = attend) -> additive float mask (0 = attend, dtype min = masked)."""
    return (1.0 - keep.to(dtype)) * torch.finfo(dtype).min


def causal_keep(query_len: int, past_len: int, device: torch.device) -> Tensor:
    """(Tq, past+Tq) bool: query i (at position past+i) sees keys 0..past+i."""
    q = torch.arange(past_len, past_len + query_len, device=device)[:, None]
    k = torch.arange(past_len + query_len, device=device)[None, :]
    return k <= q


class QKV(nn.Module):
    def __init__(self, hidden: int, kv_width: int) -> None:
        super().__init__()
        self.query = nn.Linear(hidden, hidden)
        self.key = nn.Linear(kv_width, hidden)
        self.value = nn.Linear(kv_width, hidden)


class ResidualNorm(nn.Module):
    """dense -> dropout -> LayerNorm(x + residual): BERT's post-LN output sub-layer."""

    def __init__(self, in_dim: int, hidden: int, eps: float, dropout: float) -> None:
        super().__init__()
        self.dense = nn.Linear(in_dim, hidden)
        self.LayerNorm = nn.LayerNorm(hidden, eps=eps)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor, residual: Tensor) -> Tensor:
        return self.LayerNorm(self.dropout(self.dense(x)) + residual)


class Attention(nn.Module):
    """Multi-head attention + its post-LN output; self-attention or cross-attention to images."""

    def __init__(self, cfg: TextConfig, kv_width: int) -> None:
        super().__init__()
        self.num_heads = cfg.num_heads
        self.head_dim = cfg.hidden_size // cfg.num_heads
        self.attn_dropout = cfg.dropout
        self.self = QKV(cfg.hidden_size, kv_width)
        self.output = ResidualNorm(
            cfg.hidden_size, cfg.hidden_size, cfg.layer_norm_eps, cfg.dropout
        )

    def _heads(self, x: Tensor) -> Tensor:  # (B, T, D) -> (B, H, T, d)
        b, t, _ = x.shape
        return x.view(b, t, self.num_heads, self.head_dim).transpose(1, 2)

    def project_kv(self, source: Tensor) -> KV:
        return self._heads(self.self.key(source)), self._heads(self.self.value(source))

    def forward(
        self,
        x: Tensor,  # (B, T, D)
        mask: Tensor | None,  # additive, broadcastable to (B, H, T, T_keys); None = attend all
        source: Tensor | None = None,  # (B, N, Dk) for cross-attention; None = self-attention
        past: KV | None = None,
        static_kv: KV | None = None,  # precomputed cross-attention keys/values (generation)
        need_probs: bool = False,
    ) -> tuple[Tensor, Tensor | None, KV]:
        q = self._heads(self.self.query(x))  # (B, H, T, d)
        if static_kv is not None:
            k, v = static_kv
        else:
            k, v = self.project_kv(x if source is None else source)
            if past is not None:  # self-attention over cached tokens + new ones
                k, v = torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2)
        group = q.shape[0] // k.shape[0]  # > 1: g query rows per source row (beams, shared)
        if group > 1:
            ctx, probs = self._grouped(q, k, v, mask, group, need_probs)
        else:
            ctx, probs = self._attend(q, k, v, mask, need_probs)
        ctx = ctx.transpose(1, 2).flatten(2)  # (B, T, D)
        return self.output(ctx, x), probs, (k, v)

    def _attend(
        self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, need_probs: bool
    ) -> tuple[Tensor, Tensor | None]:
        """(B, H, T, d) context, and the (B, H, T, Tk) probabilities when asked."""
        p = self.attn_dropout if self.training else 0.0
        if not need_probs:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p), None
        scores = (q @ k.transpose(-2, -1)) / math.sqrt(self.head_dim)  # (B, H, T, Tk)
        probs = (scores if mask is None else scores + mask).softmax(dim=-1)
        return F.dropout(probs, p, self.training) @ v, probs

    def _grouped(
        self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, g: int, need_probs: bool
    ) -> tuple[Tensor, Tensor | None]:
        """Cross-attention of B*g query rows (row b*g + j: the j-th beam of source b) to B
        sources whose keys / values were projected once per source, not once per beam: the g
        rows' queries are folded into one longer query of their source (exact: the queries of
        one row never see each other in cross-attention)."""
        b, h, t, d = k.shape[0], q.shape[1], q.shape[2], q.shape[3]
        if q.shape[0] != b * g:
            raise ValueError(f"{q.shape[0]} query rows for {b} sources: not a multiple")
        folded = q.view(b, g, h, t, d).transpose(1, 2).reshape(b, h, g * t, d)
        if mask is not None and mask.shape[0] == b * g:
            mask = mask[::g]  # one source mask per group (the beams of a source share it)
        ctx, probs = self._attend(folded, k, v, mask, need_probs)

        def unfold(x: Tensor) -> Tensor:  # (B, H, g*T, X) -> (B*g, H, T, X)
            return x.view(b, h, g, t, -1).transpose(1, 2).reshape(b * g, h, t, x.shape[-1])

        return unfold(ctx), None if probs is None else unfold(probs)


class Intermediate(nn.Module):
    def __init__(self, hidden: int, inner: int) -> None:
        super().__init__()
        self.dense = nn.Linear(hidden, inner)

    def forward(self, x: Tensor) -> Tensor:
        return F.gelu(self.dense(x))  # exact (erf) GELU, as BERT / BLIP


class TextLayer(nn.Module):
    """Self-attention -> [cross-attention] -> feed-forward, each post-LN."""

    def __init__(
        self, cfg: TextConfig, encoder_width: int, cross: bool, shared: TextLayer | None = None
    ) -> None:
        super().__init__()
        self.attention = Attention(cfg, cfg.hidden_size)  # never shared
        if shared is not None:
            self.crossattention = shared.crossattention
            self.intermediate = shared.intermediate
            self.output = shared.output
            return
        self.crossattention = Attention(cfg, encoder_width) if cross else None
        self.intermediate = Intermediate(cfg.hidden_size, cfg.intermediate_size)
        self.output = ResidualNorm(
            cfg.intermediate_size, cfg.hidden_size, cfg.layer_norm_eps, cfg.dropout
        )

    def forward(
        self,
        x: Tensor,
        self_mask: Tensor,
        image: Tensor | None,
        image_mask: Tensor | None,
        past: KV | None,
        static_kv: KV | None,
        need_probs: bool,
    ) -> tuple[Tensor, Tensor | None, Tensor | None, KV, KV | None]:
        x, self_probs, self_kv = self.attention(x, self_mask, past=past, need_probs=need_probs)
        cross_probs = cross_kv = None
        if self.crossattention is not None and (image is not None or static_kv is not None):
            x, cross_probs, cross_kv = self.crossattention(
                x, image_mask, source=image, static_kv=static_kv, need_probs=need_probs
            )
        x = self.output(self.intermediate(x), x)
        return x, self_probs, cross_probs, self_kv, cross_kv


class TextEmbeddings(nn.Module):
    """Word + absolute position embeddings (no token types, as BLIP), LayerNorm, dropout."""

    def __init__(self, cfg: TextConfig) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size, padding_idx=0)
        self.position_embeddings = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, input_ids: Tensor, past_len: int = 0) -> Tensor:
        t = input_ids.shape[1]
        if past_len + t > self.position_embeddings.num_embeddings:
            raise ValueError(
                f"text of {past_len + t} tokens exceeds the model's "
                f"{self.position_embeddings.num_embeddings} positions"
            )
        pos = torch.arange(past_len, past_len + t, device=input_ids.device)
        x = self.word_embeddings(input_ids) + self.position_embeddings(pos)[None]
        return self.dropout(self.LayerNorm(x))


class LayerStack(nn.Module):
    """Holds `layer` so parameter names read `encoder.layer.N...` as in BERT."""

    def __init__(self, layers: list[TextLayer]) -> None:
        super().__init__()
        self.layer = nn.ModuleList(layers)


class TextModel(nn.Module):
    """BLIP's `BertModel` without pooler: embeddings + layers; see module docstring."""

    def __init__(self, cfg: TextConfig, encoder_width: int, shared: TextModel | None = None):
        super().__init__()
        self.cfg = cfg
        self.embeddings = shared.embeddings if shared is not None else TextEmbeddings(cfg)
        layers = [
            TextLayer(
                cfg,
                encoder_width,
                cross=cfg.has_cross_attention(i),
                shared=None if shared is None else shared.encoder.layer[i],
            )
            for i in range(cfg.num_layers)
        ]
        self.encoder = LayerStack(layers)
        self.grad_checkpointing = False

    def forward(
        self,
        input_ids: Tensor | None,  # (B, T); None when `hidden_in` is given
        attention_mask: Tensor,  # (B, T) 1 = real token, 0 = padding (or (B, past+T) with cache)
        image: Tensor | None = None,  # (B, N, Dv) image tokens; None = no cross-attention
        image_mask: Tensor | None = None,  # (B, N) 1 = attend; default all ones
        causal: bool = False,
        layers: range | None = None,
        hidden_in: Tensor | None = None,  # (B, T, D) start from these states instead of embeddings
        cache: KVCache | None = None,
        taps: Taps = NO_TAPS,
    ) -> TextOutput:
        layers = range(self.cfg.num_layers) if layers is None else layers
        past_len = 0 if cache is None else cache.length
        x = self.embeddings(input_ids, past_len) if hidden_in is None else hidden_in
        dtype = x.dtype
        t = x.shape[1]
        keep = attention_mask[:, None, None, :].bool()  # (B, 1, 1, past+T)
        if causal:
            keep = keep & causal_keep(t, past_len, x.device)[None, None]
        self_mask = additive_mask(keep, dtype)
        image_add = None  # None: every image token is attended
        if image_mask is not None:  # also for cached cross K/V (image None after step 1)
            image_add = additive_mask(image_mask[:, None, None, :], dtype)
        out = TextOutput(tokens=x)
        for i in layers:
            x = self._run_layer(i, x, self_mask, image, image_add, cache, taps, out)
        out.tokens = x
        return out

    def _run_layer(
        self,
        i: int,
        x: Tensor,
        self_mask: Tensor,
        image: Tensor | None,
        image_add: Tensor | None,
        cache: KVCache | None,
        taps: Taps,
        out: TextOutput,
    ) -> Tensor:
        layer = self.encoder.layer[i]
        need = i in taps.attn
        past = None if cache is None else cache.self_kv[i]
        static = None if cache is None else cache.cross_kv[i]
        args = (x, self_mask, image, image_add, past, static, need)
        if self.grad_checkpointing and self.training and cache is None and not need:
            x, sp, cp, skv, ckv = checkpoint(layer, *args, use_reentrant=False)
        else:
            x, sp, cp, skv, ckv = layer(*args)
        if cache is not None:
            cache.self_kv[i] = skv
            if ckv is not None:
                cache.cross_kv[i] = ckv
        if need:
            out.attn[i] = sp
            if cp is not None:
                out.cross_attn[i] = cp
        if i in taps.hidden:
            out.hidden[i] = x
        return x


class PredictionTransform(nn.Module):
    def __init__(self, cfg: TextConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, x: Tensor) -> Tensor:
        return self.LayerNorm(F.gelu(self.dense(x)))


class LMPrediction(nn.Module):
    """BERT's LM head; `decoder.weight` is tied to the word embeddings (set by the owner)."""

    def __init__(self, cfg: TextConfig) -> None:
        super().__init__()
        self.transform = PredictionTransform(cfg)
        self.decoder = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.bias = nn.Parameter(torch.zeros(cfg.vocab_size))

    def forward(self, x: Tensor) -> Tensor:
        return self.decoder(self.transform(x)) + self.bias  # (B, T, V)


class LMHead(nn.Module):
    """Holds `predictions` so names read `cls.predictions...` as in BERT."""

    def __init__(self, cfg: TextConfig) -> None:
        super().__init__()
        self.predictions = LMPrediction(cfg)

    def forward(self, x: Tensor) -> Tensor:
        return self.predictions(x)


class TextDecoder(nn.Module):
    """Causal image-grounded decoder: `bert` (possibly tied to the encoder) + `cls` LM head."""

    def __init__(self, cfg: TextConfig, encoder_width: int, shared: TextModel | None = None):
        super().__init__()
        self.bert = TextModel(cfg, encoder_width, shared=shared)
        self.cls = LMHead(cfg)
        self.cls.predictions.decoder.weight = self.bert.embeddings.word_embeddings.weight
