"""Gateway input parsing: every malformed input is a 400 naming its field."""

from __future__ import annotations

import pytest
from ascribe.attribution.v1 import attribution_pb2 as pb

from gateway.params import (
    ParamError,
    Params,
    click_request,
    conversion_request,
    parse_body,
    parse_money,
    parse_timestamp,
    parse_urlencoded,
    postback_event,
    postback_token,
    reversal_request,
)
from services.common import limits

CLICK_BASE = "campaign_id=c1&aff_id=a1"
POSTBACK_BASE = "campaign_id=c1&order_id=o1&amount=49.90"


def click(query: str, *, user_agent: str = "Mozilla/5.0", referer: str = "") -> pb.RecordClickRequest:
    return click_request(parse_urlencoded(query), ip="203.0.113.9", user_agent=user_agent, referer=referer)


def conversion(query: str) -> pb.RecordConversionRequest:
    return conversion_request(parse_urlencoded(query), "secret")


def field_of(call: object, *args: object, **kwargs: object) -> str | None:
    with pytest.raises(ParamError) as caught:
        call(*args, **kwargs)  # type: ignore[operator]
    assert caught.value.status == 400
    assert caught.value.message
    return caught.value.field


# ---------------------------------------------------------------- decoding


def test_query_decoding_handles_plus_percent_and_repeats() -> None:
    params = parse_urlencoded("a=x+y&b=%C3%A9t%C3%A9&sku=1&sku=2&&empty=&flag")
    assert params == {"a": ["x y"], "b": ["été"], "sku": ["1", "2"], "empty": [""], "flag": [""]}


@pytest.mark.parametrize(
    ("query", "field"),
    [
        ("sub1=%ZZ", "sub1"),
        ("sub1=abc%2", "sub1"),
        ("sub1=%", "sub1"),
        ("sub1=%FF", "sub1"),  # not UTF-8
        ("sub1=%C3%28", "sub1"),  # broken multi-byte sequence
        ("sub1=%ED%A0%80", "sub1"),  # an encoded surrogate is not UTF-8 either
    ],
)
def test_bad_encoding_names_the_field(query: str, field: str) -> None:
    assert field_of(parse_urlencoded, query) == field


def test_bad_encoding_in_a_parameter_name_is_named_printably() -> None:
    assert field_of(parse_urlencoded, "su%ZZb=1") == "su%ZZb"


def test_form_body_with_raw_non_ascii_bytes_is_rejected() -> None:
    with pytest.raises(ParamError):
        parse_body("order_id=\u00e9".encode(), {})
    assert parse_body(b"order_id=o%C3%A9", {}) == {"order_id": ["oé"]}


# ---------------------------------------------------------------- clicks


def test_click_request_carries_every_parameter() -> None:
    request = click(
        CLICK_BASE
        + "&coupon=summer10&aff_click_id=x-1&sub1=a&sub2=b&sub3=c&sub4=d&sub5=e&utm_source=ignored",
        referer="https://blog.example/post",
    )
    assert request.campaign_id == "c1"
    assert request.affiliate_id == "a1"
    # Case is the attribution service's business (codes are case-insensitive there).
    assert request.coupon_code == "summer10"
    assert request.external_click_id == "x-1"
    assert [request.sub1, request.sub2, request.sub3, request.sub4, request.sub5] == list("abcde")
    assert request.ip == "203.0.113.9"
    assert request.user_agent == "Mozilla/5.0"
    assert request.referer == "https://blog.example/post"
    assert not request.HasField("occurred_at")


