"""The fraud rules: signals, weights and the verdict, as pure functions.

Everything here is computed from the event, what the lists say about its IP
and user agent, and the counters the store read from Redis; nothing here does
I/O, so every rule is unit-tested on its own.

A signal's weight is its contribution to the score; weight 100 (``HARD``)
marks a hard rule that rejects on its own. Signals marked ``review_only`` (an
EXCLUSIVE code spiking) send the event to review but never count towards a
rejection: a viral influencer code must never be frozen for its success.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from enum import IntEnum

from services.fraud.bots import UaClass, UaKind
from services.fraud.ipintel import IpInfo

HARD = 100
MAX_SCORE = 100


class Action(IntEnum):
    """Same numbers as ``ascribe.fraud.v1.VerdictAction``."""

    ALLOW = 1
    REVIEW = 2
    REJECT = 3


class CouponKind(IntEnum):
    """Same numbers as ``ascribe.fraud.v1.CouponKind``."""

    NONE = 0
    GENERAL = 1
    EXCLUSIVE = 2
    UNIQUE = 3


class Code:
    """Stable signal codes (the attribution service prefixes them with ``fraud_``)."""

    DUPLICATE_CLICK_ID = "duplicate_click_id"
    TOR_EXIT = "tor_exit"
    DATACENTER_IP = "datacenter_ip"
    VPN_IP = "vpn_ip"
    BOT_USER_AGENT = "bot_user_agent"
    CRAWLER_SPOOF = "crawler_spoof"
    CLICK_VELOCITY = "click_velocity"
    CONVERSION_VELOCITY = "conversion_velocity"
    CTIT_TOO_SHORT = "ctit_too_short"
    CTIT_SHORT = "ctit_short"
    CTIT_LONG = "ctit_long"
    LATE_REPORT = "late_report"
    CODE_SHARING = "code_sharing"
    CODE_SPIKE = "code_spike"
    EXCLUSIVE_WITHOUT_CLICK = "exclusive_without_click"
    CODE_GUESSING = "code_guessing"


DEFAULT_WEIGHTS: Mapping[str, int] = {
    Code.DUPLICATE_CLICK_ID: HARD,
    Code.TOR_EXIT: HARD,
    # A datacenter address is heavy risk: it rejects a conversion (a
    # shopper's browser does not live in a datacenter) but only scores a
    # click, since privacy proxies and corporate egress land there too.
    Code.DATACENTER_IP: 50,
    Code.VPN_IP: 20,
    Code.BOT_USER_AGENT: 90,
    Code.CRAWLER_SPOOF: HARD,
    Code.CLICK_VELOCITY: 70,
    Code.CONVERSION_VELOCITY: HARD,
    Code.CTIT_TOO_SHORT: HARD,
    Code.CTIT_SHORT: 40,
    Code.CTIT_LONG: 10,
    Code.LATE_REPORT: 30,
    Code.CODE_SHARING: HARD,
    Code.CODE_SPIKE: 60,
    Code.EXCLUSIVE_WITHOUT_CLICK: 10,
    # A sale from an address or customer past the unknown-code threshold may
    # use a code it guessed: a person looks (review), but a shopper behind
    # the same NAT as a guesser is not rejected outright.
    Code.CODE_GUESSING: 70,
}


@dataclass(frozen=True)
class Rules:
    """Every threshold and weight; defaults are the issue's."""

    review_score: int = 60
    reject_score: int = 90
    clicks_per_ip_minute: int = 10
    clicks_per_ip_hour: int = 100
    conversions_per_ip_campaign_day: int = 3
    ctit_reject_seconds: float = 10.0
    ctit_risk_seconds: float = 30.0
    ctit_long_seconds: float = 24 * 3600.0
    late_report_seconds: float = 72 * 3600.0
    code_max_distinct: int = 3
    weights: Mapping[str, int] = field(default_factory=lambda: dict(DEFAULT_WEIGHTS))

    def weight(self, code: str) -> int:
        return self.weights.get(code, DEFAULT_WEIGHTS.get(code, 0))

    def with_weights(self, overrides: Mapping[str, int]) -> Rules:
        return replace(self, weights={**DEFAULT_WEIGHTS, **self.weights, **overrides})


