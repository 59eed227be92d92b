"""Every Redis access of the fraud service: the counters a check reads, and the alert stream.

Keys (``P`` is ``ASCRIBE_FRAUD_KEY_PREFIX``, ``NN`` a bucket number):

    P:fraud:{bNN}:xc:<affiliate>:<external click id>   dedup, value = owning click id
    P:fraud:{bNN}:uv#<day>:<shard>                     visitors' unique clicks of a UTC day (24 h periods),
      a field per visitor (8 bytes of a digest of campaign, affiliate, IP and user agent) =
      the click's ms in the day and a tag of its id (FirstVisit)
    P:fraud:{bNN}:ip#<hour>:<shard>                    click velocity windows, a field per IP (Window)
    P:fraud:{bNN}:cip:<campaign>:<ip>                  conversions of an IP in a campaign
      (<ip>: an IPv4 address, or an IPv6 address's /64, see ipintel.subscriber_key)
    P:fraud:{bNN}:cip:<campaign>:<ip>:o:<order>        the order's count there (each order counts once)
    P:fraud:{bNN}:aff:<campaign>:<affiliate>:rate|:alerted      affiliate click rate (AFFILIATE_BURST)
    P:fraud:{bNN}:code:<campaign>:<code>:ips|:devices|:leaked  UNIQUE code spread (HyperLogLog)
    P:fraud:{bNN}:code:<campaign>:<code>:rate|:alerted|:o:<order>  EXCLUSIVE code rate (CODE_SPIKE)
    P:fraud:{bNN}:rule:<signal>:rate|:alerted          signal rate (RULE_SURGE)
    P:fraud:{bNN}:gip:<ip>                             unknown codes tried from an address (code guessing)
    P:fraud:{bNN}:gcu:<campaign>:<customer>            unknown codes tried by a customer id (code guessing)
    P:fraud:{alerts}                                   the alert stream (XADD MAXLEN ~)

Every key has a TTL. The counters (``counters.py``, one class each, their
Lua in ``lua/``) run a batch of checks in one round trip, through the
Redis transport chosen at start-up (``redis_transport.py``). Events of a batch that
share a counter (the same IP, the same code) share one operation that counts
them all at once; the k-th of them is told the count as it was after the k-th.
"""

from __future__ import annotations

import hashlib
import logging
import re
import secrets
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from redis.exceptions import RedisError

from services.common.errors import Unavailable
from services.fraud.counters import (
    Answers,
    Batch,
    Dedup,
    FirstVisit,
    Handle,
    Misses,
    MissesAnswer,
    OncePerOrder,
    Spike,
    SpikeAnswer,
    Spread,
    SpreadAnswer,
    Window,
    script,
    shards_for,
    unpack,
)
from services.fraud.domain import (
    ClickCounters,
    ClickEvent,
    CodeAttempt,
    ConversionCounters,
    ConversionEvent,
    CouponKind,
    GuessState,
    guessing,
)
from services.fraud.ipintel import subscriber_key
from services.fraud.redis_transport import (
    REDIS_DOWN,
    Call,
    RedisTransport,
    Result,
    ScriptMissing,
    redis_unavailable,
    transport_for,
)
from services.fraud.redis_transport import (
    RedisClient as RedisClient,  # the server's type for its clients
)

logger = logging.getLogger(__name__)

SCRIPT = script()

_STREAM_ID = re.compile(r"^\d+(?:-\d+)?$")


class AlertKind:
    """Same numbers as ``ascribe.fraud.v1.AlertKind``."""

    CODE_LEAK = 1
    CODE_SPIKE = 2
    AFFILIATE_BURST = 3
    RULE_SURGE = 4
    CODE_GUESSING = 5


@dataclass(frozen=True)
class Alert:
    kind: int
    detail: str
    campaign_id: str = ""
    coupon_code: str = ""
    affiliate_id: str = ""
    ip: str = ""
    at: datetime | None = None
    id: str = ""


