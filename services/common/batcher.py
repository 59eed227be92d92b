"""Adaptive micro-batching: many concurrent callers, few round trips.

A submitted item goes out at the end of the current event-loop iteration
when no flush is in flight (so the items that concurrent coroutines submit in
one iteration travel together); items that arrive while a flush is in
flight wait and go together in the next flush (up to
``max_batch`` per flush, ``max_in_flight`` flushes at a time). At low load this
adds no latency; under load the per-call overhead (a gRPC call, a commit) is
shared by the whole batch.

``min_interval`` (the linger) bounds batches by time as well as size: a flush
starts no sooner than ``min_interval`` after the previous one started, unless
``max_batch`` items are already waiting. An item that arrives after a quiet
spell still goes out at once; at a steady moderate rate, where flushes finish
quickly and batches would stay tiny, the items of one interval share a call.
That matters because a gRPC call costs this Python stack 0.5 to 1.5 ms of CPU
on each side (thread hand-offs in grpc's poller), which at a few items per
call is most of the cost of an event.

``min_batch_when_busy`` gates the flushes beyond the first: while one is in
flight, another starts only once that many items wait, so overlapping
flushes stay large.

Each caller awaits the result of its own item, and a failed flush fails
exactly the items that were in it.

``max_wait`` bounds the queue by time, not only by count: an item that would
wait longer than that before a flush takes it fails with ``QueueTimeout``,
at once when the recent flushes say it cannot go in time, or when its time
runs out. Under overload a caller then hears "busy" in a bounded time instead
of waiting seconds, and the work it would have cost is never done (an item
that is refused was never sent anywhere).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, TypeVar

from prometheus_client import Histogram

from services.common import deadlines

logger = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")

# The flush function gets the items and returns one result per item, in order
# (a result may itself be an exception instance: that item alone fails).
FlushFn = Callable[[Sequence[T]], Awaitable[Sequence[R | BaseException]]]

# How much the newest flush weighs in the running estimate of a flush's duration.
_FLUSH_EWMA_WEIGHT = 0.2


class QueueTimeout(Exception):
    """The item could not start within the batcher's ``max_wait``; it was never sent."""


