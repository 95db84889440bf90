"""Map-style datasets, evaluation sets and the loader: bad samples are skipped and counted exactly,
even across DataLoader worker processes; seeding makes order and augmentation reproducible."""

from __future__ import annotations

import json
import random
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import Dataset, DistributedSampler

import dlip
from dlip.data.common import SkipCounts
from dlip.data.datasets import (
    CaptionTrainDataset,
    EvalImageDataset,
    ManifestDataset,
    PackedRows,
    RetrievalTrainDataset,
    clean_caption,
    eval_texts,
)
from dlip.data.karpathy import load_eval_set
from dlip.data.loader import Skipped, collate, drop_skipped, make_loader
from dlip.transforms import eval_transform, train_transform

torch.set_num_threads(1)
PHOTOS = Path(dlip.__file__).parent / "assets" / "photos"
NAMES = ("astronaut", "chelsea", "coffee")


@pytest.fixture(scope="module")
def config():
    return dlip.get_config("test_tiny")


def _row(image: str | Path, caption: str, image_id: str) -> dict[str, str]:
    return {"image": str(image), "caption": caption, "source": "test", "image_id": image_id}


@pytest.fixture(scope="module")
def manifest(tmp_path_factory) -> tuple[Path, list[str], Counter]:
    """A jsonl manifest: 6 good rows (3 real photos x 2 captions) + 8 bad ones of known reasons."""
    tmp = tmp_path_factory.mktemp("manifest")
    good = [_row(PHOTOS / f"{n}.jpg", f"A photo of {n} #{k}.", n) for n in NAMES for k in (1, 2)]
    (tmp / "random.jpg").write_bytes(np.random.default_rng(0).bytes(2000))
    coffee = (PHOTOS / "coffee.jpg").read_bytes()
    (tmp / "truncated.jpg").write_bytes(coffee[: len(coffee) // 2])
    (tmp / "empty.jpg").write_bytes(b"")
    bad = [
        (_row(tmp / "missing.jpg", "a missing file", "m"), "missing_file"),
        (_row(tmp / "random.jpg", "random bytes", "r"), "not_an_image"),
        (_row(tmp / "truncated.jpg", "half a jpeg", "t"), "truncated"),
        (_row(tmp / "empty.jpg", "a zero-byte file", "e"), "empty_image"),
        (_row(PHOTOS / "coffee.jpg", "", "c"), "empty_caption"),
        (_row(PHOTOS / "coffee.jpg", " \t\n ", "c"), "empty_caption"),
        (_row(PHOTOS / "coffee.jpg", "...", "c"), "empty_caption"),  # nothing after pre_caption
        (_row(PHOTOS / "coffee.jpg", "\udc80 mangled", "c"), "bad_text"),  # a lone surrogate
    ]
    rows = [r for pair in zip(good, [b for b, _ in bad], strict=False) for r in pair]
    rows += [b for b, _ in bad[len(good) :]]
    path = tmp / "m.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")  # ascii escapes
    captions = [f"a photo of {n} {k}" for n in NAMES for k in (1, 2)]
    return path, captions, Counter(reason for _, reason in bad)


def test_two_worker_loader_yields_exactly_the_good_samples(manifest, config):
    path, captions, reasons = manifest
    dataset = ManifestDataset(path, train_transform(config))
    assert len(dataset) == 14
    loader = make_loader(dataset, batch_size=3, shuffle=True, num_workers=2, seed=0)
    skipped, seen = SkipCounts(), []
    for batch in drop_skipped(loader, skipped):
        assert batch["image"].shape == (len(batch["caption"]), 3, 32, 32)
        assert batch["image"].dtype == torch.float32 and batch["index"].dtype == torch.long
        assert "skipped" not in batch
        seen += batch["caption"]
    assert sorted(seen) == sorted(captions)
    assert skipped == reasons
    assert skipped.summary() == (
        "skipped 8 (bad_text 1, empty_caption 3, empty_image 1, missing_file 1, "
        "not_an_image 1, truncated 1)"
    )


def test_items_are_dicts_or_skips(manifest, config):
    path, _, _ = manifest
    dataset = ManifestDataset(path, eval_transform(config), max_words=3)
    item = dataset[0]
    assert set(item) == {"image", "caption", "image_id", "index"}
    assert (
        item["caption"] == "a photo of" and item["image_id"] == "astronaut" and item["index"] == 0
    )
    assert dataset[1] == Skipped("missing_file", 1)


def test_in_memory_rows_and_bad_text():
    rows = [
        {"image": "a.jpg", "caption": b"\xff\xfe not utf-8"},
        {"image": "a.jpg", "caption": None},
        {"image": "b.jpg", "caption": "fine", "image_id": "b7"},
    ]
    dataset = ManifestDataset(rows, transform=lambda im: im)
    assert dataset[0] == Skipped("bad_text", 0) and dataset[1] == Skipped("bad_text", 1)
    assert dataset[2] == Skipped("missing_file", 2)  # caption checked first, then the image
    assert dataset.rows[0]["image_id"] == "a.jpg" and dataset.rows[2]["image_id"] == "b7"
    with pytest.raises(ValueError, match="row 1: expected a dict with 'image' and 'caption'"):
        ManifestDataset([rows[2], {"image": "x.jpg"}], transform=lambda im: im)


def test_packed_rows_round_trip():
    rows = [{"caption": "caf\u00e9 \udc80", "b": b"\x00\xff", "n": i} for i in range(5)]
    packed = PackedRows(rows)
    assert len(packed) == 5 and [packed[i] for i in range(5)] == rows


def test_retrieval_image_idx_is_contiguous_per_image_id(config):
    ids = ["b", "a", "b", "c", "a"]
    rows = [_row(PHOTOS / "chelsea.jpg", f"caption {k}", i) for k, i in enumerate(ids)]
    dataset = RetrievalTrainDataset(rows, eval_transform(config))
    assert dataset.image_idx.tolist() == [0, 1, 0, 2, 1] and dataset.num_images == 3
    batch = collate([dataset[i] for i in range(5)])
    assert batch["image_idx"].tolist() == [0, 1, 0, 2, 1]
    assert batch["caption"] == [f"caption {k}" for k in range(5)]


def test_caption_dataset_prefixes_the_prompt(config):
    rows = [_row(PHOTOS / "coffee.jpg", "A CUP of coffee, on a table.", "c")]
    assert CaptionTrainDataset(rows, eval_transform(config))[0]["caption"] == (
        "a picture of a cup of coffee, on a table"
    )
    assert ManifestDataset(rows, eval_transform(config), prompt="x: ")[0]["caption"] == (
        "x: a cup of coffee, on a table"
    )
    assert clean_caption("one two three four", max_words=2, prompt="p ") == "p one two"


def _eval_json(tmp_path: Path, entries: list[dict]) -> Path:
    path = tmp_path / "test.json"
    path.write_text(json.dumps(entries), encoding="utf-8")
    return path


def test_eval_set_maps_texts_and_images(tmp_path, config):
    entries = [
        {"image": "chelsea.jpg", "caption": [f"A cat, number {k}." for k in range(5)]},
        {"image": "coffee.jpg", "caption": [f"Coffee {k}!" for k in range(5)], "image_id": "7"},
    ]
    ev = load_eval_set(_eval_json(tmp_path, entries), PHOTOS)
    assert ev.images == [str(PHOTOS / "chelsea.jpg"), str(PHOTOS / "coffee.jpg")]
    assert ev.image_ids == ["chelsea", "7"]  # neither COCO nor Flickr: own id, else file stem
    texts = eval_texts(ev)
    assert texts[:2] == ["a cat, number 0", "a cat, number 1"] and texts[9] == "coffee 4"
    assert ev.txt2img == [0] * 5 + [1] * 5
    assert ev.img2txt == [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]]
    images = EvalImageDataset(ev, eval_transform(config))
    batch = collate([images[0], images[1]])
    assert batch["image"].shape == (2, 3, 32, 32) and batch["image_id"] == ["chelsea", "7"]


