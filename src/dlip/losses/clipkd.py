"""CLIP-KD's embedding-space terms (Yang et al., "CLIP-KD: An Empirical Study of CLIP Model
Distillation", CVPR 2024, arXiv 2307.12732): the student's ITC embeddings against the teacher's.

- `kd_feat` (their FD, feature distillation): mean squared distance between the student's
  embedding, mapped to the teacher's embedding width and re-normalised, and the teacher's
  L2-normalised embedding; image and text averaged. CLIP-KD found FD the strongest single term.
- `kd_icl` (their ICL, interactive contrastive learning): InfoNCE where the student's image
  embedding queries the *teacher's* text embeddings (and the student's text queries the
  teacher's images), with the student's temperature. The positive is the same sample's teacher
  feature (and, with image ids, every key showing the same image).

Keys are the teacher's features of the batch (of every rank under DDP) and, optionally, a queue
of earlier batches' teacher features (`KDConfig.teacher_queue`): unlike BLIP's momentum queue,
these keys never drift, since the teacher is frozen, so an old entry is as valid as a new one.

Both terms read the projectors `embed_image` / `embed_text` of `KDAdapters` (student embed_dim
-> teacher embed_dim; identity when equal), never the model's ITC heads.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

EMBED_PROJECTORS = ("embed_image", "embed_text")  # KDAdapters keys shared by both terms


@dataclass
class TeacherKeys:
    """The teacher's ITC embeddings as contrastive keys: the batch (gathered) then the queue."""

    image: Tensor  # (K, Et) L2-normalised
    text: Tensor  # (K, Et)
    idx: Tensor | None = None  # (K,) image ids; -100 matches nothing; None = no ids
    offset: int = 0  # column of this rank's first row among the keys (rank_offset)
    row_idx: Tensor | None = None  # (B,) image ids of this rank's rows


def feature_kd(
    s_image: Tensor,  # (B, Es) student ITC embeddings, L2-normalised
    s_text: Tensor,  # (B, Es)
    t_image: Tensor,  # (B, Et) teacher ITC embeddings, L2-normalised
    t_text: Tensor,  # (B, Et)
    proj_image: nn.Module,
    proj_text: nn.Module,
) -> Tensor:
    """CLIP-KD FD: mean over rows of ||normalize(P(s)) - t||^2, image and text averaged
    (for unit vectors this is 2 - 2 cos, bounded in [0, 4])."""
    terms = []
    for s, t, proj in ((s_image, t_image, proj_image), (s_text, t_text, proj_text)):
        mapped = F.normalize(proj(s.float()), dim=-1)  # (B, Et)
        terms.append((mapped - t.detach().float()).pow(2).sum(-1).mean())
    return (terms[0] + terms[1]) / 2


def icl_kd(
    s_image: Tensor,  # (B, Es) student ITC embeddings, L2-normalised
    s_text: Tensor,  # (B, Es)
    keys: TeacherKeys,
    temp: Tensor | float,  # the student's ITC temperature (clamped by the caller)
    proj_image: nn.Module,
    proj_text: nn.Module,
) -> Tensor:
    """CLIP-KD ICL: CE of student-image -> teacher-text and student-text -> teacher-image
    similarities over `keys`, the two directions averaged."""
    b = s_image.shape[0]
    q_image = F.normalize(proj_image(s_image.float()), dim=-1)  # (B, Et)
    q_text = F.normalize(proj_text(s_text.float()), dim=-1)
    target = _targets(b, keys, q_image.device)  # (B, K)
    i2t = q_image @ keys.text.detach().float().T / temp  # (B, K)
    t2i = q_text @ keys.image.detach().float().T / temp
    loss_i2t = -(F.log_softmax(i2t, dim=1) * target).sum(1).mean()
    loss_t2i = -(F.log_softmax(t2i, dim=1) * target).sum(1).mean()
    return (loss_i2t + loss_t2i) / 2


def _targets(b: int, keys: TeacherKeys, device: torch.device) -> Tensor:
    """(B, K) rows summing to 1: the own column, plus same-image keys when ids are given."""
    target = torch.zeros(b, keys.image.shape[0], device=device)
    rows = torch.arange(b, device=device)
    target[rows, keys.offset + rows] = 1.0
    if keys.row_idx is not None and keys.idx is not None:
        same = keys.row_idx.reshape(-1, 1) == keys.idx.reshape(1, -1)  # (B, K)
        target = torch.maximum(target, same.float())
    return target / target.sum(1, keepdim=True)
