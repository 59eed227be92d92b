"""Started while PostgreSQL is down, the attribution service serves nothing of its own until it has migrated.

In-process, against an embedded PostgreSQL this test starts late: before it
answers (and until the deferred migrations ran) every RPC of the service is
UNAVAILABLE with a message saying why, streaming ones too, and the background
jobs have not started (none fails and logs); health answers throughout.
Once PostgreSQL answers, the migrations run and RPCs go through.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from ascribe.attribution.v1 import attribution_pb2 as pb
from ascribe.attribution.v1 import attribution_pb2_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.attribution.schema_gate import WAITING_MESSAGE
from services.attribution.server import TRACKING_SERVICE, start_attribution
from services.common import embedded
from tests.support import attribution_settings


async def _campaign(channel: grpc.aio.Channel) -> pb.Campaign:
    return await attribution_pb2_grpc.CatalogServiceStub(channel).CreateCampaign(
        pb.CreateCampaignRequest(campaign=pb.Campaign(
            name="Late", landing_url="https://shop.example/", currency="EUR", payout_micros=1,
        )),
        timeout=10,
    )


async def test_rpcs_and_jobs_wait_for_the_deferred_migrations(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    port = embedded.free_port()
    url = f"postgresql://postgres@127.0.0.1:{port}/postgres"
    settings = attribution_settings(
        url, "127.0.0.1:9", db_pool_min=1, db_pool_max=4, background_jobs=True,
        approval_interval_ms=50, rescore_interval_ms=50, auto_hold_leaked_codes=False,
    )
    service = await start_attribution(settings)
    server: embedded.EmbeddedServer | None = None
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{service.port}") as channel:
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await _campaign(channel)
            assert (refused.value.code(), refused.value.details()) == (grpc.StatusCode.UNAVAILABLE, WAITING_MESSAGE)

            async def one_batch() -> None:
                async def requests() -> AsyncIterator[pb.RecordClickStreamRequest]:
                    # No message: one written while the server refuses the call
                    # can fail the client's own send first (INTERNAL "Failed
                    # execute_batch", seen once in CI), a client-side race that
                    # hides the server's answer. The refusal needs none.
                    none: tuple[pb.RecordClickStreamRequest, ...] = ()
                    for message in none:
                        yield message

                call = attribution_pb2_grpc.TrackingServiceStub(channel).RecordClickStream(requests(), timeout=10)
                async for _ in call:
                    pass

            with pytest.raises(grpc.aio.AioRpcError) as stream_refused:
                await one_batch()
            assert stream_refused.value.code() == grpc.StatusCode.UNAVAILABLE
            assert stream_refused.value.details() == WAITING_MESSAGE
            health = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=TRACKING_SERVICE), timeout=5
            )
            assert health.status == health_pb2.HealthCheckResponse.NOT_SERVING

            await asyncio.sleep(0.5)  # ten job intervals
            assert not [r for r in caplog.records if "failed; retrying" in r.getMessage()], "a job ran"
            assert all(not task.done() for task in service.tasks)

            server = await asyncio.to_thread(embedded.start_postgres, tmp_path / "pg", port)
            for _ in range(100):
                try:
                    created = await _campaign(channel)
                    break
                except grpc.aio.AioRpcError as error:
                    assert error.code() == grpc.StatusCode.UNAVAILABLE, error
                    await asyncio.sleep(0.1)
            else:
                raise AssertionError("RPCs still refused 10 s after PostgreSQL answered")
            assert created.id
            assert any("deferred start-up migrations ran" in r.getMessage() for r in caplog.records)
    finally:
        await service.stop(0.5)
        if server is not None:
            await asyncio.to_thread(server.stop)