@dataclass(frozen=True)
class Signal:
    code: str
    detail: str
    weight: int
    review_only: bool = False


@dataclass(frozen=True)
class Verdict:
    action: Action
    score: int
    signals: tuple[Signal, ...] = ()
    repeat_visit: bool = False  # clicks: not the visitor's first for the campaign and affiliate in 24 h


# The verdict of an event without signals (most traffic): one shared instance.
CLEAN = Verdict(action=Action.ALLOW, score=0, signals=())
# The same for a visitor's repeated click.
CLEAN_REPEAT = Verdict(action=Action.ALLOW, score=0, signals=(), repeat_visit=True)


@dataclass(frozen=True)
class ClickEvent:
    click_id: str
    external_click_id: str
    campaign_id: str
    affiliate_id: str
    coupon_code: str
    ip: str  # canonical, or "" for none
    user_agent: str
    occurred_at: datetime
    code_missed: bool = False  # coupon_code is unknown or mistyped (code guessing)


@dataclass(frozen=True)
class ConversionEvent:
    order_id: str
    campaign_id: str
    affiliate_id: str
    click_id: str
    click_time: datetime | None
    coupon_code: str  # normalized (upper case), "" for none
    coupon_kind: CouponKind
    customer_id: str
    ip: str
    user_agent: str
    occurred_at: datetime
    received_at: datetime
    code_missed: bool = False  # coupon_code is unknown or mistyped (code guessing)


@dataclass(frozen=True)
class ClickCounters:
    """What Redis knew about a click, after counting it."""

    duplicate_of: str | None = None  # the owning click id when this external id is a duplicate
    ip_last_minute: float = 0.0
    ip_last_hour: float = 0.0
    repeat_visit: bool = False  # the visitor clicked for this campaign and affiliate in the last 24 h


@dataclass(frozen=True)
class ConversionCounters:
    ip_in_campaign_day: float = 0.0
    code_distinct_ips: int = 0
    code_distinct_devices: int = 0
    code_spiking: bool = False
    code_rate: float = 0.0
    code_baseline: float = 0.0
    guess_misses: int = 0  # unknown codes of its address or customer id in the guessing window
    guessing: bool = False  # that count is past the threshold


@dataclass(frozen=True)
class CodeAttempt:
    """A code a customer tried; only unknown and mistyped ones (``missed``) are counted."""

    campaign_id: str
    coupon_code: str
    ip: str  # canonical, or "" for none
    customer_id: str
    missed: bool


@dataclass(frozen=True)
class GuessState:
    """Whether an attempt's address or customer id is past the guessing threshold."""

    blocked: bool
    retry_after_seconds: int  # until the window ends, when blocked
    misses: int
    address_blocked: bool = False
    customer_blocked: bool = False


def guessing(misses: int, threshold: int) -> bool:
    """An address or customer id with ``threshold`` unknown codes in the window is guessing codes."""
    return misses >= threshold


def decide(signals: Iterable[Signal], rules: Rules) -> Verdict:
    """Any hard rule rejects; otherwise the capped sum of weights decides."""
    if not signals and rules.reject_score > 0 and rules.review_score > 0:
        return CLEAN
    ordered = tuple(sorted(signals, key=lambda s: -s.weight))
    total = sum(s.weight for s in ordered)
    rejecting = sum(s.weight for s in ordered if not s.review_only)
    score = min(MAX_SCORE, total)
    if any(s.weight >= HARD and not s.review_only for s in ordered) or rejecting >= rules.reject_score:
        action = Action.REJECT
    elif score >= rules.review_score or any(s.review_only for s in ordered):
        action = Action.REVIEW
    else:
        action = Action.ALLOW
    return Verdict(action=action, score=score, signals=ordered)


