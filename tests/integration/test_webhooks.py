"""Webhooks on real PostgreSQL with a real HTTP receiver: outbox, fan-out, retries, SSRF, the RPCs."""

from __future__ import annotations

import asyncio
import json
import ssl
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import parse_qs, urlsplit

import asyncpg
import grpc
import pytest
import trustme
from ascribe.attribution.v1 import attribution_pb2 as pb
from google.protobuf import field_mask_pb2

from services.attribution.metrics import WEBHOOK_DEAD_TOTAL
from services.attribution.webhooks.settings import WebhookConfig
from tests.integration.conversion_env import FraudHandle, World
from tests.support import Clock, sample
from tests.unit.test_webhook_rules import readme_receiver
from tests.webhook_receiver import Received, Receiver

# Names the tests' resolver knows; nothing here needs public DNS.
PUBLIC = "93.184.216.34"
NAMES: dict[str, list[str]] = {
    "loopback.test": ["127.0.0.1"],
    "metadata.test": ["169.254.169.254"],
    "mapped.test": ["::ffff:10.0.0.1"],
    "public.test": [PUBLIC],
}


async def fake_resolve(host: str, port: int) -> list[str]:
    if host not in NAMES:
        raise OSError(f"unknown name {host}")
    return list(NAMES[host])


def config(**overrides: Any) -> WebhookConfig:
    values: dict[str, Any] = {
        "allow_private_networks": True, "schedule": (0.2, 0.2, 0.2), "poll_seconds": 0.05, "resolve": fake_resolve,
    }
    values.update(overrides)
    return WebhookConfig(**values)


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    r = await Receiver().start()
    yield r
    await r.stop()


async def start_world(database_url: str, db: asyncpg.Connection, fraud_addr: str, cfg: WebhookConfig) -> World:
    w = World(database_url, db, Clock(datetime.now(UTC)), fraud_addr)
    replica = await w.add_replica(webhooks=cfg)
    # Only the webhook worker: the other background jobs are not under test.
    replica.service.tasks.append(asyncio.create_task(replica.service.webhooks.run()))
    await w.campaign(hold_days=30)
    await w.affiliate("aff")
    await w.coupon("SUMMER", allow_all_affiliates=True)
    return w


@pytest.fixture
async def hooks(database_url: str, db: asyncpg.Connection, fraud_service: FraudHandle) -> AsyncIterator[World]:
    w = await start_world(database_url, db, fraud_service.addr, config())
    yield w
    await w.close()


async def create(w: World, **fields: Any) -> pb.Webhook:
    return await w.catalog.CreateWebhook(pb.CreateWebhookRequest(webhook=pb.Webhook(**fields)), timeout=10)


def postback_fields(receiver: Receiver, **fields: Any) -> dict[str, Any]:
    values: dict[str, Any] = {
        "kind": pb.WEBHOOK_KIND_PARTNER_POSTBACK, "campaign_id": "cmp", "affiliate_id": "aff",
        "url": receiver.url + "/pb?cid={click_id}&aff={aff_click_id}&s1={sub1}&s5={sub5}&o={order_id}"
               "&c={conversion_id}&a={amount}&p={payout}&cur={currency}&st={status}&cp={coupon}&e={event}",
        "events": ["conversion.pending", "conversion.approved", "conversion.reversed", "conversion.refunded"],
    }
    values.update(fields)
    return values


def query(seen: Received) -> dict[str, str]:
    return {k: v[0] for k, v in parse_qs(urlsplit(seen.path_qs).query, keep_blank_values=True).items()}


async def test_a_conversion_reaches_the_partner_with_every_macro_encoded(hooks: World, receiver: Receiver) -> None:
    await create(hooks, **postback_fields(receiver))
    click_id = await hooks.click("aff", sub1="a b&c/ü", sub5="z", external_click_id="partner-1")
    conversion = await hooks.convert(order_id="o/1 ü", click_id=click_id, coupon_code="SUMMER",
                                     amount_micros=25_000_000)
    [seen] = await receiver.wait_for(1)
    assert seen.method == "GET"
    q = query(seen)
    assert q == {
        "cid": click_id, "aff": "partner-1", "s1": "a b&c/ü", "s5": "z", "o": "o/1 ü", "c": conversion.id,
        "a": "25.00", "p": "5.00", "cur": "EUR", "st": "pending", "cp": "SUMMER", "e": "conversion.pending",
    }
    assert "a%20b%26c%2F%C3%BC" in seen.path_qs
    assert seen.headers["X-Ascribe-Delivery"].startswith("dlv_")
    # A partial refund: conversion.refunded with that refund's amount; then the rest: reversed.
    await hooks.refund(conversion.order_id, refund_id="r1", amount_micros=5_000_000)
    await hooks.refund(conversion.order_id, refund_id="r2")
    _, partial, full = await receiver.wait_for(3)
    assert (query(partial)["e"], query(partial)["a"], query(partial)["st"]) == ("conversion.refunded", "5.00", "pending")
    assert (query(full)["e"], query(full)["st"]) == ("conversion.reversed", "reversed")
    assert len({r.headers["X-Ascribe-Delivery"] for r in receiver.received}) == 3


