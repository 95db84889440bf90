"""Webdataset training pipeline over shards (ours from `dlip data shard`, or img2dataset's).

The pipeline is one list of stages (see `wds_pipeline`):

    shard list (shuffled per (seed, epoch), or resampled)  -> split by node -> split by worker
    -> tar members grouped into samples -> sample shuffle buffer -> decode + transform
    -> batches {"image": (B, 3, S, S), "caption", "image_id", "source", "skipped"}

Data order is a function of (seed, epoch): the training loop sets the epoch on a `SharedEpoch`
before iterating, and DataLoader workers read it when their epoch starts. Bad samples (an
undecodable or truncated image, an empty caption, a member missing, an unreadable shard) are
skipped and counted; each batch carries the counts seen since the previous batch of the same
worker in `batch["skipped"]`, so summing them over an epoch gives the epoch's totals.

Mixing sources: `wds_pipeline([urls_a, urls_b], ..., weights=[3, 1])` draws each *sample*
from source i with probability w_i / sum(w), independently of how many shards or samples a
source has: a small source is repeated, a large one subsampled. Each source is resampled
(shards drawn with replacement), so the stream is endless; `.with_epoch(n)` bounds an epoch.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import random
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from dlip.data.common import BadSample, SkipCounts, check_caption, decode_image
from dlip.tokenizer import pre_caption

log = logging.getLogger(__name__)

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")

Urls = str | Path | Sequence[str | Path]


class SharedEpoch:
    """An epoch number shared with DataLoader worker processes (set it before each epoch)."""

    def __init__(self, epoch: int = 0) -> None:
        self.shared = multiprocessing.Value("i", epoch)

    def set_value(self, epoch: int) -> None:
        self.shared.value = epoch

    def get_value(self) -> int:
        return self.shared.value


def _rng(*parts: object) -> random.Random:
    """A generator seeded from its parts; str seeds hash with sha512, so stable across runs."""
    return random.Random("/".join(map(str, parts)))


def _worker_info() -> tuple[int, int, int, int]:
    """(rank, world_size, worker, num_workers), as webdataset's split stages see them."""
    from webdataset.utils import pytorch_worker_info

    return pytorch_worker_info()


def expand_urls(urls: Urls) -> list[str]:
    """A shard list from a list, a brace pattern ("dir/{000000..000009}.tar"), or a directory:
    one written by `dlip data shard` (its index.json lists the shards) or any folder of .tar
    files, such as img2dataset's webdataset output."""
    from webdataset.shardlists import expand_urls as wds_expand

    from dlip.data.shards import INDEX_NAME, shard_urls

    if isinstance(urls, Path):
        urls = str(urls)
    if not isinstance(urls, str):
        out = [str(u) for u in urls]
    elif (Path(urls) / INDEX_NAME).is_file():
        out = shard_urls(urls)
    elif Path(urls).is_dir():
        out = sorted(str(p) for p in Path(urls).glob("*.tar"))
    else:
        out = wds_expand(urls)
    if not out:
        raise ValueError(f"no shards in {urls!r}")
    return out


class ShardList(torch.utils.data.IterableDataset):
    """Yields {"url": shard} per shard: shuffled by (seed, epoch), or resampled endlessly.

    Unresampled, every rank and worker shuffles the list identically and the split stages
    after it give each a disjoint slice, so an epoch reads every shard exactly once.
    Resampled, each (rank, worker) draws with replacement from its own (seed, epoch) stream.
    """

    def __init__(
        self, urls: list[str], seed: int, epoch: SharedEpoch, shuffle: bool, resampled: bool
    ) -> None:
        self.urls, self.seed, self.epoch = urls, seed, epoch
        self.shuffle, self.resampled = shuffle, resampled

    def __iter__(self) -> Iterator[dict[str, str]]:
        epoch = self.epoch.get_value()
        if self.resampled:
            rank, _, worker, _ = _worker_info()
            rng = _rng(self.seed, epoch, rank, worker, "resample")
            while True:
                yield {"url": rng.choice(self.urls)}
        _, world, _, workers = _worker_info()
        if len(self.urls) < world * workers:
            msg = "%d shards for %d ranks x %d workers: some read nothing (reshard or resample)"
            log.warning(msg, len(self.urls), world, workers)
        urls = list(self.urls)
        if self.shuffle:
            _rng(self.seed, epoch, "shards").shuffle(urls)
        for url in urls:
            yield {"url": url}


