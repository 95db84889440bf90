"""Student initialisation for pretraining (`model.init`): random, inherit (optionally
width-pruned), or a timm ViT.

- `init_from_timm(student, path)`: a timm / DeiT ViT checkpoint file into the vision tower,
  strictly (every tower tensor provided, shapes equal); classifier heads are dropped and
  `pos_embed` is resampled to the student's patch grid.
- `init_from_teacher(student, teacher)`: every student tensor whose (layer-mapped) teacher
  tensor has the same shape is copied; the rest keep their random init and are reported.

Layer map for `inherit` (one rule for the vision blocks and the text layers): student layer i of
Ls takes teacher layer round(i * (Lt - 1) / (Ls - 1)) (half up), so the first and the last
layers are always kept and the others are evenly spaced between them: 12 -> 6 takes
0, 2, 4, 7, 9, 11; 4 -> 2 takes 0, 3. Keeping the last layer keeps the copied heads (ITC
projections, ITM, LM) on the states they were trained on. A one-layer group takes the
teacher's last layer; a deeper student repeats teacher layers. The KD layer maps default to
the same pairs (`layer_pairs`, used by dlip.losses.adapters.LayerMap), so a student layer
inherited from teacher layer j is distilled towards teacher layer j's output. In the text
tower, when both models have an int `fusion_layers` (and both or neither have text-only layers),
text-only layers map among the teacher's text-only layers and fusion layers among its
fusion layers; otherwise (either is "all") the whole stacks map. The decoder's own
self-attention follows the same text map.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from dlip.models.blip import BLIP
from dlip.models.config import ModelConfig, TextConfig
from dlip.models.io import alias_map, key_problems
from dlip.models.vision import resize_pos_embed

# Classifier-only tensors of timm / DeiT checkpoints: not part of a feature-extracting tower.
_HEAD_PREFIXES = ("head.", "head_dist.", "pre_logits.")
_CONTAINERS = ("model", "state_dict", "module")
_TORCH_SUFFIXES = (".pth", ".pt", ".bin")
_BLOCK = re.compile(r"^(visual_encoder\.blocks|text_encoder\.encoder\.layer"
                    r"|text_decoder\.bert\.encoder\.layer)\.(\d+)\.(.+)$")  # fmt: skip


@dataclass
class InitReport:
    """What an initialisation did: tensors copied (student name, source name), kept random
    (student name -> reason), source keys ignored, and parameter counts."""

    source: str
    copied: list[tuple[str, str]] = field(default_factory=list)
    kept_random: dict[str, str] = field(default_factory=dict)
    ignored: list[str] = field(default_factory=list)
    resized: list[str] = field(default_factory=list)
    pruned: list[str] = field(default_factory=list)  # copied from a cut of a wider tensor
    params_copied: int = 0
    params_random: int = 0
    note: str = ""  # what the source does not cover (timm: everything but the vision tower)

    def summary(self) -> str:
        text = (
            f"copied {len(self.copied)} tensors ({_millions(self.params_copied)} params) from "
            f"{self.source}; {_millions(self.params_random)} params kept random"
        )
        if self.note:
            text += f" ({self.note})"
        if self.kept_random:
            reasons = Counter(why.split(" (")[0] for why in self.kept_random.values())
            counts = ", ".join(f"{n} {why}" for why, n in sorted(reasons.items()))
            names = _head(sorted(self.kept_random))
            text += f" ({len(self.kept_random)} tensors: {counts}): {names}"
        if self.pruned:
            text += f"; {len(self.pruned)} cut from wider teacher tensors: {_head(self.pruned)}"
        if self.resized:
            text += f"; resized {_head(self.resized)}"
        if self.ignored:
            text += f"; ignored {_head(self.ignored)}"
        return text


def _millions(n: int) -> str:
    return f"{n / 1e6:.2f}M"


def _head(names: Sequence[str], keep: int = 4) -> str:
    shown = ", ".join(names[:keep])
    return shown + (f", ... (+{len(names) - keep} more)" if len(names) > keep else "")


# ------------------------------------------------------------------------------------- timm
def read_state_dict(path: str | Path) -> dict[str, Tensor]:
    """Tensors of a .safetensors / .pth / .pt / .bin file, unwrapped from common containers
    ({"model": ...}, {"state_dict": ...}, {"module": ...}) and a DDP `module.` key prefix."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"timm checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        from dlip.fileio import load_safetensors

        state = load_safetensors(path)
    elif path.suffix in _TORCH_SUFFIXES:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # pickle / zip errors have many types; name the file
            raise ValueError(f"{path}: cannot read it as a torch checkpoint ({err})") from err
    else:
        raise ValueError(
            f"{path}: unknown checkpoint format {path.suffix!r}; give a .safetensors, .pth, "
            ".pt or .bin file"
        )
    return _unwrap(state, path)


