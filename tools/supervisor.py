"""Keeps `make run`'s processes alive: restarts what dies, backs off what keeps dying.

Each supervised process is a `Unit`: a service of the `Stack` or an embedded
server. The `Supervisor` polls them from the main thread (children of a
worker thread would die with it: PR_SET_PDEATHSIG follows the creating
thread) and never blocks for long, so one slow restart does not delay
noticing another crash.

- A process that dies is restarted at once, with a console line saying why.
- It counts as up again when it answers: a service once its process is live
  (gRPC health `liveness`, the gateway's /healthz), even while its database
  is still down, since readiness reports that; an embedded server once it
  serves (Redis past LOADING, PostgreSQL running a query).
- After `CRASH_LIMIT` crashes within `CRASH_WINDOW` seconds each restart
  waits, twice as long each time, up to `MAX_DELAY`.
- Exit code 2 is a configuration error: restarting cannot fix it, so the
  supervisor raises `ConfigurationError` and the caller stops the stack.
- A launch that fails (Popen's OSError: no file descriptors, no memory, a
  missing interpreter) counts as a crash: retried, and backed off the same way.
- Reaping never blocks for long (`REAP_WAIT`): a process group that has not
  gone within it is waited for between polls (state `REAPING`), and killed
  again every `REAP_PATIENCE` seconds; an embedded server is relaunched on its
  data directory only once its old group has gone.
"""

from __future__ import annotations

import signal
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from typing import Protocol

from services.common import embedded
from services.common.readiness import LIVENESS_SERVICE
from tools.stack import Stack, StackError, grpc_serving, http_ok, log_tail

CRASH_LIMIT = 3
CRASH_WINDOW = 60.0
MAX_DELAY = 30.0
CONFIG_ERROR_EXIT = 2
# A check of whether a process answers must not hold up the others' supervision.
CHECK_TIMEOUT = 0.3
CHECK_EVERY = 0.1
# The most one reap blocks the poll loop (each of its two waits); what has not
# gone by then is waited for between polls, never in one.
REAP_WAIT = 0.5
REAP_PATIENCE = 10.0


class ConfigurationError(RuntimeError):
    """A process exited with code 2: its settings are wrong, and a restart would not help."""


@dataclass
class Backoff:
    """How long to wait before restarting after a crash at ``now``."""

    limit: int = CRASH_LIMIT
    window: float = CRASH_WINDOW
    cap: float = MAX_DELAY
    crashes: deque[float] = field(default_factory=deque)

    def crash(self, now: float) -> float:
        """Records a crash; returns the delay before the restart (0 while under the limit)."""
        self.crashes.append(now)
        while self.crashes and self.crashes[0] <= now - self.window:
            self.crashes.popleft()
        over = len(self.crashes) - self.limit
        return 0.0 if over < 0 else min(self.cap, 2.0**over)

    def recent(self) -> int:
        return len(self.crashes)


class Unit(Protocol):
    name: str
    start_timeout: float

    def launch(self) -> int:
        """Starts the process without waiting; returns its pid. Raises RuntimeError when it cannot."""

    def exit_code(self) -> int | None:
        """None while the process runs; its return code (negative: killed by that signal) once it exited."""

    def is_up(self) -> bool:
        """Whether the process serves: quick (CHECK_TIMEOUT for a service, 2 s at most for PostgreSQL)."""

    def reap(self) -> None:
        """After an exit: kills whatever the process left behind (its process group), waiting briefly."""

    def remains(self) -> bool:
        """Whether anything of the last process is still alive (a relaunch must wait for it)."""

    def last_lines(self) -> str:
        """The end of its log, to show why it exited."""


class ServiceUnit:
    """One of the three services, run by ``stack``."""

    start_timeout = 30.0

    def __init__(self, stack: Stack, name: str) -> None:
        self.stack = stack
        self.name = name

    def launch(self) -> int:
        try:
            return self.stack.start_service(self.name, wait=False)
        except StackError as error:
            raise RuntimeError(str(error)) from error

    def exit_code(self) -> int | None:
        return self.stack.exited().get(self.name)

    def is_up(self) -> bool:
        if self.name == "gateway":
            return http_ok(f"{self.stack.gateway_url}/healthz", timeout=CHECK_TIMEOUT)
        return grpc_serving(self.stack.addr(self.name), timeout=CHECK_TIMEOUT, service=LIVENESS_SERVICE)

    def is_ready(self) -> bool:
        return self.stack.is_ready(self.name)

    def reap(self) -> None:
        # Forgets the dead child: its group is killed and its log closed.
        self.stack.stop_service(self.name, timeout=REAP_WAIT)

    def remains(self) -> bool:
        # stop_service waited for the process itself; a service owns no files a
        # second instance would fight over, so its relaunch need not wait.
        return False

    def last_lines(self) -> str:
        return log_tail(self.stack.log_path(self.name), 15)


