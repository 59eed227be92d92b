"""Tracking links and postbacks end to end: gateway -> attribution -> fraud, real processes."""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, urlsplit

import aiohttp
import asyncpg
import pytest
from ascribe.attribution.v1 import attribution_pb2 as pb
from yarl import URL

from tests.e2e.world import LiveWorld

pytestmark = pytest.mark.slow


async def seed(live: LiveWorld) -> pb.Campaign:
    campaign = await live.setup_campaign()
    for affiliate in ("aff-a", "aff-b"):
        await live.catalog.CreateAffiliate(
            pb.CreateAffiliateRequest(affiliate=pb.Affiliate(id=affiliate, name=affiliate, channel="social")),
            timeout=10,
        )
    await live.catalog.CreateCoupon(
        pb.CreateCouponRequest(coupon=pb.Coupon(
            campaign_id="cmp", code="SUMMER150", usage_limit=150, affiliate_ids=["aff-a"],
        )),
        timeout=10,
    )
    return campaign


async def test_the_seed_flow_from_link_to_postback(live: LiveWorld) -> None:
    campaign = await seed(live)
    a = await live.click(campaign_id="cmp", aff_id="aff-a", coupon="summer150", sub1="story")
    assert a.status == 302
    location = urlsplit(a.headers["Location"])
    query = parse_qs(location.query)
    assert location.netloc == "shop.example" and query["utm_source"] == ["aff"]
    assert query["click_id"] == [a.headers["X-Ascribe-Click-Id"]] and query["coupon"] == ["SUMMER150"]
    a_click = await live.get_click(a.headers["X-Ascribe-Click-Id"])
    assert a_click.coupon_code == "SUMMER150" and a_click.decision == pb.CLICK_DECISION_ACCEPTED
    assert a_click.ip == "203.0.113.7" and a_click.sub1 == "story"

    b = await live.click(campaign_id="cmp", aff_id="aff-b", coupon="SUMMER150")
    assert b.status == 302 and b.headers["X-Ascribe-Decision"] == "accepted"
    b_click = await live.get_click(b.headers["X-Ascribe-Click-Id"])
    assert b_click.coupon_code == "" and "affiliate_not_allowed" in b_click.reasons

    # The order happened a minute after the click (a sale seconds after its
    # click is the fraud rule fraud_ctit_too_short).
    order = {
        "campaign_id": "cmp", "order_id": "1001", "amount": "49.90", "discount": "5.00", "currency": "EUR",
        "coupon": "SUMMER150", "click_id": a.headers["X-Ascribe-Click-Id"], "customer_id": "cust-1",
        "occurred_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + 60)),
    }
    status, body = await live.postback(campaign.postback_token, **order)
    assert status == 200, body
    assert body["status"] == "pending", body
    assert body["affiliate_id"] == "aff-a" and body["source"] == "click"
    assert body["amount"] == "49.90" and body["payout"] == "5.00" and body["coupon_remaining"] == 149
    again_status, again = await live.postback(campaign.postback_token, **order)
    assert again_status == 200 and again["id"] == body["id"] and again["coupon_remaining"] == 149
    conflict_status, conflict = await live.postback(campaign.postback_token, **{**order, "amount": "59.90"})
    assert conflict_status == 409, conflict


async def test_crawlers_and_duplicate_affiliate_click_ids_are_rejected_but_redirected(live: LiveWorld) -> None:
    await seed(live)
    bot = await live.click(
        ua="Mozilla/5.0 (compatible; Googlebot/2.1; +http://www.google.com/bot.html)",
        campaign_id="cmp", aff_id="aff-a",
    )
    assert bot.status == 302 and bot.headers["X-Ascribe-Decision"] == "rejected"
    first = await live.click(campaign_id="cmp", aff_id="aff-a", aff_click_id="net-42", visitor_ip="203.0.113.8")
    dup = await live.click(campaign_id="cmp", aff_id="aff-a", aff_click_id="net-42", visitor_ip="203.0.113.9")
    assert first.headers["X-Ascribe-Decision"] == "accepted"
    assert dup.status == 302 and dup.headers["X-Ascribe-Decision"] == "rejected"
    assert "fraud_duplicate_click_id" in (await live.get_click(dup.headers["X-Ascribe-Click-Id"])).reasons


