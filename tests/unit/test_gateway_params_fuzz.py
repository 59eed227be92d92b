"""Property-based fuzz of the gateway's parameter parsing (gateway.params, pure).

Whatever query string or header arrives, each parser either returns a request
or raises ParamError that names the field at fault with a 400 (401 for the
postback token); nothing else ever escapes, and what is parsed is what was
sent (no mangled value reaches the attribution service).
"""

from __future__ import annotations

from urllib.parse import quote

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.params import (
    ParamError,
    Params,
    click_request,
    conversion_request,
    parse_body,
    parse_urlencoded,
    postback_event,
    postback_token,
    reversal_request,
)

# Every parameter the routes read (gateway/openapi.json), and some they do not.
NAMES = (
    "campaign_id", "aff_id", "coupon", "aff_click_id", "sub1", "sub2", "sub3", "sub4", "sub5",
    "event", "order_id", "amount", "discount", "currency", "country", "click_id", "customer_id",
    "ip", "ua", "device", "sku", "occurred_at", "refund_id", "reason", "token", "unknown",
)

# Text that exercises the decoder: percent escapes (good, truncated, non-hex,
# encoding bad UTF-8), '+', separators, control characters, non-ASCII and
# lone surrogates (aiohttp's surrogateescape of bytes that are not UTF-8).
_PIECES = st.one_of(
    st.text(max_size=12),
    st.sampled_from(["%", "%2", "%zz", "%41", "%C3%A9", "%C3", "%FF", "%00", "%0A", "+", "&", "=", "\udcff", "\x00"]),
    st.from_regex(r"[0-9]{1,14}(\.[0-9]{0,8})?", fullmatch=True),
    st.from_regex(r"20[0-9]{2}-[01][0-9]-[0-3][0-9]T[0-2][0-9]:[0-5][0-9]:[0-6][0-9](Z|[+-][0-9]{2}:[0-9]{2})",
                  fullmatch=True),
    st.sampled_from(["EUR", "eur", "DE", "mobile", "refund", "conversion", "1.2.3.4", "::1", "-1", "1e3"]),
)
VALUES = st.lists(_PIECES, max_size=4).map("".join)
KEYS = st.one_of(st.sampled_from(NAMES), VALUES)
PAIRS = st.lists(st.tuples(KEYS, VALUES, st.booleans()), max_size=12)


def _query(pairs: list[tuple[str, str, bool]]) -> str:
    """Pairs joined as a raw query; each value percent-encoded or sent raw (as a careless client does)."""
    return "&".join(f"{key}={_encoded(value) if encode else value}" for key, value, encode in pairs)


def _encoded(value: str) -> str:
    # A lone surrogate stands for a byte that is not UTF-8: it travels as that byte, escaped.
    return quote(value.encode("utf-8", "surrogateescape"), safe="")


def _named(error: ParamError, params: Params | None) -> None:
    assert error.status in (400, 401), error.status
    assert isinstance(error.field, str) and error.field, f"no field named: {error.message!r}"
    assert error.message
    if params is not None and error.status == 400:
        assert error.field in params or error.field in NAMES, error.field


def _each_route(params: Params) -> None:
    """Every parser a route runs on the parsed parameters: each returns or raises a named ParamError."""
    attempts = (
        lambda: click_request(params, ip="203.0.113.7", user_agent="Mozilla/5.0", referer=""),
        lambda: postback_event(params),
        lambda: conversion_request(params, "token"),
        lambda: reversal_request(params, "token"),
        lambda: postback_token(None, params),
    )
    for attempt in attempts:
        try:
            attempt()
        except ParamError as error:
            _named(error, params)


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(PAIRS)
def test_any_query_string_parses_or_is_a_named_400(pairs: list[tuple[str, str, bool]]) -> None:
    raw = _query(pairs)
    try:
        params = parse_urlencoded(raw)
    except ParamError as error:
        _named(error, None)
        return
    _each_route(params)


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=200))
def test_any_raw_text_as_a_query_string_parses_or_is_a_named_400(raw: str) -> None:
    try:
        params = parse_urlencoded(raw)
    except ParamError as error:
        _named(error, None)
        return
    _each_route(params)


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from(NAMES), st.text(max_size=40), max_size=10))
def test_well_encoded_values_come_back_exactly_as_sent(values: dict[str, str]) -> None:
    params = parse_urlencoded("&".join(f"{quote(k, safe='')}={quote(v, safe='')}" for k, v in values.items()))
    assert params == {k: [v] for k, v in values.items()}


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=200))
def test_any_form_body_parses_or_is_a_400(body: bytes) -> None:
    try:
        params = parse_body(body, {})
    except ParamError as error:
        assert error.status == 400
        return
    _each_route(params)


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=300), st.text(max_size=300))
def test_any_user_agent_or_referer_header_is_accepted_or_a_named_400(user_agent: str, referer: str) -> None:
    params: Params = {"campaign_id": ["c"], "aff_id": ["a"]}
    try:
        request = click_request(params, ip="203.0.113.7", user_agent=user_agent, referer=referer)
    except ParamError as error:
        assert (error.status, error.field) == (400, "user_agent")
        return
    assert request.user_agent == user_agent


@pytest.mark.parametrize("raw", ["=%zz", "%zz=1", "=", "&&&", "a=%C3", "%=%"])
def test_corner_queries_are_named(raw: str) -> None:
    try:
        params = parse_urlencoded(raw)
    except ParamError as error:
        _named(error, None)
        return
    _each_route(params)


def test_raw_bytes_that_are_not_utf8_beside_an_escape_are_a_named_400() -> None:
    """Found by the fuzz: a value with an escape and a raw non-UTF-8 byte escaped as a 503 with a traceback."""
    with pytest.raises(ParamError) as error:
        parse_urlencoded("campaign_id=%00\udcff")
    assert (error.value.status, error.value.field) == (400, "campaign_id")
