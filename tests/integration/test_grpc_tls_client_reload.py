"""Clients follow rotated TLS files without a restart (services.common.tls_channel).

A live client (one channel from ``open_channel``, one stub, made once as the
services make theirs) keeps calling while the whole PKI is replaced under it:
new CA, new server certificate, new client certificate, and a server
restarted on the same port with them, so every connection needs a new
handshake. The reloading client carries on; a channel made the way clients
were made before (credentials read once) is refused by the rotated server.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography import x509

from services.common import tls_channel
from services.common.batch_stream import BatchStream
from services.common.channels import Transport, open_channel
from services.common.grpc_server import RunningServer, ServerInterceptor, start_server
from services.common.tls import TlsSettings, channel_credentials
from services.common.tls_channel import ReloadingChannel, generation_of
from tests.integration.test_grpc_tls import PEER, Pair, Pki, _expiry, _register, raw_unary

CHECK = 0.05


class Files:
    """A service's TLS files at fixed paths, replaced the way a secret mount or cert-manager does (new inodes)."""

    def __init__(self, root: Path) -> None:
        root.mkdir()
        self.ca, self.cert, self.key = root / "ca.pem", root / "tls.crt", root / "tls.key"

    def install(self, pki: Pki, pair: Pair) -> None:
        for target, source in ((self.ca, pki.ca_file), (self.cert, pair.cert), (self.key, pair.key)):
            staged = target.with_suffix(".new")
            staged.write_bytes(source.read_bytes())
            os.replace(staged, target)

    def transport(self, *, client_auth: bool = True) -> Transport:
        return Transport(tls=TlsSettings(
            cert_file=self.cert, key_file=self.key, ca_file=self.ca, client_auth=client_auth,
        ))


async def _start(files: Files, port: int = 0) -> RunningServer:
    """The test's Peer server with ``files``; on ``port`` when given (the one the client dials)."""
    last: Exception | None = None
    for _ in range(50):
        try:
            return await start_server(
                name="t", addr=f"127.0.0.1:{port}", service_names=[], register=_register,
                interceptor=ServerInterceptor({}), transport=files.transport(),
            )
        except RuntimeError as error:  # the previous server's port, not yet released
            last = error
            await asyncio.sleep(0.1)
    raise AssertionError(f"port {port} did not come free: {last}")


async def _peer_code(call: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes]) -> grpc.StatusCode:
    try:
        await call(b"", timeout=3)
    except grpc.aio.AioRpcError as error:
        return error.code()
    return grpc.StatusCode.OK


