"""Pretraining run configuration: frozen dataclasses, a small yaml diff and dotted overrides.

    config = load("configs/pretrain/tiny_synth.yaml", ["teacher.checkpoint=runs/t/final"])
    save_resolved(config, config.run.run_dir)  # run_dir/config.yaml, loads back to `config`

Resolution order: dataclass defaults (BLIP's pretraining recipe, REFERENCE.md 2.4) <- the yaml
(only what differs) <- `key=value` overrides, in command-line order. A value is parsed as YAML,
so `optim.lr=1e-4` is a float, `teacher.checkpoint=null` is None and
`data.manifests=[a.jsonl,b.jsonl]` is a list. `run_dir=DIR` and `max_steps=N` are shortcuts for
`run.run_dir` and `run.max_steps` on the command line (the issue's command forms). Sections
and mapping fields (`loss.kd.weights`, `loss.kd.layer_maps`, `model.arch`) merge key by key,
so `loss.kd.weights.kd_itc=1` sets one weight; every other value is replaced whole.

Unknown keys at any depth and wrongly typed values are `ConfigError`s naming the dotted key;
`PretrainConfig.validate()` (run by `load`) checks what spans fields before step 1.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from dlip.config import ConfigError, ModelConfig
from dlip.config import type_ok as _type_ok
from dlip.fileio import atomic_write_text
from dlip.losses.adapters import KD_TERMS, KDConfig

# Command-line shortcuts (issue 4's command forms) -> full dotted keys.
ALIASES = {"run_dir": "run.run_dir", "max_steps": "run.max_steps"}
RESOLVED_NAME = "config.yaml"


# ------------------------------------------------------------------------------------ sections
@dataclass(frozen=True)
class ModelSection:
    """The student."""

    preset: str = "dlip_small"  # preset name (dlip.list_presets()) or a ModelConfig .json path
    # ModelConfig changes merged into the preset, nested as its JSON ({"text": {"num_layers": 2}}):
    # ablations and tiny CPU models without a new preset file.
    arch: dict[str, Any] = field(default_factory=dict)
    image_size: int | None = None  # None: the preset's (224 for the released presets)
    # "random"; "inherit": copy teacher weights where shapes allow (every k-th layer when the
    # student is shallower); "timm:PATH": a timm/DeiT ViT checkpoint file for the vision tower.
    init: str = "random"
    # Initial ITC temperature (None: BLIP's 0.07, or what `init` copied). Tiny towers trained
    # from scratch first collapse to identical features; 0.3 halves that plateau (docs/demo.md).
    temp_init: float | None = None
    grad_checkpointing: bool = False  # recompute block activations in backward (both towers)

    def __post_init__(self) -> None:
        _check_types(self, "model")
        if self.image_size is not None:
            _require(self.image_size > 0, "model.image_size", self.image_size, "> 0")
        if self.temp_init is not None:
            _require(0.001 <= self.temp_init <= 0.5, "model.temp_init", self.temp_init,
                     "in [0.001, 0.5] (the clamp of the learnable temperature)")  # fmt: skip
        if self.init not in ("random", "inherit") and not re.fullmatch(r"timm:.+", self.init):
            raise ConfigError(
                f"model.init={self.init!r}: use 'random', 'inherit' or 'timm:PATH' "
                "(a timm/DeiT ViT checkpoint file)"
            )

    @property
    def timm_checkpoint(self) -> str | None:
        return self.init.removeprefix("timm:") if self.init.startswith("timm:") else None

    def model_config(self) -> ModelConfig:
        """The student's ModelConfig: preset (or JSON file) + `arch` changes + `image_size`."""
        from dlip.models.presets import get_config

        try:
            if self.preset.endswith(".json"):
                base = ModelConfig.load(self.preset)
            else:
                base = get_config(self.preset)
        except ConfigError as err:
            raise ConfigError(f"model.preset: {err}") from None
        config = base
        if self.arch:
            merged = _deep_merge(base.to_dict(), self.arch)
            config = ModelConfig.from_dict(merged, source="model.arch")
        if self.image_size is not None:
            try:
                config = config.with_image_size(self.image_size)
            except ConfigError as err:
                raise ConfigError(f"model.image_size: {err}") from None
        return config


