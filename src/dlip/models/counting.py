"""Model size and compute: parameters per module and forward FLOPs per task.

What is counted (stated once, used everywhere):
- Parameters are unique tensors: a weight tied between encoder and decoder, or between the word
  embeddings and the LM head, counts once. Momentum copies and queues are never part of a
  dlip model, so they are never counted.
- `vision`: the ViT. `text`: text-encoder parameters that unimodal text runs (embeddings,
  self-attention, feed-forward of the text-only layers). `fusion`: text-encoder parameters only
  the image-grounded path runs (cross-attention; with `fusion_layers=k`, the whole last k
  layers). `decoder_only`: decoder parameters not shared with the encoder (its self-attention
  and the LM head; all of it when untied). `heads`: vision_proj, text_proj, itm_head, temp.
- Task forms: `retrieval` = vision + text + fusion + heads (BLIP_Retrieval / HF
  BlipForImageTextRetrieval); `captioning` = vision + every decoder parameter, shared or not
  (BLIP_Decoder / HF BlipForConditionalGeneration); `total` = the whole model, each tensor once.
- FLOPs come from torch.utils.flop_counter (a multiply-add counts 2), batch 1:
  `image_embed` = encode_image; `text_embed` = encode_text of `text_len` tokens; `itm_pair` =
  image-grounded encoder + ITM head for one pair given the image tokens; `caption_token` = one
  decoder step with the KV cache holding `text_len - 1` tokens and the image keys/values;
  `caption_3beam` = one whole caption as `BLIP.generate` runs it with BLIP's settings (3 beams,
  max_length 20, min_length 5), counted at a fixed length of 20 tokens (prompt included) so the
  number is deterministic: see `caption_flops`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import Tensor, nn

from dlip.models.blip import BLIP
from dlip.models.config import ModelConfig
from dlip.models.text import KVCache


@dataclass
class ParamCounts:
    vision: int
    text: int
    fusion: int
    decoder_only: int
    heads: int
    retrieval: int
    captioning: int
    total: int


def param_counts(model: BLIP) -> ParamCounts:
    cfg = model.config
    seen: set[int] = set()

    def count(modules: list[nn.Module | nn.Parameter]) -> int:
        n = 0
        for m in modules:
            params = [m] if isinstance(m, nn.Parameter) else list(m.parameters())
            for p in params:
                if id(p) not in seen:
                    seen.add(id(p))
                    n += p.numel()
        return n

    vision = count([model.visual_encoder])
    text = fusion = heads = 0
    if cfg.has_encoder:
        enc = model.text_encoder
        split = cfg.text.text_only_layers
        text_mods: list[nn.Module] = [enc.embeddings]
        fusion_mods: list[nn.Module] = []
        for i, layer in enumerate(enc.encoder.layer):
            if i < split:
                text_mods += [layer.attention, layer.intermediate, layer.output]
                if layer.crossattention is not None:
                    fusion_mods.append(layer.crossattention)
            else:
                fusion_mods.append(layer)
        text = count(text_mods)
        fusion = count(fusion_mods)
        if cfg.has_itc:
            heads = count([model.vision_proj, model.text_proj, model.itm_head, model.temp])
    decoder_only = count([model.text_decoder]) if cfg.has_decoder else 0
    captioning = 0
    if cfg.has_decoder:
        captioning = vision + sum(p.numel() for p in model.text_decoder.parameters())
    total = sum(p.numel() for p in model.parameters())
    return ParamCounts(
        vision=vision,
        text=text,
        fusion=fusion,
        decoder_only=decoder_only,
        heads=heads,
        retrieval=vision + text + fusion + heads if cfg.has_itc else 0,
        captioning=captioning,
        total=total,
    )


def _flops(fn) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def meta_model(config: ModelConfig) -> BLIP:
    """The model on the meta device: shapes only, no memory, no compute."""
    with torch.device("meta"):
        return BLIP(config).eval()


def _prompt_len(config: ModelConfig) -> int:
    """Tokens of [DEC] + the model's caption prompt, as `generate` feeds them."""
    from dlip.models.generation import prompt_ids
    from dlip.tokenizer import get_tokenizer

    return prompt_ids(get_tokenizer(), config.prompt, 1, torch.device("cpu")).shape[1]


