"""Model configuration: frozen dataclasses, loaded from and saved to JSON.

Architectures are data: each preset in configs/models/*.json is one `ModelConfig`. Unknown keys
are errors, so a typo in a config never silently falls back to a default.
"""

from __future__ import annotations

import dataclasses
import json
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from dlip.config import ConfigError, check_keys, type_ok

# CLIP statistics: BLIP normalises with these although its ViT starts from DeiT.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class VisionConfig:
    """A ViT with a class token, pre-norm blocks and a final norm (timm / BLIP layout)."""

    width: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    patch_size: int = 16
    image_size: int = 224
    layer_norm_eps: float = 1e-6  # BLIP's ViT; HF's BlipVisionConfig default (1e-5) is wrong for it

    def __post_init__(self) -> None:
        _check_fields(self, "vision")

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_tokens(self) -> int:
        return self.grid**2 + 1


@dataclass(frozen=True)
class TextConfig:
    """BERT post-LN layers as BLIP's MED, with cross-attention in the fusion layers."""

    vocab_size: int = 30524  # bert-base-uncased 30522 + [DEC] + [ENC]
    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    intermediate_size: int = 3072
    max_position_embeddings: int = 512
    layer_norm_eps: float = 1e-12
    dropout: float = 0.1  # hidden and attention-probability dropout, as BERT
    # "all": every layer cross-attends and unimodal text skips it (BLIP). int k: the first
    # num_layers-k layers are text-only, unimodal features are read after them (ALBEF / DLIP).
    fusion_layers: Literal["all"] | int = "all"
    # BLIP's rule: the decoder shares every weight with the encoder except self-attention.
    tie_decoder: bool = True

    def __post_init__(self) -> None:
        _check_fields(self, "text")

    @property
    def text_only_layers(self) -> int:
        """Layers run for unimodal text features."""
        return (
            self.num_layers if self.fusion_layers == "all" else self.num_layers - self.fusion_layers
        )

    def has_cross_attention(self, layer: int) -> bool:
        return self.fusion_layers == "all" or layer >= self.num_layers - self.fusion_layers


@dataclass(frozen=True)
class ModelConfig:
    """A BLIP-shaped model: vision tower, text tower, projections and heads, and preprocessing."""

    name: str = "custom"
    vision: VisionConfig = field(default_factory=VisionConfig)
    text: TextConfig = field(default_factory=TextConfig)
    embed_dim: int = 256  # ITC projection width
    # The retrieval form has the text encoder, projections and ITM head; the captioning form
    # has the decoder and LM head; the pretraining form has both.
    has_encoder: bool = True
    has_decoder: bool = True
    # The VQA form (BLIP_VQA): the text encoder is the question encoder (no ITC projections,
    # ITM head or temperature) and the decoder, untied, answers from the question encoder's
    # states, so its cross-attention reads text.hidden_size-wide states, not image tokens.
    vqa: bool = False
    # False when `temp` is not a trained value: transformers' BLIP checkpoints store no ITC
    # temperature, so a model converted from one holds BLIP's initial 0.07. KD from such a
    # teacher needs loss.kd.itc_temperature (dlip.train.task.build_adapters checks).
    temp_known: bool = True
    # Preprocessing the model was trained with (the model carries it, transforms are built from it).
    image_mean: tuple[float, float, float] = CLIP_MEAN
    image_std: tuple[float, float, float] = CLIP_STD
    max_text_length: int = 35
    prompt: str = "a picture of "

    def __post_init__(self) -> None:
        _check_fields(self, "model")
        _validate(self)

    def replace(self, **changes: Any) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    def vqa_form(self) -> ModelConfig:
        """This architecture as BLIP_VQA holds it: both text towers, the decoder untied."""
        text = dataclasses.replace(self.text, tie_decoder=False)
        return self.replace(vqa=True, has_encoder=True, has_decoder=True, text=text)

    @property
    def has_itc(self) -> bool:
        """ITC projections, ITM head and temperature: the encoder of a non-VQA model."""
        return self.has_encoder and not self.vqa

    def with_image_size(self, image_size: int) -> ModelConfig:
        return self.replace(vision=dataclasses.replace(self.vision, image_size=image_size))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "config") -> ModelConfig:
        check_keys(cls, data, source)
        data = dict(data)
        try:
            if "vision" in data:
                check_keys(VisionConfig, data["vision"], "vision")
                data["vision"] = VisionConfig(**data["vision"])
            if "text" in data:
                check_keys(TextConfig, data["text"], "text")
                data["text"] = TextConfig(**data["text"])
            for key in ("image_mean", "image_std"):
                if isinstance(data.get(key), list):
                    data[key] = tuple(data[key])
            return cls(**data)
        except ConfigError as err:
            raise ConfigError(f"{source}: {err}") from None

    @classmethod
    def load(cls, path: str | Path) -> ModelConfig:
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"model config not found: {path}") from None
        except json.JSONDecodeError as err:
            raise ConfigError(f"{path}: not valid JSON ({err})") from None
        return cls.from_dict(data, source=str(path))

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")


