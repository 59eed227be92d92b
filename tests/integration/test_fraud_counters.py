"""Each counter operation, alone, on a real Redis, through both transports.

The answers are worked out by hand from each counter's definition (see its
class in services/fraud/counters.py); the same story must come out of the
RESP client and of redis-py, which is what keeps the two transports equal.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import Any, cast

import pytest
import redis.asyncio as aioredis

from services.common.errors import Unavailable
from services.fraud.counters import (
    Counter,
    Dedup,
    FirstVisit,
    OncePerOrder,
    Spike,
    SpikeAnswer,
    Spread,
    SpreadAnswer,
    Window,
)
from services.fraud.redis_transport import RedisPyTransport, RespTransport
from services.fraud.store import FraudStore, StoreConfig, owner_tag, visitor_digest
from tests.integration.fraud_golden import text
from tests.integration.test_fraud_golden import transport

T0 = 3_600_000 * 490_000  # ms, on a whole hour (so on a whole minute and ten minutes too), in the past


@pytest.fixture(params=["resp", "redis-py"])
async def store(
    request: pytest.FixtureRequest, redis_server_url: str, redis_prefix: str, redis_client: aioredis.Redis
) -> AsyncIterator[FraudStore]:
    client = aioredis.from_url(redis_server_url)
    store = FraudStore(client, StoreConfig(prefix=redis_prefix), transport(request.param, client))
    await store.load_scripts()
    yield store
    await store.aclose()
    await client.aclose()


def key(store: FraudStore, subject: str) -> str:
    """The full name of a subject's key (its bucket's tag included)."""
    batch = store.batch()
    batch.add(Dedup(1), subject, {})
    return f"{store.prefix}:{batch.ops[0][1]}"


def sharded_key(store: FraudStore, add: Any, *args: Any) -> str:
    """The family key (bucket's tag included) an operation of a sharded counter goes to."""
    batch = store.batch()
    add(batch, *args)
    return f"{store.prefix}:{batch.ops[0][1]}"


async def test_dedup_keeps_the_first_owner(store: FraudStore, redis_client: aioredis.Redis) -> None:
    dedup = Dedup(ttl_ms=60_000)
    batch = store.batch()
    first, second = dedup.add(batch, "xc:a:1", "c1"), dedup.add(batch, "xc:a:1", "c2")
    answers = await store.run(batch)
    assert (answers[first], answers[second]) == (None, "c1")
    batch = store.batch()
    again, other = dedup.add(batch, "xc:a:1", "c1"), dedup.add(batch, "xc:a:2", "c3")
    answers = await store.run(batch)
    assert (answers[again], answers[other]) == ("c1", None)  # the owner itself, told it owns it
    name = key(store, "xc:a:1")
    assert await redis_client.get(name) == b"c1"
    assert 0 < await redis_client.pttl(name) <= 60_000


async def test_window_slides_over_its_buckets(store: FraudStore, redis_client: aioredis.Redis) -> None:
    window = Window(windows_ms=(60_000, 3_600_000))
    seen = []
    for at, inc in ((0, 3), (30_000, 2), (90_000, 1), (200_000, 0)):
        batch = store.batch()
        handle = window.add(batch, "ip:1.2.3.4", T0 + at, inc)
        seen.append((await store.run(batch))[handle])
    # At 90 s the previous minute (5) counts half: 5 * 0.5 + 1; at 200 s it is gone.
    assert seen == [(3.0, 3.0), (5.0, 5.0), (3.5, 6.0), (0.0, 6.0)]
    # The family's IPs share small hashes per hour, a field each: the minute
    # (relative to the hour), its count, the previous minute's, the hour's count.
    hour = sharded_key(store, window.add, "ip:1.2.3.4", T0, 1) + f"#{T0 // 3_600_000}:0"
    assert text(cast(bytes, await redis_client.hget(hour, "1.2.3.4"))) == "3,0,0,6"
    assert 3_600_000 < await redis_client.pttl(hour) <= 2 * 3_600_000 + Window.SLACK_MS


async def test_window_carries_its_counts_across_the_longest_bucket(store: FraudStore) -> None:
    """The hour after: the last hour counts by its elapsed fraction, the last minute too."""
    window = Window(windows_ms=(60_000, 3_600_000))
    answers = []
    for at, inc in ((3_600_000 - 30_000, 4), (3_600_000 + 15_000, 1), (2 * 3_600_000 + 1, 1)):
        batch = store.batch()
        handle = window.add(batch, "ip:5.6.7.8", T0 + at, inc)
        answers.append((await store.run(batch))[handle])
    assert answers[0] == (4.0, 4.0)
    # 15 s into the new hour: the previous minute (4) at 3/4, the previous hour (4) almost whole.
    minute, hour = answers[1]
    assert minute == 4 * 0.75 + 1
    assert hour == pytest.approx(4 * (1 - 15_000 / 3_600_000) + 1, abs=0.001)
    # mypy does not know that an approx compares equal to a float.
    assert answers[2] == (1.0, pytest.approx(1 + 1 * (1 - 1 / 3_600_000), abs=0.001))  # type: ignore[comparison-overlap]


async def test_spike_against_the_subjects_own_rate(store: FraudStore) -> None:
    spike = Spike(window_s=60, baseline_s=600, min_volume=5, factor=3)

    async def hit(subject: str, at: int, inc: int, order_ids: list[str] | None = None) -> SpikeAnswer:
        batch = store.batch()
        handle = spike.add(batch, subject, T0 + at, inc, order_ids)
        return (await store.run(batch))[handle]

    # No history: no usual rate; 5 at once is a spike, noticed once.
    assert await hit("aff:c:new", 0, 5) == SpikeAnswer(5.0, 0.0, 2)
    assert await hit("aff:c:new", 1_000, 1) == SpikeAnswer(6.0, 0.0, 1)
    assert await hit("aff:c:calm", 0, 2) == SpikeAnswer(2.0, 0.0, 0)
    # Five minutes of history with 4 in them: usual rate (8 - 4) / 4 periods = 1 a minute.
    assert await hit("aff:c:old", -300_000, 4) == SpikeAnswer(4.0, 0.0, 0)
    assert await hit("aff:c:old", 0, 4) == SpikeAnswer(4.0, 1.0, 0)
    # Once per order: a retried order adds nothing; an order without an id always counts.
    assert await hit("code:c:X", 0, 3, ["o1", "o2", ""]) == SpikeAnswer(3.0, 0.0, 0)
    assert await hit("code:c:X", 1_000, 2, ["o1", "o2"]) == SpikeAnswer(3.0, 0.0, 0)
    assert await hit("code:c:X", 2_000, 2, ["o3", ""]) == SpikeAnswer(5.0, 0.0, 2)


async def test_once_per_order_answers_a_retried_order_as_it_was(
    store: FraudStore, redis_client: aioredis.Redis
) -> None:
    orders = OncePerOrder(window_ms=86_400_000, ttl_ms=2 * 86_400_000)
    batch = store.batch()
    first = orders.add(batch, "cip:c:1.2.3.4", T0, ["o1", "o2"])
    answers = await store.run(batch)
    assert answers[first] == [1.0, 2.0]  # the k-th order is told the count after the k-th
    batch = store.batch()
    retried = orders.add(batch, "cip:c:1.2.3.4", T0 + 1_000, ["o2", "o3", ""])
    answers = await store.run(batch)
    assert answers[retried] == [2.0, 3.0, 4.0]
    guard = f"{key(store, 'cip:c:1.2.3.4')}:o:o3"
    assert await redis_client.get(guard) == b"3000"


async def test_spread_flags_once_past_its_limit(store: FraudStore) -> None:
    spread = Spread(max_distinct=2, ttl_ms=60_000)
    batch = store.batch()
    handles = [
        spread.add(batch, "code:c:U1", ip, device)
        for ip, device in (("1.1.1.1", "d1"), ("1.1.1.2", "d1"), ("1.1.1.3", "d2"), ("1.1.1.4", ""), ("", "d3"))
    ]
    answers = await store.run(batch)
    assert [answers[h] for h in handles] == [
        SpreadAnswer(1, 1, False), SpreadAnswer(2, 1, False), SpreadAnswer(3, 2, True),
        SpreadAnswer(4, 2, False), SpreadAnswer(4, 3, False),
    ]


DAY = 86_400_000
D0 = DAY * 20_000  # ms, on a UTC midnight


async def visits(store: FraudStore, *events: tuple[str, str, int]) -> list[bool]:
    """(visitor, click id, ms after D0) in one batch: whether each is a repeat visit."""
    first_visit = FirstVisit(window_ms=DAY, shards=4)
    batch = store.batch()
    handles = [
        first_visit.add(batch, "uv", visitor_digest("c", "a", visitor, "UA"), owner_tag(click), D0 + at)
        for visitor, click, at in events
    ]
    answers = await store.run(batch)
    return [answers[h] for h in handles]


async def test_a_repeat_visit_is_one_within_24_hours_of_the_unique_one_across_midnight(store: FraudStore) -> None:
    hour = 3_600_000
    # Unique at 22:00; repeats at 23:00, and the next day until 21:59:59.999.
    assert await visits(store, ("v1", "k1", 22 * hour), ("v1", "k2", 23 * hour)) == [False, True]
    assert await visits(store, ("v1", "k3", DAY + 21 * hour), ("v1", "k4", DAY + 22 * hour - 1)) == [True, True]
    # 24 hours after the unique click: unique again, and the new one counts from then.
    assert await visits(store, ("v1", "k5", DAY + 22 * hour)) == [False]
    assert await visits(store, ("v1", "k6", 2 * DAY + 22 * hour - 1), ("v1", "k7", 2 * DAY + 22 * hour)) == [
        True, False,
    ]
    # Another visitor, or the same address with another campaign, is its own.
    first_visit = FirstVisit(window_ms=DAY, shards=4)
    batch = store.batch()
    other = first_visit.add(batch, "uv", visitor_digest("c2", "a", "v1", "UA"), owner_tag("k8"), D0 + 23 * hour)
    assert (await store.run(batch))[other] is False
    assert await visits(store, ("v2", "k9", 23 * hour)) == [False]


async def test_a_retried_check_of_a_unique_click_stays_unique(store: FraudStore) -> None:
    hour = 3_600_000
    assert await visits(store, ("v1", "k1", 23 * hour), ("v1", "k1", 23 * hour + 5)) == [False, False]
    # Retried the next day (from the previous day's hash), and a repeat stays a repeat.
    assert await visits(store, ("v1", "k2", DAY + hour)) == [True]
    assert await visits(store, ("v1", "k1", DAY + 2 * hour), ("v1", "k2", DAY + 2 * hour)) == [False, True]
    # A click without an id is never taken for the owner.
    assert await visits(store, ("v1", "", DAY + 3 * hour)) == [True]


async def test_a_visitor_checked_out_of_time_order_across_midnight_counts_once(store: FraudStore) -> None:
    # A replica checks the click at 00:00:00.100 before another checks the one at 23:59:59.900.
    assert await visits(store, ("v1", "later", DAY + 100)) == [False]
    assert await visits(store, ("v1", "earlier", DAY - 100)) == [True]
    # Within a day the order decides which one is unique, and still one is.
    assert await visits(store, ("v2", "later", 5_000), ("v2", "earlier", 4_000)) == [False, True]
    # The later unique one's retried check stays its own.
    assert await visits(store, ("v1", "later", DAY + 100)) == [False]


async def test_a_future_dated_visit_does_not_cut_its_hash_short(
    store: FraudStore, redis_client: aioredis.Redis
) -> None:
    seconds, micros = await redis_client.time()
    server_ms = seconds * 1000 + micros // 1000
    ahead = server_ms + 300_000  # the 5 minutes a click may be dated ahead
    first_visit = FirstVisit(window_ms=DAY, shards=4)
    batch = store.batch()
    first_visit.add(batch, "uv", visitor_digest("c", "a", "198.51.100.9", "UA"), owner_tag("k1"), ahead)
    shard = batch.ops[0][2]["shard"]
    await store.run(batch)
    name = f"{store.prefix}:{batch.ops[0][1]}#{ahead // DAY}:{shard}"
    # Until the end of the next day (and its minute) on this server's clock,
    # not five minutes less (counted from the event's time).
    deadline = (ahead // DAY + 2) * DAY + DAY // 1440
    assert await redis_client.pttl(name) >= deadline - server_ms - 5_000


async def test_visitors_live_in_small_hashes_of_their_day(store: FraudStore, redis_client: aioredis.Redis) -> None:
    first_visit = FirstVisit(window_ms=DAY, shards=4)
    batch = store.batch()
    digest = visitor_digest("c", "a", "198.51.100.7", "UA")
    first_visit.add(batch, "uv", digest, owner_tag("k1"), D0 + 1_234)
    shard = batch.ops[0][2]["shard"]
    await store.run(batch)
    name = f"{store.prefix}:{batch.ops[0][1]}#{D0 // DAY}:{shard}"
    # 8 bytes of the visitor's digest = the click's ms in its day and its owner's tag.
    assert await redis_client.hgetall(name) == {digest[:8]: (1_234).to_bytes(4, "big") + owner_tag("k1")}
    assert DAY < await redis_client.pttl(name) <= 2 * DAY + DAY // 1440


class _Unknown(Counter[Any]):
    name = "no_such_counter"

    def read(self, answer: Any) -> Any:
        return answer


async def test_an_operation_the_script_does_not_know_fails_the_batch(store: FraudStore) -> None:
    batch = store.batch()
    batch.add(_Unknown(), "x:1", {})
    with pytest.raises(Unavailable):
        await store.run(batch)


async def test_the_transport_is_chosen_once_and_logged(
    redis_server_url: str, redis_prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    client = aioredis.from_url(redis_server_url)
    with caplog.at_level(logging.INFO, logger="services.fraud.redis_transport"):
        store = FraudStore(client, StoreConfig(prefix=redis_prefix))
    try:
        assert isinstance(store.redis_transport, RespTransport), "a plain TCP standalone Redis gets the RESP client"
        assert [r.getMessage() for r in caplog.records] == ["fraud counters: RESP client to a standalone Redis"]
        await store.load_scripts()
        assert store._single_call
    finally:
        await store.aclose()
        await client.aclose()
    # A connection the RESP client does not speak (TLS here; never connected) stays with redis-py.
    tls = aioredis.from_url("rediss://127.0.0.1:1/0")
    assert isinstance(FraudStore(tls, StoreConfig(prefix=redis_prefix)).redis_transport, RedisPyTransport)
    await tls.aclose()