@dataclass(frozen=True)
class StoreConfig:
    prefix: str = "ascribe"
    dedup_ttl_seconds: int = 30 * 86400
    code_spread_ttl_seconds: int = 30 * 86400
    code_max_distinct: int = 3
    spike_window_seconds: int = 600
    spike_baseline_seconds: int = 86400
    spike_min_volume: int = 20
    spike_factor: float = 5.0
    burst_window_seconds: int = 300
    burst_baseline_seconds: int = 86400
    burst_min_volume: int = 200
    burst_factor: float = 5.0
    surge_window_seconds: int = 300
    surge_baseline_seconds: int = 86400
    surge_min_volume: int = 100
    surge_factor: float = 5.0
    alerts_maxlen: int = 100_000
    guess_threshold: int = 20  # unknown codes in the window that make an address or customer a guesser
    guess_window_seconds: int = 600
    key_buckets: int = 16
    # The expected peak of distinct click addresses in an hour, and of
    # distinct visitors (campaign, affiliate, IP and user agent) in 24
    # hours: they size the shards of the per-address windows and of the
    # unique visitors (counters.shards_for). Up to about eight times them a member
    # costs about 25 bytes of Redis; far beyond, the hashes turn into hash
    # tables (about 95); far below, fewer members share a hash's fixed cost
    # (about 150) and the checks touch more keys. Either way it is exact.
    # A change re-shards: for one window, repeat visits may count unique.
    addresses_per_hour: int = 250_000
    visitors_per_day: int = 500_000
    # Off only in tests, to run the per-bucket (cluster) path on a standalone server.
    single_call_when_standalone: bool = True


def valid_stream_id(value: str) -> bool:
    return bool(_STREAM_ID.match(value))


# A visitor's first click for a campaign and affiliate is unique; later
# ones within this window are not (the reporting issue's definition).
UNIQUE_CLICK_WINDOW_MS = 24 * 3600 * 1000


def visitor_digest(campaign_id: str, affiliate_id: str, ip: str, user_agent: str) -> bytes:
    """The visitor of a click for a campaign and affiliate: 12 bytes of a digest (FirstVisit.add)."""
    return hashlib.blake2b(
        f"{campaign_id}\x1f{affiliate_id}\x1f{ip}\x1f{user_agent}".encode(), digest_size=12
    ).digest()


def owner_tag(click_id: str) -> bytes:
    """A click's 4-byte tag: a retried check of a unique click finds its own tag."""
    if not click_id:
        return secrets.token_bytes(4)  # no id: no retry to recognise
    return zlib.crc32(click_id.encode()).to_bytes(4, "big")


def _ms(at: datetime) -> int:
    return int(at.timestamp() * 1000)


