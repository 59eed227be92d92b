"""`make demo`: seeds a running ascribe (from `make run`) and prints commands to try, dated today.

Creates a campaign, two affiliates and the code SUMMER150 (150 uses, only
affiliate aff-a may carry it, valid from today for VALID_DAYS days, UTC)
through the CatalogService gRPC API, then prints shell commands: a click
whose click_id is kept, a wait past the click-to-conversion window, the
postback, a refund, and grpcurl calls whose coupon window is around today.
Every printed date is computed when the demo runs, so the commands work on
the day they are printed (tests/e2e/test_demo.py runs them).
"""

from __future__ import annotations

import asyncio
import math
import os
import secrets
import shutil
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta

import grpc
from ascribe.attribution.v1 import attribution_pb2 as pb
from ascribe.attribution.v1 import attribution_pb2_grpc
from google.protobuf.timestamp_pb2 import Timestamp

from services.common.env import env_float
from services.common.grpc_server import bearer_metadata
from services.fraud.domain import Rules

VALID_DAYS = 90
MOBILE_UA = "Mozilla/5.0 (iPhone; CPU iPhone OS 17_5 like Mac OS X) AppleWebKit/605.1.15 Mobile/15E148"


@dataclass(frozen=True)
class Window:
    """A date-only validity range "first to last (UTC)", both days whole."""

    first: date
    last: date

    @classmethod
    def around(cls, today: date, days: int) -> Window:
        return cls(today, today + timedelta(days=days - 1))

    @property
    def valid_from(self) -> datetime:
        return datetime.combine(self.first, time(), UTC)

    @property
    def valid_until(self) -> datetime:
        """The contract's exclusive end: midnight after the last day."""
        return datetime.combine(self.last + timedelta(days=1), time(), UTC)


def rfc3339(at: datetime) -> str:
    return at.strftime("%Y-%m-%dT%H:%M:%SZ")


def _timestamp(at: datetime) -> Timestamp:
    stamp = Timestamp()
    stamp.FromDatetime(at)
    return stamp


def ctit_wait_seconds() -> int:
    """Seconds to wait between click and postback so the sale is not judged an injected click.

    The fraud service rejects a conversion under ASCRIBE_FRAUD_CTIT_REJECT_SECONDS
    after its click (fraud_ctit_too_short) and sends one under
    ASCRIBE_FRAUD_CTIT_RISK_SECONDS to review; the demo waits past the latter.
    """
    return math.ceil(env_float("ASCRIBE_FRAUD_CTIT_RISK_SECONDS", Rules.ctit_risk_seconds)) + 1


def commands(
    *, gateway: str, grpc_addr: str, campaign_id: str, token: str, window: Window, wait: int, admin: bool
) -> str:
    """The shell commands the demo prints (bash or zsh; curl and, for the admin calls, grpcurl)."""
    auth = ' -H "authorization: Bearer $ASCRIBE_ADMIN_TOKEN"' if admin else ""
    grpcurl = f"grpcurl -plaintext{auth}"
    order = "order_id=1001&amount=49.90&discount=5.00&currency=EUR&coupon=SUMMER150&customer_id=cust-1"
    welcome = (
        f'{{"coupon": {{"campaign_id": "{campaign_id}", "code": "WELCOME10", "allow_all_affiliates": true, '
        f'"discount_percent_bp": 1000, "valid_from": "{rfc3339(window.valid_from)}", '
        f'"valid_until": "{rfc3339(window.valid_until)}"}}}}'
    )
    return f"""\
# 1. A visitor clicks aff-a's tracking link: 302 to the landing page, whose URL carries
#    the click_id (also in the X-Ascribe-Click-Id header, which this keeps):
CLICK_ID=$(curl -s -o /dev/null -D - '{gateway}/click?campaign_id={campaign_id}&aff_id=aff-a&coupon=SUMMER150&sub1=story' \\
    -A '{MOBILE_UA}' | tr -d '\\r' | awk 'tolower($1) == "x-ascribe-click-id:" {{print $2}}')
echo "click_id: $CLICK_ID"

# 2. Wait past the click-to-conversion window: the fraud service rejects a sale that comes
#    sooner than {Rules.ctit_reject_seconds:.0f} s after its click (fraud_ctit_too_short, an injected click) and sends
#    one sooner than {wait - 1} s to review (fraud_ctit_short).
sleep {wait}

# 3. The shop's server reports the order with that click_id: "status": "pending" (30-day hold),
#    "source": "click", "affiliate_id": "aff-a", "payout": "4.99", "coupon_remaining": 149.
curl -s -X POST "{gateway}/postback?campaign_id={campaign_id}&{order}&click_id=$CLICK_ID" \\
    -H 'X-Ascribe-Token: {token}'; echo

# 4. A refund reverses it ("status": "reversed") and gives the use back ("coupon_remaining": 150).
#    The postback of step 3, sent again, would answer the same conversion and change nothing.
curl -s -X POST '{gateway}/postback?event=refund&campaign_id={campaign_id}&order_id=1001&refund_id=r-1' \\
    -H 'X-Ascribe-Token: {token}'; echo

# 5. The admin API over gRPC (grpcurl: see the README's "Try it"). A general code valid
#    {window.first} to {window.last} (UTC), which is stored as {rfc3339(window.valid_from)} to {rfc3339(window.valid_until)}:
{grpcurl} -d '{welcome}' \\
    {grpc_addr} ascribe.attribution.v1.CatalogService/CreateCoupon
{grpcurl} -d '{{"campaign_id": "{campaign_id}", "code": "summer150"}}' \\
    {grpc_addr} ascribe.attribution.v1.CatalogService/GetCoupon
{grpcurl} -d '{{"campaign_id": "{campaign_id}", "order_id": "1001"}}' \\
    {grpc_addr} ascribe.attribution.v1.TrackingService/GetConversion
{grpcurl} -d '{{"campaign_id": "{campaign_id}", "status": "CONVERSION_STATUS_FLAGGED"}}' \\
    {grpc_addr} ascribe.attribution.v1.TrackingService/ListConversions"""


