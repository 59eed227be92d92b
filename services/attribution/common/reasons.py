"""Every reason word a click or conversion can carry, and what each one does.

The words are the contract's (ARCHITECTURE.md section 4, ``reasons``): stable
snake_case, stored with the event and shown to shops and reviewers.
tests/unit/test_reasons.py ties this module to that list. Fraud signals reach
us as the fraud service's signal codes with ``fraud_`` in front (``fraud_reason``).
"""

from __future__ import annotations

# The campaign and the affiliate credited.
CAMPAIGN_INACTIVE = "campaign_inactive"
POSTBACK_TOO_LATE = "postback_too_late"
UNKNOWN_AFFILIATE = "unknown_affiliate"
AFFILIATE_INACTIVE = "affiliate_inactive"
AFFILIATE_NOT_ALLOWED = "affiliate_not_allowed"

# The click a conversion names.
UNKNOWN_CLICK = "unknown_click"
CLICK_OUTSIDE_LOOKBACK = "click_outside_lookback"
CLICK_REJECTED = "click_rejected"
CLICK_ALREADY_CONVERTED = "click_already_converted"

# The code's own rules.
UNKNOWN_COUPON = "unknown_coupon"
# A code shaped like one of the campaign's generated batches (prefix, length,
# alphabet) whose check symbol does not fit: a typo, not a guess.
COUPON_MISTYPED = "coupon_mistyped"
COUPON_INACTIVE = "coupon_inactive"
COUPON_NOT_YET_VALID = "coupon_not_yet_valid"
COUPON_EXPIRED = "coupon_expired"
COUPON_ON_HOLD = "coupon_on_hold"
CUSTOMER_NOT_ASSIGNED = "customer_not_assigned"
CUSTOMER_ID_REQUIRED = "customer_id_required"
RESTRICTION_COUNTRY = "restriction_country"
RESTRICTION_DEVICE = "restriction_device"
RESTRICTION_CHANNEL = "restriction_channel"
RESTRICTION_SKU = "restriction_sku"
BELOW_MIN_ORDER = "below_min_order"
CURRENCY_MISMATCH = "currency_mismatch"

# The limits taken with the use (step 6).
USAGE_LIMIT_REACHED = "usage_limit_reached"
CUSTOMER_LIMIT_REACHED = "customer_limit_reached"

# A list of reasons inside one text field of a row (the multi-row writes'
# row types): the words are snake_case, so a comma never occurs in one.
REASONS_SEPARATOR = ","

# Experiments (issue #17): the click is in a holdout experiment's control
# arm, so its code was not tracked nor passed on to the landing page.
EXPERIMENT_HOLDOUT = "experiment_holdout"

# Fraud.
FRAUD_PREFIX = "fraud_"
FRAUD_UNAVAILABLE = "fraud_unavailable"


def fraud_reason(signal_code: str) -> str:
    """The reason word of a fraud signal (``tor_exit`` -> ``fraud_tor_exit``)."""
    return FRAUD_PREFIX + signal_code


def is_fraud(reason: str) -> bool:
    return reason.startswith(FRAUD_PREFIX)


# Reasons that make a click ineligible for credit without rejecting the sale.
CLICK_REASONS = frozenset({UNKNOWN_CLICK, CLICK_OUTSIDE_LOOKBACK, CLICK_REJECTED, CLICK_ALREADY_CONVERTED})

# Rejections the shop can fix by posting the order again with other content
# (the static reasons of step 4): such an order is judged anew.
FIXABLE_REASONS = frozenset(
    {
        UNKNOWN_AFFILIATE,
        AFFILIATE_INACTIVE,
        UNKNOWN_COUPON,
        COUPON_MISTYPED,
        COUPON_INACTIVE,
        COUPON_NOT_YET_VALID,
        COUPON_EXPIRED,
        AFFILIATE_NOT_ALLOWED,
        CUSTOMER_NOT_ASSIGNED,
        RESTRICTION_COUNTRY,
        RESTRICTION_DEVICE,
        RESTRICTION_CHANNEL,
        RESTRICTION_SKU,
        BELOW_MIN_ORDER,
        CURRENCY_MISMATCH,
        CUSTOMER_ID_REQUIRED,
    }
)

# Reasons that send a conversion to a person (its use held) rather than reject it.
FLAGGING_REASONS = frozenset({COUPON_ON_HOLD, FRAUD_UNAVAILABLE})


def rejects(reason: str) -> bool:
    """Whether ``reason`` alone rejects the event (fraud signals included: their verdict decides)."""
    return reason not in CLICK_REASONS and reason not in FLAGGING_REASONS


def rejects_statically(reason: str) -> bool:
    """Whether ``reason`` rejects before any fraud verdict (steps 3 and 4)."""
    return rejects(reason) and not is_fraud(reason)


# Every reason word above, for the contract test.
ALL = frozenset(
    value for name, value in dict(globals()).items() if name.isupper() and isinstance(value, str) and name not in ("FRAUD_PREFIX", "REASONS_SEPARATOR")
)