async def test_a_post_postback_sends_the_macros_as_a_form(hooks: World, receiver: Receiver) -> None:
    await create(hooks, **postback_fields(receiver, url=receiver.url + "/pb/{order_id}", http_method="POST"))
    await hooks.convert(order_id="a b&c", coupon_code="SUMMER", click_id=await hooks.click("aff"))
    [seen] = await receiver.wait_for(1)
    assert seen.method == "POST" and seen.path_qs == "/pb/a%20b%26c"
    assert seen.headers["Content-Type"] == "application/x-www-form-urlencoded"
    form = {k: v[0] for k, v in parse_qs(seen.body.decode(), keep_blank_values=True).items()}
    assert form["order_id"] == "a b&c" and form["event"] == "conversion.pending" and form["amount"] == "50.00"


async def test_zero_day_hold_sends_approved_only(hooks: World, receiver: Receiver) -> None:
    await hooks.campaign("now", hold_days=0)
    await create(hooks, **postback_fields(receiver, campaign_id="now", affiliate_id=""))
    await hooks.coupon("NOW", campaign_id="now", allow_all_affiliates=True)
    await hooks.convert(campaign_id="now", order_id="z1", coupon_code="NOW", click_id=await hooks.click("aff", campaign_id="now"))
    [seen] = await receiver.wait_for(1)
    await asyncio.sleep(0.5)  # nothing else follows
    assert [query(r)["e"] for r in receiver.received] == ["conversion.approved"]
    assert query(seen)["st"] == "approved"


async def test_a_rolled_back_change_sends_nothing(hooks: World, receiver: Receiver) -> None:
    await create(hooks, **postback_fields(receiver))
    conversion = await hooks.convert(coupon_code="SUMMER", click_id=await hooks.click("aff"))
    await receiver.wait_for(1)
    tx = hooks.db.transaction()
    await tx.start()
    await hooks.db.execute("UPDATE conversions SET status = 'reversed' WHERE id = $1", conversion.id)
    assert await hooks.db.fetchval("SELECT count(*) FROM webhook_outbox") == 1
    await tx.rollback()
    await asyncio.sleep(0.5)
    assert len(receiver.received) == 1
    assert await hooks.db.fetchval("SELECT count(*) FROM webhook_outbox") == 0


async def test_signed_events_verify_with_the_readme_receiver(hooks: World, receiver: Receiver) -> None:
    verify = readme_receiver()["verify_ascribe_signature"]
    assert callable(verify)
    created = await create(hooks, kind=pb.WEBHOOK_KIND_EVENTS, url=receiver.url + "/events",
                           events=["conversion.pending", "coupon.exhausted"])
    assert len(created.secret) >= 32 and created.http_method == "POST"
    got = await hooks.catalog.GetWebhook(pb.GetWebhookRequest(webhook_id=created.id), timeout=10)
    assert got.secret == "" and got.enabled
    await hooks.coupon("ONCE", allow_all_affiliates=True, usage_limit=1)
    await hooks.convert(coupon_code="ONCE")
    seen = await receiver.wait_for(2)
    by_type = {json.loads(r.body)["type"]: r for r in seen}
    assert set(by_type) == {"conversion.pending", "coupon.exhausted"}
    event = by_type["conversion.pending"]
    assert event.headers["Content-Length"] == str(len(event.body))
    assert "Transfer-Encoding" not in event.headers
    document = json.loads(event.body)
    assert document["data"]["object"]["amount"] == "50.00" and document["text"].startswith("ascribe: conversion")
    header = event.headers["X-Ascribe-Signature"]
    assert verify(created.secret, header, event.body)
    assert not verify(created.secret, header, event.body.replace(b"50.00", b"99.00"))
    # Rotation: both secrets sign during the overlap.
    rotated = await hooks.catalog.RotateWebhookSecret(pb.RotateWebhookSecretRequest(webhook_id=created.id), timeout=10)
    assert rotated.secret and rotated.secret != created.secret
    test = await hooks.catalog.TestWebhook(pb.TestWebhookRequest(webhook_id=created.id), timeout=10)
    [*_, tested] = await receiver.wait_for(3)
    assert tested.headers["X-Ascribe-Delivery"] == test.id
    assert tested.headers["X-Ascribe-Signature"].count("v1=") == 2
    assert verify(created.secret, tested.headers["X-Ascribe-Signature"], tested.body)
    assert verify(rotated.secret, tested.headers["X-Ascribe-Signature"], tested.body)


