"""The graphs `dlip export onnx` writes (dlip.inference.onnx): a wrapper module per graph and its
`GraphSpec` (input / output names, symbolic shapes, a maker of random inputs for the export
example and the parity runs). Which graphs a model gets depends on its parts: see
`graph_specs` and the list in dlip.inference.onnx.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from dlip.models.blip import BLIP
from dlip.models.text import KVCache
from dlip.tokenizer import Tokenizer

Shape = list[int | str]


# ----------------------------------------------------------------------------- wrappers
class ImageEncoder(nn.Module):
    def __init__(self, model: BLIP) -> None:
        super().__init__()
        self.model = model

    def forward(self, pixels: Tensor) -> tuple[Tensor, ...]:
        out = self.model.encode_image(pixels)
        return (out.tokens,) if out.feat is None else (out.tokens, out.feat)


class TextEncoder(nn.Module):
    def __init__(self, model: BLIP) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> tuple[Tensor, Tensor]:
        out = self.model.encode_text(input_ids, attention_mask)
        return out.feat, out.tokens[:, 0]  # (B, E), (B, Dt)


class ITMScorer(nn.Module):
    def __init__(self, model: BLIP) -> None:
        super().__init__()
        self.model = model

    def forward(self, image_embeds: Tensor, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        return self.model.itm_logits(image_embeds, input_ids, attention_mask)  # (B, 2)


class DecoderFirst(nn.Module):
    """Prompt step: logits, then self K/V per layer, then cross K/V per cross layer."""

    def __init__(self, model: BLIP) -> None:
        super().__init__()
        self.model = model
        self.num_layers = model.config.text.num_layers

    def forward(
        self, image_embeds: Tensor, input_ids: Tensor, attention_mask: Tensor
    ) -> tuple[Tensor, ...]:
        cache = KVCache.empty(self.num_layers)
        states = self.model.decode(image_embeds, input_ids, attention_mask, cache=cache).tokens
        out = [self.model.text_decoder.cls(states)]  # (B, T, V)
        for kv in cache.self_kv + [kv for kv in cache.cross_kv if kv is not None]:
            out += [kv[0], kv[1]]  # (B, H, T or N, d)
        return tuple(out)


class DecoderNext(nn.Module):
    """Later steps: past self K/V (P tokens) + cross K/V in, logits + self K/V (P+T) out."""

    def __init__(self, model: BLIP) -> None:
        super().__init__()
        self.model = model
        self.num_layers = model.config.text.num_layers
        self.cross_layers = cross_layers(model)

    def forward(self, input_ids: Tensor, attention_mask: Tensor, *past: Tensor) -> tuple:
        n = self.num_layers
        cache = KVCache.empty(n)
        cache.self_kv = [(past[2 * i], past[2 * i + 1]) for i in range(n)]
        for j, layer in enumerate(self.cross_layers):
            cache.cross_kv[layer] = (past[2 * n + 2 * j], past[2 * n + 2 * j + 1])
        states = self.model.decode(None, input_ids, attention_mask, cache=cache).tokens
        out = [self.model.text_decoder.cls(states)]
        for k, v in cache.self_kv:
            out += [k, v]
        return tuple(out)


class QuestionEncoder(nn.Module):
    """VQA: the image-grounded question encoder's last states (ids with [ENC] first)."""

    def __init__(self, model: BLIP) -> None:
        super().__init__()
        self.model = model

    def forward(self, image_embeds: Tensor, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        return self.model.multimodal(image_embeds, input_ids, attention_mask).tokens  # (B, T, D)


class AnswerDecoder(nn.Module):
    """VQA: next-token logits of answer rows ([DEC] first) reading question states, their
    padding masked. Whole sequences, no cache: answers are short (BLIP: <= 10 tokens)."""

    def __init__(self, model: BLIP) -> None:
        super().__init__()
        self.model = model

    def forward(
        self, question_states: Tensor, question_mask: Tensor, input_ids: Tensor,
        attention_mask: Tensor,
    ) -> Tensor:  # fmt: skip
        states = self.model.decode(
            question_states, input_ids, attention_mask, source_mask=question_mask
        ).tokens
        return self.model.text_decoder.cls(states)  # (B, T, V)


def cross_layers(model: BLIP) -> list[int]:
    t = model.config.text
    return [i for i in range(t.num_layers) if t.has_cross_attention(i)]


# ----------------------------------------------------------------------------- graph specs
@dataclass
class GraphSpec:
    name: str
    module: nn.Module
    inputs: dict[str, Shape]  # name -> symbolic shape (str = dynamic axis)
    outputs: dict[str, Shape]
    make_inputs: Callable[[dict[str, int], torch.Generator], tuple[Tensor, ...]]


def _kv_shapes(
    prefix: str, layers: Sequence[int], kind: str, length: int | str, heads: int, head_dim: int
) -> dict[str, Shape]:
    """e.g. past_self_0_key: (batch, H, past_seq, d), in layer order, key before value."""
    return {
        f"{prefix}_{kind}_{i}_{kv}": ["batch", heads, length, head_dim]
        for i in layers
        for kv in ("key", "value")
    }


def _text_inputs(
    model: BLIP, b: int, t: int, first_id: int, gen: torch.Generator
) -> tuple[Tensor, Tensor]:
    """Random ids (B, T) starting with `first_id`; row 0 full, other rows padded at the end."""
    vocab = model.config.text.vocab_size
    ids = torch.randint(1, vocab, (b, t), generator=gen)
    ids[:, 0] = first_id
    lengths = torch.randint(1, t + 1, (b,), generator=gen)
    lengths[0] = t
    mask = (torch.arange(t)[None] < lengths[:, None]).long()  # (B, T)
    return ids.masked_fill(mask == 0, 0), mask


def _image_embeds(model: BLIP, b: int, gen: torch.Generator) -> Tensor:
    v = model.config.vision
    return torch.randn(b, v.num_tokens, v.width, generator=gen)  # (B, N, Dv)


def graph_specs(model: BLIP) -> list[GraphSpec]:
    """Every graph this model supports, with names, symbolic shapes and input makers."""
    cfg = model.config
    v, t = cfg.vision, cfg.text
    s, n, dv, dt, e = v.image_size, v.num_tokens, v.width, t.hidden_size, cfg.embed_dim
    ids: Shape = ["batch", "seq"]
    specs = []
    image_out: dict[str, Shape] = {"image_embeds": ["batch", n, dv]}
    if cfg.has_itc:
        image_out["image_feat"] = ["batch", e]
    specs.append(
        GraphSpec(
            "image_encoder",
            ImageEncoder(model),
            {"pixels": ["batch", 3, s, s]},
            image_out,
            lambda d, g: (torch.randn(d["batch"], 3, s, s, generator=g),),
        )
    )
    if cfg.has_itc:
        specs.append(
            GraphSpec(
                "text_encoder",
                TextEncoder(model),
                {"input_ids": ids, "attention_mask": ids},
                {"text_feat": ["batch", e], "text_cls": ["batch", dt]},
                lambda d, g: _text_inputs(model, d["batch"], d["seq"], Tokenizer.cls_token_id, g),
            )
        )
        specs.append(
            GraphSpec(
                "itm",
                ITMScorer(model),
                {"image_embeds": ["batch", n, dv], "input_ids": ids, "attention_mask": ids},
                {"itm_logits": ["batch", 2]},
                lambda d, g: (
                    _image_embeds(model, d["batch"], g),
                    *_text_inputs(model, d["batch"], d["seq"], Tokenizer.enc_token_id, g),
                ),
            )
        )
    if cfg.vqa:
        specs += _vqa_specs(model)
    elif cfg.has_decoder:
        specs += _decoder_specs(model)
    return specs


def _vqa_specs(model: BLIP) -> list[GraphSpec]:
    """question_encoder and answer_decoder; the question length is the `past` size."""
    cfg = model.config
    n, dv, dt, vocab = (
        cfg.vision.num_tokens,
        cfg.vision.width,
        cfg.text.hidden_size,
        cfg.text.vocab_size,
    )
    question: dict[str, Shape] = {"input_ids": ["batch", "seq"], "attention_mask": ["batch", "seq"]}

    def question_inputs(sizes: dict[str, int], gen: torch.Generator) -> tuple[Tensor, ...]:
        ids = _text_inputs(model, sizes["batch"], sizes["seq"], Tokenizer.enc_token_id, gen)
        return (_image_embeds(model, sizes["batch"], gen), *ids)

    def answer_inputs(sizes: dict[str, int], gen: torch.Generator) -> tuple[Tensor, ...]:
        b, tq = sizes["batch"], sizes["past"]
        states = torch.randn(b, tq, dt, generator=gen)  # (B, Tq, D)
        q_mask = _text_inputs(model, b, tq, Tokenizer.enc_token_id, gen)[1]
        return (states, q_mask, *_text_inputs(model, b, sizes["seq"], Tokenizer.dec_token_id, gen))

    answer_in: dict[str, Shape] = {
        "question_states": ["batch", "question_seq", dt],
        "question_mask": ["batch", "question_seq"],
        **question,
    }
    return [
        GraphSpec("question_encoder", QuestionEncoder(model),
                  {"image_embeds": ["batch", n, dv], **question},
                  {"question_states": ["batch", "seq", dt]}, question_inputs),
        GraphSpec("answer_decoder", AnswerDecoder(model), answer_in,
                  {"logits": ["batch", "seq", vocab]}, answer_inputs),
    ]  # fmt: skip


def _decoder_specs(model: BLIP) -> list[GraphSpec]:
    cfg = model.config
    t = cfg.text
    n, dv, h, d = cfg.vision.num_tokens, cfg.vision.width, t.num_heads, t.hidden_size // t.num_heads
    layers, cross = range(t.num_layers), cross_layers(model)
    logits: Shape = ["batch", "seq", t.vocab_size]
    ids: dict[str, Shape] = {"input_ids": ["batch", "seq"], "attention_mask": ["batch", "seq"]}
    first_in = {"image_embeds": ["batch", n, dv], **ids}
    first_out = {"logits": logits, **_kv_shapes("present", layers, "self", "seq", h, d)}
    first_out |= _kv_shapes("present", cross, "cross", n, h, d)
    next_in = {"input_ids": ["batch", "seq"], "attention_mask": ["batch", "past_seq+seq"]}
    next_in |= _kv_shapes("past", layers, "self", "past_seq", h, d)
    next_in |= _kv_shapes("past", cross, "cross", n, h, d)
    next_out = {"logits": logits, **_kv_shapes("present", layers, "self", "past_seq+seq", h, d)}
    first = DecoderFirst(model)

    def first_inputs(sizes: dict[str, int], gen: torch.Generator) -> tuple[Tensor, ...]:
        image = _image_embeds(model, sizes["batch"], gen)
        text = _text_inputs(model, sizes["batch"], sizes["seq"], Tokenizer.dec_token_id, gen)
        return (image, *text)

    def next_inputs(sizes: dict[str, int], gen: torch.Generator) -> tuple[Tensor, ...]:
        b = sizes["batch"]
        image = _image_embeds(model, b, gen)
        prompt = _text_inputs(model, b, sizes["past"], Tokenizer.dec_token_id, gen)[0]
        with torch.no_grad():
            outs = first(image, prompt, torch.ones_like(prompt))
        new_ids = torch.randint(1, t.vocab_size, (b, sizes["new"]), generator=gen)
        mask = torch.ones(b, sizes["past"] + sizes["new"], dtype=torch.long)
        return (new_ids, mask, *outs[1:])

    return [
        GraphSpec("decoder_first", first, first_in, first_out, first_inputs),
        GraphSpec("decoder_next", DecoderNext(model), next_in, next_out, next_inputs),
    ]
