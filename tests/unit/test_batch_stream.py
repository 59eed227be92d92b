"""serve_batch_stream's rules, with in-memory requests (the gRPC side is tested on real servers)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import grpc
import pytest

from services.common.batch_stream import serve_batch_stream, status_code
from services.common.errors import DomainError, NotFound


@dataclass
class Request:
    seq: int
    batch: Any
    timeout_ms: int = 0


def reply(seq: int, answer: Any, error: DomainError | None) -> tuple[int, Any, str | None]:
    return seq, answer, None if error is None else f"{error.status.name}: {error.message}"


async def handle(batch: Any) -> Any:
    kind, value = batch
    if kind == "sleep":
        await asyncio.sleep(value)
        return value
    if kind == "not_found":
        raise NotFound(value)
    if kind == "inner_timeout":  # a timeout of the handler's own, not the message's deadline
        raise TimeoutError(value)
    raise ValueError(value)  # a bug in a handler


async def served(requests: AsyncIterator[Request], stopping: asyncio.Event | None = None) -> list[Any]:
    return [
        item
        async for item in serve_batch_stream(
            requests, handle, reply, stopping or asyncio.Event(), name="test"
        )
    ]


async def test_answers_leave_as_they_finish_and_errors_stay_with_their_message() -> None:
    async def requests() -> AsyncIterator[Request]:
        yield Request(1, ("sleep", 0.05))
        yield Request(2, ("sleep", 0.0))
        yield Request(3, ("not_found", "no such thing"))
        yield Request(4, ("bug", "boom"))

    answers = await served(requests())
    assert sorted(answers) == sorted(
        [
            (1, 0.05, None),
            (2, 0.0, None),
            (3, None, "NOT_FOUND: no such thing"),
            (4, None, "INTERNAL: internal error"),  # the bug's text stays in the log
        ]
    )
    assert answers[-1][0] == 1  # the slow one did not hold up the others


async def test_stopping_ends_reading_but_answers_what_was_read() -> None:
    stopping = asyncio.Event()
    never = asyncio.Event()

    async def requests() -> AsyncIterator[Request]:
        yield Request(1, ("sleep", 0.05))
        await never.wait()  # a client that keeps the stream open
        yield Request(2, ("sleep", 0.0))

    async def stop_soon() -> None:
        await asyncio.sleep(0.01)
        stopping.set()

    stopper = asyncio.create_task(stop_soon())
    answers = await asyncio.wait_for(served(requests(), stopping), timeout=5)
    await stopper
    assert answers == [(1, 0.05, None)]


async def test_a_finished_request_stream_ends_after_its_answers() -> None:
    async def requests() -> AsyncIterator[Request]:
        for seq in range(1, 6):
            yield Request(seq, ("sleep", 0.01 * (6 - seq)))

    answers = await asyncio.wait_for(served(requests()), timeout=5)
    assert sorted(seq for seq, _, _ in answers) == [1, 2, 3, 4, 5]


async def test_a_message_past_its_deadline_is_given_up() -> None:
    async def requests() -> AsyncIterator[Request]:
        yield Request(1, ("sleep", 5.0), timeout_ms=20)
        yield Request(2, ("sleep", 0.0), timeout_ms=1000)
        yield Request(3, ("inner_timeout", "a query took too long"), timeout_ms=1000)

    answers = await asyncio.wait_for(served(requests()), timeout=3)
    assert sorted(answers) == [
        (1, None, "DEADLINE_EXCEEDED: the message's deadline passed"),
        (2, 0.0, None),
        (3, None, "INTERNAL: internal error"),
    ]


async def test_a_failing_request_stream_ends_with_its_error_after_the_answers() -> None:
    async def requests() -> AsyncIterator[Request]:
        yield Request(1, ("sleep", 0.02))
        raise RuntimeError("a message that does not decode")

    got: list[Any] = []
    with pytest.raises(RuntimeError, match="does not decode"):
        async for item in serve_batch_stream(requests(), handle, reply, asyncio.Event(), name="test"):
            got.append(item)
    assert got == [(1, 0.02, None)]


@pytest.mark.parametrize(
    ("number", "code"),
    [
        (0, grpc.StatusCode.OK),
        (3, grpc.StatusCode.INVALID_ARGUMENT),
        (14, grpc.StatusCode.UNAVAILABLE),
        (99, grpc.StatusCode.UNKNOWN),
    ],
)
def test_status_code_numbers(number: int, code: grpc.StatusCode) -> None:
    assert status_code(number) is code
