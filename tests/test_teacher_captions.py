"""`dlip data teacher-captions` (sequence-level KD data): a teacher's beam-search captions of
each distinct image as a manifest that pretraining reads; bad images are skipped and counted."""

from __future__ import annotations

import json

import pytest
import torch

import dlip
from dlip.cli import main
from dlip.data.common import read_manifest
from dlip.data.synthetic import synthesize
from dlip.inference.predictor import Predictor
from dlip.tokenizer import get_tokenizer
from dlip.train.config import load
from dlip.train.loop import to_inputs
from dlip.train.pretrain import build_loader

pytestmark = pytest.mark.usefixtures("one_thread")


def test_teacher_captions_make_a_manifest_pretraining_reads(tmp_path, capsys):
    synthesize(tmp_path / "synth", 14, seed=0, image_size=32, captions_per_image=2)
    rows = list(read_manifest(tmp_path / "synth" / "manifest.jsonl"))  # 4 images x 2 captions
    (tmp_path / "bad.jpg").write_bytes(b"not a jpeg")
    extra = [{**rows[0], "image": str(tmp_path / "missing.jpg"), "image_id": "m"},
             {**rows[0], "image": str(tmp_path / "bad.jpg"), "image_id": "b"}]  # fmt: skip
    manifest = tmp_path / "in.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in [*rows, *extra]))
    torch.manual_seed(0)
    teacher = dlip.save(dlip.create_model("test_tiny"), tmp_path / "teacher")
    out = tmp_path / "teacher.jsonl"
    assert main(["data", "teacher-captions", "--model", str(teacher), "--manifest",
                 str(manifest), "--out", str(out), "--batch-size", "3"]) == 0  # fmt: skip
    printed = capsys.readouterr().out
    assert "missing_file 1" in printed and "not_an_image 1" in printed
    got = list(read_manifest(out))
    images = list(dict.fromkeys(r["image"] for r in rows))
    assert [r["image"] for r in got] == images  # one row per distinct readable image, in order
    assert [r["image_id"] for r in got] == [
        next(r["image_id"] for r in rows if r["image"] == i) for i in images
    ]
    assert {r["source"] for r in got} == {"teacher:test_tiny"}
    want = Predictor.load(str(teacher), device="cpu").caption(
        images, num_beams=3, max_length=30, min_length=5
    )
    assert [r["caption"] for r in got] == want and all(c.strip() for c in want)
    # Pretraining reads it beside the real manifest like any other source (concatenated).
    cfg = load(None, [f"run_dir={tmp_path / 'run'}", "model.preset=test_tiny",
                      f"data.manifests=[{manifest},{out}]",
                      "data.batch_size=4", "data.num_workers=0", "data.max_length=30"])  # fmt: skip
    loader = build_loader(cfg, dlip.create_model("test_tiny").config)
    loader.set_epoch(0)
    batch = to_inputs(next(iter(loader)), get_tokenizer(), 30, "cpu")
    assert batch["input_ids"].shape[0] == 4
