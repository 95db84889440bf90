"""`dlip data build vqa`: BLIP's VQA JSON files and the official VQAv2 files become one jsonl
form, bad rows counted by reason; BLIP's answer weights."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from dlip.cli import main
from dlip.data.rows import BuildReport
from dlip.data.vqa import answer_weights, build_vqa_blip, build_vqa_official, read_vqa

TEN = ["yes"] * 6 + ["no"] * 3 + ["maybe"]


def _image(path: Path) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), "red").save(path)
    return str(path)


def _blip_files(root: Path) -> tuple[Path, Path]:
    _image(root / "coco" / "val2014" / "COCO_val2014_000000000001.jpg")
    _image(root / "vg" / "VG_100K" / "7.jpg")
    good = {"question_id": 1, "question": "Is it red?", "answer": TEN, "dataset": "vqa",
            "image": "val2014/COCO_val2014_000000000001.jpg"}  # fmt: skip
    train = [
        good,
        {"question_id": 2, "question": "What colour?", "answer": "red", "dataset": "vg",
         "image": "VG_100K/7.jpg"},
        {**good, "question_id": 3, "question": "  "},  # empty_question
        {**good, "question_id": 4, "answer": []},  # no_answer
        {**good, "question_id": 5, "image": "../../../etc/passwd"},  # outside_root
        {**good, "question_id": 6, "image": "val2014/gone.jpg"},  # missing_file
        {**good, "question_id": None},  # malformed_row
    ]  # fmt: skip
    (root / "vqa_train.json").write_text(json.dumps(train))
    test = [{k: v for k, v in good.items() if k != "answer"}]
    (root / "vqa_test.json").write_text(json.dumps(test))
    return root / "vqa_train.json", root / "vqa_test.json"


def test_blip_files_kept_and_counted(tmp_path):
    train, test = _blip_files(tmp_path)
    report = BuildReport()
    rows = list(
        build_vqa_blip([train, test], report=report, vqa_root=tmp_path / "coco",
                       vg_root=tmp_path / "vg")
    )  # fmt: skip
    assert [(r["question_id"], r["source"]) for r in rows] == [(1, "vqa"), (2, "vg"), (1, "vqa")]
    assert rows[0]["image"] == str(tmp_path / "coco/val2014/COCO_val2014_000000000001.jpg")
    assert rows[0]["answers"] == TEN and rows[1]["answers"] == ["red"]
    assert rows[2]["answers"] == []  # the test split keeps its unanswered questions
    assert report.skipped == {
        "empty_question": 1, "no_answer": 1, "outside_root": 1, "missing_file": 1,
        "malformed_row": 1,
    }  # fmt: skip


def test_answer_weights_are_blips():
    # VQAv2: each distinct answer weighs its share of the 10 annotations (6/10, 3/10, 1/10).
    answers, weights = answer_weights({"source": "vqa", "answers": TEN})
    assert answers == ["yes", "no", "maybe"] and weights == pytest.approx([0.6, 0.3, 0.1])
    # Visual Genome: 0.2 for its one answer, as BLIP's vqa_dataset.py.
    assert answer_weights({"source": "vg", "answers": ["red"]}) == (["red"], [0.2])


def _official(root: Path) -> tuple[Path, Path]:
    _image(root / "val2014" / "COCO_val2014_000000000042.jpg")
    questions = {"data_subtype": "val2014", "questions": [
        {"image_id": 42, "question": "How many dogs?", "question_id": 420},
        {"image_id": 42, "question": "Is it sunny?", "question_id": 421},  # no annotation
        {"image_id": 43, "question": "What is it?", "question_id": 430},  # image missing
        {"image_id": "42", "question": "Why?", "question_id": 422},  # malformed image_id
    ]}  # fmt: skip
    answers = [{"answer": a, "answer_confidence": "yes", "answer_id": i}
               for i, a in enumerate(["2"] * 9 + ["two"], 1)]  # fmt: skip
    annotations = {"annotations": [
        {"question_id": 420, "image_id": 42, "answers": answers, "answer_type": "number",
         "multiple_choice_answer": "2", "question_type": "how many"},
    ]}  # fmt: skip
    q, a = root / "v2_OpenEnded_mscoco_val2014_questions.json", root / "v2_mscoco_val2014_a.json"
    q.write_text(json.dumps(questions))
    a.write_text(json.dumps(annotations))
    return q, a


def test_official_vqav2_files(tmp_path):
    questions, annotations = _official(tmp_path)
    report = BuildReport()
    rows = list(build_vqa_official(questions, annotations, report=report, image_root=tmp_path))
    assert len(rows) == 1 and rows[0]["question_id"] == 420
    assert rows[0]["image"] == str(tmp_path / "val2014/COCO_val2014_000000000042.jpg")
    assert rows[0]["answers"] == ["2"] * 9 + ["two"] and rows[0]["answer_type"] == "number"
    assert report.skipped == {"no_answer": 1, "missing_file": 1, "malformed_row": 1}
    # Test questions (no annotation file) keep every question, without answers.
    rows = list(build_vqa_official(questions, None, report=BuildReport(), image_root=tmp_path))
    assert [r["question_id"] for r in rows] == [420, 421] and rows[1]["answers"] == []
    bare = tmp_path / "bare.json"
    bare.write_text(json.dumps({"questions": []}))
    with pytest.raises(ValueError, match="data_subtype"):
        list(build_vqa_official(bare, None, report=BuildReport(), image_root=tmp_path))


def test_build_vqa_cli(tmp_path, capsys):
    train, _ = _blip_files(tmp_path)
    out = tmp_path / "vqa.jsonl"
    argv = ["data", "build", "vqa", str(train), "--images", str(tmp_path / "coco")]
    assert main([*argv, "--vg-images", str(tmp_path / "vg"), "--out", str(out)]) == 0
    assert "wrote 2 questions" in capsys.readouterr().out
    assert [r["question_id"] for r in read_vqa(out)] == [1, 2]
    questions, _ = _official(tmp_path)
    both = [*argv, "--questions", str(questions), "--out", str(out)]
    assert main(both) == 2 and "not both" in capsys.readouterr().err


def _truth(scene: dict, question: str) -> str:
    """The answer to a synthetic question, worked out from the scene record independently."""
    objects = scene["objects"]
    words = question.rstrip("?").split()
    if question.startswith("what colour is the "):
        (colour,) = [o["colour"] for o in objects if o["shape"] == words[-1]]
        return colour
    if question.startswith("what shape is "):
        assert " ".join(words[3:-3]) == scene["relation"]
        return objects[0]["shape"]
    if question == "how many shapes are there?":
        return str(len(objects))
    if question.startswith("how many "):
        return str(sum(o["colour"] == words[2] for o in objects))
    assert question.startswith("is there a ")
    present = any((o["colour"], o["shape"]) == (words[3], words[4]) for o in objects)
    return "yes" if present else "no"


def test_synthetic_questions_are_answered_by_their_scenes(tmp_path):
    from dlip.data.synth_vqa import synthesize_vqa
    from dlip.data.synthetic import synthesize

    synthesize(tmp_path / "s", 30, seed=1, image_size=32)
    counts = synthesize_vqa(tmp_path / "s", seed=1, per_image=4)
    scenes = [
        json.loads(line) for line in (tmp_path / "s" / "scenes.jsonl").read_text().splitlines()
    ]
    by_image = {s["image"]: s for s in scenes}
    kinds = set()
    for split in ("train", "val", "test"):
        rows = json.loads((tmp_path / "s" / f"vqa_{split}.json").read_text())
        assert len(rows) == counts[split] and rows
        for row in rows:
            scene = by_image[row["image"]]
            assert scene["split"] == split
            assert row["answer"] == [_truth(scene, row["question"])] * 10, row
            kinds.add(row["answer_type"])
    assert kinds == {"yes/no", "number", "other"}
    before = (tmp_path / "s" / "vqa_train.json").read_bytes()
    synthesize_vqa(tmp_path / "s", seed=1, per_image=4)
    assert (tmp_path / "s" / "vqa_train.json").read_bytes() == before  # a function of the seed
    report = BuildReport()
    files = [tmp_path / "s" / f"vqa_{s}.json" for s in ("train", "val", "test")]
    rows = list(build_vqa_blip(files, report=report, vqa_root=tmp_path / "s"))
    assert len(rows) == sum(counts.values()) and report.skipped == {}
    assert {r["answer_type"] for r in rows} == kinds
    answers = set(json.loads((tmp_path / "s" / "answer_list.json").read_text()))
    assert {r["answers"][0] for r in rows} <= answers


def test_vqa_training_items_and_blips_batch_layout(tmp_path):
    import torch

    from dlip.data.datasets import VQATrainDataset, flatten_answers
    from dlip.data.loader import collate
    from dlip.models.presets import get_config
    from dlip.transforms import eval_transform

    img = _image(tmp_path / "a.jpg")
    rows = [
        {"question_id": 1, "question": "Is it RED?", "image": img, "answers": TEN,
         "source": "vqa"},
        {"question_id": 2, "question": "What colour?", "image": img, "answers": ["red"],
         "source": "vg"},
        {"question_id": 3, "question": "...", "image": img, "answers": ["x"], "source": "vg"},
        {"question_id": 4, "question": "Why?", "image": img, "answers": [], "source": "vqa"},
        {"question_id": 5, "question": "Why?", "image": str(tmp_path / "gone.jpg"),
         "answers": ["x"], "source": "vqa"},
    ]  # fmt: skip
    data = VQATrainDataset(rows, eval_transform(get_config("test_tiny")))
    batch = flatten_answers(collate([data[i] for i in range(len(data))]))
    assert batch["skipped"] == {"empty_question": 1, "no_answer": 1, "missing_file": 1}
    assert batch["question"] == ["is it red?", "what colour?"]  # BLIP's pre_question
    # BLIP's vqa_collate_fn: answers of question 1 then 2, weights alike, n per question.
    assert batch["answers"] == ["yes", "no", "maybe", "red"]
    assert torch.allclose(batch["weights"], torch.tensor([0.6, 0.3, 0.1, 0.2]))
    assert batch["n_answers"].tolist() == [3, 1] and batch["image"].shape[0] == 2
