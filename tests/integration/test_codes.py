"""Codes at scale against real PostgreSQL: mistyped codes, AssignCode races, ImportCodes."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import asyncpg
import grpc
import pytest
from ascribe.attribution.v1 import attribution_pb2 as pb
from ascribe.attribution.v1 import attribution_pb2_grpc
from google.protobuf import field_mask_pb2

from services.attribution.common import code_check
from tests.integration.conversion_env import World
from tests.support import bad_request_fields


async def _generate(world: World, count: int, prefix: str = "VIP", length: int = 8, **template: object) -> str:
    reply = await world.catalog.GenerateCodes(
        pb.GenerateCodesRequest(
            template=pb.Coupon(campaign_id="cmp", allow_all_affiliates=True, **template),  # type: ignore[arg-type]
            count=count,
            prefix=prefix,
            length=length,
        ),
        timeout=60,
    )
    assert reply.generated == count
    assert reply.random_bits == 5 * length
    return reply.batch_id


async def _export(stub: attribution_pb2_grpc.CatalogServiceAsyncStub, batch_id: str) -> list[str]:
    return [code async for chunk in stub.ExportCodes(pb.ExportCodesRequest(batch_id=batch_id), timeout=60)
            for code in chunk.codes]


def _typo(code: str, prefix: str) -> str:
    """The code with two neighbouring random symbols swapped (they differ)."""
    body = code[len(prefix):]
    i = next(i for i in range(len(body) - 1) if body[i] != body[i + 1])
    return prefix + body[:i] + body[i + 1] + body[i] + body[i + 2:]


# ---------------------------------------------------------------- coupon_mistyped


async def test_a_mistyped_code_is_told_from_an_unknown_one_on_clicks_and_conversions(world: World) -> None:
    await world.campaign()
    await world.affiliate("ann")
    batch_id = await _generate(world, 50)
    code = (await _export(world.catalog, batch_id))[0]
    mistyped = _typo(code, "VIP")
    substituted = code[:-1] + next(s for s in code_check.ALPHABET if s != code[-1])
    # Right shape and a fitting check symbol, but never issued: a guess, not a typo.
    body = "ZZZZZZZZ"
    never_issued = "VIP" + body + code_check.check_symbol(body)
    await world.coupon("SUMMER10")

    async def click_reasons(coupon_code: str) -> list[str]:
        click_id = await world.click("ann", coupon_code=coupon_code)
        click = await world.tracking.GetClick(pb.GetClickRequest(click_id=click_id), timeout=10)
        return list(click.reasons)

    assert await click_reasons(code) == []
    assert "coupon_mistyped" in await click_reasons(mistyped.lower())  # codes are case-insensitive
    assert "coupon_mistyped" in await click_reasons(substituted)
    for unknown in (never_issued, "SUMMER11", "VIP" + code[3:-1]):
        reasons = await click_reasons(unknown)
        assert "unknown_coupon" in reasons and "coupon_mistyped" not in reasons, unknown

    converted = await world.convert(coupon_code=mistyped, customer_id="c1")
    assert converted.status == pb.CONVERSION_STATUS_REJECTED
    assert list(converted.reasons) == ["coupon_mistyped"]
    guessed = await world.convert(coupon_code=never_issued, customer_id="c1")
    assert list(guessed.reasons) == ["unknown_coupon"]
    # A mistyped code is a reason the shop can fix: the same order with the right code is judged anew.
    fixed = await world.convert(order_id=converted.order_id, coupon_code=code, customer_id="c1")
    assert fixed.status in (pb.CONVERSION_STATUS_PENDING, pb.CONVERSION_STATUS_APPROVED)
    assert await world.used(code) == 1


async def test_a_failed_batch_leaves_no_code_and_no_shape(world: World) -> None:
    await world.campaign()
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await world.catalog.GenerateCodes(
            pb.GenerateCodesRequest(
                template=pb.Coupon(campaign_id="cmp", affiliate_ids=["nobody"]), count=1000, prefix="X"
            ),
            timeout=30,
        )
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    assert await world.db.fetchval("SELECT count(*) FROM coupons WHERE campaign_id = 'cmp'") == 0
    assert await world.db.fetchval("SELECT count(*) FROM code_batches WHERE campaign_id = 'cmp'") == 0


# ---------------------------------------------------------------- AssignCode


async def _assign(stub: attribution_pb2_grpc.CatalogServiceAsyncStub, batch_id: str, customer: str) -> pb.Coupon:
    return await stub.AssignCode(
        pb.AssignCodeRequest(campaign_id="cmp", batch_id=batch_id, customer_id=customer), timeout=30
    )


async def test_concurrent_callers_on_two_replicas_never_share_a_code(world: World) -> None:
    await world.campaign()
    second = await world.add_replica()
    batch_id = await _generate(world, 150)
    stubs = [world.catalog, second.catalog]

    async def attempt(n: int) -> pb.Coupon | grpc.StatusCode:
        try:
            return await _assign(stubs[n % 2], batch_id, f"customer-{n}")
        except grpc.aio.AioRpcError as error:
            return error.code()

    outcomes = await asyncio.gather(*(attempt(n) for n in range(200)))
    assigned = [o for o in outcomes if isinstance(o, pb.Coupon)]
    refused = [o for o in outcomes if not isinstance(o, pb.Coupon)]
    assert len(assigned) == 150
    assert refused == [grpc.StatusCode.RESOURCE_EXHAUSTED] * 50
    assert len({c.code for c in assigned}) == 150
    assert all(c.assigned_customer_id and c.batch_id == batch_id for c in assigned)
    rows = await world.db.fetch(
        "SELECT code, assigned_customer_id FROM coupons WHERE batch_id = $1 AND assigned_customer_id <> ''", batch_id
    )
    assert {(r["code"], r["assigned_customer_id"]) for r in rows} == {(c.code, c.assigned_customer_id) for c in assigned}
    # The assignment is the personal code's rule: another customer cannot redeem it.
    taken = assigned[0]
    other = await world.convert(coupon_code=taken.code, customer_id="someone-else")
    assert "customer_not_assigned" in other.reasons


async def test_the_same_customer_asking_concurrently_gets_one_code(world: World) -> None:
    await world.campaign()
    second = await world.add_replica()
    batch_id = await _generate(world, 40)
    stubs = [world.catalog, second.catalog]
    answers = await asyncio.gather(*(_assign(stubs[n % 2], batch_id, "alice") for n in range(30)))
    assert len({a.code for a in answers}) == 1
    assert (await _assign(world.catalog, batch_id, "alice")).code == answers[0].code
    assert await world.db.fetchval(
        "SELECT count(*) FROM coupons WHERE batch_id = $1 AND assigned_customer_id = 'alice'", batch_id
    ) == 1
    # The 39 others are still free.
    assert await world.db.fetchval(
        "SELECT count(*) FROM coupons WHERE batch_id = $1 AND assigned_customer_id = ''", batch_id
    ) == 39


async def test_assign_skips_used_and_inactive_codes_and_refuses_bad_requests(world: World) -> None:
    await world.campaign()
    batch_id = await _generate(world, 3)
    codes = sorted(await _export(world.catalog, batch_id))
    await world.db.execute("UPDATE coupons SET used = 1 WHERE code = $1", codes[0])
    await world.db.execute("UPDATE coupons SET status = 'paused' WHERE code = $1", codes[1])
    assert (await _assign(world.catalog, batch_id, "bob")).code == codes[2]
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await _assign(world.catalog, batch_id, "carol")
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await _assign(world.catalog, "bat_nope", "carol")
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    for request, field in (
        (pb.AssignCodeRequest(campaign_id="cmp", batch_id=batch_id), "customer_id"),
        (pb.AssignCodeRequest(campaign_id="cmp", customer_id="x"), "batch_id"),
        (pb.AssignCodeRequest(batch_id=batch_id, customer_id="x"), "campaign_id"),
        (pb.AssignCodeRequest(campaign_id="cmp", batch_id=batch_id, customer_id="x" * 257), "customer_id"),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await world.catalog.AssignCode(request, timeout=10)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert bad_request_fields(caught.value) == [field]


async def _assign_affiliate(
    stub: attribution_pb2_grpc.CatalogServiceAsyncStub, batch_id: str, affiliate: str
) -> pb.Coupon:
    return await stub.AssignCode(
        pb.AssignCodeRequest(campaign_id="cmp", batch_id=batch_id, affiliate_id=affiliate), timeout=30
    )


async def test_affiliates_asking_concurrently_on_two_replicas_get_one_code_each(world: World) -> None:
    await world.campaign()
    affiliates = [f"aff-{n}" for n in range(6)]
    for affiliate in affiliates:
        await world.affiliate(affiliate)
    second = await world.add_replica()
    batch_id = await _generate(world, 10)
    stubs = [world.catalog, second.catalog]
    # Every affiliate asks five times at once, across both replicas.
    answers = await asyncio.gather(
        *(_assign_affiliate(stubs[n % 2], batch_id, affiliates[n % 6]) for n in range(30))
    )
    mine: dict[str, set[str]] = {}
    for answer in answers:
        mine.setdefault(answer.assigned_affiliate_id, set()).add(answer.code)
        assert (answer.allow_all_affiliates, list(answer.affiliate_ids)) == (False, [answer.assigned_affiliate_id])
        assert answer.assigned_customer_id == ""
    assert set(mine) == set(affiliates)
    assert all(len(codes) == 1 for codes in mine.values())
    assert len({code for codes in mine.values() for code in codes}) == 6
    rows = await world.db.fetch(
        "SELECT code, assigned_affiliate_id, allow_all_affiliates, affiliate_ids FROM coupons"
        " WHERE batch_id = $1 AND assigned_affiliate_id <> ''", batch_id,
    )
    assert {(r["code"], r["assigned_affiliate_id"]) for r in rows} == {(c.code, c.assigned_affiliate_id) for c in answers}
    assert all(not r["allow_all_affiliates"] and r["affiliate_ids"] == [r["assigned_affiliate_id"]] for r in rows)
    # Customers get the four codes no affiliate holds, then the batch is spent for both.
    customers = await asyncio.gather(*(_assign(stubs[n % 2], batch_id, f"customer-{n}") for n in range(4)))
    assert {c.code for c in customers}.isdisjoint({c.code for c in answers})
    assert all(c.assigned_affiliate_id == "" for c in customers)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await _assign(world.catalog, batch_id, "customer-late")
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    # An affiliate that holds a code gets it again, spent batch or not.
    assert (await _assign_affiliate(world.catalog, batch_id, "aff-0")).code in mine["aff-0"]
    await world.affiliate("aff-late")
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await _assign_affiliate(world.catalog, batch_id, "aff-late")
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


@pytest.mark.parametrize("batch", ["generated", "imported"])
async def test_an_affiliates_code_credits_it_on_a_sale_without_a_click(world: World, batch: str) -> None:
    await world.campaign()
    await world.affiliate("ann")
    await world.affiliate("bob")
    if batch == "generated":  # UNIQUE codes, every affiliate allowed until assigned
        batch_id = await _generate(world, 3)
    else:  # a shop's GENERAL codes: credited as the one selected affiliate's
        batch_id = (await _import(world, b"code,kind\nSPRING-1,general\nSPRING-2,general\n")).batch_id
    code = (await _assign_affiliate(world.catalog, batch_id, "ann")).code
    stored = await world.get_coupon(code)
    assert (stored.assigned_affiliate_id, stored.allow_all_affiliates, list(stored.affiliate_ids)) == (
        "ann", False, ["ann"],
    )
    # Another affiliate's link carrying the code does not start its tracking.
    click_id = await world.click("bob", coupon_code=code)
    click = await world.tracking.GetClick(pb.GetClickRequest(click_id=click_id), timeout=10)
    assert click.coupon_code == "" and "affiliate_not_allowed" in click.reasons
    sale = await world.convert(coupon_code=code)
    assert (sale.affiliate_id, sale.source) == ("ann", pb.ATTRIBUTION_SOURCE_COUPON)
    assert sale.status == pb.CONVERSION_STATUS_PENDING


async def test_assigning_to_an_affiliate_refuses_bad_requests_and_unknown_affiliates(world: World) -> None:
    await world.campaign()
    batch_id = await _generate(world, 2)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await _assign_affiliate(world.catalog, batch_id, "nobody")
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    assert "nobody" in (caught.value.details() or "")
    assert await world.db.fetchval(
        "SELECT count(*) FROM coupons WHERE batch_id = $1 AND (assigned_affiliate_id <> '' OR NOT allow_all_affiliates)",
        batch_id,
    ) == 0
    for request, field in (
        (pb.AssignCodeRequest(campaign_id="cmp", batch_id=batch_id, affiliate_id="a", customer_id="c"), "customer_id"),
        (pb.AssignCodeRequest(campaign_id="cmp", batch_id=batch_id, affiliate_id="not an id"), "affiliate_id"),
        (pb.AssignCodeRequest(campaign_id="cmp", batch_id=batch_id, affiliate_id="a" * 65), "affiliate_id"),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await world.catalog.AssignCode(request, timeout=10)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert bad_request_fields(caught.value) == [field]


async def test_an_affiliate_gets_no_code_that_names_affiliates_and_keeps_the_one_it_holds(world: World) -> None:
    await world.campaign()
    for affiliate in ("ann", "bob", "cid"):
        await world.affiliate(affiliate)
    await world.affiliate("pat", status=pb.AFFILIATE_STATUS_PAUSED)
    imported = await _import(world, b"code,kind,affiliate_ids\nOWNED-1,exclusive,ann\nFREE-1,general,\n")
    assert (await _assign_affiliate(world.catalog, imported.batch_id, "bob")).code == "FREE-1"
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await _assign_affiliate(world.catalog, imported.batch_id, "cid")  # OWNED-1 stays ann's
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert list((await world.get_coupon("OWNED-1")).affiliate_ids) == ["ann"]

    batch_id = await _generate(world, 2)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await _assign_affiliate(world.catalog, batch_id, "pat")
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    code = (await _assign_affiliate(world.catalog, batch_id, "ann")).code
    # UpdateCoupon keeps the holder: ann stays its only affiliate, and no customer gets it.
    for changed, paths in (
        (pb.Coupon(affiliate_ids=["bob"]), ["affiliate_ids"]),
        (pb.Coupon(allow_all_affiliates=True), ["allow_all_affiliates", "affiliate_ids"]),
        (pb.Coupon(assigned_customer_id="cust-1"), ["assigned_customer_id"]),
    ):
        changed.campaign_id, changed.code = "cmp", code
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await world.catalog.UpdateCoupon(
                pb.UpdateCouponRequest(coupon=changed, update_mask=field_mask_pb2.FieldMask(paths=paths)), timeout=10
            )
        assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION, paths
    paused = await world.catalog.UpdateCoupon(
        pb.UpdateCouponRequest(
            coupon=pb.Coupon(campaign_id="cmp", code=code, status=pb.COUPON_STATUS_PAUSED),
            update_mask=field_mask_pb2.FieldMask(paths=["status"]),
        ),
        timeout=10,
    )
    assert (paused.status, paused.assigned_affiliate_id, list(paused.affiliate_ids)) == (
        pb.COUPON_STATUS_PAUSED, "ann", ["ann"],
    )
    # The previous release's AssignCode knew no affiliates: its UPDATE fails
    # on the table's constraint instead of giving ann's code to a customer.
    with pytest.raises(asyncpg.CheckViolationError):
        await world.db.execute("UPDATE coupons SET assigned_customer_id = 'cust-1' WHERE code = $1", code)


async def test_update_coupon_refuses_a_customer_a_second_code_of_a_batch(world: World) -> None:
    await world.campaign()
    batch_id = await _generate(world, 2)
    mine = await _assign(world.catalog, batch_id, "dana")
    other = next(code for code in await _export(world.catalog, batch_id) if code != mine.code)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await world.catalog.UpdateCoupon(
            pb.UpdateCouponRequest(
                coupon=pb.Coupon(campaign_id="cmp", code=other, assigned_customer_id="dana"),
                update_mask=field_mask_pb2.FieldMask(paths=["assigned_customer_id"]),
            ),
            timeout=10,
        )
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "dana" in (caught.value.details() or "")


# ---------------------------------------------------------------- ImportCodes


async def _import(world: World, data: bytes, piece: int = 7) -> pb.ImportCodesResponse:
    async def pieces() -> AsyncIterator[pb.ImportCodesRequest]:
        for start in range(0, max(len(data), 1), piece):
            yield pb.ImportCodesRequest(campaign_id="cmp" if start == 0 else "", csv=data[start:start + piece])

    return await world.catalog.ImportCodes(pieces(), timeout=30)


GOOD_FILE = (
    "\ufeffcode,kind,affiliate_ids,usage_limit,valid_from,valid_until,discount,countries,assigned_customer_id\r\n"
    "shopify-10,exclusive,ann,100,2025-06-26,2025-09-24,5.10,US;CA,\r\n"
    "WELCOME-1,unique,,,2025-06-26T08:00:00+02:00,2025-07-01T00:00:00Z,,,cust-9\r\n"
    "\"GIFT,LESS\",general,,,,,,,\r\n"
).encode()


async def test_import_a_file_with_a_bom_and_both_date_forms(world: World) -> None:
    await world.campaign()
    await world.affiliate("ann")
    bad = GOOD_FILE.replace(b'"GIFT,LESS"', b"GIFTLESS")
    reply = await _import(world, bad)
    assert reply.imported == 3 and reply.batch_id.startswith("bat_")
    shop = await world.get_coupon("SHOPIFY-10")
    assert (shop.kind, list(shop.affiliate_ids), shop.usage_limit) == (pb.COUPON_KIND_EXCLUSIVE, ["ann"], 100)
    assert shop.valid_from.ToJsonString() == "2025-06-26T00:00:00Z"
    assert shop.valid_until.ToJsonString() == "2025-09-25T00:00:00Z"  # the last day counts whole
    assert shop.discount_micros == 5_100_000 and list(shop.countries) == ["US", "CA"]
    welcome = await world.get_coupon("welcome-1")
    assert welcome.valid_from.ToJsonString() == "2025-06-26T06:00:00Z"
    assert (welcome.usage_limit, welcome.assigned_customer_id) == (1, "cust-9")
    assert sorted(await _export(world.catalog, reply.batch_id)) == ["GIFTLESS", "SHOPIFY-10", "WELCOME-1"]


async def test_a_bad_import_names_each_line_and_field_and_stores_nothing(world: World) -> None:
    await world.campaign()
    await world.affiliate("ann")
    await world.coupon("TAKEN")
    data = (
        b"code,usage_limit,valid_until,affiliate_ids,discount\n"
        b"GOOD-1,5,2025-01-01,ann,1.00\n"
        b"BAD DATE,5,2025-02-30,,\n"        # line 3: a space in the code, and no such date
        b"GOOD-2,-1,,,\n"                    # line 4
        b"good-1,,,,\n"                      # line 5: GOOD-1 again, in another case
        b"taken,,,,\n"                       # line 6: already in the campaign
        b"GOOD-3,,2025-13-01T00:00:00Z,,\n"  # line 7
        b"GOOD-4,,,nobody,0.0000001\n"       # line 8
    )
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await _import(world, data)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    fields = set(bad_request_fields(caught.value))
    assert {"line 3.code", "line 3.valid_until", "line 4.usage_limit", "line 5.code",
            "line 7.valid_until", "line 8.discount"} <= fields, fields
    assert await world.db.fetchval("SELECT count(*) FROM coupons WHERE campaign_id = 'cmp'") == 1

    # Without the malformed rows, what is left is checked against the campaign: all or nothing still.
    data = b"code,affiliate_ids\nGOOD-1,ann\ntaken,\nGOOD-4,nobody\n"
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await _import(world, data)
    assert set(bad_request_fields(caught.value)) == {"line 3.code", "line 4.affiliate_ids"}
    assert await world.db.fetchval("SELECT count(*) FROM coupons WHERE campaign_id = 'cmp'") == 1
    assert await world.db.fetchval("SELECT count(*) FROM code_batches WHERE campaign_id = 'cmp'") == 0

    for data, field in (
        (b"", "csv"),
        (b"code,colour\nX1X,red\n", "line 1.colour"),
        (b"kind\ngeneral\n", "line 1.code"),
        (b"\xff\xfecode\n", "csv"),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await _import(world, data)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert field in bad_request_fields(caught.value), (data, bad_request_fields(caught.value))


async def test_imported_codes_can_be_assigned(world: World) -> None:
    await world.campaign()
    reply = await _import(world, b"code,kind\nONE-1,unique\nTWO-2,unique\n")
    first = await _assign(world.catalog, reply.batch_id, "dana")
    assert first.code in ("ONE-1", "TWO-2") and first.assigned_customer_id == "dana"
