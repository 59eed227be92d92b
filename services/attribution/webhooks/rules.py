"""Webhook rules, pure: validation, URL templates, signatures, payloads, retries, SSRF.

Everything here is plain functions over plain values so it is tested without
I/O (tests/unit/test_webhook_rules.py); the store and the worker call them.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import json
import random
import re
import string
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from email.utils import parsedate_to_datetime
from urllib.parse import quote, urlencode, urlsplit

from ascribe.attribution.v1 import attribution_pb2 as pb

from services.common import limits
from services.common.enum_words import EnumWords
from services.common.errors import Violations

KIND_WORDS = EnumWords(pb.WebhookKind, "WEBHOOK_KIND_")
STATE_WORDS = EnumWords(pb.DeliveryState, "DELIVERY_STATE_")

CONVERSION_EVENTS = (
    "conversion.pending",
    "conversion.approved",
    "conversion.flagged",
    "conversion.rejected",
    "conversion.reversed",
    "conversion.refunded",
)
# The fraud service's alert kinds by enum name, so a kind this build's stubs
# do not know yet (ALERT_KIND_CODE_GUESSING while it lands) needs no code:
# one line here per kind.
ALERT_EVENTS_BY_KIND_NAME = {
    "ALERT_KIND_CODE_LEAK": "alert.code_leak",
    "ALERT_KIND_CODE_SPIKE": "alert.code_spike",
    "ALERT_KIND_AFFILIATE_BURST": "alert.affiliate_burst",
    "ALERT_KIND_RULE_SURGE": "alert.rule_surge",
    "ALERT_KIND_CODE_GUESSING": "alert.code_guessing",
}
COUPON_EVENTS = ("coupon.held", "coupon.exhausted")
EVENTS = frozenset((*CONVERSION_EVENTS, *ALERT_EVENTS_BY_KIND_NAME.values(), *COUPON_EVENTS))
# TestWebhook's event: sent to any webhook, whatever it subscribed to.
TEST_EVENT = "test"

METHODS = ("GET", "POST")
SECRET_MIN_CHARS = 32
SECRET_OVERLAP = timedelta(hours=24)
# Every webhook fails for this long before it is disabled.
DISABLE_AFTER = timedelta(days=3)
RETENTION = timedelta(days=30)
REQUEST_TIMEOUT_SECONDS = 5.0
RESPONSE_CAP_BYTES = 64 * 1024
SIGNATURE_HEADER = "X-Ascribe-Signature"
DELIVERY_HEADER = "X-Ascribe-Delivery"

URL_MAX_BYTES = limits.max_bytes(pb.Webhook.DESCRIPTOR, "url")
DESCRIPTION_MAX_BYTES = limits.max_bytes(pb.Webhook.DESCRIPTOR, "description")
EVENTS_MAX_ITEMS = limits.max_items(pb.Webhook.DESCRIPTOR, "events")

# click_id is ascribe's; aff_click_id the partner's own (the link's aff_click_id).
MACROS = (
    "click_id", "aff_click_id", "sub1", "sub2", "sub3", "sub4", "sub5", "order_id", "conversion_id",
    "amount", "payout", "currency", "status", "coupon", "event",
)
# Values that exercise the encoding: a template that only parses with tame
# values would break on a real sub id.
SAMPLE_MACROS: dict[str, str] = {name: "a b&c/ü?#=%" for name in MACROS}
UPDATE_MUTABLE_FIELDS = frozenset(("url", "http_method", "events", "description", "enabled", "affiliate_id"))


# ------------------------------------------------------------ validation


def default_method(kind: int) -> str:
    return "POST" if kind == pb.WEBHOOK_KIND_EVENTS else "GET"


def render_url(template: str, values: Mapping[str, str]) -> str:
    """Substitutes ``{macro}``s, each percent-encoded as UTF-8 with no safe characters.

    Unknown names raise KeyError (validation refuses them first); ``{{`` and
    ``}}`` are literal braces, as in str.format.
    """
    out: list[str] = []
    for literal, name, spec, conversion in string.Formatter().parse(template):
        out.append(literal)
        if name is None:
            continue
        if spec or conversion or name not in MACROS:
            raise KeyError(name)
        out.append(quote(values.get(name, ""), safe=""))
    return "".join(out)


def postback_form(values: Mapping[str, str]) -> bytes:
    """A POST postback's body: every macro as a form field."""
    return urlencode([(name, values.get(name, "")) for name in MACROS]).encode("ascii")