@dataclass(frozen=True)
class TeacherSection:
    """The frozen teacher; none = train from scratch with the BLIP objectives alone."""

    checkpoint: str | None = None  # a `dlip.load`-able model dir (e.g. `dlip convert` output)
    bf16: bool = True  # run the teacher in bf16 on GPU (fp32 on CPU)

    def __post_init__(self) -> None:
        _check_types(self, "teacher")


@dataclass(frozen=True)
class DataSection:
    """Image-caption pairs and their train transform (BLIP pretraining, REFERENCE.md 2.3)."""

    manifests: tuple[str, ...] = ()  # jsonl manifests or webdataset shard dirs
    weights: tuple[float, ...] = ()  # sampling weight per manifest; () = by size (concatenation)
    # Build `dlip data synth` output here if absent and train on its manifest.jsonl;
    # images are rendered at the student's image size.
    synth_dir: str | None = None
    synth_images: int = 1000  # images `synth_dir` is built with
    batch_size: int = 75  # per process; BLIP's 75 per GPU
    num_workers: int = 4
    max_words: int = 30  # pre_caption word limit
    max_length: int = 30  # tokens (BLIP pretrains at 30; the model's max_text_length is for eval)
    min_scale: float = 0.2  # RandomResizedCrop scale lower bound (0.2 pretrain, 0.5 finetune)
    hflip: bool = True  # RandomHorizontalFlip (off where captions say left/right)
    rand_augment: bool = True  # BLIP's RandomAugment(N=2, M=5)

    def __post_init__(self) -> None:
        _check_types(self, "data")
        if self.weights and len(self.weights) != len(self.manifests):
            raise ConfigError(
                f"data.weights has {len(self.weights)} entries for "
                f"{len(self.manifests)} data.manifests; give one per manifest or none"
            )
        for w in self.weights:
            _require(w > 0 and math.isfinite(w), "data.weights", self.weights, "all > 0")
        for name in ("synth_images", "batch_size", "max_words", "max_length"):
            _require(getattr(self, name) >= 1, f"data.{name}", getattr(self, name), ">= 1")
        _require(self.num_workers >= 0, "data.num_workers", self.num_workers, ">= 0")
        _require(0 < self.min_scale <= 1, "data.min_scale", self.min_scale, "in (0, 1]")


@dataclass(frozen=True)
class LossSection:
    """Objective weights (0 = off); the weighted total is summed in the training step."""

    itc: float = 1.0  # loss_itc (BLIP sums the three with equal weights)
    itm: float = 1.0  # loss_itm
    lm: float = 1.0  # loss_lm
    itm_all_ranks: bool = False  # hard negatives from all ranks (BLIP: retrieval on, pretrain off)
    momentum_distill: bool = True  # BLIP's momentum encoder + feature queue + soft ITC targets
    queue_size: int = 57600
    alpha: float = 0.4  # soft-target share, ramped from 0 over the first epoch as BLIP
    momentum: float = 0.995  # EMA of the momentum encoder
    kd: KDConfig = field(default_factory=KDConfig)  # distillation terms (no teacher: all 0)

    def __post_init__(self) -> None:
        _check_types(self, "loss")
        for name in ("itc", "itm", "lm"):
            value = getattr(self, name)
            _require(0 <= value < math.inf, f"loss.{name}", value, "a finite number >= 0")
        _require(self.queue_size >= 0, "loss.queue_size", self.queue_size, ">= 0")
        _require(0 <= self.alpha <= 1, "loss.alpha", self.alpha, "in [0, 1]")
        _require(0 < self.momentum < 1, "loss.momentum", self.momentum, "in (0, 1)")

    def kd_config(self) -> KDConfig:
        return self.kd


