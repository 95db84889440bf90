"""Pretraining batches from webdataset sources (the pipeline of dlip.data.webdata).

`build_loader` (dlip.train.pretrain) uses this when `data.manifests` names webdataset sources
instead of jsonl manifests. The two are read by different loaders and cannot be mixed in one
run (`dlip data shard` converts a manifest). Each entry is one source (`WebSource`), typed by
`source_kind`:

    shard_dir  a `dlip data shard` directory; its index.json lists and counts the shards
    tar_dir    any other folder of .tar files, as img2dataset's webdataset output is
               (NNNNN.tar + NNNNN_stats.json: counted as the sum of the stats' "successes")
    tars       local .tar paths: one, a brace pattern (/data/cc3m/{00000..00331}.tar) or a
               "::"-joined list; counted like tar_dir when every tar has its _stats.json
    url        SCHEME://... (http, https), brace-expanded; streamed by webdataset's gopen (curl)
    pipe       pipe:COMMAND writing a tar to stdout (pipe:aws s3 cp s3://b/{0000..9999}.tar -)

A source's sample count is `data.num_samples[i]` when given (not null), else what it counts;
a source that counts nothing (url, pipe, tars without stats) and has no `data.num_samples`
entry is an error before step 1 naming the source and the value to set.

Mixing: with `data.weights`, each sample is drawn from source i with probability
w_i / sum(w) (`WeightedMix`); without, the weights are the sources' sample counts, i.e. the
mix is a concatenation in expectation. Shards are always drawn with replacement (resampled),
so every rank and worker reads an endless stream of its own: fewer shards than ranks x workers
is allowed, and ranks may then read the same shard (in their own sample order).

Epoch: a fixed number of batches per rank,
    len(loader) = total samples of all sources // (batch_size * world_size),
so every rank takes the same number of steps; an epoch therefore sees about as many samples
as the sources hold, drawn with replacement, not each sample exactly once.

Order: a function of (seed, epoch, rank, num_workers) (`set_epoch`): the pipeline's shard
draws, mix and shuffle buffer are seeded from them, and so is the generator that gives the
DataLoader workers their base seed, so worker-side augmentations repeat too.

Resume: `iter_from(skip)` reads and discards the first `skip` batches of the epoch. That
costs their decoding (and, for remote sources, their download), but the order is exact
whatever samples were bad (skipping raw samples before decoding would drift when bad ones are
dropped). With num_workers > 0 the discarded batches also advance the workers' augmentation
RNG as the uninterrupted run did; with num_workers = 0 the transforms draw from the process
RNG, so resumed crops may differ.
"""

from __future__ import annotations

import json
import logging
import math
import random
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from dlip.data.shards import INDEX_NAME, read_shard_index, shard_urls
from dlip.data.webdata import SharedEpoch, expand_urls, wds_pipeline

log = logging.getLogger(__name__)

SHUFFLE_BUFFER = 1000  # samples (JPEG bytes, before decoding) per worker
TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz")
_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://")
LOCAL_KINDS = ("shard_dir", "tar_dir", "tars")


@dataclass(frozen=True)
class WebSource:
    """One `data.manifests` entry that the webdataset pipeline reads."""

    entry: str  # as written in data.manifests
    kind: str  # shard_dir | tar_dir | tars | url | pipe (module docstring)
    urls: tuple[str, ...]  # its shards, expanded
    counted: int | None  # the samples it says it holds; None: it cannot say
    samples: int | None  # what an epoch counts: data.num_samples' entry, else `counted`


def source_kind(entry: str | Path) -> str | None:
    """The kind of a `data.manifests` entry (module docstring); None for a jsonl manifest."""
    text = str(entry)
    if text.startswith("pipe:"):
        return "pipe"
    if _SCHEME.match(text):
        return "url"
    path = Path(text)
    if path.is_dir():
        return "shard_dir" if (path / INDEX_NAME).is_file() else "tar_dir"
    if "{" in text or "::" in text or text.endswith(TAR_SUFFIXES):
        return "tars"
    return None


