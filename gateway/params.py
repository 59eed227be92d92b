"""Parsing and validating tracking-link and postback parameters (pure, no I/O).

Everything here is syntax: required parameters, sizes, encodings, money,
currency and time formats. Whether a campaign, code or click exists, and what
follows from it, is the attribution service's business.

Field names in errors are the HTTP parameter names the caller sent (``aff_id``,
``amount``), so a 400 points at something the caller can fix.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime, timedelta, timezone
from urllib.parse import unquote_to_bytes

from ascribe.attribution.v1 import attribution_pb2 as pb
from google.protobuf.timestamp_pb2 import Timestamp

from services.common import limits
from services.common.enum_words import EnumWords
from services.common.ip import normalize_ip

Params = dict[str, list[str]]

# Byte limits (UTF-8) of the fields the gateway passes on are the protos'
# (services.common.limits); these bound only what the gateway parses itself.
MONEY_CHARS_MAX = 32
TIME_CHARS_MAX = 40

SUB_FIELDS = ("sub1", "sub2", "sub3", "sub4", "sub5")


class ParamError(Exception):
    """Bad input, answered with 400 (or ``status``) naming ``field``."""

    def __init__(
        self, field: str | None, message: str, *, code: str = "invalid_argument", status: int = 400
    ) -> None:
        super().__init__(message)
        self.field = field
        self.message = message
        self.code = code
        self.status = status


# ---------------------------------------------------------------- decoding

_BAD_PERCENT = re.compile(r"%(?![0-9A-Fa-f]{2})")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
# aiohttp decodes header values as UTF-8 with ``surrogateescape``: a byte that
# is not UTF-8 arrives as a lone surrogate, which no valid text contains.
_SURROGATE = re.compile("[\ud800-\udfff]")


def _decode(component: str, field: str) -> str:
    if "+" in component:
        component = component.replace("+", " ")
    if "%" not in component:
        return component
    if _BAD_PERCENT.search(component):
        raise ParamError(field, f"{field} has malformed percent-encoding")
    try:
        return unquote_to_bytes(component).decode("utf-8")
    except UnicodeError:
        # Decode: the escapes are not UTF-8. Encode: raw bytes that are not
        # UTF-8 beside the escapes (aiohttp hands them over as lone surrogates).
        raise ParamError(field, f"{field} is not valid UTF-8") from None


def _printable_key(raw: str) -> str:
    # A key that cannot be decoded is still named in the error, but never as raw bytes.
    return raw[:64].encode("ascii", "backslashreplace").decode("ascii")


def parse_urlencoded(raw: str, into: Params | None = None) -> Params:
    """Parses ``a=1&b=2`` strictly: bad percent-encoding or UTF-8 is a ParamError.

    (aiohttp's own ``request.query`` silently turns bad UTF-8 into U+FFFD and
    keeps a stray ``%``; a tracking system must not store a mangled value.)
    """
    params: Params = {} if into is None else into
    if not raw:
        return params
    if "%" not in raw and "+" not in raw:
        # The common case (plain tokens and IDs): nothing to decode, so nothing can be malformed.
        for pair in raw.split("&"):
            if not pair:
                continue
            key, _, value = pair.partition("=")
            existing = params.get(key)
            if existing is None:
                params[key] = [value]
            else:
                existing.append(value)
        return params
    for pair in raw.split("&"):
        if not pair:
            continue
        key, _, value = pair.partition("=")
        if not key:
            # "=value": no route reads a nameless parameter, and an error
            # about it could name no field; it is dropped like an empty pair.
            continue
        try:
            name = _decode(key, "")
        except ParamError:
            raise ParamError(
                _printable_key(key), "a parameter name has malformed percent-encoding or is not UTF-8"
            ) from None
        decoded = _decode(value, name)
        existing = params.get(name)
        if existing is None:
            params[name] = [decoded]
        else:
            existing.append(decoded)
    return params


def parse_body(body: bytes, into: Params) -> Params:
    """A form body (``application/x-www-form-urlencoded``), decoded as strictly as the query."""
    try:
        text = body.decode("ascii")
    except UnicodeDecodeError:
        # Form bodies are percent-encoded; raw non-ASCII bytes mean a broken client.
        raise ParamError(None, "form body must be percent-encoded ASCII") from None
    return parse_urlencoded(text, into)


# ---------------------------------------------------------------- field getters


def _byte_len(value: str) -> int:
    return len(value) if value.isascii() else len(value.encode("utf-8"))


def get_one(params: Mapping[str, Sequence[str]], name: str, max_bytes: int, *, required: bool = False) -> str:
    """One value; an empty value counts as absent; repeats must agree."""
    values = params.get(name)
    if not values:
        value = ""
    else:
        value = values[0]
        if len(values) > 1 and any(other != value for other in values[1:]):
            raise ParamError(name, f"{name} is given more than once with different values")
    if not value:
        if required:
            raise ParamError(name, f"{name} is required")
        return ""
    return check_text(name, value, max_bytes)


def check_text(name: str, value: str, max_bytes: int) -> str:
    """The same checks for a value taken from a header."""
    if not value.isascii() and _SURROGATE.search(value):
        raise ParamError(name, f"{name} is not valid UTF-8")
    if _byte_len(value) > max_bytes:
        raise ParamError(name, f"{name} is longer than {max_bytes} bytes")
    if _CONTROL.search(value):
        raise ParamError(name, f"{name} contains control characters")
    return value


def header_text_lenient(value: str, max_bytes: int) -> str:
    """A header the browser, not the visitor, writes (Referer): never worth a click.

    Bytes that are not UTF-8 become U+FFFD, control characters go, and an
    overlong value is cut at a character boundary.
    """
    if not value.isascii():
        value = _SURROGATE.sub("\ufffd", value)
    return _CONTROL.sub("", truncate_utf8(value, max_bytes))


def truncate_utf8(value: str, max_bytes: int) -> str:
    if _byte_len(value) <= max_bytes:
        return value
    return value.encode("utf-8")[:max_bytes].decode("utf-8", "ignore")


# ---------------------------------------------------------------- typed values

_MONEY = re.compile(r"([0-9]{1,12})(?:\.([0-9]{1,6}))?")


def parse_money(value: str, field: str) -> int:
    """A decimal string to micros: ``"49.90"`` -> 49_900_000.

    Plain decimals only: no sign, no exponent, no more than 6 decimals (a
    micro), so the amount the shop sent is exactly the amount stored.
    """
    if len(value) <= MONEY_CHARS_MAX:
        match = _MONEY.fullmatch(value)
        if match is not None:
            units, fraction = match.groups()
            return int(units) * 1_000_000 + (int(fraction.ljust(6, "0")) if fraction else 0)
    if value.startswith("-"):
        raise ParamError(field, f"{field} must not be negative")
    if "e" in value.lower():
        raise ParamError(field, f"{field} must be a plain decimal like 49.90, not an exponent form")
    units, dot, fraction = value.partition(".")
    if dot and units.isdigit() and fraction.isdigit() and len(fraction) > 6:
        raise ParamError(field, f"{field} has more than 6 decimal places")
    raise ParamError(field, f"{field} must be a decimal amount like 49.90")


_CURRENCY = re.compile(r"[A-Za-z]{3}")
_COUNTRY = re.compile(r"[A-Za-z]{2}")


def parse_currency(value: str, field: str = "currency") -> str:
    if not _CURRENCY.fullmatch(value):
        raise ParamError(field, f"{field} must be an ISO 4217 code like EUR")
    return value.upper()


def parse_country(value: str, field: str = "country") -> str:
    if not _COUNTRY.fullmatch(value):
        raise ParamError(field, f"{field} must be an ISO 3166-1 alpha-2 code like DE")
    return value.upper()


_RFC3339 = re.compile(
    r"([0-9]{4})-([0-9]{2})-([0-9]{2})[Tt ]([0-9]{2}):([0-9]{2}):([0-9]{2})"
    r"(?:\.([0-9]{1,9}))?(?:([Zz])|([+-])([0-9]{2}):([0-9]{2}))"
)
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_SECOND = timedelta(seconds=1)


def parse_timestamp(value: str, field: str) -> Timestamp:
    """RFC 3339 with a mandatory offset (``Z`` or ``+02:00``), to the nanosecond."""
    match = _RFC3339.fullmatch(value) if len(value) <= TIME_CHARS_MAX else None
    if match is None:
        raise ParamError(field, f"{field} must be an RFC 3339 time like 2025-06-26T12:00:00Z")
    year, month, day, hour, minute, second, fraction, zulu, sign, off_h, off_m = match.groups()
    try:
        if zulu:
            tz: timezone = UTC
        else:
            offset = timedelta(hours=int(off_h), minutes=int(off_m))
            if int(off_m) > 59:
                raise ValueError("offset minutes")
            tz = timezone(-offset if sign == "-" else offset)
        moment = datetime(int(year), int(month), int(day), int(hour), int(minute), int(second), tzinfo=tz)
    except ValueError:
        raise ParamError(field, f"{field} is not a valid date and time") from None
    seconds = (moment - _EPOCH) // _SECOND
    nanos = int(fraction.ljust(9, "0")) if fraction else 0
    return Timestamp(seconds=seconds, nanos=nanos)


_DEVICES = EnumWords(pb.DeviceType, "DEVICE_TYPE_").by_word


def parse_device(value: str, field: str = "device") -> pb.DeviceType.ValueType:
    device = _DEVICES.get(value.lower())
    if device is None:
        raise ParamError(field, f"{field} must be one of {', '.join(_DEVICES)}")
    return device


# A dotted quad in canonical form (no leading zeros) is already what
# ``str(ip_address(...))`` would give back; parsing it costs more than the postback's rest.
_OCTET = r"(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])"
CANONICAL_IPV4 = re.compile(rf"{_OCTET}\.{_OCTET}\.{_OCTET}\.{_OCTET}")


def parse_ip(value: str, field: str = "ip") -> str:
    if CANONICAL_IPV4.fullmatch(value):
        return value
    canonical = normalize_ip(value)
    if canonical is None:
        raise ParamError(field, f"{field} must be an IPv4 or IPv6 address")
    return canonical


def _coupon(params: Params) -> str:
    # Longer than any legal code: a malformed parameter, not an unknown code.
    return get_one(params, "coupon", limits.COUPON_CODE)


# ---------------------------------------------------------------- requests


def click_request(params: Params, *, ip: str, user_agent: str, referer: str) -> pb.RecordClickRequest:
    """``GET /click`` parameters and headers to a RecordClickRequest."""
    return pb.RecordClickRequest(
        campaign_id=get_one(params, "campaign_id", limits.CAMPAIGN_ID, required=True),
        affiliate_id=get_one(params, "aff_id", limits.AFFILIATE_ID, required=True),
        coupon_code=_coupon(params),
        external_click_id=get_one(params, "aff_click_id", limits.EXTERNAL_CLICK_ID),
        sub1=get_one(params, "sub1", limits.SUB_ID),
        sub2=get_one(params, "sub2", limits.SUB_ID),
        sub3=get_one(params, "sub3", limits.SUB_ID),
        sub4=get_one(params, "sub4", limits.SUB_ID),
        sub5=get_one(params, "sub5", limits.SUB_ID),
        ip=ip,
        user_agent=check_text("user_agent", user_agent, limits.USER_AGENT),
        referer=header_text_lenient(referer, limits.REFERER),
        vid=get_one(params, "vid", limits.VISITOR_ID),
    )


def variant_request(params: Params, token: str) -> pb.AssignVariantRequest:
    """``GET /variant`` (issue #17): the unit's arm of a running experiment."""
    return pb.AssignVariantRequest(
        experiment_id=get_one(params, "experiment_id", limits.CAMPAIGN_ID, required=True),
        unit_id=get_one(params, "unit_id", limits.UNIT_ID, required=True),
        postback_token=token,
    )


def postback_event(params: Params) -> str:
    """``conversion`` (the default) or ``refund``."""
    event = get_one(params, "event", 32).lower()
    if event in ("", "conversion"):
        return "conversion"
    if event == "refund":
        return "refund"
    raise ParamError("event", "event must be conversion or refund")


def conversion_request(params: Params, token: str) -> pb.RecordConversionRequest:
    """``/postback`` parameters to a RecordConversionRequest."""
    request = pb.RecordConversionRequest(
        campaign_id=get_one(params, "campaign_id", limits.CAMPAIGN_ID, required=True),
        order_id=get_one(params, "order_id", limits.ORDER_ID, required=True),
        amount_micros=parse_money(get_one(params, "amount", MONEY_CHARS_MAX, required=True), "amount"),
        click_id=get_one(params, "click_id", limits.CLICK_ID),
        coupon_code=_coupon(params),
        customer_id=get_one(params, "customer_id", limits.CUSTOMER_ID),
        postback_token=token,
    )
    discount = get_one(params, "discount", MONEY_CHARS_MAX)
    if discount:
        request.discount_micros = parse_money(discount, "discount")
    currency = get_one(params, "currency", 8)
    if currency:
        request.currency = parse_currency(currency)
    country = get_one(params, "country", 8)
    if country:
        request.country = parse_country(country)
    ip = get_one(params, "ip", limits.IP)
    if ip:
        request.ip = parse_ip(ip)
    user_agent = get_one(params, "ua", limits.USER_AGENT)
    request.user_agent = user_agent
    device = get_one(params, "device", 16)
    # Without ``device`` the attribution service derives it from ``ua``
    # (services/attribution/common/visitor.py: one derivation for clicks and orders).
    if device:
        request.device_type = parse_device(device)
    skus = params.get("sku")
    if skus:
        request.skus.extend(_skus(skus))
    occurred_at = get_one(params, "occurred_at", TIME_CHARS_MAX)
    if occurred_at:
        request.occurred_at.CopyFrom(parse_timestamp(occurred_at, "occurred_at"))
    return request


def _skus(values: list[str]) -> list[str]:
    if len(values) > limits.SKUS_PER_ORDER:
        raise ParamError("sku", f"sku is given more than {limits.SKUS_PER_ORDER} times")
    skus = []
    for value in values:
        if not value:
            continue
        skus.append(check_text("sku", value, limits.SKU))
    return skus


def reversal_request(params: Params, token: str) -> pb.ReverseConversionRequest:
    """``POST /postback?event=refund`` parameters to a ReverseConversionRequest."""
    request = pb.ReverseConversionRequest(
        campaign_id=get_one(params, "campaign_id", limits.CAMPAIGN_ID, required=True),
        order_id=get_one(params, "order_id", limits.ORDER_ID, required=True),
        refund_id=get_one(params, "refund_id", limits.REFUND_ID),
        reason=get_one(params, "reason", limits.REASON),
        postback_token=token,
    )
    amount = get_one(params, "amount", MONEY_CHARS_MAX)
    if amount:
        request.amount_micros = parse_money(amount, "amount")
    return request


def postback_token(header: str | None, params: Params) -> str:
    """The campaign's secret from ``X-Ascribe-Token`` or ``token``; missing is 401.

    Messages never echo the value: it is a secret.
    """
    token = header.strip() if header else ""
    if not token:
        values = params.get("token")
        token = values[0] if values else ""
    if not token:
        raise ParamError("token", "the postback token is required", code="unauthenticated", status=401)
    if len(token) > limits.POSTBACK_TOKEN or not token.isascii() or _CONTROL.search(token):
        raise ParamError("token", "the postback token is not valid", code="unauthenticated", status=401)
    return token