@pytest.mark.parametrize(
    ("query", "field"),
    [
        ("aff_id=a1", "campaign_id"),
        ("campaign_id=&aff_id=a1", "campaign_id"),
        ("campaign_id=c1", "aff_id"),
        (CLICK_BASE + "&sub1=" + "x" * (limits.SUB_ID + 1), "sub1"),
        (CLICK_BASE + "&sub5=" + "%C3%A9" * 129, "sub5"),  # 258 bytes in 129 characters
        (CLICK_BASE + "&aff_click_id=" + "x" * (limits.EXTERNAL_CLICK_ID + 1), "aff_click_id"),
        (CLICK_BASE + "&coupon=" + "C" * (limits.COUPON_CODE + 1), "coupon"),
        ("campaign_id=" + "c" * (limits.CAMPAIGN_ID + 1) + "&aff_id=a1", "campaign_id"),
        (CLICK_BASE + "&sub2=a%00b", "sub2"),
        (CLICK_BASE + "&sub3=a%0Ab", "sub3"),
        (CLICK_BASE + "&aff_id=a2", "aff_id"),  # two different values
    ],
)
def test_bad_click_parameters_name_their_field(query: str, field: str) -> None:
    assert field_of(click, query) == field


def test_sub_id_of_exactly_256_bytes_is_accepted() -> None:
    assert len(click(CLICK_BASE + "&sub1=" + "x" * 256).sub1) == 256


def test_the_same_value_repeated_is_accepted() -> None:
    assert click(CLICK_BASE + "&aff_id=a1").affiliate_id == "a1"


def test_user_agent_over_1kb_is_rejected() -> None:
    assert field_of(click, CLICK_BASE, user_agent="x" * 1025) == "user_agent"
    assert len(click(CLICK_BASE, user_agent="x" * 1024).user_agent) == 1024


def test_overlong_referer_is_cut_not_rejected() -> None:
    request = click(CLICK_BASE, referer="https://r.example/" + "\u00e9" * 3000)
    assert len(request.referer.encode()) <= 2048
    request.referer.encode("utf-8")  # still valid text


def _as_aiohttp_decodes_headers(raw: bytes) -> str:
    return raw.decode("utf-8", "surrogateescape")


def test_a_user_agent_that_is_not_utf8_is_a_400_naming_it() -> None:
    user_agent = _as_aiohttp_decodes_headers(b"Mozilla/5.0 (Windows; caf\xe9)")
    assert field_of(click, CLICK_BASE, user_agent=user_agent) == "user_agent"


def test_a_referer_that_is_not_utf8_costs_no_click() -> None:
    referer = _as_aiohttp_decodes_headers(b"https://r.example/caf\xe9?q=\xff")
    request = click(CLICK_BASE, referer=referer)
    assert request.referer == "https://r.example/caf\ufffd?q=\ufffd"


# ---------------------------------------------------------------- money


@pytest.mark.parametrize(
    ("text", "micros"),
    [
        ("49.90", 49_900_000),
        ("49.9", 49_900_000),
        ("0", 0),
        ("0.000001", 1),
        ("5", 5_000_000),
        ("123456789012.999999", 123_456_789_012_999_999),
    ],
)
def test_money_to_micros(text: str, micros: int) -> None:
    assert parse_money(text, "amount") == micros


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("-1.00", "negative"),
        ("1e3", "exponent"),
        ("1E-2", "exponent"),
        ("1.0000001", "6 decimal"),
        ("1.", "decimal amount"),
        (".5", "decimal amount"),
        ("1,50", "decimal amount"),
        ("+1", "decimal amount"),
        (" 1", "decimal amount"),
        ("NaN", "decimal amount"),
        ("\u0661\u0662", "decimal amount"),  # Arabic-Indic digits are not ASCII digits
        ("1234567890123", "decimal amount"),  # past int64 micros' comfort
    ],
)
def test_bad_money_is_rejected_with_a_reason(text: str, words: str) -> None:
    with pytest.raises(ParamError) as caught:
        parse_money(text, "amount")
    assert caught.value.field == "amount"
    assert words in caught.value.message


# ---------------------------------------------------------------- postbacks