def check_url(url: str, field: str, violations: Violations) -> str | None:
    """The host of an http(s) URL, or None with a violation recorded."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as error:
        violations.add(field, f"not a valid URL ({error})")
        return None
    if parts.scheme not in ("http", "https"):
        violations.add(field, "must be an http or https URL")
        return None
    if not parts.hostname:
        violations.add(field, "must name a host")
        return None
    if parts.username or parts.password:
        violations.add(field, "must not carry credentials")
        return None
    if port == 0:
        violations.add(field, "port 0 is not a port")
        return None
    return parts.hostname


def _macro_in_destination(template: str) -> bool:
    scheme, sep, rest = template.partition("://")
    authority = re.split(r"[/?#]", rest, maxsplit=1)[0] if sep else template
    return "{" in scheme or "}" in scheme or "{" in authority or "}" in authority


def validate_webhook(webhook: pb.Webhook, *, creating: bool) -> str:
    """Checks a webhook as it would be stored; answers the URL's host (for the address check)."""
    v = Violations()
    if webhook.kind not in KIND_WORDS.words:
        v.add("webhook.kind", "must be WEBHOOK_KIND_PARTNER_POSTBACK or WEBHOOK_KIND_EVENTS")
    for name, value in (("campaign_id", webhook.campaign_id), ("affiliate_id", webhook.affiliate_id)):
        if len(value.encode()) > limits.CAMPAIGN_ID:
            v.add(f"webhook.{name}", f"at most {limits.CAMPAIGN_ID} bytes")
    if webhook.kind == pb.WEBHOOK_KIND_PARTNER_POSTBACK and not webhook.campaign_id:
        v.add("webhook.campaign_id", "a partner postback belongs to a campaign")
    host: str | None = None
    if not webhook.url:
        v.add("webhook.url", "required")
    elif len(webhook.url.encode()) > URL_MAX_BYTES:
        v.add("webhook.url", f"at most {URL_MAX_BYTES} bytes")
    elif any(ord(ch) < 0x21 or ord(ch) == 0x7F for ch in webhook.url):
        v.add("webhook.url", "must not contain spaces or control characters")
    elif webhook.kind == pb.WEBHOOK_KIND_PARTNER_POSTBACK and _macro_in_destination(webhook.url):
        # The event's values must never choose where the request goes.
        v.add("webhook.url", "macros may appear in the path and query only, not in the scheme, host or port")
    elif webhook.kind == pb.WEBHOOK_KIND_PARTNER_POSTBACK:
        try:
            rendered = render_url(webhook.url, SAMPLE_MACROS)
        except (KeyError, ValueError) as error:
            v.add("webhook.url", f"unknown or malformed macro {error}; macros are " + ", ".join(
                "{" + m + "}" for m in MACROS))
        else:
            host = check_url(rendered, "webhook.url", v)
    else:
        if "{" in webhook.url or "}" in webhook.url:
            v.add("webhook.url", "macros are for partner postbacks; an events URL is sent as it is")
        else:
            host = check_url(webhook.url, "webhook.url", v)
    if webhook.http_method and webhook.http_method not in METHODS:
        v.add("webhook.http_method", 'must be "GET" or "POST"')
    if not webhook.events:
        v.add("webhook.events", "at least one event")
    elif len(webhook.events) > EVENTS_MAX_ITEMS:
        v.add("webhook.events", f"at most {EVENTS_MAX_ITEMS} events")
    for i, event in enumerate(webhook.events):
        if event not in EVENTS:
            v.add(f"webhook.events[{i}]", f"unknown event {event!r}; one of " + ", ".join(sorted(EVENTS)))
        elif webhook.kind == pb.WEBHOOK_KIND_PARTNER_POSTBACK and event not in CONVERSION_EVENTS:
            v.add(f"webhook.events[{i}]", "a partner postback reports conversions only")
    if creating and webhook.secret and len(webhook.secret) < SECRET_MIN_CHARS:
        v.add("webhook.secret", f"at least {SECRET_MIN_CHARS} characters (or empty for a generated one)")
    if len(webhook.description.encode()) > DESCRIPTION_MAX_BYTES:
        v.add("webhook.description", f"at most {DESCRIPTION_MAX_BYTES} bytes")
    v.raise_if_any()
    assert host is not None
    return host


