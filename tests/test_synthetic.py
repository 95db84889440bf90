"""Tests for dlip.data.synthetic: files and schemas, determinism, captions that describe the
image, and a dataset that bag-of-words cannot solve but composition can."""

from __future__ import annotations

import hashlib
import itertools
import json
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from dlip.data.common import MANIFEST_KEYS, decode_image, read_manifest
from dlip.data.synthetic import (
    COLOURS,
    RELATION_IT_WORDS,
    RELATION_WORDS,
    SHAPES,
    SIZES,
    SYNONYMS,
    Scene,
    read_scenes,
    sample_scenes,
    synthesize,
)
from dlip.tokenizer import get_tokenizer, pre_caption

N, SIZE, SEED = 400, 64, 3


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("synth")
    report = synthesize(out, N, seed=SEED, image_size=SIZE)
    train = json.loads((out / "train.json").read_text())
    evals = {s: json.loads((out / f"{s}.json").read_text()) for s in ("val", "test")}
    return out, report, train, evals, read_scenes(out / "scenes.jsonl")


def _all_captions(train: list[dict], evals: dict[str, list[dict]]) -> list[tuple[str, str]]:
    pairs = [(t["image"], t["caption"]) for t in train]
    return pairs + [(e["image"], c) for anns in evals.values() for e in anns for c in e["caption"]]


# ---- an independent reader of the captions, built only from the exposed vocabulary


def _alt(values: tuple[str, ...]) -> str:
    words = sorted({w for v in values for w in SYNONYMS[v]}, key=len, reverse=True)
    return "|".join(map(re.escape, words))


_CANON = {w: v for v, words in SYNONYMS.items() for w in words}
_S, _C, _H = _alt(tuple(SIZES)), _alt(tuple(COLOURS)), _alt(SHAPES)
_NP = re.compile(rf"\ban? ({_S}) (?:({_C}) ({_H})|({_H}) in ({_C}))\b")
_PHRASES = sorted(
    [(p, r, True) for r, ps in RELATION_IT_WORDS.items() for p in ps]
    + [(p, r, False) for r, ps in RELATION_WORDS.items() for p in ps],
    key=lambda x: len(x[0]),
    reverse=True,
)


def _relation_in(text: str) -> tuple[str, bool] | None:
    for phrase, rel, it_form in _PHRASES:  # longest first: "next to it" before "next to"
        if re.search(rf"(^|\W){re.escape(phrase)}(\W|$)", text):
            return rel, it_form
    return None


def _parse(caption: str) -> tuple[tuple, str, tuple, list[tuple]]:
    """(subject, relation, reference, distractors), objects as (size, colour, shape)."""
    text = pre_caption(caption)
    nps = list(_NP.finditer(text))
    assert len(nps) >= 2, caption
    objs = [
        tuple(_CANON[w] for w in (m[1], m[2] or m[5], m[3] or m[4]))  # size, colour, shape
        for m in nps
    ]
    middle, tail = text[nps[0].end() : nps[1].start()], text[nps[1].end() :]
    found = _relation_in(middle) or _relation_in(tail.split(" and ")[0])
    assert found is not None, caption
    rel, it_form = found
    # "there is B and, to its left, A" / "B with A to its left": the second object is the subject
    a, b = (objs[1], objs[0]) if it_form else (objs[0], objs[1])
    return a, rel, b, objs[2:]


def _meaning(a: tuple, rel: str, b: tuple, rest: list[tuple]) -> tuple:
    flip = {"right of": "left of", "below": "above"}
    if rel in flip:
        a, b, rel = b, a, flip[rel]
    if rel == "next to":
        a, b = sorted((a, b))
    return a, rel, b, tuple(sorted(rest))


def _scene_meaning(scene: Scene) -> tuple:
    objs = [(o.size, o.colour, o.shape) for o in scene.objects]
    return _meaning(objs[0], scene.relation, objs[1], objs[2:])


# ---- files and schemas