class EmbeddedUnit:
    """An embedded PostgreSQL or Redis, restarted on its first port and data directory."""

    def __init__(
        self,
        name: str,
        launch: Callable[[int | None], embedded.EmbeddedServer],
        stop: Callable[[embedded.EmbeddedServer], None],
        start_timeout: float = 60.0,
        after_start: Callable[[embedded.EmbeddedServer], None] | None = None,
    ) -> None:
        self.name = name
        self.start_timeout = start_timeout
        self._launch = launch
        self._stop = stop
        self._after_start = after_start
        self.server: embedded.EmbeddedServer | None = None

    def launch(self) -> int:
        # The clients know this port: a restart must come back on it.
        self.server = self._launch(self.server.port if self.server else None)
        return self.server.process.pid

    def exit_code(self) -> int | None:
        return None if self.server is None else self.server.process.poll()

    def is_up(self) -> bool:
        if self.server is None or not self.server.answers():
            return False
        if self._after_start is not None:
            self._after_start(self.server)
        return True

    def reap(self) -> None:
        if self.server is not None:
            self.server.kill_group(timeout=REAP_WAIT)

    def remains(self) -> bool:
        if self.server is None:
            return False
        return self.server.process.poll() is None or bool(embedded.group_members(self.server.process.pid))

    def last_lines(self) -> str:
        return "" if self.server is None else log_tail(self.server.log_path, 15)

    def stop(self) -> None:
        if self.server is not None:
            self._stop(self.server)


class State(Enum):
    STARTING = "starting"
    UP = "up"
    WAITING = "waiting"
    REAPING = "reaping"  # the old process (group) has not gone yet


@dataclass
class _Watch:
    unit: Unit
    state: State = State.STARTING
    pid: int = 0
    since: float = 0.0  # when the state began
    died_at: float = 0.0
    next_check: float = 0.0
    reaped_at: float = 0.0  # the last reap, while REAPING
    backoff: Backoff = field(default_factory=Backoff)


def describe_exit(code: int) -> str:
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code}"


class Supervisor:
    """Restarts the units it watches; call `poll()` often (every 0.1 s) from the main thread."""

    def __init__(self, say: Callable[[str], None], clock: Callable[[], float] = time.monotonic) -> None:
        self._say = say
        self._clock = clock
        self._watches: dict[str, _Watch] = {}

    def watch(self, unit: Unit, pid: int) -> None:
        """Supervises ``unit``, already started and up, from now on."""
        now = self._clock()
        self._watches[unit.name] = _Watch(unit, State.UP, pid, since=now)

    def state(self, name: str) -> State:
        return self._watches[name].state

    def poll(self) -> None:
        for watch in self._watches.values():
            self._step(watch)

    def _step(self, watch: _Watch) -> None:
        unit, now = watch.unit, self._clock()
        if watch.state is State.WAITING:
            if now >= watch.since:
                self._launch(watch, now)
            return
        if watch.state is State.REAPING:
            self._launch(watch, now)
            return
        code = unit.exit_code()
        if code is not None:
            self._died(watch, code, now)
            return
        if watch.state is State.STARTING and now >= watch.next_check:
            if unit.is_up():
                watch.state = State.UP
                self._say(
                    f"{unit.name} (pid {watch.pid}) is up again, {self._clock() - watch.died_at:.1f}s after it stopped"
                )
            elif now - watch.since > unit.start_timeout:
                self._say(f"{unit.name} (pid {watch.pid}) did not answer within {unit.start_timeout:.0f}s; killing it")
                unit.reap()
                self._schedule(watch, now)
            else:
                watch.next_check = now + CHECK_EVERY

    def _died(self, watch: _Watch, code: int, now: float) -> None:
        unit = watch.unit
        tail = unit.last_lines()
        unit.reap()
        if code == CONFIG_ERROR_EXIT:
            raise ConfigurationError(
                f"{unit.name} exited with code 2 (configuration error); last lines of its log:\n{tail}"
            )
        if watch.state is State.UP:
            watch.died_at = now
        self._say(f"{unit.name} (pid {watch.pid}) {describe_exit(code)}")
        if code > 0 and tail:
            print(tail, flush=True)
        self._schedule(watch, now)

    def _schedule(self, watch: _Watch, now: float) -> None:
        delay = watch.backoff.crash(now)
        crashes = watch.backoff.recent()
        if delay:
            self._say(
                f"{watch.unit.name} crashed {crashes} times in {CRASH_WINDOW:.0f}s: restarting in {delay:.0f}s"
            )
            watch.state, watch.since = State.WAITING, now + delay
        else:
            self._launch(watch, now)

    def _launch(self, watch: _Watch, now: float) -> None:
        unit = watch.unit
        if unit.remains():
            # PostgreSQL refuses a data directory its old backends still hold:
            # wait for them between polls, killing them again now and then.
            if watch.state is not State.REAPING:
                self._say(f"{unit.name}: waiting for the old process to exit before restarting")
                watch.state, watch.reaped_at = State.REAPING, now
            elif now - watch.reaped_at >= REAP_PATIENCE:
                self._say(f"{unit.name}: the old process is still there after {REAP_PATIENCE:.0f}s; killing it again")
                unit.reap()
                watch.reaped_at = now
            return
        try:
            watch.pid = unit.launch()
        except (RuntimeError, OSError) as error:
            # Popen's OSError (EMFILE, ENOMEM, a missing interpreter) may pass:
            # a crash like any other, retried with the same backoff.
            self._say(f"{unit.name} could not be restarted: {error}")
            self._schedule(watch, now)
            return
        watch.state, watch.since, watch.next_check = State.STARTING, now, now
        self._say(f"{watch.unit.name} restarted (pid {watch.pid})")