async def test_fails_twice_then_succeeds_with_one_delivery_id(hooks: World, receiver: Receiver) -> None:
    answers = iter([(503, {}), (429, {"Retry-After": "0"}), (200, {})])
    receiver.answer = lambda _: next(answers)
    created = await create(hooks, **postback_fields(receiver))
    await hooks.convert(coupon_code="SUMMER", click_id=await hooks.click("aff"))
    seen = await receiver.wait_for(3)
    assert len({r.headers["X-Ascribe-Delivery"] for r in seen}) == 1
    await asyncio.sleep(0.3)
    [delivery] = (await hooks.catalog.ListDeliveries(pb.ListDeliveriesRequest(webhook_id=created.id), timeout=10)).deliveries
    assert (delivery.state, delivery.attempts, delivery.id) == (
        pb.DELIVERY_STATE_DELIVERED, 3, seen[0].headers["X-Ascribe-Delivery"])


async def test_always_failing_ends_dead_and_can_be_redelivered(hooks: World, receiver: Receiver) -> None:
    receiver.answer = lambda _: (500, {})
    dead_before = sample(WEBHOOK_DEAD_TOTAL) or 0.0
    created = await create(hooks, **postback_fields(receiver))
    await hooks.convert(coupon_code="SUMMER", click_id=await hooks.click("aff"))
    await receiver.wait_for(4)  # the first try and the schedule's three retries
    await asyncio.sleep(0.6)
    assert len(receiver.received) == 4
    dead = await hooks.catalog.ListDeliveries(
        pb.ListDeliveriesRequest(webhook_id=created.id, state=pb.DELIVERY_STATE_DEAD), timeout=10)
    [delivery] = dead.deliveries
    assert delivery.attempts == 4 and delivery.last_status_code == 500 and "out of retries" in delivery.last_error
    assert (sample(WEBHOOK_DEAD_TOTAL) or 0.0) == dead_before + 1
    receiver.answer = lambda _: (200, {})
    again = await hooks.catalog.RedeliverDelivery(pb.RedeliverDeliveryRequest(delivery_id=delivery.id), timeout=10)
    assert again.state == pb.DELIVERY_STATE_PENDING
    [*_, last] = await receiver.wait_for(5)
    assert last.headers["X-Ascribe-Delivery"] == delivery.id


async def test_a_4xx_stops_at_once(hooks: World, receiver: Receiver) -> None:
    receiver.answer = lambda _: (404, {})
    created = await create(hooks, **postback_fields(receiver))
    await hooks.convert(coupon_code="SUMMER", click_id=await hooks.click("aff"))
    await receiver.wait_for(1)
    await asyncio.sleep(0.6)
    assert len(receiver.received) == 1
    [delivery] = (await hooks.catalog.ListDeliveries(pb.ListDeliveriesRequest(webhook_id=created.id), timeout=10)).deliveries
    assert delivery.state == pb.DELIVERY_STATE_DEAD and delivery.last_status_code == 404


async def test_three_days_of_deaths_disable_the_webhook(hooks: World, receiver: Receiver) -> None:
    receiver.answer = lambda _: (410, {})
    created = await create(hooks, **postback_fields(receiver))
    await hooks.db.execute("UPDATE webhooks SET failing_since = now() - interval '3 days 1 minute'")
    await hooks.convert(coupon_code="SUMMER", click_id=await hooks.click("aff"))
    await receiver.wait_for(1)
    for _ in range(50):
        got = await hooks.catalog.GetWebhook(pb.GetWebhookRequest(webhook_id=created.id), timeout=10)
        if not got.enabled:
            break
        await asyncio.sleep(0.05)
    assert not got.enabled and "3 days" in got.disabled_reason
    enabled = await hooks.catalog.UpdateWebhook(pb.UpdateWebhookRequest(
        webhook=pb.Webhook(id=created.id, enabled=True), update_mask=field_mask_pb2.FieldMask(paths=["enabled"])), timeout=10)
    assert enabled.enabled and enabled.disabled_reason == ""


async def test_deleting_cancels_pending_retries(hooks: World, receiver: Receiver) -> None:
    receiver.answer = lambda _: (503, {"Retry-After": "3600"})
    created = await create(hooks, **postback_fields(receiver))
    await hooks.convert(coupon_code="SUMMER", click_id=await hooks.click("aff"))
    await receiver.wait_for(1)
    await asyncio.sleep(0.2)
    deleted = await hooks.catalog.DeleteWebhook(pb.DeleteWebhookRequest(webhook_id=created.id), timeout=10)
    assert deleted.cancelled_deliveries == 1
    assert await hooks.db.fetchval("SELECT state FROM webhook_deliveries") == "cancelled"
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await hooks.catalog.GetWebhook(pb.GetWebhookRequest(webhook_id=created.id), timeout=10)
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND


async def test_old_deliveries_are_deleted_after_30_days(hooks: World, receiver: Receiver) -> None:
    from services.attribution.webhooks import store

    created = await create(hooks, **postback_fields(receiver))
    await hooks.convert(coupon_code="SUMMER", click_id=await hooks.click("aff"))
    await receiver.wait_for(1)
    await asyncio.sleep(0.2)
    assert await store.delete_old_deliveries(hooks.db, datetime.now(UTC)) == 0
    assert await store.delete_old_deliveries(hooks.db, datetime.now(UTC) + timedelta(days=31)) == 1
    assert not (await hooks.catalog.ListDeliveries(pb.ListDeliveriesRequest(webhook_id=created.id), timeout=10)).deliveries
    # The backlog gauge's figure: how late the most overdue pending delivery is.
    now = datetime.now(UTC)
    assert await store.delivery_lag_seconds(hooks.db, now) == 0.0
    await store.insert_deliveries(hooks.db, [("dlv_late", created.id, "evt_late", "test", "{}", now - timedelta(seconds=100))])
    assert 99 <= await store.delivery_lag_seconds(hooks.db, now) <= 101


async def test_bad_webhooks_are_invalid_argument_naming_the_field(hooks: World, receiver: Receiver) -> None:
    cases = [
        (postback_fields(receiver, url="gopher://x/{sub1}"), "webhook.url"),
        (postback_fields(receiver, http_method="DELETE"), "webhook.http_method"),
        (postback_fields(receiver, events=["conversion.nope"]), "webhook.events[0]"),
        (postback_fields(receiver, campaign_id="nope"), "webhook.campaign_id"),
        (postback_fields(receiver, affiliate_id="nope"), "webhook.affiliate_id"),
        ({"kind": pb.WEBHOOK_KIND_EVENTS, "url": receiver.url, "events": ["test"], "secret": "x" * 31}, "webhook.events[0]"),
        ({"kind": pb.WEBHOOK_KIND_EVENTS, "url": receiver.url, "events": ["coupon.held"], "secret": "x" * 31},
         "webhook.secret"),
    ]
    for fields, field in cases:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await create(hooks, **fields)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, fields
        assert field in (caught.value.details() or ""), (field, caught.value.details())


async def test_list_webhooks_pages(hooks: World, receiver: Receiver) -> None:
    ids = {(await create(hooks, **postback_fields(receiver))).id for _ in range(3)}
    first = await hooks.catalog.ListWebhooks(pb.ListWebhooksRequest(page_size=2), timeout=10)
    second = await hooks.catalog.ListWebhooks(
        pb.ListWebhooksRequest(page_size=2, page_token=first.next_page_token), timeout=10)
    assert {w.id for w in [*first.webhooks, *second.webhooks]} == ids and not second.next_page_token
    assert all(w.secret == "" for w in first.webhooks)


@pytest.fixture
async def guarded(database_url: str, db: asyncpg.Connection, fraud_service: FraudHandle) -> AsyncIterator[World]:
    w = await start_world(database_url, db, fraud_service.addr, config(allow_private_networks=False))
    yield w
    await w.close()


@pytest.mark.parametrize("url", [
    "http://loopback.test/x", "http://metadata.test/latest/meta-data", "http://mapped.test/",
    "http://127.0.0.1/", "http://[::ffff:10.0.0.1]/", "http://169.254.169.254/", "http://0.0.0.0/",
    "http://[fd00::1]/", "http://unknown.test/",
])
async def test_forbidden_destinations_are_refused_at_creation(guarded: World, url: str) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await create(guarded, kind=pb.WEBHOOK_KIND_EVENTS, url=url, events=["coupon.held"])
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "webhook.url" in (caught.value.details() or "")


@pytest.mark.parametrize("rebound", ["127.0.0.1", "169.254.169.254", "::ffff:10.0.0.1"])
async def test_a_name_that_resolves_elsewhere_later_is_refused_at_delivery(guarded: World, rebound: str) -> None:
    NAMES["rebind.test"] = [PUBLIC]
    try:
        created = await create(guarded, kind=pb.WEBHOOK_KIND_EVENTS, url="http://rebind.test/hook", events=["coupon.held"])
        NAMES["rebind.test"] = [rebound]
        test = await guarded.catalog.TestWebhook(pb.TestWebhookRequest(webhook_id=created.id), timeout=10)
        for _ in range(100):
            [delivery] = (await guarded.catalog.ListDeliveries(
                pb.ListDeliveriesRequest(webhook_id=created.id), timeout=10)).deliveries
            if delivery.state != pb.DELIVERY_STATE_PENDING:
                break
            await asyncio.sleep(0.05)
        assert delivery.id == test.id and delivery.state == pb.DELIVERY_STATE_DEAD
        assert delivery.last_error.startswith("refused:") and rebound in delivery.last_error
    finally:
        del NAMES["rebind.test"]


