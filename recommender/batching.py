"""Opportunistic micro-batching of requests on an asyncio event loop (docs/serving.md).

:class:`MicroBatcher` hands work to a batch function that runs in a worker thread. While no
batch is running, a request starts one at once, alone: there is no timer and no added wait,
so an idle service answers exactly as fast as without batching. While batches are running
(at most ``concurrency`` at a time), arriving requests queue; when a batch finishes, its
runner takes everything queued, up to ``max_batch``, as the next batch. So batches form only
under load, and they grow with it, which is when sharing the per-call work pays.

The batch function gets the list of queued items and returns one result per item, in
order; a result that is an exception is raised to that item's caller only. Should the batch
function itself raise, every item of that batch gets the exception.

Framework-free on purpose (asyncio only): :mod:`recommender.service` passes a ``run``
coroutine that moves the batch into BentoML's worker threads.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

log = logging.getLogger(__name__)

DEFAULT_MAX_BATCH = 32


class MicroBatcher:
    """Queue items while batches run; run what is queued as one batch when a runner frees.

    Parameters
    ----------
    run : async callable(list of items) -> list of results
        Runs one batch (e.g. in a worker thread) and returns one result per item.
    max_batch : int
        Most items in one batch; the rest wait for the next.
    concurrency : int
        Batches running at once.
    on_batch : callable(int), optional
        Called with the size of every batch as it starts (metrics).
    """

    def __init__(
        self,
        run: Callable[[list[Any]], Awaitable[Sequence[Any]]],
        *,
        max_batch: int = DEFAULT_MAX_BATCH,
        concurrency: int = 1,
        on_batch: Callable[[int], None] | None = None,
    ):
        if max_batch < 1 or concurrency < 1:
            raise ValueError("max_batch and concurrency must be at least 1")
        self._run = run
        self.max_batch = max_batch
        self.concurrency = concurrency
        self._on_batch = on_batch
        self._queue: deque[tuple[Any, asyncio.Future]] = deque()
        self._runners = 0

    @property
    def queued(self) -> int:
        """Items waiting for a runner."""
        return len(self._queue)

    async def submit(self, item: Any) -> Any:
        """The result for ``item`` (raised, if it is an exception)."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._queue.append((item, future))
        if self._runners < self.concurrency:
            self._runners += 1
            # A task of its own: the runner outlives this caller if it is cancelled, and
            # serves the other queued items (their answers are not lost with this one).
            loop.create_task(self._drain())
        result = await future
        if isinstance(result, BaseException):
            raise result
        return result

    async def _drain(self) -> None:
        try:
            while self._queue:
                batch = [
                    self._queue.popleft() for _ in range(min(self.max_batch, len(self._queue)))
                ]
                if self._on_batch is not None:
                    self._on_batch(len(batch))
                results = None
                try:
                    results = await self._run([item for item, _ in batch])
                    if len(results) != len(batch):
                        raise RuntimeError(
                            f"batch function returned {len(results)} results for {len(batch)} items"
                        )
                except Exception as err:  # noqa: BLE001 - every item of the batch gets it
                    log.exception("a batch of %d failed", len(batch))
                    results = [err] * len(batch)
                finally:
                    if results is None:  # cancelled (shutdown): release the waiting callers
                        for _, future in batch:
                            future.cancel()
                for (_, future), result in zip(batch, results, strict=True):
                    if not future.done():  # its caller may have been cancelled
                        future.set_result(result)
        finally:
            self._runners -= 1
