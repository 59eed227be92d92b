"""Redis at its memory limit: the fraud service answers UNAVAILABLE (events are flagged, never lost) and evicts nothing."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest
import redis.asyncio as aioredis
from ascribe.fraud.v1 import fraud_pb2 as pb
from ascribe.fraud.v1 import fraud_pb2_grpc
from redis.exceptions import ResponseError

from services.common import embedded
from services.fraud.config import Settings
from services.fraud.server import start_fraud
from services.fraud.store import StoreConfig

LIMIT = "4mb"


def click(n: int, external: str = "") -> pb.CheckClickRequest:
    return pb.CheckClickRequest(
        click_id=f"c{n}", external_click_id=external, campaign_id="camp", affiliate_id="aff",
        ip=f"81.2.{n // 250 % 250}.{n % 250 + 1}", user_agent="Mozilla/5.0 (X11; Linux x86_64) Firefox/126.0",
    )


async def test_at_the_limit_checks_are_unavailable_and_nothing_is_evicted(tmp_path: Path, ipintel_dir: Path) -> None:
    redis_server = embedded.start_redis(
        tmp_path / "redis", extra_args=["--maxmemory", LIMIT, "--maxmemory-policy", "noeviction"]
    )
    client = aioredis.from_url(redis_server.url)
    settings = Settings(
        redis_url=redis_server.url, addr="127.0.0.1:0", metrics_port=0, ipintel_dir=ipintel_dir,
        store=StoreConfig(prefix="limit"),
    )
    service = await start_fraud(settings, handle_sighup=False)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{service.port}") as channel:
            stub: fraud_pb2_grpc.FraudServiceAsyncStub = fraud_pb2_grpc.FraudServiceStub(channel)  # type: ignore[assignment]
            first = await stub.CheckClick(click(0, external="x-1"), timeout=5)
            assert first.action == pb.VERDICT_ACTION_ALLOW
            dedup_keys = [key async for key in client.scan_iter(match="limit:*xc:*")]
            assert dedup_keys
            # Fill the rest of the memory with something else.
            with pytest.raises(ResponseError) as full:
                for n in range(100_000):
                    await client.set(f"filler:{n}", b"x" * 4096)
            assert "maxmemory" in str(full.value)
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await stub.CheckClickBatch(pb.CheckClickBatchRequest(requests=[click(n) for n in range(1, 50)]), timeout=5)
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
            # noeviction: the duplicate-click key is still there, exactly.
            for key in dedup_keys:
                assert await client.get(key) == b"c0"
            # Room again: checks answer again, and the duplicate is still caught.
            await client.delete(*[f"filler:{n}" for n in range(n)])
            again = await stub.CheckClick(click(1, external="x-1"), timeout=5)
            assert "duplicate_click_id" in {signal.code for signal in again.signals}
    finally:
        await service.stop()
        await client.aclose()
        redis_server.stop()