class FraudStore:
    """Counters, dedup and alerts in Redis; methods raise ``Unavailable`` when it is down."""

    def __init__(self, client: RedisClient, config: StoreConfig, transport: RedisTransport | None = None) -> None:
        # The client serves the alert stream and health checks; the counters
        # go through the transport (chosen here, once, and logged).
        self.client = client
        self.redis_transport = transport or transport_for(client)
        self.config = config
        self.prefix = f"{config.prefix}:fraud"
        self.alerts_key = f"{self.prefix}:{{alerts}}"
        self._sha: str | None = None
        # True once the server says it is not a cluster: one script call per batch.
        self._single_call = False
        # A subject begins with its bucket's tag, the script's keys with the store's prefix.
        self._bucket_parts = [f"{{b{bucket:02d}}}:" for bucket in range(config.key_buckets)]
        self._tags = [self.bucket_tag(bucket).encode() for bucket in range(config.key_buckets)]
        self._key_prefix = f"{self.prefix}:".encode()
        cfg = config
        self.dedup = Dedup(ttl_ms=cfg.dedup_ttl_seconds * 1000)
        self.first_visit = FirstVisit(
            window_ms=UNIQUE_CLICK_WINDOW_MS, shards=shards_for(cfg.visitors_per_day, cfg.key_buckets)
        )
        self.ip_clicks = Window(
            windows_ms=(60_000, 3_600_000), shards=shards_for(cfg.addresses_per_hour, cfg.key_buckets)
        )
        self.ip_conversions = OncePerOrder(window_ms=86_400_000, ttl_ms=2 * 86400 * 1000)
        self.code_spread = Spread(max_distinct=cfg.code_max_distinct, ttl_ms=cfg.code_spread_ttl_seconds * 1000)
        self.affiliate_burst = Spike(
            cfg.burst_window_seconds, cfg.burst_baseline_seconds, cfg.burst_min_volume, cfg.burst_factor
        )
        self.code_spike = Spike(
            cfg.spike_window_seconds, cfg.spike_baseline_seconds, cfg.spike_min_volume, cfg.spike_factor
        )
        self.rule_surge = Spike(
            cfg.surge_window_seconds, cfg.surge_baseline_seconds, cfg.surge_min_volume, cfg.surge_factor
        )
        self.guess_misses = Misses(window_ms=cfg.guess_window_seconds * 1000, threshold=cfg.guess_threshold)

    def bucket_tag(self, bucket: int) -> str:
        return f"{self.prefix}:{{b{bucket:02d}}}"

    async def aclose(self) -> None:
        await self.redis_transport.aclose()

    # -- plumbing --------------------------------------------------------------

    async def load_scripts(self) -> None:
        self._sha, standalone = await self.redis_transport.load(SCRIPT)
        self._single_call = self.config.single_call_when_standalone and standalone

    def batch(self) -> Batch:
        return Batch(self._bucket_parts)

    async def _pipeline(self, calls: Sequence[Call]) -> list[Result]:
        """One round trip for the script calls; answers (or error values) in call order."""
        assert self._sha is not None
        return await self.redis_transport.evalsha(self._sha, calls)

    async def run(self, batch: Batch) -> Answers:
        """Runs a batch in one round trip; its answers, by handle."""
        if not batch.ops:
            return Answers([])
        if self._sha is None:
            await self.load_scripts()
        groups = batch.calls(self._single_call)
        tags, prefix = self._tags, self._key_prefix
        calls = [(tags[bucket], prefix, batch.payload(indexes)) for bucket, indexes in groups]
        results = await self._pipeline(calls)
        missing = [i for i, result in enumerate(results) if isinstance(result, ScriptMissing)]
        if missing:
            # A restarted or flushed Redis forgot the script. Only the calls
            # that failed run again, so nothing is counted twice.
            await self.load_scripts()
            retried = await self._pipeline([calls[i] for i in missing])
            for i, result in zip(missing, retried, strict=True):
                results[i] = result
        if len(groups) == 1:
            result = results[0]
            if isinstance(result, bytes):
                return Answers(unpack(result))
        raw: list[Any] = [None] * len(batch.ops)
        for (_bucket, indexes), result in zip(groups, results, strict=True):
            if isinstance(result, Unavailable):
                raise result
            if isinstance(result, Exception):
                logger.error("redis error in fraud check: %s", result)
                raise Unavailable("fraud state store (Redis) failed")
            for index, answer in zip(indexes, unpack(result), strict=True):
                raw[index] = answer
        return Answers(raw)

    async def ping(self) -> bool:
        try:
            return bool(await self.client.ping())
        except RedisError:
            return False

    # -- clicks ----------------------------------------------------------------

    async def count_clicks(self, events: Sequence[ClickEvent]) -> tuple[list[ClickCounters], list[Alert]]:
        cfg = self.config
        batch = self.batch()
        dedup_at: dict[int, Handle[str | None]] = {}
        visit_at: dict[int, Handle[bool]] = {}
        by_ip: dict[str, list[int]] = {}
        by_affiliate: dict[tuple[str, str], list[int]] = {}
        ip_keys = [subscriber_key(event.ip) if event.ip else "" for event in events]
        at_ms = [_ms(event.occurred_at) for event in events]
        for index, event in enumerate(events):
            if event.external_click_id and event.affiliate_id:
                # A click without our id cannot be recognised as a retry, so
                # it gets a random owner: any earlier use makes it a duplicate.
                owner = event.click_id or f"anonymous:{secrets.token_hex(8)}"
                dedup_at[index] = self.dedup.add(
                    batch, f"xc:{event.affiliate_id}:{event.external_click_id}", owner
                )
            if event.ip:
                by_ip.setdefault(ip_keys[index], []).append(index)
                # A retried check of a unique click finds its own tag.
                visit_at[index] = self.first_visit.add(
                    batch, "uv",
                    visitor_digest(event.campaign_id, event.affiliate_id, event.ip, event.user_agent),
                    owner_tag(event.click_id), at_ms[index],
                )
            if event.affiliate_id:
                by_affiliate.setdefault((event.campaign_id, event.affiliate_id), []).append(index)
        ip_at: dict[str, Handle[tuple[float, ...]]] = {}
        for ip, members in by_ip.items():
            now = at_ms[members[0]] if len(members) == 1 else max(at_ms[i] for i in members)
            ip_at[ip] = self.ip_clicks.add(batch, f"ip:{ip}", now, len(members))
        burst_at: dict[tuple[str, str], Handle[SpikeAnswer]] = {}
        for (campaign_id, affiliate_id), members in by_affiliate.items():
            now = max(at_ms[i] for i in members)
            burst_at[(campaign_id, affiliate_id)] = self.affiliate_burst.add(
                batch, f"aff:{campaign_id}:{affiliate_id}", now, len(members)
            )
        guesses = _Guesses(self, batch)
        for event in events:
            if event.code_missed and event.ip:
                guesses.add(event.campaign_id, event.coupon_code, event.ip, "", 1)
        guesses.prepare()
        answers = await self.run(batch)
        ip_behind = _positions(by_ip)

        counters: list[ClickCounters] = []
        for index, event in enumerate(events):
            duplicate_of: str | None = None
            if index in dedup_at:
                holder = answers[dedup_at[index]]
                if holder is not None and holder != event.click_id:
                    duplicate_of = holder
            minute = hour = 0.0
            if event.ip:
                behind = ip_behind[index]
                estimates = answers[ip_at[ip_keys[index]]]
                minute = max(0.0, estimates[0] - behind)
                hour = max(0.0, estimates[1] - behind)
            repeat = index in visit_at and answers[visit_at[index]]
            counters.append(ClickCounters(
                duplicate_of=duplicate_of, ip_last_minute=minute, ip_last_hour=hour, repeat_visit=repeat
            ))

        alerts: list[Alert] = []
        for (campaign_id, affiliate_id), handle in burst_at.items():
            spike = answers[handle]
            if spike.noticed:
                alerts.append(
                    Alert(
                        kind=AlertKind.AFFILIATE_BURST,
                        campaign_id=campaign_id,
                        affiliate_id=affiliate_id,
                        detail=f"affiliate {affiliate_id} sent {spike.short:.0f} clicks in "
                        f"{cfg.burst_window_seconds}s against {spike.baseline:.1f} usually",
                    )
                )
        guesses.read(answers, alerts)
        return counters, alerts

    # -- conversions -----------------------------------------------------------

    async def count_conversions(
        self, events: Sequence[ConversionEvent]
    ) -> tuple[list[ConversionCounters], list[Alert]]:
        cfg = self.config
        batch = self.batch()
        by_ip: dict[tuple[str, str], list[int]] = {}
        by_code: dict[tuple[str, str], list[int]] = {}
        spread_at: dict[int, Handle[SpreadAnswer]] = {}
        ip_keys = [subscriber_key(event.ip) if event.ip else "" for event in events]
        for index, event in enumerate(events):
            if event.ip:
                by_ip.setdefault((event.campaign_id, ip_keys[index]), []).append(index)
            if event.coupon_code and event.coupon_kind is CouponKind.EXCLUSIVE:
                by_code.setdefault((event.campaign_id, event.coupon_code), []).append(index)
            if event.coupon_code and event.coupon_kind is CouponKind.UNIQUE:
                spread_at[index] = self.code_spread.add(
                    batch, f"code:{event.campaign_id}:{event.coupon_code}", ip_keys[index],
                    event.user_agent.strip(),
                )
        # Counters of conversions count each order once: a retried check or a
        # re-score after an outage answers the order's own count as it was,
        # and adds nothing.
        ip_at: dict[tuple[str, str], Handle[list[float]]] = {}
        for (campaign_id, ip), members in by_ip.items():
            now = max(_ms(events[i].received_at) for i in members)
            ip_at[(campaign_id, ip)] = self.ip_conversions.add(
                batch, f"cip:{campaign_id}:{ip}", now, [events[i].order_id for i in members]
            )
        code_at: dict[tuple[str, str], Handle[SpikeAnswer]] = {}
        for (campaign_id, code), members in by_code.items():
            now = max(_ms(events[i].received_at) for i in members)
            code_at[(campaign_id, code)] = self.code_spike.add(
                batch, f"code:{campaign_id}:{code}", now, len(members), [events[i].order_id for i in members]
            )
        guesses = _Guesses(self, batch)
        guess_at = [
            guesses.add(event.campaign_id, event.coupon_code, event.ip, event.customer_id, int(event.code_missed))
            if event.ip or event.customer_id else -1
            for event in events
        ]
        guesses.prepare()
        answers = await self.run(batch)
        ip_slot = {index: slot for members in by_ip.values() for slot, index in enumerate(members)}
        alerts: list[Alert] = []
        guess_states = guesses.read(answers, alerts)
        spikes = {key: answers[handle] for key, handle in code_at.items()}

        counters: list[ConversionCounters] = []
        for index, event in enumerate(events):
            per_ip = 0.0
            if event.ip:
                per_ip = answers[ip_at[(event.campaign_id, ip_keys[index])]][ip_slot[index]]
            ips = devices = 0
            if index in spread_at:
                ips, devices, newly = answers[spread_at[index]]
                if newly:
                    alerts.append(
                        Alert(
                            kind=AlertKind.CODE_LEAK,
                            campaign_id=event.campaign_id,
                            coupon_code=event.coupon_code,
                            affiliate_id=event.affiliate_id,
                            ip=event.ip,
                            detail=f"unique code {event.coupon_code} tried from {ips} IPs and {devices} devices "
                            f"(limit {cfg.code_max_distinct})",
                        )
                    )
            spiking = False
            rate = baseline = 0.0
            spike = spikes.get((event.campaign_id, event.coupon_code))
            if spike is not None and event.coupon_kind is CouponKind.EXCLUSIVE:
                spiking, rate, baseline = spike.state > 0, spike.short, spike.baseline
            counters.append(
                ConversionCounters(
                    ip_in_campaign_day=per_ip,
                    code_distinct_ips=ips,
                    code_distinct_devices=devices,
                    code_spiking=spiking,
                    code_rate=rate,
                    code_baseline=baseline,
                    guess_misses=guess_states[guess_at[index]].misses if guess_at[index] >= 0 else 0,
                    guessing=guess_at[index] >= 0 and guess_states[guess_at[index]].blocked,
                )
            )
        for (campaign_id, code), spike in spikes.items():
            if spike.noticed:
                alerts.append(
                    Alert(
                        kind=AlertKind.CODE_SPIKE,
                        campaign_id=campaign_id,
                        coupon_code=code,
                        detail=f"exclusive code {code} used {spike.short:.0f} times in "
                        f"{cfg.spike_window_seconds}s against {spike.baseline:.1f} usually",
                    )
                )
        return counters, alerts

    # -- code guessing ---------------------------------------------------------

    async def count_code_attempts(self, attempts: Sequence[CodeAttempt]) -> tuple[list[GuessState], list[Alert]]:
        """Counts the missed codes; says which attempts' address or customer id is past the threshold."""
        batch = self.batch()
        guesses = _Guesses(self, batch)
        at = [guesses.add(a.campaign_id, a.coupon_code, a.ip, a.customer_id, int(a.missed)) for a in attempts]
        guesses.prepare()
        answers = await self.run(batch)
        alerts: list[Alert] = []
        states = guesses.read(answers, alerts)
        return [states[i] for i in at], alerts

    # -- rule surges -----------------------------------------------------------

    async def count_signals(self, counts: dict[str, int], now: datetime) -> list[Alert]:
        """Adds a period's signal counts; alerts on a signal firing far above its usual rate."""
        cfg = self.config
        batch = self.batch()
        handles = {
            code: self.rule_surge.add(batch, f"rule:{code}", _ms(now), count)
            for code, count in sorted(counts.items())
        }
        answers = await self.run(batch)
        alerts = []
        for code, handle in handles.items():
            spike = answers[handle]
            if spike.noticed:
                alerts.append(
                    Alert(
                        kind=AlertKind.RULE_SURGE,
                        detail=f"signal {code} fired {spike.short:.0f} times in {cfg.surge_window_seconds}s "
                        f"against {spike.baseline:.1f} usually",
                    )
                )
        return alerts

    # -- alerts ----------------------------------------------------------------

    async def add_alerts(self, alerts: Sequence[Alert]) -> list[str]:
        if not alerts:
            return []
        try:
            async with self.client.pipeline(transaction=False) as pipe:
                for alert in alerts:
                    at = alert.at or datetime.now(UTC)
                    pipe.xadd(
                        self.alerts_key,
                        {
                            "kind": str(alert.kind),
                            "campaign_id": alert.campaign_id,
                            "coupon_code": alert.coupon_code,
                            "affiliate_id": alert.affiliate_id,
                            "ip": alert.ip,
                            "detail": alert.detail,
                            "at_ms": str(_ms(at)),
                        },
                        maxlen=self.config.alerts_maxlen,
                        approximate=True,
                    )
                # The stream is the only key without a natural expiry; an idle
                # deployment's alerts still go away after a month.
                pipe.expire(self.alerts_key, 30 * 86400)
                ids = await pipe.execute()
        except REDIS_DOWN as error:
            raise redis_unavailable(error) from error
        return [_text(i) for i in ids[:-1]]

    async def last_alert_id(self, client: RedisClient | None = None) -> str:
        try:
            entries = await (client or self.client).xrevrange(self.alerts_key, count=1)
        except REDIS_DOWN as error:
            raise redis_unavailable(error) from error
        return _text(entries[0][0]) if entries else "0-0"

    async def read_alerts(
        self, after_id: str, block_ms: int, client: RedisClient | None = None, count: int = 100
    ) -> list[Alert]:
        """Alerts after ``after_id``, waiting up to ``block_ms`` for the first one."""
        try:
            answer: Any = await (client or self.client).xread(
                {self.alerts_key: after_id}, count=count, block=block_ms
            )
        except REDIS_DOWN as error:
            raise redis_unavailable(error) from error
        alerts: list[Alert] = []
        for _stream, entries in answer or []:
            for entry_id, raw in entries:
                fields = {_text(k): _text(v) for k, v in raw.items()}
                at_ms = fields.get("at_ms", "0")
                alerts.append(
                    Alert(
                        id=_text(entry_id),
                        kind=int(fields.get("kind", "0") or 0),
                        campaign_id=fields.get("campaign_id", ""),
                        coupon_code=fields.get("coupon_code", ""),
                        affiliate_id=fields.get("affiliate_id", ""),
                        ip=fields.get("ip", ""),
                        detail=fields.get("detail", ""),
                        at=datetime.fromtimestamp(int(at_ms) / 1000 if at_ms.isdigit() else 0, UTC),
                    )
                )
        return alerts


