"""Reading settings from the environment: fail fast with the variable's name."""

from __future__ import annotations

import ipaddress
import os


class ConfigError(Exception):
    """A setting is missing or malformed; the process must not start."""


def env_str(name: str, default: str) -> str:
    value = os.environ.get(name, "").strip()
    return value or default


def env_optional(name: str) -> str | None:
    value = os.environ.get(name, "").strip()
    return value or None


def env_int(name: str, default: int, *, minimum: int = 0) -> int:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"{name} must be an integer, got {raw!r}") from None
    if value < minimum:
        raise ConfigError(f"{name} must be >= {minimum}, got {value}")
    return value


def env_float(name: str, default: float, *, minimum: float = 0.0) -> float:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(f"{name} must be a number, got {raw!r}") from None
    if value < minimum:
        raise ConfigError(f"{name} must be >= {minimum}, got {value}")
    return value


def env_bool(name: str, default: bool = False) -> bool:
    raw = os.environ.get(name, "").strip().lower()
    if not raw:
        return default
    if raw in {"1", "true", "yes", "on"}:
        return True
    if raw in {"0", "false", "no", "off"}:
        return False
    raise ConfigError(f"{name} must be a boolean (1/0), got {raw!r}")


def split_host_port(addr: str, name: str) -> tuple[str, int]:
    """Splits ``host:port`` (``[v6]:port`` for IPv6)."""
    host, sep, port = addr.rpartition(":")
    if not sep or not port.isdigit():
        raise ConfigError(f"{name} must be host:port, got {addr!r}")
    return host.strip("[]"), int(port)


def health_addr_from_env(name: str) -> str | None:
    """An optional ``host:port`` (a service's plaintext health port)."""
    addr = env_optional(name)
    if addr is not None:
        split_host_port(addr, name)
    return addr


def is_loopback_host(host: str) -> bool:
    if host in {"localhost", "ip6-localhost"}:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def require_token_off_loopback(token: str | None, token_name: str, binds: dict[str, str]) -> None:
    """A listener off loopback without its token would serve anyone: refuse to start."""
    if token:
        return
    exposed = [f"{name}={host}" for name, host in binds.items() if not is_loopback_host(host)]
    if exposed:
        raise ConfigError(
            f"{token_name} is unset but {', '.join(exposed)} is not a loopback address; "
            f"set {token_name} or bind to 127.0.0.1"
        )
