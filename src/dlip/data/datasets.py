"""Map-style datasets over manifests (pretraining, retrieval / caption finetuning) and the
retrieval / captioning evaluation sets read from Karpathy-style val/test JSONs.

Every item is a dict; a bad sample (see `common.REASONS`) comes back as `loader.Skipped(reason)`
and `loader.collate` drops and counts it, so no worker ever raises on bad data. Text goes
through BLIP's `pre_caption` (max 30 words); a caption that cleaning leaves empty (e.g. "...")
counts as "empty_caption". The caption is checked before the image is decoded.
"""

from __future__ import annotations

import pickle
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from dlip.data.common import BadSample, check_caption, decode_image, read_manifest
from dlip.data.karpathy import EvalSet
from dlip.data.loader import Skipped
from dlip.data.vqa import answer_weights
from dlip.tokenizer import pre_caption, pre_question

Transform = Callable[[Image.Image], torch.Tensor]
CAPTION_PROMPT = "a picture of "  # BLIP's captioning prompt (configs/caption_coco.yaml)


class PackedRows:
    """Rows pickled into one numpy byte buffer + offsets.

    DataLoader workers fork from the main process; a list of millions of dicts would be copied
    page by page as the workers touch the objects' refcounts (host RAM grows per worker), while
    two numpy arrays stay shared.
    """

    def __init__(self, rows: Iterable[dict[str, Any]]) -> None:
        chunks = [pickle.dumps(row, protocol=pickle.HIGHEST_PROTOCOL) for row in rows]
        self._offsets = np.cumsum([0] + [len(c) for c in chunks], dtype=np.int64)  # (N+1,)
        self._buffer = np.frombuffer(b"".join(chunks), dtype=np.uint8)  # (total bytes,)

    def __len__(self) -> int:
        return len(self._offsets) - 1

    def __getitem__(self, index: int) -> dict[str, Any]:
        start, end = self._offsets[index], self._offsets[index + 1]
        return pickle.loads(self._buffer[start:end].tobytes())  # our own bytes, never a file's


def _rows_from(source: str | Path | Sequence[dict[str, Any]]) -> Iterable[dict[str, Any]]:
    if isinstance(source, (str, Path)):
        return read_manifest(source)  # validates keys, errors name the file and line
    rows = []
    for n, row in enumerate(source):
        if not isinstance(row, dict) or "image" not in row or "caption" not in row:
            raise ValueError(f"row {n}: expected a dict with 'image' and 'caption', got {row!r}")
        rows.append({"image_id": str(row["image"]), "source": "", **row})
    return rows


def clean_caption(caption: Any, max_words: int = 30, prompt: str = "") -> str:
    """`prompt` + pre_caption(caption), or BadSample (bad_text / empty_caption)."""
    caption = check_caption(caption)
    try:
        caption.encode("utf-8")
    except UnicodeEncodeError as err:  # lone surrogates from a badly decoded file
        raise BadSample("bad_text", str(err)) from None
    caption = pre_caption(caption, max_words)
    if not caption:
        raise BadSample("empty_caption", "nothing left after pre_caption")
    return prompt + caption


class ManifestDataset(Dataset):
    """Image-caption pairs of a manifest (a jsonl path or a list of rows), BLIP pretraining style.

    Item: {"image": (3, S, S) float tensor, "caption": str, "image_id": str, "index": int},
    or `Skipped(reason, index)` for a bad sample. In-memory rows need "image" and "caption";
    "image_id" defaults to the image path.
    """

    def __init__(
        self,
        manifest: str | Path | Sequence[dict[str, Any]],
        transform: Transform,
        max_words: int = 30,
        prompt: str = "",
    ) -> None:
        self.rows = PackedRows(_rows_from(manifest))
        self.transform, self.max_words, self.prompt = transform, max_words, prompt

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict[str, Any] | Skipped:
        row = self.rows[index]
        try:
            caption = clean_caption(row["caption"], self.max_words, self.prompt)
            image = decode_image(row["image"])
        except BadSample as err:
            return Skipped(err.reason, index)
        return self._item(index, row, self.transform(image), caption)

    def _item(
        self, index: int, row: dict[str, Any], image: torch.Tensor, caption: str
    ) -> dict[str, Any]:
        return {
            "image": image,
            "caption": caption,
            "image_id": str(row["image_id"]),
            "index": index,
        }


class RetrievalTrainDataset(ManifestDataset):
    """Retrieval finetuning: adds "image_idx", a contiguous int per distinct image_id.

    Numbered in order of first appearance, as BLIP's `img_ids`; captions of the same image share
    it, which the ITC loss uses to treat them as positives of each other.
    """

    def __init__(
        self,
        manifest: str | Path | Sequence[dict[str, Any]],
        transform: Transform,
        max_words: int = 30,
    ) -> None:
        super().__init__(manifest, transform, max_words)
        ids: dict[str, int] = {}
        idx = [ids.setdefault(str(self.rows[i]["image_id"]), len(ids)) for i in range(len(self))]
        self.image_idx = np.asarray(idx, dtype=np.int64)  # (N,)
        self.num_images = len(ids)

    def _item(
        self, index: int, row: dict[str, Any], image: torch.Tensor, caption: str
    ) -> dict[str, Any]:
        item = super()._item(index, row, image, caption)
        item["image_idx"] = int(self.image_idx[index])
        return item