def test_conversion_request_carries_every_parameter() -> None:
    request = conversion(
        POSTBACK_BASE
        + "&discount=5&currency=eur&click_id=k1&coupon=SUMMER10&customer_id=cu1&country=de"
        + "&device=Tablet&sku=A&sku=B&ip=2001:db8::1&ua=Mozilla&occurred_at=2025-09-24T23:59:59Z"
    )
    assert request.campaign_id == "c1"
    assert request.order_id == "o1"
    assert request.amount_micros == 49_900_000
    assert request.discount_micros == 5_000_000
    assert request.currency == "EUR"
    assert request.click_id == "k1"
    assert request.coupon_code == "SUMMER10"
    assert request.customer_id == "cu1"
    assert request.country == "DE"
    assert request.device_type == pb.DEVICE_TYPE_TABLET
    assert list(request.skus) == ["A", "B"]
    assert request.ip == "2001:db8::1"
    assert request.user_agent == "Mozilla"
    assert request.occurred_at.ToJsonString() == "2025-09-24T23:59:59Z"
    assert request.postback_token == "secret"


def test_optional_postback_parameters_stay_unset() -> None:
    request = conversion(POSTBACK_BASE)
    assert request.discount_micros == 0
    assert request.currency == ""
    assert request.device_type == pb.DEVICE_TYPE_UNSPECIFIED
    assert not request.HasField("occurred_at")


@pytest.mark.parametrize(
    ("query", "field"),
    [
        ("order_id=o1&amount=1", "campaign_id"),
        ("campaign_id=c1&amount=1", "order_id"),
        ("campaign_id=c1&order_id=&amount=1", "order_id"),
        ("campaign_id=c1&order_id=o1", "amount"),
        ("campaign_id=c1&order_id=o1&amount=abc", "amount"),
        (POSTBACK_BASE + "&discount=-5", "discount"),
        (POSTBACK_BASE + "&currency=EURO", "currency"),
        (POSTBACK_BASE + "&currency=E1R", "currency"),
        (POSTBACK_BASE + "&country=DEU", "country"),
        (POSTBACK_BASE + "&device=phone", "device"),
        (POSTBACK_BASE + "&ip=999.1.1.1", "ip"),
        (POSTBACK_BASE + "&ip=localhost", "ip"),
        (POSTBACK_BASE + "&occurred_at=2025-09-24", "occurred_at"),
        (POSTBACK_BASE + "&occurred_at=2025-09-24T23:59:59", "occurred_at"),  # no offset
        (POSTBACK_BASE + "&occurred_at=2025-02-30T00:00:00Z", "occurred_at"),
        (POSTBACK_BASE + "&occurred_at=2025-09-24T24:00:00Z", "occurred_at"),
        (POSTBACK_BASE + "&occurred_at=2025-09-24T12:00:00%2B02:60", "occurred_at"),
        (POSTBACK_BASE + "&occurred_at=yesterday", "occurred_at"),
        (POSTBACK_BASE + "&ua=" + "u" * (limits.USER_AGENT + 1), "ua"),
        (POSTBACK_BASE + "&customer_id=" + "c" * (limits.CUSTOMER_ID + 1), "customer_id"),
        ("campaign_id=c1&order_id=" + "o" * (limits.ORDER_ID + 1) + "&amount=1", "order_id"),
        (POSTBACK_BASE + "&sku=" + "s" * (limits.SKU + 1), "sku"),
        (POSTBACK_BASE + "&sku=a%01", "sku"),
        (POSTBACK_BASE + "&click_id=" + "k" * (limits.CLICK_ID + 1), "click_id"),
        (POSTBACK_BASE + "&coupon=" + "C" * (limits.COUPON_CODE + 1), "coupon"),
        (POSTBACK_BASE + "&amount=50.00", "amount"),  # given twice, differently
    ],
)
def test_bad_postback_parameters_name_their_field(query: str, field: str) -> None:
    assert field_of(conversion, query) == field