def test_report_and_split_sizes(data):
    out, report, train, evals, scenes = data
    assert report.images == {"train": 320, "val": 40, "test": 40}
    assert report.captions == {"train": 1600, "val": 200, "test": 200}
    assert len(train) == 1600 and len(evals["val"]) == 40 and len(scenes) == N
    names = {"train.json", "val.json", "test.json", "manifest.jsonl", "scenes.jsonl"}
    assert {p.name for p in report.files} == names and all(p.is_file() for p in report.files)
    assert len(list((out / "images").iterdir())) == N
    assert "train 320 images / 1600 captions" in report.summary()


def test_small_n_keeps_a_handful_of_eval_images(tmp_path: Path):
    report = synthesize(tmp_path / "a", 12, image_size=32)
    assert report.images == {"train": 2, "val": 5, "test": 5}
    with pytest.raises(ValueError, match="n_images=10"):
        synthesize(tmp_path / "b", 10)
    report = synthesize(tmp_path / "c", 20, image_size=32, n_val=1, n_test=3)
    assert report.images == {"train": 16, "val": 1, "test": 3}


def test_karpathy_json_schemas(data):
    out, _, train, evals, _ = data
    per_image = Counter()
    for t in train:
        assert list(t) == ["caption", "image", "image_id"]
        assert all(isinstance(v, str) for v in t.values())
        assert t["image"].startswith("images/synth_") and not Path(t["image"]).is_absolute()
        # COCO's convention: the int id is the file name's last "_" field
        assert t["image_id"] == "synth_" + str(int(Path(t["image"]).stem.split("_")[-1]))
        per_image[t["image"]] += 1
    assert set(per_image.values()) == {5}
    seen = set(per_image)
    for anns in evals.values():
        for e in anns:
            assert list(e) == ["image", "caption"]
            caps = e["caption"]
            assert (
                isinstance(caps, list) and len(caps) == 5 and all(isinstance(c, str) for c in caps)
            )
            assert len({pre_caption(c) for c in caps}) == 5  # five different captions
            assert e["image"] not in seen  # splits are disjoint
            seen.add(e["image"])
    assert len(seen) == N
    for rel in sorted(seen)[::40]:
        image = decode_image(out / rel)
        assert image.size == (SIZE, SIZE) and image.mode == "RGB"


def test_manifest_is_the_train_split(data):
    out, _, train, _, _ = data
    rows = list(read_manifest(out / "manifest.jsonl"))
    assert len(rows) == len(train)
    for row, t in zip(rows, train, strict=True):
        assert list(row) == list(MANIFEST_KEYS) and row["source"] == "synth"
        assert row["image"] == str(out.resolve() / t["image"]) and Path(row["image"]).is_file()
        assert (row["caption"], row["image_id"]) == (t["caption"], t["image_id"])


# ---- determinism and arguments


def _digests(root: Path) -> dict[str, str]:
    files = sorted(p for p in root.rglob("*") if p.is_file())
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def test_same_seed_same_bytes_other_seed_differs(tmp_path: Path):
    kw = {"n_images": 30, "image_size": 32}
    synthesize(tmp_path / "a", seed=7, **kw)
    synthesize(tmp_path / "b", seed=7, **kw)
    first, second = _digests(tmp_path / "a"), _digests(tmp_path / "b")
    assert len(first) == 36 and first.keys() == second.keys()
    # manifests hold absolute paths, so they differ by the folder name only
    assert {k for k in first if first[k] != second[k]} == {"manifest.jsonl"}
    manifest_b = (tmp_path / "b" / "manifest.jsonl").read_text().replace("/b/", "/a/")
    assert manifest_b == (tmp_path / "a" / "manifest.jsonl").read_text()
    synthesize(tmp_path / "a", seed=7, overwrite=True, **kw)  # rerun in place: every byte equal
    assert _digests(tmp_path / "a") == first
    synthesize(tmp_path / "c", seed=8, **kw)
    other = _digests(tmp_path / "c")
    changed = [k for k in first if first[k] != other[k]]
    assert len(changed) >= 35  # every image and annotation file (and synth.json), not a few
    assert (tmp_path / "a" / "test.json").read_text() != (tmp_path / "c" / "test.json").read_text()


