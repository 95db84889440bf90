"""A procedurally generated image-caption dataset (`dlip data synth`): shapes, colours, relations.

Each image shows 2-3 flat shapes on a noisy, textured grey background; each caption names all of
them and the spatial relation of the first two. Learnable (a caption pins down its scene) but not
trivial: every word is shared by many images, so retrieval must bind attributes to objects and
read the relation.

Grammar. Scenes (positions are fractions of the image side, y grows downwards)::

    scene    := subject relation reference distractor?   (distractor with p=0.4; objects differ)
    object   := size colour shape            size: small | large (bounding radius 0.09 | 0.16)
    colour   := red | orange | yellow | green | blue | purple | white | black
    shape    := circle | square | triangle | star | diamond | cross
    relation := left of | right of | above | below | next to

A directional relation puts the bounding circles >= 0.12 apart along its axis and the centres at
most half as far apart across it as along it; `next to` leaves a 0.02-0.06 gap (any direction);
a distractor keeps a 0.06 gap and has no stated relation. With probability `contrast` a scene is
a minimal edit of the previous one in its split (relation flipped or changed, colours or shapes
swapped within the pair, one attribute changed), so test images come in pairs with one bag of
words and two meanings; no two scenes of a split mean the same (`Scene.key`). Captions::

    caption := (prefix? A rel B | A "is" rel B | prefix? B inv(rel) A | prefix? B "with" A its(rel)
                | "there is" B "and," its(rel) "," A) suffix(C)?     (random capital and ".")
    A, B, C := "a" size colour shape | "a" size shape "in" colour    (subject, reference, other)
    words   := SYNONYMS; rel, inv, its: RELATION_WORDS, same for the inverse, RELATION_IT_WORDS
    prefix  := "a picture of" | "an image of" | "a photo of";  suffix := [","] "and" | ", plus" ...

e.g. "a small red circle to the left of a large blue square", "there is a big blue square and, on
its left, a little red disc". At most 28 WordPiece tokens (BLIP's pretraining length 30 never
cuts one), and `pre_caption` changes only case and the final period.

Output of `synthesize`, in the BLIP/LAVIS Karpathy schemas with `out_dir` as the image root::

    images/synth_000000.jpg ...   train.json  [{"caption", "image", "image_id"}] one per caption
    val.json, test.json           [{"image", "caption": [5 captions]}] one per image
    manifest.jsonl                the train split as manifest rows (absolute paths, source "synth")
    scenes.jsonl                  every image's scene record (objects, positions, relation)
    synth.json                    the arguments it was built with (a reused set is checked)

Everything is a function of the seed: a rerun writes the same bytes.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from dlip.data.common import write_manifest
from dlip.fileio import atomic_write_text

SHAPES = ("circle", "square", "triangle", "star", "diamond", "cross")
# Saturated, mutually distant RGB values; none is grey, so none blends into the background.
COLOURS: dict[str, tuple[int, int, int]] = dict(red=(210, 40, 40), orange=(240, 140, 30))
COLOURS |= dict(yellow=(235, 215, 40), green=(40, 160, 60), blue=(40, 80, 210))
COLOURS |= dict(purple=(135, 55, 185), white=(240, 240, 240), black=(25, 25, 25))
SIZES: dict[str, float] = {"small": 0.09, "large": 0.16}  # bounding radius / image side
VALUES = {"shape": SHAPES, "colour": tuple(COLOURS), "size": tuple(SIZES)}  # by attribute
RELATIONS = ("left of", "right of", "above", "below", "next to")
INVERSE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
INVERSE["next to"] = "next to"

# Words a caption may use for each attribute value, the canonical name first. All are single
# bert-base-uncased tokens.
SYNONYMS: dict[str, tuple[str, ...]] = {v: (v,) for v in (*SHAPES, *COLOURS, *SIZES)}
SYNONYMS |= {"circle": ("circle", "disc"), "square": ("square", "block")}
SYNONYMS |= {"red": ("red", "crimson"), "purple": ("purple", "violet")}
SYNONYMS |= {"small": ("small", "little", "tiny"), "large": ("large", "big")}
# "A <phrase> B" for A <relation> B.
RELATION_WORDS: dict[str, tuple[str, ...]] = {
    "left of": ("to the left of", "left of", "on the left of"),
    "right of": ("to the right of", "right of", "on the right of"),
    "above": ("above", "over"),
    "below": ("below", "under", "beneath"),
    "next to": ("next to", "beside"),
}
# "B ... A <phrase>" for A <relation> B, the phrase pointing back at B.
RELATION_IT_WORDS: dict[str, tuple[str, ...]] = {
    "left of": ("to its left", "on its left"),
    "right of": ("to its right", "on its right"),
    "above": ("above it",),
    "below": ("below it", "under it"),
    "next to": ("next to it", "beside it"),
}
PREFIXES = ("a picture of ", "an image of ", "a photo of ")
SUFFIXES = (", and {}", " and {}", ", plus {}", " and also {}")
EVAL_CAPTIONS = 5  # captions per val/test image, as in the Karpathy COCO/Flickr splits
MIN_EVAL_IMAGES = 5  # default floor for the val and test splits
ANNOTATION_FILES = ("train.json", "val.json", "test.json", "manifest.jsonl", "scenes.jsonl")
SETTINGS_FILE = "synth.json"  # the arguments a set was built with

FAR_GAP, ALIGN = 0.12, 0.5  # directional relations: min gap along the axis, max across/along
NEAR_GAP = (0.02, 0.06)  # "next to": gap between bounding circles
FREE_GAP, P_DISTRACTOR = 0.06, 0.4  # a distractor's min gap to the others; its probability
NOISE, TEXTURE, JITTER = 10, 18, 12  # +- pixel noise, background texture, per-object colour


@dataclass(frozen=True)
class SceneObject:
    """One shape; x, y (centre) and r (bounding radius) are fractions of the image side."""

    shape: str
    colour: str
    size: str
    x: float = 0.0
    y: float = 0.0

    @property
    def r(self) -> float:
        return SIZES[self.size]

    @property
    def attrs(self) -> tuple[str, str, str]:
        return (self.size, self.colour, self.shape)


@dataclass(frozen=True)
class Scene:
    """`objects[0] <relation> objects[1]`; any further objects are unrelated distractors."""

    objects: tuple[SceneObject, ...]
    relation: str

    def key(self) -> tuple:
        """What the captions say about the scene, with equivalent statements made equal."""
        a, b = self.objects[0].attrs, self.objects[1].attrs
        rel = self.relation
        if rel in ("right of", "below"):
            a, b, rel = b, a, INVERSE[rel]
        elif rel == "next to":
            a, b = sorted((a, b))
        return (a, rel, b, tuple(sorted(o.attrs for o in self.objects[2:])))

    def to_dict(self) -> dict:
        objects = [asdict(o) | {"r": o.r} for o in self.objects]
        return {"relation": self.relation, "objects": objects}

    @classmethod
    def from_dict(cls, d: dict) -> Scene:
        """Inverse of `to_dict` (extra keys ignored); a bad value is a ValueError naming it."""
        objects = d.get("objects")
        if d.get("relation") not in RELATIONS or not isinstance(objects, list) or len(objects) < 2:
            raise ValueError(f"a scene needs a relation in {RELATIONS} and >= 2 objects: {d!r}")
        for o in objects:
            bad = [f for f, allowed in VALUES.items() if o.get(f) not in allowed]
            bad += [f for f in ("x", "y") if not isinstance(o.get(f), (int, float))]
            if bad:
                raise ValueError(f"scene object {o!r}: bad {bad} (allowed: {VALUES})")
        fields = ("shape", "colour", "size", "x", "y")
        return cls(tuple(SceneObject(*(o[f] for f in fields)) for o in objects), d["relation"])


def _pick(rng: np.random.Generator, options: tuple | list):
    return options[int(rng.integers(len(options)))]


def _random_spec(rng: np.random.Generator, max_objects: int) -> Scene:
    """A scene without positions: distinct objects and a relation."""
    n = 3 if max_objects >= 3 and rng.random() < P_DISTRACTOR else 2
    objects: list[SceneObject] = []
    while len(objects) < n:
        obj = SceneObject(*(_pick(rng, VALUES[f]) for f in ("shape", "colour", "size")))
        if all(obj.attrs != o.attrs for o in objects):
            objects.append(obj)
    return Scene(tuple(objects), _pick(rng, RELATIONS))


def _edit(scene: Scene, rng: np.random.Generator) -> Scene:
    """A minimal change of meaning: flip/change the relation, swap or change one attribute."""
    a, b, *rest = scene.objects
    kind = _pick(rng, ("flip", "relation", "swap_colour", "swap_shape", "change"))
    rel = scene.relation
    if kind == "flip" and rel != "next to":
        rel = INVERSE[rel]
    elif kind == "relation":
        rel = _pick(rng, tuple(r for r in RELATIONS if r != rel))
    elif kind == "swap_colour" and a.colour != b.colour:
        a, b = replace(a, colour=b.colour), replace(b, colour=a.colour)
    elif kind == "swap_shape" and a.shape != b.shape:
        a, b = replace(a, shape=b.shape), replace(b, shape=a.shape)
    else:  # change one attribute of the subject or the reference
        field = _pick(rng, ("shape", "colour", "size"))
        pair, i = [a, b], int(rng.integers(2))
        value = _pick(rng, tuple(v for v in VALUES[field] if v != getattr(pair[i], field)))
        pair[i] = replace(pair[i], **{field: value})
        a, b = pair
    return Scene((a, b, *rest), rel)


def _pair_ok(rel: str, a: np.ndarray, b: np.ndarray, ra: float, rb: float) -> np.ndarray:
    """Which candidate centre pairs a (N, 2), b (N, 2) satisfy `a <rel> b`."""
    dx, dy = b[:, 0] - a[:, 0], b[:, 1] - a[:, 1]  # (N,) each
    if rel == "next to":
        gap = np.hypot(dx, dy) - ra - rb
        return (gap >= NEAR_GAP[0]) & (gap <= NEAR_GAP[1])
    along, across = (dx, dy) if rel in ("left of", "right of") else (dy, dx)
    if rel in ("right of", "below"):
        along = -along
    return (along >= ra + rb + FAR_GAP) & (np.abs(across) <= ALIGN * along)


def _centres(rng: np.random.Generator, r: float) -> np.ndarray:
    """256 uniform centres (256, 2) that keep a bounding circle of radius r inside the image."""
    return rng.uniform(r + 0.01, 0.99 - r, size=(256, 2))


def _place(scene: Scene, rng: np.random.Generator) -> Scene | None:
    """The scene with positions satisfying its relation, or None if sampling failed."""
    a, b, *rest = scene.objects
    for _ in range(20):  # rejection sampling in batches; a candidate passes with p >= 1.5%
        ca, cb = _centres(rng, a.r), _centres(rng, b.r)
        ok = np.flatnonzero(_pair_ok(scene.relation, ca, cb, a.r, b.r))
        if ok.size:
            placed = [(*ca[ok[0]], a.r), (*cb[ok[0]], b.r)]
            break
    else:
        return None
    for obj in rest:
        cand = _centres(rng, obj.r)
        free = np.ones(len(cand), dtype=bool)
        for x, y, r in placed:
            free &= np.hypot(cand[:, 0] - x, cand[:, 1] - y) - r - obj.r >= FREE_GAP
        if not free.any():
            return None
        placed.append((*cand[np.flatnonzero(free)[0]], obj.r))
    objects = tuple(
        replace(o, x=round(float(x), 4), y=round(float(y), 4))
        for o, (x, y, _) in zip(scene.objects, placed, strict=True)
    )
    return Scene(objects, scene.relation)


def sample_scenes(
    n: int, rng: np.random.Generator, contrast: float = 0.5, max_objects: int = 3
) -> list[Scene]:
    """n placed scenes with pairwise different meanings; `contrast` = share of minimal edits."""
    scenes: list[Scene] = []
    seen: set[tuple] = set()
    failures = 0
    while len(scenes) < n:
        if scenes and rng.random() < contrast:
            spec = _edit(scenes[-1], rng)
        else:
            spec = _random_spec(rng, max_objects)
        distinct = len({o.attrs for o in spec.objects}) == len(spec.objects)
        scene = _place(spec, rng) if distinct and spec.key() not in seen else None
        if scene is None:
            failures += 1
            if failures > 1000 + 10 * n:
                raise ValueError(f"cannot draw {n} distinct scenes from the synthetic grammar")
            continue
        seen.add(scene.key())
        scenes.append(scene)
    return scenes


def _polar(cx: float, cy: float, radii: np.ndarray, degrees: np.ndarray) -> list[tuple]:
    t = np.deg2rad(degrees)  # (K,) vertex angles, clockwise on screen from +x
    return [tuple(p) for p in np.stack([cx + radii * np.cos(t), cy + radii * np.sin(t)], 1)]


def _shape_points(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    """Polygon vertices (pixels) of a shape inscribed in a circle of radius r."""
    if shape == "square":
        h = 0.8 * r
        return [(cx - h, cy - h), (cx + h, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
    if shape == "triangle":  # circumcentre shifted down so the bounding box sits near (cx, cy)
        return _polar(cx, cy + 0.15 * r, np.full(3, r), np.array([-90, 30, 150]))
    if shape == "star":
        radii = np.where(np.arange(10) % 2 == 0, r, 0.45 * r)  # (10,) outer/inner points
        return _polar(cx, cy, radii, np.arange(10) * 36 - 90)
    if shape == "diamond":
        return [(cx, cy - r), (cx + 0.7 * r, cy), (cx, cy + r), (cx - 0.7 * r, cy)]
    if shape == "cross":
        w = 0.35 * r
        pts = [(w, -r), (w, -w), (r, -w), (r, w), (w, w), (w, r)]
        pts += [(-x, -y) for x, y in pts]  # the other half, by point symmetry
        return [(cx + x, cy + y) for x, y in pts]
    raise ValueError(f"unknown shape {shape!r}")


def _background(size: int, rng: np.random.Generator) -> np.ndarray:
    """(size, size, 3) uint8 grey with a tint and a smooth low-frequency texture."""
    tone = rng.uniform(95, 165) + rng.uniform(-8, 8, size=3)  # (3,)
    coarse = rng.uniform(-TEXTURE, TEXTURE, size=(4, 4)).astype(np.float32)
    smooth = Image.fromarray(coarse).resize((size, size), Image.Resampling.BILINEAR)
    return np.clip(tone + np.asarray(smooth)[..., None], 0, 255).astype(np.uint8)


def render_scene(scene: Scene, size: int, rng: np.random.Generator) -> Image.Image:
    """Draw the scene (no anti-aliasing) on a textured background, then add pixel noise."""
    image = Image.fromarray(_background(size, rng))
    draw = ImageDraw.Draw(image)
    for obj in scene.objects:
        jitter = rng.integers(-JITTER, JITTER + 1, 3)
        fill = tuple(np.clip(np.add(COLOURS[obj.colour], jitter), 0, 255).tolist())
        cx, cy, r = obj.x * size, obj.y * size, obj.r * size
        if obj.shape == "circle":
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
        else:
            draw.polygon(_shape_points(obj.shape, cx, cy, r), fill=fill)
    pixels = np.asarray(image, dtype=np.int16) + rng.integers(-NOISE, NOISE + 1, (size, size, 3))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def _noun_phrase(obj: SceneObject, rng: np.random.Generator) -> str:
    size, colour = _pick(rng, SYNONYMS[obj.size]), _pick(rng, SYNONYMS[obj.colour])
    shape = _pick(rng, SYNONYMS[obj.shape])
    words = f"{size} {colour} {shape}" if rng.random() < 0.75 else f"{size} {shape} in {colour}"
    return ("an " if words[0] in "aeiou" else "a ") + words


def caption_scene(scene: Scene, rng: np.random.Generator) -> str:
    """One caption of the scene drawn from the grammar in the module docstring."""
    a, b = _noun_phrase(scene.objects[0], rng), _noun_phrase(scene.objects[1], rng)
    rel = scene.relation
    phrase, inverse = _pick(rng, RELATION_WORDS[rel]), _pick(rng, RELATION_WORDS[INVERSE[rel]])
    its = _pick(rng, RELATION_IT_WORDS[rel])
    template = int(rng.integers(5))
    text = (
        f"{a} {phrase} {b}",
        f"{a} is {phrase} {b}",
        f"{b} {inverse} {a}",
        f"there is {b} and, {its}, {a}",
        f"{b} with {a} {its}",
    )[template]
    if template in (0, 2, 4) and rng.random() < 0.25:
        text = _pick(rng, PREFIXES) + text
    for obj in scene.objects[2:]:
        text += _pick(rng, SUFFIXES).format(_noun_phrase(obj, rng))
    if rng.random() < 0.3:
        text = text[0].upper() + text[1:]
    return text + "." if rng.random() < 0.3 else text


def _distinct_captions(scene: Scene, n: int, rng: np.random.Generator) -> list[str]:
    """n captions that stay different after case and final period are normalised away."""
    captions: dict[str, str] = {}
    for _ in range(100 * n):
        text = caption_scene(scene, rng)
        captions.setdefault(text.lower().rstrip("."), text)
        if len(captions) == n:
            return list(captions.values())
    raise RuntimeError(f"could not draw {n} distinct captions for {scene}")


@dataclass(frozen=True)
class SynthReport:
    """What `synthesize` wrote: images and captions per split, and the annotation files."""

    out_dir: Path
    images: dict[str, int]
    captions: dict[str, int]
    files: tuple[Path, ...]

    def summary(self) -> str:
        splits = ", ".join(
            f"{s} {n} images / {self.captions[s]} captions" for s, n in self.images.items()
        )
        names = ", ".join(p.name for p in self.files)
        return f"synth: {splits} -> {self.out_dir} (images/, {names})"


def read_scenes(path: Path) -> dict[str, Scene]:
    """The scene of every image in a `scenes.jsonl`, keyed by the image's relative path."""
    scenes = {}
    with Path(path).open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            try:
                row = json.loads(line)
                scenes[row["image"]] = Scene.from_dict(row)
            except (ValueError, KeyError, TypeError, AttributeError) as err:
                raise ValueError(f"{path}:{n}: bad scene record ({err!r})") from None
    return scenes


