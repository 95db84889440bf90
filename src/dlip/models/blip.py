"""The BLIP model: one class for teacher and student; size and topology come from ModelConfig.

Parameter names follow BLIP's (`visual_encoder.*`, `text_encoder.*`, `text_decoder.*`,
`vision_proj`, `text_proj`, `itm_head`, `temp`). Models return features and logits; losses live
in `dlip.losses`, tokenization happens outside `forward`.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dlip.models.config import ModelConfig
from dlip.models.outputs import ImageOutput, Taps, TextOutput
from dlip.models.text import KVCache, TextDecoder, TextModel
from dlip.models.vision import VisionTower, resize_pos_embed

if TYPE_CHECKING:
    from dlip.tokenizer import Tokenizer

TapsArg = Taps | Iterable[int] | None


class BLIP(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        v, t = config.vision, config.text
        self.visual_encoder = VisionTower(v)
        if config.has_encoder:
            self.text_encoder = TextModel(t, encoder_width=v.width)
        if config.has_itc:
            self.vision_proj = nn.Linear(v.width, config.embed_dim)
            self.text_proj = nn.Linear(t.hidden_size, config.embed_dim)
            self.itm_head = nn.Linear(t.hidden_size, 2)
            # ITC temperature, learnable and clamped to [0.001, 0.5] by the loss (BLIP's init).
            self.temp = nn.Parameter(torch.tensor(0.07))
        if config.has_decoder:
            shared = self.text_encoder if config.has_encoder and t.tie_decoder else None
            # BLIP_VQA's answer decoder cross-attends the question encoder's states
            source_width = t.hidden_size if config.vqa else v.width
            self.text_decoder = TextDecoder(t, encoder_width=source_width, shared=shared)
        self._init_text_weights()

    # ----------------------------------------------------------------------------- towers
    def encode_image(self, pixels: Tensor, taps: TapsArg = None) -> ImageOutput:
        """(B, 3, S, S) normalised pixels -> vision tokens and the normalised ITC feature."""
        tokens, hidden, attn = self.visual_encoder.forward_tokens(pixels, Taps.of(taps))
        feat = None
        if self.config.has_itc:
            feat = F.normalize(self.vision_proj(tokens[:, 0]), dim=-1)  # (B, E)
        return ImageOutput(tokens=tokens, feat=feat, hidden=hidden, attn=attn)

    def encode_text(
        self, input_ids: Tensor, attention_mask: Tensor, taps: TapsArg = None
    ) -> TextOutput:
        """Unimodal text ([CLS] first): the text-only layers, no image."""
        enc = self._require("text_encoder", "encode_text")
        self._require("text_proj", "encode_text")
        layers = range(self.config.text.text_only_layers)
        out = enc(input_ids, attention_mask, layers=layers, taps=Taps.of(taps).resolve(layers))
        out.feat = F.normalize(self.text_proj(out.tokens[:, 0]), dim=-1)  # (B, E)
        return out

    def multimodal(
        self,
        image_tokens: Tensor,  # (B, N, Dv)
        input_ids: Tensor,  # (B, T), [ENC] at position 0 by the caller's choice
        attention_mask: Tensor,
        image_mask: Tensor | None = None,
        taps: TapsArg = None,
        text_tokens: Tensor | None = None,
        image_index: Tensor | None = None,  # (B,) rows of image_tokens, one per text row
    ) -> TextOutput:
        """Image-grounded text encoder. With `fusion_layers=k` and `text_tokens` (the unimodal
        output for the same ids), only the k fusion layers run (ALBEF-style reuse). With
        `image_index`, image_tokens holds each distinct image once (U, N, Dv) and text row b
        reads image index[b]: its cross-attention keys / values are projected once per image,
        not once per pair (`image_kv`)."""
        enc = self._require("text_encoder", "multimodal")
        start = 0
        if text_tokens is not None and self.config.text.fusion_layers != "all":
            start = self.config.text.text_only_layers
        layers = range(start, self.config.text.num_layers)
        cache = None if image_index is None else self.image_kv(image_tokens, image_index)
        return enc(
            None if start else input_ids,
            attention_mask,
            image=image_tokens if cache is None else None,
            image_mask=image_mask,
            layers=layers,
            hidden_in=text_tokens if start else None,
            cache=cache,
            taps=Taps.of(taps).resolve(layers),
        )

    def image_kv(self, image_tokens: Tensor, index: Tensor) -> KVCache:
        """The image-grounded encoder's cross-attention keys / values of U images (U, N, Dv),
        projected once each and laid out for B text rows (row b: image index[b]). When the
        index is each image repeated g times in a row (an image's candidate texts), the U rows
        stay and attention folds the g texts' queries onto them (text.Attention._grouped);
        otherwise the projected rows are gathered (a copy, not a projection)."""
        enc = self._require("text_encoder", "image_kv")
        u, b = image_tokens.shape[0], index.shape[0]
        runs = torch.arange(u, device=index.device).repeat_interleave(b // u)
        grouped = b % u == 0 and runs.shape[0] == b and torch.equal(index, runs)
        cache = KVCache.empty(self.config.text.num_layers)
        for i, layer in enumerate(enc.encoder.layer):
            if layer.crossattention is not None:
                k, v = layer.crossattention.project_kv(image_tokens)  # (U, H, N, d)
                cache.cross_kv[i] = (k, v) if grouped else (k[index], v[index])
        return cache

    def itm_logits(
        self,
        image_tokens: Tensor,  # (B, N, Dv), or (U, N, Dv) distinct images with image_index
        input_ids: Tensor,
        attention_mask: Tensor,
        image_index: Tensor | None = None,  # (B,) the image of each text row
    ) -> Tensor:
        """(B, 2) match logits from the multimodal state at position 0; ids used as given."""
        self._require("itm_head", "itm_logits")
        out = self.multimodal(image_tokens, input_ids, attention_mask, image_index=image_index)
        return self.itm_head(out.tokens[:, 0])

    def decode(
        self,
        image_tokens: Tensor | None,
        input_ids: Tensor,
        attention_mask: Tensor,
        taps: TapsArg = None,
        cache: KVCache | None = None,
        source_mask: Tensor | None = None,
    ) -> TextOutput:
        """Causal decoder states (B, T, Dt); `attention_mask` covers cached + new tokens.
        The cross-attention source is the image tokens, or in the VQA form the question
        states (B, Tq, Dt) with `source_mask` (B, Tq) hiding their padding."""
        dec = self._require("text_decoder", "decode")
        return dec.bert(
            input_ids,
            attention_mask,
            image=image_tokens,
            image_mask=source_mask,
            causal=True,
            cache=cache,
            taps=Taps.of(taps).resolve(range(self.config.text.num_layers)),
        )

    def lm_logits(self, image_tokens: Tensor, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """(B, T, V) next-token logits; position t predicts token t+1. Ids used as given."""
        self._not_vqa("lm_logits")
        states = self.decode(image_tokens, input_ids, attention_mask).tokens
        return self.text_decoder.cls(states)

    @torch.no_grad()
    def generate(
        self,
        pixels: Tensor,
        prompt: str | None = None,
        num_beams: int = 3,
        max_length: int = 20,
        min_length: int = 5,
        repetition_penalty: float = 1.0,
        tokenizer: Tokenizer | None = None,
        beam_scoring: str = "blip",
    ) -> list[str]:
        """Captions for (B, 3, S, S) pixels: beam search (greedy when num_beams=1).

        Lengths count the prompt tokens, as BLIP; the prompt is stripped from the returned text.
        `beam_scoring`: "blip" (transformers 4.15, as BLIP ran it) or "hf" (transformers 5.x);
        see `dlip.models.generation`.
        """
        from dlip.models.generation import generate_captions

        self._not_vqa("generate")
        return generate_captions(
            self,
            pixels,
            prompt=self.config.prompt if prompt is None else prompt,
            num_beams=num_beams,
            max_length=max_length,
            min_length=min_length,
            repetition_penalty=repetition_penalty,
            tokenizer=tokenizer,
            beam_scoring=beam_scoring,
        )

    @torch.no_grad()
    def answer(
        self,
        pixels: Tensor,
        questions: list[str],
        answer_list: list[str] | None = None,
        k_test: int = 128,
        num_beams: int = 3,
        max_length: int = 10,
        min_length: int = 1,
        beam_scoring: str = "blip",
        tokenizer: Tokenizer | None = None,
    ) -> list[str]:
        """VQA (the VQA form only): one answer per (B, 3, S, S) image and question, ranked
        from `answer_list` (top `k_test` by first-token probability, re-scored whole) or
        generated by beam search without one; see `dlip.models.vqa`."""
        from dlip.models.vqa import answer

        return answer(self, pixels, questions, answer_list, k_test, num_beams, max_length,
                      min_length, beam_scoring, tokenizer)  # fmt: skip

    def _not_vqa(self, method: str) -> None:
        if self.config.vqa:
            raise RuntimeError(
                f"{method}: model '{self.config.name}' is the VQA form, whose decoder reads "
                "question states, not image tokens; use answer()"
            )

    # ----------------------------------------------------------------------------- utilities
    def set_image_size(self, image_size: int) -> None:
        """Resize the vision tower (e.g. 224 -> 384): pos_embed resampled bicubically.

        Device, dtype, train/eval mode and requires_grad are kept; the vision parameters are
        new objects, so call this before building an optimizer.
        """
        if image_size == self.config.vision.image_size:
            return
        config = self.config.with_image_size(image_size)
        old = self.visual_encoder
        state = old.state_dict()
        state["pos_embed"] = resize_pos_embed(state["pos_embed"], config.vision.grid)
        # Build on meta and assign the tensors: keeps device and dtype, costs no init.
        with torch.device("meta"):
            tower = VisionTower(config.vision)
        tower.load_state_dict(state, strict=True, assign=True)
        for name, p in tower.named_parameters():
            p.requires_grad_(old.get_parameter(name).requires_grad)
        tower.train(old.training)
        tower.set_grad_checkpointing(old.grad_checkpointing)
        self.visual_encoder = tower
        self.config = config

    def compile_blocks(self, **options) -> int:
        """`torch.compile` every ViT block and text layer in place (regional compilation: short
        compile times, one graph per block shape; parameter names unchanged). Returns the
        number of modules compiled."""
        blocks: list[nn.Module] = list(self.visual_encoder.blocks)
        for name in ("text_encoder", "text_decoder"):
            tower = getattr(self, name, None)
            if tower is not None:
                stack = tower.bert if hasattr(tower, "bert") else tower
                blocks += list(stack.encoder.layer)
        for block in blocks:
            block.compile(**options)
        return len(blocks)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.visual_encoder.set_grad_checkpointing(enable)
        for name in ("text_encoder", "text_decoder"):
            if hasattr(self, name):
                tower = getattr(self, name)
                (tower.bert if name == "text_decoder" else tower).grad_checkpointing = enable

    def _require(self, attr: str, method: str) -> nn.Module:
        if not hasattr(self, attr) and self.config.vqa:
            raise RuntimeError(
                f"{method} needs {attr}, which model '{self.config.name}' (the VQA form, "
                "BLIP_VQA) does not have: it has no ITC projections or ITM head"
            )
        if not hasattr(self, attr):
            form = "has_decoder" if attr == "text_decoder" else "has_encoder"
            raise RuntimeError(
                f"{method} needs {attr}, but model '{self.config.name}' has {form}=False"
            )
        return getattr(self, attr)

    @torch.no_grad()
    def _init_text_weights(self) -> None:
        """BERT init for the text tower and heads: N(0, 0.02) linears/embeddings, LN = (1, 0)."""
        for name, module in self.named_modules():
            if name.startswith("visual_encoder"):
                continue  # timm initialised the ViT
            if isinstance(module, (nn.Linear, nn.Embedding)):
                module.weight.normal_(0.0, 0.02)
            if isinstance(module, nn.Embedding) and module.padding_idx is not None:
                module.weight[module.padding_idx].zero_()  # [PAD] starts as a zero vector
            if isinstance(module, nn.Linear) and module.bias is not None:
                module.bias.zero_()
            elif isinstance(module, nn.LayerNorm):
                module.weight.fill_(1.0)
                module.bias.zero_()

    def num_params(self, prefixes: Sequence[str] = ("",)) -> int:
        """Unique parameters whose name starts with one of `prefixes` (tied weights once)."""
        return sum(p.numel() for n, p in self.named_parameters() if n.startswith(tuple(prefixes)))