async def test_an_alert_is_one_event_across_replicas_and_a_hold_is_coupon_held(
    hooks: World, receiver: Receiver
) -> None:
    from services.attribution.webhooks.delivery import follow_alerts

    # The second replica runs every background job (its webhook worker and
    # alert follower, and the leak response); the first follows alerts too.
    await hooks.add_replica(webhooks=config(), background_jobs=True, auto_hold_leaked_codes=True)
    first = hooks.replicas[0].service
    first.tasks.append(asyncio.create_task(follow_alerts(first.pool, first.fraud_channel, None)))
    created = await create(hooks, kind=pb.WEBHOOK_KIND_EVENTS, url=receiver.url + "/events",
                           events=["alert.code_leak", "coupon.held"])
    await hooks.coupon("VIP-0001", kind=pb.COUPON_KIND_UNIQUE)
    for n in range(6):
        await hooks.convert(coupon_code="VIP-0001", ip=f"198.51.100.{10 + n}", customer_id=f"c{n}")
    await receiver.wait_for(2, timeout=20)
    await asyncio.sleep(1.0)  # a duplicate would arrive by now
    events = [json.loads(r.body) for r in receiver.received]
    assert sorted(e["type"] for e in events) == ["alert.code_leak", "coupon.held"]
    alert = next(e for e in events if e["type"] == "alert.code_leak")
    assert alert["data"]["object"]["coupon_code"] == "VIP-0001" and alert["id"].startswith("evt_alert_")
    assert alert["text"].startswith(":rotating_light: ascribe alert code_leak")
    assert await hooks.db.fetchval("SELECT count(*) FROM webhook_deliveries WHERE webhook_id = $1", created.id) == 2


async def test_many_events_on_two_replicas_are_each_delivered_once(hooks: World, receiver: Receiver) -> None:
    second = await hooks.add_replica(webhooks=config())
    second.service.tasks.append(asyncio.create_task(second.service.webhooks.run()))
    await create(hooks, **postback_fields(receiver))
    clicks = [await hooks.click("aff") for _ in range(40)]
    await asyncio.gather(*(hooks.convert(replica=hooks.replicas[n % 2], coupon_code="SUMMER", click_id=c)
                           for n, c in enumerate(clicks)))
    await receiver.wait_for(40, timeout=20)
    await asyncio.sleep(0.5)
    assert len(receiver.received) == 40
    assert len({r.headers["X-Ascribe-Delivery"] for r in receiver.received}) == 40


async def test_the_worker_stops_promptly_when_cancelled(hooks: World, receiver: Receiver) -> None:
    receiver.answer = lambda _: (200, {})
    await create(hooks, **postback_fields(receiver))
    worker_task = hooks.replicas[0].service.tasks[-1]
    assert not worker_task.done()
    worker_task.cancel()
    await asyncio.wait_for(asyncio.gather(worker_task, return_exceptions=True), 2)
    assert worker_task.cancelled()


async def test_the_connection_goes_to_the_checked_address_with_the_name_as_host(
    database_url: str, db: asyncpg.Connection, fraud_service: FraudHandle, receiver: Receiver
) -> None:
    lookups: list[str] = []

    async def once_then_elsewhere(host: str, port: int) -> list[str]:
        # The first answer is the receiver; any later lookup would be sent
        # to an address nobody listens on, so a delivery proves pinning.
        lookups.append(host)
        return ["127.0.0.1"] if len(lookups) % 2 else ["127.0.0.2"]

    w = await start_world(database_url, db, fraud_service.addr, config(resolve=once_then_elsewhere))
    try:
        created = await create(w, kind=pb.WEBHOOK_KIND_EVENTS, url=f"http://hooks.test:{receiver.port}/h",
                               events=["coupon.held"])
        lookups.clear()
        await w.catalog.TestWebhook(pb.TestWebhookRequest(webhook_id=created.id), timeout=10)
        [seen] = await receiver.wait_for(1)
        assert seen.headers["Host"] == f"hooks.test:{receiver.port}"
        assert lookups == ["hooks.test"]  # one lookup, checked, and the connection went there
    finally:
        await w.close()


async def test_redirects_are_not_followed(hooks: World, receiver: Receiver) -> None:
    receiver.answer = lambda seen: (302, {"Location": "/elsewhere"}) if seen.path_qs == "/h" else (200, {})
    created = await create(hooks, kind=pb.WEBHOOK_KIND_EVENTS, url=receiver.url + "/h", events=["coupon.held"])
    await hooks.catalog.TestWebhook(pb.TestWebhookRequest(webhook_id=created.id), timeout=10)
    await receiver.wait_for(1)
    await asyncio.sleep(0.5)
    assert [r.path_qs for r in receiver.received] == ["/h"]
    [delivery] = (await hooks.catalog.ListDeliveries(pb.ListDeliveriesRequest(webhook_id=created.id), timeout=10)).deliveries
    assert delivery.state == pb.DELIVERY_STATE_DEAD and delivery.last_status_code == 302


