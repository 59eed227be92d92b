"""Every Redis access of the fraud service.

Keys (``P`` is ``ASCRIBE_FRAUD_KEY_PREFIX``, ``NN`` a bucket number):

    P:fraud:{bNN}:xc:<affiliate>:<external click id>   dedup, value = owning click id
    P:fraud:{bNN}:ip:<ip>                              click velocity windows of an IP
    P:fraud:{bNN}:cip:<campaign>:<ip>                  conversions of an IP in a campaign
      (<ip>: an IPv4 address, or an IPv6 address's /64, see ipintel.subscriber_key)
    P:fraud:{bNN}:cip:<campaign>:<ip>:o:<order>        the order's count there (each order counts once)
    P:fraud:{bNN}:aff:<campaign>:<affiliate>:rate|:alerted      affiliate click rate (AFFILIATE_BURST)
    P:fraud:{bNN}:code:<campaign>:<code>:ips|:devices|:leaked  UNIQUE code spread (HyperLogLog)
    P:fraud:{bNN}:code:<campaign>:<code>:rate|:alerted|:o:<order>  EXCLUSIVE code rate (CODE_SPIKE)
    P:fraud:{bNN}:rule:<signal>:rate|:alerted          signal rate (RULE_SURGE)
    P:fraud:{alerts}                                   the alert stream (XADD MAXLEN ~)

Every key has a TTL. Per-command cost, not Redis, limits a Python client
(redis-py spends ~200 µs of CPU per pipelined command here), so a batch of
checks is not one command per counter: each subject hashes to one of
``key_buckets`` buckets, the ``{bNN}`` hash tag puts a bucket on one Redis
Cluster slot, and a batch runs one script call per bucket it touches, all in
one pipeline (one round trip; redis-py's cluster pipeline makes that one per
shard). The operations travel as one tab-separated text argument and the
answers come back as one string, so encoding and parsing cost a few
microseconds per event. A script declares its bucket's tag key and only
touches keys of that tag, which is what Redis Cluster routes on.

On a standalone Redis (``cluster_enabled:0``, read once when the script is
loaded) the slots do not matter, so the whole batch is one script call: each
line then carries its own bucket prefix and the key names are the same as on
a cluster. Each script call has a fixed cost in Redis: at 1,000 clicks/s
(batches of about a dozen) this took Redis's CPU per click from about 60 to
52 µs.

Events of a batch that share a counter (the same IP, the same code) share
one operation that counts them all at once; the k-th of them is told the
count as it was after the k-th.

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
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, NamedTuple, TypeVar

import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, RedisClusterException, RedisError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from services.common.errors import Unavailable
from services.fraud.domain import (
    ClickCounters,
    ClickEvent,
    ConversionCounters,
    ConversionEvent,
    CouponKind,
)
from services.fraud.ipintel import subscriber_key
from services.fraud.resp import RespClient, RespConnectionError, RespError, RespTimeoutError

logger = logging.getLogger(__name__)

K = TypeVar("K")
RedisClient = aioredis.Redis | aioredis.RedisCluster
# Redis failing us, as opposed to a bug of ours: answered UNAVAILABLE. A
# cluster adds its own (no reachable node, CLUSTERDOWN and READONLY during a
# failover); RedisClusterException is not a RedisError.
_REDIS_DOWN = (RedisError, RedisClusterException, RespConnectionError, RespTimeoutError)

# KEYS[1] the bucket's tag key (routing only); ARGV[1] the bucket's key
# prefix; ARGV[2] operations, one a line, fields tab-separated:
#   D subject owner ttl_ms                      dedup -> '' if ours now, else the owner
#   W subject now_ms inc ttl_ms window_ms...    windows -> each estimate x1000
#   S subject now_ms inc ttl_ms short_ms long_ms min_volume factor flag_ttl_ms [ids]
#                                               spike -> short x1000, baseline x1000, state
#   O subject now_ms ttl_ms window_ms ids       once-per-order window -> each order's count x1000
# ``ids`` are order ids joined by \x1f ('' for an order without one): each
# order counts once; one seen before answers its count as it was then.
#   H subject ip device ttl_ms max flag_ttl_ms  spread -> ips, devices, newly leaked
# Answers: one line per operation, fields tab-separated.
# Spike state: 0 calm, 1 spiking, 2 spiking and this call is the first to
# notice (raise the alert; the flag keeps it to one alert per episode).
BATCH_LUA = r"""
local prefix = ARGV[1]

