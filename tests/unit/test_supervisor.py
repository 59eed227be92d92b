"""The supervisor's restart policy and the readiness bookkeeping, on a fake clock (no processes).

Real processes under real faults are tested in tests/e2e/test_supervision.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import time
from pathlib import Path
from typing import Any, cast

import pytest
import yaml
from grpc_health.v1 import health_pb2

from services.common.readiness import Readiness
from tools.run import is_warning
from tools.supervisor import (
    REAP_PATIENCE,
    REAP_WAIT,
    Backoff,
    ConfigurationError,
    EmbeddedUnit,
    State,
    Supervisor,
    describe_exit,
)

REPO = Path(__file__).resolve().parents[2]


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class FakeUnit:
    """A process whose exits and answers the test decides."""

    start_timeout = 10.0

    def __init__(self, name: str = "fraud") -> None:
        self.name = name
        self.pid = 100
        self.code: int | None = None
        self.up = True
        self.launches = 0
        self.reaped = 0
        self.lingering = False  # the old process has not gone yet
        self.launch_error: BaseException | None = None

    def launch(self) -> int:
        if self.launch_error is not None:
            raise self.launch_error
        self.launches += 1
        self.pid += 1
        self.code = None
        return self.pid

    def exit_code(self) -> int | None:
        return self.code

    def is_up(self) -> bool:
        return self.up

    def reap(self) -> None:
        self.reaped += 1

    def remains(self) -> bool:
        return self.lingering

    def last_lines(self) -> str:
        return "last words"


def test_backoff_restarts_at_once_until_three_crashes_in_a_minute_then_doubles_up_to_30s() -> None:
    backoff = Backoff()
    assert [backoff.crash(t) for t in (0.0, 1.0)] == [0.0, 0.0]
    assert [backoff.crash(t) for t in (2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0)] == [1, 2, 4, 8, 16, 30, 30]
    # A minute later the old crashes no longer count.
    fresh = Backoff()
    fresh.crash(0.0)
    fresh.crash(10.0)
    assert fresh.crash(70.5) == 0.0


def _supervised(clock: Clock) -> tuple[Supervisor, FakeUnit, list[str]]:
    lines: list[str] = []
    supervisor = Supervisor(lines.append, clock=clock)
    unit = FakeUnit()
    supervisor.watch(unit, unit.launch())
    return supervisor, unit, lines


def test_a_crash_is_restarted_on_the_next_poll_and_said_why() -> None:
    clock = Clock()
    supervisor, unit, lines = _supervised(clock)
    unit.code = -signal.SIGKILL
    unit.up = False
    supervisor.poll()
    assert unit.launches == 2 and unit.reaped == 1
    assert supervisor.state("fraud") is State.STARTING
    assert lines[:2] == ["fraud (pid 101) was killed by SIGKILL", "fraud restarted (pid 102)"]
    clock.now += 0.5
    supervisor.poll()
    assert supervisor.state("fraud") is State.STARTING
    unit.up = True
    clock.now += 0.5
    supervisor.poll()
    assert supervisor.state("fraud") is State.UP
    assert lines[-1] == "fraud (pid 102) is up again, 1.0s after it stopped"


def test_a_crash_loop_backs_off_instead_of_looping() -> None:
    clock = Clock()
    supervisor, unit, lines = _supervised(clock)
    for _ in range(3):
        unit.code = 1
        supervisor.poll()
        clock.now += 0.1
    assert unit.launches == 3  # the first start and two immediate restarts
    assert supervisor.state("fraud") is State.WAITING
    assert lines[-1] == "fraud crashed 3 times in 60s: restarting in 1s"
    clock.now += 0.5
    supervisor.poll()
    assert unit.launches == 3
    clock.now += 0.6
    supervisor.poll()
    assert unit.launches == 4


def test_a_process_that_never_answers_is_killed_and_counted_as_a_crash() -> None:
    clock = Clock()
    supervisor, unit, lines = _supervised(clock)
    unit.code, unit.up = 1, False
    supervisor.poll()
    clock.now += unit.start_timeout + 0.1
    supervisor.poll()
    assert "did not answer within 10s" in lines[-2]
    assert unit.reaped == 2 and unit.launches == 3


def test_exit_code_2_is_a_configuration_error_that_stops_everything() -> None:
    supervisor, unit, _ = _supervised(Clock())
    unit.code = 2
    with pytest.raises(ConfigurationError, match="last words"):
        supervisor.poll()
    assert unit.launches == 1


def test_a_launch_that_fails_with_oserror_is_retried_with_the_crash_backoff() -> None:
    clock = Clock()
    supervisor, unit, lines = _supervised(clock)
    unit.launch_error = OSError(24, "Too many open files")
    unit.code = -signal.SIGKILL
    supervisor.poll()  # the crash, and a restart that fails twice more: three in a minute
    assert "fraud could not be restarted: [Errno 24] Too many open files" in lines
    assert supervisor.state("fraud") is State.WAITING
    assert lines[-1] == "fraud crashed 3 times in 60s: restarting in 1s"
    unit.launch_error = None
    clock.now += 1.1
    supervisor.poll()
    assert supervisor.state("fraud") is State.STARTING
    assert unit.launches == 2


def test_an_old_process_that_lingers_is_waited_for_between_polls_and_killed_again() -> None:
    clock = Clock()
    supervisor, unit, lines = _supervised(clock)
    unit.code, unit.lingering = -signal.SIGKILL, True
    began = time.monotonic()
    supervisor.poll()
    assert time.monotonic() - began < 0.1, "the poll blocked on the reap"
    assert supervisor.state("fraud") is State.REAPING
    assert unit.launches == 1 and unit.reaped == 1
    assert lines[-1] == "fraud: waiting for the old process to exit before restarting"
    clock.now += REAP_PATIENCE
    supervisor.poll()
    assert unit.reaped == 2 and "killing it again" in lines[-1]
    unit.lingering = False
    clock.now += 0.1
    supervisor.poll()
    assert supervisor.state("fraud") is State.STARTING and unit.launches == 2


class _FakeServer:
    def __init__(self) -> None:
        self.waits: list[float] = []

    def kill_group(self, timeout: float = 10.0) -> None:
        self.waits.append(timeout)


def test_an_embedded_servers_reap_waits_at_most_reap_wait() -> None:
    unit = EmbeddedUnit("redis", lambda port: cast(Any, None), lambda server: None)
    server = _FakeServer()
    unit.server = cast(Any, server)
    unit.reap()
    # kill_group waits twice at most (the leader, then the group): about a second, not 20.
    assert server.waits == [REAP_WAIT] and 2 * REAP_WAIT <= 1.0


def test_describe_exit() -> None:
    assert describe_exit(-9) == "was killed by SIGKILL"
    assert describe_exit(1) == "exited with code 1"


@pytest.mark.parametrize(
    ("line", "warning"),
    [
        (json.dumps({"level": "warning", "msg": "no tor list"}), True),
        (json.dumps({"level": "error", "msg": "x"}), True),
        (json.dumps({"level": "info", "msg": "WARNING in the text is not a level"}), False),
        ("2026-01-01 10:00:00,000 fraud WARNING services.fraud.ipintel: no tor list", True),
        ("2026-01-01 10:00:00,000 fraud INFO services.fraud.server: serving", False),
        ("/x/y.py:12: DeprecationWarning: old", True),
        ("ValueError: bad", True),
        ("--- starting fraud at 2026-01-01T10:00:00", False),
    ],
)
def test_is_warning(line: str, warning: bool) -> None:
    assert is_warning(line) is warning


async def test_readiness_sets_health_only_when_the_answer_changes() -> None:
    changes: list[tuple[str, int]] = []

    class Recorder:
        async def set(self, name: str, status: int) -> None:
            changes.append((name, status))

    answers: list[Exception | None] = [None, None, OSError("refused"), OSError("refused"), None]

    async def probe() -> None:
        error = answers.pop(0)
        if error is not None:
            raise error

    readiness = Readiness(Recorder(), ["svc"], probe, "dep")
    assert [await readiness.check() for _ in range(5)] == [True, True, False, False, True]
    serving, not_serving = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING
    assert changes == [
        ("", serving), ("svc", serving), ("", not_serving), ("svc", not_serving), ("", serving), ("svc", serving),
    ]


async def test_readiness_is_not_ready_until_a_deferred_start_up_step_has_run() -> None:
    class Recorder:
        async def set(self, name: str, status: int) -> None:
            pass

    runs: list[str] = []
    failures = [OSError("down")]

    async def prepare() -> None:
        runs.append("prepare")
        if failures:
            raise failures.pop()

    async def probe() -> None:
        runs.append("probe")

    readiness = Readiness(Recorder(), [], probe, "dep", prepare=prepare)
    assert [await readiness.check() for _ in range(3)] == [False, True, True]
    assert runs == ["prepare", "prepare", "probe", "probe"]


def test_docker_compose_restarts_what_make_run_supervises() -> None:
    """The same processes as `make run` supervises, restarted by Docker when they exit."""
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    for name in ("postgres", "redis", "fraud", "attribution", "gateway"):
        assert compose["services"][name].get("restart") in ("always", "unless-stopped"), name


async def test_readiness_stops_even_when_a_probe_swallows_the_cancellation() -> None:
    """redis-py's connect and close can eat a CancelledError; the stopping service must not wait for ever."""

    class Recorder:
        async def set(self, name: str, status: int) -> None:
            pass

    probing = asyncio.Event()

    async def probe() -> None:
        probing.set()
        with contextlib.suppress(asyncio.CancelledError):  # what a client library's timeout wrapper may do
            await asyncio.sleep(10)

    readiness = Readiness(Recorder(), [], probe, "dep", interval=0.01)
    task = asyncio.create_task(readiness.run())
    await asyncio.wait_for(probing.wait(), 5)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, 5)
