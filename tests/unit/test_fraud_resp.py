"""The minimal RESP client of the check pipeline: encoding, parsing, pipelining, timeouts, reconnects."""

from __future__ import annotations

import asyncio
import time

import pytest

from services.fraud.resp import RespClient, RespConnectionError, RespError, RespTimeoutError, _parse, encode


def test_encode_is_resp_arrays_of_bulk_strings() -> None:
    assert encode([("EVALSHA", b"ab", 1), ("PING",)]) == (
        b"*3\r\n$7\r\nEVALSHA\r\n$2\r\nab\r\n$1\r\n1\r\n*1\r\n$4\r\nPING\r\n"
    )
    assert encode([("SET", "k", "é")]) == b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$2\r\n\xc3\xa9\r\n"


def test_parse_every_reply_type() -> None:
    buf = bytearray(b"+OK\r\n:42\r\n$3\r\na\nb\r\n$-1\r\n-NOSCRIPT No matching script\r\n*2\r\n$1\r\nx\r\n:1\r\n")
    replies = []
    pos = 0
    while pos < len(buf):
        reply, pos = _parse(buf, pos)
        replies.append(reply)
    assert replies[:4] == [b"OK", 42, b"a\nb", None]
    assert isinstance(replies[4], RespError) and replies[4].code == "NOSCRIPT"
    assert replies[5] == [b"x", 1]


class FakeRedis:
    """Answers each command with one canned reply; can be told to go silent."""

    def __init__(self) -> None:
        self.silent = False
        self.connections = 0
        self.received: list[list[bytes]] = []
        self.server: asyncio.Server | None = None

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return int(self.server.sockets[0].getsockname()[1])

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:
                header = await reader.readline()
                if not header:
                    return
                args = []
                for _ in range(int(header[1:])):
                    size = int((await reader.readline())[1:])
                    args.append((await reader.readexactly(size + 2))[:-2])
                self.received.append(args)
                if self.silent:
                    continue
                if args[0] == b"ECHO":
                    writer.write(b"$%d\r\n%s\r\n" % (len(args[1]), args[1]))
                else:
                    writer.write(b"-ERR unknown command\r\n")
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            return
        finally:
            writer.close()

    async def stop(self) -> None:
        assert self.server is not None
        self.server.close()
        await self.server.wait_closed()


async def test_pipelines_share_one_connection_in_order() -> None:
    fake = FakeRedis()
    port = await fake.start()
    client = RespClient(port=port, timeout=1.0, connect_timeout=1.0)
    try:
        results = await asyncio.gather(
            *(client.execute([("ECHO", f"{i}-a"), ("ECHO", f"{i}-b"), ("NOPE",)]) for i in range(50))
        )
        for i, replies in enumerate(results):
            assert replies[:2] == [f"{i}-a".encode(), f"{i}-b".encode()]
            assert isinstance(replies[2], RespError)
        assert fake.connections == 1
    finally:
        await client.aclose()
        await fake.stop()


async def test_a_silent_server_times_out_and_the_next_call_reconnects() -> None:
    fake = FakeRedis()
    port = await fake.start()
    client = RespClient(port=port, timeout=0.2, connect_timeout=0.2)
    try:
        fake.silent = True
        started = time.monotonic()
        with pytest.raises(RespTimeoutError):
            await client.execute([("ECHO", "x")])
        assert time.monotonic() - started < 0.5
        fake.silent = False
        assert await client.execute([("ECHO", "y")]) == [b"y"]
        assert fake.connections == 2
    finally:
        await client.aclose()
        await fake.stop()


async def test_pipelines_behind_a_timed_out_one_are_not_sent_again() -> None:
    """They were written and may run: a retry on a new connection would run them twice."""
    fake = FakeRedis()
    port = await fake.start()
    client = RespClient(port=port, timeout=0.2, connect_timeout=0.2)
    try:
        fake.silent = True
        first = asyncio.ensure_future(client.execute([("ECHO", "first")]))
        await asyncio.sleep(0.05)
        behind = asyncio.ensure_future(client.execute([("ECHO", "behind")]))
        for call in (first, behind):
            with pytest.raises(RespTimeoutError):
                await call
        await asyncio.sleep(0.05)
        assert [args[1] for args in fake.received] == [b"first", b"behind"]
    finally:
        await client.aclose()
        await fake.stop()


async def test_a_server_that_is_gone_fails_at_once() -> None:
    fake = FakeRedis()
    port = await fake.start()
    await fake.stop()
    client = RespClient(port=port, timeout=0.2, connect_timeout=0.2)
    started = time.monotonic()
    with pytest.raises(RespConnectionError):
        await client.execute([("ECHO", "x")])
    assert time.monotonic() - started < 0.2