async def seed(addr: str, admin_token: str | None, window: Window) -> pb.Campaign:
    metadata = bearer_metadata(admin_token)
    campaign_id = f"summer-{secrets.token_hex(3)}"
    async with grpc.aio.insecure_channel(addr) as channel:
        catalog = attribution_pb2_grpc.CatalogServiceStub(channel)
        campaign = await catalog.CreateCampaign(
            pb.CreateCampaignRequest(campaign=pb.Campaign(
                id=campaign_id, name="Summer sale", landing_url="https://shop.example/summer?utm_source=aff",
                currency="EUR", payout_percent_bp=1000, hold_days=30,
            )),
            metadata=metadata, timeout=10,
        )
        for affiliate_id, channel_name in (("aff-a", "influencer"), ("aff-b", "social")):
            try:
                await catalog.CreateAffiliate(
                    pb.CreateAffiliateRequest(affiliate=pb.Affiliate(
                        id=affiliate_id, name=affiliate_id, channel=channel_name,
                    )),
                    metadata=metadata, timeout=10,
                )
            except grpc.aio.AioRpcError as error:
                if error.code() != grpc.StatusCode.ALREADY_EXISTS:
                    raise
        await catalog.CreateCoupon(
            pb.CreateCouponRequest(coupon=pb.Coupon(
                campaign_id=campaign.id, code="SUMMER150", usage_limit=150, affiliate_ids=["aff-a"],
                valid_from=_timestamp(window.valid_from), valid_until=_timestamp(window.valid_until),
            )),
            metadata=metadata, timeout=10,
        )
    return campaign


def main() -> None:
    addr = os.environ.get("ASCRIBE_ATTRIBUTION_ADDR", "127.0.0.1:50051")
    host = os.environ.get("ASCRIBE_GATEWAY_HOST", "127.0.0.1")
    port = os.environ.get("ASCRIBE_GATEWAY_PORT", "8080")
    admin_token = os.environ.get("ASCRIBE_ADMIN_TOKEN") or None
    window = Window.around(datetime.now(UTC).date(), VALID_DAYS)
    campaign = asyncio.run(seed(addr, admin_token, window))
    print(f"campaign {campaign.id} created (10 % payout, 30-day hold); its postback token (shown once): "
          f"{campaign.postback_token}")
    print(f"code SUMMER150: 150 uses, only aff-a may carry it, valid {window.first} to {window.last} (UTC)")
    if shutil.which("grpcurl") is None:
        print("(grpcurl is not on PATH: step 5 needs it; the README's \"Try it\" says how to get it)")
    print("\nPaste these into a shell (bash or zsh):\n")
    print(commands(
        gateway=f"http://{host}:{port}", grpc_addr=addr, campaign_id=campaign.id,
        token=campaign.postback_token, window=window, wait=ctit_wait_seconds(), admin=admin_token is not None,
    ))


if __name__ == "__main__":
    main()
