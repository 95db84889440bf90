"""Run configuration of `dlip pretrain` and `dlip finetune`: the sections and their defaults.

    cfg = load("configs/pretrain/tiny_synth.yaml", ["teacher.checkpoint=runs/t/final"])
    cfg = load("configs/finetune/retrieval_coco.yaml", ["model.checkpoint=DIR"], cls=FinetuneConfig)
    save_resolved(cfg, cfg.run.run_dir)  # run_dir/config.yaml, loads back to `cfg`

The engine (yaml diff <- `key=value` overrides, unknown keys and wrong types are errors naming
the dotted key) is `dlip.config`; `run_dir=DIR` and `max_steps=N` are command-line shortcuts
for `run.run_dir` and `run.max_steps`. `validate()` (run by `load`) checks what spans fields,
before step 1.

Defaults are BLIP's recipes (salesforce/BLIP configs/pretrain.yaml; configs/retrieval_coco.yaml
and caption_coco.yaml for finetuning): pretraining AdamW lr 3e-4 with warmup and a step decay
of 0.9 per epoch, batch 75 per GPU, 20 epochs; finetuning lr 1e-5, weight decay 0.05, cosine by
epoch to 0, no warmup, 384 px from a 224 px checkpoint, batch 32, 6 epochs retrieval / 5
captioning.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from dlip import config as engine
from dlip.config import ConfigError, check_types, deep_merge, require, save_resolved
from dlip.losses.adapters import KDConfig
from dlip.models.config import ModelConfig

# Command-line shortcuts (issue 4's command forms) -> full dotted keys.
ALIASES = {"run_dir": "run.run_dir", "max_steps": "run.max_steps"}
TASKS = ("retrieval", "caption")


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
        check_types(self, "model")
        if self.image_size is not None:
            require(self.image_size > 0, "model.image_size", self.image_size, "> 0")
        if self.temp_init is not None:
            require(0.001 <= self.temp_init <= 0.5, "model.temp_init", self.temp_init,
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
            merged = deep_merge(base.to_dict(), self.arch)
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
        check_types(self, "teacher")


@dataclass(frozen=True)
class DataSection:
    """Image-caption pairs and their train transform (BLIP pretraining: configs/pretrain.yaml)."""

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
        _check_loader_fields(self)
        if self.weights and len(self.weights) != len(self.manifests):
            raise ConfigError(
                f"data.weights has {len(self.weights)} entries for "
                f"{len(self.manifests)} data.manifests; give one per manifest or none"
            )
        for w in self.weights:
            require(w > 0 and math.isfinite(w), "data.weights", self.weights, "all > 0")


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
        check_types(self, "loss")
        for name in ("itc", "itm", "lm"):
            value = getattr(self, name)
            require(0 <= value < math.inf, f"loss.{name}", value, "a finite number >= 0")
        require(self.queue_size >= 0, "loss.queue_size", self.queue_size, ">= 0")
        require(0 <= self.alpha <= 1, "loss.alpha", self.alpha, "in [0, 1]")
        require(0 < self.momentum < 1, "loss.momentum", self.momentum, "in (0, 1)")

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
        check_types(self, "optim")
        require(self.lr > 0, "optim.lr", self.lr, "> 0")
        require(0 <= self.min_lr <= self.lr, "optim.min_lr", self.min_lr, "in [0, optim.lr]")
        require(self.warmup_lr >= 0, "optim.warmup_lr", self.warmup_lr, ">= 0")
        require(self.warmup_steps >= 0, "optim.warmup_steps", self.warmup_steps, ">= 0")
        require(self.weight_decay >= 0, "optim.weight_decay", self.weight_decay, ">= 0")
        require(0 < self.decay_rate <= 1, "optim.decay_rate", self.decay_rate, "in (0, 1]")
        require(all(0 <= b < 1 for b in self.betas), "optim.betas", self.betas, "in [0, 1)")
        require(self.eps > 0, "optim.eps", self.eps, "> 0")
        if self.grad_clip is not None:
            require(self.grad_clip > 0, "optim.grad_clip", self.grad_clip, "> 0 or null")
        require(self.accum_steps >= 1, "optim.accum_steps", self.accum_steps, ">= 1")


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
    overwrite: bool = False  # a fresh run may replace another run's files in run_dir
    device: Literal["auto", "cpu", "cuda"] = "auto"  # auto: cuda when available

    def __post_init__(self) -> None:
        check_types(self, "run")
        if self.max_steps is not None:
            require(self.max_steps >= 1, "run.max_steps", self.max_steps, ">= 1 or null")
        for name in ("epochs", "log_every", "ckpt_every", "keep_last"):
            require(getattr(self, name) >= 1, f"run.{name}", getattr(self, name), ">= 1")
        require(self.seed >= 0, "run.seed", self.seed, ">= 0")


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
        return engine.to_plain(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "config") -> PretrainConfig:
        """Defaults <- `data` (a nested diff); unknown keys and wrong types are errors."""
        return engine.build(cls, data, source)

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


def _check_loader_fields(data: Any) -> None:
    """The checks pretraining's and finetuning's data sections share."""
    check_types(data, "data")
    for name in ("synth_images", "batch_size", "max_words", "max_length"):
        require(getattr(data, name) >= 1, f"data.{name}", getattr(data, name), ">= 1")
    require(data.num_workers >= 0, "data.num_workers", data.num_workers, ">= 0")
    require(0 < data.min_scale <= 1, "data.min_scale", data.min_scale, "in (0, 1]")


# ----------------------------------------------------------------------------------- finetuning
@dataclass(frozen=True)
class FinetuneModelSection:
    """The model to finetune: a saved dlip model (pretraining's final/), or a preset."""

    checkpoint: str | None = None  # a `dlip.load`-able directory
    preset: str | None = None  # random init of a preset (tests, ablations); not with checkpoint
    image_size: int | None = None  # finetune at this size (BLIP 384); pos_embed is resized
    grad_checkpointing: bool = False

    def __post_init__(self) -> None:
        check_types(self, "model")
        if self.image_size is not None:
            require(self.image_size > 0, "model.image_size", self.image_size, "> 0")

    def model_config(self) -> ModelConfig:
        """The config the finetuned model will have (image size applied)."""
        from dlip.models.io import resolve_config

        config = resolve_config(str(self.checkpoint or self.preset))
        return config if self.image_size is None else config.with_image_size(self.image_size)


@dataclass(frozen=True)
class FinetuneDataSection:
    """Karpathy splits: train (json or manifest jsonl), val for model selection, test at the end."""

    # Karpathy train json(s) (paths under `image_root`) or manifests from `dlip data build`.
    train: tuple[str, ...] = ()
    val: str | None = None  # Karpathy val json: validated every `eval.every_epochs`
    test: str | None = None  # Karpathy test json: the best checkpoint is evaluated on it at the end
    image_root: str | None = None  # root the json image paths are under
    # `dlip data synth` output (train/val/test json + images), built here if absent.
    synth_dir: str | None = None
    synth_images: int = 1000
    image_size_synth: int | None = None  # render size; None = the model's
    batch_size: int = 32  # per process (BLIP's retrieval and caption recipes)
    num_workers: int = 4
    max_words: int = 30  # pre_caption word limit
    max_length: int = 35  # tokens (BLIP's retrieval text length; captions are shorter)
    min_scale: float = 0.5  # RandomResizedCrop lower bound in finetuning
    hflip: bool = True
    rand_augment: bool = True

    def __post_init__(self) -> None:
        _check_loader_fields(self)

    def files(self) -> tuple[tuple[str, ...], str | None, str | None, str | None]:
        """(train files, val, test, image root), the synthetic set's when `synth_dir` is set."""
        if self.synth_dir is None:
            return self.train, self.val, self.test, self.image_root
        root = Path(self.synth_dir)
        files = (str(root / "train.json"),)
        return files, str(root / "val.json"), str(root / "test.json"), str(root)


@dataclass(frozen=True)
class EvalSection:
    """Validation during finetuning (and the final test run): the `dlip eval` settings."""

    every_epochs: int = 1  # validate after every N epochs (and after the last step)
    batch_size: int = 64
    k_test: int = 256  # retrieval: candidates re-ranked by ITM (BLIP: 256 COCO, 128 Flickr)
    itm_batch: int = 128  # retrieval: pairs per ITM forward
    prompt: str = "a picture of "  # captioning: trained with it (masked) and generated with it
    num_beams: int = 3
    max_length: int = 20  # generation lengths count the prompt tokens (BLIP)
    min_length: int = 5

    def __post_init__(self) -> None:
        check_types(self, "eval")
        for name in ("every_epochs", "batch_size", "k_test", "itm_batch", "num_beams"):
            require(getattr(self, name) >= 1, f"eval.{name}", getattr(self, name), ">= 1")
        require(self.min_length <= self.max_length, "eval.min_length", self.min_length, "<= max")


# BLIP's finetuning optimizer: lr 1e-5, cosine by epoch to 0, no warmup.
FINETUNE_OPTIM = OptimSection(lr=1e-5, min_lr=0.0, warmup_steps=0, schedule="cosine_epoch")


@dataclass(frozen=True)
class FinetuneConfig:
    """One finetuning run: the task, model, optional finetuned teacher, data, losses, eval."""

    task: Literal["retrieval", "caption"] = "retrieval"
    model: FinetuneModelSection = field(default_factory=FinetuneModelSection)
    teacher: TeacherSection = field(default_factory=TeacherSection)
    data: FinetuneDataSection = field(default_factory=FinetuneDataSection)
    # BLIP retrieval: ITM negatives from all ranks (COCO's negative_all_rank; Flickr: False).
    loss: LossSection = field(default_factory=lambda: LossSection(itm_all_ranks=True))
    optim: OptimSection = field(default_factory=lambda: FINETUNE_OPTIM)
    eval: EvalSection = field(default_factory=EvalSection)
    run: RunSection = field(default_factory=lambda: RunSection("runs/finetune", epochs=6))

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ConfigError(f"task={self.task!r}: use one of {list(TASKS)}")

    def kd_config(self) -> KDConfig:
        return self.loss.kd_config()

    def model_config(self) -> ModelConfig:
        return self.model.model_config()

    @property
    def objectives(self) -> tuple[str, ...]:
        return ("itc", "itm") if self.task == "retrieval" else ("lm",)

    def validate(self) -> FinetuneConfig:
        """Checks across fields; one ConfigError listing every problem, before step 1."""
        errors = []
        m, d, kd = self.model, self.data, self.loss.kd
        if bool(m.checkpoint) == bool(m.preset):
            errors.append("set exactly one of model.checkpoint (a saved model) and model.preset")
        elif m.checkpoint and not Path(m.checkpoint).is_dir():
            errors.append(f"model.checkpoint={m.checkpoint!r} is not a directory")
        train, val, _, _ = d.files()
        if not train:
            errors.append("no training data: set data.train (or data.synth_dir)")
        if val is None:
            errors.append("no validation split: set data.val (model selection needs it)")
        if d.synth_dir is None:  # synthetic files are built at the start of the run
            errors += _missing_files(d)
        if kd.enabled and not self.teacher.checkpoint:
            errors.append(f"kd weights set ({list(kd.enabled)}) but teacher.checkpoint is empty")
        if self.task == "retrieval" and d.batch_size < 2:
            errors.append(f"data.batch_size={d.batch_size}: ITM needs >= 2")
        if self.task == "caption" and self.loss.lm <= 0:
            errors.append("caption finetuning with loss.lm=0 trains nothing")
        if self.task == "retrieval" and self.loss.itc + self.loss.itm <= 0:
            errors.append("retrieval finetuning with loss.itc=loss.itm=0 trains nothing")
        if not errors:
            try:
                self._check_model(self.model_config())
            except (ConfigError, FileNotFoundError) as err:
                errors.append(str(err))
        if errors:
            raise ConfigError("invalid finetuning config:\n  " + "\n  ".join(errors))
        return self

    def _check_model(self, config: ModelConfig) -> None:
        need = "has_encoder" if self.task == "retrieval" else "has_decoder"
        if not getattr(config, need):
            raise ConfigError(f"{self.task} finetuning needs a model with {need}=True")
        if self.data.max_length > config.text.max_position_embeddings:
            raise ConfigError(
                f"data.max_length={self.data.max_length} exceeds the model's "
                f"text.max_position_embeddings {config.text.max_position_embeddings}"
            )


def _missing_files(d: FinetuneDataSection) -> list[str]:
    """Errors for data files and the image root that do not exist (before step 1, not after
    an epoch of training)."""
    named = [(f"data.train[{i}]", f) for i, f in enumerate(d.train)]
    named += [("data.val", d.val), ("data.test", d.test)]
    errors = [
        f"{key}: {path} not found" for key, path in named if path and not Path(path).is_file()
    ]
    if d.image_root is not None and not Path(d.image_root).is_dir():
        errors.append(f"data.image_root: {d.image_root} is not a directory")
    return errors


# ------------------------------------------------------------------------------ load and save
def load(
    path: str | Path | None = None,
    overrides: Sequence[str] = (),
    validate: bool = True,
    cls: type = PretrainConfig,
) -> Any:
    """Defaults <- yaml at `path` (if any) <- `key=value` overrides, then `validate()`.
    `cls`: PretrainConfig or FinetuneConfig."""
    return engine.load(cls, path, overrides, validate=validate, aliases=ALIASES)


def parse_override(item: str) -> tuple[str, Any]:
    """`"optim.lr=1e-4"` -> ("optim.lr", 1e-4), with this module's command-line shortcuts."""
    return engine.parse_override(item, ALIASES)


__all__ = [
    "ALIASES",
    "TASKS",
    "DataSection",
    "EvalSection",
    "FinetuneConfig",
    "FinetuneDataSection",
    "FinetuneModelSection",
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