class MicroBatcher(Generic[T, R]):
    def __init__(
        self,
        flush: FlushFn[T, R],
        *,
        max_batch: int = 256,
        max_in_flight: int = 1,
        size_histogram: Histogram | None = None,
        name: str = "batch",
        min_interval: float = 0.0,
        min_batch_when_busy: int = 1,
        max_wait: float = 0.0,
    ) -> None:
        self._flush = flush
        self._max_batch = max_batch
        self._max_in_flight = max_in_flight
        self._size_histogram = size_histogram
        self._name = name
        self._min_interval = min_interval
        self._min_batch_when_busy = min_batch_when_busy
        self._last_start = float("-inf")
        self._timer: asyncio.TimerHandle | None = None
        self._max_wait = max_wait
        # Each pending item with the loop time it arrived (its age decides a
        # shed) and its caller's deadline (the flush runs under the latest).
        self._pending: list[tuple[T, asyncio.Future[R], float, float | None]] = []
        self._expiry: asyncio.TimerHandle | None = None
        self._flush_seconds = 0.0  # running estimate, for the refusal at submit
        self._flushes_seen = False
        self._flush_starts: list[float] = []  # loop times the flushes in flight began
        self._in_flight = 0
        self._closed = False
        self._scheduled = False
        self._tasks: set[asyncio.Task[None]] = set()

    async def submit(self, item: T) -> R:
        if self._closed:
            raise RuntimeError(f"{self._name} batcher is closed")
        loop = asyncio.get_running_loop()
        now = 0.0  # the arrival time matters only with a time budget
        if self._max_wait > 0:
            now = loop.time()
            if self.expected_wait() > self._max_wait:
                raise QueueTimeout(f"{self._name} queue is full for its time budget")
            if self._expiry is None:
                self._expiry = loop.call_at(now + self._max_wait, self._expire)
        future: asyncio.Future[R] = loop.create_future()
        self._pending.append((item, future, now, deadlines.caller_deadline()))
        if not self._scheduled:
            self._scheduled = True
            loop.call_soon(self._maybe_flush)
        return await future

    def expected_wait(self) -> float:
        """How long a new item would wait for its flush, from the recent flushes' duration.

        With every slot busy it waits for the oldest flush to end, and then
        for each full batch ahead of it. An estimate: ``_expire`` is the hard bound.
        """
        wait = len(self._pending) // self._max_batch * self._flush_seconds / self._max_in_flight
        if self._in_flight >= self._max_in_flight and self._flush_starts:
            running = asyncio.get_running_loop().time() - min(self._flush_starts)
            wait += max(0.0, self._flush_seconds - running)
        return wait

    def _expire(self) -> None:
        """Fails the items that have waited ``max_wait``; the oldest are first in the queue."""
        self._expiry = None
        loop = asyncio.get_running_loop()
        deadline = loop.time() - self._max_wait
        expired = 0
        for _, future, arrived, _ in self._pending:
            if arrived > deadline:
                break
            expired += 1
            if not future.done():
                future.set_exception(QueueTimeout(f"{self._name} queue wait exceeded its time budget"))
        if expired:
            del self._pending[:expired]
        if self._pending:
            self._expiry = loop.call_at(self._pending[0][2] + self._max_wait, self._expire)

    def _maybe_flush(self) -> None:
        self._scheduled = False
        loop = asyncio.get_running_loop()
        while self._pending and self._in_flight < self._max_in_flight:
            if self._in_flight and len(self._pending) < self._min_batch_when_busy:
                return  # the flush in flight takes them when it ends
            if self._min_interval > 0 and not self._closed:
                now = loop.time()
                due = self._last_start + self._min_interval
                if now < due and len(self._pending) < self._max_batch:
                    if self._timer is None:
                        self._timer = loop.call_at(due, self._on_timer)
                    return
                self._last_start = now
            if self._timer is not None:  # a full batch or close() went first
                self._timer.cancel()
                self._timer = None
            taken = self._pending[: self._max_batch]
            del self._pending[: self._max_batch]
            batch = [(item, future) for item, future, _, _ in taken]
            self._in_flight += 1
            # The flush works for all its callers: it runs under the latest of
            # their deadlines, not under whichever caller scheduled this call.
            context = deadlines.batch_context(deadline for *_, deadline in taken)
            task = loop.create_task(self._run(batch), context=context)
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    def _on_timer(self) -> None:
        self._timer = None
        self._maybe_flush()

    async def _run(self, batch: list[tuple[T, asyncio.Future[R]]]) -> None:
        loop = asyncio.get_running_loop()
        started = loop.time()
        self._flush_starts.append(started)
        try:
            if self._size_histogram is not None:
                self._size_histogram.observe(len(batch))
            try:
                results = await self._flush([item for item, _ in batch])
                if len(results) != len(batch):
                    raise RuntimeError(
                        f"{self._name} flush returned {len(results)} results for {len(batch)} items"
                    )
            except BaseException as error:
                for _, future in batch:
                    if not future.done():
                        future.set_exception(error)
                if not isinstance(error, Exception):  # cancellation, interpreter exit
                    raise
                return
            for (_, future), result in zip(batch, results, strict=True):
                if future.done():
                    continue
                if isinstance(result, BaseException):
                    future.set_exception(result)
                else:
                    future.set_result(result)
        finally:
            self._flush_starts.remove(started)
            took = loop.time() - started
            if self._flushes_seen:
                self._flush_seconds += _FLUSH_EWMA_WEIGHT * (took - self._flush_seconds)
            else:
                self._flush_seconds = took
            self._flushes_seen = True
            self._in_flight -= 1
            self._maybe_flush()

    async def close(self) -> None:
        """Refuses new items at once; pending ones go without lingering, and all finish."""
        self._closed = True
        if self._expiry is not None:
            self._expiry.cancel()
            self._expiry = None
        self._maybe_flush()
        while self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
