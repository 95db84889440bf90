"""The distillation task: the one trainable module of every run (pretraining and finetuning).

`PretrainTask` is student + `KDAdapters`, plus the student's momentum encoder and feature queue
when `loss.momentum_distill` is on (state, not parameters being optimised). The frozen teacher
is held outside the module's parameters, stays in eval mode when the task's `train()` is called
and runs under no_grad: it is never wrapped in DDP, optimised or checkpointed. `forward(batch)`
returns the named, unweighted loss terms; the weighted sum is taken in
`dlip.train.loop.total_loss`; `after_step()` runs what follows each optimizer step.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dlip.distributed import (
    all_gather_no_grad,
    all_gather_with_grad,
    gather_sizes,
    get_world_size,
    is_dist,
    rank_offset,
)
from dlip.losses.adapters import KDAdapters, KDConfig, terms_of
from dlip.losses.clipkd import TeacherKeys
from dlip.losses.distill import (
    ITCFeatures,
    KDInputs,
    KDMasks,
    distill_losses,
    lm_kd_mask,
    token_mask,
)
from dlip.losses.itc import (
    TEMP_MAX,
    TEMP_MIN,
    FeatureQueue,
    clamp_temp,
    clamp_temp_,
    itc_loss,
    momentum_update,
)
from dlip.losses.itm import build_itm_batch, itm_loss, with_first_token
from dlip.losses.lm import lm_loss
from dlip.models.blip import BLIP
from dlip.models.config import ModelConfig
from dlip.tokenizer import Tokenizer
from dlip.train.config import FinetuneConfig, PretrainConfig

# KD terms -> the teacher passes they read (the image pass always runs).
_TEXT_TERMS = terms_of("text")
_FUSION_TERMS = terms_of("fusion")
_DECODER_TERMS = terms_of("decoder")


class PretrainTask(nn.Module):
    """Student + KD adapters (+ momentum encoder and queue): the module DDP wraps and the
    optimizer and checkpoints see. The teacher is attached but not registered.

    The same task serves finetuning: `objectives` picks what runs ("itc", "itm", "lm"; pretraining
    runs all three), a batch's `image_idx` makes captions of one image positives of each other
    (retrieval), and `prompt_length` keeps the prompt out of the LM targets (captioning).
    """

    def __init__(
        self,
        cfg: PretrainConfig,
        student: BLIP,
        teacher: BLIP | None = None,
        adapters: KDAdapters | None = None,
        objectives: Sequence[str] = ("itc", "itm", "lm"),
        prompt_length: int = 0,
    ) -> None:
        super().__init__()
        self.kd: KDConfig = cfg.kd_config() if teacher is not None else KDConfig()
        enabled = set(self.kd.enabled)
        self.use_itm = "itm" in objectives or bool(enabled & _FUSION_TERMS)
        self.use_itc = "itc" in objectives or self.use_itm or bool(enabled & _TEXT_TERMS)
        self.use_lm = "lm" in objectives or bool(enabled & _DECODER_TERMS)
        if self.use_itc and not student.config.has_itc:
            raise ValueError(
                "ITC/ITM (or their KD terms) need a student with ITC heads (has_encoder, not VQA)"
            )
        if self.use_lm and not student.config.has_decoder:
            raise ValueError("the LM loss (or a decoder KD term) needs a student with has_decoder")
        if self.use_itc and not student.config.temp_known:  # trained from here on
            student.config = student.config.replace(temp_known=True)
        self.prompt_length = prompt_length
        self.itm_all_ranks = cfg.loss.itm_all_ranks
        self.momentum = cfg.loss.momentum
        self.momentum_columns = cfg.loss.momentum_columns
        self.student = student
        self.adapters = adapters if adapters is not None else KDAdapters()
        self.student_m: BLIP | None = None
        self.queue: FeatureQueue | None = None
        if cfg.loss.momentum_distill and self.use_itc:  # BLIP's momentum encoder: the student's
            self.student_m = copy.deepcopy(student).requires_grad_(False)
            self.queue = FeatureQueue(student.config.embed_dim, cfg.loss.queue_size)
        self.teacher_queue: FeatureQueue | None = None  # kd_icl's earlier teacher embeddings
        if teacher is not None and "kd_icl" in enabled and self.kd.teacher_queue > 0:
            self.teacher_queue = FeatureQueue(teacher.config.embed_dim, self.kd.teacher_queue)
        # Not a submodule: out of parameters(), state_dict(), DDP and the optimizer.
        object.__setattr__(self, "teacher", teacher)
        if teacher is not None:
            teacher.requires_grad_(False).eval()

    def train(self, mode: bool = True) -> PretrainTask:
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()  # frozen: dropout off whatever the task's mode
        return self

    @torch.no_grad()
    def after_step(self) -> None:
        """After each optimizer step: keep the learnable temperature in BLIP's range, move the
        momentum encoder towards the student (EMA)."""
        if self.use_itc:  # a captioning-only student has no temperature
            clamp_temp_(self.student.temp)
        if self.student_m is not None:
            momentum_update(self.student, self.student_m, self.momentum)

    def forward(self, batch: Mapping[str, Tensor], alpha: float = 0.0) -> dict[str, Tensor]:
        """batch: image (B, 3, S, S), input_ids / attention_mask (B, T) ([CLS] first), and
        optionally image_idx (B,). Returns the unweighted terms: loss_itc, loss_itm, loss_lm
        (those the task runs) and every enabled kd_*."""
        pixels, ids, mask = batch["image"], batch["input_ids"], batch["attention_mask"]
        s, a = self.student, self.adapters
        image = s.encode_image(pixels, taps=a.taps("image", "student"))
        student = KDInputs(image=image)
        seen: dict[str, Any] = {}  # the student's fusion / decoder outputs, kept for KD
        terms: dict[str, Tensor] = {}
        token_masks: dict[str, Tensor] = {}  # token-mean terms -> the tokens they average
        itm = None
        if self.use_itc:
            terms_c, itm = self._contrastive(batch, image, student, seen, alpha)
            terms.update(terms_c)
        if self.use_lm:

            def decode_fn(img: Tensor, dec_ids: Tensor, dec_mask: Tensor) -> Tensor:
                seen["decoder"] = s.decode(
                    img, dec_ids, dec_mask, taps=a.taps("decoder", "student")
                )
                return seen["decoder"].tokens  # (B, T, D)

            lm = lm_loss(
                decode_fn, s.text_decoder.cls, image.tokens, ids, mask,
                prompt_length=self.prompt_length,
            )  # fmt: skip
            terms["loss_lm"], token_masks["loss_lm"] = lm.loss, lm.mask
            student.decoder, student.lm_logits = seen["decoder"], lm.logits  # logits (N, V)
            seen["lm_mask"] = F.pad(lm.mask, (0, 1))  # (B, T) over logit positions
        if self.teacher is not None and self.kd.enabled:
            kd, kd_masks = self._distill(pixels, ids, mask, itm, student, seen)
            terms.update(kd)
            token_masks.update(kd_masks)
        return weighted_by_tokens(terms, token_masks)

    def _distill(
        self,
        pixels: Tensor,
        ids: Tensor,
        mask: Tensor,
        itm: Any,
        student: KDInputs,
        seen: dict[str, Any],
    ) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """The enabled KD terms against the teacher's passes on the same batch, and the token
        masks of those that are token means (`distill.token_mask`)."""
        neg = (itm.neg_image_idx, itm.neg_text_idx) if itm is not None else (None, None)
        # The positions the student's LM head ran at (the same rule when it did not run).
        lm_mask = seen.get("lm_mask", lm_kd_mask(mask, self.prompt_length))  # (B, T)
        teacher = self._teacher_inputs(pixels, ids, mask, lm_mask, *neg)
        image_idx = seen.get("image_idx")
        if "kd_icl" in self.kd.enabled:
            assert teacher.itc is not None
            teacher.keys = self._teacher_keys(teacher.itc, image_idx)
        masks = KDMasks(text=mask, fusion=seen.get("fusion_mask"), decoder=mask, lm=lm_mask)
        kd = distill_losses(student, teacher, self.adapters, self.kd, masks)
        if self.teacher_queue is not None:  # after the loss: a batch never keys itself twice
            assert teacher.itc is not None
            self.teacher_queue.enqueue(teacher.itc.image, teacher.itc.text, image_idx)
        counted = {term: token_mask(term, masks) for term in kd}
        return kd, {term: m for term, m in counted.items() if m is not None}

    def _teacher_keys(self, itc: ITCFeatures, idx: Tensor | None) -> TeacherKeys:
        """kd_icl's keys: the teacher's embeddings of the global batch, then its queue."""
        sizes = gather_sizes(itc.image.shape[0], itc.image.device)
        image = itc.image if itc.image_all is None else itc.image_all  # (G, Et)
        text = itc.text if itc.text_all is None else itc.text_all
        ids = None if idx is None else all_gather_no_grad(idx.reshape(-1).long(), sizes)
        q = self.teacher_queue
        if q is not None:  # (G + Q, Et); unfilled slots hold random unit vectors, as BLIP's
            image = torch.cat([image, q.image_queue.T.to(image.dtype)])
            text = torch.cat([text, q.text_queue.T.to(text.dtype)])
            ids = None if ids is None else torch.cat([ids, q.idx_queue[0]])
        return TeacherKeys(image, text, ids, offset=rank_offset(sizes), row_idx=idx)

    def _contrastive(
        self,
        batch: Mapping[str, Tensor],
        image: Any,
        student: KDInputs,
        seen: dict[str, Any],
        alpha: float,
    ) -> tuple[dict[str, Tensor], Any]:
        """ITC (+ momentum queue) and ITM with hard negatives; fills `student`'s text/fusion."""
        pixels, ids, mask = batch["image"], batch["input_ids"], batch["attention_mask"]
        image_idx = batch.get("image_idx")  # (B,) same image -> positives, never negatives
        seen["image_idx"] = image_idx
        s, a = self.student, self.adapters
        text = s.encode_text(ids, mask, taps=a.taps("text", "student"))
        feat_m: dict[str, Tensor] = {}
        if self.student_m is not None:
            with torch.no_grad():
                feat_m["image_feat_m"] = self.student_m.encode_image(pixels).feat
                feat_m["text_feat_m"] = self.student_m.encode_text(ids, mask).feat
        itc = itc_loss(
            image.feat, text.feat, s.temp, queue=self.queue, alpha=alpha, image_idx=image_idx,
            momentum_columns=self.momentum_columns, **feat_m,
        )  # fmt: skip
        if self.queue is not None:  # after the loss: a batch never scores against itself
            self.queue.enqueue(feat_m["image_feat_m"], feat_m["text_feat_m"], image_idx)
        student.text = text
        student.itc = _itc_features(image.feat, text.feat, clamp_temp(s.temp), with_grad=True)
        terms = dict(itc.terms)
        if not self.use_itm:
            return terms, None

        def itm_fn(img: Tensor, enc_ids: Tensor, enc_mask: Tensor) -> Tensor:
            out = s.multimodal(img, enc_ids, enc_mask, taps=a.taps("fusion", "student"))
            seen["fusion"], seen["fusion_mask"] = out, enc_mask
            return s.itm_head(out.tokens[:, 0])  # (3B, 2)

        itm = itm_loss(
            itm_fn, image.tokens, ids, mask, itc.sim_i2t, itc.sim_t2i,
            offset=itc.offset, image_idx=image_idx, across_ranks=self.itm_all_ranks,
        )  # fmt: skip
        student.fusion, student.itm_logits = seen["fusion"], itm.logits
        terms.update(itm.terms)
        return terms, itm

    @torch.no_grad()
    def _teacher_inputs(
        self,
        pixels: Tensor,
        ids: Tensor,
        mask: Tensor,
        lm_mask: Tensor,  # (B, T) the positions the LM head runs at
        neg_image: Tensor,
        neg_text: Tensor,
    ) -> KDInputs:
        """The teacher's passes on the same batch, with the taps the adapters ask for; the
        fusion pass scores the student's sampled ITM pairs (positives, then negatives)."""
        t, a, enabled = self.teacher, self.adapters, set(self.kd.enabled)
        dtype = next(t.parameters()).dtype
        pixels = teacher_view(pixels, self.student.config, t.config)
        out = KDInputs(image=t.encode_image(pixels.to(dtype), taps=a.taps("image", "teacher")))
        if enabled & _TEXT_TERMS:
            out.text = t.encode_text(ids, mask, taps=a.taps("text", "teacher"))
            temp = t.temp.detach().float().clamp(TEMP_MIN, TEMP_MAX)
            out.itc = _itc_features(out.image.feat, out.text.feat, temp, with_grad=False)
        if enabled & _FUSION_TERMS:
            enc_ids = with_first_token(ids, Tokenizer.enc_token_id)
            images, itm_ids, itm_mask = build_itm_batch(
                out.image.tokens, enc_ids, mask, neg_image, neg_text, self.itm_all_ranks
            )
            out.fusion = t.multimodal(images, itm_ids, itm_mask, taps=a.taps("fusion", "teacher"))
            out.itm_logits = t.itm_head(out.fusion.tokens[:, 0])
        if enabled & _DECODER_TERMS:
            dec_ids = with_first_token(ids, Tokenizer.dec_token_id)
            out.decoder = t.decode(
                out.image.tokens, dec_ids, mask, taps=a.taps("decoder", "teacher")
            )
            out.lm_logits = t.text_decoder.cls(out.decoder.tokens[lm_mask])  # (N, V)
        return out