async def test_a_browser_user_agent_with_commas_and_quotes_reaches_the_bot_check_intact(live: LiveWorld) -> None:
    # (A quote-wrapped user agent once showed as a rejected clean event in the
    # fraud efficacy run: its test data, not this path; this pins the path.)
    await seed(live)
    ua = ('Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) AppleWebKit/605.1.15 (KHTML, like Gecko) '
          'Version/17.4 Safari/605.1.15 ShopApp/2.1 (build "42", beta; de,en)')
    click = await live.click(ua=ua, campaign_id="cmp", aff_id="aff-a")
    assert click.status == 302 and click.headers["X-Ascribe-Decision"] == "accepted"
    stored = await live.get_click(click.headers["X-Ascribe-Click-Id"])
    assert stored.user_agent == ua and not any(r.startswith("fraud_") for r in stored.reasons)


JSON_ERROR_KEYS = {"code", "message", "field"}
PLAIN = "campaign_id=cmp&aff_id=aff-a"
HUGE_UA = "Mozilla/5.0 " + "x" * 1100

# (case, query, extra headers, status, field named in the error)
BAD_CLICKS: list[tuple[str, str, dict[str, str], int, str | None]] = [
    ("missing campaign_id", "aff_id=aff-a", {}, 400, "campaign_id"),
    ("missing aff_id", "campaign_id=cmp", {}, 400, "aff_id"),
    ("empty aff_id", "campaign_id=cmp&aff_id=", {}, 400, "aff_id"),
    ("malformed percent-encoding", PLAIN + "&sub3=%ZZ", {}, 400, "sub3"),
    ("truncated percent-encoding", PLAIN + "&aff_click_id=net%4", {}, 400, "aff_click_id"),
    ("bad UTF-8 in a sub id", PLAIN + "&sub2=%ff%fe", {}, 400, "sub2"),
    ("bad UTF-8 in the coupon", PLAIN + "&coupon=SAVE%C3%28", {}, 400, "coupon"),
    ("sub id over 256 bytes", PLAIN + "&sub1=" + "x" * 257, {}, 400, "sub1"),
    # 129 characters, 258 bytes: the limit counts UTF-8 bytes, not characters.
    ("sub id over 256 UTF-8 bytes", PLAIN + "&sub4=" + "%C3%A9" * 129, {}, 400, "sub4"),
    ("coupon over 64 bytes (the longest legal code)", PLAIN + "&coupon=" + "A" * 65, {}, 400, "coupon"),
    ("user agent over 1 KB", PLAIN, {"User-Agent": HUGE_UA}, 400, "user_agent"),
    ("unknown campaign", "campaign_id=nope&aff_id=aff-a", {}, 404, None),
]


def error_problems(case: str, status: int, body: object, want_status: int, want_field: str | None) -> list[str]:
    """What is wrong with an error answer: its status, its JSON shape, the field it names."""
    if status != want_status:
        return [f"{case}: status {status}, wanted {want_status}: {body!r}"]
    error = body.get("error") if isinstance(body, dict) else None
    if not isinstance(error, dict) or set(error) != JSON_ERROR_KEYS:
        return [f"{case}: not an error object {sorted(JSON_ERROR_KEYS)}: {body!r}"]
    problems = []
    if not (isinstance(error["code"], str) and error["code"] and isinstance(error["message"], str)
            and error["message"]):
        problems.append(f"{case}: empty code or message: {error!r}")
    if error["field"] != want_field:
        problems.append(f"{case}: names field {error['field']!r}, wanted {want_field!r}")
    return problems


