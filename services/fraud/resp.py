"""A minimal asyncio RESP2 client for the check pipeline's hot path.

redis-py's asyncio client costs ~150-200 µs of CPU per round trip here
(connection pool, retry wrapper, timeouts via ``asyncio.timeout``, command
packing, a RESP3 parser in Python), several times what the checks themselves
cost. The checks need one thing from Redis: a pipeline of EVALSHA calls,
answered by short bulk strings. This client does that and nothing else
(SCRIPT LOAD, AUTH, SELECT and PING included), on one multiplexed connection:

- every ``execute`` writes its whole pipeline in one ``write`` and waits for
  as many replies; concurrent pipelines share the connection and their
  replies come back in order (Redis answers a connection's commands in
  order), so there is no pool and no lock on the hot path;
- every call is bounded: connecting by ``connect_timeout``, the replies by
  ``timeout``. A timeout closes the connection (its later replies could no
  longer be matched to their requests) and fails every call waiting on it;
- a connection that died under us (a restarted Redis) is replaced, and a
  call that found it dead is tried once more on the new one, like redis-py's
  one retry; a Redis that is down fails at once (connection refused).

Error replies (``-NOSCRIPT ...``) are returned as ``RespError`` values in
their place, like redis-py's ``raise_on_error=False``: the caller decides.
Everything else (redis-py) stays with the rest of the service.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Sequence
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.connection import Connection, UnixDomainSocketConnection

Arg = bytes | str | int
Reply = Any  # bytes | int | None | RespError | list[Reply]

_CRLF = b"\r\n"


class RespError(Exception):
    """An error reply from Redis (``-ERR ...``), returned in its command's place."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    @property
    def code(self) -> str:
        return self.message.split(" ", 1)[0]


class RespConnectionError(ConnectionError):
    """Redis could not be reached, or the connection was lost before the replies came."""


class RespTimeoutError(TimeoutError):
    """Redis did not answer (or accept the connection) in time."""


class _Incomplete(Exception):
    pass


def encode(commands: Sequence[Sequence[Arg]]) -> bytes:
    """Commands as RESP arrays of bulk strings, one buffer for the whole pipeline."""
    out: list[bytes] = []
    append = out.append
    for args in commands:
        append(b"*%d\r\n" % len(args))
        for arg in args:
            if isinstance(arg, str):
                data = arg.encode()
            elif isinstance(arg, bytes):
                data = arg
            else:
                data = b"%d" % arg
            append(b"$%d\r\n" % len(data))
            append(data)
            append(_CRLF)
    return b"".join(out)


def _parse(buf: bytearray, pos: int) -> tuple[Reply, int]:
    """One reply at ``pos``: (reply, position after it); ``_Incomplete`` when more bytes are needed."""
    end = buf.find(_CRLF, pos)
    if end < 0:
        raise _Incomplete
    kind = buf[pos]
    if kind == 36:  # '$' bulk string
        size = int(buf[pos + 1 : end])
        if size < 0:
            return None, end + 2
        start = end + 2
        stop = start + size
        if len(buf) < stop + 2:
            raise _Incomplete
        return bytes(buf[start:stop]), stop + 2
    if kind == 43:  # '+' simple string
        return bytes(buf[pos + 1 : end]), end + 2
    if kind == 58:  # ':' integer
        return int(buf[pos + 1 : end]), end + 2
    if kind == 45:  # '-' error
        return RespError(buf[pos + 1 : end].decode("utf-8", "replace")), end + 2
    if kind == 42:  # '*' array
        count = int(buf[pos + 1 : end])
        if count < 0:
            return None, end + 2
        items: list[Reply] = []
        at = end + 2
        for _ in range(count):
            item, at = _parse(buf, at)
            items.append(item)
        return items, at
    raise RespConnectionError(f"unexpected byte {kind!r} in a Redis reply")


class _Waiter:
    __slots__ = ("future", "remaining", "replies", "timer")

    def __init__(self, future: asyncio.Future[list[Reply]], count: int) -> None:
        self.future = future
        self.remaining = count
        self.replies: list[Reply] = []
        self.timer: asyncio.TimerHandle | None = None