def teacher_view(pixels: Tensor, student: ModelConfig, teacher: ModelConfig) -> Tensor:
    """The teacher's input for the student's (B, 3, S, S) batch: the same crop, normalised with
    the teacher's mean / std (exactly: normalisation is per-channel affine) and resized to the
    teacher's image size, bicubic with antialiasing when it shrinks (a plain bicubic
    downsample aliases). It resamples the student's view once more rather than the original
    image, which the loader does not keep."""
    if student.image_mean != teacher.image_mean or student.image_std != teacher.image_std:
        shape = (1, 3, 1, 1)
        ms, ss = (torch.tensor(v, dtype=pixels.dtype, device=pixels.device).view(shape)
                  for v in (student.image_mean, student.image_std))  # fmt: skip
        mt, st = (torch.tensor(v, dtype=pixels.dtype, device=pixels.device).view(shape)
                  for v in (teacher.image_mean, teacher.image_std))  # fmt: skip
        pixels = (pixels * ss + ms - mt) / st  # back to [0, 1] RGB, then the teacher's stats
    size = teacher.vision.image_size
    if pixels.shape[-1] != size:
        shrink = size < pixels.shape[-1]
        pixels = F.interpolate(
            pixels, size=(size, size), mode="bicubic", align_corners=False, antialias=shrink
        )
    return pixels