local function split(text, sep)
  local out, from = {}, 1
  while true do
    local at = string.find(text, sep, from, true)
    if not at then out[#out + 1] = string.sub(text, from); return out end
    out[#out + 1] = string.sub(text, from, at - 1)
    from = at + 1
  end
end

-- Counts inc events at now (ms) into each window of the state hash at key
-- (one HMGET and one HSET whatever the number of windows) and returns the
-- estimates: previous bucket * (1 - elapsed fraction) + current bucket.
local function hit(key, now, inc, windows)
  local fields = {}
  for n = 1, #windows do
    fields[#fields + 1] = n .. 'b'; fields[#fields + 1] = n .. 'c'; fields[#fields + 1] = n .. 'p'
  end
  local st = redis.call('HMGET', key, unpack(fields))
  local out, set = {}, {}
  for n, w in ipairs(windows) do
    local b = math.floor(now / w)
    local sb = tonumber(st[3 * n - 2])
    local c = tonumber(st[3 * n - 1]) or 0
    local p = tonumber(st[3 * n]) or 0
    if sb == nil or b > sb + 1 then
      sb = b; p = 0; c = inc
    elseif b == sb + 1 then
      sb = b; p = c; c = inc
    elseif b == sb then
      c = c + inc
    elseif b == sb - 1 then
      p = p + inc
    end
    set[#set + 1] = fields[3 * n - 2]; set[#set + 1] = sb
    set[#set + 1] = fields[3 * n - 1]; set[#set + 1] = c
    set[#set + 1] = fields[3 * n]; set[#set + 1] = p
    local frac = (now - sb * w) / w
    if frac < 0 then frac = 0 elseif frac > 1 then frac = 1 end
    out[n] = p * (1 - frac) + c
  end
  redis.call('HSET', key, unpack(set))
  return out
end

local function milli(x) return string.format('%d', math.floor(x * 1000)) end

-- Which orders of ids_text this key has counted before (their stored
-- answers), and how many are new. Guards live beside the key, in its slot.
local function seen_orders(key, ids_text)
  local ids, seen, fresh = split(ids_text, '\31'), {}, 0
  for i, id in ipairs(ids) do
    local prev = false
    if id ~= '' then prev = redis.call('GET', key .. ':o:' .. id) end
    if prev then seen[i] = prev else fresh = fresh + 1 end
  end
  return ids, seen, fresh
end

local answers = {}
for _, line in ipairs(split(ARGV[2], '\n')) do
  local f = split(line, '\t')
  local op, key = f[1], prefix .. f[2]
  if op == 'D' then
    if redis.call('SET', key, f[3], 'NX', 'PX', f[4]) then
      answers[#answers + 1] = ''
    else
      answers[#answers + 1] = redis.call('GET', key) or ''
    end
  elseif op == 'W' then
    local windows = {}
    for i = 6, #f do windows[#windows + 1] = tonumber(f[i]) end
    local estimates = hit(key, tonumber(f[3]), tonumber(f[4]), windows)
    redis.call('PEXPIRE', key, f[5])
    for i, e in ipairs(estimates) do estimates[i] = milli(e) end
    answers[#answers + 1] = table.concat(estimates, '\t')
  elseif op == 'S' then
    local now, inc = tonumber(f[3]), tonumber(f[4])
    local short_ms, long_ms = tonumber(f[6]), tonumber(f[7])
    local rate = key .. ':rate'
    if f[11] then
      local ids, seen, fresh = seen_orders(key, f[11])
      inc = fresh
      for i, id in ipairs(ids) do
        if id ~= '' and not seen[i] then redis.call('SET', key .. ':o:' .. id, '1', 'PX', f[5]) end
      end
    end
    local had_history = redis.call('HEXISTS', rate, '1b') == 1
    local estimates = hit(rate, now, inc, {short_ms, long_ms})
    local short, long = estimates[1], estimates[2]
    redis.call('PEXPIRE', rate, f[5])
    -- The usual rate is what the long window held before the current short
    -- one, per short window of history actually seen: a subject first seen
    -- two hours ago has two hours of history, not a quiet rest of the day.
    -- With no full window behind it, it has no usual rate yet (baseline 0).
    local first = tonumber(redis.call('HGET', rate, 'first'))
    if first == nil and had_history then
      -- Counted before first-seen times were kept: assume a full history
      -- rather than a cold start that would make every busy subject spike.
      first = now - long_ms
      redis.call('HSET', rate, 'first', first)
    elseif first == nil or now < first then
      redis.call('HSET', rate, 'first', now); first = now
    end
    local periods = long_ms / short_ms - 1
    local history = (now - first) / short_ms - 1
    local baseline = 0
    if history > 0 then
      if history < periods then periods = history end
      if periods < 1 then periods = 1 end
      baseline = (long - short) / periods
      if baseline < 0 then baseline = 0 end
    end
    local state = 0
    if short >= tonumber(f[8]) and short >= tonumber(f[9]) * math.max(baseline, 1) then
      state = 1
      if redis.call('SET', key .. ':alerted', '1', 'NX', 'PX', f[10]) then state = 2 end
    end
    answers[#answers + 1] = milli(short) .. '\t' .. milli(baseline) .. '\t' .. state
  elseif op == 'O' then
    local now, window = tonumber(f[3]), tonumber(f[5])
    local ids, seen, fresh = seen_orders(key, f[6])
    local estimate = hit(key, now, fresh, {window})[1]
    redis.call('PEXPIRE', key, f[4])
    local out, j = {}, 0
    for i, id in ipairs(ids) do
      if seen[i] then
        out[i] = seen[i]
      else
        j = j + 1
        out[i] = milli(estimate - (fresh - j))
        if id ~= '' then redis.call('SET', key .. ':o:' .. id, out[i], 'PX', f[4]) end
      end
    end
    answers[#answers + 1] = table.concat(out, '\t')
  elseif op == 'H' then
    local ips_key, devices_key = key .. ':ips', key .. ':devices'
    if f[3] ~= '' then redis.call('PFADD', ips_key, f[3]) end
    if f[4] ~= '' then redis.call('PFADD', devices_key, f[4]) end
    local ips = redis.call('PFCOUNT', ips_key)
    local devices = redis.call('PFCOUNT', devices_key)
    redis.call('PEXPIRE', ips_key, f[5])
    redis.call('PEXPIRE', devices_key, f[5])
    local newly = 0
    if ips > tonumber(f[6]) or devices > tonumber(f[6]) then
      if redis.call('SET', key .. ':leaked', '1', 'NX', 'PX', f[7]) then newly = 1 end
    end
    answers[#answers + 1] = ips .. '\t' .. devices .. '\t' .. newly
  else
    return redis.error_reply('unknown fraud operation ' .. tostring(op))
  end
end
return table.concat(answers, '\n')
"""

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
    key_buckets: int = 16
    # Off only in tests, to run the per-bucket (cluster) path on a standalone server.
    single_call_when_standalone: bool = True


def valid_stream_id(value: str) -> bool:
    return bool(_STREAM_ID.match(value))


def _ms(at: datetime) -> int:
    return int(at.timestamp() * 1000)


def _redis_unavailable(error: Exception) -> Unavailable:
    logger.warning("redis unavailable: %s", error)
    return Unavailable("fraud state store (Redis) is unavailable")


class _Batch:
    """Operations grouped by bucket, answered by one script call per bucket in one pipeline."""

    def __init__(self, buckets: int) -> None:
        self.buckets = buckets
        self.lines: dict[int, list[str]] = {}
        self.handles: list[tuple[int, int]] = []

    def add(self, op: str, subject: str, *fields: object) -> int:
        return self.add_line(subject, "\t".join((op, subject, *map(str, fields))))

    def add_line(self, subject: str, line: str) -> int:
        """``line`` is the operation already formatted (the hot paths build it in one f-string)."""
        bucket = zlib.crc32(subject.encode()) % self.buckets
        lines = self.lines.get(bucket)
        if lines is None:
            lines = self.lines[bucket] = []
        self.handles.append((bucket, len(lines)))
        lines.append(line)
        return len(self.handles) - 1


class FraudStore:
    """Counters, dedup and alerts in Redis; methods raise ``Unavailable`` when it is down."""

    def __init__(self, client: RedisClient, config: StoreConfig, fast: RespClient | None = None) -> None:
        self.client = client
        # The check pipeline (the hot path) goes through the minimal RESP
        # client when it speaks the connection's protocol; redis-py does the
        # rest, and all of it on a cluster (its pipeline sends each shard its
        # script calls, the shards in parallel: one round trip per shard).
        if fast is None and isinstance(client, aioredis.Redis):
            fast = RespClient.like(client)
        self.fast = fast
        self.config = config
        self.prefix = f"{config.prefix}:fraud"
        self.alerts_key = f"{self.prefix}:{{alerts}}"
        self._sha: str | None = None
        # True once the server says it is not a cluster: one script call per batch.
        self._single_call = False
        self._tags = [self.bucket_tag(bucket).encode() for bucket in range(config.key_buckets)]
        self._tag_prefixes = [tag + b":" for tag in self._tags]
        # One-call batches: the script gets the store's own prefix and each
        # line its bucket's tag, so no line can name a key outside the store.
        self._store_prefix = f"{self.prefix}:".encode()
        self._bucket_parts = [f"{{b{bucket:02d}}}:" for bucket in range(config.key_buckets)]

    def bucket_tag(self, bucket: int) -> str:
        return f"{self.prefix}:{{b{bucket:02d}}}"

    async def aclose(self) -> None:
        if self.fast is not None:
            await self.fast.aclose()

    # -- plumbing --------------------------------------------------------------

    async def load_scripts(self) -> None:
        try:
            if self.fast is not None:
                sha, info = await self.fast.execute([("SCRIPT", "LOAD", BATCH_LUA), ("INFO", "cluster")])
                if isinstance(sha, RespError):
                    logger.error("redis refused the fraud script: %s", sha.message)
                    raise Unavailable("fraud state store (Redis) failed")
                self._sha = _text(sha)
                # Only a server that says it is standalone gets one call per batch:
                # an error (INFO refused by an ACL) keeps the per-bucket calls,
                # which are right everywhere.
                standalone = isinstance(info, bytes) and b"cluster_enabled:0" in info
            else:
                self._sha = str(await self.client.script_load(BATCH_LUA))
                try:
                    standalone = (await self.client.info("cluster")).get("cluster_enabled") == 0
                except ResponseError:
                    standalone = False
            self._single_call = self.config.single_call_when_standalone and standalone
        except _REDIS_DOWN as error:
            raise _redis_unavailable(error) from error

    def _script_calls(self, batch: _Batch) -> tuple[list[tuple[bytes, bytes, str]], dict[int, int]]:
        """The batch's script calls (tag key, key prefix, operations), and where each
        bucket's first answer line falls in the calls' answers joined in order.

        Per bucket, one call with the bucket's prefix. On a standalone server
        one call for the whole batch: an operation line is ``<op>\t<subject>...``
        with a one-letter op, so each line gets its bucket's tag at offset 2
        and the script, given the store's prefix, forms exactly the same keys.
        """
        items = list(batch.lines.items())
        first_line: dict[int, int] = {}
        count = 0
        for bucket, lines in items:
            first_line[bucket] = count
            count += len(lines)
        if self._single_call and len(items) > 1:
            parts = self._bucket_parts
            text = "\n".join(line[:2] + parts[bucket] + line[2:] for bucket, lines in items for line in lines)
            return [(self._tags[items[0][0]], self._store_prefix, text)], first_line
        tags, tag_prefixes = self._tags, self._tag_prefixes
        return [(tags[bucket], tag_prefixes[bucket], "\n".join(lines)) for bucket, lines in items], first_line

    async def _pipeline(self, calls: Sequence[tuple[bytes, bytes, str]]) -> list[Any]:
        """One round trip for the script calls; answers (or error values) in call order."""
        sha = self._sha
        assert sha is not None
        try:
            if self.fast is not None:
                return await self.fast.execute(
                    [("EVALSHA", sha, b"1", tag, prefix, text) for tag, prefix, text in calls]
                )
            async with self.client.pipeline(transaction=False) as pipe:
                for tag, prefix, text in calls:
                    # execute_command, not evalsha(): redis-py's cluster
                    # pipeline refuses the method but routes the command by
                    # its key (the bucket's tag), which is what a script needs.
                    pipe.execute_command("EVALSHA", sha, 1, tag, prefix, text)
                results: list[Any] = await pipe.execute(raise_on_error=False)
        except _REDIS_DOWN as error:
            raise _redis_unavailable(error) from error
        return results

    async def _run(self, batch: _Batch) -> list[list[str]]:
        """Runs a batch in one round trip; answers by handle, each a list of fields."""
        if not batch.lines:
            return []
        if self._sha is None:
            await self.load_scripts()
        calls, first_line = self._script_calls(batch)
        results = await self._pipeline(calls)
        missing = [i for i, result in enumerate(results) if _is_noscript(result)]
        if missing:
            # A restarted or flushed Redis forgot the script. Only the calls
            # that failed run again, so nothing is counted twice.
            await self.load_scripts()
            retried = await self._pipeline([calls[i] for i in missing])
            for i, result in zip(missing, retried, strict=True):
                results[i] = result
        answers: list[str] = []
        for result in results:
            if isinstance(result, (RedisConnectionError, RedisTimeoutError)):
                raise _redis_unavailable(result)
            if isinstance(result, Exception):
                logger.error("redis error in fraud check: %s", result)
                raise Unavailable("fraud state store (Redis) failed")
            answers.extend(_text(result).split("\n"))
        return [answers[first_line[bucket] + line].split("\t") for bucket, line in batch.handles]

    async def ping(self) -> bool:
        try:
            return bool(await self.client.ping())
        except RedisError:
            return False

    def _spike(
        self, batch: _Batch, subject: str, now_ms: int, inc: int, window: int, baseline: int,
        min_volume: int, factor: float, order_ids: str | None = None,
    ) -> int:
        # One alert per episode: the flag outlives a few windows of the spike.
        fields: list[object] = [now_ms, inc, 2 * baseline * 1000, window * 1000, baseline * 1000,
                                min_volume, factor, window * 1000 * 6]
        if order_ids is not None:
            fields.append(order_ids)
        return batch.add("S", subject, *fields)

    # -- clicks ----------------------------------------------------------------

    async def count_clicks(self, events: Sequence[ClickEvent]) -> tuple[list[ClickCounters], list[Alert]]:
        cfg = self.config
        batch = _Batch(cfg.key_buckets)
        dedup_at: dict[int, int] = {}
        by_ip: dict[str, list[int]] = {}
        by_affiliate: dict[tuple[str, str], list[int]] = {}
        ip_keys = [subscriber_key(event.ip) if event.ip else "" for event in events]
        for index, event in enumerate(events):
            if event.external_click_id and event.affiliate_id:
                # A click without our id cannot be recognised as a retry, so
                # it gets a random owner: any earlier use makes it a duplicate.
                owner = event.click_id or f"anonymous:{secrets.token_hex(8)}"
                dedup_at[index] = batch.add(
                    "D", f"xc:{event.affiliate_id}:{event.external_click_id}", owner, cfg.dedup_ttl_seconds * 1000
                )
            if event.ip:
                by_ip.setdefault(ip_keys[index], []).append(index)
            if event.affiliate_id:
                by_affiliate.setdefault((event.campaign_id, event.affiliate_id), []).append(index)
        ip_at: dict[str, int] = {}
        # W ip:<ip> now inc ttl_ms 1-minute and 1-hour windows
        window_fields = f"\t{2 * 3600 * 1000}\t{60_000}\t{3_600_000}"
        for ip, members in by_ip.items():
            if len(members) == 1:
                now = _ms(events[members[0]].occurred_at)
            else:
                now = max(_ms(events[i].occurred_at) for i in members)
            subject = f"ip:{ip}"
            ip_at[ip] = batch.add_line(subject, f"W\t{subject}\t{now}\t{len(members)}{window_fields}")
        burst_at: dict[tuple[str, str], int] = {}
        for (campaign_id, affiliate_id), members in by_affiliate.items():
            now = max(_ms(events[i].occurred_at) for i in members)
            burst_at[(campaign_id, affiliate_id)] = self._spike(
                batch, f"aff:{campaign_id}:{affiliate_id}", now, len(members), cfg.burst_window_seconds,
                cfg.burst_baseline_seconds, cfg.burst_min_volume, cfg.burst_factor,
            )
        answers = await self._run(batch)
        ip_behind = _positions(by_ip)

        counters: list[ClickCounters] = []
        for index, event in enumerate(events):
            duplicate_of: str | None = None
            if index in dedup_at:
                owner = answers[dedup_at[index]][0]
                if owner and owner != event.click_id:
                    duplicate_of = owner
            minute = hour = 0.0
            if event.ip:
                behind = ip_behind[index]
                estimates = answers[ip_at[ip_keys[index]]]
                minute = max(0.0, int(estimates[0]) / 1000 - behind)
                hour = max(0.0, int(estimates[1]) / 1000 - behind)
            counters.append(ClickCounters(duplicate_of=duplicate_of, ip_last_minute=minute, ip_last_hour=hour))

        alerts: list[Alert] = []
        for (campaign_id, affiliate_id), spike in _spikes(answers, burst_at).items():
            if spike.state == 2:
                alerts.append(
                    Alert(
                        kind=AlertKind.AFFILIATE_BURST,
                        campaign_id=campaign_id,
                        affiliate_id=affiliate_id,
                        detail=f"affiliate {affiliate_id} sent {spike.short:.0f} clicks in "
                        f"{cfg.burst_window_seconds}s against {spike.baseline:.1f} usually",
                    )
                )
        return counters, alerts

    # -- conversions -----------------------------------------------------------

    async def count_conversions(
        self, events: Sequence[ConversionEvent]
    ) -> tuple[list[ConversionCounters], list[Alert]]:
        cfg = self.config
        batch = _Batch(cfg.key_buckets)
        by_ip: dict[tuple[str, str], list[int]] = {}
        by_code: dict[tuple[str, str], list[int]] = {}
        spread_at: dict[int, int] = {}
        ip_keys = [subscriber_key(event.ip) if event.ip else "" for event in events]
        for index, event in enumerate(events):
            if event.ip:
                by_ip.setdefault((event.campaign_id, ip_keys[index]), []).append(index)
            if event.coupon_code and event.coupon_kind is CouponKind.EXCLUSIVE:
                by_code.setdefault((event.campaign_id, event.coupon_code), []).append(index)
            if event.coupon_code and event.coupon_kind is CouponKind.UNIQUE:
                ttl = cfg.code_spread_ttl_seconds * 1000
                spread_at[index] = batch.add(
                    "H", f"code:{event.campaign_id}:{event.coupon_code}", ip_keys[index], event.user_agent.strip(),
                    ttl, cfg.code_max_distinct, ttl,
                )
        # Counters of conversions count each order once (guards keyed by the
        # order id): a retried check or a re-score after an outage answers
        # the order's own count as it was, and adds nothing.
        ip_at: dict[tuple[str, str], int] = {}
        for (campaign_id, ip), members in by_ip.items():
            now = max(_ms(events[i].received_at) for i in members)
            ip_at[(campaign_id, ip)] = batch.add(
                "O", f"cip:{campaign_id}:{ip}", now, 2 * 86400 * 1000, 86_400_000, _order_ids(events, members)
            )
        code_at: dict[tuple[str, str], int] = {}
        for (campaign_id, code), members in by_code.items():
            now = max(_ms(events[i].received_at) for i in members)
            code_at[(campaign_id, code)] = self._spike(
                batch, f"code:{campaign_id}:{code}", now, len(members), cfg.spike_window_seconds,
                cfg.spike_baseline_seconds, cfg.spike_min_volume, cfg.spike_factor, _order_ids(events, members),
            )
        answers = await self._run(batch)
        ip_slot = {index: slot for members in by_ip.values() for slot, index in enumerate(members)}
        spikes = _spikes(answers, code_at)

        counters: list[ConversionCounters] = []
        alerts: list[Alert] = []
        for index, event in enumerate(events):
            per_ip = 0.0
            if event.ip:
                per_ip = int(answers[ip_at[(event.campaign_id, ip_keys[index])]][ip_slot[index]]) / 1000
            ips = devices = 0
            if index in spread_at:
                ips, devices, newly = (int(x) for x in answers[spread_at[index]])
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
                )
            )
        for (campaign_id, code), spike in spikes.items():
            if spike.state == 2:
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

    # -- rule surges -----------------------------------------------------------

    async def count_signals(self, counts: dict[str, int], now: datetime) -> list[Alert]:
        """Adds a period's signal counts; alerts on a signal firing far above its usual rate."""
        cfg = self.config
        batch = _Batch(cfg.key_buckets)
        handles = {
            code: self._spike(batch, f"rule:{code}", _ms(now), count, cfg.surge_window_seconds,
                              cfg.surge_baseline_seconds, cfg.surge_min_volume, cfg.surge_factor)
            for code, count in sorted(counts.items())
        }
        answers = await self._run(batch)
        alerts = []
        for code, spike in _spikes(answers, handles).items():
            if spike.state == 2:
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
        except _REDIS_DOWN as error:
            raise _redis_unavailable(error) from error
        return [_text(i) for i in ids[:-1]]

    async def last_alert_id(self, client: RedisClient | None = None) -> str:
        try:
            entries = await (client or self.client).xrevrange(self.alerts_key, count=1)
        except _REDIS_DOWN as error:
            raise _redis_unavailable(error) from error
        return _text(entries[0][0]) if entries else "0-0"

    async def read_alerts(
        self, after_id: str, block_ms: int, client: RedisClient | None = None, count: int = 100
    ) -> list[Alert]:
        """Alerts after ``after_id``, waiting up to ``block_ms`` for the first one."""
        try:
            answer: Any = await (client or self.client).xread(
                {self.alerts_key: after_id}, count=count, block=block_ms
            )
        except _REDIS_DOWN as error:
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


def _is_noscript(result: Any) -> bool:
    return isinstance(result, NoScriptError) or (isinstance(result, RespError) and result.code == "NOSCRIPT")


def _text(value: Any) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    return "" if value is None else str(value)


class _Spike(NamedTuple):
    """A spike operation's answer: the short window's count, the usual one, and the state."""

    short: float
    baseline: float
    state: int  # 0 calm, 1 spiking, 2 spiking and this call is the first to notice


def _spikes(answers: Sequence[list[str]], handles: dict[K, int]) -> dict[K, _Spike]:
    spikes = {}
    for key, handle in handles.items():
        short, baseline, state = answers[handle]
        spikes[key] = _Spike(int(short) / 1000, int(baseline) / 1000, int(state))
    return spikes


def _order_ids(events: Sequence[ConversionEvent], members: Sequence[int]) -> str:
    """The members' order ids for a once-per-order operation (ids never hold control characters)."""
    return "\x1f".join(events[i].order_id for i in members)


def _positions(groups: dict[Any, list[int]]) -> dict[int, int]:
    """How many later members of its group each event has (they were counted with it)."""
    behind: dict[int, int] = {}
    for members in groups.values():
        last = len(members) - 1
        for position, index in enumerate(members):
            behind[index] = last - position
    return behind