def test_eval_texts_refuse_a_caption_cleaning_empties(tmp_path):
    entries = [{"image": "chelsea.jpg", "caption": ["a cat", "..."]}]
    ev = load_eval_set(_eval_json(tmp_path, entries), PHOTOS)
    with pytest.raises(ValueError, match=r"caption 1 of .*chelsea.jpg \('\.\.\.'\)"):
        eval_texts(ev)


def test_eval_image_error_names_the_file(tmp_path, config):
    (tmp_path / "bad.jpg").write_bytes(b"not an image")
    ev = load_eval_set(_eval_json(tmp_path, [{"image": "bad.jpg", "caption": ["c"]}]), tmp_path)
    with pytest.raises(ValueError, match=r"bad\.jpg: not_an_image"):
        EvalImageDataset(ev, eval_transform(config))[0]


def test_collate_contract():
    a = {"x": torch.zeros(2, 3), "n": 1, "s": "a", "f": 0.5}
    b = {"x": torch.ones(2, 3), "n": 2, "s": "b", "f": 1.5}
    batch = collate([a, Skipped("truncated"), b, None, Skipped("truncated")])
    assert batch["x"].shape == (2, 2, 3) and batch["n"].tolist() == [1, 2]
    assert batch["s"] == ["a", "b"] and batch["f"].dtype == torch.float32
    assert batch["skipped"] == {"truncated": 2, "unknown": 1}
    assert collate([Skipped("missing_file")]) == {"skipped": {"missing_file": 1}}
    with pytest.raises(ValueError, match="sample 1 has fields"):
        collate([a, {"x": torch.zeros(2, 3)}])
    with pytest.raises(ValueError, match="different shapes"):
        collate([a, {**b, "x": torch.ones(3, 3)}])
    with pytest.raises(ValueError, match="unknown skip reason"):
        Skipped("cosmic_ray")
    counts = SkipCounts()
    assert list(drop_skipped([collate([Skipped("truncated")]), batch], counts)) == [batch]
    assert counts == {"truncated": 3, "unknown": 1}