def weighted_by_tokens(
    terms: dict[str, Tensor], token_masks: Mapping[str, Tensor]
) -> dict[str, Tensor]:
    """Each token-mean term times world * (this rank's counted tokens) / (all ranks' counted
    tokens), one all-reduce for all of them; unchanged in one process.

    A token-mean loss times this share, averaged over ranks by DDP, is the mean over every
    token of the global batch (not the mean of per-rank means, which weighs a rank's tokens
    by how few it has)."""
    if not token_masks or not is_dist():
        return terms
    names = list(token_masks)
    local = torch.stack([token_masks[n].sum().float() for n in names])  # (K,) tokens here
    total = local.clone()
    torch.distributed.all_reduce(total)
    shares = local * get_world_size() / total.clamp(min=1)
    return terms | {n: terms[n] * share for n, share in zip(names, shares, strict=True)}


def _itc_features(image: Tensor, text: Tensor, temp: Tensor, with_grad: bool) -> ITCFeatures:
    """ITC features; under DDP also gathered from every rank (keys of the affinity KD)."""
    if not is_dist():
        return ITCFeatures(image=image, text=text, temp=temp)
    gather = all_gather_with_grad if with_grad else all_gather_no_grad
    return ITCFeatures(image, text, temp, image_all=gather(image), text_all=gather(text))


