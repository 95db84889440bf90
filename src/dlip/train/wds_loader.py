"""Pretraining batches from `dlip data shard` directories (the webdataset pipeline).

`build_loader` (dlip.train.loop) uses this when `data.manifests` names shard directories;
jsonl manifests and shard dirs cannot be mixed in one run (convert the manifests with
`dlip data shard`). Every dir needs its `index.json` (it gives the sample count).

Sources: with `data.weights`, each sample is drawn from dir i with probability
w_i / sum(w) (`WeightedMix`); without, the weights are the dirs' sample counts from their
index.json, i.e. the mix is a concatenation in expectation. Shards are always drawn with
replacement (resampled), so every rank and worker reads an endless stream of its own.

Epoch: a fixed number of batches per rank,
    len(loader) = total samples of all dirs (index.json) // (batch_size * world_size),
so every rank takes the same number of steps; an epoch therefore sees about as many samples
as the sources hold, drawn with replacement, not each sample exactly once.

Order: a function of (seed, epoch, rank, num_workers) (`set_epoch`): the pipeline's shard
draws, mix and shuffle buffer are seeded from them, and so is the generator that gives the
DataLoader workers their base seed, so worker-side augmentations repeat too.

Resume: `iter_from(skip)` reads and discards the first `skip` batches of the epoch. That
costs their decoding, but the order is exact whatever samples were bad (skipping raw samples
before decoding would drift when bad ones are dropped). With num_workers > 0 the discarded
batches also advance the workers' augmentation RNG as the uninterrupted run did; with
num_workers = 0 the transforms draw from the process RNG, so resumed crops may differ.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator, Sequence
from itertools import islice
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from dlip.data.shards import INDEX_NAME, read_shard_index, shard_urls
from dlip.data.webdata import SharedEpoch, wds_pipeline

SHUFFLE_BUFFER = 1000  # samples (JPEG bytes, before decoding) per worker


def is_shard_dir(path: str | Path) -> bool:
    """A `data.manifests` entry that is a directory (a shard dir) rather than a jsonl file."""
    return Path(path).is_dir()


def dir_samples(path: str | Path) -> int:
    """Samples in a complete shard dir, from its index.json (errors name the file)."""
    path = Path(path)
    if not (path / INDEX_NAME).is_file():
        raise FileNotFoundError(
            f"data.manifests entry {path} is a directory without {INDEX_NAME}: training reads "
            "shard dirs written by `dlip data shard` (their index gives the sample count)"
        )
    shard_urls(path)  # an incomplete shard set is an error here, before training starts
    samples = int(read_shard_index(path)["samples"])
    if samples < 1:
        raise ValueError(f"{path / INDEX_NAME}: the shard dir holds no samples")
    return samples


def check_sources(entries: Sequence[str | Path]) -> list[Path]:
    """The shard dirs of `data.manifests`; a mix of dirs and jsonl files is an error."""
    paths = [Path(e) for e in entries]
    dirs = [p for p in paths if is_shard_dir(p)]
    if dirs and len(dirs) != len(paths):
        files = [str(p) for p in paths if not is_shard_dir(p)]
        raise ValueError(
            f"data.manifests mixes shard dirs {[str(d) for d in dirs]} with jsonl manifests "
            f"(or data.synth_dir) {files}: give shard dirs only or manifests only "
            "(`dlip data shard` converts a manifest)"
        )
    return dirs


def _seed(*parts: object) -> int:
    """A 63-bit seed from its parts (str seeding hashes with sha512: stable across runs)."""
    return random.Random("/".join(map(str, parts))).getrandbits(63)


class WdsLoader:
    """Batches of a weighted mix of shard dirs, `length` per epoch (see the module docstring).

    Batches are webdata's {"image": (B, 3, S, S), "caption", "image_id", "source", "skipped"}.
    """

    def __init__(
        self,
        dirs: Sequence[str | Path],
        transform: Any,
        batch_size: int,
        *,
        weights: Sequence[float] = (),
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        num_workers: int = 0,
        max_words: int = 30,
        shuffle_buffer: int = SHUFFLE_BUFFER,
        pin_memory: bool = False,
    ) -> None:
        if not dirs:
            raise ValueError("no shard dirs given")
        if weights and len(weights) != len(dirs):
            raise ValueError(f"data.weights {list(weights)} need one weight per shard dir")
        sizes = [dir_samples(d) for d in dirs]
        self.total_samples = sum(sizes)
        self.batch_size, self.world_size = batch_size, world_size
        self.length = self.total_samples // (batch_size * world_size)
        self.weights = [float(w) for w in weights] if weights else [float(s) for s in sizes]
        self.seed, self.rank, self.epoch = seed, rank, 0
        self.shared_epoch = SharedEpoch(0)
        urls = [shard_urls(d) for d in dirs]
        pipeline = wds_pipeline(
            urls[0] if len(urls) == 1 else urls,
            transform,
            batch_size,
            weights=None if len(urls) == 1 else self.weights,
            seed=seed,
            epoch=self.shared_epoch,
            resampled=True,
            shuffle_buffer=shuffle_buffer,
            max_words=max_words,
            partial=False,
        )
        # Each worker yields its share (round robin in the DataLoader); `__iter__` cuts the
        # total at `length`, so the first `length` batches do not depend on the rounding.
        per_worker = math.ceil(self.length / max(1, num_workers)) if self.length else 0
        self.pipeline = pipeline.with_epoch(nbatches=per_worker)
        self.generator = torch.Generator()
        self.loader = DataLoader(
            self.pipeline,
            batch_size=None,
            num_workers=num_workers,
            generator=self.generator,
            pin_memory=pin_memory,
        )
        self.num_workers = num_workers
        self.set_epoch(0)

    def __len__(self) -> int:
        return self.length

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.shared_epoch.set_value(epoch)
        # The DataLoader draws its workers' base seed from this when an epoch starts.
        self.generator.manual_seed(_seed(self.seed, epoch, self.rank, "workers"))

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return self.iter_from(0)

    def iter_from(self, skip: int) -> Iterator[dict[str, Any]]:
        """This epoch's batches after the first `skip`, which are read and discarded."""
        if self.length == 0:
            return
        batches = iter(self.loader)
        try:
            yield from islice(batches, skip, self.length)
        finally:
            shutdown = getattr(batches, "_shutdown_workers", None)
            if shutdown is not None:  # stop the workers now, not when collected
                shutdown()


def build_wds_loader(cfg: Any, transform: Any, dirs: Sequence[Path]) -> WdsLoader:
    """The training loader of a config whose `data.manifests` are shard dirs."""
    from dlip.distributed import get_rank, get_world_size

    d = cfg.data
    return WdsLoader(
        dirs,
        transform,
        d.batch_size,
        weights=tuple(d.weights),
        seed=cfg.run.seed,
        rank=get_rank(),
        world_size=get_world_size(),
        num_workers=d.num_workers,
        max_words=d.max_words,
    )
