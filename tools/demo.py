"""`make demo`: seeds a running ascribe (from `make run`) with the README's example.

Creates a campaign, two affiliates and the seed's coupon (SUMMER150: 150
uses, 2025-06-26 to 2025-09-24 UTC extended to a year from now so it can be
tried today, only affiliate aff-a may carry it) through the CatalogService
gRPC API, then prints a tracking link and a postback to try with curl.
"""

from __future__ import annotations

import asyncio
import os
import secrets
from datetime import UTC, datetime, timedelta

import grpc
from ascribe.attribution.v1 import attribution_pb2 as pb
from ascribe.attribution.v1 import attribution_pb2_grpc
from google.protobuf.timestamp_pb2 import Timestamp

from services.common.grpc_server import bearer_metadata


def _timestamp(at: datetime) -> Timestamp:
    stamp = Timestamp()
    stamp.FromDatetime(at)
    return stamp


async def seed(addr: str, gateway: str, admin_token: str | None) -> None:
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
        now = datetime.now(UTC)
        await catalog.CreateCoupon(
            pb.CreateCouponRequest(coupon=pb.Coupon(
                campaign_id=campaign.id, code="SUMMER150", usage_limit=150, affiliate_ids=["aff-a"],
                valid_from=_timestamp(now.replace(hour=0, minute=0, second=0, microsecond=0)),
                valid_until=_timestamp(now + timedelta(days=365)),
            )),
            metadata=metadata, timeout=10,
        )
    print(f"""campaign {campaign.id} created; its postback token (shown once): {campaign.postback_token}

1. A visitor clicks affiliate aff-a's tracking link:
   curl -si '{gateway}/click?campaign_id={campaign.id}&aff_id=aff-a&coupon=SUMMER150&sub1=story' \\
        -A 'Mozilla/5.0 (iPhone; CPU iPhone OS 17_5 like Mac OS X) AppleWebKit/605.1.15 Mobile/15E148' \\
        | grep -i -e '^location' -e '^x-ascribe'

2. The shop's server reports the order, with the click_id from the landing URL:
   curl -s -X POST '{gateway}/postback?campaign_id={campaign.id}&order_id=1001&amount=49.90&discount=5.00&currency=EUR&coupon=SUMMER150&customer_id=cust-1&click_id=<click_id>' \\
        -H 'X-Ascribe-Token: {campaign.postback_token}'

3. A refund gives the use back:
   curl -s -X POST '{gateway}/postback?event=refund&campaign_id={campaign.id}&order_id=1001&refund_id=r-1' \\
        -H 'X-Ascribe-Token: {campaign.postback_token}'""")


def main() -> None:
    addr = os.environ.get("ASCRIBE_ATTRIBUTION_ADDR", "127.0.0.1:50051")
    host = os.environ.get("ASCRIBE_GATEWAY_HOST", "127.0.0.1")
    port = os.environ.get("ASCRIBE_GATEWAY_PORT", "8080")
    asyncio.run(seed(addr, f"http://{host}:{port}", os.environ.get("ASCRIBE_ADMIN_TOKEN")))


if __name__ == "__main__":
    main()