# ------------------------------------------------------------------------------ the teacher
def load_teacher(cfg: PretrainConfig) -> BLIP | None:
    """The frozen teacher of `teacher.checkpoint`, or None; a missing path is a clear error."""
    path = cfg.teacher.checkpoint
    if not path:
        return None
    from dlip.models.io import load

    if not Path(path).is_dir():
        raise FileNotFoundError(
            f"teacher.checkpoint={path!r} is not a directory: give a saved dlip model "
            "(dlip.save / `dlip convert` output, or a pretrain run's final/)"
        )
    return load(path).requires_grad_(False).eval()


def teacher_identity(cfg: PretrainConfig, teacher: BLIP | None) -> dict[str, Any]:
    """What identifies the teacher of a run (teacher.json; a resume must match it): its path,
    name, weights size and SHA-256 (read once per run start: ~1 s per GB)."""
    import hashlib

    if teacher is None:
        return {"checkpoint": None}
    path = Path(cfg.teacher.checkpoint)
    weights = path / "model.safetensors"
    digest = hashlib.sha256()
    with weights.open("rb") as f:
        for block in iter(lambda: f.read(1 << 23), b""):
            digest.update(block)
    return {
        "checkpoint": str(path.resolve()),
        "name": teacher.config.name,
        "weights_bytes": weights.stat().st_size,
        "weights_mtime": weights.stat().st_mtime,
        "weights_sha256": digest.hexdigest(),
    }