@dataclass(frozen=True)
class OptimSection:
    """AdamW (no decay on norms, biases, embeddings) with warmup then cosine or step decay."""

    lr: float = 3e-4  # BLIP init_lr
    min_lr: float = 1e-6  # floor of both schedules
    warmup_lr: float = 1e-6  # linear warmup starts here
    warmup_steps: int = 3000  # optimizer steps
    weight_decay: float = 0.05
    # "cosine": lr -> min_lr over the run; "cosine_epoch": BLIP finetuning's cosine by epoch;
    # "step": BLIP's max(min_lr, lr * decay_rate**epoch)
    schedule: Literal["cosine", "cosine_epoch", "step"] = "step"
    decay_rate: float = 0.9  # "step" only
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    grad_clip: float | None = None  # max global grad norm; None = off (BLIP does not clip)
    # Micro-batches per optimizer step. Contrastive negatives and ITM hard negatives stay
    # those of one micro-batch: accumulation grows the batch for the gradient, not for ITC.
    accum_steps: int = 1

    def __post_init__(self) -> None:
        _check_types(self, "optim")
        _require(self.lr > 0, "optim.lr", self.lr, "> 0")
        _require(0 <= self.min_lr <= self.lr, "optim.min_lr", self.min_lr, "in [0, optim.lr]")
        _require(self.warmup_lr >= 0, "optim.warmup_lr", self.warmup_lr, ">= 0")
        _require(self.warmup_steps >= 0, "optim.warmup_steps", self.warmup_steps, ">= 0")
        _require(self.weight_decay >= 0, "optim.weight_decay", self.weight_decay, ">= 0")
        _require(0 < self.decay_rate <= 1, "optim.decay_rate", self.decay_rate, "in (0, 1]")
        _require(all(0 <= b < 1 for b in self.betas), "optim.betas", self.betas, "in [0, 1)")
        _require(self.eps > 0, "optim.eps", self.eps, "> 0")
        if self.grad_clip is not None:
            _require(self.grad_clip > 0, "optim.grad_clip", self.grad_clip, "> 0 or null")
        _require(self.accum_steps >= 1, "optim.accum_steps", self.accum_steps, ">= 1")


@dataclass(frozen=True)
class RunSection:
    """Where the run writes, how long it runs, and how it logs and checkpoints."""

    run_dir: str = "runs/pretrain"
    max_steps: int | None = None  # optimizer steps; None = `epochs` full epochs
    epochs: int = 20  # BLIP max_epoch; also the "step" schedule's epoch count
    log_every: int = 50  # optimizer steps between metrics.jsonl rows
    ckpt_every: int = 1000  # optimizer steps between checkpoints/step_N
    keep_last: int = 3  # step checkpoints kept (final/ is always written)
    seed: int = 42  # BLIP's; each rank offsets it by its rank
    bf16: bool = True  # autocast on GPU (CPU runs stay fp32)
    compile: bool = False  # torch.compile the student (opt-in)
    device: Literal["auto", "cpu", "cuda"] = "auto"  # auto: cuda when available

    def __post_init__(self) -> None:
        _check_types(self, "run")
        if self.max_steps is not None:
            _require(self.max_steps >= 1, "run.max_steps", self.max_steps, ">= 1 or null")
        for name in ("epochs", "log_every", "ckpt_every", "keep_last"):
            _require(getattr(self, name) >= 1, f"run.{name}", getattr(self, name), ">= 1")
        _require(self.seed >= 0, "run.seed", self.seed, ">= 0")


