"""One source for every input limit: the protos' annotations, read by every layer."""

from __future__ import annotations

from collections import defaultdict
from datetime import UTC, datetime

import pytest
from ascribe.attribution.v1 import attribution_pb2 as apb
from ascribe.fraud.v1 import fraud_pb2 as fpb
from ascribe.options.v1 import limits_pb2
from google.protobuf.descriptor import Descriptor, FileDescriptor

from gateway import params
from services.attribution.catalog import rules as catalog_rules
from services.attribution.conversions.servicer import conversion_input
from services.common import limits
from services.common.errors import InvalidArgument

# Fields that bound the same thing under another name.
SAME_THING = {"code": "coupon_code", "assigned_customer_id": "customer_id"}


def _messages(file: FileDescriptor) -> list[Descriptor]:
    found: list[Descriptor] = []

    def walk(message: Descriptor) -> None:
        found.append(message)
        for nested in message.nested_types:
            walk(nested)

    for message in file.message_types_by_name.values():
        walk(message)
    return found


def _annotated() -> dict[str, set[int]]:
    """Every annotated field name (of both services' protos) with the byte limits it carries.

    (How many entries a list may hold is the message's own business: a coupon
    may name 1,000 SKUs, an order carries at most 200.)
    """
    seen: dict[str, set[int]] = defaultdict(set)
    for file in (apb.DESCRIPTOR, fpb.DESCRIPTOR):
        for message in _messages(file):
            for field in message.fields:
                options = field.GetOptions()
                if options.HasExtension(limits_pb2.limits):
                    bound = options.Extensions[limits_pb2.limits]
                    if bound.max_bytes:
                        seen[SAME_THING.get(field.name, field.name)].add(bound.max_bytes)
    return seen


def test_a_field_name_has_one_limit_in_every_message_of_both_services() -> None:
    disagreements = {name: bounds for name, bounds in _annotated().items() if len(bounds) > 1}
    assert disagreements == {}


def test_the_named_limits_are_the_annotations() -> None:
    annotated = _annotated()
    for name, constant in {
        "campaign_id": limits.CAMPAIGN_ID, "affiliate_id": limits.AFFILIATE_ID, "coupon_code": limits.COUPON_CODE,
        "click_id": limits.CLICK_ID, "order_id": limits.ORDER_ID, "customer_id": limits.CUSTOMER_ID,
        "user_agent": limits.USER_AGENT, "ip": limits.IP, "external_click_id": limits.EXTERNAL_CLICK_ID,
    }.items():
        assert annotated[name] == {constant}, name
    assert annotated["skus"] == {limits.SKU}


def test_an_unannotated_field_is_a_loud_error_not_a_silent_zero() -> None:
    with pytest.raises(LookupError):
        limits.max_bytes(apb.RecordClickRequest.DESCRIPTOR, "country")


# ---------------------------------------------------------------- each layer at the limit


def _postback(**extra: list[str]) -> params.Params:
    base = {"campaign_id": ["c"], "order_id": ["o"], "amount": ["10.00"], "currency": ["EUR"]}
    return {**base, **extra}


@pytest.mark.parametrize(
    ("parameter", "limit"),
    [("campaign_id", limits.CAMPAIGN_ID), ("order_id", limits.ORDER_ID), ("click_id", limits.CLICK_ID),
     ("customer_id", limits.CUSTOMER_ID), ("coupon", limits.COUPON_CODE), ("ua", limits.USER_AGENT),
     ("sku", limits.SKU)],
)
def test_gateway_postback_takes_the_limit_and_refuses_one_byte_more(parameter: str, limit: int) -> None:
    params.conversion_request(_postback(**{parameter: ["A" * limit]}), "token")
    with pytest.raises(params.ParamError) as error:
        params.conversion_request(_postback(**{parameter: ["A" * (limit + 1)]}), "token")
    assert error.value.field == parameter


def test_gateway_click_takes_the_limits() -> None:
    click = {"campaign_id": ["C" * limits.CAMPAIGN_ID], "aff_id": ["A" * limits.AFFILIATE_ID]}
    params.click_request(click, ip="", user_agent="U" * limits.USER_AGENT, referer="")
    with pytest.raises(params.ParamError) as error:
        params.click_request({**click, "aff_id": ["A" * (limits.AFFILIATE_ID + 1)]}, ip="", user_agent="", referer="")
    assert error.value.field == "aff_id"


def test_attribution_takes_every_postback_the_gateway_takes() -> None:
    request = params.conversion_request(
        _postback(
            campaign_id=["C" * limits.CAMPAIGN_ID], order_id=["O" * limits.ORDER_ID],
            customer_id=["U" * limits.CUSTOMER_ID], ua=["M" * limits.USER_AGENT],
            sku=["S" * limits.SKU] * limits.SKUS_PER_ORDER,
        ),
        "token",
    )
    converted = conversion_input(request, datetime.now(UTC))
    assert len(converted.skus) == limits.SKUS_PER_ORDER


def test_every_sku_a_coupon_accepts_a_postback_accepts_too() -> None:
    """The bug this module fixed: coupons took 256-character SKUs that postbacks refused past 128 bytes."""
    sku = "S" * limits.SKU
    catalog_rules.validate_coupon(apb.Coupon(code="SKUS", campaign_id="c", kind=apb.COUPON_KIND_GENERAL,
                                             allow_all_affiliates=True, skus=[sku]))
    with pytest.raises(InvalidArgument):
        catalog_rules.validate_coupon(apb.Coupon(code="SKUS", campaign_id="c", kind=apb.COUPON_KIND_GENERAL,
                                                 allow_all_affiliates=True, skus=[sku + "S"]))
    request = params.conversion_request(_postback(sku=[sku]), "token")
    assert list(conversion_input(request, datetime.now(UTC)).skus) == [sku]