def build_adapters(cfg: Any, student_config: ModelConfig, teacher: BLIP | None) -> KDAdapters:
    """The KD projectors of a student for `teacher` (none without a teacher); a tokenizer
    mismatch between the two is an error before anything trains."""
    if teacher is None:
        return KDAdapters()
    s_vocab, t_vocab = student_config.text.vocab_size, teacher.config.text.vocab_size
    if s_vocab != t_vocab:
        raise ValueError(
            f"teacher/student tokenizer mismatch: student vocab_size {s_vocab}, teacher "
            f"{t_vocab} ({cfg.teacher.checkpoint}); both must use the same tokenizer"
        )
    kd = cfg.kd_config()
    if "kd_itc" in kd.enabled and not teacher.config.temp_known and kd.itc_temperature is None:
        raise ValueError(
            f"kd_itc: teacher.checkpoint={cfg.teacher.checkpoint} has no trained ITC "
            f"temperature (converted from transformers' BLIP, whose checkpoints store none; its "
            f"temp is BLIP's initial {float(teacher.temp):.2f}), so the teacher's similarity "
            "distribution would have an arbitrary sharpness: set loss.kd.itc_temperature"
        )
    return KDAdapters.build(kd, student_config, teacher.config)


def load_student(cfg: FinetuneConfig) -> BLIP:
    """The model to finetune, in the task's form (a pretraining checkpoint holds both towers;
    each task trains one, as BLIP's finetuning classes do), at the run's image size (pos_embed
    resized when it changes)."""
    from dlip.models.io import resolve, task_form

    m = cfg.model
    form = {"retrieval": "retrieval", "caption": "captioning", "vqa": "vqa"}[cfg.task]
    model = task_form(resolve(str(m.checkpoint or m.preset)), form)
    if m.image_size is not None and m.image_size != model.config.vision.image_size:
        model.set_image_size(m.image_size)
    model.set_grad_checkpointing(m.grad_checkpointing)
    return model


# ------------------------------------------------------------------------------ saved students
KD_ADAPTERS_FILE = "kd_adapters.safetensors"  # beside a saved student; `dlip.load` ignores it


def save_student(task: nn.Module, directory: str | Path) -> Path:
    """The task's student as a dlip model (`dlip.models.io.save`), plus its trained KD
    projectors in KD_ADAPTERS_FILE when it has any (the teacher's name in the metadata), so KD
    during finetuning can start from them instead of at random."""
    from safetensors.torch import save_file

    from dlip.models.io import save

    out = save(task.student, directory)
    state = {k: v.detach().contiguous() for k, v in task.adapters.state_dict().items()}
    target = out / KD_ADAPTERS_FILE
    if state:
        teacher = getattr(task, "teacher", None)
        meta = {"teacher": teacher.config.name if teacher is not None else ""}
        tmp = out / (KD_ADAPTERS_FILE + ".tmp")
        save_file(state, str(tmp), metadata=meta)
        tmp.replace(target)
    elif target.exists():
        target.unlink()  # a stale file from an earlier save of this directory
    return out


def start_adapters(cfg: FinetuneConfig, student: BLIP, teacher: BLIP | None) -> KDAdapters:
    """A finetuning run's KD projectors: built for `teacher`, then restored from the student
    checkpoint's saved ones where terms and shapes match (printed)."""
    adapters = build_adapters(cfg, student.config, teacher)
    if teacher is not None and cfg.model.checkpoint:
        restored = restore_adapters(adapters, cfg.model.checkpoint)
        if restored:
            print(f"KD projectors restored from {cfg.model.checkpoint}: {', '.join(restored)}")
    return adapters


def restore_adapters(adapters: KDAdapters, directory: str | Path) -> list[str]:
    """Load the projectors saved beside a student (`save_student`) into `adapters` where the
    term and every shape match; returns the restored terms (the others stay as built)."""
    from dlip.fileio import load_safetensors

    path = Path(directory) / KD_ADAPTERS_FILE
    if not path.is_file():
        return []
    saved = load_safetensors(path)
    restored = []
    for term, module in adapters.items():
        own = module.state_dict()
        theirs = {k: saved.get(f"{term}.{k}") for k in own}
        if own and all(v is not None and v.shape == own[k].shape for k, v in theirs.items()):
            module.load_state_dict(theirs, strict=True)
            restored.append(term)
    return restored