def ip_signals(info: IpInfo, rules: Rules, *, conversion: bool) -> list[Signal]:
    signals: list[Signal] = []
    if info.tor:
        signals.append(Signal(Code.TOR_EXIT, f"IP is a Tor exit node ({info.tor})", rules.weight(Code.TOR_EXIT)))
    # Most VPN ranges (and all of iCloud Private Relay's) and many Tor exits
    # sit inside hosting ranges too. The more specific list says what the
    # address is: a VPN user is scored lightly, not rejected as a datacenter.
    if info.datacenter and not info.vpn and not info.tor:
        weight = HARD if conversion else rules.weight(Code.DATACENTER_IP)
        signals.append(
            Signal(Code.DATACENTER_IP, f"IP is in a datacenter range ({info.datacenter})", weight)
        )
    if info.vpn:
        signals.append(Signal(Code.VPN_IP, f"IP is in a VPN range ({info.vpn})", rules.weight(Code.VPN_IP)))
    return signals


def user_agent_signals(ua: UaClass, spoof: bool, rules: Rules, *, conversion: bool) -> list[Signal]:
    if spoof:
        return [
            Signal(
                Code.CRAWLER_SPOOF,
                f"user agent claims to be {ua.claimed_name} but the IP is outside its operator's published ranges",
                rules.weight(Code.CRAWLER_SPOOF),
            )
        ]
    # A shop that does not forward the customer's user agent is not evidence
    # of a bot; a click always comes from a client that had to send one.
    if ua.kind is UaKind.EMPTY and conversion:
        return []
    if ua.is_bot:
        return [Signal(Code.BOT_USER_AGENT, ua.detail, rules.weight(Code.BOT_USER_AGENT))]
    return []


def click_signals(event: ClickEvent, counters: ClickCounters, rules: Rules) -> list[Signal]:
    signals: list[Signal] = []
    if counters.duplicate_of is not None:
        signals.append(
            Signal(
                Code.DUPLICATE_CLICK_ID,
                f"affiliate click id {event.external_click_id!r} was already used by click {counters.duplicate_of}",
                rules.weight(Code.DUPLICATE_CLICK_ID),
            )
        )
    if event.ip:
        if counters.ip_last_minute > rules.clicks_per_ip_minute:
            signals.append(
                Signal(
                    Code.CLICK_VELOCITY,
                    f"{counters.ip_last_minute:.0f} clicks from this IP in the last minute "
                    f"(limit {rules.clicks_per_ip_minute})",
                    rules.weight(Code.CLICK_VELOCITY),
                )
            )
        elif counters.ip_last_hour > rules.clicks_per_ip_hour:
            signals.append(
                Signal(
                    Code.CLICK_VELOCITY,
                    f"{counters.ip_last_hour:.0f} clicks from this IP in the last hour "
                    f"(limit {rules.clicks_per_ip_hour})",
                    rules.weight(Code.CLICK_VELOCITY),
                )
            )
    return signals


def _seconds(delta: timedelta) -> float:
    return delta.total_seconds()


def ctit_signals(click_time: datetime | None, occurred_at: datetime, rules: Rules) -> list[Signal]:
    """Click-to-conversion time: instant conversions are injected clicks."""
    if click_time is None:
        return []
    ctit = _seconds(occurred_at - click_time)
    if ctit < rules.ctit_reject_seconds:
        detail = (
            f"conversion {-ctit:.0f}s before its click"
            if ctit < 0
            else f"conversion {ctit:.1f}s after its click (under {rules.ctit_reject_seconds:.0f}s)"
        )
        return [Signal(Code.CTIT_TOO_SHORT, detail, rules.weight(Code.CTIT_TOO_SHORT))]
    if ctit < rules.ctit_risk_seconds:
        return [
            Signal(
                Code.CTIT_SHORT,
                f"conversion {ctit:.0f}s after its click (under {rules.ctit_risk_seconds:.0f}s)",
                rules.weight(Code.CTIT_SHORT),
            )
        ]
    if ctit > rules.ctit_long_seconds:
        return [
            Signal(
                Code.CTIT_LONG,
                f"conversion {ctit / 3600:.1f}h after its click",
                rules.weight(Code.CTIT_LONG),
            )
        ]
    return []


