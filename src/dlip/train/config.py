"""Run configuration of `dlip pretrain` and `dlip finetune`: the sections and their defaults.

    cfg = load("configs/pretrain/tiny_synth.yaml", ["teacher.checkpoint=runs/t/final"])
    cfg = load("configs/finetune/retrieval_coco.yaml", ["model.checkpoint=DIR"], cls=FinetuneConfig)
    save_resolved(cfg, cfg.run.run_dir)  # run_dir/config.yaml, loads back to `cfg`

The sections are in dlip.train.sections. The engine (yaml diff <- `key=value` overrides,
unknown keys and wrong types are errors naming the dotted key) is `dlip.config`;
`run_dir=DIR` and `max_steps=N` are command-line shortcuts for `run.run_dir` and
`run.max_steps`. `validate()` (run by `load`) checks what spans fields, before step 1.

Defaults are BLIP's recipes (salesforce/BLIP configs/pretrain.yaml; configs/retrieval_coco.yaml
and caption_coco.yaml for finetuning): pretraining AdamW lr 3e-4 with warmup and a step decay
of 0.9 per epoch, batch 75 per GPU, 20 epochs; finetuning lr 1e-5, weight decay 0.05, cosine by
epoch to 0, no warmup, 384 px from a 224 px checkpoint, batch 32, 6 epochs retrieval / 5
captioning.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from dlip import config as engine
from dlip.config import ConfigError, save_resolved
from dlip.losses.adapters import KDConfig
from dlip.models.config import ModelConfig
from dlip.train.sections import (
    DataSection,
    EvalSection,
    FinetuneDataSection,
    FinetuneModelSection,
    LossSection,
    ModelSection,
    OptimSection,
    RunSection,
    TeacherSection,
)

# Command-line shortcuts (issue 4's command forms) -> full dotted keys.
ALIASES = {"run_dir": "run.run_dir", "max_steps": "run.max_steps"}
TASKS = ("retrieval", "caption", "vqa")


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
        for key, init in (("init", self.model.init), ("init_text", self.model.init_text)):
            if init is not None and init.startswith("inherit") and not self.teacher.checkpoint:
                errors.append(f"model.{key}={init} needs teacher.checkpoint")
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


# ----------------------------------------------------------------------------------- finetuning
# BLIP's finetuning optimizer: lr 1e-5, cosine by epoch to 0, no warmup.
FINETUNE_OPTIM = OptimSection(lr=1e-5, min_lr=0.0, warmup_steps=0, schedule="cosine_epoch")


@dataclass(frozen=True)
class FinetuneConfig:
    """One finetuning run: the task, model, optional finetuned teacher, data, losses, eval."""

    task: Literal["retrieval", "caption", "vqa"] = "retrieval"
    model: FinetuneModelSection = field(default_factory=FinetuneModelSection)
    teacher: TeacherSection = field(default_factory=TeacherSection)
    data: FinetuneDataSection = field(default_factory=FinetuneDataSection)
    # BLIP retrieval: ITM negatives from all ranks (COCO's negative_all_rank; Flickr: False);
    # the momentum-distillation alpha ramps over the first epoch (train_retrieval.py).
    loss: LossSection = field(
        default_factory=lambda: LossSection(itm_all_ranks=True, alpha_ramp_epochs=1.0)
    )
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
        return {"retrieval": ("itc", "itm"), "caption": ("lm",), "vqa": ("vqa",)}[self.task]

    def validate(self) -> FinetuneConfig:
        """Checks across fields; one ConfigError listing every problem, before step 1."""
        errors = []
        m, d, kd = self.model, self.data, self.loss.kd
        if bool(m.checkpoint) == bool(m.preset):
            errors.append("set exactly one of model.checkpoint (a saved model) and model.preset")
        elif m.checkpoint and not Path(m.checkpoint).is_dir():
            errors.append(f"model.checkpoint={m.checkpoint!r} is not a directory")
        train, val, _, _ = d.files(self.task == "vqa")
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
        if self.task == "vqa":
            errors += self._vqa_errors()
        if not errors:
            try:
                self._check_model(self.model_config())
            except (ConfigError, FileNotFoundError) as err:
                errors.append(str(err))
        if errors:
            raise ConfigError("invalid finetuning config:\n  " + "\n  ".join(errors))
        return self

    def _vqa_errors(self) -> list[str]:
        errors = []
        if self.loss.vqa <= 0:
            errors.append("vqa finetuning with loss.vqa=0 trains nothing")
        answers = self.data.answers_file()
        if self.eval.vqa_mode == "rank" and answers is None:
            errors.append("eval.vqa_mode=rank needs data.answer_list (BLIP's answer_list.json)")
        elif self.data.synth_dir is None and answers and not Path(answers).is_file():
            errors.append(f"data.answer_list: {answers} not found")
        if self.data.vg_root is not None and not Path(self.data.vg_root).is_dir():
            errors.append(f"data.vg_root: {self.data.vg_root} is not a directory")
        return errors

    def _check_model(self, config: ModelConfig) -> None:
        if self.task == "vqa":
            if not (config.has_encoder and config.has_decoder):
                raise ConfigError(
                    "vqa finetuning needs a model with both text towers (a pretraining "
                    "checkpoint or preset, or a VQA model)"
                )
        else:
            need = "has_itc" if self.task == "retrieval" else "has_decoder"
            if not getattr(config, need) or config.vqa:
                raise ConfigError(
                    f"{self.task} finetuning needs a model with "
                    f"{'has_encoder' if need == 'has_itc' else need}=True (not a VQA model)"
                )
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
