"""Click tracking against the real attribution service, PostgreSQL and fraud service.

Each test starts the attribution service in-process on port 0 over its own
fresh database, seeds the catalog with SQL, and drives TrackingService over
gRPC. The fraud service is the real one (services/fraud, in-process); the
cases about a fraud service that is down point the attribution service at a
port nobody listens on, or stop the real one mid-test.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import grpc
import pytest
from ascribe.attribution.v1 import attribution_pb2 as pb
from ascribe.attribution.v1 import attribution_pb2_grpc
from ascribe.fraud.v1 import fraud_pb2, fraud_pb2_grpc

from services.attribution.clicks.store import release_click_slot, take_click_slot
from services.attribution.common.ids import click_created_at, new_click_id
from services.attribution.metrics import CLICK_FLUSH_ROWS, FRAUD_AVAILABLE
from services.attribution.server import AttributionService, start_attribution
from services.fraud.server import start_fraud
from tests.support import attribution_settings, bad_request_fields, fraud_settings, free_port, sample

ACCEPTED = pb.CLICK_DECISION_ACCEPTED
FLAGGED = pb.CLICK_DECISION_FLAGGED
REJECTED = pb.CLICK_DECISION_REJECTED
LANDING = "https://shop.example/summer?utm_source=affiliate&click_id=STALE&q=a%20b"
DEADLINE_MS = 50
# With the real fraud service: the contract's 50 ms is for a warm service on
# a quiet machine; a test box running other suites needs headroom, or
# ACCEPTED clicks turn FLAGGED (fraud_unavailable) at random.
TEST_FRAUD_DEADLINE_MS = 1000


# ---------------------------------------------------------------- the fraud service


@dataclass
class RunningFraud:
    addr: str
    stop: Callable[[], Awaitable[None]]


async def start_real_fraud(redis_url: str, redis_prefix: str, ipintel_dir: Path) -> RunningFraud:
    service = await start_fraud(fraud_settings(redis_url, redis_prefix, ipintel_dir), handle_sighup=False)
    stopped = False

    async def stop() -> None:
        nonlocal stopped
        if not stopped:
            stopped = True
            await service.stop(grace_seconds=0.5)

    return RunningFraud(addr=f"127.0.0.1:{service.port}", stop=stop)


@pytest.fixture
async def fraud(
    redis_server_url: str, redis_prefix: str, ipintel_dir: Path, redis_client: Any
) -> AsyncIterator[RunningFraud]:
    running = await start_real_fraud(redis_server_url, redis_prefix, ipintel_dir)
    yield running
    await running.stop()


class SlowFraud(fraud_pb2_grpc.FraudServiceServicer):
    """A fraud service that answers after the deadline (the real one is never that slow on demand)."""

    async def CheckClickBatch(self, request: Any, context: Any) -> fraud_pb2.VerdictBatch:
        await asyncio.sleep(1.0)
        allow = fraud_pb2.Verdict(action=fraud_pb2.VERDICT_ACTION_ALLOW)
        return fraud_pb2.VerdictBatch(verdicts=[allow for _ in request.requests])


# ---------------------------------------------------------------- the attribution service


@dataclass
class Harness:
    service: AttributionService
    channel: grpc.aio.Channel
    tracking: attribution_pb2_grpc.TrackingServiceAsyncStub
    db: asyncpg.Connection

    async def click(self, **fields: Any) -> pb.RecordClickResponse:
        return await self.tracking.RecordClick(pb.RecordClickRequest(**fields), timeout=10)

    async def get(self, click_id: str) -> pb.Click:
        return await self.tracking.GetClick(pb.GetClickRequest(click_id=click_id), timeout=10)

    async def rows(self, campaign_id: str = "cmp") -> int:
        return int(await self.db.fetchval("SELECT count(*) FROM clicks WHERE campaign_id = $1", campaign_id))


StartHarness = Callable[..., Awaitable[Harness]]


@pytest.fixture
async def start_harness(database_url: str, db: asyncpg.Connection) -> AsyncIterator[StartHarness]:
    """Starts the attribution service against a given fraud address (torn down after the test)."""
    started: list[Harness] = []

    async def start(fraud_addr: str, deadline_ms: int = DEADLINE_MS) -> Harness:
        # The catalog cache on, as in production: the tests seed before the first click.
        settings = attribution_settings(
            database_url, fraud_addr, fraud_deadline_ms=deadline_ms, catalog_cache_ms=1000
        )
        service = await start_attribution(settings)
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{service.port}")
        harness = Harness(service, channel, attribution_pb2_grpc.TrackingServiceStub(channel), db)
        started.append(harness)
        return harness

    await seed(db)
    yield start
    for harness in started:
        await harness.channel.close()
        await harness.service.stop(0.5)


@pytest.fixture
async def fraud_down(start_harness: StartHarness) -> Harness:
    return await start_harness(f"127.0.0.1:{free_port()}")


async def seed(db: asyncpg.Connection) -> None:
    token_hash = hashlib.sha256(b"token").digest()
    await db.executemany(
        """INSERT INTO campaigns (id, name, landing_url, currency, postback_token_sha256, status)
           VALUES ($1, $2, $3, 'EUR', $4, $5)""",
        [
            ("cmp", "Summer sale", LANDING, token_hash, "active"),
            ("ended", "Last year", "https://shop.example/old", token_hash, "ended"),
        ],
    )
    await db.executemany(
        "INSERT INTO affiliates (id, name, status) VALUES ($1, $2, $3)",
        [("aff-a", "A", "active"), ("aff-b", "B", "active"), ("aff-paused", "P", "paused")],
    )
    # A code for the selected affiliate A only.
    await db.execute(
        """INSERT INTO coupons (campaign_id, code, kind, allow_all_affiliates, affiliate_ids)
           VALUES ('cmp', 'SUMMER10', 'general', false, '{aff-a}')"""
    )


def flush_stats() -> tuple[float, float]:
    """(flushes, rows) of the click group commit so far."""
    count = sample(CLICK_FLUSH_ROWS, "_count") or 0.0
    total = sample(CLICK_FLUSH_ROWS, "_sum") or 0.0
    return count, total


# ---------------------------------------------------------------- cases with fraud down


async def test_seed_flow_code_for_selected_affiliate_only(fraud_down: Harness) -> None:
    a = await fraud_down.click(campaign_id="cmp", affiliate_id="aff-a", coupon_code="summer10")
    b = await fraud_down.click(campaign_id="cmp", affiliate_id="aff-b", coupon_code="SUMMER10")

    stored_a = await fraud_down.get(a.click_id)
    assert stored_a.coupon_code == "SUMMER10" and stored_a.requested_coupon_code == "SUMMER10"
    assert "affiliate_not_allowed" not in stored_a.reasons

    # B is redirected and recorded, without the code, the reason visible.
    assert b.redirect_url.endswith(f"click_id={b.click_id}&coupon=SUMMER10")
    assert "affiliate_not_allowed" in b.reasons
    stored_b = await fraud_down.get(b.click_id)
    assert stored_b.coupon_code == "" and stored_b.requested_coupon_code == "SUMMER10"
    assert "affiliate_not_allowed" in stored_b.reasons
    assert stored_b.affiliate_id == "aff-b" and stored_b.conversions == 0
    # Fraud is down here: both stay creditable, flagged.
    assert a.decision == b.decision == stored_b.decision == FLAGGED


IPHONE = ("Mozilla/5.0 (iPhone; CPU iPhone OS 17_0 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) "
          "Version/17.0 Mobile/15E148 Safari/604.1")
WINDOWS = ("Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) "
           "Chrome/126.0 Safari/537.36")


async def test_clicks_carry_country_and_device_and_the_codes_rules_decide_tracking(fraud_down: Harness) -> None:
    await fraud_down.db.execute(
        """INSERT INTO coupons (campaign_id, code, kind, allow_all_affiliates, countries, device_types)
           VALUES ('cmp', 'DEMOBILE', 'general', true, '{DE}', '{mobile}')"""
    )

    async def click(ip: str, user_agent: str) -> pb.Click:
        answer = await fraud_down.click(
            campaign_id="cmp", affiliate_id="aff-a", coupon_code="DEMOBILE", ip=ip, user_agent=user_agent
        )
        assert answer.redirect_url.endswith("&coupon=DEMOBILE")  # redirected in every case
        return await fraud_down.get(answer.click_id)

    german_phone = await click("87.160.0.1", IPHONE)
    assert (german_phone.country, german_phone.device_type) == ("DE", pb.DEVICE_TYPE_MOBILE)
    assert german_phone.coupon_code == "DEMOBILE"
    american = await click("8.8.8.8", IPHONE)
    assert american.country == "US" and american.coupon_code == ""
    assert "restriction_country" in american.reasons and american.decision != REJECTED
    desktop = await click("80.128.0.1", WINDOWS)
    assert desktop.device_type == pb.DEVICE_TYPE_DESKTOP and desktop.coupon_code == ""
    assert "restriction_device" in desktop.reasons
    unknown_country = await click("10.1.2.3", IPHONE)  # no country known: tracking begins
    assert unknown_country.country == "" and unknown_country.coupon_code == "DEMOBILE"
    # A country the caller sent wins over the address's.
    sent = await fraud_down.click(campaign_id="cmp", affiliate_id="aff-a", ip="8.8.8.8", country="fr")
    assert (await fraud_down.get(sent.click_id)).country == "FR"


async def test_a_malformed_code_is_recorded_untracked_not_refused(fraud_down: Harness) -> None:
    response = await fraud_down.click(campaign_id="cmp", affiliate_id="aff-a", coupon_code="save 10")
    assert response.redirect_url.endswith(f"click_id={response.click_id}&coupon=SAVE%2010")
    stored = await fraud_down.get(response.click_id)
    assert stored.coupon_code == "" and stored.requested_coupon_code == "SAVE 10"
    assert "unknown_coupon" in stored.reasons and stored.decision == FLAGGED


async def test_fraud_down_flags_fast_and_loses_nothing(fraud_down: Harness) -> None:
    started = time.perf_counter()
    responses = await asyncio.gather(
        *(fraud_down.click(campaign_id="cmp", affiliate_id="aff-a", sub1=str(i)) for i in range(50))
    )
    assert time.perf_counter() - started < 5
    assert {r.decision for r in responses} == {FLAGGED}
    assert all("fraud_unavailable" in r.reasons for r in responses)
    assert await fraud_down.rows() == 50
    stored = await fraud_down.get(responses[0].click_id)
    assert stored.decision == FLAGGED and list(stored.reasons) == ["fraud_unavailable"]


async def test_unknown_campaign_is_not_found_and_stores_nothing(fraud_down: Harness) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await fraud_down.click(campaign_id="nope", affiliate_id="aff-a")
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    assert await fraud_down.db.fetchval("SELECT count(*) FROM clicks") == 0


async def test_paused_affiliate_is_rejected_but_redirected(fraud_down: Harness) -> None:
    response = await fraud_down.click(campaign_id="cmp", affiliate_id="aff-paused", coupon_code="SUMMER10")
    assert response.decision == REJECTED
    assert response.redirect_url.startswith("https://shop.example/summer?")
    assert f"click_id={response.click_id}" in response.redirect_url
    stored = await fraud_down.get(response.click_id)
    assert stored.decision == REJECTED
    # Rejected before any fraud check: no fraud_unavailable for it.
    assert list(stored.reasons) == ["affiliate_inactive", "affiliate_not_allowed"]


async def test_unknown_affiliate_and_inactive_campaign_reject(fraud_down: Harness) -> None:
    unknown = await fraud_down.click(campaign_id="cmp", affiliate_id="ghost")
    ended = await fraud_down.click(campaign_id="ended", affiliate_id="aff-a")
    assert (unknown.decision, list(unknown.reasons)) == (REJECTED, ["unknown_affiliate"])
    assert (ended.decision, list(ended.reasons)) == (REJECTED, ["campaign_inactive"])
    assert ended.redirect_url == f"https://shop.example/old?click_id={ended.click_id}"


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"campaign_id": ""}, "campaign_id"),
        ({"affiliate_id": ""}, "affiliate_id"),
        ({"sub2": "x" * 257}, "sub2"),
        ({"user_agent": "u" * 1025}, "user_agent"),
        ({"ip": "999.0.0.1"}, "ip"),
        ({"coupon_code": "C" * 65}, "coupon_code"),  # a short malformed code is unknown_coupon instead
        ({"occurred_at": {"seconds": int(time.time()) + 3600}}, "occurred_at"),
    ],
)
async def test_bad_input_is_invalid_argument_naming_the_field(
    fraud_down: Harness, fields: dict[str, Any], field: str
) -> None:
    request: dict[str, Any] = {"campaign_id": "cmp", "affiliate_id": "aff-a", **fields}
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await fraud_down.click(**request)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert bad_request_fields(caught.value) == [field]
    assert await fraud_down.db.fetchval("SELECT count(*) FROM clicks") == 0


async def test_redirect_keeps_the_landing_query_and_replaces_click_id(fraud_down: Harness) -> None:
    response = await fraud_down.click(campaign_id="cmp", affiliate_id="aff-a")
    assert response.redirect_url == (
        f"https://shop.example/summer?utm_source=affiliate&q=a%20b&click_id={response.click_id}"
    )
    assert "STALE" not in response.redirect_url


async def test_500_concurrent_clicks_are_all_committed_in_batches(fraud_down: Harness) -> None:
    flushes_before, rows_before = flush_stats()
    responses = await asyncio.gather(
        *(
            fraud_down.click(campaign_id="cmp", affiliate_id="aff-a", coupon_code="SUMMER10", sub1=str(i))
            for i in range(500)
        )
    )
    flushes_after, rows_after = flush_stats()
    ids = {r.click_id for r in responses}
    assert len(ids) == 500
    assert await fraud_down.rows() == 500
    stored = await fraud_down.db.fetch("SELECT click_id, sub1 FROM clicks WHERE campaign_id = 'cmp'")
    assert {row["click_id"] for row in stored} == ids
    assert sorted(int(row["sub1"]) for row in stored) == list(range(500))
    assert rows_after - rows_before == 500
    # Group commit: clicks that arrive while a commit is in flight share the
    # next one. How many share depends on the machine's speed, so only a
    # share is asserted, not a ratio.
    flushes = flushes_after - flushes_before
    assert flushes < 450, f"{flushes:.0f} group commits for 500 clicks"


async def test_click_rows_go_to_the_partition_their_id_names(fraud_down: Harness) -> None:
    response = await fraud_down.click(campaign_id="cmp", affiliate_id="aff-a")
    row = await fraud_down.db.fetchrow(
        "SELECT tableoid::regclass::text AS part, created_at FROM clicks WHERE click_id = $1", response.click_id
    )
    assert row is not None
    assert row["created_at"] == click_created_at(response.click_id)
    assert row["part"] == "clicks_" + click_created_at(response.click_id).strftime("%Y%m%d")


async def test_record_click_batch_fails_only_the_bad_entries(fraud_down: Harness) -> None:
    requests = [
        pb.RecordClickRequest(campaign_id="cmp", affiliate_id="aff-a", coupon_code="SUMMER10"),
        pb.RecordClickRequest(campaign_id="cmp", affiliate_id="aff-a", sub4="x" * 300),
        pb.RecordClickRequest(campaign_id="nope", affiliate_id="aff-a"),
        pb.RecordClickRequest(campaign_id="cmp", affiliate_id="aff-paused"),
    ]
    answer = await fraud_down.tracking.RecordClickBatch(pb.RecordClickBatchRequest(requests=requests), timeout=10)
    kinds = [result.WhichOneof("result") for result in answer.responses]
    assert kinds == ["response", "error", "error", "response"]
    assert answer.responses[1].error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert answer.responses[1].error.field == "sub4"
    assert answer.responses[2].error.code == grpc.StatusCode.NOT_FOUND.value[0]
    assert answer.responses[0].response.decision == FLAGGED
    assert answer.responses[3].response.decision == REJECTED
    assert await fraud_down.rows() == 2
    stored = await fraud_down.get(answer.responses[0].response.click_id)
    assert stored.coupon_code == "SUMMER10"


async def test_record_click_stream_answers_batches_like_record_click_batch(
    fraud: RunningFraud, start_harness: StartHarness
) -> None:
    harness = await start_harness(fraud.addr, TEST_FRAUD_DEADLINE_MS)
    call = harness.tracking.RecordClickStream()

    def message(seq: int, requests: list[pb.RecordClickRequest]) -> pb.RecordClickStreamRequest:
        return pb.RecordClickStreamRequest(seq=seq, batch=pb.RecordClickBatchRequest(requests=requests))

    browser = "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/126.0 Safari/537.36"
    good = pb.RecordClickRequest(
        campaign_id="cmp", affiliate_id="aff-a", coupon_code="SUMMER10", ip="198.51.100.20", user_agent=browser
    )
    bad_entry = pb.RecordClickRequest(campaign_id="cmp", affiliate_id="aff-a", sub4="x" * 300)
    too_many = [pb.RecordClickRequest(campaign_id="cmp", affiliate_id="aff-b")] * 1001
    await call.write(message(7, [good, bad_entry]))
    await call.write(message(8, too_many))
    await call.write(message(9, [good]))
    await call.done_writing()
    replies = {reply.seq: reply async for reply in call}
    assert await call.code() == grpc.StatusCode.OK
    assert sorted(replies) == [7, 8, 9]
    first = replies[7].batch.responses
    assert [r.WhichOneof("result") for r in first] == ["response", "error"]
    assert first[0].response.decision == ACCEPTED and first[1].error.field == "sub4"
    # A message the batch RPC would refuse as a whole is refused alone.
    assert replies[8].WhichOneof("result") == "error"
    assert replies[8].error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert replies[9].batch.responses[0].response.decision == ACCEPTED
    assert await harness.rows() == 2
    stored = await harness.get(first[0].response.click_id)
    assert stored.coupon_code == "SUMMER10"


async def test_get_click_errors(fraud_down: Harness) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as malformed:
        await fraud_down.get("not-a-click-id")
    assert malformed.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert bad_request_fields(malformed.value) == ["click_id"]
    with pytest.raises(grpc.aio.AioRpcError) as unknown:
        await fraud_down.get(new_click_id(datetime.now(UTC)))
    assert unknown.value.code() == grpc.StatusCode.NOT_FOUND


async def test_get_click_returns_everything_recorded(fraud_down: Harness) -> None:
    occurred = datetime.now(UTC).replace(microsecond=0) - timedelta(seconds=30)
    response = await fraud_down.click(
        campaign_id="cmp",
        affiliate_id="aff-a",
        coupon_code="summer10",
        external_click_id="aff-click-1",
        sub1="s1",
        sub5="s5",
        ip="203.0.113.7",
        user_agent="Mozilla/5.0",
        referer="https://blog.example/post",
        country="de",
        occurred_at={"seconds": int(occurred.timestamp())},
    )
    stored = await fraud_down.get(response.click_id)
    assert (stored.click_id, stored.campaign_id, stored.affiliate_id) == (response.click_id, "cmp", "aff-a")
    assert (stored.external_click_id, stored.sub1, stored.sub2, stored.sub5) == ("aff-click-1", "s1", "", "s5")
    assert (stored.ip, stored.user_agent, stored.referer, stored.country) == (
        "203.0.113.7",
        "Mozilla/5.0",
        "https://blog.example/post",
        "DE",
    )
    assert stored.occurred_at.ToDatetime(tzinfo=UTC) == occurred
    assert stored.received_at.ToDatetime(tzinfo=UTC) == click_created_at(response.click_id)
    assert list(stored.reasons) == list(response.reasons)


async def test_a_failed_group_commit_fails_its_clicks_with_unavailable(fraud_down: Harness) -> None:
    await fraud_down.click(campaign_id="cmp", affiliate_id="aff-a")  # warm: the table is known
    await fraud_down.db.execute("ALTER TABLE clicks RENAME TO clicks_away")
    try:
        results = await asyncio.gather(
            *(fraud_down.click(campaign_id="cmp", affiliate_id="aff-a") for _ in range(5)),
            return_exceptions=True,
        )
    finally:
        await fraud_down.db.execute("ALTER TABLE clicks_away RENAME TO clicks")
    assert all(isinstance(r, grpc.aio.AioRpcError) for r in results)
    assert {r.code() for r in results if isinstance(r, grpc.aio.AioRpcError)} == {grpc.StatusCode.UNAVAILABLE}
    # The service recovers once PostgreSQL is usable again.
    await fraud_down.click(campaign_id="cmp", affiliate_id="aff-a")
    assert await fraud_down.rows() == 2


async def test_late_fraud_answers_flag_within_the_deadline(start_harness: StartHarness) -> None:
    server = grpc.aio.server()
    # Only CheckClickBatch is answered; the other RPCs stay UNIMPLEMENTED (the stub base class).
    fraud_pb2_grpc.add_FraudServiceServicer_to_server(SlowFraud(), server)  # type: ignore[abstract]
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        harness = await start_harness(f"127.0.0.1:{port}")
        started = time.perf_counter()
        response = await harness.click(campaign_id="cmp", affiliate_id="aff-a")
        elapsed = time.perf_counter() - started
        assert response.decision == FLAGGED and list(response.reasons) == ["fraud_unavailable"]
        assert elapsed < 0.5  # the deadline is 50 ms; the fraud service takes 1 s
        assert await harness.rows() == 1
    finally:
        await server.stop(0)


# ---------------------------------------------------------------- click slots (for conversions)


async def test_click_slots_hold_the_limit_under_concurrency(fraud_down: Harness) -> None:
    response = await fraud_down.click(campaign_id="cmp", affiliate_id="aff-a")
    click_id = response.click_id
    created_at = click_created_at(click_id)
    pool = fraud_down.service.pool

    async def take(limit: int) -> bool:
        async with pool.acquire() as conn, conn.transaction():
            return await take_click_slot(conn, click_id, created_at, limit)

    taken = await asyncio.gather(*(take(2) for _ in range(8)))
    assert sum(taken) == 2
    assert (await fraud_down.get(click_id)).conversions == 2
    async with pool.acquire() as conn:
        assert await release_click_slot(conn, click_id, created_at)
        assert await take_click_slot(conn, click_id, created_at, 2)
        assert not await take_click_slot(conn, click_id, created_at, 2)
        assert await take_click_slot(conn, click_id, created_at, 0)  # 0: no limit
        for _ in range(3):
            assert await release_click_slot(conn, click_id, created_at)
        assert not await release_click_slot(conn, click_id, created_at)  # never below zero
        assert not await take_click_slot(conn, new_click_id(datetime.now(UTC)), created_at, 1)


async def test_a_rolled_back_transaction_gives_the_slot_back(fraud_down: Harness) -> None:
    response = await fraud_down.click(campaign_id="cmp", affiliate_id="aff-a")
    created_at = click_created_at(response.click_id)
    async with fraud_down.service.pool.acquire() as conn:
        with pytest.raises(RuntimeError):
            async with conn.transaction():
                assert await take_click_slot(conn, response.click_id, created_at, 1)
                raise RuntimeError("the conversion failed later in its transaction")
    assert (await fraud_down.get(response.click_id)).conversions == 0


# ---------------------------------------------------------------- with the real fraud service


async def test_seed_flow_with_fraud(start_harness: StartHarness, fraud: RunningFraud) -> None:
    harness = await start_harness(fraud.addr, TEST_FRAUD_DEADLINE_MS)
    ua = "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/126.0 Safari/537.36"
    a = await harness.click(
        campaign_id="cmp", affiliate_id="aff-a", coupon_code="SUMMER10", ip="198.51.100.10", user_agent=ua
    )
    b = await harness.click(
        campaign_id="cmp", affiliate_id="aff-b", coupon_code="SUMMER10", ip="198.51.100.11", user_agent=ua
    )
    assert a.decision == ACCEPTED and list(a.reasons) == []
    assert b.decision == ACCEPTED and list(b.reasons) == ["affiliate_not_allowed"]
    assert (await harness.get(a.click_id)).coupon_code == "SUMMER10"
    stored_b = await harness.get(b.click_id)
    assert stored_b.coupon_code == "" and list(stored_b.reasons) == ["affiliate_not_allowed"]


async def test_duplicate_affiliate_click_id_is_a_fraud_signal(
    start_harness: StartHarness, fraud: RunningFraud
) -> None:
    harness = await start_harness(fraud.addr, TEST_FRAUD_DEADLINE_MS)
    ua = "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/126.0 Safari/537.36"
    first = await harness.click(
        campaign_id="cmp", affiliate_id="aff-a", external_click_id="dup-1", ip="198.51.100.20", user_agent=ua
    )
    second = await harness.click(
        campaign_id="cmp", affiliate_id="aff-a", external_click_id="dup-1", ip="198.51.100.20", user_agent=ua
    )
    assert first.decision == ACCEPTED
    assert second.decision in (FLAGGED, REJECTED)
    assert "fraud_duplicate_click_id" in second.reasons
    assert await harness.rows() == 2


async def test_crawler_click_is_not_accepted(start_harness: StartHarness, fraud: RunningFraud) -> None:
    harness = await start_harness(fraud.addr, TEST_FRAUD_DEADLINE_MS)
    response = await harness.click(
        campaign_id="cmp",
        affiliate_id="aff-a",
        ip="198.51.100.30",
        user_agent="Mozilla/5.0 (compatible; Googlebot/2.1; +http://www.google.com/bot.html)",
    )
    assert response.decision in (FLAGGED, REJECTED)
    # Googlebot's name from an address outside Google's ranges: a spoof.
    assert {"fraud_bot_user_agent", "fraud_crawler_spoof"} & set(response.reasons)


async def test_fraud_stopped_mid_test_flags_clicks_and_loses_none(
    start_harness: StartHarness, redis_server_url: str, redis_prefix: str, ipintel_dir: Path, redis_client: Any
) -> None:
    fraud_service = await start_real_fraud(redis_server_url, redis_prefix, ipintel_dir)
    try:
        harness = await start_harness(fraud_service.addr, TEST_FRAUD_DEADLINE_MS)
        await check_fraud_stop(harness, fraud_service)
    finally:
        await fraud_service.stop()


async def check_fraud_stop(harness: Harness, fraud_service: RunningFraud) -> None:
    ua = "Mozilla/5.0 (Macintosh; Intel Mac OS X 14_5) AppleWebKit/605.1.15 (KHTML, like Gecko) Version/17.5 Safari/605.1.15"

    async def burst(tag: str, n: int) -> list[pb.RecordClickResponse]:
        return list(
            await asyncio.gather(
                *(
                    harness.click(
                        campaign_id="cmp", affiliate_id="aff-a", sub1=f"{tag}{i}", ip=f"198.51.100.{i % 200 + 1}",
                        user_agent=ua,
                    )
                    for i in range(n)
                )
            )
        )

    before = await burst("before", 20)
    assert {r.decision for r in before} == {ACCEPTED}
    await fraud_service.stop()
    during = await burst("during", 40)
    assert {r.decision for r in during} == {FLAGGED}
    assert all("fraud_unavailable" in r.reasons for r in during)
    assert await harness.rows() == 60
    fraud_gauge = sample(FRAUD_AVAILABLE)
    assert fraud_gauge == 0


async def test_the_click_writer_never_uses_a_connection_the_pool_took_back(
    fraud_down: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    """A writer connection that dies between flushes is the pool's again: the next flush takes a new one.

    (It used to keep the dead one's proxy, which asyncpg had detached: the next
    group commit failed with "connection has been released back to the pool",
    failing a batch of clicks after PostgreSQL was already back.)
    """
    await fraud_down.click(campaign_id="cmp", affiliate_id="aff-a")
    # Every other session of this database ends, as in a PostgreSQL restart.
    await fraud_down.db.execute(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
        " WHERE datname = current_database() AND pid <> pg_backend_pid()"
    )
    await asyncio.sleep(0.3)  # the service's loop sees its connections close
    for _ in range(3):
        await fraud_down.click(campaign_id="cmp", affiliate_id="aff-a")
    assert await fraud_down.rows() == 4
    assert not [r for r in caplog.records if "released back to the pool" in r.getMessage()]