class SkipTally:
    """Skip counts a worker has seen but not yet handed to a batch.

    Shared by the stages of one pipeline (one copy per worker process): the tar and decode
    stages add to it, the batch stage drains it into `batch["skipped"]`.
    """

    def __init__(self) -> None:
        self.counts = SkipCounts()

    def add(self, reason: str) -> None:
        self.counts.add(reason)

    def drain(self) -> SkipCounts:
        out, self.counts = self.counts, SkipCounts()
        return out


class TarSamples:
    """Shard URLs -> samples {"__key__", "__url__", "jpg", "txt", ...} (tar members by key).

    A shard that cannot be opened or read to the end counts once as "bad_shard" (a tar file,
    not a sample: how many samples it lost is unknown); the samples read before the error are
    kept and the pipeline goes on with the next shard. Only a long run of unreadable shards
    in a row stops it: that is a wrong path or a dead store, not bad samples, and a resampled
    list would otherwise retry it forever. For http(s):// and pipe: shards (a curl or shell
    command) a failed download often shows only as the command's exit status, when the stream
    is closed: a shard read to its end is closed inside the check, so that counts too.
    """

    max_bad_in_a_row = 100

    def __init__(self, tally: SkipTally) -> None:
        self.tally = tally

    def __call__(self, src: Iterable[dict[str, str]]) -> Iterator[dict[str, Any]]:
        from webdataset.gopen import gopen
        from webdataset.tariterators import group_by_keys, tar_file_expander

        bad_in_a_row = 0
        for shard in src:
            url, stream, read = shard["url"], None, 0
            try:
                stream = gopen(url)
                for sample in group_by_keys(tar_file_expander([{"url": url, "stream": stream}])):
                    read += 1
                    yield sample
                done, stream = stream, None
                done.close()  # a pipe's exit status: a failed download raises here
                bad_in_a_row = 0
            except Exception as err:  # any read error ends this shard only
                self.tally.add("bad_shard")
                log.warning("skipping the rest of shard %s: %r", url, err)
                bad_in_a_row = 0 if read else bad_in_a_row + 1
                if bad_in_a_row >= self.max_bad_in_a_row:
                    raise RuntimeError(
                        f"{bad_in_a_row} shards in a row unreadable, the last "
                        f"{url}: check the shard paths"
                    ) from err
            finally:
                if stream is not None:  # a read error (counted above) or the consumer stopped
                    _close_quietly(stream)


def _close_quietly(stream: Any) -> None:
    """Close a shard read only in part. A command whose output is closed early may exit
    with an error (a pipe: command killed by SIGPIPE, curl's write error): nothing is lost."""
    try:
        stream.close()
    except Exception as err:
        log.debug("closing a shard read in part: %r", err)


