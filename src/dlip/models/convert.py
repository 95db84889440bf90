"""Checkpoint conversion: Salesforce BLIP `.pth` and HF transformers BLIP <-> dlip. Strict.

Every source key is either mapped onto a model key, or listed in an explicit ignore set
(momentum copies, feature queues, position-id buffers), or it is an error that names it. Every
model key must be filled. Tensors stored twice in a source because BLIP ties them (decoder
layers shared with the encoder, LM head = word embeddings) must be equal, or it is an error.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor

from dlip.models.blip import BLIP
from dlip.models.config import ModelConfig, TextConfig, VisionConfig
from dlip.models.io import CheckpointError, alias_map, load_strict
from dlip.models.presets import get_config

# Keys a Salesforce checkpoint holds that a dlip model does not need (training-only state).
SALESFORCE_IGNORE = [
    r"^(visual_encoder|text_encoder|text_decoder)_m\..*",  # momentum encoders
    r"^(vision_proj|text_proj)_m\..*",
    r"^(image_queue|text_queue|idx_queue|queue_ptr|ptr_queue)$",  # ITC feature queues
    r"^text_(encoder|decoder\.bert)\.embeddings\.position_ids$",  # arange buffer
]

# HF name <- dlip name, for the vision tower (text and heads map 1:1). `{}` is a layer index.
HF_VISION_RULES = [
    ("visual_encoder.cls_token", "vision_model.embeddings.class_embedding"),
    ("visual_encoder.pos_embed", "vision_model.embeddings.position_embedding"),
    ("visual_encoder.patch_embed.proj.{w}", "vision_model.embeddings.patch_embedding.{w}"),
    ("visual_encoder.blocks.{n}.norm1.{w}", "vision_model.encoder.layers.{n}.layer_norm1.{w}"),
    ("visual_encoder.blocks.{n}.attn.qkv.{w}", "vision_model.encoder.layers.{n}.self_attn.qkv.{w}"),
    (
        "visual_encoder.blocks.{n}.attn.proj.{w}",
        "vision_model.encoder.layers.{n}.self_attn.projection.{w}",
    ),
    ("visual_encoder.blocks.{n}.norm2.{w}", "vision_model.encoder.layers.{n}.layer_norm2.{w}"),
    ("visual_encoder.blocks.{n}.mlp.{f}.{w}", "vision_model.encoder.layers.{n}.mlp.{f}.{w}"),
    ("visual_encoder.norm.{w}", "vision_model.post_layernorm.{w}"),
]
HF_IGNORE = [r"^text_(encoder|decoder\.bert)\.embeddings\.position_ids$"]


def _template_regex(template: str) -> re.Pattern:
    pattern = re.escape(template)
    for field in ("n", "w", "f"):
        pattern = pattern.replace(re.escape("{" + field + "}"), f"(?P<{field}>[^.]+)")
    return re.compile(f"^{pattern}$")


_FROM_HF = [(_template_regex(hf), ours) for ours, hf in HF_VISION_RULES]


def _rename(key: str, rules: list[tuple[re.Pattern, str]], prefixes: tuple[str, ...]) -> str | None:
    for pattern, target in rules:
        m = pattern.match(key)
        if m:
            return target.format(**m.groupdict())
    return key if key.startswith(prefixes) else None


_TEXT_PREFIXES = ("text_encoder.", "text_decoder.", "vision_proj.", "text_proj.", "itm_head.")


def hf_to_dlip_key(key: str) -> str | None:
    return "temp" if key == "temp" else _rename(key, _FROM_HF, _TEXT_PREFIXES)


# ------------------------------------------------------------------------------- strict loading
def load_mapped(
    model: BLIP,
    source: dict[str, Tensor],
    rename: Callable[[str], str | None],
    ignore: list[str],
    origin: str,
) -> list[str]:
    """Rename `source` keys onto `model` strictly; returns the ignored source keys."""
    ignore_re = [re.compile(p) for p in ignore]
    aliases = alias_map(model)  # every state_dict name -> canonical name
    canonical: dict[str, Tensor] = {}
    ignored, unknown = [], []
    for key, tensor in source.items():
        if any(p.match(key) for p in ignore_re):
            ignored.append(key)
            continue
        name = rename(key)
        if name == "text_decoder.cls.predictions.decoder.bias":
            name = "text_decoder.cls.predictions.bias"  # BERT stores the LM bias twice
        if name is None or name not in aliases:
            unknown.append(key)
            continue
        canon = aliases[name]
        if canon in canonical and not torch.equal(canonical[canon], tensor):
            raise CheckpointError(
                f"{origin}: {key!r} should be tied to {canon!r} (BLIP shares it) but differs; "
                "convert to an untied config (text.tie_decoder=false) instead"
            )
        canonical.setdefault(canon, tensor)
    if unknown:
        raise CheckpointError(f"{origin}: unknown keys ({len(unknown)}): {sorted(unknown)}")
    load_strict(model, canonical, origin)
    return ignored


# ------------------------------------------------------------------------------- Salesforce
def read_salesforce(path: str | Path) -> dict[str, Tensor]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    # weights_only: a downloaded .pth is untrusted; it must hold tensors and plain containers.
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    state = ckpt.get("model", ckpt) if isinstance(ckpt, dict) else None
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise CheckpointError(f"{path}: expected a state dict (optionally under 'model')")
    return state


def salesforce_config(state: dict[str, Tensor], arch: str, image_size: int | None) -> ModelConfig:
    """The preset `arch`, in the form the checkpoint holds, at the checkpoint's image size."""
    if "visual_encoder.pos_embed" not in state:
        raise CheckpointError("not a BLIP checkpoint: no 'visual_encoder.pos_embed'")
    config = get_config(arch)
    has_encoder = any(k.startswith("text_encoder.") for k in state)
    has_decoder = any(k.startswith("text_decoder.") for k in state)
    grid = round((state["visual_encoder.pos_embed"].shape[1] - 1) ** 0.5)
    config = config.replace(has_encoder=has_encoder, has_decoder=has_decoder)
    if has_encoder and has_decoder and "itm_head.weight" not in state:
        config = config.vqa_form()  # BLIP_VQA: both text towers, no ITC / ITM heads
    config = config.with_image_size(grid * config.vision.patch_size)
    return config.with_image_size(image_size) if image_size else config