async def test_bad_click_input(live: LiveWorld, database_url: str) -> None:
    await seed(live)
    problems: list[str] = []
    for case, query, headers, status, field in BAD_CLICKS:
        # encoded=True: yarl would otherwise "fix" %ZZ into %25ZZ before it left the client.
        async with live.http.get(
            URL(f"{live.url}/click?{query}", encoded=True), allow_redirects=False, headers=headers,
            timeout=aiohttp.ClientTimeout(total=10),
        ) as response:
            if response.content_type != "application/json":
                problems.append(f"{case}: {response.status} {response.content_type}, not JSON")
                continue
            problems += error_problems(case, response.status, await response.json(), status, field)
    assert not problems, "\n".join(problems)
    # Requests that fail syntax or name an unknown campaign store nothing.
    assert await count_clicks(database_url) == 0


async def raw_get(live: LiveWorld, target: bytes, headers: bytes = b"") -> tuple[int, dict[str, str], bytes]:
    """One HTTP/1.1 GET written by hand, so its bytes reach the gateway exactly as given.

    Returns the status, the response headers (names in lower case) and the body.
    """
    port = live.stack.ports.gateway
    reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 5)
    try:
        writer.write(
            b"GET " + target + b" HTTP/1.1\r\nHost: 127.0.0.1:" + str(port).encode() + b"\r\n"
            + b"X-Forwarded-For: 203.0.113.7\r\n" + headers + b"Connection: close\r\n\r\n"
        )
        await writer.drain()
        raw = await asyncio.wait_for(reader.read(), 10)  # Connection: close, so up to EOF
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
    head, _, body = raw.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    answer_headers = {}
    for line in lines:
        name, _, value = line.partition(":")
        answer_headers[name.strip().lower()] = value.strip()
    return int(status_line.split()[1]), answer_headers, body


# (case, header line with raw bytes); aiohttp's client cannot send these, it encodes header values.
RAW_USER_AGENTS = [
    ("non-UTF-8 User-Agent", b"User-Agent: Mozilla/5.0 \xff\xfe Safari\r\n"),
    ("Latin-1 User-Agent", b"User-Agent: Mozilla/5.0 (Macintosh; Fran\xe7ais)\r\n"),
    ("truncated UTF-8 User-Agent", b"User-Agent: Mozilla/5.0 \xe2\x82\r\n"),
]


async def test_raw_non_utf8_user_agent_is_400_naming_it(live: LiveWorld, database_url: str) -> None:
    await seed(live)
    target = b"/click?" + PLAIN.encode()
    ok_status, _, _ = await raw_get(live, target, b"User-Agent: Mozilla/5.0 (X11; Linux x86_64)\r\n")
    assert ok_status == 302, "the hand-written request itself must be a valid click"
    problems: list[str] = []
    for case, header in RAW_USER_AGENTS:
        status, headers, body = await raw_get(live, target, header)
        if not headers.get("content-type", "").startswith("application/json"):
            problems.append(f"{case}: {status} {headers.get('content-type')!r}, not JSON: {body[:200]!r}")
            continue
        problems += error_problems(case, status, json.loads(body), 400, "user_agent")
    assert not problems, "\n".join(problems)
    # Raw bytes in the query itself are refused by aiohttp's HTTP parser before any handler runs
    # (a plain-text 400, not our JSON): still a 400, never a 500, and no click.
    status, _, body = await raw_get(live, target + b"&sub1=caf\xe9", b"User-Agent: Mozilla/5.0\r\n")
    assert status == 400, body
    assert await count_clicks(database_url) == 1  # only the valid one


async def test_raw_non_utf8_referer_costs_no_click(live: LiveWorld) -> None:
    # The browser, not the visitor, writes the Referer: its bad bytes become U+FFFD, the click goes on.
    await seed(live)
    status, headers, body = await raw_get(
        live, b"/click?" + PLAIN.encode(),
        b"User-Agent: Mozilla/5.0 (X11; Linux x86_64)\r\nReferer: https://blog.example/caf\xe9?q=\xff\r\n",
    )
    assert status == 302, body
    click = await live.get_click(headers["x-ascribe-click-id"])
    assert click.referer == "https://blog.example/caf\ufffd?q=\ufffd"
    assert click.decision == pb.CLICK_DECISION_ACCEPTED


