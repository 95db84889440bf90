"""The saved model form: a directory with `config.json` + `model.safetensors`.

Tied parameters (the decoder's shared layers, the LM head's word embeddings) are stored once,
under their canonical name (the first in `named_parameters`); loading is strict.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor, nn

from dlip.models.config import ModelConfig

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"


class CheckpointError(RuntimeError):
    """A checkpoint does not match the model: names every missing / unexpected / misshapen key."""


def alias_map(model: nn.Module) -> dict[str, str]:
    """Every state_dict name -> the canonical name of the tensor it shares storage with."""
    canonical: dict[int, str] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        canonical.setdefault(id(p), name)
    out = {}
    params = dict(model.named_parameters(remove_duplicate=False))
    for name in model.state_dict():
        out[name] = canonical[id(params[name])] if name in params else name
    return out


def unique_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The state dict with each tied tensor once, contiguous (safetensors refuses shared views)."""
    state = model.state_dict()
    return {n: state[n].detach().contiguous() for n, c in alias_map(model).items() if n == c}


def key_problems(
    own: Mapping[str, Tensor], state: Mapping[str, Tensor], owner: str = "model"
) -> list[str]:
    """What keeps `state` from loading strictly into `own`: missing and unexpected keys and
    shape mismatches, one line each (empty when it fits)."""
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [
        f"{k}: checkpoint {tuple(state[k].shape)} vs {owner} {tuple(own[k].shape)}"
        for k in sorted(set(own) & set(state))
        if state[k].shape != own[k].shape
    ]
    problems = []
    if missing:
        problems.append(f"missing keys ({len(missing)}): {missing}")
    if unexpected:
        problems.append(f"unexpected keys ({len(unexpected)}): {unexpected}")
    if shapes:
        problems.append(f"shape mismatches ({len(shapes)}): {shapes}")
    return problems


def load_strict(model: nn.Module, state: dict[str, Tensor], source: str) -> None:
    """Load `state` (canonical names) into `model`; any mismatch is an error naming the keys."""
    aliases = alias_map(model)
    own = model.state_dict()
    problems = key_problems({c: own[c] for c in aliases.values()}, state)
    if problems:
        raise CheckpointError(f"{source} does not match the model:\n  " + "\n  ".join(problems))
    full = {name: state[canon] for name, canon in aliases.items()}
    model.load_state_dict(full, strict=True)