def convert_salesforce(path: str | Path, arch: str, image_size: int | None = None) -> BLIP:
    state = read_salesforce(path)
    config = salesforce_config(state, arch, None)
    model = BLIP(config)
    load_mapped(model, state, lambda k: k, SALESFORCE_IGNORE, str(path))
    if image_size:
        model.set_image_size(image_size)
    return model.eval()


# ------------------------------------------------------------------------------- HF transformers
def hf_config_to_dlip(hf: dict, name: str) -> ModelConfig:
    """A transformers BlipConfig (config.json dict) -> ModelConfig."""
    arch = (hf.get("architectures") or [""])[0]
    forms = {
        "BlipForImageTextRetrieval": (True, False),
        "BlipForConditionalGeneration": (False, True),
        "BlipForQuestionAnswering": (True, True),
    }
    if arch not in forms:
        raise CheckpointError(
            f"unsupported HF architecture {arch!r}; expected one of {list(forms)}"
        )
    v, t = hf.get("vision_config", {}), hf.get("text_config", {})
    for side, cfg in (("vision_config", v), ("text_config", t)):
        act = cfg.get("hidden_act", "gelu")
        if act != "gelu":
            raise CheckpointError(f"{side}.hidden_act={act!r}: dlip implements exact GELU only")
    # Defaults are transformers' BlipVisionConfig / BlipTextConfig defaults.
    v_width = v.get("hidden_size", 768)
    vision = VisionConfig(
        width=v_width,
        depth=v.get("num_hidden_layers", 12),
        num_heads=v.get("num_attention_heads", 12),
        mlp_ratio=v.get("intermediate_size", 3072) / v_width,
        patch_size=v.get("patch_size", 16),
        image_size=v.get("image_size", 384),
        layer_norm_eps=v.get("layer_norm_eps", 1e-5),
    )
    if t.get("encoder_hidden_size", v_width) != v_width:
        raise CheckpointError(
            f"text_config.encoder_hidden_size {t.get('encoder_hidden_size')} "
            f"!= vision width {v_width}"
        )
    text = TextConfig(
        vocab_size=t.get("vocab_size", 30524),
        hidden_size=t.get("hidden_size", 768),
        num_layers=t.get("num_hidden_layers", 12),
        num_heads=t.get("num_attention_heads", 8),
        intermediate_size=t.get("intermediate_size", 3072),
        max_position_embeddings=t.get("max_position_embeddings", 512),
        layer_norm_eps=t.get("layer_norm_eps", 1e-12),
        dropout=t.get("hidden_dropout_prob", 0.0),
    )
    has_encoder, has_decoder = forms[arch]
    if arch == "BlipForQuestionAnswering" and text.hidden_size != v_width:
        raise CheckpointError(
            f"{arch}: text hidden_size {text.hidden_size} != vision width {v_width} (the answer "
            "decoder's cross-attention reads the question states at the vision width there)"
        )
    config = ModelConfig(
        # HF checkpoints carry no ITC temperature: the retrieval form's temp is BLIP's init
        temp_known=arch != "BlipForImageTextRetrieval",
        name=name,
        vision=vision,
        text=text,
        embed_dim=hf.get("image_text_hidden_size", 256),
        has_encoder=has_encoder,
        has_decoder=has_decoder,
        max_text_length=min(35, text.max_position_embeddings),
    )
    return config.vqa_form() if arch == "BlipForQuestionAnswering" else config