@pytest.mark.parametrize("code", ["SAVE 10", "AB", "save10!", "SUMMER150\u00e9"])
async def test_a_coupon_that_cannot_be_a_code_redirects_untracked(live: LiveWorld, code: str) -> None:
    await seed(live)
    response = await live.click(campaign_id="cmp", aff_id="aff-a", coupon=code)
    assert response.status == 302, await response.text()
    location = urlsplit(response.headers["Location"])
    click_id = response.headers["X-Ascribe-Click-Id"]
    query = parse_qs(location.query)
    assert location.netloc == "shop.example" and query["click_id"] == [click_id]
    # The landing page gets the code as the visitor typed it (upper-cased), safely encoded.
    assert query["coupon"] == [code.upper()]
    click = await live.get_click(click_id)
    assert click.coupon_code == "" and click.requested_coupon_code == code.upper()
    assert "unknown_coupon" in click.reasons
    # A mistyped code costs the affiliate nothing: the click itself stays accepted.
    assert click.decision == pb.CLICK_DECISION_ACCEPTED
    assert response.headers["X-Ascribe-Decision"] == "accepted"


async def count_clicks(database_url: str, click_ids: list[str] | None = None) -> int:
    conn = await asyncpg.connect(database_url, timeout=10)
    try:
        if click_ids is None:
            return int(await conn.fetchval("SELECT count(*) FROM clicks"))
        return int(await conn.fetchval("SELECT count(*) FROM clicks WHERE click_id = ANY($1::text[])", click_ids))
    finally:
        await conn.close()


async def stored_clicks(database_url: str, click_ids: list[str]) -> dict[str, tuple[str, list[str]]]:
    """click_id -> (decision, reasons) as PostgreSQL holds them."""
    conn = await asyncpg.connect(database_url, timeout=10)
    try:
        rows = await conn.fetch(
            "SELECT click_id, decision, reasons FROM clicks WHERE click_id = ANY($1::text[])", click_ids
        )
    finally:
        await conn.close()
    return {row["click_id"]: (row["decision"], list(row["reasons"])) for row in rows}


async def wait_until(condition: Callable[[], bool], what: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f}s waiting for {what}")
        await asyncio.sleep(0.02)


@dataclass(frozen=True)
class Outcome:
    sent: str  # the phase when the request went out ...
    answered: str  # ... and when its answer came back
    status: int
    click_id: str
    decision: str


