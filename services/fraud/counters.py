"""The fraud counters: one class per counter operation, run in batches by one Lua script.

A counter class owns everything about its operation: the arguments it sends
(a MessagePack map), the keys it keeps in Redis (``lua/<name>.lua``, which
adds ``OPS.<name>`` to the script) and how its answer is read. The store
configures each counter once (windows, TTLs, thresholds) and, per batch of
events, adds operations to a ``Batch`` and reads their answers by handle;
nothing else knows a counter's encoding, so what a counter stores can change
inside its class and its Lua file. A new counter is a class here, its Lua
file, and its name in ``COUNTERS``.

Per-command cost, not Redis, limits a Python client (redis-py spends ~200 µs
of CPU per pipelined command here), so a batch of checks is not one command
per counter: each operation's subject hashes to one of ``key_buckets``
buckets, the bucket's ``{bNN}`` hash tag begins the subject (so every key of
the operation lands on the bucket's Redis Cluster slot), and the batch runs
as one script call per bucket it touches, all in one pipeline; on a
standalone Redis the slots do not matter and the whole batch is one call
(at 1,000 clicks/s, batches of about a dozen, that took Redis's CPU per click
from about 60 to 52 µs). The key names are the same either way.

Arguments and answers travel as MessagePack (``cmsgpack`` in Redis). For a
batch of 100 dedup and 7 window operations, measured on this machine
(Redis 7.0, msgpack 1.2 and orjson 3.13): the script decoded the operations
and encoded the answers in 65 µs with cmsgpack and 106 µs with cjson
(118 µs with named arguments, against cmsgpack's unchanged 64 µs), and the
tab-separated text it replaces took 115 µs; in Python, msgpack packs in
13 µs where orjson takes 4 µs, and both read the answers in about 1.5 µs.
MessagePack costs the least in all, and keeps named arguments for free.
"""

from __future__ import annotations

import zlib
from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar, Generic, NamedTuple, TypeVar

import msgpack  # type: ignore[import-untyped]  # no stubs or py.typed

A = TypeVar("A")

LUA_DIR = Path(__file__).parent / "lua"


class Counter(ABC, Generic[A]):
    """One counter operation: what it sends (``add``), and what its answer means (``read``)."""

    name: ClassVar[str]  # its Lua file, lua/<name>.lua, defines OPS.<name>

    @abstractmethod
    def read(self, answer: Any) -> A:
        """The operation's answer, as the script returned it, in Python terms."""


class Handle(NamedTuple, Generic[A]):
    """Where an operation's answer is in its batch's answers."""

    counter: Counter[A]
    at: int  # its place among the batch's operations


class Batch:
    """Operations of one batch, each with its bucket; run by ``FraudStore.run``."""

    __slots__ = ("buckets", "ops", "tags")

    def __init__(self, tags: Sequence[str]) -> None:
        self.tags = tags  # each bucket's "{bNN}:" subject prefix
        self.buckets: list[int] = []
        self.ops: list[tuple[str, str, dict[str, Any]]] = []

    def add(self, counter: Counter[A], subject: str, args: dict[str, Any]) -> Handle[A]:
        bucket = zlib.crc32(subject.encode()) % len(self.tags)
        self.buckets.append(bucket)
        self.ops.append((counter.name, self.tags[bucket] + subject, args))
        return Handle(counter, len(self.ops) - 1)

    def add_sharded(
        self, counter: Counter[A], family: str, point: int, shards: int, args: dict[str, Any]
    ) -> Handle[A]:
        """An operation on one member of a family kept in ``shards`` hashes per bucket.

        ``point`` (a 32-bit hash of the member) chooses the bucket and, with
        the bits the bucket did not use, the shard (``args["shard"]``): the
        script names the hash ``<family>#<period>:<shard>`` inside the
        bucket's tag.
        """
        buckets = len(self.tags)
        bucket = point % buckets
        args["shard"] = point // buckets % shards
        self.buckets.append(bucket)
        self.ops.append((counter.name, self.tags[bucket] + family, args))
        return Handle(counter, len(self.ops) - 1)

    def calls(self, single: bool) -> list[tuple[int, list[int]]]:
        """The script calls: each a bucket (whose tag key routes it) and its operations' indexes.

        One call for the whole batch when ``single`` (a standalone server),
        else one per bucket; operations keep their order within a call.
        """
        if single:
            return [(self.buckets[0], list(range(len(self.ops))))] if self.ops else []
        by_bucket: dict[int, list[int]] = {}
        for index, bucket in enumerate(self.buckets):
            members = by_bucket.get(bucket)
            if members is None:
                members = by_bucket[bucket] = []
            members.append(index)
        return list(by_bucket.items())

    def payload(self, indexes: Sequence[int]) -> bytes:
        ops = self.ops
        if len(indexes) == len(ops):
            return pack(ops)
        return pack([ops[i] for i in indexes])