class Shuffle:
    """Sample shuffle buffer seeded by (seed, epoch, rank, worker)."""

    def __init__(self, bufsize: int, seed: int, epoch: SharedEpoch) -> None:
        self.bufsize, self.seed, self.epoch = bufsize, seed, epoch

    def __call__(self, src: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        import webdataset as wds

        if self.bufsize <= 1:
            return iter(src)
        rank, _, worker, _ = _worker_info()
        rng = _rng(self.seed, self.epoch.get_value(), rank, worker, "samples")
        return wds.shuffle(self.bufsize, initial=self.bufsize, rng=rng)(src)


def _meta(sample: dict[str, Any], where: str) -> dict[str, Any]:
    """The sample's json member as a dict ({} when absent); unreadable is BadSample."""
    if "json" not in sample:
        return {}
    try:
        meta = json.loads(sample["json"])
    except ValueError as err:  # JSONDecodeError and UnicodeDecodeError
        raise BadSample("bad_text", f"{where}.json: {err}") from None
    if not isinstance(meta, dict):
        raise BadSample("bad_text", f"{where}.json is not an object")
    return meta


def decode_sample(
    sample: dict[str, Any], transform: Callable[[Image.Image], Any], max_words: int
) -> dict[str, Any]:
    """A tar sample {"__key__", "jpg", "txt"?, "json"?} -> {"image", "caption", ...}.

    Ours (`dlip data shard`) and img2dataset's both hold KEY.jpg, KEY.txt and KEY.json; the
    caption is the txt member, else the json's "caption" (img2dataset writes no txt when its
    caption column is empty). Raises BadSample for a member that is missing or undecodable.
    """
    where = f"{sample.get('__url__')}:{sample['__key__']}"
    ext = next((e for e in IMAGE_EXTS if e in sample), None)
    if ext is None:
        raise BadSample("missing_file", f"{where} has no image member")
    meta = _meta(sample, where)
    text = sample["txt"] if "txt" in sample else meta.get("caption")
    if text is None:
        raise BadSample("empty_caption", f"{where} has no txt member nor a json caption")
    caption = pre_caption(check_caption(text), max_words)
    if not caption:  # only punctuation BLIP strips
        raise BadSample("empty_caption", where)
    return {
        "image": transform(decode_image(sample[ext])),
        "caption": caption,
        # our shards carry image_id; img2dataset's json has "key" (the sample key again)
        "image_id": str(meta.get("image_id", sample["__key__"])),
        "source": str(meta.get("source", "")),
    }


class Decode:
    """Decode + transform each sample; bad ones are counted in the tally and dropped."""

    def __init__(self, transform: Callable, max_words: int, tally: SkipTally) -> None:
        self.transform, self.max_words, self.tally = transform, max_words, tally

    def __call__(self, src: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        for sample in src:
            try:
                yield decode_sample(sample, self.transform, self.max_words)
            except BadSample as err:
                self.tally.add(err.reason)
                log.debug("skipping sample: %s", err)


def collate(samples: list[dict[str, Any]], skipped: SkipCounts) -> dict[str, Any]:
    """Samples -> {"image": (B, 3, S, S), "caption", "image_id", "source": lists, "skipped"}."""
    return {
        "image": torch.stack([s["image"] for s in samples]),  # (B, 3, S, S)
        "caption": [s["caption"] for s in samples],
        "image_id": [s["image_id"] for s in samples],
        "source": [s["source"] for s in samples],
        "skipped": skipped,
    }


class Batch:
    """Group samples into batches of `batch_size` (the last one short when `partial`).

    A full batch is held until the next sample arrives, so skips met after the last sample
    still reach a batch (the last one) instead of being lost at the end of the stream.
    """

    def __init__(self, batch_size: int, partial: bool, tally: SkipTally) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.batch_size, self.partial, self.tally = batch_size, partial, tally

    def __call__(self, src: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        full: list[dict[str, Any]] | None = None
        buf: list[dict[str, Any]] = []
        for sample in src:
            if full is not None:
                yield collate(full, self.tally.drain())
                full = None
            buf.append(sample)
            if len(buf) == self.batch_size:
                full, buf = buf, []
        if buf and self.partial:
            if full is not None:
                yield collate(full, self.tally.drain())
            full = buf
        if full is not None:
            yield collate(full, self.tally.drain())
        elif self.tally.counts:  # not a single batch to carry them
            log.warning("no samples left to batch; %s", self.tally.drain().summary())


def _source_stages(
    urls: list[str], seed: int, epoch: SharedEpoch, tally: SkipTally, resampled: bool, shuffle: bool
) -> list[Any]:
    """Stages from a shard list to raw tar samples for this rank and worker."""
    import webdataset as wds

    shards = ShardList(urls, seed, epoch, shuffle=shuffle, resampled=resampled)
    # Resampled streams are already independent per rank and worker: no splitting.
    split = [] if resampled else [wds.split_by_node, wds.split_by_worker]
    return [shards, *split, TarSamples(tally)]


class WeightedMix(torch.utils.data.IterableDataset):
    """Draw each sample from source i with probability weights[i] / sum(weights).

    Like webdataset's RandomMix, but its generator is seeded by (seed, epoch, rank, worker)
    so the mixed order is reproducible.
    """

    def __init__(self, sources: list[Any], weights: Sequence[float], seed: int, epoch: SharedEpoch):
        if len(sources) != len(weights) or any(w < 0 for w in weights) or sum(weights) <= 0:
            raise ValueError(f"need one non-negative weight per source, got {list(weights)}")
        self.sources, self.weights = sources, list(weights)
        self.seed, self.epoch = seed, epoch

    def __iter__(self) -> Iterator[dict[str, Any]]:
        rank, _, worker, _ = _worker_info()
        rng = _rng(self.seed, self.epoch.get_value(), rank, worker, "mix")
        streams = [iter(s) for s in self.sources]
        picks = range(len(streams))
        while True:
            i = rng.choices(picks, weights=self.weights)[0]
            sample = next(streams[i], None)
            if sample is None:  # pipeline sources are resampled: endless unless given others
                raise RuntimeError(f"source {i} of the mix ran out of samples")
            yield sample


def wds_pipeline(
    shards: Urls | Sequence[Urls],
    transform: Callable[[Image.Image], torch.Tensor],
    batch_size: int,
    *,
    weights: Sequence[float] | None = None,
    seed: int = 0,
    epoch: SharedEpoch | None = None,
    resampled: bool = False,
    shardshuffle: bool = True,
    shuffle_buffer: int = 1000,
    max_words: int = 30,
    partial: bool = True,
):
    """A webdataset.DataPipeline of training batches (see the module docstring).

    shards: one source (a list of tar paths/URLs, a brace pattern, or a shard directory), or
        with `weights`, one such source per weight; mixing forces resampling.
    transform: PIL image -> (3, S, S) tensor, e.g. `dlip.transforms.eval_transform(config)`.
    epoch: shared epoch (set it from the training loop); a fixed epoch 0 when omitted.
    resampled: draw shards with replacement, endlessly (bound epochs with `.with_epoch(n)`,
        counted in batches per worker). Unresampled, each rank reads its own slice of the
        shards once per epoch, so ranks can see different batch counts: under DDP, resample
        or cut every rank to the same number of steps.
    Iterate it directly or through `DataLoader(pipeline, batch_size=None, num_workers=N)`.
    """
    import webdataset as wds

    epoch = epoch if epoch is not None else SharedEpoch(0)
    tally = SkipTally()
    if weights is None:
        source = _source_stages(expand_urls(shards), seed, epoch, tally, resampled, shardshuffle)
    else:
        if isinstance(shards, (str, Path)) or len(shards) != len(weights):
            raise ValueError(f"weights {list(weights)} need one shard list per weight")
        subs = [  # each source resampled on its own, then mixed sample by sample
            wds.DataPipeline(*_source_stages(expand_urls(u), seed + i, epoch, tally, True, True))
            for i, u in enumerate(shards)
        ]
        source = [WeightedMix(subs, weights, seed, epoch)]
    return wds.DataPipeline(
        *source,
        Shuffle(shuffle_buffer, seed, epoch),  # before decoding: the buffer holds JPEG bytes
        Decode(transform, max_words, tally),
        Batch(batch_size, partial, tally),
    )