def test_out_dir_guard_and_stale_images(tmp_path: Path):
    synthesize(tmp_path, 20, image_size=16)
    with pytest.raises(FileExistsError, match="overwrite"):
        synthesize(tmp_path, 20, image_size=16)
    synthesize(tmp_path, 12, image_size=16, overwrite=True, image_format="png")
    images = sorted(p.name for p in (tmp_path / "images").iterdir())
    assert len(images) == 12 and all(n.endswith(".png") for n in images)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"image_size": 8}, "image_size"),
        ({"contrast": 1.5}, "contrast"),
        ({"max_objects": 4}, "max_objects"),
        ({"image_format": "gif"}, "image_format"),
        ({"seed": -1}, "seed"),
        ({"captions_per_image": 0}, "captions_per_image"),
        ({"n_val": 0}, "val"),
    ],
)
def test_bad_arguments_are_named(tmp_path: Path, kwargs: dict, message: str):
    with pytest.raises(ValueError, match=message):
        synthesize(tmp_path, 40, **kwargs)
    assert not (tmp_path / "images").exists()  # nothing written before the check


def test_read_scenes_names_the_bad_line(data, tmp_path: Path):
    out = data[0]
    lines = (out / "scenes.jsonl").read_text().splitlines()
    row = json.loads(lines[1])
    row["objects"][0]["colour"] = "mauve"
    (tmp_path / "scenes.jsonl").write_text("\n".join([lines[0], json.dumps(row)]) + "\n")
    with pytest.raises(ValueError, match=r"scenes.jsonl:2: .*colour"):
        read_scenes(tmp_path / "scenes.jsonl")


# ---- the captions and pixels match the scene


def test_every_caption_states_its_scene(data):
    _, _, train, evals, scenes = data
    for image, caption in _all_captions(train, evals):
        a, rel, b, rest = _parse(caption)
        assert _meaning(a, rel, b, rest) == _scene_meaning(scenes[image]), caption


def test_scene_geometry_satisfies_the_relation(data):
    for scene in data[4].values():
        a, b = scene.objects[:2]
        dx, dy = b.x - a.x, b.y - a.y
        gap = np.hypot(dx, dy) - a.r - b.r
        horizontal, vertical = abs(dx) > 2 * abs(dy), abs(dy) > 2 * abs(dx)
        expected = {
            "left of": dx > 0 and horizontal and gap > 0.1,
            "right of": dx < 0 and horizontal and gap > 0.1,
            "above": dy > 0 and vertical and gap > 0.1,  # y grows downwards
            "below": dy < 0 and vertical and gap > 0.1,
            "next to": 0 < gap < 0.07,
        }
        assert expected[scene.relation], scene
        for i, o in enumerate(scene.objects):  # inside the image, no overlaps
            assert o.r <= o.x <= 1 - o.r and o.r <= o.y <= 1 - o.r
            for p in scene.objects[i + 1 :]:
                assert np.hypot(o.x - p.x, o.y - p.y) > o.r + p.r


def test_pixels_show_the_scene(data):
    out, _, _, evals, scenes = data
    palette = np.array(list(COLOURS.values()), dtype=float)  # (K, 3)
    names = list(COLOURS)
    for e in evals["test"]:
        pixels = np.asarray(decode_image(out / e["image"]), dtype=float)  # (H, W, 3)
        mask = np.ones(pixels.shape[:2], dtype=bool)
        for o in scenes[e["image"]].objects:
            cx, cy, r = round(o.x * SIZE), round(o.y * SIZE), o.r * SIZE
            patch = pixels[cy - 1 : cy + 2, cx - 1 : cx + 2].reshape(-1, 3).mean(0)  # (3,)
            assert names[np.argmin(((palette - patch) ** 2).sum(1))] == o.colour
            yy, xx = np.ogrid[:SIZE, :SIZE]
            mask &= (yy - o.y * SIZE) ** 2 + (xx - o.x * SIZE) ** 2 > (r + 2) ** 2
        background = pixels[mask]  # (M, 3): grey-ish and noisy, so no single pixel is a key
        assert np.abs(background - background.mean(1, keepdims=True)).mean() < 20
        assert background.std(0).min() > 3


