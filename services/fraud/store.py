"""Every Redis access of the fraud service.

Keys (``P`` is ``ASCRIBE_FRAUD_KEY_PREFIX``; the ``{...}`` part is the Redis
Cluster hash tag, so the keys one script touches share a slot):

    P:fraud:{xc:<affiliate>:<external click id>}        dedup, value = owning click id
    P:fraud:{ip:<ip>}:clicks                            click velocity windows of an IP
    P:fraud:{cip:<campaign>:<ip>}:conversions           conversions of an IP in a campaign
    P:fraud:{aff:<campaign>:<affiliate>}:rate|:alerted  affiliate click rate (AFFILIATE_BURST)
    P:fraud:{code:<campaign>:<code>}:ips|:devices|:leaked   UNIQUE code spread (HyperLogLog)
    P:fraud:{code:<campaign>:<code>}:rate|:alerted      EXCLUSIVE code rate (CODE_SPIKE)
    P:fraud:{rule:<signal>}:rate|:alerted               signal rate (RULE_SURGE)
    P:fraud:{alerts}                                    the alert stream (XADD MAXLEN ~)

Every key has a TTL. A batch of checks is one pipeline of EVALSHA calls
(one round trip; redis-py's cluster pipeline makes that one per shard), and
events of the batch that share a counter (the same IP, the same code) share
one call that counts them all at once.

Velocity windows are "sliding window counters": per window length, the
current and the previous fixed bucket, and the estimate
``previous * (1 - elapsed fraction) + current``: O(1) memory per subject
whatever the traffic, and within a few percent of an exact sliding window.
Windows run on the events' own timestamps, so a replay or a simulation of a
day's traffic counts as that day would have.
"""

from __future__ import annotations

import logging
import re
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from services.common.errors import Unavailable
from services.fraud.domain import (
    ClickCounters,
    ClickEvent,
    ConversionCounters,
    ConversionEvent,
    CouponKind,
)

logger = logging.getLogger(__name__)

_WINDOW_FN = """
local function hit(key, now, inc, w, n)
  local f = 'w' .. n
  local b = math.floor(now / w)
  local st = redis.call('HMGET', key, f .. 'b', f .. 'c', f .. 'p')
  local sb = tonumber(st[1])
  local c = tonumber(st[2]) or 0
  local p = tonumber(st[3]) or 0
  if sb == nil or b > sb + 1 then
    sb = b; p = 0; c = inc
  elseif b == sb + 1 then
    sb = b; p = c; c = inc
  elseif b == sb then
    c = c + inc
  elseif b == sb - 1 then
    p = p + inc
  end
  redis.call('HSET', key, f .. 'b', sb, f .. 'c', c, f .. 'p', p)
  local frac = (now - sb * w) / w
  if frac < 0 then frac = 0 elseif frac > 1 then frac = 1 end
  return p * (1 - frac) + c
end
"""

# KEYS[1] window state; ARGV now_ms, inc, ttl_ms, window_ms...
# Returns each window's estimate after counting, in thousandths.
WINDOW_LUA = (
    _WINDOW_FN
    + """
local now = tonumber(ARGV[1]); local inc = tonumber(ARGV[2])
local out = {}
for i = 4, #ARGV do
  out[#out + 1] = math.floor(hit(KEYS[1], now, inc, tonumber(ARGV[i]), i - 3) * 1000)
end
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return out
"""
)

# KEYS[1] rate state, KEYS[2] alert-once flag; ARGV now_ms, inc, ttl_ms,
# short_ms, long_ms, min_volume, factor, flag_ttl_ms.
# The baseline is the long window without the short one, per short window.
# Returns {short, baseline} in thousandths and 0 (calm), 1 (spiking) or 2
# (spiking, and this call is the first to notice: raise the alert).
SPIKE_LUA = (
    _WINDOW_FN
    + """
local now = tonumber(ARGV[1]); local inc = tonumber(ARGV[2])
local short_ms = tonumber(ARGV[4]); local long_ms = tonumber(ARGV[5])
local short = hit(KEYS[1], now, inc, short_ms, 1)
local long = hit(KEYS[1], now, inc, long_ms, 2)
redis.call('PEXPIRE', KEYS[1], ARGV[3])
local periods = long_ms / short_ms - 1
if periods < 1 then periods = 1 end
local baseline = (long - short) / periods
if baseline < 0 then baseline = 0 end
local state = 0
if short >= tonumber(ARGV[6]) and short >= tonumber(ARGV[7]) * math.max(baseline, 1) then
  state = 1
  if redis.call('SET', KEYS[2], '1', 'NX', 'PX', ARGV[8]) then state = 2 end
end
return {math.floor(short * 1000), math.floor(baseline * 1000), state}
"""
)