async def test_a_slow_receiver_holds_only_its_own_share(
    database_url: str, db: asyncpg.Connection, fraud_service: FraudHandle, receiver: Receiver
) -> None:
    slow = await Receiver(delay=1.0).start()
    w = await start_world(database_url, db, fraud_service.addr, config(concurrency=8, per_destination=2))
    try:
        slow_hook = await create(w, kind=pb.WEBHOOK_KIND_EVENTS, url=slow.url + "/slow", events=["coupon.held"])
        fast_hook = await create(w, kind=pb.WEBHOOK_KIND_EVENTS, url=receiver.url + "/fast", events=["coupon.held"])
        for _ in range(12):
            await w.catalog.TestWebhook(pb.TestWebhookRequest(webhook_id=slow_hook.id), timeout=10)
        started = asyncio.get_running_loop().time()
        await w.catalog.TestWebhook(pb.TestWebhookRequest(webhook_id=fast_hook.id), timeout=10)
        await receiver.wait_for(1, timeout=5)
        assert asyncio.get_running_loop().time() - started < 1.0  # not behind the slow one's queue
        await slow.wait_for(12, timeout=20)
        assert slow.peak_in_flight == 2
    finally:
        await w.close()
        await slow.stop()


async def test_a_receiver_slower_than_5_s_is_retried(hooks: World, receiver: Receiver) -> None:
    receiver.delay = 6.0
    created = await create(hooks, kind=pb.WEBHOOK_KIND_EVENTS, url=receiver.url + "/h", events=["coupon.held"])
    await hooks.catalog.TestWebhook(pb.TestWebhookRequest(webhook_id=created.id), timeout=10)
    await receiver.wait_for(1)
    receiver.delay = 0.0
    await receiver.wait_for(2, timeout=10)
    for _ in range(50):
        [delivery] = (await hooks.catalog.ListDeliveries(
            pb.ListDeliveriesRequest(webhook_id=created.id), timeout=10)).deliveries
        if delivery.state == pb.DELIVERY_STATE_DELIVERED:
            break
        await asyncio.sleep(0.1)
    assert delivery.state == pb.DELIVERY_STATE_DELIVERED and delivery.attempts == 2


async def test_creating_and_updating_send_nothing_and_updates_are_checked(guarded: World) -> None:
    created = await create(guarded, kind=pb.WEBHOOK_KIND_EVENTS, url="http://public.test/hook",
                           events=["coupon.held"], description="ops")
    updated = await guarded.catalog.UpdateWebhook(pb.UpdateWebhookRequest(
        webhook=pb.Webhook(id=created.id, events=["coupon.exhausted", "alert.code_guessing"], http_method="GET"),
        update_mask=field_mask_pb2.FieldMask(paths=["events", "http_method"])), timeout=10)
    assert list(updated.events) == ["coupon.exhausted", "alert.code_guessing"] and updated.http_method == "GET"
    assert updated.description == "ops" and updated.url == "http://public.test/hook" and updated.secret == ""
    for url in ("http://loopback.test/x", "http://metadata.test/", "http://mapped.test/"):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await guarded.catalog.UpdateWebhook(pb.UpdateWebhookRequest(
                webhook=pb.Webhook(id=created.id, url=url),
                update_mask=field_mask_pb2.FieldMask(paths=["url"])), timeout=10)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "webhook.url" in (caught.value.details() or "")
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await guarded.catalog.UpdateWebhook(pb.UpdateWebhookRequest(
            webhook=pb.Webhook(id=created.id), update_mask=field_mask_pb2.FieldMask(paths=["secret"])), timeout=10)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    await asyncio.sleep(0.3)
    assert await guarded.db.fetchval("SELECT count(*) FROM webhook_deliveries") == 0


async def test_list_deliveries_pages_newest_first_and_filters_by_state(hooks: World, receiver: Receiver) -> None:
    created = await create(hooks, kind=pb.WEBHOOK_KIND_EVENTS, url=receiver.url + "/h", events=["coupon.held"])
    ids = [(await hooks.catalog.TestWebhook(pb.TestWebhookRequest(webhook_id=created.id), timeout=10)).id
           for _ in range(5)]
    await receiver.wait_for(5)
    first = await hooks.catalog.ListDeliveries(pb.ListDeliveriesRequest(webhook_id=created.id, page_size=3), timeout=10)
    rest = await hooks.catalog.ListDeliveries(pb.ListDeliveriesRequest(
        webhook_id=created.id, page_size=3, page_token=first.next_page_token), timeout=10)
    assert [d.id for d in [*first.deliveries, *rest.deliveries]] == ids[::-1] and not rest.next_page_token
    dead = await hooks.catalog.ListDeliveries(pb.ListDeliveriesRequest(
        webhook_id=created.id, state=pb.DELIVERY_STATE_DEAD), timeout=10)
    assert not dead.deliveries
    for request, code in [
        (pb.ListDeliveriesRequest(webhook_id=created.id, page_token="garbage"), grpc.StatusCode.INVALID_ARGUMENT),
        (pb.ListDeliveriesRequest(webhook_id=""), grpc.StatusCode.INVALID_ARGUMENT),
        (pb.ListDeliveriesRequest(webhook_id="whk_none"), grpc.StatusCode.NOT_FOUND),
    ]:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await hooks.catalog.ListDeliveries(request, timeout=10)
        assert caught.value.code() == code
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await hooks.catalog.RedeliverDelivery(pb.RedeliverDeliveryRequest(delivery_id="dlv_none"), timeout=10)
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND


@pytest.mark.parametrize(("certified", "delivered"), [("hooks.test", True), ("other.test", False)])
async def test_https_checks_the_certificate_against_the_name_not_the_pinned_address(
    database_url: str, db: asyncpg.Connection, fraud_service: FraudHandle, certified: str, delivered: bool
) -> None:
    ca = trustme.CA()
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert(certified).configure_cert(server_context)
    client_context = ssl.create_default_context()
    ca.configure_trust(client_context)
    tls_receiver = await Receiver().start(server_context)

    async def to_loopback(host: str, port: int) -> list[str]:
        return ["127.0.0.1"]

    w = await start_world(database_url, db, fraud_service.addr,
                          config(resolve=to_loopback, ssl_context=client_context))
    try:
        created = await create(w, kind=pb.WEBHOOK_KIND_EVENTS, url=f"https://hooks.test:{tls_receiver.port}/h",
                               events=["coupon.held"])
        await w.catalog.TestWebhook(pb.TestWebhookRequest(webhook_id=created.id), timeout=10)
        for _ in range(100):
            [delivery] = (await w.catalog.ListDeliveries(
                pb.ListDeliveriesRequest(webhook_id=created.id), timeout=10)).deliveries
            if delivery.state == pb.DELIVERY_STATE_DELIVERED or delivery.last_error:
                break
            await asyncio.sleep(0.05)
        if delivered:
            assert delivery.state == pb.DELIVERY_STATE_DELIVERED
            assert tls_receiver.received[0].headers["Host"] == f"hooks.test:{tls_receiver.port}"
        else:
            assert delivery.state != pb.DELIVERY_STATE_DELIVERED and "Certificate" in delivery.last_error
            assert not tls_receiver.received
    finally:
        await w.close()
        await tls_receiver.stop()


async def test_approval_after_the_hold_sends_approved(hooks: World, receiver: Receiver) -> None:
    await create(hooks, kind=pb.WEBHOOK_KIND_EVENTS, url=receiver.url + "/h",
                 events=["conversion.pending", "conversion.approved"])
    conversion = await hooks.convert(coupon_code="SUMMER")
    hooks.clock.advance(days=31)
    await hooks.replicas[0].service.lifecycle.approve_due()
    seen = await receiver.wait_for(2)
    objects = [json.loads(r.body) for r in seen]
    # Sent concurrently, so in either order: receivers order by the event's time.
    assert sorted((o["type"], o["data"]["object"]["status"]) for o in objects) == [
        ("conversion.approved", "approved"), ("conversion.pending", "pending")]
    assert {o["data"]["object"]["id"] for o in objects} == {conversion.id}


async def test_a_claim_takes_a_share_per_webhook_and_skips_saturated_ones(hooks: World, receiver: Receiver) -> None:
    from services.attribution.webhooks import store

    slow = await create(hooks, kind=pb.WEBHOOK_KIND_EVENTS, url=receiver.url + "/a", events=["coupon.held"])
    fast = await create(hooks, kind=pb.WEBHOOK_KIND_EVENTS, url=receiver.url + "/b", events=["coupon.held"])
    # Due in a minute: the running worker leaves them alone while the test claims.
    later = datetime.now(UTC) + timedelta(minutes=1)
    rows = [(f"dlv_a{n}", slow.id, f"evt_a{n}", "test", "{}", later) for n in range(20)]
    rows += [(f"dlv_b{n}", fast.id, f"evt_b{n}", "test", "{}", later + timedelta(seconds=1)) for n in range(2)]
    await store.insert_deliveries(hooks.db, rows)
    at = later + timedelta(seconds=2)
    claimed = await store.claim_due(hooks.db, at, 64, timedelta(seconds=15), per_webhook=3)
    # Three of a's twenty (equally due: which three is not defined) and both b's.
    ids = sorted(c.delivery.id for c in claimed)
    assert len(ids) == 5 and len(set(ids)) == 5 and ids[3:] == ["dlv_b0", "dlv_b1"]
    assert all(i.startswith("dlv_a") for i in ids[:3])
    again = await store.claim_due(hooks.db, at, 64, timedelta(seconds=15), per_webhook=3, skip_webhooks=[slow.id])
    assert again == []  # b's are leased; a is skipped
    assert all(c.delivery.attempts == 1 for c in claimed)


