"""MicroBatcher: who travels together, and when (pure asyncio, no I/O)."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import pytest

from services.common.batcher import MicroBatcher, QueueTimeout


class Recorder:
    """A flush that records each batch and the loop time it started."""

    def __init__(self, delay: float = 0.0, fail_on: str | None = None) -> None:
        self.batches: list[list[str]] = []
        self.started: list[float] = []
        self.delay = delay
        self.fail_on = fail_on

    async def flush(self, items: Sequence[str]) -> list[str | BaseException]:
        self.batches.append(list(items))
        self.started.append(asyncio.get_running_loop().time())
        if self.delay:
            await asyncio.sleep(self.delay)
        if self.fail_on in items:
            raise RuntimeError("flush failed")
        return [item.upper() for item in items]


async def test_items_submitted_in_one_iteration_share_a_flush() -> None:
    recorder = Recorder()
    batcher: MicroBatcher[str, str] = MicroBatcher(recorder.flush)
    results = await asyncio.gather(*(batcher.submit(x) for x in "abc"))
    assert results == ["A", "B", "C"]
    assert recorder.batches == [["a", "b", "c"]]


async def test_without_linger_items_arriving_during_a_flush_go_in_the_next() -> None:
    recorder = Recorder(delay=0.02)
    batcher: MicroBatcher[str, str] = MicroBatcher(recorder.flush)
    first = asyncio.ensure_future(batcher.submit("a"))
    await asyncio.sleep(0.005)
    later = [asyncio.ensure_future(batcher.submit(x)) for x in "bc"]
    assert await first == "A"
    assert [await f for f in later] == ["B", "C"]
    assert recorder.batches == [["a"], ["b", "c"]]


async def test_linger_holds_items_until_the_interval_since_the_last_flush_has_passed() -> None:
    recorder = Recorder()
    batcher: MicroBatcher[str, str] = MicroBatcher(recorder.flush, min_interval=0.05)
    loop = asyncio.get_running_loop()
    assert await batcher.submit("a") == "A"  # after a quiet spell: at once
    waiting = [asyncio.ensure_future(batcher.submit(x)) for x in "bcd"]
    await asyncio.sleep(0.01)
    assert recorder.batches == [["a"]], "flushed before the linger interval"
    assert [await f for f in waiting] == ["B", "C", "D"]
    assert recorder.batches == [["a"], ["b", "c", "d"]]
    gap = recorder.started[1] - recorder.started[0]
    assert 0.045 <= gap < 0.5
    # A quiet spell longer than the interval: the next item goes out at once.
    await asyncio.sleep(0.06)
    before = loop.time()
    assert await batcher.submit("e") == "E"
    assert recorder.started[2] - before < 0.03


async def test_a_full_batch_does_not_wait_for_the_linger() -> None:
    recorder = Recorder()
    batcher: MicroBatcher[str, str] = MicroBatcher(recorder.flush, max_batch=3, min_interval=5.0)
    await batcher.submit("a")
    results = await asyncio.wait_for(asyncio.gather(*(batcher.submit(x) for x in "bcd")), timeout=1.0)
    assert results == ["B", "C", "D"]
    assert recorder.batches == [["a"], ["b", "c", "d"]]


async def test_a_failed_flush_fails_exactly_its_own_items() -> None:
    recorder = Recorder(delay=0.01, fail_on="b")
    batcher: MicroBatcher[str, str] = MicroBatcher(recorder.flush)
    first = asyncio.ensure_future(batcher.submit("a"))
    await asyncio.sleep(0)
    failing = [asyncio.ensure_future(batcher.submit(x)) for x in "bc"]
    assert await first == "A"
    for future in failing:
        with pytest.raises(RuntimeError, match="flush failed"):
            await future
    assert await batcher.submit("d") == "D"


async def test_close_sends_lingering_items_at_once_then_refuses_new_ones() -> None:
    recorder = Recorder()
    batcher: MicroBatcher[str, str] = MicroBatcher(recorder.flush, min_interval=5.0)
    await batcher.submit("a")
    lingering = asyncio.ensure_future(batcher.submit("b"))
    await asyncio.sleep(0.01)
    assert not lingering.done(), "held by the linger"
    await asyncio.wait_for(batcher.close(), timeout=1.0)
    assert lingering.done() and lingering.result() == "B"
    assert batcher._timer is None, "no timer left armed after close"
    with pytest.raises(RuntimeError, match="closed"):
        await batcher.submit("c")


async def test_a_second_flush_in_flight_waits_for_enough_items() -> None:
    recorder = Recorder(delay=0.05)
    batcher: MicroBatcher[str, str] = MicroBatcher(recorder.flush, max_in_flight=2, min_batch_when_busy=3)
    first = asyncio.ensure_future(batcher.submit("a"))
    await asyncio.sleep(0.005)
    two = [asyncio.ensure_future(batcher.submit(x)) for x in "bc"]
    await asyncio.sleep(0.01)
    assert recorder.batches == [["a"]], "two items are fewer than the busy minimum"
    three = [asyncio.ensure_future(batcher.submit(x)) for x in "d"]
    await asyncio.sleep(0.01)
    assert recorder.batches == [["a"], ["b", "c", "d"]], "three waiting items go beside the first flush"
    assert await first == "A"
    assert [await f for f in two + three] == ["B", "C", "D"]
    # When nothing is in flight, a single item goes at once again.
    assert await batcher.submit("e") == "E"
    assert recorder.batches[-1] == ["e"]


async def test_an_item_that_waits_past_max_wait_fails_and_is_never_sent() -> None:
    recorder = Recorder(delay=0.3)
    batcher: MicroBatcher[str, str] = MicroBatcher(recorder.flush, max_wait=0.05)
    loop = asyncio.get_running_loop()
    first = asyncio.ensure_future(batcher.submit("a"))
    await asyncio.sleep(0.01)  # "a" is in flight for 0.3 s
    began = loop.time()
    with pytest.raises(QueueTimeout):
        await batcher.submit("b")
    assert loop.time() - began < 0.15, "the shed came late"
    assert await first == "A"
    await batcher.close()
    assert recorder.batches == [["a"]], "a shed item was sent anyway"


async def test_once_flushes_are_known_slow_an_item_that_cannot_go_in_time_is_refused_at_once() -> None:
    recorder = Recorder(delay=0.2)
    batcher: MicroBatcher[str, str] = MicroBatcher(recorder.flush, max_wait=0.1)
    loop = asyncio.get_running_loop()
    assert await batcher.submit("a") == "A"  # teaches the batcher a flush takes 0.2 s
    second = asyncio.ensure_future(batcher.submit("b"))
    await asyncio.sleep(0.01)
    began = loop.time()
    with pytest.raises(QueueTimeout):
        await batcher.submit("c")
    assert loop.time() - began < 0.01, "not refused at once"
    assert await second == "B"


async def test_max_wait_sheds_nothing_when_flushes_keep_up() -> None:
    recorder = Recorder(delay=0.005)
    batcher: MicroBatcher[str, str] = MicroBatcher(recorder.flush, max_batch=4, max_wait=0.2)
    results = await asyncio.gather(*(batcher.submit(str(i)) for i in range(40)))
    assert results == [str(i) for i in range(40)]
    assert sum(len(b) for b in recorder.batches) == 40
