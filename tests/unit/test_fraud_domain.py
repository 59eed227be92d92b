"""The fraud rules as pure functions: signals, weights, verdicts."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from services.fraud import domain
from services.fraud.bots import UaClass, UaKind
from services.fraud.domain import Action, Code, CouponKind, Rules, Signal
from services.fraud.ipintel import NOT_LISTED, IpInfo

RULES = Rules()
NOW = datetime(2025, 6, 1, 12, 0, tzinfo=UTC)
BROWSER = UaClass(UaKind.BROWSER)


def click(**fields: object) -> domain.ClickEvent:
    values: dict[str, object] = {
        "click_id": "c1", "external_click_id": "x1", "campaign_id": "camp", "affiliate_id": "aff",
        "coupon_code": "", "ip": "81.2.69.142", "user_agent": "Mozilla/5.0", "occurred_at": NOW,
    }
    values.update(fields)
    return domain.ClickEvent(**values)  # type: ignore[arg-type]


def conversion(**fields: object) -> domain.ConversionEvent:
    values: dict[str, object] = {
        "order_id": "o1", "campaign_id": "camp", "affiliate_id": "aff", "click_id": "c1",
        "click_time": NOW - timedelta(minutes=30), "coupon_code": "", "coupon_kind": CouponKind.NONE,
        "customer_id": "", "ip": "81.2.69.142", "user_agent": "Mozilla/5.0", "occurred_at": NOW,
        "received_at": NOW + timedelta(seconds=3),
    }
    values.update(fields)
    return domain.ConversionEvent(**values)  # type: ignore[arg-type]


def codes(verdict: domain.Verdict) -> set[str]:
    return {s.code for s in verdict.signals}


def test_decide_thresholds() -> None:
    assert domain.decide([], RULES) == domain.Verdict(Action.ALLOW, 0, ())
    assert domain.decide([Signal("a", "", 59)], RULES).action is Action.ALLOW
    assert domain.decide([Signal("a", "", 60)], RULES).action is Action.REVIEW
    assert domain.decide([Signal("a", "", 50), Signal("b", "", 39)], RULES).action is Action.REVIEW
    assert domain.decide([Signal("a", "", 50), Signal("b", "", 40)], RULES).action is Action.REJECT
    capped = domain.decide([Signal("a", "", 70), Signal("b", "", 70)], RULES)
    assert (capped.action, capped.score) == (Action.REJECT, 100)
    hard = domain.decide([Signal("a", "", 100)], Rules(reject_score=100, review_score=100))
    assert hard.action is Action.REJECT


def test_review_only_signals_never_reject() -> None:
    spike = Signal(Code.CODE_SPIKE, "", 60, review_only=True)
    assert domain.decide([spike], RULES).action is Action.REVIEW
    stacked = domain.decide([spike, Signal("a", "", 40)], RULES)
    assert (stacked.action, stacked.score) == (Action.REVIEW, 100)
    low = domain.decide([Signal(Code.CODE_SPIKE, "", 5, review_only=True)], RULES)
    assert low.action is Action.REVIEW
    assert domain.decide([spike, Signal("a", "", 100)], RULES).action is Action.REJECT


def test_signals_are_ordered_by_weight() -> None:
    verdict = domain.decide([Signal("a", "", 10), Signal("b", "", 50)], RULES)
    assert [s.code for s in verdict.signals] == ["b", "a"]


def test_ip_signals() -> None:
    def ip(info: IpInfo, conversion: bool) -> dict[str, int]:
        return {s.code: s.weight for s in domain.ip_signals(info, RULES, conversion=conversion)}

    assert ip(NOT_LISTED, False) == {}
    assert ip(IpInfo(tor="1.2.3.4"), False) == {Code.TOR_EXIT: 100}
    assert ip(IpInfo(datacenter="8.8.8.0/24"), False) == {Code.DATACENTER_IP: 50}
    assert ip(IpInfo(datacenter="8.8.8.0/24"), True) == {Code.DATACENTER_IP: 100}
    assert ip(IpInfo(vpn="2.26.0.0/16"), True) == {Code.VPN_IP: 20}
    # The more specific list wins: a VPN (iCloud Private Relay) user hosted in a datacenter is a VPN user.
    assert ip(IpInfo(vpn="2.26.0.0/16", datacenter="2.26.0.0/16"), True) == {Code.VPN_IP: 20}
    assert ip(IpInfo(tor="1.2.3.4", datacenter="1.2.3.0/24"), True) == {Code.TOR_EXIT: 100}


def test_user_agent_signals() -> None:
    bot = UaClass(UaKind.AUTOMATION, "not a browser")
    empty = UaClass(UaKind.EMPTY, "empty user agent")
    claimed = UaClass(UaKind.CRAWLER, "GPTBot", claimed_source="openai-gptbot", claimed_name="GPTBot")
    assert domain.user_agent_signals(BROWSER, False, RULES, conversion=False) == []
    assert domain.user_agent_signals(UaClass(UaKind.IN_APP), False, RULES, conversion=False) == []
    assert [s.code for s in domain.user_agent_signals(bot, False, RULES, conversion=False)] == [Code.BOT_USER_AGENT]
    assert [s.code for s in domain.user_agent_signals(empty, False, RULES, conversion=False)] == [Code.BOT_USER_AGENT]
    assert domain.user_agent_signals(empty, False, RULES, conversion=True) == []
    spoof = domain.user_agent_signals(claimed, True, RULES, conversion=False)
    assert [(s.code, s.weight) for s in spoof] == [(Code.CRAWLER_SPOOF, 100)]


def test_click_rules() -> None:
    def verdict(counters: domain.ClickCounters, **fields: object) -> domain.Verdict:
        return domain.click_verdict(click(**fields), counters, NOT_LISTED, BROWSER, False, RULES)

    assert verdict(domain.ClickCounters()).action is Action.ALLOW
    duplicate = verdict(domain.ClickCounters(duplicate_of="c0"))
    assert duplicate.action is Action.REJECT and codes(duplicate) == {Code.DUPLICATE_CLICK_ID}
    assert not verdict(domain.ClickCounters(ip_last_minute=10, ip_last_hour=100)).signals
    assert codes(verdict(domain.ClickCounters(ip_last_minute=11))) == {Code.CLICK_VELOCITY}
    assert codes(verdict(domain.ClickCounters(ip_last_minute=2, ip_last_hour=101))) == {Code.CLICK_VELOCITY}
    assert not verdict(domain.ClickCounters(ip_last_minute=50), ip="").signals


@pytest.mark.parametrize(
    ("ctit_seconds", "expected"),
    [
        (-300, {Code.CTIT_TOO_SHORT}),
        (0, {Code.CTIT_TOO_SHORT}),
        (9.9, {Code.CTIT_TOO_SHORT}),
        (10, {Code.CTIT_SHORT}),
        (29, {Code.CTIT_SHORT}),
        (30, set()),
        (24 * 3600, set()),
        (24 * 3600 + 1, {Code.CTIT_LONG}),
    ],
)
def test_ctit(ctit_seconds: float, expected: set[str]) -> None:
    event = conversion(click_time=NOW - timedelta(seconds=ctit_seconds))
    signals = domain.conversion_signals(event, domain.ConversionCounters(), RULES)
    assert {s.code for s in signals} == expected


def test_conversion_rules() -> None:
    def verdict(counters: domain.ConversionCounters, **fields: object) -> domain.Verdict:
        return domain.conversion_verdict(conversion(**fields), counters, NOT_LISTED, BROWSER, False, RULES)

    none = domain.ConversionCounters()
    assert verdict(none).action is Action.ALLOW
    assert verdict(none, click_time=None, click_id="").action is Action.ALLOW
    late = verdict(none, received_at=NOW + timedelta(days=4))
    assert codes(late) == {Code.LATE_REPORT} and late.action is Action.ALLOW
    assert not verdict(domain.ConversionCounters(ip_in_campaign_day=3)).signals
    flood = verdict(domain.ConversionCounters(ip_in_campaign_day=4))
    assert flood.action is Action.REJECT and codes(flood) == {Code.CONVERSION_VELOCITY}

    unique = {"coupon_code": "U1", "coupon_kind": CouponKind.UNIQUE}
    assert verdict(domain.ConversionCounters(code_distinct_ips=3, code_distinct_devices=3), **unique).action is Action.ALLOW
    leak = verdict(domain.ConversionCounters(code_distinct_ips=4, code_distinct_devices=1), **unique)
    assert leak.action is Action.REJECT and codes(leak) == {Code.CODE_SHARING}
    by_device = verdict(domain.ConversionCounters(code_distinct_ips=1, code_distinct_devices=4), **unique)
    assert codes(by_device) == {Code.CODE_SHARING}
    # Spread is a UNIQUE-code rule only: an EXCLUSIVE code is meant to reach many people.
    exclusive = {"coupon_code": "INFL", "coupon_kind": CouponKind.EXCLUSIVE}
    assert not verdict(domain.ConversionCounters(code_distinct_ips=500), **exclusive).signals
    spike = verdict(domain.ConversionCounters(code_spiking=True, code_rate=80, code_baseline=2), **exclusive)
    assert spike.action is Action.REVIEW and codes(spike) == {Code.CODE_SPIKE}
    no_click = verdict(none, click_id="", click_time=None, **exclusive)
    assert codes(no_click) == {Code.EXCLUSIVE_WITHOUT_CLICK} and no_click.score == 10


def test_weight_overrides() -> None:
    assert domain.parse_weight_overrides("") == {}
    assert domain.parse_weight_overrides(" vpn_ip=25 , ctit_long=0") == {"vpn_ip": 25, "ctit_long": 0}
    rules = RULES.with_weights({"vpn_ip": 25})
    assert rules.weight(Code.VPN_IP) == 25 and rules.weight(Code.TOR_EXIT) == 100
    for bad in ("nope=3", "vpn_ip", "vpn_ip=x", "vpn_ip=101"):
        with pytest.raises(ValueError):
            domain.parse_weight_overrides(bad)


def test_every_code_is_snake_case_without_prefix() -> None:
    for code in domain.DEFAULT_WEIGHTS:
        assert code == code.lower() and not code.startswith("fraud_") and " " not in code
