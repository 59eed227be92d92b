"""SchemaGate: which RPCs it refuses and when the jobs start (pure asyncio, no I/O)."""

from __future__ import annotations

import asyncio
import inspect

import pytest

from services.attribution.schema_gate import WAITING_MESSAGE, SchemaGate

SERVICES = ["ascribe.attribution.v1.TrackingService", "ascribe.attribution.v1.CatalogService"]


async def test_with_nothing_deferred_it_is_open() -> None:
    gate = SchemaGate(None, SERVICES)
    assert gate.open.is_set()
    assert gate.deferred_step() is None
    assert gate.refusal("/ascribe.attribution.v1.TrackingService/RecordClick") is None


async def test_until_the_deferred_step_succeeds_our_rpcs_are_refused_and_health_is_not() -> None:
    attempts: list[int] = []

    async def migrate() -> None:
        attempts.append(1)
        if len(attempts) == 1:
            raise OSError("connection refused")

    gate = SchemaGate(migrate, SERVICES)
    step = gate.deferred_step()
    assert step is not None
    assert gate.refusal("/ascribe.attribution.v1.CatalogService/CreateCampaign") == WAITING_MESSAGE
    assert gate.refusal("/grpc.health.v1.Health/Check") is None
    assert gate.refusal("/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo") is None
    with pytest.raises(OSError):
        await step()
    assert not gate.open.is_set()
    await step()
    assert gate.open.is_set()
    assert gate.refusal("/ascribe.attribution.v1.CatalogService/CreateCampaign") is None


async def test_a_job_starts_only_once_the_gate_opens_and_is_closed_if_cancelled_before() -> None:
    async def deferred() -> None:
        return None

    gate = SchemaGate(deferred, SERVICES)
    ran: list[str] = []

    async def job(name: str) -> None:
        ran.append(name)

    waiting = asyncio.create_task(gate.after_opening(job("a")))
    never = job("b")
    cancelled = asyncio.create_task(gate.after_opening(never))
    await asyncio.sleep(0.01)
    assert ran == []
    cancelled.cancel()
    with pytest.raises(asyncio.CancelledError):
        await cancelled
    assert inspect.getcoroutinestate(never) == inspect.CORO_CLOSED  # so never "never awaited"
    step = gate.deferred_step()
    assert step is not None
    await step()
    await waiting
    assert ran == ["a"]
