"""The webhook RPCs of CatalogService: proto <-> domain translation only.

CatalogServicer delegates its webhook methods here; the rules are in
``webhooks.rules``, the SQL in ``webhooks.store``.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import replace
from datetime import datetime

import asyncpg
from ascribe.attribution.v1 import attribution_pb2 as pb

from services.attribution.catalog import rules as catalog_rules
from services.attribution.catalog.convert import decode_page_token, encode_page_token
from services.attribution.webhooks import rules, store
from services.attribution.webhooks.delivery import Refused, check_destination
from services.attribution.webhooks.settings import WebhookConfig
from services.common.errors import InvalidArgument
from services.common.timestamps import set_timestamp, utcnow


def webhook_to_proto(w: store.WebhookRow, *, secret: str = "") -> pb.Webhook:
    message = pb.Webhook(
        id=w.id, kind=rules.KIND_WORDS.number(w.kind), campaign_id=w.campaign_id or "",
        affiliate_id=w.affiliate_id or "", url=w.url, http_method=w.http_method, events=w.events,
        secret=secret, description=w.description, enabled=w.enabled, disabled_reason=w.disabled_reason,
    )
    if w.created_at is not None:
        set_timestamp(message.created_at, w.created_at)
    return message


def delivery_to_proto(d: store.DeliveryRow) -> pb.WebhookDelivery:
    message = pb.WebhookDelivery(
        id=d.id, webhook_id=d.webhook_id, event_id=d.event_id, event=d.event,
        state=rules.STATE_WORDS.number(d.state), attempts=d.attempts, last_status_code=d.last_status_code,
        last_error=d.last_error,
    )
    set_timestamp(message.created_at, d.created_at)
    if d.next_attempt_at is not None and d.state == "pending":
        set_timestamp(message.next_attempt_at, d.next_attempt_at)
    if d.delivered_at is not None:
        set_timestamp(message.delivered_at, d.delivered_at)
    return message


class WebhookRpcs:
    def __init__(
        self, pool: asyncpg.Pool, config: WebhookConfig, *, wake: Callable[[], None] = lambda: None,
        clock: Callable[[], datetime] = utcnow,
    ) -> None:
        self._pool = pool
        self._config = config
        self._wake = wake
        self._clock = clock

    async def _check_reachable(self, webhook: pb.Webhook, host_url: str) -> None:
        """The SSRF rules at creation: the name must resolve, and only to allowed addresses."""
        try:
            await check_destination(host_url, self._config)
        except Refused as error:
            raise InvalidArgument.one("webhook.url", str(error)) from None

    async def _validate(self, webhook: pb.Webhook, *, creating: bool) -> None:
        rules.validate_webhook(webhook, creating=creating)
        sample = (rules.render_url(webhook.url, rules.SAMPLE_MACROS)
                  if webhook.kind == pb.WEBHOOK_KIND_PARTNER_POSTBACK else webhook.url)
        await self._check_reachable(webhook, sample)

    async def create(self, request: pb.CreateWebhookRequest) -> pb.Webhook:
        w = request.webhook
        await self._validate(w, creating=True)
        if w.id:
            catalog_rules.validate_id("webhook.id", w.id)
        secret = w.secret or store.new_secret()
        row = await store.insert_webhook(self._pool, store.WebhookRow(
            id=w.id or store.new_id(store.WEBHOOK_ID_PREFIX), kind=rules.KIND_WORDS.words[w.kind],
            campaign_id=w.campaign_id or None, affiliate_id=w.affiliate_id or None, url=w.url,
            http_method=w.http_method or rules.default_method(w.kind), events=list(dict.fromkeys(w.events)),
            secret=secret, description=w.description,
        ))
        return webhook_to_proto(row, secret=secret)

    async def get(self, request: pb.GetWebhookRequest) -> pb.Webhook:
        catalog_rules.validate_id("webhook_id", request.webhook_id)
        return webhook_to_proto(await store.get_webhook(self._pool, request.webhook_id))

    async def list(self, request: pb.ListWebhooksRequest) -> pb.ListWebhooksResponse:
        size = catalog_rules.page_size(request.page_size)
        after = decode_page_token(request.page_token, "webhooks")
        rows = await store.list_webhooks(self._pool, campaign_id=request.campaign_id, after=after, limit=size + 1)
        next_token = encode_page_token("webhooks", rows[size - 1].id) if len(rows) > size else ""
        return pb.ListWebhooksResponse(webhooks=[webhook_to_proto(w) for w in rows[:size]],
                                       next_page_token=next_token)

    async def update(self, request: pb.UpdateWebhookRequest) -> pb.Webhook:
        catalog_rules.validate_id("webhook.id", request.webhook.id)
        paths = catalog_rules.mask_paths(request.update_mask, rules.UPDATE_MUTABLE_FIELDS)
        merged_holder: list[pb.Webhook] = []

        def change(current: store.WebhookRow) -> store.WebhookRow:
            merged = webhook_to_proto(current)
            for path in paths:
                if path == "events":
                    del merged.events[:]
                    merged.events.extend(request.webhook.events)
                else:
                    setattr(merged, path, getattr(request.webhook, path))
            if not merged.http_method:
                merged.http_method = rules.default_method(merged.kind)
            rules.validate_webhook(merged, creating=False)
            merged_holder.append(merged)
            return replace(current, affiliate_id=merged.affiliate_id or None, url=merged.url,
                           http_method=merged.http_method, events=list(dict.fromkeys(merged.events)),
                           description=merged.description, enabled=merged.enabled)

        if "url" in paths:
            # The address check needs I/O, so it runs before the row is locked.
            current = webhook_to_proto(await store.get_webhook(self._pool, request.webhook.id))
            current.url = request.webhook.url
            rules.validate_webhook(current, creating=False)
            await self._validate(current, creating=False)
        return webhook_to_proto(await store.update_webhook(self._pool, request.webhook.id, change))

    async def delete(self, request: pb.DeleteWebhookRequest) -> pb.DeleteWebhookResponse:
        catalog_rules.validate_id("webhook_id", request.webhook_id)
        cancelled = await store.delete_webhook(self._pool, request.webhook_id, self._clock())
        return pb.DeleteWebhookResponse(cancelled_deliveries=cancelled)

    async def rotate(self, request: pb.RotateWebhookSecretRequest) -> pb.Webhook:
        catalog_rules.validate_id("webhook_id", request.webhook_id)
        secret = store.new_secret()
        row = await store.rotate_secret(self._pool, request.webhook_id, secret, self._clock())
        return webhook_to_proto(row, secret=secret)

    async def test(self, request: pb.TestWebhookRequest) -> pb.WebhookDelivery:
        catalog_rules.validate_id("webhook_id", request.webhook_id)
        w = await store.get_webhook(self._pool, request.webhook_id)
        now = self._clock()
        delivery_id = store.new_id(store.DELIVERY_ID_PREFIX)
        sample = {
            "id": "cnv_test", "campaign_id": w.campaign_id or "", "order_id": "test-order",
            "status": "approved", "affiliate_id": w.affiliate_id or "", "amount": "25.00", "refunded": "0.00",
            "payout": "2.50", "currency": "EUR", "coupon_code": "TEST", "click_id": "test-click",
            "aff_click_id": "", "sub1": "", "sub2": "", "sub3": "", "sub4": "", "sub5": "", "test": True,
        }
        payload = json.dumps({"at": now.isoformat(), "object": sample})
        event_id = store.new_id(store.EVENT_ID_PREFIX + "test_")
        await store.insert_deliveries(self._pool, [(delivery_id, w.id, event_id, rules.TEST_EVENT, payload, now)])
        self._wake()
        return delivery_to_proto(await store.get_delivery(self._pool, delivery_id))

    async def list_deliveries(self, request: pb.ListDeliveriesRequest) -> pb.ListDeliveriesResponse:
        catalog_rules.validate_id("webhook_id", request.webhook_id)
        if request.state and request.state not in rules.STATE_WORDS.words:
            raise InvalidArgument.one("state", "unknown delivery state")
        size = catalog_rules.page_size(request.page_size)
        last = decode_page_token(request.page_token, "deliveries")
        before = int(last) if last.isdigit() else None
        if last and before is None:
            raise InvalidArgument.one("page_token", "not a page token of this listing")
        await store.get_webhook(self._pool, request.webhook_id)  # NOT_FOUND for an unknown webhook
        rows = await store.list_deliveries(
            self._pool, webhook_id=request.webhook_id,
            state=rules.STATE_WORDS.words.get(request.state), before_seq=before, limit=size + 1,
        )
        next_token = encode_page_token("deliveries", str(rows[size - 1].seq)) if len(rows) > size else ""
        return pb.ListDeliveriesResponse(deliveries=[delivery_to_proto(d) for d in rows[:size]],
                                         next_page_token=next_token)

    async def redeliver(self, request: pb.RedeliverDeliveryRequest) -> pb.WebhookDelivery:
        catalog_rules.validate_id("delivery_id", request.delivery_id)
        row = await store.redeliver(self._pool, request.delivery_id, self._clock())
        self._wake()
        return delivery_to_proto(row)