async def test_fraud_service_stopped_mid_test_flags_and_loses_nothing(
    live: LiveWorld, database_url: str
) -> None:
    campaign = await seed(live)
    phase = "before"
    outcomes: list[Outcome] = []
    failures: list[str] = []
    done = asyncio.Event()

    async def visitor(n: int) -> None:
        i = 0
        while not done.is_set():
            i += 1
            sent = phase
            try:
                # A /64 of its own per click: the per-address velocity rules (IPv6 by /64) must not flag them.
                response = await asyncio.wait_for(
                    live.click(campaign_id="cmp", aff_id="aff-a", visitor_ip=f"2001:db8:{n:x}:{i:x}::1",
                               sub1=f"{n}-{i}"),
                    10,
                )
            except (aiohttp.ClientError, TimeoutError) as error:
                failures.append(f"{sent}: {error!r}")
                continue
            outcomes.append(Outcome(
                sent, phase, response.status, response.headers.get("X-Ascribe-Click-Id", ""),
                response.headers.get("X-Ascribe-Decision", ""),
            ))
            await asyncio.sleep(0.01)

    def answered_in(name: str) -> list[Outcome]:
        return [o for o in outcomes if o.sent == name and o.answered == name]

    async def operator() -> None:
        nonlocal phase
        try:
            await wait_until(lambda: len(answered_in("before")) >= 30, "clicks before the stop", 20)
            phase = "stopping"
            await asyncio.to_thread(live.stack.stop_service, "fraud")
            phase = "down"
            await wait_until(lambda: len(answered_in("down")) >= 30, "clicks while fraud is down", 20)
            status, body = await live.postback(
                campaign.postback_token, campaign_id="cmp", order_id="down-1", amount="10.00", currency="EUR",
            )
            assert status == 200 and body["status"] == "flagged" and "fraud_unavailable" in body["reasons"]
            phase = "restarting"
            await asyncio.to_thread(live.stack.start_service, "fraud")
            phase = "up"
            await wait_until(
                lambda: sum(o.decision == "accepted" for o in answered_in("up")) >= 10,
                "accepted clicks after the restart", 20,
            )
        finally:
            done.set()

    await asyncio.wait_for(asyncio.gather(operator(), *(visitor(n) for n in range(1, 5))), timeout=120)

    assert not failures, failures[:5]
    not_redirected = [o for o in outcomes if o.status != 302 or not o.click_id]
    assert not not_redirected, not_redirected[:5]
    stored = await stored_clicks(database_url, [o.click_id for o in outcomes])
    lost = [o for o in outcomes if o.click_id not in stored]
    assert not lost, f"{len(lost)} of {len(outcomes)} redirected clicks are not in PostgreSQL: {lost[:5]}"
    for o in outcomes:
        # The header is what the visitor was told; PostgreSQL holds the same decision.
        assert stored[o.click_id][0] == o.decision, o
        assert o.decision in ("accepted", "flagged"), (o, stored[o.click_id])
        if o.decision == "flagged":
            assert "fraud_unavailable" in stored[o.click_id][1], (o, stored[o.click_id])
    before = answered_in("before")
    assert all(o.decision == "accepted" for o in before), [o for o in before if o.decision != "accepted"][:5]
    down = answered_in("down")
    assert all(o.decision == "flagged" for o in down), [o for o in down if o.decision != "flagged"][:5]
    # After the restart clicks are flagged only until the attribution service has reconnected (the
    # operator waited for 10 accepted ones); each of them still has its row, checked above.
    assert sum(o.decision == "accepted" for o in answered_in("up")) >= 10


async def get_click_answer(live: LiveWorld, **params: str) -> tuple[int, str, dict[str, Any] | None]:
    """Status, click id (empty unless redirected) and JSON body (None unless JSON) of one click, bounded."""
    async with live.http.get(
        f"{live.url}/click", params=params, allow_redirects=False,
        headers={"X-Forwarded-For": "192.0.2.10"}, timeout=aiohttp.ClientTimeout(total=10),
    ) as response:
        body = await response.json() if response.content_type == "application/json" else None
        return response.status, response.headers.get("X-Ascribe-Click-Id", ""), body


async def readiness(live: LiveWorld) -> tuple[int, dict[str, Any]]:
    async with live.http.get(f"{live.url}/readyz", timeout=aiohttp.ClientTimeout(total=10)) as response:
        return response.status, await response.json()