@dataclass(frozen=True)
class PretrainConfig:
    """One pretraining run: student, teacher, data, objectives, optimizer and run settings."""

    model: ModelSection = field(default_factory=ModelSection)
    teacher: TeacherSection = field(default_factory=TeacherSection)
    data: DataSection = field(default_factory=DataSection)
    loss: LossSection = field(default_factory=LossSection)
    optim: OptimSection = field(default_factory=OptimSection)
    run: RunSection = field(default_factory=RunSection)

    def kd_config(self) -> KDConfig:
        return self.loss.kd_config()

    def model_config(self) -> ModelConfig:
        return self.model.model_config()

    def to_dict(self) -> dict[str, Any]:
        """Plain YAML-safe data (tuples become lists); `from_dict` turns it back."""
        return _plain(dataclasses.asdict(self))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = "config") -> PretrainConfig:
        """Defaults <- `data` (a nested diff); unknown keys and wrong types are errors."""
        merged = _merge(cls, _plain(dataclasses.asdict(cls())), data, "", source)
        return _build(cls, merged, "")

    def validate(self) -> PretrainConfig:
        """Checks across fields and sections; raises one ConfigError listing every problem."""
        errors = []
        d, loss = self.data, self.loss
        kd = loss.kd
        if not d.manifests and d.synth_dir is None:
            errors.append("no training data: set data.manifests or data.synth_dir")
        if kd.enabled and not self.teacher.checkpoint:
            errors.append(
                f"kd weights set but teacher.checkpoint is empty (enabled: {list(kd.enabled)}); "
                "give teacher.checkpoint=DIR or set the kd weights to 0"
            )
        if self.model.init == "inherit" and not self.teacher.checkpoint:
            errors.append("model.init=inherit needs teacher.checkpoint")
        itm_on = loss.itm > 0 or kd.weight("kd_itm") > 0
        if itm_on and d.batch_size < 2:
            errors.append(
                f"data.batch_size={d.batch_size}: ITM needs >= 2 (a hard negative per sample)"
            )
        if loss.momentum_distill and loss.queue_size <= 0:
            errors.append("loss.queue_size must be > 0 when loss.momentum_distill is on")
        if loss.itc + loss.itm + loss.lm == 0 and not kd.enabled:
            errors.append("every loss weight is 0: nothing to train")
        try:
            student = self.model_config()
        except ConfigError as err:
            errors.append(str(err))
        else:
            limit = student.text.max_position_embeddings
            if d.max_length > limit:
                errors.append(
                    f"data.max_length={d.max_length} exceeds the student's "
                    f"text.max_position_embeddings {limit}"
                )
        if errors:
            raise ConfigError("invalid pretraining config:\n  " + "\n  ".join(errors))
        return self


# ------------------------------------------------------------------------------ load and save
def load(
    path: str | Path | None = None,
    overrides: Sequence[str] = (),
    validate: bool = True,
    cls: type = PretrainConfig,
) -> Any:
    """Defaults <- yaml at `path` (if any) <- `key=value` overrides, then `validate()`.
    `cls`: the config dataclass (PretrainConfig, or dlip.train.finetune_config.FinetuneConfig)."""
    data: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        source = str(path)
        try:
            loaded = yaml.load(Path(path).read_text(), Loader=_Loader)
        except FileNotFoundError:
            raise ConfigError(f"config not found: {path}") from None
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: not valid YAML ({err})") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{path}: expected a mapping, got {type(loaded).__name__}")
        data = loaded or {}
    merged = _merge(cls, _plain(dataclasses.asdict(cls())), data, "", source)
    for item in overrides:
        key, value = parse_override(item)
        merged = _merge(cls, merged, _nest(key, value), "", f"override {item!r}")
    config = _build(cls, merged, "")
    return config.validate() if validate else config


def parse_override(item: str) -> tuple[str, Any]:
    """`"optim.lr=1e-4"` -> ("optim.lr", 1e-4); the value is parsed as YAML, aliases expanded."""
    key, sep, text = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"override {item!r} is not key=value (e.g. optim.lr=1e-4)")
    try:
        value = yaml.load(text, Loader=_Loader) if text.strip() else None
    except yaml.YAMLError as err:
        raise ConfigError(f"override {item!r}: value is not valid YAML ({err})") from None
    return ALIASES.get(key, key), value


def save_resolved(config: Any, run_dir: str | Path) -> Path:
    """Write `run_dir/config.yaml`: every field, so `load` of it gives back an equal config."""
    text = yaml.safe_dump(_plain(dataclasses.asdict(config)), sort_keys=False)
    return atomic_write_text(Path(run_dir) / RESOLVED_NAME, text)