def dir_samples(path: str | Path) -> int:
    """Samples in a complete shard dir, from its index.json (errors name the file)."""
    path = Path(path)
    shard_urls(path)  # an incomplete shard set is an error here, before training starts
    samples = int(read_shard_index(path)["samples"])
    if samples < 1:
        raise ValueError(f"{path / INDEX_NAME}: the shard dir holds no samples")
    return samples


def stats_samples(tars: Sequence[Path]) -> int | None:
    """Samples img2dataset wrote into `tars`: the sum of "successes" over each tar's
    NNNNN_stats.json; None when a tar has none (not img2dataset's, or still being written)."""
    total = 0
    for tar in tars:
        stats = tar.with_name(tar.name.removesuffix(".tar") + "_stats.json")
        if not stats.is_file():
            return None
        try:
            total += int(json.loads(stats.read_text(encoding="utf-8"))["successes"])
        except (ValueError, KeyError, TypeError) as err:
            raise ValueError(f"{stats}: not img2dataset shard stats ({err!r})") from None
    return total


def _local_tars(entry: str, kind: str) -> list[Path]:
    """The tars of a local source; a missing one is an error now, not a skipped shard later."""
    if kind == "tar_dir":
        tars = sorted(Path(entry).glob("*.tar"))
        if not tars:
            raise FileNotFoundError(
                f"data.manifests entry {entry} is a directory with neither {INDEX_NAME} "
                "(`dlip data shard`) nor .tar files (img2dataset's webdataset output)"
            )
        return tars
    tars = [Path(u) for u in expand_urls(entry)]
    missing = [str(t) for t in tars if not t.is_file()]
    if missing:
        raise FileNotFoundError(
            f"data.manifests entry {entry!r}: {len(missing)} of its {len(tars)} tars not "
            f"found, the first {missing[0]}"
        )
    return tars


def _check_scheme(entry: str) -> None:
    """A URL webdataset cannot open would fail every shard at run time: fail now instead."""
    from webdataset.gopen import gopen_schemes

    openable = {*gopen_schemes, "file"} - {"__default__"}
    scheme = entry.split(":", 1)[0].lower()
    if scheme not in openable:
        raise ValueError(
            f"data.manifests entry {entry!r}: webdataset cannot open {scheme}:// URLs; stream "
            "them through a command (pipe:aws s3 cp s3://b/{0000..0099}.tar - for s3)"
        )


def web_source(entry: str | Path, num_samples: int | None = None) -> WebSource:
    """`entry` typed, expanded to its shards and counted; `num_samples` overrides the count."""
    text = str(entry)
    kind = source_kind(text)
    counted = None
    if kind is None:
        raise ValueError(f"data.manifests entry {text!r} is a jsonl manifest, not a tar source")
    if kind == "shard_dir":
        urls, counted = shard_urls(text), dir_samples(text)
    elif kind in LOCAL_KINDS:
        tars = _local_tars(text, kind)
        urls, counted = [str(t) for t in tars], stats_samples(tars)
    else:
        urls = expand_urls(text)
        _check_scheme(text)
    samples = num_samples if num_samples is not None else counted
    return WebSource(text, kind, tuple(urls), counted, samples)


def _uncounted_error(sources: list[WebSource], given: list[int | None]) -> Exception:
    """Names every source without a count and the data.num_samples value that fixes it."""
    why = {  # what would have counted it
        "tar_dir": f"no {INDEX_NAME} and not every .tar has img2dataset's NNNNN_stats.json",
        "tars": "not every .tar has img2dataset's NNNNN_stats.json beside it",
        "url": "a URL is not counted",
        "pipe": "a pipe: command is not counted",
    }
    bad = [i for i, s in enumerate(sources) if s.samples is None]
    named = "; ".join(
        f"data.manifests[{i}] {sources[i].entry} ({why[sources[i].kind]})" for i in bad
    )
    hint = [str(n) if n is not None else "N" if i in bad else "null" for i, n in enumerate(given)]
    msg = (
        f"sample count unknown for {named}: set data.num_samples=[{', '.join(hint)}] (one entry "
        "per data.manifests entry: its sample count N, or null where it is counted)"
    )
    # Local sources lack a file that would count them; remote ones are a config matter.
    local = all(sources[i].kind in LOCAL_KINDS for i in bad)
    return FileNotFoundError(msg) if local else ValueError(msg)


