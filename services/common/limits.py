"""Every input limit, read from the annotations on the proto fields.

The protos declare each bound once (``[(ascribe.options.v1.limits) = {max_bytes: 64}]``,
see protos/ascribe/options/v1/limits.proto); the gateway's parameters and the
attribution and fraud services' validation all use the constants below, so
the layers cannot drift apart again (a coupon once accepted SKUs a postback
refused). Strings are bounded in UTF-8 bytes.
"""

from __future__ import annotations

from ascribe.attribution.v1 import attribution_pb2 as apb
from ascribe.options.v1 import limits_pb2
from google.protobuf.descriptor import Descriptor


def _limits(message: Descriptor, field: str) -> limits_pb2.FieldLimits:
    options = message.fields_by_name[field].GetOptions()
    if not options.HasExtension(limits_pb2.limits):
        raise LookupError(f"{message.full_name}.{field} declares no limits")
    found: limits_pb2.FieldLimits = options.Extensions[limits_pb2.limits]
    return found


def max_bytes(message: Descriptor, field: str) -> int:
    """The annotated byte limit of a string field (LookupError when it has none)."""
    value = _limits(message, field).max_bytes
    if not value:
        raise LookupError(f"{message.full_name}.{field} declares no max_bytes")
    return int(value)


def max_items(message: Descriptor, field: str) -> int:
    """The annotated entry limit of a repeated field (LookupError when it has none)."""
    value = _limits(message, field).max_items
    if not value:
        raise LookupError(f"{message.full_name}.{field} declares no max_items")
    return int(value)


_CLICK = apb.RecordClickRequest.DESCRIPTOR
_CONVERSION = apb.RecordConversionRequest.DESCRIPTOR
_REFUND = apb.ReverseConversionRequest.DESCRIPTOR

# Names of things (tests/unit/test_limits.py checks that every message
# annotating a field of the same name agrees with these).
CAMPAIGN_ID = max_bytes(_CLICK, "campaign_id")
AFFILIATE_ID = max_bytes(_CLICK, "affiliate_id")
COUPON_CODE = max_bytes(_CLICK, "coupon_code")
CLICK_ID = max_bytes(_CONVERSION, "click_id")
EXTERNAL_CLICK_ID = max_bytes(_CLICK, "external_click_id")
ORDER_ID = max_bytes(_CONVERSION, "order_id")
REFUND_ID = max_bytes(_REFUND, "refund_id")
CUSTOMER_ID = max_bytes(_CONVERSION, "customer_id")
SUB_ID = max_bytes(_CLICK, "sub1")
IP = max_bytes(_CLICK, "ip")
USER_AGENT = max_bytes(_CLICK, "user_agent")
REFERER = max_bytes(_CLICK, "referer")
REASON = max_bytes(_REFUND, "reason")
POSTBACK_TOKEN = max_bytes(_CONVERSION, "postback_token")
SKU = max_bytes(_CONVERSION, "skus")
SKUS_PER_ORDER = max_items(_CONVERSION, "skus")
CLICKS_PER_BATCH = max_items(apb.RecordClickBatchRequest.DESCRIPTOR, "requests")
VALIDATIONS_PER_BATCH = max_items(apb.ValidateCouponBatchRequest.DESCRIPTOR, "requests")
# Every list of a coupon's rules (affiliates, countries, devices, channels, SKUs).
COUPON_LIST_ITEMS = max_items(apb.Coupon.DESCRIPTOR, "skus")
# Experiments (issue #17).
VISITOR_ID = max_bytes(_CLICK, "vid")
UNIT_ID = max_bytes(apb.AssignVariantRequest.DESCRIPTOR, "unit_id")
EXPERIMENT_NAME = max_bytes(apb.Experiment.DESCRIPTOR, "name")

# Reports.
TIME_ZONE = max_bytes(apb.GetReportRequest.DESCRIPTOR, "time_zone")
EXPERIMENT_ID = max_bytes(apb.GetReportRequest.DESCRIPTOR, "experiment_id")
