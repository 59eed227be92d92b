"""A real Redis stopped and restarted under the fraud service: UNAVAILABLE fast, then recovery by itself."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path
from typing import Any

import grpc
from ascribe.fraud.v1 import fraud_pb2 as pb
from ascribe.fraud.v1 import fraud_pb2_grpc

from services.common import embedded
from services.fraud.config import Settings
from services.fraud.metrics import REDIS_ERRORS_TOTAL
from services.fraud.server import start_fraud
from services.fraud.store import StoreConfig
from tests.support import sample

DEADLINE_SECONDS = 1.0
# Shorter than the socket timeout (200 ms here), with room for a loaded CI machine.
SHORT_DEADLINE_SECONDS = 0.12


async def test_redis_down_answers_unavailable_then_recovers(tmp_path: Path, ipintel_dir: Path) -> None:
    redis_server = embedded.start_redis(tmp_path / "redis")
    port = redis_server.port
    settings = Settings(
        redis_url=redis_server.url,
        addr="127.0.0.1:0",
        metrics_port=0,
        ipintel_dir=ipintel_dir,
        redis_timeout_ms=200,
        store=StoreConfig(prefix="outage"),
    )
    service = await start_fraud(settings, handle_sighup=False)
    request = pb.CheckClickRequest(click_id="c", campaign_id="camp", ip="81.2.69.142", user_agent="Mozilla/5.0 (X11)")
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{service.port}") as channel:
            stub = fraud_pb2_grpc.FraudServiceStub(channel)
            assert (await stub.CheckClick(request, timeout=DEADLINE_SECONDS)).action == pb.VERDICT_ACTION_ALLOW

            # A hung Redis (stopped, not dead) costs the socket timeout, not the caller's deadline.
            os.kill(redis_server.process.pid, signal.SIGSTOP)
            try:
                started = time.monotonic()
                try:
                    await stub.CheckClick(request, timeout=DEADLINE_SECONDS)
                    raise AssertionError("a check succeeded with Redis hung")
                except grpc.aio.AioRpcError as error:
                    assert error.code() == grpc.StatusCode.UNAVAILABLE, error
                assert time.monotonic() - started < DEADLINE_SECONDS
                # A caller's deadline shorter than the socket timeout (the
                # attribution service's is 50 ms): the check still answers
                # UNAVAILABLE inside it, and the metric counts the hung Redis.
                errors_before = sample(REDIS_ERRORS_TOTAL) or 0.0
                message: Any  # each call's own request type
                for call, message in (
                    (stub.CheckClick, request),
                    (stub.CheckClickBatch, pb.CheckClickBatchRequest(requests=[request] * 3)),
                ):
                    started = time.monotonic()
                    try:
                        await call(message, timeout=SHORT_DEADLINE_SECONDS)
                        raise AssertionError("a check succeeded with Redis hung")
                    except grpc.aio.AioRpcError as error:
                        assert error.code() == grpc.StatusCode.UNAVAILABLE, error
                    assert time.monotonic() - started < SHORT_DEADLINE_SECONDS + 0.1
                errors = sample(REDIS_ERRORS_TOTAL) or 0.0
                assert errors - errors_before >= 2
            finally:
                os.kill(redis_server.process.pid, signal.SIGCONT)
            assert (await stub.CheckClick(request, timeout=DEADLINE_SECONDS)).action == pb.VERDICT_ACTION_ALLOW

            redis_server.stop()
            for _ in range(3):
                started = time.monotonic()
                try:
                    await stub.CheckClick(request, timeout=DEADLINE_SECONDS)
                    raise AssertionError("a check succeeded with Redis down")
                except grpc.aio.AioRpcError as error:
                    assert error.code() == grpc.StatusCode.UNAVAILABLE, error
                assert time.monotonic() - started < DEADLINE_SECONDS
            batch = pb.CheckClickBatchRequest(requests=[request] * 10)
            try:
                await stub.CheckClickBatch(batch, timeout=DEADLINE_SECONDS)
                raise AssertionError("a batch succeeded with Redis down")
            except grpc.aio.AioRpcError as error:
                assert error.code() == grpc.StatusCode.UNAVAILABLE

            # Same port, fresh process: the scripts are gone too (NOSCRIPT is handled).
            redis_server = embedded.start_redis(tmp_path / "redis2", port=port)
            recovered_after = None
            started = time.monotonic()
            while time.monotonic() - started < 10:
                try:
                    verdict = await stub.CheckClick(request, timeout=DEADLINE_SECONDS)
                except grpc.aio.AioRpcError as error:
                    assert error.code() == grpc.StatusCode.UNAVAILABLE
                    await asyncio.sleep(0.1)
                    continue
                assert verdict.action == pb.VERDICT_ACTION_ALLOW
                recovered_after = time.monotonic() - started
                break
            assert recovered_after is not None, "the service did not recover after Redis came back"
            verdicts = await stub.CheckClickBatch(batch, timeout=DEADLINE_SECONDS)
            assert len(verdicts.verdicts) == 10
    finally:
        await service.stop(grace_seconds=0.5)
        redis_server.stop()