class _Protocol(asyncio.Protocol):
    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self._buffer = bytearray()
        self._waiters: deque[_Waiter] = deque()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's transports are not subclasses

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(RespConnectionError(f"connection to Redis lost: {exc or 'closed by the server'}"))

    def eof_received(self) -> bool | None:
        self._fail(RespConnectionError("connection to Redis closed by the server"))
        return None

    def _fail(self, error: Exception) -> None:
        self.closed = True
        waiters, self._waiters = self._waiters, deque()
        for waiter in waiters:
            if waiter.timer is not None:
                waiter.timer.cancel()
            if not waiter.future.done():
                waiter.future.set_exception(error)
        if self.transport is not None:
            self.transport.abort()

    def data_received(self, data: bytes) -> None:
        buf = self._buffer
        buf += data
        waiters = self._waiters
        pos = 0
        size = len(buf)
        try:
            while pos < size and waiters:
                try:
                    reply, pos_after = _parse(buf, pos)
                except _Incomplete:
                    break
                pos = pos_after
                waiter = waiters[0]
                waiter.replies.append(reply)
                waiter.remaining -= 1
                if waiter.remaining == 0:
                    waiters.popleft()
                    if waiter.timer is not None:
                        waiter.timer.cancel()
                    if not waiter.future.done():
                        waiter.future.set_result(waiter.replies)
        except (RespConnectionError, ValueError) as error:
            self._fail(RespConnectionError(f"bad reply from Redis: {error}"))
            return
        if pos:
            del buf[:pos]
        if buf and not waiters:
            self._fail(RespConnectionError("Redis sent a reply nobody asked for"))

    def request(self, payload: bytes, count: int, timeout: float) -> asyncio.Future[list[Reply]]:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[list[Reply]] = loop.create_future()
        if self.closed or self.transport is None:
            future.set_exception(RespConnectionError("connection to Redis is closed"))
            return future
        waiter = _Waiter(future, count)
        waiter.timer = loop.call_later(timeout, self._timed_out, waiter, timeout)
        self._waiters.append(waiter)
        self.transport.write(payload)
        return future

    def _timed_out(self, waiter: _Waiter, timeout: float) -> None:
        waiter.timer = None
        if not waiter.future.done():
            waiter.future.set_exception(RespTimeoutError(f"no answer from Redis in {timeout * 1000:.0f} ms"))
        # The replies still due on this connection can no longer be matched.
        # The pipelines behind this one were written and may still run, so
        # they fail as timeouts too: a connection error would be retried by
        # ``execute`` and their counters would count twice.
        self._fail(RespTimeoutError("connection to Redis closed after another pipeline timed out"))


class RespClient:
    """One multiplexed connection to Redis, (re)opened on demand; see the module docstring."""

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 6379,
        path: str | None = None,
        db: int = 0,
        username: str | None = None,
        password: str | None = None,
        timeout: float = 0.25,
        connect_timeout: float = 0.25,
    ) -> None:
        self._host = host
        self._port = port
        self._path = path
        self._timeout = timeout
        self._connect_timeout = connect_timeout
        setup: list[list[Arg]] = []
        if password is not None:
            setup.append(["AUTH", username, password] if username else ["AUTH", password])
        if db:
            setup.append(["SELECT", db])
        self._setup = setup
        self._protocol: _Protocol | None = None
        self._lock = asyncio.Lock()

    @classmethod
    def like(cls, client: aioredis.Redis) -> RespClient | None:
        """A client for the server, database, credentials and timeouts of a redis-py client.

        None for what this client does not speak (TLS, custom connection
        classes): the caller keeps using redis-py there.
        """
        pool = client.connection_pool
        kwargs: dict[str, Any] = dict(pool.connection_kwargs)
        timeout = kwargs.get("socket_timeout") or 0.25
        connect_timeout = kwargs.get("socket_connect_timeout") or timeout
        common: dict[str, Any] = {
            "db": int(kwargs.get("db") or 0),
            "username": kwargs.get("username"),
            "password": kwargs.get("password"),
            "timeout": float(timeout),
            "connect_timeout": float(connect_timeout),
        }
        if pool.connection_class is Connection:
            return cls(host=str(kwargs.get("host", "localhost")), port=int(kwargs.get("port", 6379)), **common)
        if pool.connection_class is UnixDomainSocketConnection:
            return cls(path=str(kwargs["path"]), **common)
        return None

    async def _connect(self) -> _Protocol:
        loop = asyncio.get_running_loop()
        try:
            if self._path is not None:
                connecting = loop.create_unix_connection(_Protocol, self._path)
            else:
                connecting = loop.create_connection(_Protocol, self._host, self._port)
            _, protocol = await asyncio.wait_for(connecting, self._connect_timeout)
        except TimeoutError as error:
            raise RespTimeoutError(
                f"no connection to Redis in {self._connect_timeout * 1000:.0f} ms"
            ) from error
        except OSError as error:
            raise RespConnectionError(f"cannot connect to Redis: {error}") from error
        if self._setup:
            replies = await protocol.request(encode(self._setup), len(self._setup), self._timeout)
            for reply in replies:
                if isinstance(reply, RespError):
                    protocol._fail(RespConnectionError("closed"))
                    raise RespConnectionError(f"Redis refused the connection set-up: {reply.message}")
        return protocol

    async def _connection(self) -> tuple[_Protocol, bool]:
        """The open connection, and whether it was opened just now."""
        protocol = self._protocol
        if protocol is not None and not protocol.closed:
            return protocol, False
        async with self._lock:
            protocol = self._protocol
            if protocol is not None and not protocol.closed:
                return protocol, False
            protocol = await self._connect()
            self._protocol = protocol
            return protocol, True

    async def execute(self, commands: Sequence[Sequence[Arg]]) -> list[Reply]:
        """Runs ``commands`` as one pipeline (one write, one round trip); one reply per command."""
        if not commands:
            return []
        payload = encode(commands)
        protocol, fresh = await self._connection()
        try:
            return await protocol.request(payload, len(commands), self._timeout)
        except RespConnectionError:
            if fresh:
                raise
        # The connection had died while idle in a way we had not seen yet (a
        # restarted Redis): once more, on a new one.
        protocol, _ = await self._connection()
        return await protocol.request(payload, len(commands), self._timeout)

    async def aclose(self) -> None:
        protocol, self._protocol = self._protocol, None
        if protocol is not None and not protocol.closed:
            protocol._fail(RespConnectionError("client closed"))
