"""The sections of the run configs (dlip.train.config): frozen dataclasses that check their own
fields' types and ranges, each error naming the dotted key. Defaults are BLIP's recipes
(salesforce/BLIP configs/pretrain.yaml; configs/retrieval_coco.yaml and caption_coco.yaml).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from dlip.config import ConfigError, check_types, deep_merge, require
from dlip.losses.adapters import KDConfig
from dlip.models.config import ModelConfig


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
    # student is shallower); "inherit_pruned": also cut wider teacher tensors to a narrower
    # student (whole heads, leading channels: TinyCLIP's inheritance); "timm:PATH": a
    # timm/DeiT ViT checkpoint file for the vision tower.
    init: str = "random"
    # Per tower: when set, `init` covers the vision tower only and this the rest (text towers,
    # heads): "random", "inherit" or "inherit_pruned"; e.g. init=timm:PATH, init_text=inherit.
    init_text: str | None = None
    # Initial ITC temperature (None: BLIP's 0.07, or what `init` copied). Tiny towers trained
    # from scratch first collapse to identical features; 0.3 halves that plateau (docs/demo.md).
    temp_init: float | None = None
    # Random init of the text encoder's attention value / output projections: N(0, this)
    # instead of BERT's 0.02 (None). Small towers from scratch: ~1/sqrt(width) lets [CLS]
    # depend on the words at step 0 and shortens the ITC plateau (docs/demo.md). Applied
    # before `init`, which overwrites what it copies.
    text_value_output_std: float | None = None
    grad_checkpointing: bool = False  # recompute block activations in backward (both towers)

    def __post_init__(self) -> None:
        check_types(self, "model")
        if self.image_size is not None:
            require(self.image_size > 0, "model.image_size", self.image_size, "> 0")
        if self.temp_init is not None:
            require(0.001 <= self.temp_init <= 0.5, "model.temp_init", self.temp_init,
                     "in [0.001, 0.5] (the clamp of the learnable temperature)")  # fmt: skip
        std = self.text_value_output_std
        require(std is None or 0 < std < 1, "model.text_value_output_std", std, "in (0, 1)")
        inits = ("random", "inherit", "inherit_pruned")
        if self.init_text is not None and self.init_text not in inits:
            raise ConfigError(f"model.init_text={self.init_text!r}: use one of {inits}")
        if self.init not in inits and not re.fullmatch(r"timm:.+", self.init):
            raise ConfigError(
                f"model.init={self.init!r}: use 'random', 'inherit', 'inherit_pruned' or "
                "'timm:PATH' (a timm/DeiT ViT checkpoint file)"
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

    def __post_init__(self) -> None:
        check_types(self, "teacher")


@dataclass(frozen=True)
class DataSection:
    """Image-caption pairs and their train transform (BLIP pretraining: configs/pretrain.yaml)."""

    # jsonl manifests, or webdataset sources: `dlip data shard` dirs, img2dataset webdataset
    # folders, .tar paths / brace patterns, http(s):// and pipe: URLs (dlip.train.wds_loader)
    manifests: tuple[str, ...] = ()
    weights: tuple[float, ...] = ()  # sampling weight per manifest; () = by size (concatenation)
    # Samples per manifest, null where counted (index.json, img2dataset's *_stats.json): a
    # webdataset source that cannot be counted (URLs, pipe:, bare tars) needs its entry.
    num_samples: tuple[int | None, ...] = ()
    # Build `dlip data synth` output here if absent and train on its manifest.jsonl;
    # images are rendered at the student's image size.
    synth_dir: str | None = None
    synth_images: int = 1000  # images `synth_dir` is built with
    batch_size: int = 75  # per process; BLIP's 75 per GPU
    num_workers: int = 4  # DataLoader worker processes per rank (decoding, augmentation)
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
        if self.num_samples and len(self.num_samples) != len(self.manifests):
            raise ConfigError(
                f"data.num_samples has {len(self.num_samples)} entries for "
                f"{len(self.manifests)} data.manifests; give one per manifest (null where "
                "it is counted) or none"
            )
        for n in self.num_samples:
            require(n is None or n >= 1, "data.num_samples", self.num_samples, "all >= 1 or null")


@dataclass(frozen=True)
class LossSection:
    """Objective weights (0 = off); the weighted total is summed in the training step."""

    itc: float = 1.0  # loss_itc (BLIP sums the three with equal weights)
    itm: float = 1.0  # loss_itm
    lm: float = 1.0  # loss_lm
    vqa: float = 1.0  # loss_vqa (VQA finetuning: BLIP's weighted answer loss)
    itm_all_ranks: bool = False  # hard negatives from all ranks (BLIP: retrieval on, pretrain off)
    momentum_distill: bool = True  # BLIP's momentum encoder + feature queue + soft ITC targets
    queue_size: int = 57600  # momentum-feature queue length (BLIP's 57600)
    alpha: float = 0.4  # soft-target share of the momentum-distilled ITC targets
    # epochs over which alpha ramps up from 0: BLIP's pretraining 2 (pretrain.py), its
    # retrieval finetuning 1 (train_retrieval.py); FinetuneConfig's default is 1
    alpha_ramp_epochs: float = 2.0
    momentum: float = 0.995  # EMA of the momentum encoder
    # ITC columns of the batch: False = the online features of every rank (gradient through
    # rows and columns; dlip's default); True = the momentum features, exactly as BLIP
    # (gradient through the rows only). Needs momentum_distill.
    momentum_columns: bool = False
    kd: KDConfig = field(default_factory=KDConfig)  # distillation terms (no teacher: all 0)

    def __post_init__(self) -> None:
        check_types(self, "loss")
        for name in ("itc", "itm", "lm", "vqa"):
            value = getattr(self, name)
            require(0 <= value < math.inf, f"loss.{name}", value, "a finite number >= 0")
        require(self.queue_size >= 0, "loss.queue_size", self.queue_size, ">= 0")
        require(0 <= self.alpha <= 1, "loss.alpha", self.alpha, "in [0, 1]")
        require(0 <= self.alpha_ramp_epochs < math.inf, "loss.alpha_ramp_epochs",
                self.alpha_ramp_epochs, "a finite number >= 0")  # fmt: skip
        require(0 < self.momentum < 1, "loss.momentum", self.momentum, "in (0, 1)")
        require(self.momentum_distill or not self.momentum_columns, "loss.momentum_columns",
                self.momentum_columns, "false unless loss.momentum_distill is on")  # fmt: skip

    def kd_config(self) -> KDConfig:
        return self.kd


@dataclass(frozen=True)
class OptimSection:
    """AdamW (no decay on norms, biases, embeddings) with warmup then cosine or step decay."""

    lr: float = 3e-4  # BLIP init_lr
    min_lr: float = 1e-6  # floor of both schedules
    warmup_lr: float = 1e-6  # linear warmup starts here
    warmup_steps: int = 3000  # optimizer steps
    weight_decay: float = 0.05  # AdamW's, BLIP's 0.05
    # "cosine": lr -> min_lr over the run; "cosine_epoch": BLIP finetuning's cosine by epoch;
    # "step": BLIP's max(min_lr, lr * decay_rate**epoch)
    schedule: Literal["cosine", "cosine_epoch", "step"] = "step"
    decay_rate: float = 0.9  # "step" only
    betas: tuple[float, float] = (0.9, 0.999)  # AdamW's (beta1, beta2)
    eps: float = 1e-8  # AdamW's epsilon
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

    run_dir: str = "runs/pretrain"  # checkpoints, metrics.jsonl, final/ (`run_dir=` for short)
    max_steps: int | None = None  # optimizer steps; None = `epochs` full epochs
    epochs: int = 20  # BLIP max_epoch; also the "step" schedule's epoch count
    log_every: int = 50  # optimizer steps between metrics.jsonl rows
    ckpt_every: int = 1000  # optimizer steps between checkpoints/step_N
    keep_last: int = 3  # step checkpoints kept (final/ is always written)
    seed: int = 42  # BLIP's; each rank offsets it by its rank
    # "auto": bf16 autocast on GPU, fp32 on CPU; "bf16" / "fp16" autocast anywhere (fp16 with a
    # gradient scaler: GPUs without bf16); "fp32". The teacher's weights take the same dtype.
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    compile: bool = False  # torch.compile the student (opt-in)
    overwrite: bool = False  # a fresh run may replace another run's files in run_dir
    device: Literal["auto", "cpu", "cuda"] = "auto"  # auto: cuda when available
    # where metrics go: jsonl (metrics.jsonl, always), tensorboard, wandb (WANDB_MODE=offline
    # writes run_dir/wandb without a network); console output is copied to run_dir/train.log
    report_to: list[str] = field(default_factory=lambda: ["jsonl"])
    wandb_project: str = "dlip"  # the wandb project of report_to: [wandb]

    def __post_init__(self) -> None:
        check_types(self, "run")
        from dlip.train.reporters import REPORTERS, check_report_to

        for name in self.report_to:
            require(name in REPORTERS, "run.report_to", self.report_to, f"names from {REPORTERS}")
        check_report_to(self.report_to)
        if self.max_steps is not None:
            require(self.max_steps >= 1, "run.max_steps", self.max_steps, ">= 1 or null")
        for name in ("epochs", "log_every", "ckpt_every", "keep_last"):
            require(getattr(self, name) >= 1, f"run.{name}", getattr(self, name), ">= 1")
        require(self.seed >= 0, "run.seed", self.seed, ">= 0")


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
    """Karpathy splits: train (json or manifest jsonl), val for model selection, test at the end.
    VQA: BLIP's vqa_*.json / vg_qa.json or `dlip data build vqa` jsonl, and the answer list."""

    # Karpathy train json(s) (paths under `image_root`) or manifests from `dlip data build`.
    train: tuple[str, ...] = ()
    val: str | None = None  # Karpathy val json: validated every `eval.every_epochs`
    test: str | None = None  # Karpathy test json: the best checkpoint is evaluated on it at the end
    image_root: str | None = None  # root the json image paths are under (VQA: COCO's)
    vg_root: str | None = None  # VQA: Visual Genome image root of BLIP's vg_qa.json rows
    answer_list: str | None = None  # VQA: BLIP's answer_list.json, the rank-mode candidates
    # `dlip data synth` output (train/val/test json + images), built here if absent.
    synth_dir: str | None = None
    synth_images: int = 1000
    image_size_synth: int | None = None  # render size; None = the model's
    batch_size: int = 32  # per process (BLIP's retrieval and caption recipes)
    num_workers: int = 4  # DataLoader worker processes per rank (decoding, augmentation)
    max_words: int = 30  # pre_caption word limit
    max_length: int = 35  # tokens (BLIP's retrieval text length; captions are shorter)
    min_scale: float = 0.5  # RandomResizedCrop lower bound in finetuning
    hflip: bool = True
    rand_augment: bool = True

    def __post_init__(self) -> None:
        _check_loader_fields(self)

    def files(
        self, vqa: bool = False
    ) -> tuple[tuple[str, ...], str | None, str | None, str | None]:
        """(train files, val, test, image root), the synthetic set's when `synth_dir` is set
        (its VQA files with `vqa`)."""
        if self.synth_dir is None:
            return self.train, self.val, self.test, self.image_root
        root = Path(self.synth_dir)
        pre = "vqa_" if vqa else ""
        files = (str(root / f"{pre}train.json"),)
        return files, str(root / f"{pre}val.json"), str(root / f"{pre}test.json"), str(root)

    def answers_file(self) -> str | None:
        """The VQA answer list: data.answer_list, or the synthetic set's."""
        if self.synth_dir is not None:
            return str(Path(self.synth_dir) / "answer_list.json")
        return self.answer_list


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
    # "blip": transformers 4.15's beam scoring, which BLIP's numbers came from; "hf": 5.x's
    beam_scoring: str = "blip"
    # VQA: "rank" the answer list (BLIP's default for VQAv2) or "generate" (beam search)
    vqa_mode: Literal["rank", "generate"] = "rank"
    vqa_k_test: int = 128  # rank: candidates re-scored whole (BLIP's k_test)
    answer_max_length: int = 10  # generate: tokens, [DEC] included (BLIP)
    answer_min_length: int = 1

    def __post_init__(self) -> None:
        from dlip.models.generation import BEAM_SCORINGS

        check_types(self, "eval")
        if self.beam_scoring not in BEAM_SCORINGS:
            raise ConfigError(f"eval.beam_scoring={self.beam_scoring!r}: one of {BEAM_SCORINGS}")
        for name in ("every_epochs", "batch_size", "k_test", "itm_batch", "num_beams",
                     "vqa_k_test", "answer_min_length"):  # fmt: skip
            require(getattr(self, name) >= 1, f"eval.{name}", getattr(self, name), ">= 1")
        require(self.min_length <= self.max_length, "eval.min_length", self.min_length, "<= max")
        require(self.answer_max_length >= 2, "eval.answer_max_length", self.answer_max_length,
                ">= 2 ([DEC] and one token)")  # fmt: skip
        require(self.answer_min_length <= self.answer_max_length, "eval.answer_min_length",
                self.answer_min_length, "<= eval.answer_max_length")  # fmt: skip
