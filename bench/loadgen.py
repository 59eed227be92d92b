"""The load generator, run as its own process so its CPU is not counted as the server's.

    python -m bench.loadgen '<json spec>'

Protocol with the harness (stdout lines, stdin lines): it warms up, prints
``READY``, waits for a line on stdin, runs the measured phase, and writes the
result as JSON to the spec's ``result_path``. Two modes:

- closed: ``concurrency`` workers, each sending its next request when the
  last one answers (peak throughput);
- open: requests start at a fixed ``rate`` whatever the answers, and latency
  runs from each request's *intended* start, so a server that falls behind
  shows it in the latency instead of slowing the client down (no coordinated
  omission).

Every loop is bounded by count and by time. Targets are always 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import json
import random
import resource
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlencode, urlsplit

import uvloop

USER_AGENTS = (
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) "
    "Chrome/126.0.0.0 Safari/537.36",
    "Mozilla/5.0 (iPhone; CPU iPhone OS 17_5 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) "
    "Version/17.5 Mobile/15E148 Safari/604.1",
    "Mozilla/5.0 (Macintosh; Intel Mac OS X 14_5) AppleWebKit/605.1.15 (KHTML, like Gecko) "
    "Version/17.5 Safari/605.1.15",
    "Mozilla/5.0 (Linux; Android 14; Pixel 8) AppleWebKit/537.36 (KHTML, like Gecko) "
    "Chrome/126.0.0.0 Mobile Safari/537.36",
    "Mozilla/5.0 (X11; Linux x86_64; rv:127.0) Gecko/20100101 Firefox/127.0",
)
MAX_IN_FLIGHT = 4096
# Past this, stragglers count as dropped: an overloaded server must not stretch the run.
HARD_EXTRA_SECONDS = 5.0


def client_ips(count: int, seed: int) -> list[str]:
    """Many plausible public addresses, so per-IP fraud rules see honest spread."""
    rng = random.Random(seed)
    ips: set[str] = set()
    while len(ips) < count:
        first = rng.choice((24, 31, 37, 46, 62, 77, 81, 85, 89, 92, 95, 109, 151, 176, 178, 188, 213, 217))
        ips.add(f"{first}.{rng.randrange(256)}.{rng.randrange(256)}.{rng.randrange(1, 255)}")
    return sorted(ips)


class Target(Protocol):
    events_per_call: int

    async def call(self, i: int) -> str: ...

    async def close(self) -> None: ...


@dataclass
class HttpTarget:
    """GET /click (gateway or the reference handler), POST /postback or GET /validate."""

    spec: dict[str, Any]
    events_per_call: int = 1
    session: Any = None
    ips: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        import aiohttp

        base = str(self.spec["target"])
        assert urlsplit(base).hostname == "127.0.0.1", "load goes to 127.0.0.1 only"
        self.base = base
        self.kind = str(self.spec["kind"])
        self.params = dict(self.spec.get("params", {}))
        self.codes = list(self.params.get("codes", []))
        self.prefix = f"{self.spec['run_id']}-{self.spec['worker']}"
        # Seeded by the run, so one case's visitors are not the next case's repeat customers.
        self.ips = client_ips(int(self.params.get("ip_count", 20000)), hash(self.prefix))
        connector = aiohttp.TCPConnector(limit=0, ttl_dns_cache=None, force_close=False)
        self.session = aiohttp.ClientSession(
            connector=connector, timeout=aiohttp.ClientTimeout(total=10), auto_decompress=False
        )

    async def call(self, i: int) -> str:
        ip = self.ips[i % len(self.ips)]
        ua = USER_AGENTS[i % len(USER_AGENTS)]
        if self.kind == "click":
            query = urlencode({
                "campaign_id": self.params.get("campaign_id", "bench"),
                "aff_id": self.params.get("affiliate_id", "bench"),
                "aff_click_id": f"{self.prefix}-{i}",
                "sub1": "bench",
            })
            async with self.session.get(
                f"{self.base}/click?{query}", allow_redirects=False,
                headers={"X-Forwarded-For": ip, "User-Agent": ua},
            ) as reply:
                await reply.read()
                return str(reply.status)
        if self.kind == "validate":
            # A checkout asking about a real code for one of many customers
            # (each with its own address, as a shop's server sends them).
            query = urlencode({
                "campaign_id": self.params["campaign_id"],
                "coupon": self.codes[i % len(self.codes)],
                "amount": "49.90",
                "currency": self.params.get("currency", "EUR"),
                "customer_id": f"cust-{self.prefix}-{i % 5000}",
                "ip": ip,
                "ua": ua,
            })
            async with self.session.get(
                f"{self.base}/validate?{query}", headers={"X-Ascribe-Token": self.params["token"]}
            ) as reply:
                body = await reply.read()
                if reply.status == 200:
                    try:
                        return "200:valid" if json.loads(body).get("valid") else "200:invalid"
                    except ValueError:
                        return "200:unparsable"
                return str(reply.status)
        query = urlencode({
            "campaign_id": self.params["campaign_id"],
            "order_id": f"{self.prefix}-{i}",
            "amount": "49.90",
            "currency": self.params.get("currency", "EUR"),
            "coupon": self.codes[i % len(self.codes)],
            "customer_id": f"cust-{self.prefix}-{i}",
            "ip": ip,
            "ua": ua,
        })
        async with self.session.post(
            f"{self.base}/postback?{query}", headers={"X-Ascribe-Token": self.params["token"]}
        ) as reply:
            body = await reply.read()
            if reply.status == 200:
                try:
                    return f"200:{json.loads(body).get('status', '?')}"
                except ValueError:
                    return "200:unparsable"
            return str(reply.status)

    async def close(self) -> None:
        await self.session.close()


@dataclass
class FraudTarget:
    """CheckClick (one per call) or CheckClickBatch (``batch_size`` per call) on the fraud service."""

    spec: dict[str, Any]
    events_per_call: int = 1

    def __post_init__(self) -> None:
        import grpc
        from ascribe.fraud.v1 import fraud_pb2, fraud_pb2_grpc

        addr = str(self.spec["target"])
        assert addr.startswith("127.0.0.1:"), "load goes to 127.0.0.1 only"
        self.pb = fraud_pb2
        self.grpc = grpc
        self.channel = grpc.aio.insecure_channel(addr)
        self.stub = fraud_pb2_grpc.FraudServiceStub(self.channel)
        self.batch = self.spec["kind"] == "check_click_batch"
        self.events_per_call = int(self.spec.get("params", {}).get("batch_size", 100)) if self.batch else 1
        self.prefix = f"{self.spec['run_id']}-{self.spec['worker']}"
        self.ips = client_ips(20000, hash(self.prefix))

    def _request(self, n: int) -> Any:
        request = self.pb.CheckClickRequest(
            click_id=f"{self.prefix}-{n}", campaign_id="bench", affiliate_id="bench-aff",
            ip=self.ips[n % len(self.ips)], user_agent=USER_AGENTS[n % len(USER_AGENTS)],
        )
        request.occurred_at.GetCurrentTime()
        return request

    async def call(self, i: int) -> str:
        try:
            if self.batch:
                first = i * self.events_per_call
                await self.stub.CheckClickBatch(
                    self.pb.CheckClickBatchRequest(
                        requests=[self._request(first + k) for k in range(self.events_per_call)]
                    ),
                    timeout=10,
                )
            else:
                await self.stub.CheckClick(self._request(i), timeout=10)
        except self.grpc.aio.AioRpcError as error:
            return str(error.code().name)
        return "OK"

    async def close(self) -> None:
        await self.channel.close()


@dataclass
class Phase:
    calls: int = 0
    outcomes: Counter[str] = field(default_factory=Counter)
    latencies_us: list[int] = field(default_factory=list)
    elapsed: float = 0.0
    dropped: int = 0


async def closed_loop(target: Target, concurrency: int, duration: float, max_calls: int, first: int) -> Phase:
    phase = Phase()
    counter = iter(range(first, first + max_calls))
    started = time.perf_counter()
    end = started + duration

    async def worker() -> None:
        for i in counter:
            if time.perf_counter() >= end:
                return
            sent = time.perf_counter()
            try:
                outcome = await target.call(i)
            except Exception as error:  # an error is a result here
                outcome = type(error).__name__
            phase.latencies_us.append(int((time.perf_counter() - sent) * 1e6))
            phase.outcomes[outcome] += 1
            phase.calls += 1

    workers = [asyncio.create_task(worker()) for _ in range(concurrency)]
    _, pending = await asyncio.wait(workers, timeout=duration + HARD_EXTRA_SECONDS)
    for task in pending:
        task.cancel()
    phase.dropped += len(pending)
    phase.elapsed = time.perf_counter() - started
    return phase


async def open_loop(target: Target, rate: float, duration: float, first: int) -> Phase:
    phase = Phase()
    total = max(1, int(rate * duration))
    in_flight: set[asyncio.Task[None]] = set()
    started = time.perf_counter()

    async def one(i: int, intended: float) -> None:
        try:
            outcome = await target.call(i)
        except Exception as error:  # an error is a result here
            outcome = type(error).__name__
        phase.latencies_us.append(int((time.perf_counter() - intended) * 1e6))
        phase.outcomes[outcome] += 1
        phase.calls += 1

    n = 0
    while n < total:
        now = time.perf_counter()
        if now - started > duration + HARD_EXTRA_SECONDS:
            break
        # Start every request whose time has come, then sleep until the next one.
        while n < total and started + n / rate <= now:
            if len(in_flight) >= MAX_IN_FLIGHT:
                phase.dropped += 1
            else:
                task = asyncio.create_task(one(first + n, started + n / rate))
                in_flight.add(task)
                task.add_done_callback(in_flight.discard)
            n += 1
        if n < total:
            await asyncio.sleep(max(0.0, started + n / rate - time.perf_counter()))
    phase.dropped += total - n  # never started: the hard time limit came first
    if in_flight:
        _, pending = await asyncio.wait(in_flight, timeout=HARD_EXTRA_SECONDS)
        for task in pending:
            task.cancel()
        phase.dropped += len(pending)
    phase.elapsed = time.perf_counter() - started
    return phase


async def run_phase(target: Target, spec: dict[str, Any], duration: float, first: int) -> Phase:
    if spec["mode"] == "open":
        return await open_loop(target, float(spec["rate"]), duration, first)
    return await closed_loop(
        target, int(spec["concurrency"]), duration, int(spec.get("max_calls", 10_000_000)), first
    )


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def main_async(spec: dict[str, Any]) -> dict[str, Any]:
    target: Target = FraudTarget(spec) if spec["kind"].startswith("check_click") else HttpTarget(spec)
    try:
        warmup = float(spec.get("warmup", 1.0))
        if warmup > 0:
            await run_phase(target, spec, warmup, first=50_000_000)
        print("READY", flush=True)
        loop = asyncio.get_running_loop()
        await asyncio.wait_for(loop.run_in_executor(None, sys.stdin.readline), 120)
        cpu_before = _cpu_seconds()
        phase = await run_phase(target, spec, float(spec["duration"]), first=0)
        cpu = _cpu_seconds() - cpu_before
    finally:
        await target.close()
    return {
        "calls": phase.calls,
        "events_per_call": target.events_per_call,
        "outcomes": dict(phase.outcomes),
        "dropped": phase.dropped,
        "elapsed": phase.elapsed,
        "cpu_seconds": cpu,
        "latencies_us": phase.latencies_us,
    }


def main() -> None:
    spec = json.loads(sys.argv[1])
    result = uvloop.run(main_async(spec))
    # A file, not stdout: the latencies run to megabytes, past what a pipe holds.
    Path(spec["result_path"]).write_text(json.dumps(result))


if __name__ == "__main__":
    main()