# KEYS[1] HLL of IPs, KEYS[2] HLL of devices, KEYS[3] alert-once flag;
# ARGV ip, device, ttl_ms, max_distinct, flag_ttl_ms -> {ips, devices, newly_leaked}
SPREAD_LUA = """
if ARGV[1] ~= '' then redis.call('PFADD', KEYS[1], ARGV[1]) end
if ARGV[2] ~= '' then redis.call('PFADD', KEYS[2], ARGV[2]) end
local ips = redis.call('PFCOUNT', KEYS[1])
local devices = redis.call('PFCOUNT', KEYS[2])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
redis.call('PEXPIRE', KEYS[2], ARGV[3])
local max = tonumber(ARGV[4])
local newly = 0
if ips > max or devices > max then
  if redis.call('SET', KEYS[3], '1', 'NX', 'PX', ARGV[5]) then newly = 1 end
end
return {ips, devices, newly}
"""

# KEYS[1] dedup key; ARGV owner, ttl_ms -> '' when this call set it, else the owner.
DEDUP_LUA = """
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then return '' end
return redis.call('GET', KEYS[1]) or ''
"""

_SCRIPTS = {"window": WINDOW_LUA, "spike": SPIKE_LUA, "spread": SPREAD_LUA, "dedup": DEDUP_LUA}

_STREAM_ID = re.compile(r"^\d+(?:-\d+)?$")


class AlertKind:
    """Same numbers as ``ascribe.fraud.v1.AlertKind``."""

    CODE_LEAK = 1
    CODE_SPIKE = 2
    AFFILIATE_BURST = 3
    RULE_SURGE = 4


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


def valid_stream_id(value: str) -> bool:
    return bool(_STREAM_ID.match(value))


def _ms(at: datetime) -> int:
    return int(at.timestamp() * 1000)


def _redis_unavailable(error: Exception) -> Unavailable:
    logger.warning("redis unavailable: %s", error)
    return Unavailable("fraud state store (Redis) is unavailable")


@dataclass
class _Call:
    script: str
    keys: tuple[str, ...]
    args: tuple[Any, ...]


