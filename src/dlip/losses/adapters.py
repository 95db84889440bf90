"""Distillation plumbing between a student and its teacher: config, layer maps, projectors.

- `KDConfig` / `KD_TERMS`: the terms, their weights (0 = off) and settings; the loss math lives
  in `dlip.losses.distill`, which re-exports both.
- `LayerMap`: explicit teacher->student layer pairs for one stream, uniform by default.
- `KDAdapters`: the learnable projectors (student width -> teacher width) of the representation
  and hidden-state KD terms, keyed by term. They are trained, wrapped in DDP and saved with the
  student; the model's ITC `vision_proj` / `text_proj` are never reused for KD, so distillation
  cannot move the retrieval embedding space.
- `resample_patches`: the rule for teachers that see another image size (patch grid).

Streams are the forward passes KD reads, each over the tower layers that pass runs:
`image` (vision tower), `text` (unimodal text: the text-only layers), `fusion` (the image-grounded
encoder: the cross-attending layers, all of them for BLIP's `fusion_layers="all"`, the last k for
`fusion_layers=k`) and `decoder` (every text layer, causal). Layer numbers are 0-based indices of
the tower, as in `Taps`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dlip.models.config import ModelConfig
from dlip.models.outputs import NO_TAPS, Taps

STREAMS = ("image", "text", "fusion", "decoder")


@dataclass(frozen=True)
class KDTerm:
    """What a KD term compares: the pass (stream) whose outputs it reads, and which outputs."""

    stream: str  # "image" | "text" | "fusion" | "decoder": the teacher pass it needs
    # "logits" | "rep" (pooled features) | "hidden" (tapped layers) | "attn" (maps) |
    # "embed" (the ITC embeddings against the teacher's: dlip.losses.clipkd)
    kind: str


# THE table of distillation terms, in their canonical order. Everything that needs to know
# which terms exist, which teacher pass a term needs or which task it belongs to reads it:
# KDConfig's checks, the adapters (projected and tapped terms), the training task (teacher
# passes) and finetuning (retrieval: image/text/fusion terms; captioning: image/decoder terms).
KD_TERMS: dict[str, KDTerm] = {
    "kd_itc": KDTerm("text", "logits"),  # ITC similarity distributions (the text pass's feats)
    "kd_itm": KDTerm("fusion", "logits"),
    "kd_lm": KDTerm("decoder", "logits"),
    "kd_rep_image": KDTerm("image", "rep"),
    "kd_rep_patch": KDTerm("image", "rep"),
    "kd_rep_text": KDTerm("text", "rep"),
    "kd_rep_fusion": KDTerm("fusion", "rep"),
    "kd_rep_decoder": KDTerm("decoder", "rep"),
    "kd_hidden_image": KDTerm("image", "hidden"),
    "kd_hidden_text": KDTerm("text", "hidden"),
    "kd_hidden_fusion": KDTerm("fusion", "hidden"),
    "kd_hidden_decoder": KDTerm("decoder", "hidden"),
    "kd_attn_image": KDTerm("image", "attn"),
    "kd_attn_text": KDTerm("text", "attn"),
    "kd_attn_fusion": KDTerm("fusion", "attn"),
    "kd_attn_cross": KDTerm("fusion", "attn"),  # the fusion layers' cross-attention maps
    "kd_attn_decoder": KDTerm("decoder", "attn"),
    "kd_feat": KDTerm("text", "embed"),  # CLIP-KD's feature distillation (FD)
    "kd_icl": KDTerm("text", "embed"),  # CLIP-KD's interactive contrastive learning (ICL)
}


def terms_of(*streams: str) -> frozenset[str]:
    """The KD terms that read any of `streams` (e.g. `terms_of("decoder")`: captioning's)."""
    bad = sorted(set(streams) - set(STREAMS))
    if bad:
        raise ValueError(f"unknown KD stream(s) {bad}; streams are {STREAMS}")
    return frozenset(t for t, term in KD_TERMS.items() if term.stream in streams)


REP_LOSSES = ("cos", "mse")
PATCH_POOLS = ("token", "mean")


# ------------------------------------------------------------------------------------- config
@dataclass(frozen=True)
class KDConfig:
    """Distillation settings of a run. A term is off unless `weights` gives it a weight > 0."""

    weights: Mapping[str, float] = field(default_factory=dict)  # term (KD_TERMS) -> weight
    # Temperature of the teacher's ITC similarities; None = the teacher's own learned `temp`.
    # The student always uses its own `temp` (its ITC space is what the student learns).
    itc_temperature: float | None = None
    itm_temperature: float = 1.0  # Hinton softening; the term is scaled by T^2
    lm_temperature: float = 1.0  # Hinton softening; the term is scaled by T^2
    rep_loss: str = "cos"  # kd_rep_*: "cos" (1 - cosine) or "mse"
    hidden_loss: str = "mse"  # kd_hidden_*: "mse" (TinyBERT) or "cos"
    patch_pool: str = "token"  # kd_rep_patch: "token" (per patch) or "mean" (mean patch)
    # stream -> explicit layer map (LayerMap.resolve): a teacher layer per student layer, or
    # [student, teacher] pairs; a stream not listed follows model.init=inherit's layer rule.
    layer_maps: Mapping[str, Sequence[Any]] = field(default_factory=dict)
    eps: float = 1e-8  # clamp of student attention probabilities before the log
    # kd_icl: a queue of this many earlier teacher ITC embeddings as extra keys (0 = the batch
    # only). The teacher is frozen, so queued keys never go stale (unlike BLIP's momentum queue).
    teacher_queue: int = 0

    def __post_init__(self) -> None:
        unknown = sorted(set(self.weights) - set(KD_TERMS))
        if unknown:
            import difflib

            close = difflib.get_close_matches(unknown[0], list(KD_TERMS), n=1)
            hint = f" (did you mean loss.kd.weights.{close[0]}?)" if close else ""
            raise ValueError(f"unknown KD term(s) {unknown}{hint}; terms are {list(KD_TERMS)}")
        for term, w in self.weights.items():
            if isinstance(w, bool) or not isinstance(w, (int, float)) or not 0 <= w < math.inf:
                raise ValueError(f"KD weight {term}={w!r} must be a finite number >= 0")
        if isinstance(self.teacher_queue, bool) or not isinstance(self.teacher_queue, int):
            raise ValueError(f"KD teacher_queue={self.teacher_queue!r} must be an int >= 0")
        if self.teacher_queue < 0:
            raise ValueError(f"KD teacher_queue={self.teacher_queue} must be >= 0")
        for name in ("itm_temperature", "lm_temperature", "eps"):
            _check_positive(name, getattr(self, name))
        if self.itc_temperature is not None:
            _check_positive("itc_temperature", self.itc_temperature)
        for name, value, allowed in (
            ("rep_loss", self.rep_loss, REP_LOSSES),
            ("hidden_loss", self.hidden_loss, REP_LOSSES),
            ("patch_pool", self.patch_pool, PATCH_POOLS),
        ):
            if value not in allowed:
                raise ValueError(f"KD {name}={value!r}; choose one of {allowed}")
        bad = sorted(set(self.layer_maps) - set(STREAMS))
        if bad:
            raise ValueError(f"unknown KD layer-map stream(s) {bad}; streams are {STREAMS}")

    @property
    def enabled(self) -> tuple[str, ...]:
        """Terms with weight > 0, in KD_TERMS order."""
        return tuple(t for t in KD_TERMS if self.weights.get(t, 0) > 0)

    def weight(self, term: str) -> float:
        if term not in KD_TERMS:
            raise KeyError(f"unknown KD term {term!r}")
        return float(self.weights.get(term, 0.0))


def _check_positive(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
        raise ValueError(f"KD {name}={value!r} must be a finite number > 0")


# Projected terms -> the stream whose width they project ("image": vision width, else text width).
PROJECTED_TERMS = {t: k.stream for t, k in KD_TERMS.items() if k.kind in ("rep", "hidden")}
# Terms on the ITC embeddings (projectors `embed_image` / `embed_text`).
EMBED_TERMS = frozenset(t for t, k in KD_TERMS.items() if k.kind == "embed")
# Terms that read tapped layers -> (stream, "hidden" | "attn").
LAYER_TERMS = {t: (k.stream, k.kind) for t, k in KD_TERMS.items() if k.kind in ("hidden", "attn")}


def stream_layers(config: ModelConfig, stream: str) -> range:
    """The tower layers a stream's pass runs (and a layer map may name)."""
    t = config.text
    if stream == "image":
        return range(config.vision.depth)
    if stream == "text":
        return range(t.text_only_layers)
    if stream == "fusion":
        return (
            range(t.num_layers)
            if t.fusion_layers == "all"
            else range(t.text_only_layers, t.num_layers)
        )
    if stream == "decoder":
        return range(t.num_layers)
    raise ValueError(f"unknown KD stream {stream!r}; streams are {STREAMS}")


def stream_width(config: ModelConfig, stream: str) -> int:
    return config.vision.width if stream == "image" else config.text.hidden_size


@dataclass(frozen=True)
class LayerMap:
    """(student layer, teacher layer) pairs of one stream; KD terms average over the pairs.

    Default (`default`): the pairs `model.init=inherit` copies by (dlip.models.init.layer_pairs:
    round(i * (Lt-1) / (Ls-1)) half up, first and last layers kept; 6 <- 12 gives 0<-0, 1<-2,
    2<-4, 3<-7, 4<-9, 5<-11), so a student layer inherited from teacher layer j is pulled
    towards layer j's output. Where the two models' topologies put a mapped teacher layer
    outside the stream's layers (e.g. a `fusion_layers=k` teacher against a BLIP-topology
    student), the stream's own layers are spread by the same rule (`uniform`). A deeper
    student maps several layers to one teacher layer.
    """

    stream: str
    pairs: tuple[tuple[int, int], ...]

    @property
    def student_layers(self) -> frozenset[int]:
        return frozenset(s for s, _ in self.pairs)

    @property
    def teacher_layers(self) -> frozenset[int]:
        return frozenset(t for _, t in self.pairs)

    @classmethod
    def uniform(cls, stream: str, student: Sequence[int], teacher: Sequence[int]) -> LayerMap:
        """The stream's student layers spread over its teacher layers (`init.spread`)."""
        from dlip.models.init import spread

        ls, lt = len(student), len(teacher)
        if ls == 0 or lt == 0:
            raise ValueError(f"kd layer map '{stream}': a tower runs no layers in this stream")
        picks = spread(ls, lt)
        return cls(stream, tuple((student[i], teacher[j]) for i, j in enumerate(picks)))

    @classmethod
    def default(cls, stream: str, student: ModelConfig, teacher: ModelConfig) -> LayerMap:
        """The inherit rule's pairs within the stream (see the class docstring)."""
        from dlip.models.init import layer_pairs

        s_layers, t_layers = stream_layers(student, stream), stream_layers(teacher, stream)
        full = layer_pairs(student, teacher, "vision" if stream == "image" else "text")
        picks = [full[i] for i in s_layers]
        if s_layers and all(j in t_layers for j in picks):
            return cls(stream, tuple(zip(s_layers, picks, strict=True)))
        return cls.uniform(stream, s_layers, t_layers)

    @classmethod
    def resolve(
        cls,
        stream: str,
        spec: Sequence[Any] | None,
        student: range,
        teacher: range,
        depths: tuple[int, int] | None = None,
    ) -> LayerMap:
        """`spec`: None (uniform); a list of teacher layers, one per student layer of the
        stream in order; or a list of [student, teacher] pairs. `student` / `teacher`: the
        layers each model's pass runs; `depths`: (student, teacher) tower depths for messages.
        A layer out of range -> ValueError naming the layer and the tower depth."""
        s_depth, t_depth = depths or (student.stop, teacher.stop)
        if spec is None:
            return cls.uniform(stream, student, teacher)
        spec = list(spec)
        if not spec:
            raise ValueError(f"kd layer map '{stream}' is empty")
        if all(isinstance(x, int) and not isinstance(x, bool) for x in spec):
            if len(spec) != len(student):
                raise ValueError(
                    f"kd layer map '{stream}' lists {len(spec)} teacher layers, but the student's "
                    f"{stream} pass runs {len(student)} layers ({_span(student)}); give one "
                    "teacher layer per student layer or [student, teacher] pairs"
                )
            pairs = list(zip(student, spec, strict=True))
        elif all(isinstance(x, (list, tuple)) and len(x) == 2 for x in spec):
            pairs = [(x[0], x[1]) for x in spec]
        else:
            raise ValueError(
                f"kd layer map '{stream}' must be a list of ints or of [student, teacher] pairs, "
                f"got {spec!r}"
            )
        for s, t in pairs:
            _check_layer(stream, "student", s, student, s_depth)
            _check_layer(stream, "teacher", t, teacher, t_depth)
        return cls(stream, tuple((int(s), int(t)) for s, t in pairs))


def _span(layers: range) -> str:
    return f"layers {layers.start}-{layers.stop - 1}" if len(layers) else "no layers"


def _check_layer(stream: str, side: str, layer: Any, layers: range, depth: int) -> None:
    if not isinstance(layer, int) or isinstance(layer, bool) or layer not in layers:
        raise ValueError(
            f"kd layer map '{stream}': {side} layer {layer!r} is out of range; the {side}'s "
            f"{'vision' if stream == 'image' else 'text'} tower has {depth} layers and its "
            f"{stream} pass runs {_span(layers)}"
        )


def tower_depth(config: ModelConfig, stream: str) -> int:
    return config.vision.depth if stream == "image" else config.text.num_layers


class KDAdapters(nn.ModuleDict):
    """Projectors keyed by KD term (`nn.Linear(student_width, teacher_width)`, or `nn.Identity`
    when the widths are equal), plus the resolved layer maps (plain attributes, not state).

    One projector per hidden-state term is shared by all mapped layers of that stream: a
    transformer's layers write into one residual stream, so one change of basis serves them
    all (TinyBERT's choice). Build with `KDAdapters.build(cfg, student_config, teacher_config)`;
    the trainer optimises and checkpoints it with the student.
    """

    def __init__(
        self,
        projectors: Mapping[str, nn.Module] | None = None,
        layer_maps: Mapping[str, LayerMap] | None = None,
        taps: Mapping[tuple[str, str], Taps] | None = None,
    ) -> None:
        super().__init__(dict(projectors or {}))
        self.layer_maps: dict[str, LayerMap] = dict(layer_maps or {})
        self._taps: dict[tuple[str, str], Taps] = dict(taps or {})

    @classmethod
    def build(cls, cfg: KDConfig, student: ModelConfig, teacher: ModelConfig) -> KDAdapters:
        """Projectors and layer maps for the terms `cfg` enables; every check that can fail
        before step 1 (missing towers, vocab mismatch, layer map out of range) fails here."""
        enabled = cfg.enabled
        _check_towers(enabled, student, teacher)
        projectors: dict[str, nn.Module] = {}
        for term in enabled:
            if term in PROJECTED_TERMS:
                stream = PROJECTED_TERMS[term]
                ds, dt = stream_width(student, stream), stream_width(teacher, stream)
                projectors[term] = nn.Identity() if ds == dt else nn.Linear(ds, dt)
        if set(enabled) & EMBED_TERMS:  # one pair shared by kd_feat and kd_icl (CLIP-KD)
            ds, dt = student.embed_dim, teacher.embed_dim
            for name in ("embed_image", "embed_text"):
                projectors[name] = nn.Identity() if ds == dt else nn.Linear(ds, dt)
        maps: dict[str, LayerMap] = {}
        needs: dict[str, set[str]] = {}
        for term in enabled:
            if term in LAYER_TERMS:
                stream, kind = LAYER_TERMS[term]
                needs.setdefault(stream, set()).add(kind)
        for stream in STREAMS:
            spec = cfg.layer_maps.get(stream)
            if stream in needs or spec is not None:
                s_layers, t_layers = stream_layers(student, stream), stream_layers(teacher, stream)
                depths = (tower_depth(student, stream), tower_depth(teacher, stream))
                maps[stream] = (
                    LayerMap.default(stream, student, teacher)
                    if spec is None
                    else LayerMap.resolve(stream, spec, s_layers, t_layers, depths)
                )
        taps = {}
        for stream, kinds in needs.items():
            m = maps[stream]
            for side, layers in (("student", m.student_layers), ("teacher", m.teacher_layers)):
                hidden = layers if "hidden" in kinds else frozenset()
                attn = layers if "attn" in kinds else frozenset()
                taps[stream, side] = Taps(hidden=hidden, attn=attn)
        return cls(projectors, maps, taps)

    def taps(self, stream: str, side: str) -> Taps:
        """What the `side` ("student" | "teacher") model must tap in `stream`'s forward."""
        if stream not in STREAMS or side not in ("student", "teacher"):
            raise ValueError(f"taps(stream, side): stream in {STREAMS}, side student|teacher")
        return self._taps.get((stream, side), NO_TAPS)

    def projector(self, term: str) -> nn.Module:
        if term not in self:
            raise KeyError(f"no KD projector for {term!r}; build KDAdapters with {term} enabled")
        return self[term]


def _check_towers(enabled: Sequence[str], student: ModelConfig, teacher: ModelConfig) -> None:
    for term in enabled:
        stream = PROJECTED_TERMS.get(term) or LAYER_TERMS.get(term, (None,))[0]
        if term in ("kd_itc", "kd_itm") or term in EMBED_TERMS:
            need = "has_itc"
        elif stream in ("text", "fusion"):
            need = "has_encoder"
        elif term == "kd_lm" or stream == "decoder":
            need = "has_decoder"
        else:
            continue
        for side, config in (("student", student), ("teacher", teacher)):
            if not getattr(config, need):
                raise ValueError(f"{term} needs the {side} model to have {need}=True")
    if "kd_lm" in enabled and student.text.vocab_size != teacher.text.vocab_size:
        raise ValueError(
            f"kd_lm needs equal vocabularies: student {student.text.vocab_size}, "
            f"teacher {teacher.text.vocab_size} (same tokenizer)"
        )


def grid_side(num_patches: int) -> int:
    side = math.isqrt(num_patches)
    if side * side != num_patches:
        raise ValueError(f"{num_patches} patch tokens do not form a square grid")
    return side


def resample_patches(x: Tensor, num_tokens: int, dim: int, mass: bool = False) -> Tensor:
    """Resample image tokens along `dim` ([CLS] first, then a g x g patch grid, row-major) to
    `num_tokens` = 1 + G*G: the CLS entry is kept, the grid is resized by antialiased bilinear
    interpolation (a convex combination of neighbouring patches, box-like when shrinking).

    This is the rule for a teacher that sees another image size than the student: the
    teacher's grid is brought to the student's, never the reverse, and the student is
    compared token by token. `mass=True` is for attention probabilities over image keys:
    each slice's summed patch probability is kept, so a row stays a distribution. Resampling
    query rows (mass=False) mixes whole rows convexly, which also keeps them distributions.
    """
    n_from = x.shape[dim]
    if n_from == num_tokens:
        return x
    g, big_g = grid_side(n_from - 1), grid_side(num_tokens - 1)
    moved = x.movedim(dim, -1).float()  # (..., 1+g*g)
    cls, patches = moved[..., :1], moved[..., 1:]
    lead = patches.shape[:-1]
    grid = patches.reshape(-1, 1, g, g)
    grid = F.interpolate(grid, size=(big_g, big_g), mode="bilinear", antialias=True)
    out = grid.reshape(*lead, big_g * big_g)
    if mass:
        total = patches.sum(-1, keepdim=True)
        out = out * (total / out.sum(-1, keepdim=True).clamp_min(1e-12))
    return torch.cat([cls, out], dim=-1).movedim(-1, dim)
