"""The fraud service refreshes its IP lists on a schedule and reloads them without a restart.

The upstream lists are served by a real HTTP server on loopback (the test's
own), so the download, the validation, the atomic replacement, SOURCES.tsv
and the reload all run as they do in production.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
import redis.asyncio as aioredis
from aiohttp import web
from ascribe.fraud.v1 import fraud_pb2 as pb
from ascribe.fraud.v1 import fraud_pb2_grpc
from prometheus_client import REGISTRY

from services.fraud.config import Settings
from services.fraud.ipintel import MANIFEST, IpList, read_manifest
from services.fraud.ipintel_download import Source
from services.fraud.server import FraudService, start_fraud
from services.fraud.store import StoreConfig
from tests.support import signal_codes

OLD_TOR, NEW_TOR = "198.51.100.7", "198.51.100.8"
BROWSER = "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/126.0 Safari/537.36"


@dataclass
class Upstream:
    """What the fake upstream serves, by file name (changed by the tests)."""

    lists: dict[str, str] = field(default_factory=dict)
    hits: int = 0
    url: str = ""

    def sources(self) -> tuple[Source, ...]:
        return tuple(Source(name, (f"{self.url}/{name}",), 1, ("MIT (test)",)) for name in sorted(self.lists))


@pytest.fixture
async def upstream() -> AsyncIterator[Upstream]:
    state = Upstream(lists={
        "tor-exit-nodes.txt": f"{OLD_TOR}\n",
        "datacenter-ipv4.txt": "192.0.2.0/24\n",
        "vpn-ipv4.txt": "203.0.113.0/24\n",
    })

    async def serve(request: web.Request) -> web.Response:
        state.hits += 1
        body = state.lists.get(request.match_info["name"])
        return web.Response(text=body) if body is not None else web.Response(status=404)

    app = web.Application()
    app.router.add_get("/{name}", serve)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    state.url = f"http://127.0.0.1:{port}"
    yield state
    await runner.cleanup()


async def start(redis_url: str, prefix: str, folder: Path, upstream: Upstream, refresh_seconds: float) -> FraudService:
    settings = Settings(
        redis_url=redis_url, addr="127.0.0.1:0", metrics_port=0, ipintel_dir=folder,
        ipintel_refresh_seconds=refresh_seconds, ipintel_sources=upstream.sources(),
        store=StoreConfig(prefix=prefix),
    )
    return await start_fraud(settings, handle_sighup=False)


async def tor_signal(service: FraudService, ip: str) -> bool:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{service.port}") as channel:
        stub = fraud_pb2_grpc.FraudServiceStub(channel)
        verdict = await stub.CheckClick(  # type: ignore[misc]
            pb.CheckClickRequest(click_id=f"c-{ip}", campaign_id="camp", affiliate_id="aff", ip=ip, user_agent=BROWSER),
            timeout=5,
        )
    return "tor_exit" in signal_codes(verdict)


def sample(name: str, **labels: str) -> float | None:
    return REGISTRY.get_sample_value(name, labels)


async def test_missing_lists_are_downloaded_at_once_then_on_schedule(
    tmp_path: Path, upstream: Upstream, redis_server_url: str, redis_prefix: str, redis_client: aioredis.Redis
) -> None:
    folder = tmp_path / "lists"  # nothing yet: every list is missing, so the first refresh does not wait
    ok_before = sample("ascribe_fraud_ipintel_refreshes_total", result="ok") or 0.0
    service = await start(redis_server_url, redis_prefix, folder, upstream, refresh_seconds=1.5)
    try:
        assert not service.intel.current.available
        assert sample("ascribe_fraud_ipintel_age_seconds", list="tor") == float("inf")
        async with asyncio.timeout(10):
            while not service.intel.current.available:
                await asyncio.sleep(0.05)
        assert await tor_signal(service, OLD_TOR)
        assert not await tor_signal(service, NEW_TOR)
        age = sample("ascribe_fraud_ipintel_age_seconds", list="tor")
        assert age is not None and 0 <= age < 30
        assert sample("ascribe_fraud_ipintel_entries", list="tor") == 1
        assert set(read_manifest(folder)) == set(upstream.lists)
        assert "MIT (test)" in (folder / MANIFEST).read_text()

        # Upstream changes; the next scheduled refresh swaps the lists in, no restart, no SIGHUP.
        upstream.lists["tor-exit-nodes.txt"] = f"{NEW_TOR}\n"
        async with asyncio.timeout(10):
            while not await tor_signal(service, NEW_TOR):
                await asyncio.sleep(0.1)
        assert not await tor_signal(service, OLD_TOR)
        assert (sample("ascribe_fraud_ipintel_refreshes_total", result="ok") or 0.0) >= ok_before + 2
    finally:
        await service.stop(grace_seconds=0.5)


async def test_a_bad_download_keeps_the_lists_in_use(
    tmp_path: Path, upstream: Upstream, redis_server_url: str, redis_prefix: str, redis_client: aioredis.Redis
) -> None:
    folder = tmp_path / "lists"
    service = await start(redis_server_url, redis_prefix, folder, upstream, refresh_seconds=0)
    try:
        hits = upstream.hits
        await asyncio.sleep(0.3)
        assert upstream.hits == hits  # refresh off (the default): no download at all
        report = await service.refresh_ipintel()
        assert not report.failed and await tor_signal(service, OLD_TOR)
        failed_before = sample("ascribe_fraud_ipintel_refreshes_total", result="failed") or 0.0
        # A captive portal's page instead of the list: nothing parses, the file is not replaced.
        upstream.lists["tor-exit-nodes.txt"] = "<html>Please log in</html>\n"
        del upstream.lists["vpn-ipv4.txt"]  # and a 404
        report = await service.refresh_ipintel()
        assert {name for name, _ in report.failed} == {"tor-exit-nodes.txt", "vpn-ipv4.txt"}
        assert (folder / "tor-exit-nodes.txt").read_text() == f"{OLD_TOR}\n"
        assert await tor_signal(service, OLD_TOR)
        assert service.intel.current.counts[IpList.VPN] == 1
        assert sample("ascribe_fraud_ipintel_refreshes_total", result="failed") == failed_before + 1
    finally:
        await service.stop(grace_seconds=0.5)