async def test_attribution_service_down_is_503_and_clicks_resume_after_restart(
    live: LiveWorld, database_url: str
) -> None:
    await seed(live)
    served = [await live.click(campaign_id="cmp", aff_id="aff-a", visitor_ip=f"192.0.2.{i}") for i in range(1, 6)]
    assert [r.status for r in served] == [302] * 5
    assert (await readiness(live))[0] == 200

    await asyncio.to_thread(live.stack.stop_service, "attribution")
    for _ in range(5):
        started = time.monotonic()
        status, _, body = await get_click_answer(live, campaign_id="cmp", aff_id="aff-a")
        # The gateway's deadline on an attribution call is 2 s; a dead backend must not hang a visitor.
        assert time.monotonic() - started < 5
        assert status == 503, body
        assert body is not None and body["error"]["code"] == "unavailable" and body["error"]["message"]
    started = time.monotonic()
    ready_status, ready = await readiness(live)
    assert time.monotonic() - started < 5
    assert ready_status == 503 and ready["status"] == "not_ready", ready
    assert ready["checks"]["attribution"] == "unavailable"

    await asyncio.to_thread(live.stack.start_service, "attribution")
    answers: list[int] = []
    deadline = time.monotonic() + 20
    while True:
        status, click_id, body = await get_click_answer(live, campaign_id="cmp", aff_id="aff-a", sub1="back")
        answers.append(status)
        if status == 302 or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.1)
    # While the gateway reconnects a visitor may still see 503, never anything else.
    assert answers[-1] == 302 and set(answers) <= {302, 503}, answers
    assert (await readiness(live))[0] == 200
    assert await count_clicks(database_url, [r.headers["X-Ascribe-Click-Id"] for r in served] + [click_id]) == 6


async def test_every_redirected_click_survives_a_kill_9(live: LiveWorld, database_url: str) -> None:
    await seed(live)
    redirected: list[str] = []
    failures = 0

    async def visitor(n: int) -> None:
        nonlocal failures
        for i in range(400):
            try:
                response = await live.click(campaign_id="cmp", aff_id="aff-a", visitor_ip=f"198.51.100.{n}",
                                            sub1=str(i))
            except aiohttp.ClientError:
                failures += 1
                await asyncio.sleep(0.01)
                continue
            if response.status == 302:
                redirected.append(response.headers["X-Ascribe-Click-Id"])
            else:
                failures += 1

    async def killer() -> None:
        await asyncio.sleep(0.7)
        await asyncio.to_thread(live.stack.kill_service, "attribution", signal.SIGKILL)
        await asyncio.sleep(0.3)
        await asyncio.to_thread(live.stack.start_service, "attribution")

    started = time.monotonic()
    await asyncio.wait_for(asyncio.gather(killer(), *(visitor(n) for n in range(1, 9))), timeout=120)
    assert time.monotonic() - started < 120
    assert failures > 0, "the kill should have failed some requests"
    assert len(redirected) > 100
    conn = await asyncpg.connect(database_url)
    try:
        stored = await conn.fetchval(
            "SELECT count(*) FROM clicks WHERE click_id = ANY($1::text[])", redirected
        )
    finally:
        await conn.close()
    assert stored == len(redirected)


async def test_postbacks_race_through_the_gateway(live: LiveWorld) -> None:
    campaign = await seed(live)
    await live.catalog.CreateCoupon(
        pb.CreateCouponRequest(coupon=pb.Coupon(campaign_id="cmp", code="FLASH", usage_limit=25,
                                                allow_all_affiliates=True)),
        timeout=10,
    )
    same = await asyncio.gather(*(
        live.postback(campaign.postback_token, campaign_id="cmp", order_id="dup-1", amount="20.00",
                      currency="EUR", coupon="FLASH")
        for _ in range(20)
    ))
    assert {s for s, _ in same} == {200} and len({b["id"] for _, b in same}) == 1
    conflict = await live.postback(campaign.postback_token, campaign_id="cmp", order_id="dup-1",
                                   amount="21.00", currency="EUR", coupon="FLASH")
    assert conflict[0] == 409
    many = await asyncio.gather(*(
        live.postback(campaign.postback_token, campaign_id="cmp", order_id=f"o-{i}", amount="20.00",
                      currency="EUR", coupon="FLASH", customer_id=f"c{i}")
        for i in range(100)
    ))
    taken = [b for s, b in many if s == 200 and b["status"] != "rejected"]
    assert len(taken) == 24  # 25 uses, one taken by dup-1
    assert (await live.catalog.GetCoupon(pb.GetCouponRequest(campaign_id="cmp", code="FLASH"))).remaining == 0
    wrong = await live.postback("wrong-token", campaign_id="cmp", order_id="x", amount="1.00", currency="EUR")
    assert wrong[0] == 401