async def test_a_host_spelled_in_capitals_is_delivered(
    database_url: str, db: asyncpg.Connection, fraud_service: FraudHandle, receiver: Receiver
) -> None:
    # Host names are case-insensitive: "Hooks.Test" is checked and pinned as
    # the same name aiohttp connects to, not refused as an unexpected host.
    async def to_loopback(host: str, port: int) -> list[str]:
        return ["127.0.0.1"]

    w = await start_world(database_url, db, fraud_service.addr, config(resolve=to_loopback))
    try:
        created = await create(w, kind=pb.WEBHOOK_KIND_EVENTS, url=f"http://Hooks.Test:{receiver.port}/h",
                               events=["coupon.held"])
        await w.catalog.TestWebhook(pb.TestWebhookRequest(webhook_id=created.id), timeout=10)
        [seen] = await receiver.wait_for(1)
        assert seen.path_qs == "/h"
    finally:
        await w.close()


async def test_a_name_that_fails_to_resolve_for_a_while_is_retried_not_dead(
    database_url: str, db: asyncpg.Connection, fraud_service: FraudHandle, receiver: Receiver
) -> None:
    # A resolver outage (SERVFAIL, a timeout) is a connection error: retried on
    # the schedule, not a refused destination that kills the delivery at once.
    failing = {"on": False}

    async def flaky(host: str, port: int) -> list[str]:
        if failing["on"]:
            failing["on"] = False
            raise OSError("Temporary failure in name resolution")
        return ["127.0.0.1"]

    w = await start_world(database_url, db, fraud_service.addr, config(resolve=flaky))
    try:
        created = await create(w, kind=pb.WEBHOOK_KIND_EVENTS, url=f"http://hooks.test:{receiver.port}/h",
                               events=["coupon.held"])
        failing["on"] = True
        test = await w.catalog.TestWebhook(pb.TestWebhookRequest(webhook_id=created.id), timeout=10)
        [seen] = await receiver.wait_for(1)
        assert seen.headers["X-Ascribe-Delivery"] == test.id
        for _ in range(50):
            [delivery] = (await w.catalog.ListDeliveries(
                pb.ListDeliveriesRequest(webhook_id=created.id), timeout=10)).deliveries
            if delivery.state != pb.DELIVERY_STATE_PENDING:
                break
            await asyncio.sleep(0.05)
        assert delivery.state == pb.DELIVERY_STATE_DELIVERED and delivery.attempts == 2
    finally:
        await w.close()


async def test_a_fan_out_racing_a_delete_leaves_no_delivery_pending_forever(hooks: World, receiver: Receiver) -> None:
    # The fan-out read the webhook before DeleteWebhook and commits its
    # delivery after the delete cancelled the pending ones: that delivery,
    # of a webhook that no longer exists, must not stay pending (never
    # claimed, never cleaned up, the backlog alert firing for ever).
    from services.attribution.webhooks import store

    created = await create(hooks, kind=pb.WEBHOOK_KIND_EVENTS, url=receiver.url + "/h", events=["coupon.held"])
    pool = hooks.replicas[0].service.pool
    now = datetime.now(UTC)
    payload = json.dumps({"at": now.isoformat(), "object": {"campaign_id": "cmp"}})
    async with pool.acquire() as conn, conn.transaction():
        await store.insert_deliveries(conn, [("dlv_race", created.id, "evt_race", "coupon.held", payload, now)])
        deleting = asyncio.create_task(store.delete_webhook(pool, created.id, now))
        await asyncio.sleep(0.3)
    await asyncio.wait_for(deleting, 10)
    state = await hooks.db.fetchval("SELECT state FROM webhook_deliveries WHERE id = 'dlv_race'")
    assert state in (None, "cancelled")


async def test_a_short_retry_after_does_not_burn_the_schedule(
    database_url: str, db: asyncpg.Connection, fraud_service: FraudHandle, receiver: Receiver
) -> None:
    # "Retry-After: 0" on every 503 (a load balancer during an outage) must
    # not spend the day-long schedule in seconds and kill the event: the
    # receiver's wait only ever delays a retry beyond the schedule's.
    receiver.answer = lambda _: (503, {"Retry-After": "0"})
    w = await start_world(database_url, db, fraud_service.addr, config(schedule=(0.2, 30.0)))
    try:
        created = await create(w, kind=pb.WEBHOOK_KIND_EVENTS, url=receiver.url + "/h", events=["coupon.held"])
        await w.catalog.TestWebhook(pb.TestWebhookRequest(webhook_id=created.id), timeout=10)
        await receiver.wait_for(2)
        await asyncio.sleep(1.0)
        assert len(receiver.received) == 2
        [delivery] = (await w.catalog.ListDeliveries(
            pb.ListDeliveriesRequest(webhook_id=created.id), timeout=10)).deliveries
        assert delivery.state == pb.DELIVERY_STATE_PENDING and delivery.attempts == 2
    finally:
        await w.close()