def conversion_signals(event: ConversionEvent, counters: ConversionCounters, rules: Rules) -> list[Signal]:
    signals = ctit_signals(event.click_time, event.occurred_at, rules)
    gap = _seconds(event.received_at - event.occurred_at)
    if gap > rules.late_report_seconds:
        signals.append(
            Signal(
                Code.LATE_REPORT,
                f"reported {gap / 3600:.1f}h after it occurred",
                rules.weight(Code.LATE_REPORT),
            )
        )
    if event.ip and counters.ip_in_campaign_day > rules.conversions_per_ip_campaign_day:
        signals.append(
            Signal(
                Code.CONVERSION_VELOCITY,
                f"{counters.ip_in_campaign_day:.0f} conversions from this IP in this campaign in 24h "
                f"(limit {rules.conversions_per_ip_campaign_day})",
                rules.weight(Code.CONVERSION_VELOCITY),
            )
        )
    if event.coupon_kind is CouponKind.UNIQUE and (
        counters.code_distinct_ips > rules.code_max_distinct
        or counters.code_distinct_devices > rules.code_max_distinct
    ):
        signals.append(
            Signal(
                Code.CODE_SHARING,
                f"unique code {event.coupon_code} tried from {counters.code_distinct_ips} IPs and "
                f"{counters.code_distinct_devices} devices (limit {rules.code_max_distinct})",
                rules.weight(Code.CODE_SHARING),
            )
        )
    if counters.guessing:
        signals.append(
            Signal(
                Code.CODE_GUESSING,
                f"{counters.guess_misses} unknown codes from this customer's address or id in the window",
                rules.weight(Code.CODE_GUESSING),
            )
        )
    if event.coupon_kind is CouponKind.EXCLUSIVE:
        if counters.code_spiking:
            signals.append(
                Signal(
                    Code.CODE_SPIKE,
                    f"exclusive code {event.coupon_code} at {counters.code_rate:.0f} uses per window, "
                    f"against {counters.code_baseline:.1f} usually",
                    rules.weight(Code.CODE_SPIKE),
                    review_only=True,
                )
            )
        if not event.click_id:
            signals.append(
                Signal(
                    Code.EXCLUSIVE_WITHOUT_CLICK,
                    f"exclusive code {event.coupon_code} used without a click",
                    rules.weight(Code.EXCLUSIVE_WITHOUT_CLICK),
                )
            )
    return signals


def click_verdict(
    event: ClickEvent,
    counters: ClickCounters,
    ip_info: IpInfo,
    ua: UaClass,
    spoof: bool,
    rules: Rules,
) -> Verdict:
    signals = [
        *ip_signals(ip_info, rules, conversion=False),
        *user_agent_signals(ua, spoof, rules, conversion=False),
        *click_signals(event, counters, rules),
    ]
    verdict = decide(signals, rules)
    if not counters.repeat_visit:
        return verdict
    return CLEAN_REPEAT if verdict is CLEAN else replace(verdict, repeat_visit=True)


def conversion_verdict(
    event: ConversionEvent,
    counters: ConversionCounters,
    ip_info: IpInfo,
    ua: UaClass,
    spoof: bool,
    rules: Rules,
) -> Verdict:
    signals = [
        *ip_signals(ip_info, rules, conversion=True),
        *user_agent_signals(ua, spoof, rules, conversion=True),
        *conversion_signals(event, counters, rules),
    ]
    return decide(signals, rules)


def parse_weight_overrides(text: str) -> dict[str, int]:
    """``"vpn_ip=25,ctit_long=5"`` -> overrides; raises ValueError naming the bad part."""
    overrides: dict[str, int] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        code, sep, value = part.partition("=")
        code = code.strip()
        if not sep or code not in DEFAULT_WEIGHTS:
            raise ValueError(f"unknown signal in {part!r} (known: {', '.join(sorted(DEFAULT_WEIGHTS))})")
        try:
            weight = int(value)
        except ValueError:
            raise ValueError(f"weight of {code} must be an integer, got {value!r}") from None
        if not 0 <= weight <= HARD:
            raise ValueError(f"weight of {code} must be 0..100, got {weight}")
        overrides[code] = weight
    return overrides

