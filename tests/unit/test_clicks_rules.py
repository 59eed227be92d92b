"""Click rules without I/O: validation, judgment, verdicts, redirect URLs."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from ascribe.fraud.v1 import fraud_pb2

from services.attribution.clicks.recorder import (
    ClickInput,
    ClickRecorder,
    apply_verdict,
    redirect_url,
    validate_click,
)
from services.attribution.common.code_check import CodeShape, check_symbol
from services.attribution.common.models import Affiliate, Campaign, Coupon
from services.common.errors import InvalidArgument, NotFound

NOW = datetime(2025, 7, 1, 12, 0, tzinfo=UTC)


def click(**overrides: Any) -> ClickInput:
    values: dict[str, Any] = {"campaign_id": "cmp", "affiliate_id": "aff-a"}
    values.update(overrides)
    return ClickInput(**values)


def violation_fields(error: InvalidArgument) -> list[str]:
    return [name for name, _ in error.violations]


# ---------------------------------------------------------------- validation


def test_a_minimal_click_is_valid_and_happens_now() -> None:
    valid = validate_click(click(), NOW)
    assert valid.occurred_at == NOW
    assert valid.coupon_code == "" and valid.ip == "" and valid.country == ""


def test_codes_are_normalized_and_ips_canonical() -> None:
    valid = validate_click(click(coupon_code=" summer10 ", ip="2001:DB8:0:0::1", country="de"), NOW)
    assert valid.coupon_code == "SUMMER10"
    assert valid.ip == "2001:db8::1"
    assert valid.country == "DE"


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"campaign_id": ""}, "campaign_id"),
        ({"affiliate_id": ""}, "affiliate_id"),
        ({"campaign_id": "c" * 257}, "campaign_id"),
        ({"coupon_code": "X" * 65}, "coupon_code"),
        ({"subs": ("", "", "s" * 257, "", "")}, "sub3"),
        ({"subs": ("é" * 129, "", "", "", "")}, "sub1"),  # 258 bytes in 129 characters
        ({"user_agent": "u" * 1025}, "user_agent"),
        ({"ip": "300.1.1.1"}, "ip"),
        ({"ip": "localhost"}, "ip"),
        ({"external_click_id": "e" * 257}, "external_click_id"),
        ({"country": "DEU"}, "country"),
        ({"user_agent": "bad\x00agent"}, "user_agent"),
        ({"occurred_at": NOW + timedelta(minutes=6)}, "occurred_at"),
    ],
)
def test_bad_input_names_the_field(overrides: dict[str, Any], field: str) -> None:
    with pytest.raises(InvalidArgument) as caught:
        validate_click(click(**overrides), NOW)
    assert violation_fields(caught.value) == [field]


def test_sizes_at_the_limit_are_fine() -> None:
    validate_click(
        click(subs=("s" * 256, "é" * 128, "", "", ""), user_agent="u" * 1024, external_click_id="e" * 256),
        NOW,
    )


def test_every_bad_field_is_reported_at_once() -> None:
    with pytest.raises(InvalidArgument) as caught:
        validate_click(click(campaign_id="", affiliate_id="", ip="nope"), NOW)
    assert violation_fields(caught.value) == ["campaign_id", "affiliate_id", "ip"]


def test_small_clock_skew_is_allowed_and_an_overlong_referer_cut() -> None:
    valid = validate_click(click(occurred_at=NOW + timedelta(minutes=4), referer="r" * 5000), NOW)
    assert valid.occurred_at == NOW + timedelta(minutes=4)
    assert len(valid.referer) == 2048


# ---------------------------------------------------------------- verdicts


def verdict(action: int, *signals: str, score: int = 10) -> fraud_pb2.Verdict:
    return fraud_pb2.Verdict(
        action=action, score=score, signals=[fraud_pb2.Signal(code=code, weight=10) for code in signals]
    )


def test_no_verdict_flags_with_fraud_unavailable() -> None:
    assert apply_verdict("accepted", None) == ("flagged", ["fraud_unavailable"], 0)


def test_verdict_actions_map_to_decisions_with_prefixed_signals() -> None:
    assert apply_verdict("accepted", verdict(fraud_pb2.VERDICT_ACTION_ALLOW)) == ("accepted", [], 10)
    assert apply_verdict("accepted", verdict(fraud_pb2.VERDICT_ACTION_REVIEW, "vpn_ip", score=55)) == (
        "flagged",
        ["fraud_vpn_ip"],
        55,
    )
    assert apply_verdict(
        "accepted", verdict(fraud_pb2.VERDICT_ACTION_REJECT, "duplicate_click_id", "bot_user_agent", score=100)
    ) == ("rejected", ["fraud_duplicate_click_id", "fraud_bot_user_agent"], 100)


def test_a_signal_switched_off_by_weight_zero_is_no_reason() -> None:
    """The same rule as conversions: an operator turns a signal off with weight 0."""
    switched_off = fraud_pb2.Verdict(
        action=fraud_pb2.VERDICT_ACTION_REVIEW, score=60,
        signals=[fraud_pb2.Signal(code="ctit_long", weight=0), fraud_pb2.Signal(code="vpn_ip", weight=60)],
    )
    assert apply_verdict("accepted", switched_off) == ("flagged", ["fraud_vpn_ip"], 60)


def test_a_rejected_click_stays_rejected() -> None:
    assert apply_verdict("rejected", verdict(fraud_pb2.VERDICT_ACTION_ALLOW))[0] == "rejected"
    assert apply_verdict("rejected", None)[0] == "rejected"


# ---------------------------------------------------------------- redirects


def test_redirect_appends_click_id_and_coupon_keeping_the_landing_query() -> None:
    url = redirect_url("https://shop.example/sale?utm_source=aff&x=a%20b+c", "CID", "SUMMER10")
    assert url == "https://shop.example/sale?utm_source=aff&x=a%20b+c&click_id=CID&coupon=SUMMER10"


def test_redirect_replaces_an_existing_click_id_and_keeps_the_fragment() -> None:
    url = redirect_url("https://shop.example/p?click_id=OLD&a=1&Click_Id=keep&click%5Fid=OLD2#top", "NEW", "")
    assert url == "https://shop.example/p?a=1&Click_Id=keep&click_id=NEW#top"


@pytest.mark.parametrize("code", ["a b", "AB", "save&10"])
def test_a_malformed_code_is_kept_but_marked_for_unknown_coupon(code: str) -> None:
    valid = validate_click(ClickInput(campaign_id="c", affiliate_id="a", coupon_code=code), NOW)
    assert valid.coupon_code == code.upper() and not valid.coupon_well_formed
    well_formed = validate_click(ClickInput(campaign_id="c", affiliate_id="a", coupon_code="summer10"), NOW)
    assert well_formed.coupon_well_formed


def test_redirect_percent_encodes_a_malformed_code() -> None:
    url = redirect_url("https://shop.example/sale?x=1", "CID", "SAVE&10 #")
    assert url == "https://shop.example/sale?x=1&click_id=CID&coupon=SAVE%2610%20%23"


def test_redirect_without_a_query() -> None:
    assert redirect_url("https://shop.example", "CID", "") == "https://shop.example?click_id=CID"
    assert redirect_url("https://shop.example/", "CID", "") == "https://shop.example/?click_id=CID"


def test_the_links_coupon_replaces_a_landing_coupon_only_when_given() -> None:
    landing = "https://shop.example/?coupon=HOUSE"
    assert redirect_url(landing, "CID", "") == "https://shop.example/?coupon=HOUSE&click_id=CID"
    assert redirect_url(landing, "CID", "SUMMER10") == "https://shop.example/?click_id=CID&coupon=SUMMER10"


# ---------------------------------------------------------------- judgment


class FakeCatalog:
    """The CatalogCache interface over dicts (no I/O)."""

    def __init__(self, campaigns: list[Campaign], affiliates: list[Affiliate], coupons: list[Coupon]) -> None:
        self.campaigns = {c.id: c for c in campaigns}
        self.affiliates = {a.id: a for a in affiliates}
        self.coupons = {(c.campaign_id, c.code): c for c in coupons}

    async def campaign(self, campaign_id: str) -> Campaign | None:
        return self.campaigns.get(campaign_id)

    async def affiliate(self, affiliate_id: str) -> Affiliate | None:
        return self.affiliates.get(affiliate_id)

    async def coupon(self, campaign_id: str, code: str) -> Coupon | None:
        return self.coupons.get((campaign_id, code))

    async def code_shapes(self, campaign_id: str) -> tuple[CodeShape, ...]:
        return (CodeShape("GEN", 6),) if campaign_id == "cmp" else ()


@pytest.fixture
def recorder() -> ClickRecorder:
    catalog = FakeCatalog(
        [
            Campaign(id="cmp", name="Summer", landing_url="https://shop.example/", currency="EUR"),
            Campaign(id="old", name="Old", landing_url="https://old.example/", currency="EUR", status="ended"),
        ],
        [Affiliate(id="aff-a", name="A"), Affiliate(id="aff-b", name="B"), Affiliate(id="aff-p", name="P", status="paused")],
        [
            Coupon(campaign_id="cmp", code="ONLYA", affiliate_ids=("aff-a",)),
            Coupon(campaign_id="cmp", code="PAUSED", status="paused", allow_all_affiliates=True),
            Coupon(campaign_id="cmp", code="OVER", valid_until=NOW - timedelta(seconds=1), allow_all_affiliates=True),
        ],
    )
    return ClickRecorder(pool=None, cache=catalog, fraud=None)  # type: ignore[arg-type]


async def test_a_selected_affiliate_tracks_the_code(recorder: ClickRecorder) -> None:
    judged = await recorder._judge(click(coupon_code="onlya"), NOW)
    assert (judged.decision, judged.tracked_code, judged.reasons) == ("accepted", "ONLYA", [])
    assert judged.row().requested_coupon_code == "ONLYA"


@pytest.mark.parametrize(
    ("affiliate_id", "code", "reasons"),
    [
        ("aff-b", "ONLYA", ["affiliate_not_allowed"]),
        ("aff-a", "NOPE", ["unknown_coupon"]),
        # The shape of the campaign's batch GEN + 6 (FakeCatalog.code_shapes), a wrong check symbol.
        ("aff-a", "GENK7Q2MX" + ("1" if check_symbol("K7Q2MX") != "1" else "2"), ["coupon_mistyped"]),
        # The same shape with its right check symbol was never issued: unknown.
        ("aff-a", "GENK7Q2MX" + check_symbol("K7Q2MX"), ["unknown_coupon"]),
        ("aff-a", "PAUSED", ["coupon_inactive"]),
        ("aff-a", "OVER", ["coupon_expired"]),
    ],
)
async def test_a_code_failing_its_rules_is_not_tracked_but_the_click_stays_accepted(
    recorder: ClickRecorder, affiliate_id: str, code: str, reasons: list[str]
) -> None:
    judged = await recorder._judge(click(affiliate_id=affiliate_id, coupon_code=code), NOW)
    assert (judged.decision, judged.tracked_code, judged.reasons) == ("accepted", "", reasons)
    row = judged.row()
    assert row.coupon_code is None and row.requested_coupon_code == code
    assert judged.outcome().redirect_url.endswith(f"&coupon={code}")


@pytest.mark.parametrize(
    ("campaign_id", "affiliate_id", "reasons"),
    [
        ("cmp", "aff-p", ["affiliate_inactive"]),
        ("cmp", "ghost", ["unknown_affiliate"]),
        ("old", "aff-a", ["campaign_inactive"]),
    ],
)
async def test_inactive_parties_reject_the_click_but_still_redirect(
    recorder: ClickRecorder, campaign_id: str, affiliate_id: str, reasons: list[str]
) -> None:
    judged = await recorder._judge(click(campaign_id=campaign_id, affiliate_id=affiliate_id), NOW)
    assert judged.decision == "rejected" and judged.reasons == reasons
    assert "click_id=" + judged.click_id in judged.outcome().redirect_url


async def test_an_unknown_campaign_is_not_found(recorder: ClickRecorder) -> None:
    with pytest.raises(NotFound):
        await recorder._judge(click(campaign_id="nope"), NOW)