def save(model: nn.Module, directory: str | Path) -> Path:
    """Write `config.json` + `model.safetensors` into `directory` (created if needed)."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model.config.save(directory / CONFIG_FILE)
    tmp = directory / (WEIGHTS_FILE + ".tmp")
    save_file(unique_state_dict(model), str(tmp), metadata={"format": "pt", "dlip": "1"})
    tmp.replace(directory / WEIGHTS_FILE)  # atomic: a killed save never leaves a half file
    return directory


def load(directory: str | Path, map_location: str | torch.device = "cpu"):
    """Load a saved dlip model directory strictly; returns the BLIP model in eval mode."""
    from dlip.fileio import load_safetensors
    from dlip.models.blip import BLIP

    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"model directory not found: {directory}")
    weights = directory / WEIGHTS_FILE
    if not weights.is_file():
        raise FileNotFoundError(f"{weights} not found (a saved dlip model has {WEIGHTS_FILE})")
    _refuse_foreign(directory / CONFIG_FILE)
    config = ModelConfig.load(directory / CONFIG_FILE)
    model = BLIP(config)
    load_strict(model, load_safetensors(weights, device=str(map_location)), str(weights))
    return model.to(map_location).eval()


def _refuse_foreign(config_path: Path) -> None:
    """A transformers directory also has config.json: say how to convert it instead."""
    import json

    try:
        data = json.loads(config_path.read_text())
    except (OSError, json.JSONDecodeError):
        return  # ModelConfig.load reports it
    if isinstance(data, dict) and "model_type" in data:
        raise CheckpointError(
            f"{config_path.parent} is a transformers '{data['model_type']}' model, not a dlip "
            f"model; convert it first: dlip convert {config_path.parent} --from hf --out DIR"
        )


# ------------------------------------------------------------------- preset or saved directory
def resolve_config(spec: str | Path) -> ModelConfig:
    """The ModelConfig of `spec`: a saved model directory (its config.json) or a preset name.
    No weights are read. Every command and API that takes "a model" resolves it here."""
    from dlip.models.presets import get_config, list_presets

    if Path(spec).is_dir():
        return ModelConfig.load(Path(spec) / CONFIG_FILE)
    if str(spec) in list_presets():
        return get_config(str(spec))
    raise FileNotFoundError(
        f"model {str(spec)!r}: not a saved model directory nor a preset "
        f"(unknown model preset {str(spec)!r}; presets are {', '.join(list_presets())})"
    )


def resolve(spec: str | Path):
    """The model `spec` names: a saved directory, loaded strictly, or a preset with random
    weights (`is_preset(spec)` tells which); in eval mode, on the CPU."""
    if Path(spec).is_dir():
        return load(spec)
    from dlip.models.presets import create_model

    return create_model(resolve_config(spec)).eval()


def is_preset(spec: str | Path) -> bool:
    """`spec` names a preset (random weights), not a saved model directory."""
    from dlip.models.presets import list_presets

    return not Path(spec).is_dir() and str(spec) in list_presets()


# ------------------------------------------------------------------------------ task forms
# form -> (has_encoder, has_decoder), as BLIP's finetuning classes hold a model.
FORMS = {"retrieval": (True, False), "captioning": (False, True)}


def task_form(model, form: str):
    """`model` in the form one task trains: "retrieval" (ViT + text encoder + projections, ITM
    head and temperature: BLIP_Retrieval) or "captioning" (ViT + the whole decoder:
    BLIP_Decoder). The other tower is dropped, so no parameter is left without a gradient
    (DDP refuses those); every kept tensor is the model's own, bit for bit. A model already in
    that form comes back as it is."""
    from dlip.models.blip import BLIP

    if form == "vqa":
        return vqa_form(model)
    if form not in FORMS:
        raise ValueError(f"unknown model form {form!r}; forms are {[*sorted(FORMS), 'vqa']}")
    if model.config.vqa:
        raise ValueError(f"model '{model.config.name}' is a VQA form: it has no {form} form")
    enc, dec = FORMS[form]
    c = model.config
    if (c.has_encoder, c.has_decoder) == (enc, dec):
        return model
    if not (c.has_encoder if enc else c.has_decoder):
        need = "has_encoder" if enc else "has_decoder"
        raise ValueError(f"model '{c.name}' has no {form} form ({need}=False)")
    out = BLIP(c.replace(has_encoder=enc, has_decoder=dec))
    full = model.state_dict()  # every name of a tied tensor is in it
    missing = sorted(set(out.state_dict()) - set(full))
    if missing:
        raise CheckpointError(f"'{c.name}' lacks tensors of its {form} form: {missing}")
    out.load_state_dict({k: full[k] for k in out.state_dict()}, strict=True)
    param = next(model.parameters())
    return out.to(param.device, param.dtype).train(model.training)


# The pretraining tensors BLIP_VQA has no place for.
_ITC_HEADS = ("vision_proj.", "text_proj.", "itm_head.", "temp")


def vqa_form(model):
    """`model` as BLIP_VQA starts from a pretraining checkpoint (salesforce/BLIP blip_vqa.py):
    the ViT, the text encoder as question encoder and the decoder as answer decoder, its
    tensors shared with the encoder becoming its own copies; the ITC / ITM heads dropped. The
    answer decoder's cross-attention keys/values read question states, so they are copied only
    when the vision width equals the text width (BLIP's models); otherwise they start from BERT
    init and a warning names them. A VQA model comes back as it is."""
    import warnings

    from dlip.models.blip import BLIP

    c = model.config
    if c.vqa:
        return model
    if not (c.has_encoder and c.has_decoder):
        raise ValueError(
            f"model '{c.name}' has no VQA form: it needs the text encoder and the decoder "
            f"(has_encoder={c.has_encoder}, has_decoder={c.has_decoder}); start from a "
            "pretraining checkpoint or preset"
        )
    out = BLIP(c.vqa_form())
    full, own = model.state_dict(), out.state_dict()
    dropped = [k for k in full if k not in own and not k.startswith(_ITC_HEADS)]
    if dropped:
        raise CheckpointError(f"'{c.name}' tensors with no place in its VQA form: {dropped}")
    fresh = [k for k, v in own.items() if k not in full or full[k].shape != v.shape]
    out.load_state_dict({k: v if k in fresh else full[k] for k, v in own.items()}, strict=True)
    if fresh:
        warnings.warn(
            f"VQA form of '{c.name}': {len(fresh)} answer-decoder tensors start from BERT init "
            f"(vision width {c.vision.width} != text width {c.text.hidden_size}): {fresh}",
            stacklevel=2,
        )
    param = next(model.parameters())
    return out.to(param.device, param.dtype).train(model.training)