@torch.no_grad()
def caption_flops(
    model: BLIP, image_tokens: Tensor, num_beams: int = 3, caption_len: int = 20
) -> int:
    """FLOPs of one beam-search caption of `caption_len` tokens (prompt included), excluding
    the image encoder (the caller adds `image_embed`).

    Beam search is data-dependent (top-k, stopping), which the meta device cannot run, so the
    count is composed from the decoder calls `dlip.models.generation.beam_search` makes when no
    beam stops early: the prompt step once over the one image (the beams start from the same
    prompt; the image's cross-attention keys/values projected once and shared by the beams),
    then
    one KV-cached step per further token at batch `num_beams`, the self-attention cache holding
    prompt_len, ..., caption_len - 2 tokens; the LM head runs on the last position of each call.
    A cached step's FLOPs are affine in the cache length (only the self-attention scores and
    weighted sum grow with it), so two steps are counted and the rest follow exactly; the
    meta-device counter is slow per call. Search bookkeeping (log-softmax, top-k, cache
    reordering) has no matmuls and counts 0. With BLIP's max_length 20 this is the longest
    caption's cost; one that ends early costs less. tests/test_bench_flops.py checks the
    composition against counting a real `generate` on CPU.
    """
    cfg = model.config
    prompt_len = _prompt_len(cfg)
    if caption_len <= prompt_len + 1:
        raise ValueError(
            f"caption_len {caption_len} leaves under two tokens after a {prompt_len}-token prompt"
        )
    dev = image_tokens.device
    image = image_tokens[:1].detach()  # (1, N, Dv): shared by the K beams
    ids = torch.full((num_beams, prompt_len), 1037, dtype=torch.long, device=dev)  # (K, L0)
    cache = KVCache.empty(cfg.text.num_layers)

    def call(new_ids: Tensor, image: Tensor | None, step_cache: KVCache) -> None:
        past = step_cache.length
        mask = torch.ones(new_ids.shape[0], past + new_ids.shape[1], dtype=torch.long, device=dev)
        states = model.decode(image, new_ids, mask, cache=step_cache).tokens[:, -1:]  # (K, 1, Dt)
        model.text_decoder.cls(states)

    def step() -> None:  # one new token per beam, on a copy of the cache (left as it was)
        call(ids[:, :1], None, KVCache(list(cache.self_kv), list(cache.cross_kv)))

    total = _flops(lambda: call(ids[:1], image, cache))  # prompt step, once; fills the cache
    cache.self_kv = [(k.repeat(num_beams, 1, 1, 1), v.repeat(num_beams, 1, 1, 1))
                     for k, v in cache.self_kv]  # fmt: skip
    first = _flops(step)  # cache holds prompt_len tokens
    call(ids[:, :1], None, cache)  # grow the cache by one token (not counted)
    slope = _flops(step) - first
    steps = range(caption_len - 1 - prompt_len)  # cache lengths prompt_len + s
    return total + sum(first + slope * s for s in steps)


def _answer_token_flops(model: BLIP, states: Tensor, question_mask: Tensor) -> int:
    """One KV-cached answer-decoder step after [DEC] (the question's cross K/V cached)."""
    dev = states.device
    start = torch.full((1, 1), 1037, dtype=torch.long, device=dev)
    cache = KVCache.empty(model.config.text.num_layers)
    model.decode(states, start, torch.ones_like(start), cache=cache, source_mask=question_mask)
    mask = torch.ones(1, 2, dtype=torch.long, device=dev)

    def step() -> None:
        step_cache = KVCache(list(cache.self_kv), list(cache.cross_kv))
        out = model.decode(None, start, mask, cache=step_cache, source_mask=question_mask)
        model.text_decoder.cls(out.tokens)

    return _flops(step)


@torch.no_grad()
def flop_counts(config: ModelConfig, text_len: int = 30) -> dict[str, int]:
    """Forward FLOPs at batch 1 (see module docstring).

    Counted on the meta device: besides being free, it routes SDPA through its math path, whose
    matmuls the counter sees; CPU's fused attention kernel is not counted by flop_counter.
    """
    model = meta_model(config)
    cfg = config
    size = cfg.vision.image_size
    dev = torch.device("meta")
    pixels = torch.zeros(1, 3, size, size, device=dev)
    ids = torch.full((1, text_len), 1037, dtype=torch.long, device=dev)
    mask = torch.ones(1, text_len, dtype=torch.long, device=dev)
    image_tokens = model.encode_image(pixels).tokens
    out = {"image_embed": _flops(lambda: model.encode_image(pixels))}
    if cfg.has_itc:
        out["text_embed"] = _flops(lambda: model.encode_text(ids, mask))
        out["itm_pair"] = _flops(lambda: model.itm_logits(image_tokens, ids, mask))
    if cfg.vqa:  # BLIP_VQA: the question encoder, then answer tokens reading its states
        out["question_encode"] = _flops(lambda: model.multimodal(image_tokens, ids, mask))
        states = model.multimodal(image_tokens, ids, mask).tokens  # (1, T, Dt)
        out["answer_token"] = _answer_token_flops(model, states, mask)
    elif cfg.has_decoder:
        cache = KVCache.empty(cfg.text.num_layers)
        model.decode(image_tokens, ids[:, :-1], mask[:, :-1], cache=cache)

        def step() -> None:
            step_cache = KVCache(list(cache.self_kv), list(cache.cross_kv))
            states = model.decode(None, ids[:, -1:], mask, cache=step_cache).tokens
            model.text_decoder.cls(states)

        out["caption_token"] = _flops(step)
        out["caption_3beam"] = out["image_embed"] + caption_flops(model, image_tokens)
    return out


def model_info(config: ModelConfig, text_len: int = 30) -> dict:
    return {
        "name": config.name,
        "image_size": config.vision.image_size,
        "text_len": text_len,
        "params": asdict(param_counts(meta_model(config))),
        "flops": flop_counts(config, text_len),
    }