def _check_fields(obj: Any, section: str) -> None:
    """Every field has its declared type (JSON "768" or "false" is not an int or a bool)."""
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if not type_ok(hints[f.name], value):
            raise ConfigError(f"{section}.{f.name}={value!r} is not of type {hints[f.name]}")


_POSITIVE = {
    "vision": (
        "width",
        "depth",
        "num_heads",
        "mlp_ratio",
        "patch_size",
        "image_size",
        "layer_norm_eps",
    ),
    "text": (
        "vocab_size",
        "hidden_size",
        "num_layers",
        "num_heads",
        "intermediate_size",
        "max_position_embeddings",
        "layer_norm_eps",
    ),
}


def _validate(cfg: ModelConfig) -> None:
    v, t = cfg.vision, cfg.text
    for section, obj in (("vision", v), ("text", t)):
        for name in _POSITIVE[section]:
            if getattr(obj, name) <= 0:
                raise ConfigError(f"{section}.{name} must be > 0, got {getattr(obj, name)}")
    if cfg.embed_dim <= 0 or cfg.max_text_length <= 0:
        raise ConfigError("embed_dim and max_text_length must be > 0")
    if not 0.0 <= t.dropout < 1.0:
        raise ConfigError(f"text.dropout must be in [0, 1), got {t.dropout}")
    if v.width % v.num_heads:
        raise ConfigError(f"vision.width {v.width} is not divisible by num_heads {v.num_heads}")
    if v.image_size % v.patch_size:
        raise ConfigError(f"vision.image_size {v.image_size} is not a multiple of {v.patch_size}")
    if t.hidden_size % t.num_heads:
        raise ConfigError(f"text.hidden_size {t.hidden_size} is not divisible by {t.num_heads}")
    fl = t.fusion_layers
    if fl != "all" and (
        not isinstance(fl, int) or isinstance(fl, bool) or not 1 <= fl <= t.num_layers
    ):
        raise ConfigError(
            f"text.fusion_layers must be 'all' or an int in [1, {t.num_layers}], got {fl!r}"
        )
    if not (cfg.has_encoder or cfg.has_decoder):
        raise ConfigError("a model needs has_encoder or has_decoder")
    if cfg.vqa and not (cfg.has_encoder and cfg.has_decoder):
        raise ConfigError("vqa=true needs the question encoder and the answer decoder "
                          "(has_encoder and has_decoder true)")  # fmt: skip
    if cfg.vqa and t.tie_decoder:
        raise ConfigError("vqa=true needs text.tie_decoder=false: BLIP_VQA's answer decoder "
                          "has its own weights (ModelConfig.vqa_form() sets both)")  # fmt: skip
    if cfg.max_text_length > t.max_position_embeddings:
        raise ConfigError(
            f"max_text_length {cfg.max_text_length} exceeds "
            f"text.max_position_embeddings {t.max_position_embeddings}"
        )