def test_too_many_skus() -> None:
    assert field_of(conversion, POSTBACK_BASE + "&sku=x" * (limits.SKUS_PER_ORDER + 1)) == "sku"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2025-09-24T23:59:59Z", "2025-09-24T23:59:59Z"),
        ("2025-09-24t23:59:59z", "2025-09-24T23:59:59Z"),
        ("2025-09-25T01:59:59+02:00", "2025-09-24T23:59:59Z"),
        ("2025-09-24T20:29:59-03:30", "2025-09-24T23:59:59Z"),
        ("2025-09-24 23:59:59Z", "2025-09-24T23:59:59Z"),
        ("2025-09-24T23:59:59.5Z", "2025-09-24T23:59:59.500Z"),
        ("2025-09-24T23:59:59.123456789Z", "2025-09-24T23:59:59.123456789Z"),
        ("1969-12-31T23:59:59Z", "1969-12-31T23:59:59Z"),
    ],
)
def test_rfc3339_times(text: str, expected: str) -> None:
    assert parse_timestamp(text, "occurred_at").ToJsonString() == expected


def test_device_is_left_to_the_attribution_service_without_a_device_parameter() -> None:
    params: Params = parse_urlencoded(POSTBACK_BASE)
    params["ua"] = ["Mozilla/5.0 (iPad; CPU OS 16_0 like Mac OS X)"]
    request = conversion_request(params, "t")
    assert request.device_type == pb.DEVICE_TYPE_UNSPECIFIED and request.user_agent.startswith("Mozilla")


def test_explicit_device_wins_over_user_agent() -> None:
    request = conversion(POSTBACK_BASE + "&device=desktop&ua=iPhone")
    assert request.device_type == pb.DEVICE_TYPE_DESKTOP


# ---------------------------------------------------------------- refunds, events, tokens


def test_reversal_request() -> None:
    params = parse_urlencoded("campaign_id=c1&order_id=o1&refund_id=r1&amount=10.5&reason=chargeback")
    request = reversal_request(params, "secret")
    assert (request.campaign_id, request.order_id, request.refund_id) == ("c1", "o1", "r1")
    assert request.HasField("amount_micros") and request.amount_micros == 10_500_000
    assert request.reason == "chargeback"
    assert request.postback_token == "secret"


def test_full_refund_leaves_amount_unset() -> None:
    request = reversal_request(parse_urlencoded("campaign_id=c1&order_id=o1"), "t")
    assert not request.HasField("amount_micros")


@pytest.mark.parametrize(
    ("query", "field"),
    [
        ("order_id=o1", "campaign_id"),
        ("campaign_id=c1", "order_id"),
        ("campaign_id=c1&order_id=o1&amount=-3", "amount"),
        ("campaign_id=c1&order_id=o1&amount=1.1234567", "amount"),
        ("campaign_id=c1&order_id=o1&refund_id=" + "r" * (limits.REFUND_ID + 1), "refund_id"),
    ],
)
def test_bad_refund_parameters_name_their_field(query: str, field: str) -> None:
    assert field_of(reversal_request, parse_urlencoded(query), "t") == field


def test_postback_events() -> None:
    assert postback_event({}) == "conversion"
    assert postback_event({"event": ["refund"]}) == "refund"
    assert postback_event({"event": ["conversion"]}) == "conversion"
    assert field_of(postback_event, {"event": ["delete"]}) == "event"


def test_postback_token_from_header_or_parameter() -> None:
    assert postback_token("  from-header ", {"token": ["from-param"]}) == "from-header"
    assert postback_token(None, {"token": ["from-param"]}) == "from-param"


@pytest.mark.parametrize(
    ("header", "params"), [(None, {}), ("", {"token": [""]}), (None, {"token": ["x" * 257]})]
)
def test_missing_or_invalid_token_is_401_and_never_echoed(header: str | None, params: Params) -> None:
    with pytest.raises(ParamError) as caught:
        postback_token(header, params)
    assert caught.value.status == 401
    assert caught.value.field == "token"
    assert "xxxx" not in caught.value.message
