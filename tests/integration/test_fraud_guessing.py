"""Code guessing in the fraud service: unknown codes counted per address (/64) and customer id, over gRPC."""

from __future__ import annotations

import grpc
import pytest
from ascribe.fraud.v1 import fraud_pb2 as pb
from ascribe.fraud.v1 import fraud_pb2_grpc

from tests.integration.test_fraud_service import conversion, fraud, stub, watch  # noqa: F401  (fixtures)
from tests.support import signal_codes

THRESHOLD = 20  # the default: ASCRIBE_FRAUD_GUESS_THRESHOLD


def attempt(**fields: object) -> pb.CodeAttempt:
    values: dict[str, object] = {"campaign_id": "camp", "coupon_code": "GUESS1", "missed": True}
    values.update(fields)
    return pb.CodeAttempt(**values)  # type: ignore[arg-type]


async def guess(client: fraud_pb2_grpc.FraudServiceAsyncStub, *attempts: pb.CodeAttempt) -> list[pb.GuessingState]:
    answer = await client.CheckCodeGuessing(pb.CheckCodeGuessingRequest(attempts=list(attempts)))
    return list(answer.states)


async def test_an_address_is_blocked_at_the_threshold_and_alerted_once(
    stub: fraud_pb2_grpc.FraudServiceAsyncStub,  # noqa: F811
) -> None:
    states = [(await guess(stub, attempt(ip="203.0.113.7", coupon_code=f"G{i:04d}")))[0] for i in range(THRESHOLD + 5)]
    assert [s.blocked for s in states] == [False] * (THRESHOLD - 1) + [True] * 6
    assert [s.misses for s in states] == list(range(1, THRESHOLD + 6))
    assert 590 <= states[-1].retry_after_seconds <= 600
    assert states[-1].address_blocked and not states[-1].customer_blocked
    # Another address, and an honest attempt (missed false) from it, are not blocked.
    other = await guess(stub, attempt(ip="198.51.100.1", missed=False), attempt(ip="198.51.100.1"))
    assert [s.blocked for s in other] == [False, False] and other[1].misses == 1
    # Asking about the guesser without a miss answers its state and counts nothing.
    asked = (await guess(stub, attempt(ip="203.0.113.7", missed=False)))[0]
    assert asked.blocked and asked.misses == THRESHOLD + 5

    alerts = await watch(stub, "0", 1)
    assert alerts[0].kind == pb.ALERT_KIND_CODE_GUESSING and alerts[0].ip == "203.0.113.7"
    assert alerts[0].campaign_id == "camp" and "G0019" in alerts[0].detail
    more = stub.WatchAlerts(pb.WatchAlertsRequest(after_id=alerts[0].id), timeout=0.6)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        async for alert in more:
            pytest.fail(f"a second guessing alert in the same window: {alert}")
    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED


async def test_ipv6_counts_per_64_and_customer_ids_per_campaign(
    stub: fraud_pb2_grpc.FraudServiceAsyncStub,  # noqa: F811
) -> None:
    one_batch = [attempt(ip=f"2001:db8:1:2::{i + 1:x}") for i in range(THRESHOLD)]
    states = await guess(stub, *one_batch)
    # One batch shares its subjects: every attempt sees the batch's total.
    assert all(s.blocked and s.misses == THRESHOLD for s in states)
    assert not (await guess(stub, attempt(ip="2001:db8:1:3::1")))[0].blocked  # another /64

    by_customer = await guess(stub, *[attempt(customer_id="cust-9") for _ in range(THRESHOLD)])
    assert by_customer[-1].blocked and by_customer[-1].customer_blocked and not by_customer[-1].address_blocked
    assert not (await guess(stub, attempt(customer_id="cust-9", campaign_id="other")))[0].blocked


async def test_conversions_and_clicks_carry_their_misses(
    stub: fraud_pb2_grpc.FraudServiceAsyncStub,  # noqa: F811
) -> None:
    ip = "192.0.2.44"
    batch = [pb.CheckClickRequest(click_id=f"c{i}", campaign_id="camp", ip=ip, coupon_code=f"X{i}", code_missed=True)
             for i in range(THRESHOLD - 1)]
    await stub.CheckClickBatch(pb.CheckClickBatchRequest(requests=batch))
    before = await stub.CheckConversion(conversion(order_id="o-before", ip="192.0.2.45"))
    assert "code_guessing" not in signal_codes(before)
    # The twentieth unknown code comes with a conversion: it and later ones from the address are flagged.
    missed = await stub.CheckConversion(conversion(order_id="o-missed", ip=ip, coupon_code="NOPE", code_missed=True))
    assert "code_guessing" in signal_codes(missed)
    later = await stub.CheckConversion(conversion(order_id="o-later", ip=ip, coupon_code="REAL"))
    assert "code_guessing" in signal_codes(later) and later.action == pb.VERDICT_ACTION_REVIEW


async def test_bad_attempts_name_the_field(stub: fraud_pb2_grpc.FraudServiceAsyncStub) -> None:  # noqa: F811
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await guess(stub, attempt(), attempt(ip="not-an-ip"))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "attempts[1].ip" in (caught.value.details() or "")