class Answers:
    """A batch's answers, each read by its counter when asked for."""

    __slots__ = ("raw",)

    def __init__(self, raw: list[Any]) -> None:
        self.raw = raw

    def __getitem__(self, handle: Handle[A]) -> A:
        return handle.counter.read(self.raw[handle.at])


# Bytes travel as MessagePack's raw strings: Redis 6.2's cmsgpack does not
# read the bin types (Lua strings are bytes either way).
_packer = msgpack.Packer(use_bin_type=False)


def pack(value: Any) -> bytes:
    packed: bytes = _packer.pack(value)
    return packed


def unpack(data: bytes) -> Any:
    return msgpack.unpackb(data)


# -- the counters ---------------------------------------------------------------


class Dedup(Counter[str | None]):
    """The first owner of a subject keeps it for ``ttl_ms``; later ones learn who it is."""

    name = "dedup"

    def __init__(self, ttl_ms: int) -> None:
        self.ttl_ms = ttl_ms

    def add(self, batch: Batch, subject: str, owner: str) -> Handle[str | None]:
        return batch.add(self, subject, {"owner": owner, "ttl_ms": self.ttl_ms})

    def read(self, answer: Any) -> str | None:
        """None when the subject is the caller's owner's now, else the owner that holds it."""
        return answer or None


class Window(Counter[tuple[float, ...]]):
    """Sliding window counters of a subject, one per window length.

    Per window, the current and the previous fixed bucket and the estimate
    ``previous * (1 - elapsed fraction) + current``: O(1) memory per subject
    whatever the traffic, and within a few percent of an exact sliding
    window. Windows run on the events' own timestamps, so a replay of a
    day's traffic counts as that day would have.

    A subject is ``<family>:<member>`` (``ip:203.0.113.9``): the members of
    a family share small hashes, a field each, ``shards`` per key bucket
    and bucket of the longest window (``lua/window.lua``). Small, so that
    Redis keeps them as listpacks (ziplists before 7.0), about 25 bytes a
    member instead of about 95 in a hash table (see ``SHARD_FILL``).
    """

    name = "window"
    # A hash outlives the bucket after its own by this much, so that an
    # event a little late still finds its previous bucket.
    SLACK_MS = 60_000

    def __init__(self, windows_ms: Sequence[int], shards: int = 1) -> None:
        self.windows_ms = sorted(windows_ms)
        self.shards = shards

    def add(self, batch: Batch, subject: str, now_ms: int, inc: int) -> Handle[tuple[float, ...]]:
        family, _, member = subject.partition(":")
        args = {"member": member, "now_ms": now_ms, "inc": inc, "windows_ms": self.windows_ms,
                "slack_ms": self.SLACK_MS}
        return batch.add_sharded(self, family, zlib.crc32(member.encode()), self.shards, args)

    def read(self, answer: Any) -> tuple[float, ...]:
        """Each window's count, including this call's events."""
        return tuple(milli / 1000 for milli in answer)


