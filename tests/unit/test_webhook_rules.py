"""Webhook rules without I/O: validation, templates, signatures, retries, addresses."""

from __future__ import annotations

import hashlib
import hmac
import random
import re
from datetime import UTC, datetime, timedelta
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest
from ascribe.attribution.v1 import attribution_pb2 as pb

from services.attribution.webhooks import rules
from services.attribution.webhooks.delivery import alert_event
from services.common.errors import InvalidArgument

README = Path(__file__).resolve().parents[2] / "README.md"


def readme_receiver() -> dict[str, object]:
    """The README's receiver code, run as it is written there."""
    text = README.read_text()
    match = re.search(r"<!-- webhook-receiver -->\n```python\n(.*?)```", text, re.S)
    assert match, "README lost its webhook receiver block"
    namespace: dict[str, object] = {}
    exec(compile(match.group(1), "README.md", "exec"), namespace)  # our own README, run as readers copy it
    return namespace


def postback(**fields: object) -> pb.Webhook:
    values: dict[str, object] = {
        "kind": pb.WEBHOOK_KIND_PARTNER_POSTBACK, "campaign_id": "cmp",
        "url": "https://t.example/pb?cid={aff_click_id}&s={sub1}&amt={amount}", "events": ["conversion.approved"],
    }
    values.update(fields)
    return pb.Webhook(**values)  # type: ignore[arg-type]


def violations(webhook: pb.Webhook) -> dict[str, str]:
    with pytest.raises(InvalidArgument) as caught:
        rules.validate_webhook(webhook, creating=True)
    return dict(caught.value.violations)


def test_a_valid_postback_answers_its_host() -> None:
    assert rules.validate_webhook(postback(), creating=True) == "t.example"


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"url": "ftp://t.example/{sub1}"}, "webhook.url"),
        ({"url": "https://t.example/?x={nope}"}, "webhook.url"),
        ({"url": "https://t.example/?x={sub1!r}"}, "webhook.url"),
        ({"url": "https://t.example/?x={sub1"}, "webhook.url"),
        ({"url": "https://{sub1}/"}, "webhook.url"),
        ({"url": "https://u:p@t.example/"}, "webhook.url"),
        ({"url": "https://t.example/a b"}, "webhook.url"),
        ({"url": ""}, "webhook.url"),
        ({"http_method": "PUT"}, "webhook.http_method"),
        ({"http_method": "get"}, "webhook.http_method"),
        ({"events": []}, "webhook.events"),
        ({"events": ["conversion.approve"]}, "webhook.events[0]"),
        ({"events": ["alert.code_leak"]}, "webhook.events[0]"),
        ({"secret": "short"}, "webhook.secret"),
        ({"campaign_id": ""}, "webhook.campaign_id"),
        ({"kind": pb.WEBHOOK_KIND_UNSPECIFIED}, "webhook.kind"),
    ],
)
def test_bad_webhooks_name_the_field(fields: dict[str, object], field: str) -> None:
    assert field in violations(postback(**fields))


def test_events_urls_take_no_macros_and_every_event_word() -> None:
    events = pb.Webhook(kind=pb.WEBHOOK_KIND_EVENTS, url="https://hooks.example/x", events=sorted(rules.EVENTS))
    assert rules.validate_webhook(events, creating=True) == "hooks.example"
    assert "webhook.url" in violations(pb.Webhook(kind=pb.WEBHOOK_KIND_EVENTS, url="https://h.example/{sub1}",
                                                  events=["coupon.held"]))


def test_macros_are_percent_encoded_utf8_with_no_safe_characters() -> None:
    url = rules.render_url("https://t.example/p/{sub1}?a={sub1}&o={order_id}", {"sub1": "a b&c/ü", "order_id": "1"})
    assert url == "https://t.example/p/a%20b%26c%2F%C3%BC?a=a%20b%26c%2F%C3%BC&o=1"
    assert parse_qs(urlsplit(url).query)["a"] == ["a b&c/ü"]
    assert rules.render_url("https://t.example/{{literal}}", {}) == "https://t.example/{literal}"
    assert parse_qs(rules.postback_form({"sub1": "a b&c/ü"}).decode())["sub1"] == ["a b&c/ü"]


def test_macro_values_of_a_partial_refund_carry_the_refunded_amount() -> None:
    obj = {"id": "cnv_1", "amount": "50.00", "refunded": "10.00", "payout": "5.00", "coupon_code": "X",
           "status": "approved"}
    assert rules.macro_values("conversion.refunded", obj)["amount"] == "10.00"
    values = rules.macro_values("conversion.approved", obj)
    assert (values["amount"], values["conversion_id"], values["coupon"], values["event"]) == (
        "50.00", "cnv_1", "X", "conversion.approved")


def test_money_is_a_decimal_string() -> None:
    assert [rules.money(m) for m in (25_000_000, 49_900_000, 1, 0, -1_500_000)] == [
        "25.00", "49.90", "0.000001", "0.00", "-1.50"]


def test_signatures_verify_with_the_readme_receiver_for_every_live_secret() -> None:
    verify = readme_receiver()["verify_ascribe_signature"]
    assert callable(verify)
    body = rules.event_body("evt_1", "conversion.approved", datetime.now(UTC), {"amount": "25.00"})
    now = int(datetime.now(UTC).timestamp())
    header = rules.sign(["new-secret-" + "x" * 32, "old-secret-" + "y" * 32], now, body)
    assert header.count("v1=") == 2
    assert verify("new-secret-" + "x" * 32, header, body)
    assert verify("old-secret-" + "y" * 32, header, body)
    assert not verify("another-secret" + "z" * 32, header, body)
    assert not verify("new-secret-" + "x" * 32, header, body.replace(b"25.00", b"95.00"))
    stale = rules.sign(["new-secret-" + "x" * 32], now - 3600, body)
    assert not verify("new-secret-" + "x" * 32, stale, body)
    expected = hmac.new(b"s" * 32, f"{now}.".encode() + body, hashlib.sha256).hexdigest()
    assert rules.sign(["s" * 32], now, body) == f"t={now},v1={expected}"


