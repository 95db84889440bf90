"""Pretraining from `dlip data shard` directories: weighted sources, fixed-length epochs,
(seed, epoch, rank) order, resume by reading past consumed batches, and the input errors."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from dlip.cli.train import pretrain_main as main
from dlip.data.common import read_manifest, write_manifest
from dlip.data.shards import INDEX_NAME, write_shards
from dlip.data.synthetic import synthesize
from dlip.models.presets import get_config
from dlip.train.config import load
from dlip.train.loop import epoch_batches
from dlip.train.pretrain import build_loader
from dlip.train.wds_loader import WdsLoader
from dlip.transforms import eval_transform, train_transform

N = 24  # samples per source
CONFIG = get_config("test_tiny")  # 32 px


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> list[Path]:
    """Two shard dirs of N samples each, sources "a" and "b" (captions tagged by source)."""
    tmp = tmp_path_factory.mktemp("wds")
    synthesize(tmp / "synth", N, seed=0, image_size=32, captions_per_image=2)  # 28 rows
    rows = list(read_manifest(tmp / "synth" / "manifest.jsonl"))[:N]
    dirs = []
    for name in ("a", "b"):
        tagged = [dict(r, source=name, caption=f"{name} {r['caption']}") for r in rows]
        write_manifest(tagged, tmp / f"{name}.jsonl")
        write_shards(tmp / f"{name}.jsonl", tmp / name, max_side=32, shard_size=8, progress=False)
        dirs.append(tmp / name)
    assert all(json.loads((d / INDEX_NAME).read_text())["samples"] == N for d in dirs)
    return dirs


def cfg_items(dirs, run_dir, weights=(3.0, 1.0), **extra) -> dict[str, object]:
    items = {
        "run_dir": str(run_dir),
        "max_steps": 3,
        "model.preset": "test_tiny",
        "data.manifests": "[" + ", ".join(str(d) for d in dirs) + "]",
        "data.weights": "[" + ", ".join(map(str, weights)) + "]",
        "data.batch_size": 4,
        "data.num_workers": 0,
        "data.max_length": 20,
        "loss.queue_size": 16,
        "optim.warmup_steps": 1,
        "run.log_every": 1,
        "run.ckpt_every": 2,
        **extra,
    }
    return items


def argv(items: dict[str, object]) -> list[str]:
    return [f"{k}={v}" for k, v in items.items()]


def loader(dirs, *, workers=0, seed=0, transform=None, buffer=20) -> WdsLoader:
    return WdsLoader(
        dirs, transform or eval_transform(CONFIG), 4, weights=(3.0, 1.0), seed=seed,
        num_workers=workers, shuffle_buffer=buffer,
    )  # fmt: skip


def captions(batches) -> list[str]:
    return [c for b in batches for c in b["caption"]]


def test_build_loader_batches_length_and_sources(sources, tmp_path):
    cfg = load(None, argv(cfg_items(sources, tmp_path / "run")))
    wds = build_loader(cfg, CONFIG)
    assert isinstance(wds, WdsLoader)
    assert len(wds) == 2 * N // 4  # all samples // (batch_size * world_size)
    batches = list(epoch_batches(wds, 0, 0))
    assert len(batches) == len(wds)
    for b in batches:
        assert b["image"].shape == (4, 3, 32, 32)  # (B, 3, S, S)
        assert b["image"].dtype == torch.float32 and len(b["caption"]) == 4
        assert not b["skipped"]
    drawn = [s for b in batches for s in b["source"]]
    assert set(drawn) == {"a", "b"} and drawn.count("a") > drawn.count("b")  # weights 3:1
    assert all(c.split()[0] == s for c, s in zip(captions(batches), drawn, strict=True))


def test_order_is_a_function_of_seed_epoch_and_rank(sources, monkeypatch):
    wds = loader(sources)
    wds.set_epoch(0)
    first = captions(wds)
    wds.set_epoch(1)
    second = captions(wds)
    wds.set_epoch(0)
    assert captions(wds) == first and second != first
    assert captions(loader(sources)) == first  # a fresh loader: same order
    assert captions(loader(sources, seed=1)) != first
    for k, v in {"RANK": 1, "WORLD_SIZE": 2}.items():  # what webdataset reads the rank from
        monkeypatch.setenv(k, str(v))
    other = WdsLoader(
        sources, eval_transform(CONFIG), 4, weights=(3.0, 1.0), rank=1, world_size=2,
        shuffle_buffer=20,
    )  # fmt: skip
    assert len(other) == 2 * N // (4 * 2)
    assert captions(other) != first[: 4 * len(other)]


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_skip_reproduces_the_uninterrupted_batches(sources, workers):
    # The train transform (random crops) checks that worker-side augmentation repeats too.
    wds = loader(sources, workers=workers, transform=train_transform(CONFIG, 0.2, False, True))
    whole = list(epoch_batches(wds, 1, 0))
    assert len(whole) == len(wds) == 12
    for consumed in (1, 5, 11):
        rest = list(epoch_batches(wds, 1, consumed))
        assert captions(rest) == captions(whole[consumed:])
        assert [b["image_id"] for b in rest] == [b["image_id"] for b in whole[consumed:]]
        if workers:  # num_workers = 0 draws crops from the process RNG (module docstring)
            pairs = zip(rest, whole[consumed:], strict=True)
            assert all(torch.equal(a["image"], b["image"]) for a, b in pairs)
    assert list(epoch_batches(wds, 1, len(wds))) == []


def test_pretrain_from_weighted_shard_dirs(sources, tmp_path):
    run_dir = tmp_path / "run"
    assert main(argv(cfg_items(sources, run_dir))) == 0
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in rows)
    assert (run_dir / "final").is_dir() and any((run_dir / "final").iterdir())


def test_bad_sources_are_clear_errors(sources, tmp_path):
    jsonl = sources[0].parent / "a.jsonl"
    cfg = load(None, argv(cfg_items([sources[0], jsonl], tmp_path / "r1")))
    with pytest.raises(ValueError, match="shard dirs only or manifests only"):
        build_loader(cfg, CONFIG)
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "000000.tar").write_bytes((sources[0] / "000000.tar").read_bytes())
    cfg = load(None, argv(cfg_items([sources[0], bare], tmp_path / "r2")))
    with pytest.raises(FileNotFoundError, match=f"{re.escape(str(bare))}.*{INDEX_NAME}"):
        build_loader(cfg, CONFIG)
    cfg = load(None, argv(cfg_items([jsonl], tmp_path / "r3", weights=(2.0,))))
    with pytest.raises(ValueError, match=r"data\.weights .* needs shard dirs"):
        build_loader(cfg, CONFIG)