class _Draws(Dataset):
    """Each item: the next draws of torch's, numpy's and Python's RNG in the process running it."""

    def __len__(self) -> int:
        return 8

    def __getitem__(self, index: int) -> dict:
        draws = (torch.randint(1 << 30, ()).item(), int(np.random.randint(1 << 30)))
        return {"index": index, "draws": torch.tensor([*draws, random.getrandbits(30)])}


def _epoch(loader, epoch: int) -> tuple[list[int], torch.Tensor]:
    loader.set_epoch(epoch)
    batches = list(loader)
    order = [i for b in batches for i in b["index"].tolist()]
    return order, torch.cat([b["draws"] for b in batches])  # (8, 3)


def test_order_and_worker_seeds_are_functions_of_seed_and_epoch():
    loader = make_loader(_Draws(), batch_size=2, shuffle=True, num_workers=2, seed=5)
    order0, draws0 = _epoch(loader, 0)
    order1, draws1 = _epoch(loader, 1)
    again0, redraw0 = _epoch(loader, 0)
    assert sorted(order0) == list(range(8)) and order0 == again0 and order0 != order1
    assert torch.equal(draws0, redraw0) and not torch.equal(draws0, draws1)
    for column in range(3):  # torch, numpy and random each differ between the two workers
        assert len(set(draws0[:, column].tolist())) == 8
    other_seed, _ = _epoch(make_loader(_Draws(), batch_size=2, seed=6), 0)
    assert other_seed != order0
    in_order, _ = _epoch(make_loader(_Draws(), batch_size=3, shuffle=False), 3)
    assert in_order == list(range(8))


def test_distributed_sampler_when_initialized(tmp_path):
    with pytest.raises(RuntimeError, match=r"torch\.distributed initialized"):
        make_loader(_Draws(), batch_size=2, distributed=True)
    dist = torch.distributed
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/pg", rank=0, world_size=1)
    try:
        loader = make_loader(_Draws(), batch_size=2, seed=1)
        assert isinstance(loader.sampler, DistributedSampler)
        order, _ = _epoch(loader, 0)
        assert sorted(order) == list(range(8)) and _epoch(loader, 0)[0] == order
        assert _epoch(loader, 1)[0] != order
    finally:
        dist.destroy_process_group()