def read_hf_weights(directory: Path) -> dict[str, Tensor]:
    st = directory / "model.safetensors"
    if st.is_file():
        from dlip.fileio import load_safetensors

        return load_safetensors(st)
    bin_path = directory / "pytorch_model.bin"
    if bin_path.is_file():
        return torch.load(bin_path, map_location="cpu", weights_only=True)
    raise FileNotFoundError(f"{directory}: neither model.safetensors nor pytorch_model.bin found")


def convert_hf(
    directory: str | Path, name: str | None = None, vision_ln_eps: float | None = None
) -> BLIP:
    """A transformers BLIP directory -> BLIP. `vision_ln_eps` overrides the HF config's value
    (hub configs say 1e-5; BLIP's ViT was trained with 1e-6)."""
    directory = Path(directory)
    cfg_path = directory / "config.json"
    if not cfg_path.is_file():
        raise FileNotFoundError(
            f"{cfg_path} not found (expected a transformers save_pretrained dir)"
        )
    config = hf_config_to_dlip(json.loads(cfg_path.read_text()), name or directory.name)
    if vision_ln_eps is not None:
        vision = dataclasses.replace(config.vision, layer_norm_eps=vision_ln_eps)
        config = config.replace(vision=vision)
    state = read_hf_weights(directory)
    model = BLIP(config)
    if config.has_itc:
        # HF has no ITC temperature; BLIP's initial value stands in (only training uses it).
        state = {**state, "temp": model.temp.detach().clone()}
    if config.has_decoder and "text_decoder.cls.predictions.decoder.weight" not in state:
        # transformers omits tied weights when saving: the LM head is the word embeddings.
        key = "text_decoder.bert.embeddings.word_embeddings.weight"
        state = {**state, "text_decoder.cls.predictions.decoder.weight": state[key]}
    load_mapped(model, state, hf_to_dlip_key, HF_IGNORE, str(directory))
    return model.eval()


def dlip_config_to_hf(config: ModelConfig, architecture: str) -> dict:
    """ModelConfig -> transformers BlipConfig kwargs (BLIP topology only)."""
    v, t = config.vision, config.text
    if t.fusion_layers != "all":
        k, n = t.fusion_layers, t.num_layers
        raise CheckpointError(
            f"{config.name}: fusion_layers={k} (text-only layers 0-{n - k - 1}, text features "
            f"read after layer {n - k}, cross-attention in the last {k}) has no transformers "
            f"BLIP equivalent, which cross-attends in all {n} layers and reads text features "
            f"after the last: an export would lose the ITC text features and give {n - k} "
            "layers untrained cross-attention. Run it with dlip (Predictor, `dlip serve`) or "
            "export it with `dlip export onnx`, which keep this topology"
        )
    if config.vqa and t.hidden_size != v.width:
        raise CheckpointError(
            f"{config.name}: BlipForQuestionAnswering's answer decoder cross-attends at the vision "
            f"width; text width {t.hidden_size} != vision width {v.width} cannot be exported"
        )
    if (v.width * v.mlp_ratio) % 1:
        raise CheckpointError(
            f"{config.name}: vision MLP width {v.width * v.mlp_ratio} is not an int"
        )
    vision = dict(
        hidden_size=v.width,
        intermediate_size=int(v.width * v.mlp_ratio),
        num_hidden_layers=v.depth,
        num_attention_heads=v.num_heads,
        image_size=v.image_size,
        patch_size=v.patch_size,
        layer_norm_eps=v.layer_norm_eps,
        hidden_act="gelu",
    )
    text = dict(
        vocab_size=t.vocab_size,
        hidden_size=t.hidden_size,
        encoder_hidden_size=v.width,
        intermediate_size=t.intermediate_size,
        num_hidden_layers=t.num_layers,
        num_attention_heads=t.num_heads,
        max_position_embeddings=t.max_position_embeddings,
        layer_norm_eps=t.layer_norm_eps,
        hidden_dropout_prob=t.dropout,
        attention_probs_dropout_prob=t.dropout,
        hidden_act="gelu",
        bos_token_id=30522,
        pad_token_id=0,
        sep_token_id=102,
    )
    return dict(
        vision_config=vision,
        text_config=text,
        image_text_hidden_size=config.embed_dim,
        architectures=[architecture],
    )