class _Loader(yaml.SafeLoader):
    """SafeLoader that reads 1e-4 as a float (YAML 1.1, hence PyYAML, needs a dot: 1.0e-4)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
        |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
        |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
        re.X,
    ),
    list("-+0123456789."),
)


# ------------------------------------------------------------------------------------ helpers
def _nest(key: str, value: Any) -> dict[str, Any]:
    parts = key.split(".")
    if any(not p for p in parts):
        raise ConfigError(f"override key {key!r} has an empty part")
    out: dict[str, Any] = {parts[-1]: value}
    for part in reversed(parts[:-1]):
        out = {part: out}
    return out


def _fields(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _merge(cls: type, base: dict, update: Any, prefix: str, source: str) -> dict[str, Any]:
    """`base` (a full plain dict of `cls`) updated by the diff `update`, keys checked."""
    where = prefix.rstrip(".") or "top level"
    if not isinstance(update, Mapping):
        raise ConfigError(f"{source}: {where} must be a mapping, got {update!r}")
    hints = _fields(cls)
    out = dict(base)
    for key, value in update.items():
        if key not in hints:
            raise ConfigError(
                f"{source}: unknown key '{prefix}{key}'; valid keys at {where}: {sorted(hints)}"
            )
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            out[key] = _merge(tp, base[key], value, f"{prefix}{key}.", source)
        elif _is_mapping(tp) and isinstance(value, Mapping) and isinstance(base[key], Mapping):
            out[key] = _deep_merge(base[key], value)
        else:
            out[key] = value
    return out


def _build(cls: type, data: dict[str, Any], prefix: str) -> Any:
    """Construct `cls` from a full plain dict: sections recursively, YAML lists as tuples."""
    kwargs = {}
    for name, tp in _fields(cls).items():
        value = data[name]
        if dataclasses.is_dataclass(tp):
            kwargs[name] = _build(tp, value, f"{prefix}{name}.")
        else:
            kwargs[name] = _coerce(tp, value)
    if cls is KDConfig:  # not ours: check its field types here, name its errors' section
        section = prefix.rstrip(".")
        for name, tp in _fields(cls).items():
            if not _type_ok(tp, kwargs[name]):
                raise ConfigError(f"{section}.{name}={kwargs[name]!r} is not {_describe(tp)}")
        try:
            return cls(**kwargs)
        except ValueError as err:
            raise ConfigError(f"{section}: {err}") from None
    return cls(**kwargs)


def _coerce(tp: Any, value: Any) -> Any:
    """YAML -> field type where lossless: a list for a tuple field, an int for a float."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            if arg is not type(None) and value is not None:
                coerced = _coerce(arg, value)
                if _type_ok(arg, coerced):
                    return coerced
        return value
    if origin is tuple and isinstance(value, list):
        args = typing.get_args(tp)
        items = args[:1] * len(value) if len(args) == 2 and args[1] is Ellipsis else args
        if len(items) == len(value):
            return tuple(_coerce(a, v) for a, v in zip(items, value, strict=True))
        return tuple(value)
    if origin in (dict, Mapping) and isinstance(value, Mapping):
        return {k: _coerce(typing.get_args(tp)[1], v) for k, v in value.items()}
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return value


def _is_mapping(tp: Any) -> bool:
    return typing.get_origin(tp) in (dict, Mapping)


def _describe(tp: Any) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in args)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin in (dict, Mapping):
        return f"a mapping of {_describe(args[0])} to {_describe(args[1])}"
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return f"a list of {_describe(args[0])}"
        return f"a list of {len(args)} ({', '.join(_describe(a) for a in args)})"
    if origin in (list, Sequence):
        return f"a list of {_describe(args[0])}"
    names = {type(None): "null", bool: "a bool", int: "an int", float: "a float", str: "a str"}
    return names.get(tp, "anything" if tp is Any else getattr(tp, "__name__", str(tp)))


def _check_types(obj: Any, section: str) -> None:
    for name, tp in _fields(type(obj)).items():
        value = getattr(obj, name)
        if not _type_ok(tp, value):
            raise ConfigError(f"{section}.{name}={value!r} is not {_describe(tp)}")


def _require(ok: bool, key: str, value: Any, rule: str) -> None:
    if not ok:
        raise ConfigError(f"{key}={value!r} must be {rule}")


def _deep_merge(base: Mapping[str, Any], update: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def _plain(value: Any) -> Any:
    """Tuples -> lists and Mappings -> dicts, recursively (what yaml.safe_dump can write)."""
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


__all__ = [
    "ALIASES",
    "KD_TERMS",
    "DataSection",
    "LossSection",
    "ModelSection",
    "OptimSection",
    "PretrainConfig",
    "RunSection",
    "TeacherSection",
    "load",
    "parse_override",
    "save_resolved",
]