# ------------------------------------------------------------ addresses (SSRF)

# Where a webhook may never connect, whatever the name resolves to: the
# service's own host, its network's neighbours, cloud metadata services.
_FORBIDDEN_NETWORKS = tuple(
    ipaddress.ip_network(n)
    for n in (
        "0.0.0.0/8", "10.0.0.0/8", "100.64.0.0/10", "127.0.0.0/8", "169.254.0.0/16", "172.16.0.0/12",
        "192.0.0.0/24", "192.168.0.0/16", "198.18.0.0/15", "224.0.0.0/4", "240.0.0.0/4",
        "::/128", "::1/128", "fc00::/7", "fe80::/10", "ff00::/8", "64:ff9b::/96", "2002::/16",
    )
)


def forbidden_reason(address: str) -> str | None:
    """Why a webhook may not connect to ``address``, or None when it may."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return f"{address!r} is not an IP address"
    if isinstance(ip, ipaddress.IPv6Address):
        # ::ffff:10.0.0.1 and ::10.0.0.1 reach the IPv4 host: judge that one.
        embedded = ip.ipv4_mapped or (
            ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF) if int(ip) >> 32 == 0 and int(ip) > 1 else None
        )
        if embedded is not None:
            inner = forbidden_reason(str(embedded))
            return f"{address} maps to {embedded}: {inner}" if inner else None
    if ip == ipaddress.ip_address("169.254.169.254"):
        return f"{address} is a cloud metadata address"
    for network in _FORBIDDEN_NETWORKS:
        if ip.version == network.version and ip in network:
            return f"{address} is in {network} (loopback, private, CGNAT, link-local or reserved)"
    if not ip.is_global:
        return f"{address} is not a public address"
    return None


def refused_addresses(addresses: Iterable[str]) -> str | None:
    """The first reason any of ``addresses`` is refused (one bad answer refuses the name)."""
    for address in addresses:
        reason = forbidden_reason(address)
        if reason:
            return reason
    return None


# ------------------------------------------------------------ payloads


def money(micros: int) -> str:
    """49_900_000 -> "49.90" (the gateway's JSON spells money the same way)."""
    sign = "-" if micros < 0 else ""
    units, fraction = divmod(abs(micros), 1_000_000)
    digits = f"{fraction:06d}".rstrip("0").ljust(2, "0")
    return f"{sign}{units}.{digits}"


def rfc3339(at: datetime) -> str:
    return at.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def macro_values(event: str, obj: Mapping[str, object]) -> dict[str, str]:
    """The postback macros of a conversion event's object."""
    values = {name: str(obj.get(name) or "") for name in MACROS}
    values["event"] = event
    values["conversion_id"] = str(obj.get("id") or "")
    values["coupon"] = str(obj.get("coupon_code") or "")
    amount = obj.get("refunded") if event == "conversion.refunded" else obj.get("amount")
    values["amount"] = str(amount or "")
    return values


def event_text(event: str, obj: Mapping[str, object]) -> str:
    """One line that reads well in a Slack-compatible incoming webhook as it is."""
    if event.startswith("conversion."):
        verb = event.split(".", 1)[1]
        detail = f"{obj.get('amount')} {obj.get('currency')}"
        if event == "conversion.refunded":
            detail = f"{obj.get('refunded')} {obj.get('currency')} refunded"
        who = f" for affiliate {obj['affiliate_id']}" if obj.get("affiliate_id") else ""
        return (f"ascribe: conversion {verb}: order {obj.get('order_id')} of campaign "
                f"{obj.get('campaign_id')}, {detail}{who}")
    if event.startswith("alert."):
        return (f":rotating_light: ascribe alert {event.split('.', 1)[1]}: campaign {obj.get('campaign_id')}"
                f" code {obj.get('coupon_code') or '-'}: {obj.get('detail') or ''}").rstrip(": ")
    if event.startswith("coupon."):
        return f"ascribe: code {obj.get('coupon_code')} of campaign {obj.get('campaign_id')} {event.split('.', 1)[1]}"
    return "ascribe: test event: this webhook works"


def event_body(event_id: str, event: str, at: datetime, obj: Mapping[str, object]) -> bytes:
    """The signed JSON of an event: compact, keys in a fixed order (the bytes are what is signed)."""
    document = {"id": event_id, "type": event, "created": rfc3339(at), "data": {"object": dict(obj)},
                "text": event_text(event, obj)}
    return json.dumps(document, separators=(",", ":"), ensure_ascii=False).encode()


def sign(secrets: Sequence[str], timestamp: int, body: bytes) -> str:
    """``t=<unix seconds>,v1=<hex HMAC-SHA256 of "<t>." + body>``, one v1 per live secret."""
    signed = str(timestamp).encode() + b"." + body
    parts = [f"t={timestamp}"]
    parts += [f"v1={hmac.new(s.encode(), signed, hashlib.sha256).hexdigest()}" for s in secrets]
    return ",".join(parts)


# ------------------------------------------------------------ retries


# 10 s, 30 s, 2 min, 10 min, 30 min, 1 h, 2 h, then every 4 h up to 24 h.
DEFAULT_SCHEDULE_SECONDS: tuple[float, ...] = (10.0, 30.0, 120.0, 600.0, 1800.0, 3600.0, 7200.0,
                            14400.0, 14400.0, 14400.0, 14400.0, 14400.0)
JITTER = 0.2


def parse_schedule(text: str) -> tuple[float, ...]:
    """A comma-separated list of positive seconds (ValueError otherwise)."""
    values = tuple(float(part) for part in text.split(",") if part.strip())
    if not values or any(not (v > 0) or v > 86400 * 7 for v in values):
        raise ValueError("a comma-separated list of seconds, each above 0 and at most a week")
    return values


def retry_delay(attempts: int, schedule: Sequence[float], rnd: random.Random | None = None) -> float | None:
    """Seconds before the next try after ``attempts`` failed tries, ±20 %; None: out of tries."""
    if attempts > len(schedule):
        return None
    base = schedule[attempts - 1]
    return base * (1 + (rnd or random).uniform(-JITTER, JITTER))


@dataclass(frozen=True)
class Outcome:
    state: str  # delivered, retry, dead
    error: str = ""
    retry_after: float | None = None


def outcome_of(status: int, retry_after_header: str | None, now: datetime) -> Outcome:
    """What a receiver's status means: 2xx delivered; 408, 429, 5xx retry; any other answer stops."""
    if 200 <= status < 300:
        return Outcome("delivered")
    if status in (408, 429) or 500 <= status < 600:
        return Outcome("retry", f"HTTP {status}", parse_retry_after(retry_after_header, now))
    return Outcome("dead", f"HTTP {status}: the receiver refused it (no retry)")


def parse_retry_after(value: str | None, now: datetime) -> float | None:
    """Retry-After as seconds (a number or an HTTP date); None when absent or unreadable."""
    if not value:
        return None
    value = value.strip()
    if re.fullmatch(r"\d{1,9}", value):
        return float(value)
    try:
        at = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if at.tzinfo is None:
        at = at.replace(tzinfo=UTC)
    return max(0.0, (at - now).total_seconds())


def should_disable(failing_since: datetime | None, now: datetime) -> bool:
    return failing_since is not None and now - failing_since >= DISABLE_AFTER