def test_event_text_reads_as_a_sentence() -> None:
    text = rules.event_text("conversion.reversed", {"order_id": "o-1", "campaign_id": "cmp", "amount": "9.00",
                                                    "currency": "EUR", "affiliate_id": "aff"})
    assert text == "ascribe: conversion reversed: order o-1 of campaign cmp, 9.00 EUR for affiliate aff"


def test_retry_schedule_jitters_within_20_percent_and_ends() -> None:
    schedule = rules.DEFAULT_SCHEDULE_SECONDS
    assert sum(schedule) <= 24 * 3600 and sum(schedule) > 23 * 3600
    rnd = random.Random(7)
    delays = [rules.retry_delay(1, schedule, rnd) for _ in range(200)]
    assert all(d is not None and 8.0 <= d <= 12.0 for d in delays)
    assert len({round(d or 0, 3) for d in delays}) > 100
    assert rules.retry_delay(len(schedule) + 1, schedule, rnd) is None
    assert rules.parse_schedule("0.1, 0.2") == (0.1, 0.2)
    for bad in ("", "0", "-1", "x"):
        with pytest.raises(ValueError):
            rules.parse_schedule(bad)


def test_outcomes_retry_only_what_may_pass_later() -> None:
    now = datetime(2026, 1, 1, tzinfo=UTC)
    assert rules.outcome_of(204, None, now).state == "delivered"
    for status in (408, 429, 500, 503):
        assert rules.outcome_of(status, None, now).state == "retry"
    for status in (301, 302, 400, 401, 404, 410):
        assert rules.outcome_of(status, None, now).state == "dead"
    assert rules.outcome_of(429, "7", now).retry_after == 7.0
    later = (now + timedelta(seconds=90)).strftime("%a, %d %b %Y %H:%M:%S GMT")
    assert rules.outcome_of(503, later, now).retry_after == 90.0
    assert rules.outcome_of(503, "soon", now).retry_after is None


@pytest.mark.parametrize(
    "address",
    ["127.0.0.1", "10.0.0.1", "172.16.5.4", "192.168.1.1", "100.64.0.1", "169.254.169.254", "169.254.1.1",
     "0.0.0.0", "::1", "::", "fd00::1", "fe80::1", "::ffff:10.0.0.1", "::ffff:127.0.0.1", "::ffff:169.254.169.254",
     "224.0.0.1", "not-an-ip"],
)
def test_forbidden_addresses(address: str) -> None:
    assert rules.forbidden_reason(address)


@pytest.mark.parametrize("address", ["93.184.216.34", "1.1.1.1", "2606:4700:4700::1111", "::ffff:93.184.216.34"])
def test_public_addresses_pass(address: str) -> None:
    assert rules.forbidden_reason(address) is None


def test_one_bad_answer_refuses_the_name() -> None:
    assert rules.refused_addresses(["93.184.216.34", "127.0.0.1"])
    assert rules.refused_addresses(["93.184.216.34"]) is None


def test_alert_kinds_map_through_one_table() -> None:
    from ascribe.fraud.v1 import fraud_pb2

    assert alert_event(fraud_pb2.ALERT_KIND_CODE_LEAK) == "alert.code_leak"
    assert alert_event(fraud_pb2.ALERT_KIND_RULE_SURGE) == "alert.rule_surge"
    assert alert_event(0) is None
    assert alert_event(999) is None
    assert set(rules.ALERT_EVENTS_BY_KIND_NAME.values()) <= rules.EVENTS


def test_disable_after_three_days_of_deaths() -> None:
    now = datetime(2026, 1, 4, tzinfo=UTC)
    assert rules.should_disable(now - timedelta(days=3), now)
    assert not rules.should_disable(now - timedelta(days=2, hours=23), now)
    assert not rules.should_disable(None, now)


def test_webhook_settings_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    from services.attribution.config import Settings
    from services.common.env import ConfigError

    monkeypatch.setenv("ASCRIBE_DATABASE_URL", "postgresql://postgres@127.0.0.1/postgres")
    monkeypatch.setenv("ASCRIBE_WEBHOOK_ALLOW_PRIVATE_NETWORKS", "1")
    monkeypatch.setenv("ASCRIBE_WEBHOOK_RETRY_SCHEDULE", "1, 2.5")
    monkeypatch.setenv("ASCRIBE_WEBHOOK_POLL_MS", "250")
    config = Settings.from_env().webhooks
    assert (config.allow_private_networks, config.schedule, config.poll_seconds) == (True, (1.0, 2.5), 0.25)
    for name, bad in (("ASCRIBE_WEBHOOK_RETRY_SCHEDULE", "0,1"), ("ASCRIBE_WEBHOOK_POLL_MS", "5"),
                      ("ASCRIBE_WEBHOOK_ALLOW_PRIVATE_NETWORKS", "maybe")):
        monkeypatch.setenv(name, bad)
        with pytest.raises(ConfigError, match=name):
            Settings.from_env()
        monkeypatch.delenv(name)


def test_the_default_schedule_tries_three_times_within_the_first_minute() -> None:
    # The first try, then 10 s and 30 s later, each at most 20 % late.
    schedule = rules.DEFAULT_SCHEDULE_SECONDS
    assert schedule[0] * (1 + rules.JITTER) + schedule[1] * (1 + rules.JITTER) < 60