def _split_sizes(n_images: int, n_val: int | None, n_test: int | None) -> dict[str, int]:
    default = max(MIN_EVAL_IMAGES, round(0.1 * n_images))
    n_val, n_test = (default if n is None else n for n in (n_val, n_test))
    if n_val < 1 or n_test < 1 or n_images - n_val - n_test < 1:
        raise ValueError(
            f"n_images={n_images} leaves no room for a train split next to {n_val} val and "
            f"{n_test} test images (val and test need at least 1 image each)"
        )
    return {"train": n_images - n_val - n_test, "val": n_val, "test": n_test}


def _check_args(
    seed: int, image_size: int, captions: int, contrast: float, max_objects: int, fmt: str
) -> None:
    checks = (
        (seed < 0, f"seed must be >= 0, got {seed}"),
        (image_size < 16, f"image_size must be at least 16 pixels, got {image_size}"),
        (captions < 1, f"captions_per_image must be >= 1, got {captions}"),
        (not 0 <= contrast <= 1, f"contrast must be in [0, 1], got {contrast}"),
        (max_objects not in (2, 3), f"max_objects must be 2 or 3, got {max_objects}"),
        (fmt not in ("jpg", "png"), f"image_format must be 'jpg' or 'png', got {fmt!r}"),
    )
    if errors := [msg for bad, msg in checks if bad]:
        raise ValueError("; ".join(errors))