class FirstVisit(Counter[bool]):
    """Whether a visitor had its first (unique) event within the last ``window_ms``.

    Exact for events checked in time order: an event is a repeat iff the
    same visitor's unique event came less than ``window_ms`` before it; a
    retried check of that unique event (the same owner) is not a repeat. An
    event checked after a later one of the same visitor is that one's
    repeat (the visitor counts once either way). Times are the caller's:
    the store passes the event's time held near the check's own
    (``FraudStore.count_clicks``), so the hashes it looks in are alive. Each period of
    ``window_ms`` has its hashes, ``shards`` per key bucket
    (``<family>#<period>:<shard>``), a field per visitor whose unique event
    fell in the period: 8 bytes of the visitor's digest, then the event's
    offset in the period (ms, 4 bytes) and a 4-byte tag of its owner. An
    event looks in its period and the one before (``lua/visit.lua``).
    About 20 bytes a visitor in a listpack, against about 180 for a key of
    its own; a digest or tag collision (64 and 32 bits) is the only error.
    """

    name = "visit"

    def __init__(self, window_ms: int, shards: int = 1) -> None:
        if not 0 < window_ms < 2**32:
            raise ValueError("a visit window must fit the 4-byte offset (under 49 days)")
        self.window_ms = window_ms
        self.shards = shards

    def add(self, batch: Batch, family: str, visitor: bytes, owner: bytes, now_ms: int) -> Handle[bool]:
        """``visitor``: a 12-byte digest (8 name the visitor, 4 place it); ``owner``: the event's 4-byte tag."""
        # One string for the visitor and the tag: each argument costs packing here and unpacking there.
        args = {"visitor": visitor[:8] + owner, "now_ms": now_ms, "window_ms": self.window_ms}
        return batch.add_sharded(self, family, int.from_bytes(visitor[8:12], "big"), self.shards, args)

    def read(self, answer: Any) -> bool:
        """True when the event is a repeat visit."""
        return bool(answer)


# Members a sharded hash holds on average at the expected peak population
# (shards = population / SHARD_FILL). Redis keeps a hash of up to 512
# fields as a listpack by default (hash-max-listpack-entries;
# hash-max-ziplist-entries on 6.2): an eighth of it leaves room for the
# unevenness of the hash and for eight times the population, and keeps the
# listpacks that each operation scans short (a few hundred bytes). A
# fuller hash turns into a hash table: still exact, about four times the
# bytes. Fewer members a hash would spread its fixed cost (about 150 bytes)
# over fewer.
SHARD_FILL = 64