def test_captions_survive_pre_caption_and_tokenizer(data):
    _, _, train, evals, _ = data
    tok = get_tokenizer()
    captions = [c for _, c in _all_captions(train, evals)]
    assert any(c[0].isupper() for c in captions) and any(c.endswith(".") for c in captions)
    for c in captions:
        assert re.fullmatch(r"[A-Za-z ,]+\.?", c), c
        assert pre_caption(c) == c.lower().removesuffix(".")  # only case and the period change
        ids = tok.encode(pre_caption(c))
        assert len(ids) <= 30 and tok.unk_token_id not in ids  # BLIP pretrain length, no [UNK]


def test_phrasing_varies(data):
    _, _, train, evals, _ = data
    text = " ".join(pre_caption(c) for _, c in _all_captions(train, evals))
    for phrase in ("there is", " with ", " is ", "in red", "its left", "to the left of", "plus"):
        assert phrase in text, phrase
    for words in SYNONYMS.values():
        assert all(re.search(rf"\b{w}\b", text) for w in words), words


# ---- learnable but not trivial


def _bag(a: tuple, rel: str, b: tuple, rest: list[tuple]) -> tuple:
    """What a bag-of-words model sees: attribute words unbound, relation without direction."""
    axis = {"left of": "h", "right of": "h", "above": "v", "below": "v", "next to": "n"}[rel]
    return tuple(sorted(w for obj in (a, b, *rest) for w in obj)), axis


def test_test_split_needs_composition(data):
    _, _, _, evals, scenes = data
    test = [scenes[e["image"]] for e in evals["test"]]
    meanings = [_scene_meaning(s) for s in test]
    bags = [_bag(*m) for m in meanings]
    composed_hits = bag_ties = n = 0
    for e, meaning, bag in zip(evals["test"], meanings, bags, strict=True):
        for caption in e["caption"]:
            parsed = _parse(caption)
            matches = [i for i, m in enumerate(meanings) if m == _meaning(*parsed)]
            composed_hits += matches == [meanings.index(meaning)]
            assert _bag(*parsed) == bag
            bag_ties += sum(b == bag for b in bags) > 1
            n += 1
    assert composed_hits == n  # attributes bound to objects + relation: always the right image
    assert bag_ties / n >= 0.2  # the same words, another meaning: a bag of words must guess
    first = Counter((s.objects[0].colour, s.objects[0].shape) for s in test)
    shared = sum(first[(s.objects[0].colour, s.objects[0].shape)] > 1 for s in test)
    assert shared / len(test) >= 0.5
    words = [
        {w for o in s.objects for w in (o.size, o.colour, o.shape)} | {s.relation} for s in test
    ]
    counts = Counter(w for ws in words for w in ws)
    unique = sum(counts[w] == 1 for ws in words for w in ws) / sum(map(len, words))
    assert unique <= 0.1  # almost no single word singles out an image


def test_contrast_makes_minimal_pairs():
    def same_bag_neighbours(contrast: float) -> int:
        scenes = sample_scenes(200, np.random.default_rng(0), contrast=contrast)
        bags = [_bag(*_scene_meaning(s)) for s in scenes]
        return sum(x == y for x, y in itertools.pairwise(bags))

    assert same_bag_neighbours(0.0) <= 2 and same_bag_neighbours(1.0) >= 40
    scenes = sample_scenes(300, np.random.default_rng(1), max_objects=2)
    assert {len(s.objects) for s in scenes} == {2}
    assert len({_scene_meaning(s) for s in scenes}) == 300
    assert Counter(s.relation for s in scenes).keys() == set(RELATION_WORDS)
