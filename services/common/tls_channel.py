"""A client channel under TLS that follows its certificate files: rotation without a restart.

gRPC Python can reload a server's certificates (``dynamic_ssl_server_credentials``,
services.common.tls.ServerCertificates) but has no such hook for channel
credentials: a channel keeps the CA and client certificate it was made with.
So ``ReloadingChannel`` holds one ``grpc.aio.Channel`` at a time and, when the
CA, certificate or key file has changed (looked at on a call at most every
``check_interval`` seconds: a clock read per call, a few ``stat`` calls per
interval), makes a new channel with the new files; calls from then on use it.

The stubs keep the multicallables they were built with at start-up, so those
are proxies that resolve the current channel at each call. A long-lived
stream does not make calls: the batch streams (services.common.batch_stream)
ask ``generation_of(channel)`` before each batch and, when the channel was
made again, half-close their stream and open the next one on the new
channel, so a rotated client certificate is shown at once rather than when
the stream next renews itself. Other long streams (the alert followers'
``WatchAlerts``) stay on the old channel until it closes, and resume from
their cursor on the new one: the old client certificate may be shown there
for up to ``drain_seconds``. The old channel closes after
``drain_seconds``: calls and streams already open on it finish, and what is
still open then is cancelled. Files that do not load (a key that is not the
certificate's, a file half written) are refused with one log line per state
of the files, and the previous channel stays in use.
"""

from __future__ import annotations

import asyncio
import logging
import os
import ssl
import time
from collections.abc import Callable
from typing import Any

import grpc

from services.common.tls import TlsSettings, channel_credentials

logger = logging.getLogger(__name__)

# How often a call looks at the files: rotations are rare, and this bounds the
# cost to a clock read per call.
CHECK_INTERVAL_SECONDS = 5.0
# Long enough for what is open on the old channel (a stream's answers in flight) to finish.
DRAIN_SECONDS = 60.0

FileStamp = tuple[tuple[int, int, int], ...]
ChannelFactory = Callable[[grpc.ChannelCredentials], grpc.aio.Channel]


def file_stamp(settings: TlsSettings) -> FileStamp:
    stamps = []
    for path in (settings.ca_file, settings.cert_file, settings.key_file):
        if path is None:
            continue
        try:
            stat = os.stat(path)  # follows symlinks: Kubernetes swaps a secret's link
            stamps.append((stat.st_ino, stat.st_mtime_ns, stat.st_size))
        except OSError:
            stamps.append((0, 0, 0))
    return tuple(stamps)