class _Guesses:
    """The code-guessing counters of one batch: per address (/64 for IPv6) and per campaign's customer id.

    Attempts of a batch that share a subject share one operation (their
    misses added at once); each attempt is told the state of the worse of
    its two subjects after the whole batch.
    """

    def __init__(self, store: FraudStore, batch: Batch) -> None:
        self._store = store
        self._batch = batch
        self._subjects: dict[str, list[Any]] = {}  # subject -> [inc, handle, campaign, code, ip, customer]
        self._attempts: list[tuple[str, ...]] = []

    def add(self, campaign_id: str, code: str, ip: str, customer_id: str, inc: int) -> int:
        """Adds one attempt; its index for ``read``'s answer."""
        subjects: list[str] = []
        if ip:
            subjects.append(f"gip:{subscriber_key(ip)}")
        if customer_id:
            subjects.append(f"gcu:{campaign_id}:{customer_id}")
        for subject in subjects:
            entry = self._subjects.get(subject)
            if entry is None:
                self._subjects[subject] = [inc, None, campaign_id, code, ip, customer_id]
            else:
                entry[0] += inc
                if inc:
                    entry[2:] = [campaign_id, code, ip, customer_id]  # the alert names a missed code
        self._attempts.append(tuple(subjects))
        return len(self._attempts) - 1

    def read(self, answers: Answers, alerts: list[Alert]) -> list[GuessState]:
        """Each attempt's state (after ``FraudStore.run``); alerts for subjects that crossed the threshold."""
        cfg = self._store.config
        found: dict[str, MissesAnswer] = {}
        for subject, entry in self._subjects.items():
            answer = found[subject] = answers[entry[1]]
            if answer.crossed:
                _inc, _handle, campaign_id, code, ip, customer_id = entry
                who = f"address {ip}" if subject.startswith("gip:") else f"customer {customer_id}"
                alerts.append(
                    Alert(
                        kind=AlertKind.CODE_GUESSING,
                        campaign_id=campaign_id,
                        coupon_code=code,
                        ip=ip if subject.startswith("gip:") else "",
                        detail=f"{who} tried {answer.misses} unknown codes in {cfg.guess_window_seconds}s "
                        f"(threshold {cfg.guess_threshold}); last {code}",
                    )
                )
        states: list[GuessState] = []
        for subjects in self._attempts:
            misses, left_ms, over = 0, 0, set()
            for subject in subjects:
                answer = found[subject]
                misses = max(misses, answer.misses)
                if guessing(answer.misses, cfg.guess_threshold):
                    over.add(subject[:3])
                    left_ms = max(left_ms, answer.left_ms)
            states.append(
                GuessState(
                    blocked=bool(over),
                    retry_after_seconds=-(-left_ms // 1000),
                    misses=misses,
                    address_blocked="gip" in over,
                    customer_blocked="gcu" in over,
                )
            )
        return states

    def prepare(self) -> None:
        """Adds one operation per subject to the batch, with all of its misses: call before running it."""
        for subject, entry in self._subjects.items():
            entry[1] = self._store.guess_misses.add(self._batch, subject, entry[0])


def _text(value: Any) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    return "" if value is None else str(value)


def _positions(groups: dict[Any, list[int]]) -> dict[int, int]:
    """How many later members of its group each event has (they were counted with it)."""
    behind: dict[int, int] = {}
    for members in groups.values():
        last = len(members) - 1
        for position, index in enumerate(members):
            behind[index] = last - position
    return behind
