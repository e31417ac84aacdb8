"""Dynamic batching: requests that arrive within a short window run through the model together.

The first request of a batch waits at most ``window_s`` for others (less once ``max_batch`` items are
queued), then the whole batch runs in the given executor, off the event loop. While it runs, new
requests queue up and form the next batch, so under load batches grow by themselves and when idle a
request waits only the window. ``max_batch=1`` turns batching off (one request at a time).
"""

from __future__ import annotations

import asyncio
from collections import deque
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Any, Callable, Generic, TypeVar

Item = TypeVar("Item")


@dataclass
class _Job(Generic[Item]):
    item: Item
    size: int
    future: asyncio.Future


class Batcher(Generic[Item]):
    """Collect items from concurrent ``submit`` calls into batches for ``run_batch``.

    run_batch(items) -> one result per item, in order; a result that is an ``Exception`` is raised to
    that item's caller alone. ``size`` is an item's weight towards ``max_batch`` (e.g. its number of
    images); an item heavier than ``max_batch`` runs as a batch of its own. ``on_batch(size)`` is
    called with each batch's total size (for metrics).
    """

    def __init__(self, run_batch: Callable[[list[Item]], list[Any]], executor: Executor, *, max_batch: int = 16,
                 window_s: float = 0.005, on_batch: Callable[[int], None] | None = None):
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        if window_s < 0:
            raise ValueError(f"window_s must be >= 0, got {window_s}")
        self.max_batch, self.window_s = max_batch, window_s
        self._run_batch, self._executor, self._on_batch = run_batch, executor, on_batch
        self._queue: deque[_Job] = deque()
        self._queued = 0  # total size of the queued jobs
        self._arrived: asyncio.Event | None = None
        self._task: asyncio.Task | None = None

    async def submit(self, item: Item, size: int = 1) -> Any:
        """Queue ``item`` and wait for its result."""
        if self._task is None:  # created on first use, inside the server's event loop
            self._arrived = asyncio.Event()
            self._task = asyncio.get_running_loop().create_task(self._serve_forever())
        job = _Job(item, max(1, size), asyncio.get_running_loop().create_future())
        self._queue.append(job)
        self._queued += job.size
        self._arrived.set()
        return await job.future

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass

    async def _serve_forever(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            while not self._queue:
                self._arrived.clear()
                await self._arrived.wait()
            await self._gather(loop.time() + self.window_s)
            batch = self._take()
            size = sum(job.size for job in batch)
            if self._on_batch is not None:
                self._on_batch(size)
            try:
                results = await loop.run_in_executor(self._executor, self._run_batch, [job.item for job in batch])
            except Exception as exc:  # run_batch itself failed: every caller of this batch gets the error
                results = [exc] * len(batch)
            for job, result in zip(batch, results):
                if job.future.done():  # the caller went away
                    continue
                if isinstance(result, Exception):
                    job.future.set_exception(result)
                else:
                    job.future.set_result(result)

    async def _gather(self, deadline: float) -> None:
        """Wait for more items until the batch is full or the window has passed."""
        if self.max_batch == 1:
            return
        loop = asyncio.get_running_loop()
        while self._queued < self.max_batch and (remaining := deadline - loop.time()) > 0:
            self._arrived.clear()
            try:
                await asyncio.wait_for(self._arrived.wait(), remaining)
            except asyncio.TimeoutError:
                return

    def _take(self) -> list[_Job]:
        """The queued jobs that fit in one batch (at least one), oldest first."""
        batch = [self._queue.popleft()]
        total = batch[0].size
        while self._queue and total + self._queue[0].size <= self.max_batch:
            job = self._queue.popleft()
            batch.append(job)
            total += job.size
        self._queued -= total
        return batch