def _prepare_out_dir(out_dir: Path, overwrite: bool) -> None:
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise FileExistsError(
            f"{out_dir} is not empty; pass overwrite=True (CLI: --overwrite) to replace a "
            "synthetic dataset written there before"
        )
    (out_dir / "images").mkdir(parents=True, exist_ok=True)


def _save_image(image: Image.Image, path: Path) -> None:
    if path.suffix == ".jpg":  # 4:4:4 keeps the flat colours of small shapes intact
        image.save(path, format="JPEG", quality=95, subsampling=0)
    else:
        image.save(path, format="PNG")


def synthesize(
    out_dir: Path | str,
    n_images: int,
    seed: int = 0,
    image_size: int = 64,
    *,
    n_val: int | None = None,
    n_test: int | None = None,
    captions_per_image: int = 5,
    contrast: float = 0.5,
    max_objects: int = 3,
    image_format: str = "jpg",
    overwrite: bool = False,
    origin: str = "synthesize",  # recorded: "data.synth_dir" when a run built it (synthdir.py)
) -> SynthReport:
    """Write the synthetic dataset to `out_dir` (layout in the module docstring).

    Val and test default to 10% of `n_images` each (at least 5); train gets the rest with
    `captions_per_image` captions per image, val/test get `EVAL_CAPTIONS` (5). `overwrite`
    allows a non-empty `out_dir` and removes stale `images/synth_*` files of an earlier run.
    """
    out_dir = Path(out_dir).resolve()
    sizes = _split_sizes(n_images, n_val, n_test)
    _check_args(seed, image_size, captions_per_image, contrast, max_objects, image_format)
    _prepare_out_dir(out_dir, overwrite)
    (out_dir / SETTINGS_FILE).unlink(missing_ok=True)  # written again last-but-one, when done
    settings = dict(n_images=n_images, seed=seed, image_size=image_size, n_val=n_val, n_test=n_test,
                    captions_per_image=captions_per_image, contrast=contrast, origin=origin,
                    max_objects=max_objects, image_format=image_format)  # fmt: skip
    width = max(6, len(str(n_images - 1)))
    records, train, evals = [], [], {"val": [], "test": []}
    idx = 0
    for split_no, (split, count) in enumerate(sizes.items()):
        # One stream per split for scenes, one per image for pixels and captions.
        split_rng = np.random.default_rng([seed, 0, split_no])
        scenes = sample_scenes(count, split_rng, contrast, max_objects)
        n_caps = captions_per_image if split == "train" else EVAL_CAPTIONS
        for scene in scenes:
            rel = f"images/synth_{idx:0{width}d}.{image_format}"
            image = render_scene(scene, image_size, np.random.default_rng([seed, 1, idx]))
            _save_image(image, out_dir / rel)
            caps = _distinct_captions(scene, n_caps, np.random.default_rng([seed, 2, idx]))
            image_id = f"synth_{idx}"
            records.append({"image_id": image_id, "image": rel, "split": split, **scene.to_dict()})
            if split == "train":
                train += [{"caption": c, "image": rel, "image_id": image_id} for c in caps]
            else:
                evals[split].append({"image": rel, "caption": caps})
            idx += 1
    keep = {Path(r["image"]).name for r in records}
    for path in (out_dir / "images").glob("synth_*.*"):  # images of an earlier, larger run
        if path.suffix in (".jpg", ".png") and path.name not in keep:
            path.unlink()
    files = _write_annotations(out_dir, records, train, evals, settings)
    return SynthReport(
        out_dir=out_dir,
        images=dict(sizes),
        captions={"train": len(train), **{s: EVAL_CAPTIONS * len(v) for s, v in evals.items()}},
        files=files,
    )


def _write_annotations(
    out_dir: Path,
    records: list[dict],
    train: list[dict],
    evals: dict[str, list[dict]],
    settings: dict,
) -> tuple[Path, ...]:
    atomic_write_text(out_dir / SETTINGS_FILE, json.dumps(settings, indent=1))  # reuse checks
    splits = (train, evals["val"], evals["test"])
    for name, anns in zip(("train.json", "val.json", "test.json"), splits, strict=True):
        atomic_write_text(out_dir / name, json.dumps(anns, ensure_ascii=False))
    atomic_write_text(out_dir / "scenes.jsonl", "".join(json.dumps(r) + "\n" for r in records))
    rows = ({**t, "image": str(out_dir / t["image"]), "source": "synth"} for t in train)
    write_manifest(rows, out_dir / "manifest.jsonl")
    return tuple(out_dir / name for name in ANNOTATION_FILES)
