"""Finetuning run configuration (`dlip finetune retrieval|caption`): sections and defaults.

The same machinery as pretraining (dlip.train.config: yaml diff <- `key=value` overrides,
unknown keys and wrong types are errors naming the dotted key), with BLIP's finetuning recipe
as the defaults (REFERENCE.md 2.4: lr 1e-5, weight decay 0.05, cosine by epoch to 0, no
warmup, 384 px from a 224 px checkpoint, batch 32, 6 epochs retrieval / 5 captioning).

    cfg = load("configs/finetune/retrieval_coco.yaml", ["model.checkpoint=runs/pre/final"],
               cls=FinetuneConfig)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from dlip.config import ConfigError, ModelConfig
from dlip.losses.adapters import KDConfig
from dlip.train.config import (
    LossSection,
    OptimSection,
    RunSection,
    TeacherSection,
    _check_types,
    _require,
)

TASKS = ("retrieval", "caption")


@dataclass(frozen=True)
class FTModelSection:
    """The model to finetune: a saved dlip model (pretraining's final/), or a preset."""

    checkpoint: str | None = None  # a `dlip.load`-able directory
    preset: str | None = None  # random init of a preset (tests, ablations); not with checkpoint
    image_size: int | None = None  # finetune at this size (BLIP 384); pos_embed is resized
    grad_checkpointing: bool = False

    def __post_init__(self) -> None:
        _check_types(self, "model")
        if self.image_size is not None:
            _require(self.image_size > 0, "model.image_size", self.image_size, "> 0")

    def model_config(self) -> ModelConfig:
        """The config the finetuned model will have (image size applied)."""
        from dlip.models.io import CONFIG_FILE
        from dlip.models.presets import get_config

        if self.checkpoint:
            config = ModelConfig.load(Path(self.checkpoint) / CONFIG_FILE)
        else:
            config = get_config(str(self.preset))
        return config if self.image_size is None else config.with_image_size(self.image_size)


@dataclass(frozen=True)
class FTDataSection:
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
        _check_types(self, "data")
        for name in ("synth_images", "batch_size", "max_words", "max_length"):
            _require(getattr(self, name) >= 1, f"data.{name}", getattr(self, name), ">= 1")
        _require(self.num_workers >= 0, "data.num_workers", self.num_workers, ">= 0")
        _require(0 < self.min_scale <= 1, "data.min_scale", self.min_scale, "in (0, 1]")

    def files(self) -> tuple[tuple[str, ...], str | None, str | None, str | None]:
        """(train files, val, test, image root), the synthetic set's when `synth_dir` is set."""
        if self.synth_dir is None:
            return self.train, self.val, self.test, self.image_root
        root = Path(self.synth_dir)
        return (
            (str(root / "train.json"),),
            str(root / "val.json"),
            str(root / "test.json"),
            str(root),
        )


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
        _check_types(self, "eval")
        for name in ("every_epochs", "batch_size", "k_test", "itm_batch", "num_beams"):
            _require(getattr(self, name) >= 1, f"eval.{name}", getattr(self, name), ">= 1")
        _require(self.min_length <= self.max_length, "eval.min_length", self.min_length, "<= max")


@dataclass(frozen=True)
class FTLossSection(LossSection):
    """BLIP retrieval: ITC with momentum distillation + ITM with negatives from all ranks."""

    itm_all_ranks: bool = True  # BLIP COCO's negative_all_rank (Flickr: False)


@dataclass(frozen=True)
class FTOptimSection(OptimSection):
    lr: float = 1e-5
    min_lr: float = 0.0
    warmup_steps: int = 0
    schedule: Literal["cosine", "cosine_epoch", "step"] = "cosine_epoch"


@dataclass(frozen=True)
class FTRunSection(RunSection):
    run_dir: str = "runs/finetune"
    epochs: int = 6


@dataclass(frozen=True)
class FinetuneConfig:
    """One finetuning run: the task, model, optional finetuned teacher, data, losses, eval."""

    task: Literal["retrieval", "caption"] = "retrieval"
    model: FTModelSection = field(default_factory=FTModelSection)
    teacher: TeacherSection = field(default_factory=TeacherSection)
    data: FTDataSection = field(default_factory=FTDataSection)
    loss: FTLossSection = field(default_factory=FTLossSection)
    optim: FTOptimSection = field(default_factory=FTOptimSection)
    eval: EvalSection = field(default_factory=EvalSection)
    run: FTRunSection = field(default_factory=FTRunSection)

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


def _missing_files(d: FTDataSection) -> list[str]:
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


__all__ = ["TASKS", "EvalSection", "FTDataSection", "FTModelSection", "FinetuneConfig"]
