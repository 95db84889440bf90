"""Micro-batching for the web app: concurrent requests gathered into one model call.

A request decodes its own image first (a bad upload fails that request alone, before it joins
a batch), then waits on a future. One worker thread takes the first waiting request, gathers
whatever else arrives within `wait_ms` or until `max_batch` are waiting, runs them as one batch
(batch 8 captions cost ~3x less per image than batch 1 on a CPU) and answers each request with
its own result. If a batch call fails, its requests are retried one by one, so an input that
breaks the batch fails only its own request.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from typing import Any


class MicroBatcher:
    """Run `fn(items) -> results` (same length and order) over batches of submitted items."""

    def __init__(
        self,
        fn: Callable[[Sequence[Any]], Sequence[Any]],
        max_batch: int = 8,
        wait_ms: float = 5.0,
        lock: threading.Lock | None = None,
    ) -> None:
        if max_batch < 1 or wait_ms < 0:
            raise ValueError(f"max_batch >= 1 and wait_ms >= 0 (got {max_batch}, {wait_ms})")
        self.fn, self.max_batch, self.wait_s = fn, max_batch, wait_ms / 1000
        self.lock = lock or threading.Lock()  # held while the model runs (shared with others)
        self._queue: queue.Queue[tuple[Any, Future]] = queue.Queue()
        self.sizes: list[int] = []  # size of every batch run (the server reports them)
        self._thread = threading.Thread(target=self._loop, name="dlip-batcher", daemon=True)
        self._thread.start()

    def submit(self, item: Any) -> Future:
        future: Future = Future()
        self._queue.put((item, future))
        return future

    def __call__(self, item: Any) -> Any:
        """Submit `item` and wait for its result (or its exception)."""
        return self.submit(item).result()

    def _gather(self) -> list[tuple[Any, Future]]:
        batch = [self._queue.get()]  # blocks until there is work
        deadline = time.monotonic() + self.wait_s
        while len(batch) < self.max_batch:
            left = deadline - time.monotonic()
            try:
                batch.append(self._queue.get(timeout=max(left, 0)) if left > 0 else
                             self._queue.get_nowait())  # fmt: skip
            except queue.Empty:
                break
        return batch

    def _loop(self) -> None:
        while True:
            batch = self._gather()
            self.sizes.append(len(batch))
            items = [item for item, _ in batch]
            try:
                with self.lock:
                    results = list(self.fn(items))
                if len(results) != len(items):
                    raise RuntimeError(f"batch of {len(items)} gave {len(results)} results")
            except Exception:  # one bad item: answer each on its own
                for item, future in batch:
                    self._one(item, future)
                continue
            for (_, future), result in zip(batch, results, strict=True):
                future.set_result(result)

    def _one(self, item: Any, future: Future) -> None:
        try:
            with self.lock:
                future.set_result(self.fn([item])[0])
        except Exception as err:  # the request's own error, raised in its thread
            future.set_exception(err)