def resolve_sources(
    entries: Sequence[str | Path], num_samples: Sequence[int | None] = ()
) -> list[WebSource]:
    """Every entry as a counted WebSource; errors (before step 1) name the entry and the key."""
    if num_samples and len(num_samples) != len(entries):
        raise ValueError(
            f"data.num_samples has {len(num_samples)} entries for {len(entries)} "
            "data.manifests; give one per entry (null where it is counted) or none"
        )
    given = list(num_samples) or [None] * len(entries)
    sources = [web_source(e, n) for e, n in zip(entries, given, strict=True)]
    if any(s.samples is None for s in sources):
        raise _uncounted_error(sources, given)
    for i, s in enumerate(sources):
        if s.samples is not None and s.samples < 1:
            raise ValueError(f"data.manifests[{i}] {s.entry} holds no samples (counted 0)")
    return sources


def check_sources(entries: Sequence[str | Path]) -> list[str]:
    """The webdataset sources of `data.manifests` ([] when all are jsonl manifests); a mix of
    the two is an error: they are read by different loaders."""
    texts = [str(e) for e in entries]
    web = [t for t in texts if source_kind(t) is not None]
    if web and len(web) != len(texts):
        files = [t for t in texts if t not in web]
        raise ValueError(
            f"data.manifests mixes webdataset sources {web} with jsonl manifests "
            f"(or data.synth_dir) {files}: they are read by different loaders; give .tar "
            "patterns, URLs, img2dataset folders or shard dirs only or manifests only "
            "(`dlip data shard` converts a manifest)"
        )
    return web


def _seed(*parts: object) -> int:
    """A 63-bit seed from its parts (str seeding hashes with sha512: stable across runs)."""
    return random.Random("/".join(map(str, parts))).getrandbits(63)


class WdsLoader:
    """Batches of a weighted mix of webdataset sources, `length` per epoch (module docstring).

    `sources`: data.manifests entries of any kind `source_kind` knows; `num_samples`: one count
    (or None) per source, as data.num_samples. Batches are webdata's
    {"image": (B, 3, S, S), "caption", "image_id", "source", "skipped"}.
    """

    def __init__(
        self,
        sources: Sequence[str | Path],
        transform: Any,
        batch_size: int,
        *,
        weights: Sequence[float] = (),
        num_samples: Sequence[int | None] = (),
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        num_workers: int = 0,
        max_words: int = 30,
        shuffle_buffer: int = SHUFFLE_BUFFER,
        pin_memory: bool = False,
    ) -> None:
        if not sources:
            raise ValueError("no webdataset sources given")
        if weights and len(weights) != len(sources):
            raise ValueError(f"data.weights {list(weights)} need one weight per source")
        self.sources = resolve_sources(sources, num_samples)
        sizes = [int(s.samples or 0) for s in self.sources]  # resolve_sources: all counted
        for s, n in zip(self.sources, sizes, strict=True):
            log.info("source %s (%s): %d shards, %d samples", s.entry, s.kind, len(s.urls), n)
        self.total_samples = sum(sizes)
        self.batch_size, self.world_size = batch_size, world_size
        self.length = self.total_samples // (batch_size * world_size)
        self.weights = [float(w) for w in weights] if weights else [float(s) for s in sizes]
        self.seed, self.rank, self.epoch = seed, rank, 0
        self.shared_epoch = SharedEpoch(0)
        urls = [list(s.urls) for s in self.sources]
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


def build_wds_loader(cfg: Any, transform: Any, sources: Sequence[str]) -> WdsLoader:
    """The training loader of a config whose `data.manifests` are webdataset sources."""
    from dlip.distributed import get_rank, get_world_size

    d = cfg.data
    return WdsLoader(
        sources,
        transform,
        d.batch_size,
        weights=tuple(d.weights),
        num_samples=tuple(d.num_samples),
        seed=cfg.run.seed,
        rank=get_rank(),
        world_size=get_world_size(),
        num_workers=d.num_workers,
        max_words=d.max_words,
    )