@pytest.fixture(autouse=True)
def quick_checks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Channels look at their files every CHECK seconds, not every 5 (the production interval)."""
    monkeypatch.setattr(tls_channel, "CHECK_INTERVAL_SECONDS", CHECK)


@pytest.fixture
def rotation(tmp_path: Path) -> tuple[Files, Files, Pki, Pki]:
    before, after = Pki(tmp_path, "before"), Pki(tmp_path, "after")
    server, client = Files(tmp_path / "server"), Files(tmp_path / "client")
    server.install(before, before.issue("localhost", "127.0.0.1"))
    client.install(before, before.issue("gateway"))
    return server, client, before, after


async def test_a_live_client_follows_a_rotated_ca_and_certificate(
    rotation: tuple[Files, Files, Pki, Pki],
) -> None:
    server_files, client_files, _, after = rotation
    running = await _start(server_files)
    port = running.port
    addr = f"127.0.0.1:{port}"
    transport = client_files.transport()
    channel = open_channel(addr, transport)
    assert isinstance(channel, ReloadingChannel)
    peer = raw_unary(channel, PEER)  # made once, like a service's stub
    # The control: credentials read once, as every client channel was made before.
    static_credentials = channel_credentials(transport.tls)
    assert static_credentials is not None
    static = grpc.aio.secure_channel(addr, static_credentials)
    try:
        assert await _peer_code(peer) == grpc.StatusCode.OK
        assert await _peer_code(raw_unary(static, PEER)) == grpc.StatusCode.OK

        # Everything replaced: a new CA, the server's and the client's certificates,
        # and the server restarted with them (every connection shakes hands again).
        await running.stop(0)
        server_files.install(after, after.issue("localhost", "127.0.0.1"))
        client_files.install(after, after.issue("gateway"))
        running = await _start(server_files, port)
        await asyncio.sleep(CHECK * 2)
        assert await _peer_code(peer) == grpc.StatusCode.OK
        assert channel.reloads == 1
        # Without the reload the client trusts the old CA and shows the old certificate: refused.
        assert await _peer_code(raw_unary(static, PEER)) == grpc.StatusCode.UNAVAILABLE
    finally:
        await static.close()
        await channel.close()
        await running.stop(0)


async def test_files_that_do_not_load_keep_the_previous_channel(
    rotation: tuple[Files, Files, Pki, Pki],
) -> None:
    server_files, client_files, before, _ = rotation
    running = await _start(server_files)
    channel = open_channel(f"127.0.0.1:{running.port}", client_files.transport())
    assert isinstance(channel, ReloadingChannel)
    peer = raw_unary(channel, PEER)
    try:
        assert await _peer_code(peer) == grpc.StatusCode.OK
        # Half a rotation: a new certificate beside the old key (not its pair).
        stray = before.issue("gateway", days=7)
        staged = client_files.cert.with_suffix(".new")
        staged.write_bytes(stray.cert.read_bytes())
        os.replace(staged, client_files.cert)
        await asyncio.sleep(CHECK * 2)
        assert await _peer_code(peer) == grpc.StatusCode.OK
        assert channel.reloads == 0
        # Its key arrives: now it loads.
        staged = client_files.key.with_suffix(".new")
        staged.write_bytes(stray.key.read_bytes())
        os.replace(staged, client_files.key)
        await asyncio.sleep(CHECK * 2)
        assert await _peer_code(peer) == grpc.StatusCode.OK
        assert channel.reloads == 1
        # The expiry metric follows the certificate now in use (7 days, not 30).
        expires_in = _expiry("certificate") - time.time()
        assert 6 * 86_400 < expires_in <= 7 * 86_400
    finally:
        await channel.close()
        await running.stop(0)


async def test_the_old_channel_drains_then_closes(rotation: tuple[Files, Files, Pki, Pki]) -> None:
    server_files, client_files, before, _ = rotation
    running = await _start(server_files)
    transport = client_files.transport()
    made: list[grpc.aio.Channel] = []

    def make(credentials: grpc.ChannelCredentials) -> grpc.aio.Channel:
        made.append(grpc.aio.secure_channel(f"127.0.0.1:{running.port}", credentials))
        return made[-1]

    channel = ReloadingChannel(transport.tls, make, drain_seconds=0.2)
    peer = raw_unary(channel, PEER)
    try:
        assert await _peer_code(peer) == grpc.StatusCode.OK
        client_files.install(before, before.issue("gateway", days=60))
        await asyncio.sleep(CHECK * 2)
        assert await _peer_code(peer) == grpc.StatusCode.OK
        assert len(made) == 2
        await asyncio.sleep(0.5)
        assert made[0].get_state() == grpc.ChannelConnectivity.SHUTDOWN
        assert made[1].get_state() != grpc.ChannelConnectivity.SHUTDOWN
    finally:
        await channel.close()
        await running.stop(0)
    assert made[1].get_state() == grpc.ChannelConnectivity.SHUTDOWN


ECHO = "/t.Streams/Echo"


def _serial(pem: bytes) -> int:
    return int(x509.load_pem_x509_certificate(pem).serial_number)


async def _echo(requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[bytes]:
    """Answers each message's seq with the serial of the client certificate its connection was made with."""
    serial = _serial(next(iter(context.auth_context()["x509_pem_cert"])))
    async for seq in requests:
        yield b"%d %d" % (int(seq), serial)


def _register_echo(server: grpc.aio.Server) -> None:
    _register(server)
    server.add_generic_rpc_handlers((
        grpc.method_handlers_generic_handler("t.Streams", {"Echo": grpc.stream_stream_rpc_method_handler(_echo)}),
    ))


class _Answer:
    def __init__(self, data: bytes) -> None:
        seq, serial = data.split()
        self.seq, self.serial = int(seq), int(serial)


async def _no_unary(batch: object, timeout: float) -> int:
    raise AssertionError("the echo server has the stream method")


async def test_a_batch_stream_moves_to_the_new_channel_at_its_next_batch(
    rotation: tuple[Files, Files, Pki, Pki],
) -> None:
    """A stream does not make calls: it asks the channel's generation, so a rotated client certificate shows at once."""
    server_files, client_files, before, _ = rotation
    running = await start_server(
        name="t", addr="127.0.0.1:0", service_names=[], register=_register_echo,
        interceptor=ServerInterceptor({}), transport=server_files.transport(),
    )
    channel = open_channel(f"127.0.0.1:{running.port}", client_files.transport())
    echo: Any = channel.stream_stream(
        ECHO, request_serializer=lambda message: b"%d" % message[0], response_deserializer=_Answer
    )

    def stream(generation: Any) -> BatchStream[str, int]:
        return BatchStream(
            lambda: echo(), lambda seq, batch, timeout_ms: (seq, batch), lambda answer: int(answer.serial),
            _no_unary, name="echo", channel_generation=generation,
        )

    following, control = stream(generation_of(channel)), stream(None)
    try:
        first = _serial(client_files.cert.read_bytes())
        assert await following.send("a", 3) == first
        assert await control.send("a", 3) == first
        client_files.install(before, before.issue("gateway", days=7))
        await asyncio.sleep(CHECK * 2)
        renewed = _serial(client_files.cert.read_bytes())
        assert await following.send("b", 3) == renewed
        # Without the generation a stream stays on the old channel until its max age (30 s).
        assert await control.send("b", 3) == first
    finally:
        await following.close(1)
        await control.close(1)
        await channel.close()
        await running.stop(0)