def _unwrap(state: object, path: Path) -> dict[str, Tensor]:
    while isinstance(state, Mapping) and not all(isinstance(v, Tensor) for v in state.values()):
        key = next((k for k in _CONTAINERS if isinstance(state.get(k), Mapping)), None)
        if key is None:
            raise ValueError(
                f"{path}: not a state dict of tensors and none of the container keys "
                f"{list(_CONTAINERS)} holds one (top-level keys: {sorted(state)[:10]})"
            )
        state = state[key]
    if not isinstance(state, Mapping) or not state:
        raise ValueError(f"{path}: no tensors found (got {type(state).__name__})")
    if all(k.startswith("module.") for k in state):
        state = {k.removeprefix("module."): v for k, v in state.items()}
    return dict(state)


def init_from_timm(student: BLIP, path: str | Path) -> InitReport:
    """Load a timm / DeiT ViT checkpoint into `student.visual_encoder`, strictly.

    Dropped: `head.*`, `head_dist.*`, `pre_logits.*` (classifier only) and `fc_norm.*` (the
    pooled-feature norm of avg-pool ViTs; the tower reads the CLS token after `norm`).
    A distilled DeiT (`dist_token`) or a pos_embed without a CLS position is refused."""
    state = read_state_dict(path)
    tower = student.visual_encoder
    own = tower.state_dict()
    unused_norm = [k for k in state if k.startswith("fc_norm.") and k not in own]
    ignored = sorted([k for k in state if k.startswith(_HEAD_PREFIXES)] + unused_norm)
    state = {k: v for k, v in state.items() if k not in ignored}
    if "dist_token" in state:
        raise ValueError(
            f"{path} is a distilled DeiT (dist_token + head_dist: 2 prefix tokens); the student's "
            "ViT has only a class token, so the checkpoint cannot be mapped exactly. Use the "
            "non-distilled DeiT / timm checkpoint (e.g. deit_base_patch16_224)"
        )
    resized = _resize_timm_pos(state, tower.cfg.grid, path)
    _check_strict(own, state, path)
    with torch.no_grad():
        for name, value in state.items():
            own[name].copy_(value)
    report = InitReport(source=str(path), ignored=ignored, resized=resized)
    report.copied = [(f"visual_encoder.{k}", k) for k in sorted(state)]
    report.params_copied = sum(v.numel() for v in state.values())
    report.params_random = student.num_params() - report.params_copied
    report.note = "the text tower and heads"
    return report


def _resize_timm_pos(state: dict[str, Tensor], grid: int, path: str | Path) -> list[str]:
    pos = state.get("pos_embed")
    if pos is None:
        return []
    n = pos.shape[1]
    if pos.dim() != 3 or round((n - 1) ** 0.5) ** 2 != n - 1:
        raise ValueError(
            f"{path}: pos_embed {tuple(pos.shape)} is not (1, 1 + grid*grid, D); a model "
            "without a class-token position (no_embed_class, e.g. DeiT III) is not supported"
        )
    old = round((n - 1) ** 0.5)
    if old == grid:
        return []
    state["pos_embed"] = resize_pos_embed(pos, grid)
    return [f"pos_embed {old}x{old} -> {grid}x{grid}"]