def shards_for(population: int, key_buckets: int) -> int:
    """Shards per key bucket for a family of ``population`` members in a period."""
    return max(1, -(-population // (key_buckets * SHARD_FILL)))


class SpikeAnswer(NamedTuple):
    short: float      # the short window's count
    baseline: float   # the usual count of a short window
    state: int        # 0 calm, 1 spiking, 2 spiking and this call is the first to notice

    @property
    def noticed(self) -> bool:
        """Whether this call raised the episode's one alert."""
        return self.state == 2


class Spike(Counter[SpikeAnswer]):
    """A subject's rate in a short window against its own usual rate, alerted once per episode.

    The usual rate is what the long window held before the current short
    one, per short window of history actually seen. Spiking takes at least
    ``min_volume`` events and ``factor`` times the usual rate.
    """

    name = "spike"

    def __init__(self, window_s: int, baseline_s: int, min_volume: int, factor: float) -> None:
        self.window_s = window_s
        self.fixed = {
            "ttl_ms": 2 * baseline_s * 1000,
            "short_ms": window_s * 1000,
            "long_ms": baseline_s * 1000,
            "min_volume": min_volume,
            "factor": factor,
            # One alert per episode: the flag outlives a few windows of the spike.
            "flag_ttl_ms": window_s * 1000 * 6,
        }

    def add(
        self, batch: Batch, subject: str, now_ms: int, inc: int, order_ids: Sequence[str] | None = None
    ) -> Handle[SpikeAnswer]:
        """``order_ids``: count each order once (``inc`` is then how many of them are new)."""
        args: dict[str, Any] = {"now_ms": now_ms, "inc": inc, **self.fixed}
        if order_ids is not None:
            args["order_ids"] = order_ids
        return batch.add(self, subject, args)

    def read(self, answer: Any) -> SpikeAnswer:
        short, baseline, state = answer
        return SpikeAnswer(short / 1000, baseline / 1000, state)


class OncePerOrder(Counter[list[float]]):
    """A sliding window that counts each order once.

    A retried check or a re-score after an outage answers the order's own
    count as it was, and adds nothing (a guard per order beside the counter,
    in its slot). An order without an id counts every time.
    """

    name = "once_per_order"

    def __init__(self, window_ms: int, ttl_ms: int) -> None:
        self.window_ms = window_ms
        self.ttl_ms = ttl_ms

    def add(self, batch: Batch, subject: str, now_ms: int, order_ids: Sequence[str]) -> Handle[list[float]]:
        args = {"now_ms": now_ms, "ttl_ms": self.ttl_ms, "window_ms": self.window_ms, "order_ids": order_ids}
        return batch.add(self, subject, args)

    def read(self, answer: Any) -> list[float]:
        """Each order's count, in the order of ``order_ids``."""
        return [milli / 1000 for milli in answer]


class SpreadAnswer(NamedTuple):
    ips: int
    devices: int
    newly_leaked: bool  # this call raised the flag (one alert per subject and flag TTL)


class Spread(Counter[SpreadAnswer]):
    """Distinct IPs and devices of a subject (HyperLogLogs), flagged once past ``max_distinct``."""

    name = "spread"

    def __init__(self, max_distinct: int, ttl_ms: int) -> None:
        self.max_distinct = max_distinct
        self.ttl_ms = ttl_ms

    def add(self, batch: Batch, subject: str, ip: str, device: str) -> Handle[SpreadAnswer]:
        args = {"ip": ip, "device": device, "ttl_ms": self.ttl_ms, "max": self.max_distinct,
                "flag_ttl_ms": self.ttl_ms}
        return batch.add(self, subject, args)

    def read(self, answer: Any) -> SpreadAnswer:
        ips, devices, newly = answer
        return SpreadAnswer(ips, devices, bool(newly))


class MissesAnswer(NamedTuple):
    misses: int  # misses in the window, this call's included
    left_ms: int  # until the window ends (0: no window)
    crossed: bool  # this call reached the threshold: the window's one alert


class Misses(Counter[MissesAnswer]):
    """Unknown or mistyped codes of a subject in a fixed window from its first miss (code guessing).

    A fixed window, not a sliding one: a blocked subject learns exactly when
    it may try again (``Retry-After``), and the threshold is crossed once per
    window, which is when the alert goes out.
    """

    name = "misses"

    def __init__(self, window_ms: int, threshold: int) -> None:
        self.window_ms = window_ms
        self.threshold = threshold

    def add(self, batch: Batch, subject: str, inc: int) -> Handle[MissesAnswer]:
        """``inc`` 0 only reads the subject's count."""
        return batch.add(self, subject, {"inc": inc, "window_ms": self.window_ms, "threshold": self.threshold})

    def read(self, answer: Any) -> MissesAnswer:
        count, left, crossed = answer
        return MissesAnswer(int(count), int(left), bool(crossed))


COUNTERS: tuple[type[Counter[Any]], ...] = (Dedup, Window, FirstVisit, Spike, OncePerOrder, Spread, Misses)


def script() -> str:
    """The one script every batch calls: the shared helpers, each counter's file, the dispatcher."""
    files = ["common", *(counter.name for counter in COUNTERS), "run"]
    return "\n".join((LUA_DIR / f"{name}.lua").read_text() for name in files)
