"""The caller's deadline travels to the fraud service (issue #19, admission control).

A real attribution service, over a fresh database, calls a real gRPC
server standing in for a slow fraud service. The attribution service's own
fraud deadline is long (5 s); the caller's is short. The fraud call must see
the caller's remaining time (read server-side with ``context.time_remaining()``),
and the caller must hear its answer (fail-open FLAGGED) within its deadline.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import asyncpg
import grpc
import pytest
from ascribe.attribution.v1 import attribution_pb2 as pb
from ascribe.attribution.v1 import attribution_pb2_grpc
from ascribe.fraud.v1 import fraud_pb2, fraud_pb2_grpc

from services.attribution.common.ids import new_click_id
from services.attribution.server import start_attribution
from tests.integration.test_clicks import seed
from tests.support import attribution_settings

CONFIGURED_FRAUD_DEADLINE_MS = 5000
CALLER_DEADLINE_SECONDS = 1.0


class SlowFraud(fraud_pb2_grpc.FraudServiceServicer):
    """Answers click checks after 3 s, noting the time its callers gave it."""

    def __init__(self) -> None:
        self.time_remaining: list[float | None] = []
        self.cancelled_after: list[float] = []

    async def CheckClickBatch(self, request: Any, context: Any) -> fraud_pb2.VerdictBatch:
        self.time_remaining.append(context.time_remaining())
        started = time.monotonic()
        try:
            await asyncio.sleep(3.0)
        except asyncio.CancelledError:
            self.cancelled_after.append(time.monotonic() - started)
            raise
        allow = fraud_pb2.Verdict(action=fraud_pb2.VERDICT_ACTION_ALLOW)
        return fraud_pb2.VerdictBatch(verdicts=[allow for _ in request.requests])


@pytest.fixture
async def slow_fraud() -> AsyncIterator[tuple[SlowFraud, str]]:
    servicer = SlowFraud()  # type: ignore[abstract]
    server = grpc.aio.server()
    # Only CheckClickBatch answers; CheckClickStream stays UNIMPLEMENTED, so the client falls back to it.
    fraud_pb2_grpc.add_FraudServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    yield servicer, f"127.0.0.1:{port}"
    await server.stop(0)


@pytest.fixture
async def tracking(
    database_url: str, db: asyncpg.Connection, slow_fraud: tuple[SlowFraud, str]
) -> AsyncIterator[attribution_pb2_grpc.TrackingServiceAsyncStub]:
    await seed(db)
    settings = attribution_settings(
        database_url, slow_fraud[1], fraud_deadline_ms=CONFIGURED_FRAUD_DEADLINE_MS
    )
    service = await start_attribution(settings)
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{service.port}")
    yield attribution_pb2_grpc.TrackingServiceStub(channel)
    await channel.close()
    await service.stop(0.5)


async def test_a_slow_fraud_call_gets_the_callers_remaining_time(
    tracking: attribution_pb2_grpc.TrackingServiceAsyncStub, slow_fraud: tuple[SlowFraud, str]
) -> None:
    servicer, _ = slow_fraud
    started = time.monotonic()
    response = await tracking.RecordClick(
        pb.RecordClickRequest(campaign_id="cmp", affiliate_id="aff-a"), timeout=CALLER_DEADLINE_SECONDS
    )
    elapsed = time.monotonic() - started

    # Answered, fail-open, inside the caller's deadline (not after the configured 5 s).
    assert response.decision == pb.CLICK_DECISION_FLAGGED
    assert list(response.reasons) == ["fraud_unavailable"]
    assert elapsed < CALLER_DEADLINE_SECONDS
    # The fraud call carried the caller's remaining time, less the margin to answer in.
    assert len(servicer.time_remaining) == 1
    seen = servicer.time_remaining[0]
    assert seen is not None and 0 < seen < CALLER_DEADLINE_SECONDS * 0.95
    # And the fraud server saw the call end at that deadline, not after its 3 s of work.
    for _ in range(50):
        if servicer.cancelled_after:
            break
        await asyncio.sleep(0.05)
    assert servicer.cancelled_after and servicer.cancelled_after[0] < CALLER_DEADLINE_SECONDS


async def test_without_a_caller_deadline_the_configured_one_applies(
    tracking: attribution_pb2_grpc.TrackingServiceAsyncStub, slow_fraud: tuple[SlowFraud, str]
) -> None:
    servicer, _ = slow_fraud
    # No timeout from this caller (a test-only liberty: our own callers always set one).
    call = tracking.RecordClick(pb.RecordClickRequest(campaign_id="cmp", affiliate_id="aff-a"))
    for _ in range(100):
        if servicer.time_remaining:
            break
        await asyncio.sleep(0.02)
    call.cancel()
    seen = servicer.time_remaining[0]
    assert seen is not None and CALLER_DEADLINE_SECONDS * 2 < seen <= CONFIGURED_FRAUD_DEADLINE_MS / 1000


async def test_postgresql_work_ends_at_the_callers_deadline(
    tracking: attribution_pb2_grpc.TrackingServiceAsyncStub, db: asyncpg.Connection
) -> None:
    """A query stuck behind a lock is cancelled when its caller gives up, not at statement_timeout (10 s)."""
    lock = db.transaction()
    await lock.start()
    try:
        await db.execute("LOCK TABLE clicks IN ACCESS EXCLUSIVE MODE")
        started = time.monotonic()
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await tracking.GetClick(pb.GetClickRequest(click_id=new_click_id(datetime.now(UTC))), timeout=0.5)
        assert raised.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        waiting = -1
        while time.monotonic() - started < 5:
            waiting = int(await db.fetchval(
                """SELECT count(*) FROM pg_stat_activity
                   WHERE datname = current_database() AND pid <> pg_backend_pid() AND wait_event_type = 'Lock'"""
            ))
            if waiting == 0:
                break
            await asyncio.sleep(0.05)
        assert waiting == 0
        assert time.monotonic() - started < 2.0
    finally:
        await lock.rollback()


async def test_a_stream_messages_deadline_bounds_its_fraud_call(
    tracking: attribution_pb2_grpc.TrackingServiceAsyncStub, slow_fraud: tuple[SlowFraud, str]
) -> None:
    """RecordClickStream (the gateway's click path): each message's timeout_ms is its caller's deadline."""
    servicer, _ = slow_fraud
    call = tracking.RecordClickStream(timeout=30)
    started = time.monotonic()
    await call.write(pb.RecordClickStreamRequest(
        seq=1,
        batch=pb.RecordClickBatchRequest(requests=[pb.RecordClickRequest(campaign_id="cmp", affiliate_id="aff-a")]),
        timeout_ms=int(CALLER_DEADLINE_SECONDS * 1000),
    ))
    reply = await call.read()
    elapsed = time.monotonic() - started
    await call.done_writing()
    assert isinstance(reply, pb.RecordClickStreamResponse)
    (answer,) = reply.batch.responses
    assert list(answer.response.reasons) == ["fraud_unavailable"]
    assert elapsed < CALLER_DEADLINE_SECONDS
    seen = servicer.time_remaining[0]
    assert seen is not None and 0 < seen < CALLER_DEADLINE_SECONDS * 0.95
