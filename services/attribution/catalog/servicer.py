"""CatalogService: proto <-> domain translation for campaigns, affiliates, coupons.

Each RPC validates its request (``catalog.rules``), converts it
(``catalog.convert``) and calls the store (``catalog.store``); errors are
domain exceptions that the server's interceptor turns into statuses.

Updates follow the contract's field masks: the stored record is turned into
its proto, the masked fields are copied over from the request (an empty mask
copies every mutable field, as a full replacement), and the merged message is
validated and stored as a whole, so a partial update cannot leave a record
that a create would refuse (a window that ends before it starts, two payout
fields). Unset values in a copied field take the create defaults.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from typing import Any, TypeVar

import asyncpg
import grpc
from ascribe.attribution.v1 import attribution_pb2, attribution_pb2_grpc
from google.protobuf.message import Message

from services.attribution.catalog import import_rules, rules, store
from services.attribution.catalog.assigner import CodeAssigner
from services.attribution.catalog.convert import (
    affiliate_from_proto,
    affiliate_to_proto,
    campaign_from_proto,
    campaign_to_proto,
    coupon_from_proto,
    coupon_status_from_proto,
    coupon_to_proto,
    decode_page_token,
    encode_page_token,
)
from services.attribution.checkout.validator import CheckoutValidator
from services.attribution.common import code_check
from services.attribution.common.models import Affiliate, Campaign, Coupon
from services.attribution.webhooks.servicer import WebhookRpcs
from services.attribution.webhooks.settings import WebhookConfig
from services.common import limits
from services.common.errors import InvalidArgument, Unavailable
from services.common.grpc_server import presented_token

Context = grpc.aio.ServicerContext[Any, Any]

CAMPAIGN_ID_PREFIX = "cmp_"
AFFILIATE_ID_PREFIX = "aff_"
BATCH_ID_PREFIX = "bat_"
# A batch at least this large has the planner's statistics refreshed right
# after it commits (store.TableAnalyzer says why); a smaller one waits for
# autovacuum: sorting a few thousand codes per AssignCode statement is cheap.
ANALYZE_AFTER_CODES = 10_000

T = TypeVar("T")


class CatalogServicer(attribution_pb2_grpc.CatalogServiceServicer):
    def __init__(
        self, pool: asyncpg.Pool, webhooks: WebhookRpcs | None = None, validator: CheckoutValidator | None = None
    ) -> None:
        self._pool = pool
        self._assigner = CodeAssigner(pool)
        self._analyzer = store.TableAnalyzer(pool)
        self._webhooks = webhooks or WebhookRpcs(pool, WebhookConfig())
        self._validator = validator

    async def close(self) -> None:
        """Stops a statistics refresh still running (before the pool closes)."""
        await self._analyzer.close()

    # ------------------------------------------------------------ checkout

    async def ValidateCoupon(
        self, request: attribution_pb2.ValidateCouponRequest, context: Context
    ) -> attribution_pb2.ValidateCouponResponse:
        """Open at the interceptor: the validator checks the postback token or the admin token itself."""
        if self._validator is None:
            raise Unavailable("checkout validation is not configured on this server")
        return await self._validator.validate(request, presented_token(context.invocation_metadata()), context.peer())

    async def ValidateCouponBatch(
        self, request: attribution_pb2.ValidateCouponBatchRequest, context: Context
    ) -> attribution_pb2.ValidateCouponBatchResponse:
        if self._validator is None:
            raise Unavailable("checkout validation is not configured on this server")
        if len(request.requests) > limits.VALIDATIONS_PER_BATCH:
            raise InvalidArgument.one("requests", f"at most {limits.VALIDATIONS_PER_BATCH} requests per batch")
        return await self._validator.validate_batch(
            request.requests, presented_token(context.invocation_metadata()), context.peer()
        )

    # ------------------------------------------------------------ campaigns

    async def CreateCampaign(
        self, request: attribution_pb2.CreateCampaignRequest, context: Context
    ) -> attribution_pb2.Campaign:
        rules.validate_campaign(request.campaign)
        campaign_id = request.campaign.id or store.new_id(CAMPAIGN_ID_PREFIX)
        campaign, token = await store.insert_campaign(
            self._pool, campaign_from_proto(request.campaign, campaign_id=campaign_id)
        )
        return campaign_to_proto(campaign, postback_token=token)

    async def GetCampaign(
        self, request: attribution_pb2.GetCampaignRequest, context: Context
    ) -> attribution_pb2.Campaign:
        rules.validate_id("campaign_id", request.campaign_id)
        return campaign_to_proto(await store.get_campaign(self._pool, request.campaign_id))

    async def UpdateCampaign(
        self, request: attribution_pb2.UpdateCampaignRequest, context: Context
    ) -> attribution_pb2.Campaign:
        rules.validate_id("campaign.id", request.campaign.id)
        paths = rules.mask_paths(request.update_mask, rules.CAMPAIGN_MUTABLE_FIELDS)

        def change(current: Campaign) -> Campaign:
            merged = campaign_to_proto(current)
            _copy_fields(request.campaign, merged, paths)
            rules.validate_campaign(merged)
            return campaign_from_proto(merged, campaign_id=current.id)

        return campaign_to_proto(await store.update_campaign(self._pool, request.campaign.id, change))

    async def ListCampaigns(
        self, request: attribution_pb2.ListCampaignsRequest, context: Context
    ) -> attribution_pb2.ListCampaignsResponse:
        size = rules.page_size(request.page_size)
        after = decode_page_token(request.page_token, "campaigns")
        campaigns = await store.list_campaigns(self._pool, after=after, limit=size + 1)
        page, next_token = _page(campaigns, size, "campaigns", lambda c: c.id)
        return attribution_pb2.ListCampaignsResponse(
            campaigns=[campaign_to_proto(c) for c in page], next_page_token=next_token
        )

    async def RotatePostbackToken(
        self, request: attribution_pb2.RotatePostbackTokenRequest, context: Context
    ) -> attribution_pb2.Campaign:
        rules.validate_id("campaign_id", request.campaign_id)
        campaign, token = await store.rotate_postback_token(self._pool, request.campaign_id)
        return campaign_to_proto(campaign, postback_token=token)

    # ------------------------------------------------------------ affiliates

    async def CreateAffiliate(
        self, request: attribution_pb2.CreateAffiliateRequest, context: Context
    ) -> attribution_pb2.Affiliate:
        rules.validate_affiliate(request.affiliate)
        affiliate_id = request.affiliate.id or store.new_id(AFFILIATE_ID_PREFIX)
        affiliate = await store.insert_affiliate(
            self._pool, affiliate_from_proto(request.affiliate, affiliate_id=affiliate_id)
        )
        return affiliate_to_proto(affiliate)

    async def GetAffiliate(
        self, request: attribution_pb2.GetAffiliateRequest, context: Context
    ) -> attribution_pb2.Affiliate:
        rules.validate_id("affiliate_id", request.affiliate_id)
        return affiliate_to_proto(await store.get_affiliate(self._pool, request.affiliate_id))

    async def UpdateAffiliate(
        self, request: attribution_pb2.UpdateAffiliateRequest, context: Context
    ) -> attribution_pb2.Affiliate:
        rules.validate_id("affiliate.id", request.affiliate.id)
        paths = rules.mask_paths(request.update_mask, rules.AFFILIATE_MUTABLE_FIELDS)

        def change(current: Affiliate) -> Affiliate:
            merged = affiliate_to_proto(current)
            _copy_fields(request.affiliate, merged, paths)
            rules.validate_affiliate(merged)
            return affiliate_from_proto(merged, affiliate_id=current.id)

        return affiliate_to_proto(await store.update_affiliate(self._pool, request.affiliate.id, change))

    async def ListAffiliates(
        self, request: attribution_pb2.ListAffiliatesRequest, context: Context
    ) -> attribution_pb2.ListAffiliatesResponse:
        size = rules.page_size(request.page_size)
        after = decode_page_token(request.page_token, "affiliates")
        affiliates = await store.list_affiliates(self._pool, after=after, limit=size + 1)
        page, next_token = _page(affiliates, size, "affiliates", lambda a: a.id)
        return attribution_pb2.ListAffiliatesResponse(
            affiliates=[affiliate_to_proto(a) for a in page], next_page_token=next_token
        )

    # ------------------------------------------------------------ coupons

    async def CreateCoupon(
        self, request: attribution_pb2.CreateCouponRequest, context: Context
    ) -> attribution_pb2.Coupon:
        rules.validate_coupon(request.coupon)
        return coupon_to_proto(await store.insert_coupon(self._pool, coupon_from_proto(request.coupon)))

    async def GetCoupon(
        self, request: attribution_pb2.GetCouponRequest, context: Context
    ) -> attribution_pb2.Coupon:
        rules.validate_id("campaign_id", request.campaign_id)
        code = rules.validate_code_lookup("code", request.code)
        return coupon_to_proto(await store.get_coupon(self._pool, request.campaign_id, code))

    async def UpdateCoupon(
        self, request: attribution_pb2.UpdateCouponRequest, context: Context
    ) -> attribution_pb2.Coupon:
        rules.validate_id("coupon.campaign_id", request.coupon.campaign_id)
        code = rules.validate_code_lookup("coupon.code", request.coupon.code)
        paths = rules.mask_paths(request.update_mask, rules.COUPON_MUTABLE_FIELDS)

        def change(current: Coupon) -> Coupon:
            merged = coupon_to_proto(current)
            _copy_fields(request.coupon, merged, paths)
            rules.validate_coupon(merged)
            new = coupon_from_proto(merged, used=current.used)
            rules.check_usage_limit(new.usage_limit, current.used)
            rules.check_affiliate_holder(current, new)
            return new

        coupon = await store.update_coupon(self._pool, request.coupon.campaign_id, code, change)
        return coupon_to_proto(coupon)

    async def ListCoupons(
        self, request: attribution_pb2.ListCouponsRequest, context: Context
    ) -> attribution_pb2.ListCouponsResponse:
        rules.validate_id("campaign_id", request.campaign_id)
        if request.status and coupon_status_from_proto(request.status) is None:
            raise InvalidArgument.one("status", f"unknown value {request.status}")
        size = rules.page_size(request.page_size)
        scope = f"coupons/{request.campaign_id}"
        after = decode_page_token(request.page_token, scope)
        coupons = await store.list_coupons(
            self._pool,
            request.campaign_id,
            status=coupon_status_from_proto(request.status),
            after=after,
            limit=size + 1,
        )
        page, next_token = _page(coupons, size, scope, lambda c: c.code)
        return attribution_pb2.ListCouponsResponse(
            coupons=[coupon_to_proto(c) for c in page], next_page_token=next_token
        )

    async def GenerateCodes(
        self, request: attribution_pb2.GenerateCodesRequest, context: Context
    ) -> attribution_pb2.GenerateCodesResponse:
        rules.validate_generate_codes(request)
        shape = rules.generated_shape(request)
        batch_id = store.new_id(BATCH_ID_PREFIX)
        template = replace(coupon_from_proto(request.template, kind="unique"), batch_id=batch_id)
        generated = await store.insert_generated_codes(
            self._pool,
            template,
            batch_id=batch_id,
            shape=shape,
            count=request.count,
        )
        if generated >= ANALYZE_AFTER_CODES:
            self._analyzer.request()
        return attribution_pb2.GenerateCodesResponse(
            batch_id=batch_id, generated=generated, random_bits=code_check.random_bits(shape.length)
        )

    async def ExportCodes(
        self, request: attribution_pb2.ExportCodesRequest, context: Context
    ) -> AsyncIterator[attribution_pb2.ExportCodesChunk]:
        rules.validate_id("batch_id", request.batch_id)
        async for codes in store.stream_batch_codes(self._pool, request.batch_id):
            yield attribution_pb2.ExportCodesChunk(codes=codes)

    async def AssignCode(
        self, request: attribution_pb2.AssignCodeRequest, context: Context
    ) -> attribution_pb2.Coupon:
        rules.validate_assign_code(request)
        if request.affiliate_id:
            # Affiliates are few and handed codes by an operator: one statement
            # each, not the shared batches of customers at checkout rates.
            coupon = await store.assign_code(
                self._pool, request.campaign_id, request.batch_id, request.affiliate_id, holder="affiliate"
            )
        else:
            coupon = await self._assigner.assign(request.campaign_id, request.batch_id, request.customer_id)
        return coupon_to_proto(coupon)

    async def ImportCodes(
        self, request_iterator: AsyncIterator[attribution_pb2.ImportCodesRequest], context: Context
    ) -> attribution_pb2.ImportCodesResponse:
        campaign_id = ""
        pieces: list[bytes] = []
        size = 0
        async for piece in request_iterator:
            if piece.campaign_id and campaign_id and piece.campaign_id != campaign_id:
                raise InvalidArgument.one("campaign_id", "every message names the same campaign (or none)")
            campaign_id = campaign_id or piece.campaign_id
            size += len(piece.csv)
            if size > import_rules.MAX_IMPORT_BYTES:
                raise InvalidArgument.one("csv", f"more than {import_rules.MAX_IMPORT_BYTES >> 20} MB: split the file")
            pieces.append(piece.csv)
        rules.validate_id("campaign_id", campaign_id)
        rows = import_rules.parse_csv(b"".join(pieces), campaign_id)
        batch_id = store.new_id(BATCH_ID_PREFIX)
        imported = await store.insert_imported_codes(
            self._pool,
            campaign_id,
            batch_id,
            [(row.line, replace(coupon_from_proto(row.coupon), batch_id=batch_id)) for row in rows],
        )
        return attribution_pb2.ImportCodesResponse(batch_id=batch_id, imported=imported)


    # ------------------------------------------------------------ webhooks (services/attribution/webhooks)

    async def CreateWebhook(self, request: attribution_pb2.CreateWebhookRequest, context: Context) -> attribution_pb2.Webhook:
        return await self._webhooks.create(request)

    async def GetWebhook(self, request: attribution_pb2.GetWebhookRequest, context: Context) -> attribution_pb2.Webhook:
        return await self._webhooks.get(request)

    async def ListWebhooks(
        self, request: attribution_pb2.ListWebhooksRequest, context: Context
    ) -> attribution_pb2.ListWebhooksResponse:
        return await self._webhooks.list(request)

    async def UpdateWebhook(self, request: attribution_pb2.UpdateWebhookRequest, context: Context) -> attribution_pb2.Webhook:
        return await self._webhooks.update(request)

    async def DeleteWebhook(
        self, request: attribution_pb2.DeleteWebhookRequest, context: Context
    ) -> attribution_pb2.DeleteWebhookResponse:
        return await self._webhooks.delete(request)

    async def RotateWebhookSecret(
        self, request: attribution_pb2.RotateWebhookSecretRequest, context: Context
    ) -> attribution_pb2.Webhook:
        return await self._webhooks.rotate(request)

    async def TestWebhook(
        self, request: attribution_pb2.TestWebhookRequest, context: Context
    ) -> attribution_pb2.WebhookDelivery:
        return await self._webhooks.test(request)

    async def ListDeliveries(
        self, request: attribution_pb2.ListDeliveriesRequest, context: Context
    ) -> attribution_pb2.ListDeliveriesResponse:
        return await self._webhooks.list_deliveries(request)

    async def RedeliverDelivery(
        self, request: attribution_pb2.RedeliverDeliveryRequest, context: Context
    ) -> attribution_pb2.WebhookDelivery:
        return await self._webhooks.redeliver(request)

def _page(items: list[T], size: int, scope: str, key: Callable[[T], str]) -> tuple[list[T], str]:
    """One page and the token of the next (empty on the last): ``items`` holds up to size + 1."""
    if len(items) <= size:
        return items, ""
    page = items[:size]
    return page, encode_page_token(scope, key(page[-1]))


def _copy_fields(source: Message, destination: Message, paths: frozenset[str]) -> None:
    """Copies the named top-level fields, presence included (unset stays unset)."""
    fields = source.DESCRIPTOR.fields_by_name
    for path in paths:
        descriptor = fields[path]
        if descriptor.is_repeated:
            destination.ClearField(path)
            getattr(destination, path).extend(getattr(source, path))
        elif descriptor.has_presence and not source.HasField(path):
            destination.ClearField(path)
        elif descriptor.message_type is not None:
            getattr(destination, path).CopyFrom(getattr(source, path))
        else:
            setattr(destination, path, getattr(source, path))
