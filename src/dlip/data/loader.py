"""Batches from map-style datasets: a collate that drops bad samples, seeded DataLoaders.

A dataset item is a dict of fields, or `Skipped(reason)` for a bad sample (reason from
`common.REASONS`). `collate` stacks the good ones and puts the per-batch counts of the bad
ones in `batch["skipped"]`, so the counts travel from any number of worker processes to the
main process with the batches themselves; `drop_skipped` accumulates them and hides batches
that ended up empty:

    loader = make_loader(dataset, batch_size=32, shuffle=True, num_workers=4, seed=0)
    skipped = SkipCounts()
    for epoch in range(epochs):
        loader.set_epoch(epoch)
        for batch in drop_skipped(loader, skipped):
            ...
        log(skipped.summary())

Data order and augmentation are functions of (seed, epoch, rank) when num_workers > 0: the
sampler permutes with a generator seeded from them, and the DataLoader draws its workers' base
seed from a generator reseeded from them in `set_epoch`; torch's worker loop then seeds torch,
numpy and `random` in worker i from base seed + i (tests/test_datasets.py checks all three).
With num_workers=0 the transforms draw from the main process's global torch RNG.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

from dlip.data.common import REASONS, SkipCounts


@dataclass(frozen=True)
class Skipped:
    """What a dataset returns in place of a bad sample; `collate` counts it by `reason`."""

    reason: str
    index: int = -1

    def __post_init__(self) -> None:
        if self.reason not in REASONS:
            raise ValueError(f"unknown skip reason {self.reason!r}")


def _stack(key: str, values: list[Any]) -> Any:
    first = values[0]
    if isinstance(first, torch.Tensor):
        shapes = {tuple(v.shape) for v in values}
        if len(shapes) > 1:
            raise ValueError(f"collate: field {key!r} has tensors of different shapes {shapes}")
        return torch.stack(values)  # (B, ...)
    if isinstance(first, bool):
        return torch.tensor(values, dtype=torch.bool)
    if isinstance(first, int):
        return torch.tensor(values, dtype=torch.long)  # (B,)
    if isinstance(first, float):
        return torch.tensor(values, dtype=torch.float32)
    return values  # strings and anything else stay a list


def collate(samples: Sequence[dict[str, Any] | Skipped | None]) -> dict[str, Any]:
    """Stack the good samples field by field; count the `Skipped` ones in `batch["skipped"]`.

    Tensors are stacked (B, ...), ints become a long tensor (B,), strings a list. A `None`
    (a dataset that does not say why) is dropped and counted as "unknown". A batch whose
    samples were all bad holds only "skipped".
    """
    skipped = SkipCounts()
    good: list[dict[str, Any]] = []
    for sample in samples:
        if sample is None:
            skipped.add("unknown")
        elif isinstance(sample, Skipped):
            skipped.add(sample.reason)
        else:
            good.append(sample)
    batch: dict[str, Any] = {}
    if good:
        keys = list(good[0])
        for n, sample in enumerate(good[1:], 1):
            if list(sample) != keys:
                raise ValueError(f"collate: sample {n} has fields {list(sample)}, expected {keys}")
        batch = {key: _stack(key, [s[key] for s in good]) for key in keys}
    batch["skipped"] = skipped
    return batch


def batch_size_of(batch: dict[str, Any]) -> int:
    """Number of samples in a collated batch (0 when every sample was bad)."""
    for key, value in batch.items():
        if key != "skipped":
            return len(value)
    return 0


def drop_skipped(batches: Iterable[dict[str, Any]], counts: SkipCounts) -> Iterator[dict[str, Any]]:
    """Yield the non-empty batches without their "skipped" field, adding it to `counts`."""
    for batch in batches:
        counts.update(batch.pop("skipped", SkipCounts()))
        if batch_size_of(batch):
            yield batch


def _mix(*parts: int) -> int:
    """A 63-bit seed from integers, so (seed, epoch, rank) streams do not overlap."""
    state = np.random.SeedSequence([p % 2**64 for p in parts]).generate_state(1, np.uint64)
    return int(state[0]) >> 1  # torch seeds must fit a signed 64-bit int


class EpochSampler(Sampler[int]):
    """Indices 0..n-1, shuffled with a generator seeded from (seed, epoch) when `shuffle`."""

    def __init__(self, n: int, shuffle: bool, seed: int = 0) -> None:
        self.n, self.shuffle, self.seed, self.epoch = n, shuffle, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        if not self.shuffle:
            return iter(range(self.n))
        g = torch.Generator().manual_seed(_mix(self.seed, self.epoch))
        return iter(torch.randperm(self.n, generator=g).tolist())

    def __len__(self) -> int:
        return self.n


class Loader(DataLoader):
    """A DataLoader with `set_epoch`: reshuffles and reseeds the workers per (seed, epoch)."""

    def __init__(self, dataset: Dataset, *, seed: int, rank: int, **kwargs: Any) -> None:
        super().__init__(dataset, generator=torch.Generator(), **kwargs)
        self.seed, self.rank, self.epoch = seed, rank, 0
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.sampler.set_epoch(epoch)  # EpochSampler or DistributedSampler
        # The workers' base seed is drawn from this generator when an epoch's iterator starts.
        self.generator.manual_seed(_mix(self.seed, epoch, self.rank, 1))


def _dist_initialized() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def make_loader(
    dataset: Dataset,
    batch_size: int,
    shuffle: bool = True,
    num_workers: int = 0,
    seed: int = 0,
    drop_last: bool = False,
    distributed: bool | None = None,
    pin_memory: bool = False,
) -> Loader:
    """A seeded DataLoader over a map-style dataset whose batches are `collate`'s dicts.

    `distributed`: None (default) uses a DistributedSampler exactly when torch.distributed is
    initialized; True requires it. Call `loader.set_epoch(epoch)` before each epoch.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if distributed is None:
        distributed = _dist_initialized()
    elif distributed and not _dist_initialized():
        raise RuntimeError("make_loader(distributed=True) needs torch.distributed initialized")
    if distributed:
        sampler: Sampler[int] = DistributedSampler(
            dataset, shuffle=shuffle, seed=seed, drop_last=drop_last
        )
        rank = torch.distributed.get_rank()
    else:
        sampler, rank = EpochSampler(len(dataset), shuffle, seed), 0
    return Loader(
        dataset,
        seed=seed,
        rank=rank,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=num_workers,
        collate_fn=collate,
        drop_last=drop_last,
        pin_memory=pin_memory,
    )
