"""What a campaign, affiliate or coupon must look like before it is stored.

Pure functions over the request protos: each check names the offending field
by its proto path (``coupon.valid_until``, ``coupon.affiliate_ids[1]``) and a
request reports every violation at once (``InvalidArgument``). The values
checked are the normalized ones that will be stored (codes and countries
upper-cased, channels lower-cased), so the same normalizers are used by
``catalog.convert`` when it builds the domain records.

The shape of generated UNIQUE codes is decided here too (the length a batch
needs is a rule about codes, not storage); the alphabet, the check symbol and
the drawing are ``common.code_check``'s.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from urllib.parse import urlsplit

from ascribe.attribution.v1 import attribution_pb2
from google.protobuf import field_mask_pb2, timestamp_pb2
from google.protobuf.descriptor import EnumDescriptor

from services.attribution.common import code_check
from services.attribution.common.coupon_rules import CODE_RULE, is_valid_code, normalize_code
from services.attribution.common.models import Coupon
from services.common import limits, timestamps
from services.common.errors import FailedPrecondition, InvalidArgument, Violations

# Campaign and affiliate ids share one pattern, so they share one limit.
assert limits.CAMPAIGN_ID == limits.AFFILIATE_ID
ID_PATTERN = re.compile(rf"^[A-Za-z0-9_-]{{1,{limits.CAMPAIGN_ID}}}$")
CHANNEL_PATTERN = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,63}$")
PREFIX_PATTERN = re.compile(r"^[A-Z0-9_-]*$")
MAX_NAME_LENGTH = 200
MAX_URL_LENGTH = 2048
MAX_DAYS = 3650
MAX_BASIS_POINTS = 10_000  # 100 %

MAX_PAGE_SIZE = 1000
DEFAULT_PAGE_SIZE = 100

MAX_GENERATED_CODES = 1_000_000
# 10 random symbols are 50 bits: a guesser needs about 10^15 tries per hit
# (the issue asks for at least 40 bits unless the caller wants shorter codes).
DEFAULT_GENERATED_LENGTH = 10
MIN_GENERATED_LENGTH = 4
# Codes people read aloud and type: Crockford's base32 (code_check explains).
CODE_ALPHABET = code_check.ALPHABET
# The code space must dwarf the batch so that collisions stay rare and the
# top-up rounds short (expected collisions of a batch are about count / 2x).
CODE_SPACE_FACTOR = 100

# ISO 4217 codes of currencies in circulation (funds, metals and the testing
# codes are left out: nobody pays an order in them). ANG stays beside its
# successor XCG through the 2025 changeover.
CURRENCIES = frozenset(
    (
        "AED", "AFN", "ALL", "AMD", "ANG", "AOA", "ARS", "AUD", "AWG", "AZN", "BAM", "BBD", "BDT", "BGN",
        "BHD", "BIF", "BMD", "BND", "BOB", "BRL", "BSD", "BTN", "BWP", "BYN", "BZD", "CAD", "CDF", "CHF",
        "CLP", "CNY", "COP", "CRC", "CUP", "CVE", "CZK", "DJF", "DKK", "DOP", "DZD", "EGP", "ERN", "ETB",
        "EUR", "FJD", "FKP", "GBP", "GEL", "GHS", "GIP", "GMD", "GNF", "GTQ", "GYD", "HKD", "HNL", "HTG",
        "HUF", "IDR", "ILS", "INR", "IQD", "IRR", "ISK", "JMD", "JOD", "JPY", "KES", "KGS", "KHR", "KMF",
        "KPW", "KRW", "KWD", "KYD", "KZT", "LAK", "LBP", "LKR", "LRD", "LSL", "LYD", "MAD", "MDL", "MGA",
        "MKD", "MMK", "MNT", "MOP", "MRU", "MUR", "MVR", "MWK", "MXN", "MYR", "MZN", "NAD", "NGN", "NIO",
        "NOK", "NPR", "NZD", "OMR", "PAB", "PEN", "PGK", "PHP", "PKR", "PLN", "PYG", "QAR", "RON", "RSD",
        "RUB", "RWF", "SAR", "SBD", "SCR", "SDG", "SEK", "SGD", "SHP", "SLE", "SOS", "SRD", "SSP", "STN",
        "SVC", "SYP", "SZL", "THB", "TJS", "TMT", "TND", "TOP", "TRY", "TTD", "TWD", "TZS", "UAH", "UGX",
        "USD", "UYU", "UZS", "VED", "VES", "VND", "VUV", "WST", "XAF", "XCD", "XCG", "XOF", "XPF", "YER",
        "ZAR", "ZMW", "ZWG",
    )
)

# ISO 3166-1 alpha-2, plus XK (Kosovo): user-assigned, but what GeoIP
# databases and shops report for it.
COUNTRIES = frozenset(
    (
        "AD", "AE", "AF", "AG", "AI", "AL", "AM", "AO", "AQ", "AR", "AS", "AT", "AU", "AW", "AX", "AZ",
        "BA", "BB", "BD", "BE", "BF", "BG", "BH", "BI", "BJ", "BL", "BM", "BN", "BO", "BQ", "BR", "BS",
        "BT", "BV", "BW", "BY", "BZ", "CA", "CC", "CD", "CF", "CG", "CH", "CI", "CK", "CL", "CM", "CN",
        "CO", "CR", "CU", "CV", "CW", "CX", "CY", "CZ", "DE", "DJ", "DK", "DM", "DO", "DZ", "EC", "EE",
        "EG", "EH", "ER", "ES", "ET", "FI", "FJ", "FK", "FM", "FO", "FR", "GA", "GB", "GD", "GE", "GF",
        "GG", "GH", "GI", "GL", "GM", "GN", "GP", "GQ", "GR", "GS", "GT", "GU", "GW", "GY", "HK", "HM",
        "HN", "HR", "HT", "HU", "ID", "IE", "IL", "IM", "IN", "IO", "IQ", "IR", "IS", "IT", "JE", "JM",
        "JO", "JP", "KE", "KG", "KH", "KI", "KM", "KN", "KP", "KR", "KW", "KY", "KZ", "LA", "LB", "LC",
        "LI", "LK", "LR", "LS", "LT", "LU", "LV", "LY", "MA", "MC", "MD", "ME", "MF", "MG", "MH", "MK",
        "ML", "MM", "MN", "MO", "MP", "MQ", "MR", "MS", "MT", "MU", "MV", "MW", "MX", "MY", "MZ", "NA",
        "NC", "NE", "NF", "NG", "NI", "NL", "NO", "NP", "NR", "NU", "NZ", "OM", "PA", "PE", "PF", "PG",
        "PH", "PK", "PL", "PM", "PN", "PR", "PS", "PT", "PW", "PY", "QA", "RE", "RO", "RS", "RU", "RW",
        "SA", "SB", "SC", "SD", "SE", "SG", "SH", "SI", "SJ", "SK", "SL", "SM", "SN", "SO", "SR", "SS",
        "ST", "SV", "SX", "SY", "SZ", "TC", "TD", "TF", "TG", "TH", "TJ", "TK", "TL", "TM", "TN", "TO",
        "TR", "TT", "TV", "TW", "TZ", "UA", "UG", "UM", "US", "UY", "UZ", "VA", "VC", "VE", "VG", "VI",
        "VN", "VU", "WF", "WS", "XK", "YE", "YT", "ZA", "ZM", "ZW",
    )
)

# Fields a caller may change with Update*; anything else in a mask is refused.
CAMPAIGN_MUTABLE_FIELDS = frozenset(
    {
        "name",
        "landing_url",
        "hold_days",
        "click_lookback_days",
        "max_conversions_per_click",
        "attribution_policy",
        "payout_micros",
        "payout_percent_bp",
        "currency",
        "reuse_unique_after_refund",
        "status",
    }
)
AFFILIATE_MUTABLE_FIELDS = frozenset({"name", "channel", "status"})
COUPON_MUTABLE_FIELDS = frozenset(
    {
        "kind",
        "status",
        "valid_from",
        "valid_until",
        "usage_limit",
        "allow_all_affiliates",
        "affiliate_ids",
        "per_customer_limit",
        "discount_percent_bp",
        "discount_micros",
        "countries",
        "device_types",
        "channels",
        "skus",
        "min_order_micros",
        "assigned_customer_id",
    }
)


# ---------------------------------------------------------------- normalizers


def normalize_currency(currency: str) -> str:
    return currency.strip().upper()


def normalize_country(country: str) -> str:
    return country.strip().upper()


def normalize_channel(channel: str) -> str:
    """Channels are compared exactly by the coupon rules, so one spelling is kept."""
    return channel.strip().lower()


def effective_usage_limit(kind: int, usage_limit: int) -> int:
    """A UNIQUE code is single-use: an unset limit means 1."""
    if kind == attribution_pb2.COUPON_KIND_UNIQUE and usage_limit == 0:
        return 1
    return usage_limit


# ---------------------------------------------------------------- campaigns


def validate_campaign(campaign: attribution_pb2.Campaign, *, field: str = "campaign") -> None:
    """Every rule of a campaign to be stored (created, or merged by an update)."""
    v = Violations()
    _check_id(v, f"{field}.id", campaign.id, required=False)
    _check_name(v, f"{field}.name", campaign.name)
    _check_url(v, f"{field}.landing_url", campaign.landing_url)
    if campaign.HasField("hold_days"):
        _check_range(v, f"{field}.hold_days", campaign.hold_days, 0, MAX_DAYS)
    if campaign.HasField("click_lookback_days"):
        _check_range(v, f"{field}.click_lookback_days", campaign.click_lookback_days, 1, MAX_DAYS)
    if campaign.HasField("max_conversions_per_click"):
        _check_range(v, f"{field}.max_conversions_per_click", campaign.max_conversions_per_click, 0, None)
    _check_enum(v, f"{field}.attribution_policy", attribution_pb2.AttributionPolicy.DESCRIPTOR, campaign.attribution_policy)
    _check_range(v, f"{field}.payout_micros", campaign.payout_micros, 0, None)
    _check_range(v, f"{field}.payout_percent_bp", campaign.payout_percent_bp, 0, MAX_BASIS_POINTS)
    if campaign.payout_micros and campaign.payout_percent_bp:
        v.add(f"{field}.payout_micros", "set at most one of payout_micros and payout_percent_bp")
    currency = normalize_currency(campaign.currency)
    if not currency:
        v.add(f"{field}.currency", "required: an ISO 4217 code such as USD")
    elif currency not in CURRENCIES:
        v.add(f"{field}.currency", f"unknown ISO 4217 currency {campaign.currency!r}")
    _check_enum(v, f"{field}.status", attribution_pb2.CampaignStatus.DESCRIPTOR, campaign.status)
    v.raise_if_any()


# ---------------------------------------------------------------- affiliates


def validate_affiliate(affiliate: attribution_pb2.Affiliate, *, field: str = "affiliate") -> None:
    v = Violations()
    _check_id(v, f"{field}.id", affiliate.id, required=False)
    _check_name(v, f"{field}.name", affiliate.name)
    channel = normalize_channel(affiliate.channel)
    if channel and not CHANNEL_PATTERN.fullmatch(channel):
        v.add(f"{field}.channel", "1..64 of a-z 0-9 _ . - starting with a letter or digit")
    _check_enum(v, f"{field}.status", attribution_pb2.AffiliateStatus.DESCRIPTOR, affiliate.status)
    v.raise_if_any()


# ---------------------------------------------------------------- coupons


def validate_coupon(coupon: attribution_pb2.Coupon, *, field: str = "coupon") -> None:
    """Every rule of a coupon to be stored (created, or merged by an update)."""
    v = Violations()
    code = normalize_code(coupon.code)
    if not is_valid_code(code):
        v.add(f"{field}.code", CODE_RULE)
    _check_coupon_rules(v, coupon, field)
    v.raise_if_any()


def validate_generate_codes(request: attribution_pb2.GenerateCodesRequest) -> None:
    """A GenerateCodes request: a UNIQUE template without a code, and a code shape that fits the count."""
    v = Violations()
    template = request.template
    if not request.HasField("template"):
        v.add("template", "required: the campaign and rules every generated code inherits")
    if template.code:
        v.add("template.code", "must be empty: every generated code is drawn at random")
    if template.assigned_customer_id:
        v.add("template.assigned_customer_id", "must be empty: AssignCode gives each customer one code of the batch")
    if template.kind not in (attribution_pb2.COUPON_KIND_UNSPECIFIED, attribution_pb2.COUPON_KIND_UNIQUE):
        v.add("template.kind", "generated codes are COUPON_KIND_UNIQUE")
    _check_coupon_rules(v, template, "template", kind=attribution_pb2.COUPON_KIND_UNIQUE)
    count = request.count
    if not 1 <= count <= MAX_GENERATED_CODES:
        v.add("count", f"must be 1..{MAX_GENERATED_CODES:,}")
    prefix = normalize_code(request.prefix)
    if not PREFIX_PATTERN.fullmatch(prefix):
        v.add("prefix", "only A-Z 0-9 - _ (case-insensitive)")
    length = generated_length(request.length)
    if length < MIN_GENERATED_LENGTH:
        v.add("length", f"at least {MIN_GENERATED_LENGTH} random characters")
    elif len(prefix) + length + 1 > limits.COUPON_CODE:
        v.add(
            "length",
            f"prefix, random part and check symbol must fit {limits.COUPON_CODE} characters"
            f" ({len(prefix)} + {length} + 1)",
        )
    elif 1 <= count <= MAX_GENERATED_CODES and len(CODE_ALPHABET) ** length < CODE_SPACE_FACTOR * count:
        v.add("length", f"too short for {count:,} codes: use at least {minimum_length(count)}")
    v.raise_if_any()


def generated_length(length: int) -> int:
    return length or DEFAULT_GENERATED_LENGTH


def minimum_length(count: int) -> int:
    length = MIN_GENERATED_LENGTH
    while len(CODE_ALPHABET) ** length < CODE_SPACE_FACTOR * count:
        length += 1
    return length


def generated_shape(request: attribution_pb2.GenerateCodesRequest) -> code_check.CodeShape:
    """The shape of the codes a (validated) GenerateCodes request makes."""
    return code_check.CodeShape(normalize_code(request.prefix), generated_length(request.length))


def _check_coupon_rules(
    v: Violations, coupon: attribution_pb2.Coupon, field: str, *, kind: int | None = None
) -> None:
    """Everything about a coupon but its code (shared with GenerateCodes' template)."""
    kind = coupon.kind if kind is None else kind
    _check_id(v, f"{field}.campaign_id", coupon.campaign_id, required=True)
    _check_enum(v, f"{field}.kind", attribution_pb2.CouponKind.DESCRIPTOR, coupon.kind)
    _check_enum(v, f"{field}.status", attribution_pb2.CouponStatus.DESCRIPTOR, coupon.status)
    valid_from = coupon.valid_from if coupon.HasField("valid_from") else None
    valid_until = coupon.valid_until if coupon.HasField("valid_until") else None
    valid_from_ok = _check_timestamp(v, f"{field}.valid_from", valid_from)
    valid_until_ok = _check_timestamp(v, f"{field}.valid_until", valid_until)
    if (
        valid_from is not None
        and valid_until is not None
        and valid_from_ok
        and valid_until_ok
        and _instant(valid_until) <= _instant(valid_from)
    ):
        v.add(f"{field}.valid_until", "must be after valid_from (valid_from <= t < valid_until)")
    _check_range(v, f"{field}.usage_limit", coupon.usage_limit, 0, None)
    if kind == attribution_pb2.COUPON_KIND_UNIQUE and effective_usage_limit(kind, coupon.usage_limit) != 1:
        v.add(f"{field}.usage_limit", "a UNIQUE code is single-use: 1 (or unset)")
    _check_range(v, f"{field}.per_customer_limit", coupon.per_customer_limit, 0, None)
    _check_range(v, f"{field}.discount_percent_bp", coupon.discount_percent_bp, 0, MAX_BASIS_POINTS)
    _check_range(v, f"{field}.discount_micros", coupon.discount_micros, 0, None)
    if coupon.discount_percent_bp and coupon.discount_micros:
        v.add(f"{field}.discount_micros", "set at most one of discount_percent_bp and discount_micros")
    _check_range(v, f"{field}.min_order_micros", coupon.min_order_micros, 0, None)
    _check_affiliate_access(v, coupon, field, kind)
    _check_list_size(v, f"{field}.countries", coupon.countries)
    for i, country in enumerate(coupon.countries):
        if normalize_country(country) not in COUNTRIES:
            v.add(f"{field}.countries[{i}]", f"not an ISO 3166-1 alpha-2 country: {country!r}")
    _check_list_size(v, f"{field}.device_types", coupon.device_types)
    for i, device in enumerate(coupon.device_types):
        if device == attribution_pb2.DEVICE_TYPE_UNSPECIFIED or not _is_enum_value(
            attribution_pb2.DeviceType.DESCRIPTOR, device
        ):
            v.add(f"{field}.device_types[{i}]", "a DEVICE_TYPE_MOBILE, _DESKTOP, _TABLET or _OTHER")
    _check_list_size(v, f"{field}.channels", coupon.channels)
    for i, channel in enumerate(coupon.channels):
        if not CHANNEL_PATTERN.fullmatch(normalize_channel(channel)):
            v.add(f"{field}.channels[{i}]", "1..64 of a-z 0-9 _ . - starting with a letter or digit")
    _check_list_size(v, f"{field}.skus", coupon.skus)
    for i, sku in enumerate(coupon.skus):
        # Byte limits as a postback's SKUs have, so every SKU a code accepts can be redeemed.
        if not sku.strip() or len(sku.encode()) > limits.SKU:
            v.add(f"{field}.skus[{i}]", f"1..{limits.SKU} bytes")
    if len(coupon.assigned_customer_id.encode()) > limits.CUSTOMER_ID:
        v.add(f"{field}.assigned_customer_id", f"at most {limits.CUSTOMER_ID} bytes")


def _check_affiliate_access(v: Violations, coupon: attribution_pb2.Coupon, field: str, kind: int) -> None:
    ids = list(coupon.affiliate_ids)
    _check_list_size(v, f"{field}.affiliate_ids", ids)
    seen: set[str] = set()
    for i, affiliate_id in enumerate(ids):
        _check_id(v, f"{field}.affiliate_ids[{i}]", affiliate_id, required=True)
        if affiliate_id in seen:
            v.add(f"{field}.affiliate_ids[{i}]", f"{affiliate_id!r} is listed twice")
        seen.add(affiliate_id)
    if kind == attribution_pb2.COUPON_KIND_EXCLUSIVE:
        if not ids:
            v.add(f"{field}.affiliate_ids", "an EXCLUSIVE code needs at least one owner affiliate")
        if coupon.allow_all_affiliates:
            v.add(f"{field}.allow_all_affiliates", "must be false for an EXCLUSIVE code")
    elif coupon.allow_all_affiliates and ids:
        v.add(f"{field}.affiliate_ids", "must be empty when allow_all_affiliates is true")
    if kind == attribution_pb2.COUPON_KIND_UNIQUE and len(ids) > 1:
        v.add(f"{field}.affiliate_ids", "a UNIQUE code has at most one owner affiliate")


# ---------------------------------------------------------------- requests


def validate_id(field: str, value: str) -> None:
    """A required id naming something to read or change."""
    v = Violations()
    _check_id(v, field, value, required=True)
    v.raise_if_any()


def validate_assign_code(request: attribution_pb2.AssignCodeRequest) -> None:
    v = Violations()
    _check_id(v, "campaign_id", request.campaign_id, required=True)
    _check_id(v, "batch_id", request.batch_id, required=True)
    customer = request.customer_id
    if request.affiliate_id:
        # An affiliate's code names it as the code's only affiliate; a
        # customer's code redeems only for that customer: one holder or the other.
        _check_id(v, "affiliate_id", request.affiliate_id, required=True)
        if customer:
            v.add("customer_id", "must be empty when affiliate_id is given: a code goes to one or the other")
    elif not customer.strip():
        v.add("customer_id", "required: the customer (or affiliate_id: the affiliate) who gets the code")
    elif len(customer.encode()) > limits.CUSTOMER_ID or customer != customer.strip():
        v.add("customer_id", f"1..{limits.CUSTOMER_ID} bytes without surrounding spaces")
    elif any(ord(char) < 0x20 or char == "\x7f" for char in customer):
        # PostgreSQL refuses NUL in text, and a shared statement would fail every caller in it.
        v.add("customer_id", "must not contain control characters")
    v.raise_if_any()


def validate_code_lookup(field: str, code: str) -> str:
    """A code a caller looks up, normalized; a malformed one cannot exist."""
    normalized = normalize_code(code)
    if not is_valid_code(normalized):
        raise InvalidArgument.one(field, CODE_RULE)
    return normalized


def page_size(value: int, field: str = "page_size") -> int:
    """0 means the default; more than the maximum is served as the maximum."""
    if value < 0:
        raise InvalidArgument.one(field, "must not be negative")
    return min(value or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)


def mask_paths(
    mask: field_mask_pb2.FieldMask, mutable: frozenset[str], *, field: str = "update_mask"
) -> frozenset[str]:
    """The fields an update changes: the mask's, or every mutable field when it is empty."""
    if not mask.paths:
        return mutable
    v = Violations()
    for i, path in enumerate(mask.paths):
        if path not in mutable:
            v.add(f"{field}.paths[{i}]", f"{path!r} is not a field that can be changed")
    v.raise_if_any()
    return frozenset(mask.paths)


def check_usage_limit(usage_limit: int, used: int) -> None:
    """A limit may be lowered to the uses already taken, never below them."""
    if usage_limit != 0 and usage_limit < used:
        raise FailedPrecondition(f"usage_limit {usage_limit} is below the {used} uses already taken")


def check_affiliate_holder(current: Coupon, new: Coupon) -> None:
    """A code AssignCode handed to an affiliate keeps it as its only affiliate and goes to no customer.

    Otherwise AssignCode would keep answering the code to that affiliate
    while the code no longer credits it (or credits someone else).
    """
    holder = current.assigned_affiliate_id
    if not holder:
        return
    if new.allow_all_affiliates or new.affiliate_ids != (holder,):
        raise FailedPrecondition(
            f"the code was handed to affiliate {holder!r} (AssignCode): its affiliate_ids stay [{holder!r}]"
            " and allow_all_affiliates false"
        )
    if new.assigned_customer_id:
        raise FailedPrecondition(
            f"the code was handed to affiliate {holder!r} (AssignCode): it cannot also go to a customer"
        )


# ---------------------------------------------------------------- helpers


def _check_id(v: Violations, field: str, value: str, *, required: bool) -> None:
    if not value:
        if required:
            v.add(field, "required")
    elif not ID_PATTERN.fullmatch(value):
        v.add(field, f"1..{limits.CAMPAIGN_ID} characters of A-Z a-z 0-9 _ -")


def _check_name(v: Violations, field: str, value: str) -> None:
    if not value.strip():
        v.add(field, "required")
    elif len(value.strip()) > MAX_NAME_LENGTH:
        v.add(field, f"at most {MAX_NAME_LENGTH} characters")


def _check_url(v: Violations, field: str, value: str) -> None:
    if not value:
        v.add(field, "required: an absolute http(s) URL")
        return
    if len(value) > MAX_URL_LENGTH:
        v.add(field, f"at most {MAX_URL_LENGTH} characters")
        return
    try:
        parts = urlsplit(value)
        host = parts.hostname
        parts.port  # noqa: B018 - raises on a malformed port
    except ValueError:
        v.add(field, "not a valid URL")
        return
    if parts.scheme.lower() not in ("http", "https") or not host:
        v.add(field, "must be an absolute http(s) URL, e.g. https://shop.example/landing")
    elif any(ch.isspace() or ord(ch) < 0x20 for ch in value):
        v.add(field, "must not contain whitespace or control characters")


def _check_range(v: Violations, field: str, value: int, low: int, high: int | None) -> None:
    if value < low:
        v.add(field, "must not be negative" if low == 0 else f"must be at least {low}")
    elif high is not None and value > high:
        v.add(field, f"must be at most {high}")


def _is_enum_value(enum: EnumDescriptor, value: int) -> bool:
    return value in enum.values_by_number


def _check_enum(v: Violations, field: str, enum: EnumDescriptor, value: int) -> None:
    if not _is_enum_value(enum, value):
        v.add(field, f"unknown value {value}")


def _check_timestamp(v: Violations, field: str, stamp: timestamp_pb2.Timestamp | None) -> bool:
    if stamp is None:
        return True
    if not timestamps.in_range(stamp.seconds, stamp.nanos):
        v.add(field, "not a valid timestamp (0001-01-01 to 9999-12-31 UTC)")
        return False
    return True


def _instant(stamp: timestamp_pb2.Timestamp) -> tuple[int, int]:
    # PostgreSQL keeps microseconds: compare what will be stored.
    return stamp.seconds, stamp.nanos // 1000


def _check_list_size(v: Violations, field: str, values: Sequence[object] | Iterable[object]) -> None:
    if len(list(values)) > limits.COUPON_LIST_ITEMS:
        v.add(field, f"at most {limits.COUPON_LIST_ITEMS} entries")