class CaptionTrainDataset(ManifestDataset):
    """Caption finetuning: caption = prompt + pre_caption(caption), as BLIP trains it."""

    def __init__(
        self,
        manifest: str | Path | Sequence[dict[str, Any]],
        transform: Transform,
        max_words: int = 30,
        prompt: str = CAPTION_PROMPT,
    ) -> None:
        super().__init__(manifest, transform, max_words, prompt)


class VQATrainDataset(Dataset):
    """VQA training questions (rows of `dlip data build vqa`, `data.vqa.read_vqa`), as BLIP's
    vqa_dataset trains on them: the question through `pre_question`, every distinct answer
    with its weight (`data.vqa.answer_weights`).

    Item: {"image": (3, S, S), "question": str, "answers": [str], "weights": [float],
    "question_id": str, "index": int}, or `Skipped` (empty_question, no_answer, bad images);
    `flatten_answers` turns a collated batch into the loss's layout.
    """

    def __init__(
        self, rows: Sequence[dict[str, Any]], transform: Transform, max_words: int = 50
    ) -> None:
        self.rows = PackedRows(rows)
        self.transform, self.max_words = transform, max_words

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict[str, Any] | Skipped:
        row = self.rows[index]
        question = row.get("question")
        if not isinstance(question, str) or not pre_question(question, self.max_words).strip():
            return Skipped("empty_question", index)
        if not row.get("answers"):
            return Skipped("no_answer", index)
        try:
            image = decode_image(row["image"])
        except BadSample as err:
            return Skipped(err.reason, index)
        answers, weights = answer_weights(row)
        return {
            "image": self.transform(image), "question": pre_question(question, self.max_words),
            "answers": answers, "weights": weights, "question_id": str(row["question_id"]),
            "index": index,
        }  # fmt: skip


def flatten_answers(batch: dict[str, Any]) -> dict[str, Any]:
    """A collated VQA batch in the layout of BLIP's `vqa_collate_fn`: "answers" one flat list
    (question 0's answers first), "weights" a (A,) float tensor, "n_answers" (B,) answers per
    question (the loss repeats each question's states that many times)."""
    per_question = batch["answers"]
    out = dict(batch)
    out["answers"] = [a for answers in per_question for a in answers]
    out["weights"] = torch.tensor([w for ws in batch["weights"] for w in ws], dtype=torch.float32)
    out["n_answers"] = torch.tensor([len(a) for a in per_question], dtype=torch.long)  # (B,)
    return out


def eval_texts(eval_set: EvalSet, max_words: int = 30) -> list[str]:
    """The eval captions through `pre_caption`, in EvalSet order (texts[t] <-> txt2img[t]).

    A caption that cleaning empties is an error naming it: dropping it would change the split.
    """
    texts = []
    for t, caption in enumerate(eval_set.captions):
        try:
            texts.append(clean_caption(caption, max_words))
        except BadSample as err:
            image = eval_set.images[eval_set.txt2img[t]]
            raise ValueError(f"caption {t} of {image} ({caption!r}): {err}") from None
    return texts


class EvalImageDataset(Dataset):
    """The images of an EvalSet, for image features: {"image", "image_id", "index"}.

    A bad image is an error naming the file (see `load_eval_set`), not a skip.
    """

    def __init__(self, eval_set: EvalSet, transform: Transform) -> None:
        self.images, self.image_ids, self.transform = eval_set.images, eval_set.image_ids, transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> dict[str, Any]:
        try:
            image = decode_image(self.images[index])
        except BadSample as err:
            raise ValueError(f"evaluation image {self.images[index]}: {err}") from None
        return {"image": self.transform(image), "image_id": self.image_ids[index], "index": index}


class VQAEvalDataset(Dataset):
    """VQA evaluation questions (rows of `dlip.data.vqa`): {"image", "question",
    "question_id", "index"}; the question is passed as written (`BLIP.answer` applies
    `pre_question`). A bad image is an error naming the file, not a skip."""

    def __init__(self, rows: Sequence[dict[str, Any]], transform: Transform) -> None:
        self.rows, self.transform = list(rows), transform

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict[str, Any]:
        row = self.rows[index]
        try:
            image = decode_image(row["image"])
        except BadSample as err:
            raise ValueError(f"evaluation image {row['image']}: {err}") from None
        return {"image": self.transform(image), "question": row["question"],
                "question_id": row["question_id"], "index": index}  # fmt: skip