class FraudStore:
    """Counters, dedup and alerts in Redis; methods raise ``Unavailable`` when it is down."""

    def __init__(self, client: aioredis.Redis, config: StoreConfig) -> None:
        self.client = client
        self.config = config
        self.prefix = f"{config.prefix}:fraud"
        self.alerts_key = f"{self.prefix}:{{alerts}}"
        self._shas: dict[str, str] = {}

    # -- keys ------------------------------------------------------------------

    def _key(self, tag: str, suffix: str = "") -> str:
        return f"{self.prefix}:{{{tag}}}{':' + suffix if suffix else ''}"

    # -- plumbing --------------------------------------------------------------

    async def load_scripts(self) -> None:
        try:
            for name, body in _SCRIPTS.items():
                self._shas[name] = str(await self.client.script_load(body))
        except (RedisConnectionError, RedisTimeoutError) as error:
            raise _redis_unavailable(error) from error

    async def _pipeline(self, calls: Sequence[_Call]) -> list[Any]:
        try:
            if not self._shas:
                await self.load_scripts()
            async with self.client.pipeline(transaction=False) as pipe:
                for call in calls:
                    pipe.evalsha(self._shas[call.script], len(call.keys), *call.keys, *call.args)
                results: list[Any] = await pipe.execute(raise_on_error=False)
        except (RedisConnectionError, RedisTimeoutError) as error:
            raise _redis_unavailable(error) from error
        return results

    async def _run(self, calls: Sequence[_Call]) -> list[Any]:
        """Runs every call in one pipelined round trip."""
        if not calls:
            return []
        results = await self._pipeline(calls)
        missing = [i for i, result in enumerate(results) if isinstance(result, NoScriptError)]
        if missing:
            # A restarted or flushed Redis forgot the scripts. Only the calls
            # that failed run again, so nothing is counted twice.
            await self.load_scripts()
            retried = await self._pipeline([calls[i] for i in missing])
            for i, result in zip(missing, retried, strict=True):
                results[i] = result
        for result in results:
            if isinstance(result, (RedisConnectionError, RedisTimeoutError)):
                raise _redis_unavailable(result)
            if isinstance(result, RedisError):
                logger.error("redis error in fraud check: %s", result)
                raise Unavailable("fraud state store (Redis) failed")
        return results

    async def ping(self) -> bool:
        try:
            return bool(await self.client.ping())
        except RedisError:
            return False

    # -- clicks ----------------------------------------------------------------

    async def count_clicks(self, events: Sequence[ClickEvent]) -> tuple[list[ClickCounters], list[Alert]]:
        cfg = self.config
        calls: list[_Call] = []
        dedup_at: dict[int, int] = {}
        for index, event in enumerate(events):
            if event.external_click_id and event.affiliate_id:
                dedup_at[index] = len(calls)
                # A click without our id cannot be recognised as a retry, so
                # it gets a random owner: any earlier use makes it a duplicate.
                owner = event.click_id or f"anonymous:{secrets.token_hex(8)}"
                calls.append(
                    _Call(
                        "dedup",
                        (self._key(f"xc:{event.affiliate_id}:{event.external_click_id}"),),
                        (owner, cfg.dedup_ttl_seconds * 1000),
                    )
                )
        # Events sharing an IP share one call that counts them all; the k-th
        # of them sees the count as it was after the k-th.
        by_ip: dict[str, list[int]] = {}
        for index, event in enumerate(events):
            if event.ip:
                by_ip.setdefault(event.ip, []).append(index)
        ip_at: dict[str, int] = {}
        for ip, members in by_ip.items():
            ip_at[ip] = len(calls)
            now = max(_ms(events[i].occurred_at) for i in members)
            calls.append(_Call("window", (self._key(f"ip:{ip}", "clicks"),), (now, len(members), 2 * 3600 * 1000, 60_000, 3_600_000)))
        by_affiliate: dict[tuple[str, str], list[int]] = {}
        for index, event in enumerate(events):
            if event.affiliate_id:
                by_affiliate.setdefault((event.campaign_id, event.affiliate_id), []).append(index)
        burst_at: dict[tuple[str, str], int] = {}
        for subject, members in by_affiliate.items():
            burst_at[subject] = len(calls)
            now = max(_ms(events[i].occurred_at) for i in members)
            tag = f"aff:{subject[0]}:{subject[1]}"
            calls.append(
                _Call(
                    "spike",
                    (self._key(tag, "rate"), self._key(tag, "alerted")),
                    self._spike_args(now, len(members), cfg.burst_window_seconds, cfg.burst_baseline_seconds,
                                     cfg.burst_min_volume, cfg.burst_factor),
                )
            )
        results = await self._run(calls)
        ip_behind = _positions(by_ip)

        counters: list[ClickCounters] = []
        for index, event in enumerate(events):
            duplicate_of: str | None = None
            if index in dedup_at:
                owner = _text(results[dedup_at[index]])
                if owner and owner != event.click_id:
                    duplicate_of = owner
            minute = hour = 0.0
            if event.ip:
                behind = ip_behind[index]
                estimates = results[ip_at[event.ip]]
                minute = max(0.0, estimates[0] / 1000 - behind)
                hour = max(0.0, estimates[1] / 1000 - behind)
            counters.append(ClickCounters(duplicate_of=duplicate_of, ip_last_minute=minute, ip_last_hour=hour))

        alerts: list[Alert] = []
        for (campaign_id, affiliate_id), at in burst_at.items():
            short, baseline, state = results[at]
            if state == 2:
                alerts.append(
                    Alert(
                        kind=AlertKind.AFFILIATE_BURST,
                        campaign_id=campaign_id,
                        affiliate_id=affiliate_id,
                        detail=f"affiliate {affiliate_id} sent {short / 1000:.0f} clicks in "
                        f"{cfg.burst_window_seconds}s against {baseline / 1000:.1f} usually",
                    )
                )
        return counters, alerts

    # -- conversions -----------------------------------------------------------

    async def count_conversions(
        self, events: Sequence[ConversionEvent]
    ) -> tuple[list[ConversionCounters], list[Alert]]:
        cfg = self.config
        calls: list[_Call] = []
        by_ip: dict[tuple[str, str], list[int]] = {}
        by_code: dict[tuple[str, str], list[int]] = {}
        spread_at: dict[int, int] = {}
        for index, event in enumerate(events):
            if event.ip:
                by_ip.setdefault((event.campaign_id, event.ip), []).append(index)
            if event.coupon_code and event.coupon_kind is CouponKind.EXCLUSIVE:
                by_code.setdefault((event.campaign_id, event.coupon_code), []).append(index)
            if event.coupon_code and event.coupon_kind is CouponKind.UNIQUE:
                spread_at[index] = len(calls)
                tag = f"code:{event.campaign_id}:{event.coupon_code}"
                calls.append(
                    _Call(
                        "spread",
                        (self._key(tag, "ips"), self._key(tag, "devices"), self._key(tag, "leaked")),
                        (event.ip, event.user_agent.strip(), cfg.code_spread_ttl_seconds * 1000,
                         cfg.code_max_distinct, cfg.code_spread_ttl_seconds * 1000),
                    )
                )
        ip_at: dict[tuple[str, str], int] = {}
        for subject, members in by_ip.items():
            ip_at[subject] = len(calls)
            now = max(_ms(events[i].received_at) for i in members)
            calls.append(
                _Call("window", (self._key(f"cip:{subject[0]}:{subject[1]}", "conversions"),),
                      (now, len(members), 2 * 86400 * 1000, 86_400_000))
            )
        code_at: dict[tuple[str, str], int] = {}
        for subject, members in by_code.items():
            code_at[subject] = len(calls)
            now = max(_ms(events[i].received_at) for i in members)
            tag = f"code:{subject[0]}:{subject[1]}"
            calls.append(
                _Call(
                    "spike",
                    (self._key(tag, "rate"), self._key(tag, "alerted")),
                    self._spike_args(now, len(members), cfg.spike_window_seconds, cfg.spike_baseline_seconds,
                                     cfg.spike_min_volume, cfg.spike_factor),
                )
            )
        results = await self._run(calls)
        ip_behind = _positions(by_ip)

        counters: list[ConversionCounters] = []
        alerts: list[Alert] = []
        for index, event in enumerate(events):
            per_ip = 0.0
            if event.ip:
                estimate = results[ip_at[(event.campaign_id, event.ip)]][0] / 1000
                per_ip = max(0.0, estimate - ip_behind[index])
            ips = devices = 0
            if index in spread_at:
                ips, devices, newly = (int(x) for x in results[spread_at[index]])
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
            subject = (event.campaign_id, event.coupon_code)
            if subject in code_at and event.coupon_kind is CouponKind.EXCLUSIVE:
                short, base, state = results[code_at[subject]]
                spiking, rate, baseline = state > 0, short / 1000, base / 1000
            counters.append(
                ConversionCounters(
                    ip_in_campaign_day=per_ip,
                    code_distinct_ips=ips,
                    code_distinct_devices=devices,
                    code_spiking=spiking,
                    code_rate=rate,
                    code_baseline=baseline,
                )
            )
        for (campaign_id, code), at in code_at.items():
            short, base, state = results[at]
            if state == 2:
                alerts.append(
                    Alert(
                        kind=AlertKind.CODE_SPIKE,
                        campaign_id=campaign_id,
                        coupon_code=code,
                        detail=f"exclusive code {code} used {short / 1000:.0f} times in "
                        f"{cfg.spike_window_seconds}s against {base / 1000:.1f} usually",
                    )
                )
        return counters, alerts

    # -- rule surges -----------------------------------------------------------

    async def count_signals(self, counts: dict[str, int], now: datetime) -> list[Alert]:
        """Adds a period's signal counts; alerts on a signal firing far above its usual rate."""
        cfg = self.config
        codes = sorted(counts)
        calls = [
            _Call(
                "spike",
                (self._key(f"rule:{code}", "rate"), self._key(f"rule:{code}", "alerted")),
                self._spike_args(_ms(now), counts[code], cfg.surge_window_seconds, cfg.surge_baseline_seconds,
                                 cfg.surge_min_volume, cfg.surge_factor),
            )
            for code in codes
        ]
        results = await self._run(calls)
        return [
            Alert(
                kind=AlertKind.RULE_SURGE,
                detail=f"signal {code} fired {short / 1000:.0f} times in {cfg.surge_window_seconds}s "
                f"against {base / 1000:.1f} usually",
            )
            for code, (short, base, state) in zip(codes, results, strict=True)
            if state == 2
        ]

    def _spike_args(
        self, now_ms: int, inc: int, window: int, baseline: int, min_volume: int, factor: float
    ) -> tuple[Any, ...]:
        flag_ttl_ms = window * 1000 * 6
        return (now_ms, inc, 2 * baseline * 1000, window * 1000, baseline * 1000, min_volume,
                factor, flag_ttl_ms)

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
        except (RedisConnectionError, RedisTimeoutError) as error:
            raise _redis_unavailable(error) from error
        return [_text(i) for i in ids[:-1]]

    async def last_alert_id(self, client: aioredis.Redis | None = None) -> str:
        try:
            entries = await (client or self.client).xrevrange(self.alerts_key, count=1)
        except (RedisConnectionError, RedisTimeoutError) as error:
            raise _redis_unavailable(error) from error
        return _text(entries[0][0]) if entries else "0-0"

    async def read_alerts(
        self, after_id: str, block_ms: int, client: aioredis.Redis | None = None, count: int = 100
    ) -> list[Alert]:
        """Alerts after ``after_id``, waiting up to ``block_ms`` for the first one."""
        try:
            answer: Any = await (client or self.client).xread(
                {self.alerts_key: after_id}, count=count, block=block_ms
            )
        except (RedisConnectionError, RedisTimeoutError) as error:
            raise _redis_unavailable(error) from error
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
