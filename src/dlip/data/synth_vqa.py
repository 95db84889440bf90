"""Questions about the synthetic scenes (`dlip data synth`), so that VQA runs offline.

For each image of a `synthesize` output, up to `per_image` questions drawn from its scene
record (scenes.jsonl), each answerable from the pixels alone:

    what colour is the <shape>?                   (the shape occurs once)       -> colour
    what shape is <relation> the <colour> <shape>?  (two-object scenes only, so
                                                   no distractor can also hold it) -> shape
    how many shapes are there? / how many <colour> shapes are there?           -> "1".."3"
    is there a <colour> <shape>?                  (half present, half absent)   -> yes / no

Written in BLIP's VQA JSON form (salesforce/BLIP data/vqa_dataset.py), which
`dlip data build vqa` reads: `vqa_train.json`, `vqa_val.json`, `vqa_test.json` (rows
`{"question_id", "question", "answer": [10 x the answer], "image", "dataset": "vqa",
"answer_type"}`, VQAv2's ten annotations all agreeing, since the scene is known) and
`answer_list.json` (every answer, as BLIP's rank-mode candidate list). Answer types follow
VQAv2: "yes/no", "number", "other". A function of the seed and the scenes.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np

from dlip.data.synthetic import COLOURS, SHAPES, Scene, read_scenes
from dlip.fileio import atomic_write_text

ANSWERS_PER_QUESTION = 10  # VQAv2 collects ten answers per question
SPLITS = ("train", "val", "test")

QA = tuple[str, str, str]  # (question, answer, answer type)


def _colour_questions(scene: Scene) -> list[QA]:
    shapes = Counter(o.shape for o in scene.objects)
    return [
        (f"what colour is the {o.shape}?", o.colour, "other")
        for o in scene.objects
        if shapes[o.shape] == 1
    ]


def _relation_questions(scene: Scene) -> list[QA]:
    if len(scene.objects) != 2:  # a distractor might stand in the same relation
        return []
    a, b = scene.objects
    return [(f"what shape is {scene.relation} the {b.colour} {b.shape}?", a.shape, "other")]


def _count_questions(scene: Scene, rng: np.random.Generator) -> list[QA]:
    colours = Counter(o.colour for o in scene.objects)
    colour = sorted(colours)[rng.integers(len(colours))]
    return [
        ("how many shapes are there?", str(len(scene.objects)), "number"),
        (f"how many {colour} shapes are there?", str(colours[colour]), "number"),
    ]


def _yes_no_question(scene: Scene, rng: np.random.Generator) -> QA:
    present = {(o.colour, o.shape) for o in scene.objects}
    if rng.random() < 0.5:
        colour, shape = sorted(present)[rng.integers(len(present))]
        return (f"is there a {colour} {shape}?", "yes", "yes/no")
    absent = [(c, s) for c in COLOURS for s in SHAPES if (c, s) not in present]
    colour, shape = absent[rng.integers(len(absent))]
    return (f"is there a {colour} {shape}?", "no", "yes/no")


def scene_questions(scene: Scene, rng: np.random.Generator, per_image: int) -> list[QA]:
    """Up to `per_image` distinct questions about one scene, in a random order."""
    pool = _colour_questions(scene) + _relation_questions(scene)
    pool += [*_count_questions(scene, rng), _yes_no_question(scene, rng)]
    unique = list(dict.fromkeys(pool))  # two count questions can coincide (one colour)
    order = rng.permutation(len(unique))
    return [unique[i] for i in order[:per_image]]


def _splits_of(out_dir: Path) -> dict[str, str]:
    """image (relative path) -> split, from scenes.jsonl."""
    splits = {}
    with (out_dir / "scenes.jsonl").open(encoding="utf-8") as f:
        for line in f:
            record = json.loads(line)
            splits[record["image"]] = record["split"]
    return splits


def synthesize_vqa(out_dir: str | Path, seed: int = 0, per_image: int = 4) -> dict[str, int]:
    """Write the VQA files next to a synthetic set's images; returns questions per split."""
    out = Path(out_dir)
    if not (out / "scenes.jsonl").is_file():
        raise FileNotFoundError(f"{out / 'scenes.jsonl'} not found: run `dlip data synth` first")
    if per_image < 1:
        raise ValueError(f"per_image={per_image} must be >= 1")
    scenes, splits = read_scenes(out / "scenes.jsonl"), _splits_of(out)
    rows: dict[str, list[dict]] = {s: [] for s in SPLITS}
    answers = set()
    for n, (image, scene) in enumerate(sorted(scenes.items())):
        rng = np.random.default_rng([seed, 3, n])
        for k, (question, answer, kind) in enumerate(scene_questions(scene, rng, per_image)):
            rows[splits[image]].append({
                "question_id": n * 100 + k, "question": question,
                "answer": [answer] * ANSWERS_PER_QUESTION, "image": image, "dataset": "vqa",
                "answer_type": kind,
            })  # fmt: skip
            answers.add(answer)
    for split, items in rows.items():
        atomic_write_text(out / f"vqa_{split}.json", json.dumps(items, ensure_ascii=False))
    atomic_write_text(out / "answer_list.json", json.dumps(sorted(answers)))
    return {split: len(items) for split, items in rows.items()}