def _check_strict(own: Mapping[str, Tensor], state: Mapping[str, Tensor], path) -> None:
    problems = key_problems(own, state, owner="student")
    if problems:
        raise ValueError(
            f"model.init=timm:{path} does not match the student's vision tower:\n  "
            + "\n  ".join(problems)
        )


# ---------------------------------------------------------------------------------- inherit
def spread(ls: int, lt: int) -> list[int]:
    """Teacher layer per student layer: round(i * (lt-1) / (ls-1)), half up (first and last
    kept); the last teacher layer for a one-layer student."""
    if ls <= 1:
        return [lt - 1] * ls
    return [(2 * i * (lt - 1) + (ls - 1)) // (2 * (ls - 1)) for i in range(ls)]


def layer_pairs(student: ModelConfig, teacher: ModelConfig, tower: str) -> list[int]:
    """The teacher layer of every student layer of `tower` ("vision" or "text"): the rule both
    `model.init=inherit` and the default KD layer maps follow."""
    if tower == "vision":
        return spread(student.vision.depth, teacher.vision.depth)
    return text_layer_map(student.text, teacher.text)


def text_layer_map(student: TextConfig, teacher: TextConfig) -> list[int]:
    """Teacher text layer per student text layer, respecting the fusion topology."""
    s_to, t_to = student.text_only_layers, teacher.text_only_layers
    grouped = (
        student.fusion_layers != "all"
        and teacher.fusion_layers != "all"
        and (s_to == 0) == (t_to == 0)
    )
    if not grouped:
        return spread(student.num_layers, teacher.num_layers)
    fusion = spread(student.num_layers - s_to, teacher.num_layers - t_to)
    return spread(s_to, t_to) + [t_to + j for j in fusion]


def resolve_layer_maps(
    student: BLIP, teacher: BLIP, layer_map: Mapping[str, Sequence[int]] | None = None
) -> dict[str, list[int]]:
    """{"vision": [...], "text": [...]}: the default rule, or explicit teacher layers per
    student layer (one per student layer, each in range) for either key."""
    s, t = student.config, teacher.config
    maps = {"vision": layer_pairs(s, t, "vision"), "text": layer_pairs(s, t, "text")}
    depths = {
        "vision": (s.vision.depth, t.vision.depth),
        "text": (s.text.num_layers, t.text.num_layers),
    }
    for key, spec in (layer_map or {}).items():
        if key not in maps:
            raise ValueError(f"init layer map: unknown key {key!r}; use 'vision' or 'text'")
        ls, lt = depths[key]
        spec = list(spec)
        if len(spec) != ls or not all(isinstance(j, int) and 0 <= j < lt for j in spec):
            raise ValueError(
                f"init layer map '{key}' = {spec!r}: give {ls} teacher layers (one per student "
                f"layer), each in 0..{lt - 1}"
            )
        maps[key] = spec
    return maps


def _teacher_name(name: str, maps: Mapping[str, list[int]]) -> str:
    """The teacher tensor a student tensor inherits from: same name, layer index mapped."""
    m = _BLOCK.match(name)
    if m is None:
        return name
    prefix, layer, rest = m.groups()
    mapped = maps["vision" if prefix.startswith("visual") else "text"][int(layer)]
    return f"{prefix}.{mapped}.{rest}"


def init_from_teacher(
    student: BLIP,
    teacher: BLIP,
    layer_map: Mapping[str, Sequence[int]] | None = None,
    prune: bool = False,
    tower: str | None = None,
) -> InitReport:
    """Copy every teacher tensor whose shape fits (see the module docstring for the layer
    map); pos_embed is resampled when only the patch grid differs. `prune=True`
    (`model.init=inherit_pruned`) also copies a narrower student's tensors from a cut of the
    teacher's (`prune_to`). Tensors without a source keep their random init and are listed.
    Raises ValueError when no tensor of 2+ dims (weight matrix, embedding, token) was copied.
    `tower` "vision" / "text" limits it to the vision tower / everything else (`in_tower`)."""
    maps = resolve_layer_maps(student, teacher, layer_map)
    source = teacher.state_dict()  # every alias: an untied student reads the teacher's tied names
    own = student.state_dict()
    report = InitReport(source=f"the teacher ({teacher.config.name})")
    plan: dict[str, Tensor] = {}  # student name -> value; copied only once all checks pass
    for name, canon in alias_map(student).items():
        if name != canon or not in_tower(name, tower):
            continue  # tied: copied once under its canonical name; or another tower's
        target, src_name = own[name], _teacher_name(name, maps)
        value = source.get(src_name)
        if prune and value is not None and name == "visual_encoder.pos_embed":
            value = value[..., : target.shape[-1]]  # channels first; the grid is fitted next
        if value is not None and name == "visual_encoder.pos_embed":
            value = _fit_pos_embed(value, target, report)
        if prune and value is not None and value.shape != target.shape:
            cut = prune_to(name, value, target.shape, student.config, teacher.config)
            if cut is not None:
                report.pruned.append(name)
                value = cut
        if value is None or value.shape != target.shape:
            why = "not in the teacher" if value is None else "shape differs"
            report.kept_random[name] = f"{why} ({src_name})"
            report.params_random += target.numel()
        else:
            plan[name] = value
            report.copied.append((name, src_name))
            report.params_copied += target.numel()
    # Width-independent tensors (temp, itm_head.bias, the LM bias, projection biases) fit any
    # pair of models; inheritance means at least one weight matrix / embedding / token fits.
    if not any(v.dim() >= 2 for v in plan.values()):
        s, t = student.config, teacher.config
        raise ValueError(
            "model.init=inherit: no student weight matrix has a same-shaped teacher tensor "
            f"(student '{s.name}' vision width {s.vision.width}, text width "
            f"{s.text.hidden_size}; teacher '{t.name}' {t.vision.width}, {t.text.hidden_size}); "
            "inheriting is impossible, use model.init=random"
        )
    with torch.no_grad():
        for name, value in plan.items():
            own[name].copy_(value)
    return report


def _fit_pos_embed(value: Tensor, target: Tensor, report: InitReport) -> Tensor:
    """Teacher pos_embed (1, 1+g*g, D) resampled to the student's grid when only g differs."""
    if value.shape == target.shape or value.shape[-1] != target.shape[-1]:
        return value
    grid = round((target.shape[1] - 1) ** 0.5)
    old = round((value.shape[1] - 1) ** 0.5)
    report.resized.append(f"visual_encoder.pos_embed {old}x{old} -> {grid}x{grid}")
    return resize_pos_embed(value, grid)


# ----------------------------------------------------------------------------- width pruning
_HEAD_OUT = re.compile(r"attention\.self\.(query|key|value)\.(weight|bias)$|attn\.qkv\.")
_HEAD_IN = re.compile(r"attention\.output\.dense\.weight$|attn\.proj\.weight$")


def head_channels(heads_s: int, dim_s: int, heads_t: int, dim_t: int) -> Tensor | None:
    """(heads_s * dim_s,) teacher channels for a student's attention heads: the teacher's
    first heads_s heads, the first dim_s channels of each; None if the student's are wider."""
    if heads_s > heads_t or dim_s > dim_t:
        return None
    return (torch.arange(heads_s)[:, None] * dim_t + torch.arange(dim_s)[None]).reshape(-1)


def prune_to(
    name: str, value: Tensor, shape: Sequence[int], student: ModelConfig, teacher: ModelConfig
) -> Tensor | None:
    """A teacher tensor cut to a narrower student's `shape`: TinyCLIP's weight inheritance
    (Wu et al., ICCV 2023) with a fixed choice instead of learned masks. Attention channels
    keep whole heads (the first student-many teacher heads, the leading channels of each; the
    vision qkv's three parts each so); every other dimension keeps its leading channels, the
    same ones in every tensor, so the student's residual stream is a sub-space of the
    teacher's. None when a student dimension is wider than the teacher's."""
    if value.dim() != len(shape) or any(n > m for n, m in zip(shape, value.shape, strict=True)):
        return None
    (hs, ws), (ht, wt) = (_heads_width(c, name) for c in (student, teacher))
    heads = head_channels(hs, ws // hs, ht, wt // ht)
    out = value
    for dim, n in enumerate(shape):
        head_dim = (dim == 0 and _HEAD_OUT.search(name)) or (dim == 1 and _HEAD_IN.search(name))
        if head_dim and heads is not None:
            parts = 3 if "attn.qkv." in name else 1  # vision qkv: [q; k; v] along dim 0
            idx = torch.cat([heads + p * wt for p in range(parts)])
        elif out.shape[dim] != n:
            idx = torch.arange(n)
        else:
            continue
        if len(idx) != n:
            return None
        out = out.index_select(dim, idx)
    return out


def _heads_width(config: ModelConfig, name: str) -> tuple[int, int]:
    if name.startswith("visual_encoder"):
        return config.vision.num_heads, config.vision.width
    return config.text.num_heads, config.text.hidden_size


# ------------------------------------------------------------------------------ random init
_VALUE_OUTPUT = re.compile(r"^text_encoder\..*attention\.(self\.value|output\.dense)$")


@torch.no_grad()
def redraw_value_output(student: BLIP, std: float) -> list[str]:
    """Redraw the text encoder's attention value and output projections (self- and
    cross-attention; the decoder shares the cross-attention) from N(0, std); returns their
    names. BERT draws every weight from N(0, 0.02): at width 96 two such maps in a row scale a
    token's contribution by ~(0.02 * sqrt(96))^2 = 0.04, so a from-scratch encoder's [CLS]
    hardly depends on the words (cosine 0.9999 between captions) and ITC sits at ln(batch)
    for hundreds of steps. With std ~ 1 / sqrt(width) the attention mixes the words at step 0."""
    names = []
    for name, module in student.named_modules():
        if isinstance(module, torch.nn.Linear) and _VALUE_OUTPUT.match(name):
            module.weight.normal_(0.0, std)
            names.append(name)
    return names


# ---------------------------------------------------------------------------------- dispatch
def in_tower(name: str, tower: str | None) -> bool:
    """Whether parameter `name` belongs to `tower`: "vision" = the ViT, "text" = everything
    else (text towers, ITC projections, ITM / LM heads, temperature); None = any."""
    return tower is None or name.startswith("visual_encoder.") == (tower == "vision")


def apply_inits(
    student: BLIP, init: str, init_text: str | None = None, teacher: BLIP | None = None
) -> list[InitReport]:
    """`model.init`, or per tower with `model.init_text`: `init` then covers the vision tower
    only (e.g. timm:PATH) and `init_text` the rest (e.g. inherit)."""
    if init_text is None:
        report = apply_init(student, init, teacher)
        return [] if report is None else [report]
    parts = ((init, "vision"), (init_text, "text"))
    return [r for i, t in parts if (r := apply_init(student, i, teacher, t)) is not None]


def apply_init(
    student: BLIP, init: str, teacher: BLIP | None = None, tower: str | None = None
) -> InitReport | None:
    """`model.init` for the trainer: "random" (nothing to do), "inherit", "inherit_pruned"
    or "timm:PATH" (the vision tower only), over `tower` ("vision" / "text"; None: all).
    Prints a one-line summary on rank 0."""
    if init == "random":
        return None
    if init in ("inherit", "inherit_pruned"):
        if teacher is None:
            raise ValueError(f"model.init={init} needs a teacher (set teacher.checkpoint=DIR)")
        report = init_from_teacher(student, teacher, prune=init == "inherit_pruned", tower=tower)
    elif init.startswith("timm:") and init != "timm:":
        if tower == "text":
            raise ValueError(f"model.init_text={init!r}: a timm file holds a vision tower only")
        report = init_from_timm(student, init.removeprefix("timm:"))
    else:
        raise ValueError(
            f"model.init={init!r}: use 'random', 'inherit', 'inherit_pruned' or 'timm:PATH'"
        )
    if not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0:
        key = {None: "model.init", "vision": "model.init (vision)", "text": "model.init_text"}
        print(f"{key[tower]}={init}: {report.summary()}", flush=True)
    return report
