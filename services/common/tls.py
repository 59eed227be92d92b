"""TLS for every gRPC hop: settings, credentials, reload without restart, expiry metric.

Off unless set: ``make run`` stays plaintext on loopback. With
``ASCRIBE_TLS_CA`` (the CA clients verify servers with, and servers verify
client certificates with under mutual TLS), servers present
``ASCRIBE_TLS_CERT`` / ``ASCRIBE_TLS_KEY``; with ``ASCRIBE_TLS_CLIENT_AUTH=1``
they require a client certificate signed by that CA, and clients present the
same pair (one certificate per service, for both directions, as service
meshes issue them).

Servers reread the files when they change (a renewed certificate, a new CA
bundle), checked at each new connection, so a rotation needs no restart;
connections already open keep the certificate they were made with. A pair
that does not load (a key that is not the certificate's, a file still being
written) is refused with a log line and the previous pair stays in use.
Clients follow their files the same way (services.common.tls_channel).
"""

from __future__ import annotations

import logging
import os
import ssl
import threading
from dataclasses import dataclass
from pathlib import Path

import grpc
from cryptography import x509
from prometheus_client import Gauge

from services.common.env import ConfigError, env_bool, env_optional

logger = logging.getLogger(__name__)

CERT_EXPIRY = Gauge(
    "ascribe_tls_certificate_expiration_timestamp_seconds",
    "When the TLS certificate in use expires (the earliest of a bundle), as a Unix time",
    ["certificate"],
)
CERT_LOADED = Gauge(
    "ascribe_tls_certificate_loaded_timestamp_seconds",
    "When the server's TLS certificate files were last (re)loaded, as a Unix time",
)


@dataclass(frozen=True)
class TlsSettings:
    cert_file: Path | None = None
    key_file: Path | None = None
    ca_file: Path | None = None
    client_auth: bool = False
    # The name clients check in servers' certificates, when the addresses
    # they dial are not in them (an IP address, a name behind a proxy).
    server_name: str | None = None

    @property
    def enabled(self) -> bool:
        return self.ca_file is not None

    @classmethod
    def from_env(cls, *, serves: bool) -> TlsSettings:
        cert, key, ca = (
            _path(name) for name in ("ASCRIBE_TLS_CERT", "ASCRIBE_TLS_KEY", "ASCRIBE_TLS_CA")
        )
        client_auth = env_bool("ASCRIBE_TLS_CLIENT_AUTH", cls.client_auth)
        server_name = env_optional("ASCRIBE_TLS_SERVER_NAME")
        if ca is None:
            if cert or key or client_auth or server_name:
                raise ConfigError("TLS settings are set but ASCRIBE_TLS_CA is not (clients verify servers with it)")
            return cls()
        if (cert is None) != (key is None):
            raise ConfigError("ASCRIBE_TLS_CERT and ASCRIBE_TLS_KEY go together")
        if cert is None and (serves or client_auth):
            why = "a server presents it" if serves else "ASCRIBE_TLS_CLIENT_AUTH=1: clients present it"
            raise ConfigError(f"ASCRIBE_TLS_CERT and ASCRIBE_TLS_KEY are needed: {why}")
        settings = cls(cert, key, ca, client_auth, server_name)
        try:
            _check_pair(settings)
            _read(ca)
        except (OSError, ValueError, ssl.SSLError) as error:
            raise ConfigError(f"TLS files: {error}") from None
        return settings


def _path(name: str) -> Path | None:
    value = env_optional(name)
    return Path(value) if value else None


def _read(path: Path) -> bytes:
    return path.read_bytes()


def _check_pair(settings: TlsSettings) -> None:
    """Raises when the key is not the certificate's (or either does not parse)."""
    if settings.cert_file is not None and settings.key_file is not None:
        ssl.create_default_context().load_cert_chain(settings.cert_file, settings.key_file)


def publish_expiry(label: str, pem: bytes) -> None:
    """Sets the expiry gauge from a PEM certificate or bundle (its earliest certificate)."""
    certificates = x509.load_pem_x509_certificates(pem)
    earliest = min(certificate.not_valid_after_utc for certificate in certificates)
    CERT_EXPIRY.labels(label).set(earliest.timestamp())


def channel_credentials(settings: TlsSettings) -> grpc.ChannelCredentials | None:
    """A client's credentials; None without TLS. Read now: ReloadingChannel calls it again after a rotation."""
    if not settings.enabled:
        return None
    assert settings.ca_file is not None
    ca = _read(settings.ca_file)
    publish_expiry("ca", ca)
    key = chain = None
    if settings.cert_file is not None and settings.key_file is not None:
        chain = _read(settings.cert_file)
        key = _read(settings.key_file)
        publish_expiry("certificate", chain)
    return grpc.ssl_channel_credentials(root_certificates=ca, private_key=key, certificate_chain=chain)


class ServerCertificates:
    """A server's TLS credentials that follow the files on disk."""

    def __init__(self, settings: TlsSettings) -> None:
        if settings.cert_file is None or settings.key_file is None or settings.ca_file is None:
            raise ValueError("a TLS server needs a certificate, its key and a CA")
        self._settings = settings
        self._files = (settings.cert_file, settings.key_file, settings.ca_file)
        # gRPC calls the fetcher from its own threads, one per handshake.
        self._lock = threading.Lock()
        self._stamp = self._file_stamp()
        self._initial = self._load()
        self._refused_stamp: tuple[tuple[int, int, int], ...] | None = None

    def credentials(self) -> grpc.ServerCredentials:
        return grpc.dynamic_ssl_server_credentials(
            self._initial,
            # grpc documents None as "keep the current one"; its stubs omit it.
            self._fetch,  # type: ignore[arg-type]
            require_client_authentication=self._settings.client_auth,
        )

    def _file_stamp(self) -> tuple[tuple[int, int, int], ...]:
        stamps = []
        for path in self._files:
            try:
                stat = os.stat(path)  # follows symlinks: Kubernetes swaps a secret's link
                stamps.append((stat.st_ino, stat.st_mtime_ns, stat.st_size))
            except OSError:
                stamps.append((0, 0, 0))
        return tuple(stamps)

    def _load(self) -> grpc.ServerCertificateConfiguration:
        cert_file, key_file, ca_file = self._files
        _check_pair(self._settings)
        chain, key, ca = _read(cert_file), _read(key_file), _read(ca_file)
        publish_expiry("certificate", chain)
        publish_expiry("ca", ca)
        CERT_LOADED.set_to_current_time()
        return grpc.ssl_server_certificate_configuration([(key, chain)], root_certificates=ca)

    def _fetch(self) -> grpc.ServerCertificateConfiguration | None:
        """Called by gRPC before each handshake: a new configuration when the files changed, else None."""
        stamp = self._file_stamp()
        if stamp == self._stamp:
            return None
        with self._lock:
            if stamp == self._stamp or stamp == self._refused_stamp:
                return None
            try:
                config = self._load()
            except (OSError, ValueError, ssl.SSLError) as error:
                # Logged once per state of the files, not once per connection.
                self._refused_stamp = stamp
                logger.warning("TLS files changed but do not load (%s); keeping the previous certificate", error)
                return None
            self._stamp = stamp
            self._refused_stamp = None
            logger.info("TLS certificate reloaded from %s", self._files[0])
            return config