class ReloadingChannel(grpc.aio.Channel):
    """A ``grpc.aio.Channel`` made again from ``settings``' files whenever they change."""

    def __init__(
        self,
        settings: TlsSettings,
        make: ChannelFactory,
        *,
        check_interval: float | None = None,
        drain_seconds: float | None = None,
    ) -> None:
        self._settings = settings
        self._make = make
        self._check_interval = CHECK_INTERVAL_SECONDS if check_interval is None else check_interval
        self._drain_seconds = DRAIN_SECONDS if drain_seconds is None else drain_seconds
        self._stamp = file_stamp(settings)
        self._refused_stamp: FileStamp | None = None
        self._channel = make(self._credentials())
        self._next_check = time.monotonic() + self._check_interval
        self._draining: dict[asyncio.Task[None], grpc.aio.Channel] = {}
        self.reloads = 0

    def generation(self) -> int:
        """How many times the channel was made again, the files looked at first (as a call does)."""
        self.current()
        return self.reloads

    def _credentials(self) -> grpc.ChannelCredentials:
        credentials = channel_credentials(self._settings)
        if credentials is None:
            raise ValueError("a ReloadingChannel needs TLS settings (ASCRIBE_TLS_CA)")
        return credentials

    def current(self) -> grpc.aio.Channel:
        """The channel calls go to now, made again first when the files changed."""
        now = time.monotonic()
        if now >= self._next_check:
            self._next_check = now + self._check_interval
            self._maybe_reload()
        return self._channel

    def _maybe_reload(self) -> None:
        stamp = file_stamp(self._settings)
        if stamp == self._stamp or stamp == self._refused_stamp:
            return
        try:
            if self._settings.cert_file is not None and self._settings.key_file is not None:
                ssl.create_default_context().load_cert_chain(self._settings.cert_file, self._settings.key_file)
            credentials = self._credentials()
        except (OSError, ValueError, ssl.SSLError) as error:
            self._refused_stamp = stamp
            logger.warning("client TLS files changed but do not load (%s); keeping the previous channel", error)
            return
        old, self._channel = self._channel, self._make(credentials)
        self._stamp, self._refused_stamp = stamp, None
        self.reloads += 1
        logger.info("client TLS files changed (%s): new channel, the old one drains", self._settings.ca_file)
        task = asyncio.get_running_loop().create_task(old.close(self._drain_seconds))
        self._draining[task] = old
        task.add_done_callback(self._drained)

    def _drained(self, task: asyncio.Task[None]) -> None:
        self._draining.pop(task, None)

    # ---------------------------------------------------------------- calls

    def unary_unary(self, method: str, request_serializer: Any = None, response_deserializer: Any = None,
                    _registered_method: bool | None = False) -> Any:
        return _Proxy(self, "unary_unary", (method, request_serializer, response_deserializer, _registered_method))

    def unary_stream(self, method: str, request_serializer: Any = None, response_deserializer: Any = None,
                     _registered_method: bool | None = False) -> Any:
        return _Proxy(self, "unary_stream", (method, request_serializer, response_deserializer, _registered_method))

    def stream_unary(self, method: str, request_serializer: Any = None, response_deserializer: Any = None,
                     _registered_method: bool | None = False) -> Any:
        return _Proxy(self, "stream_unary", (method, request_serializer, response_deserializer, _registered_method))

    def stream_stream(self, method: str, request_serializer: Any = None, response_deserializer: Any = None,
                      _registered_method: bool | None = False) -> Any:
        return _Proxy(self, "stream_stream", (method, request_serializer, response_deserializer, _registered_method))

    # ---------------------------------------------------------------- the channel's own

    def get_state(self, try_to_connect: bool = False) -> grpc.ChannelConnectivity:
        return self.current().get_state(try_to_connect)

    async def wait_for_state_change(self, last_observed_state: grpc.ChannelConnectivity) -> None:
        await self._channel.wait_for_state_change(last_observed_state)

    async def channel_ready(self) -> None:
        await self.current().channel_ready()

    async def close(self, grace: float | None = None) -> None:
        # Draining channels close with this one: nothing outlives the owner.
        draining = list(self._draining.items())
        for task, _ in draining:
            task.cancel()
        await asyncio.gather(
            self._channel.close(grace), *(old.close(grace) for _, old in draining), return_exceptions=True
        )

    async def __aenter__(self) -> ReloadingChannel:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close(None)


def generation_of(channel: grpc.aio.Channel) -> Callable[[], int] | None:
    """What a stream on ``channel`` asks to know the channel was made again; None when it never is."""
    return channel.generation if isinstance(channel, ReloadingChannel) else None


class _Proxy:
    """A stub's multicallable: the current channel's, resolved at each call."""

    __slots__ = ("_args", "_callable", "_kind", "_made_on", "_owner")

    def __init__(self, owner: ReloadingChannel, kind: str, args: tuple[Any, ...]) -> None:
        self._owner = owner
        self._kind = kind
        self._args = args
        self._made_on: grpc.aio.Channel | None = None
        self._callable: Any = None

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        channel = self._owner.current()
        if channel is not self._made_on:
            self._callable = getattr(channel, self._kind)(*self._args)
            self._made_on = channel
        return self._callable(*args, **kwargs)
