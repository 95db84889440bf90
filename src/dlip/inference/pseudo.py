"""Sequence-level distillation data: a teacher's beam-search captions as a training manifest.

Kim & Rush (2016) train a student on the teacher's beam-search outputs rather than (or besides)
matching its per-token distributions; BLIP's CapFilt trains on model captions too. Here the
teacher captions every distinct image of a manifest once, and the rows (same image, same
image_id, the caption, source "teacher:<model>") form a manifest that pretraining reads beside
the real one (`data.manifests`, concatenated; after `dlip data shard`, `data.weights` sets the
mix):

    dlip data teacher-captions --model runs/teacher/final --manifest train.jsonl \
        --out teacher.jsonl
    dlip pretrain ... 'data.manifests=[train.jsonl,teacher.jsonl]'

The LM loss on those rows is sequence-level KD; ITC / ITM see them as extra pairs, as in
CapFilt. An image that cannot be read is skipped and counted, never fatal.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from dlip.data.common import BadSample, SkipCounts, decode_image, read_manifest, write_manifest


@dataclass
class PseudoReport:
    images: int = 0  # distinct images captioned
    rows_read: int = 0
    skipped: SkipCounts = field(default_factory=SkipCounts)  # reason -> images

    def summary(self) -> str:
        return (
            f"{self.images} teacher captions from {self.rows_read} manifest rows; "
            f"{self.skipped.summary()}"
        )


def teacher_captions(
    model: str | Path,
    manifest: str | Path,
    out: str | Path,
    *,
    num_beams: int = 3,
    max_length: int = 30,
    min_length: int = 5,
    prompt: str | None = None,
    batch_size: int = 32,
    device: str = "auto",
) -> PseudoReport:
    """Caption each distinct image of `manifest` with `model` (a saved directory or preset;
    beam search with BLIP's scoring, `prompt` None = the model's) and write the rows to `out`."""
    from dlip.inference.predictor import Predictor

    predictor = Predictor.load(str(model), device=device)
    report = PseudoReport()
    first: dict[str, dict[str, str]] = {}  # image -> its first row (image_id kept)
    for row in read_manifest(manifest):
        report.rows_read += 1
        first.setdefault(row["image"], row)
    source = f"teacher:{predictor.model.config.name}"
    rows = list(first.values())
    out_rows: list[dict[str, str]] = []
    for start in range(0, len(rows), batch_size):
        good, images = [], []
        for row in rows[start : start + batch_size]:
            try:
                images.append(decode_image(row["image"]))
            except BadSample as err:  # missing, unreadable or corrupt: one counted skip
                report.skipped.add(err.reason)
                continue
            good.append(row)
        captions = predictor.caption(
            images, num_beams=num_beams, max_length=max_length, min_length=min_length,
            prompt=prompt, batch_size=batch_size,
        ) if images else []  # fmt: skip
        out_rows += [
            {**r, "caption": c, "source": source} for r, c in zip(good, captions, strict=True)
        ]
    report.images = write_manifest(out_rows, out)
    return report