HF_CLASSES = {
    "retrieval": "BlipForImageTextRetrieval",
    "captioning": "BlipForConditionalGeneration",
    "vqa": "BlipForQuestionAnswering",
}


def export_hf(
    model: BLIP,
    out: str | Path,
    form: str,
    source: str = "",
    results: list[dict] | None = None,
    license_id: str = "apache-2.0",
) -> Path:
    """Write `model` as a transformers BLIP directory (`form`: retrieval | captioning | vqa):
    weights + config, the processor, a generation config (generating forms) and a model card
    (README.md) that names `source` and shows `results` (records of `dlip eval`'s results.json)."""
    import transformers

    from dlip.models import hf_files

    if form not in model_forms(model.config):
        raise CheckpointError(
            f"model {model.config.name!r} has no {form} form (its forms: "
            f"{', '.join(model_forms(model.config))})"
        )
    cls_name = HF_CLASSES[form]
    hf_cfg = transformers.BlipConfig(**dlip_config_to_hf(model.config, cls_name))
    hf = getattr(transformers, cls_name)(hf_cfg)
    ours = model.state_dict(keep_vars=True)  # Parameters themselves: identity marks use
    mapped, missing = {}, []
    for key in hf.state_dict():
        name = hf_to_dlip_key(key)
        if name == "text_decoder.cls.predictions.decoder.bias":
            name = "text_decoder.cls.predictions.bias"
        if name is None or name not in ours:
            missing.append(key)
        else:
            mapped[key] = ours[name]
    if missing:
        raise CheckpointError(f"{cls_name} keys with no dlip source: {missing}")
    hf.load_state_dict(mapped, strict=True)
    # Every tensor of the form must have been exported (temp aside: HF has no ITC temperature).
    used = {id(t) for t in mapped.values()}
    unexported = [n for n, p in _form_params(model, form) if id(p) not in used]
    if unexported:
        raise CheckpointError(f"dlip tensors with no place in {cls_name}: {unexported}")
    out = Path(out)
    hf.save_pretrained(str(out))
    hf_files.write_processor(model.config, out)
    if form != "retrieval":
        hf_files.write_generation_config(form, out)
    params = sum(p.numel() for _, p in _form_params(model, form))
    temp = float(model.temp.detach()) if form == "retrieval" else None  # ITC: retrieval only
    card = hf_files.model_card(
        model.config, form, cls_name, params, temp, source, results or [], license_id
    )
    (out / "README.md").write_text(card)
    return out


def _form_params(model: BLIP, form: str) -> list[tuple[str, Tensor]]:
    names = ["visual_encoder"]
    names += ["text_encoder", "vision_proj", "text_proj", "itm_head"] if form == "retrieval" else []
    names += ["text_decoder"] if form == "captioning" else []
    names += ["text_encoder", "text_decoder"] if form == "vqa" else []
    return [(f"{n}.{k}", p) for n in names for k, p in getattr(model, n).named_parameters()]


def model_forms(config: ModelConfig) -> list[str]:
    if config.vqa:
        return ["vqa"]
    return [
        f
        for f, has in (("retrieval", config.has_encoder), ("captioning", config.has_decoder))
        if has
    ]
