"""The fraud store and service on a real three-shard Redis Cluster.

Redis Cluster routes a command by the hash slot of its keys; every fraud key
carries a bucket hash tag and every script call names its bucket's tag key,
so each call runs on the shard that owns the bucket. The answers must be
exactly those of a standalone Redis, the keys must spread over the shards,
and the service must check, alert and serve WatchAlerts through the cluster.
"""

from __future__ import annotations

import json
import socket
import time
import zlib
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import replace
from pathlib import Path

import grpc
import pytest
import redis
import redis.asyncio as aioredis
from ascribe.fraud.v1 import fraud_pb2 as pb
from ascribe.fraud.v1 import fraud_pb2_grpc

from services.common import embedded
from services.fraud.config import Settings
from services.fraud.domain import ClickEvent
from services.fraud.ipintel import IpIntelHolder
from services.fraud.redis_transport import RedisPyTransport
from services.fraud.server import start_fraud
from services.fraud.store import FraudStore, StoreConfig
from tests.integration import fraud_golden
from tests.integration.test_fraud_store_modes import clicks, conversions

SHARDS = 3
SLOTS = 16384
BROWSER = "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/124.0 Safari/537.36"


def cluster_port() -> int:
    """A free port whose cluster bus port (+10000) is a valid, free port too."""
    for _ in range(200):
        port = embedded.free_port()
        if port + 10000 > 65535:
            continue
        with socket.socket() as bus:
            try:
                bus.bind(("127.0.0.1", port + 10000))
            except OSError:
                continue
        return port
    raise RuntimeError("no free port pair for a cluster node")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[embedded.EmbeddedServer]]:
    """Three primaries, each owning a third of the slots, joined into one cluster."""
    folder = tmp_path_factory.mktemp("redis-cluster")
    nodes = [
        embedded.start_redis(
            folder / f"node{i}",
            port=cluster_port(),
            extra_args=["--cluster-enabled", "yes", "--cluster-config-file", str(folder / f"node{i}" / "nodes.conf"),
                        "--cluster-node-timeout", "5000"],
        )
        for i in range(SHARDS)
    ]
    clients = [redis.Redis(port=node.port, socket_timeout=5) for node in nodes]
    try:
        for i, client in enumerate(clients):
            client.execute_command("CLUSTER", "SET-CONFIG-EPOCH", i + 1)
            low, high = i * SLOTS // SHARDS, (i + 1) * SLOTS // SHARDS
            client.execute_command("CLUSTER", "ADDSLOTS", *range(low, high))
        for node in nodes[1:]:
            clients[0].execute_command("CLUSTER", "MEET", "127.0.0.1", node.port)
        deadline = time.monotonic() + 30
        while not all(b"cluster_state:ok" in c.execute_command("CLUSTER", "INFO") for c in clients):
            assert time.monotonic() < deadline, "the cluster did not come up"
            time.sleep(0.1)
        # Every node must know every other before a client learns the slot map from one.
        while not all(len(c.execute_command("CLUSTER", "NODES").splitlines()) == SHARDS for c in clients):
            assert time.monotonic() < deadline, "the nodes did not meet"
            time.sleep(0.1)
        yield nodes
    finally:
        for client in clients:
            client.close()
        for node in nodes:
            node.stop()


def keys_by_node(nodes: list[embedded.EmbeddedServer], prefix: str) -> list[set[str]]:
    found = []
    for node in nodes:
        with redis.Redis(port=node.port) as client:
            found.append({key.decode() for key in client.scan_iter(match=f"{prefix}:*", count=1000)})
    return found


def evalsha_calls(nodes: list[embedded.EmbeddedServer]) -> list[int]:
    counts = []
    for node in nodes:
        with redis.Redis(port=node.port) as client:
            stats = client.info("commandstats").get("cmdstat_evalsha", {})
            counts.append(int(stats.get("calls", 0)) if isinstance(stats, dict) else 0)
    return counts


@pytest.fixture
async def cluster_store(cluster: list[embedded.EmbeddedServer], redis_prefix: str) -> AsyncIterator[FraudStore]:
    client = aioredis.RedisCluster.from_url(cluster[0].url)
    store = FraudStore(client, StoreConfig(prefix=f"{redis_prefix}c"))
    await store.load_scripts()
    yield store
    await store.aclose()
    await client.aclose()


async def test_a_cluster_answers_as_a_standalone_redis_does(
    cluster: list[embedded.EmbeddedServer], cluster_store: FraudStore, redis_server_url: str, redis_prefix: str,
    redis_client: aioredis.Redis,  # its teardown drops the standalone store's keys
) -> None:
    assert isinstance(cluster_store.redis_transport, RedisPyTransport), "a cluster goes through redis-py"
    assert not cluster_store._single_call, "a cluster takes per-bucket calls"
    standalone = FraudStore(aioredis.from_url(redis_server_url), StoreConfig(prefix=f"{redis_prefix}s"))
    try:
        for round_ in range(3):
            before = evalsha_calls(cluster)
            on_cluster = await cluster_store.count_clicks(clicks(round_))
            calls = [after - was for after, was in zip(evalsha_calls(cluster), before, strict=True)]
            assert on_cluster == await standalone.count_clicks(clicks(round_))
            # One script call per bucket the batch touched, each on the shard owning it.
            assert sum(calls) == len(_buckets_of(cluster_store, clicks(round_)))
            assert all(calls), f"every shard owns some of the batch's buckets: {calls}"
            assert await cluster_store.count_conversions(conversions(round_)) == await standalone.count_conversions(
                conversions(round_)
            )
    finally:
        await standalone.aclose()
        await standalone.client.aclose()
    counters, _ = on_cluster
    assert sum(1 for c in counters if c.duplicate_of) == 8
    spread = keys_by_node(cluster, f"{redis_prefix}c")
    assert all(spread), f"the keys spread over every shard: {[len(keys) for keys in spread]}"


async def test_a_cluster_answers_and_stores_the_recorded_story(
    cluster: list[embedded.EmbeddedServer], redis_prefix: str
) -> None:
    client = aioredis.RedisCluster.from_url(cluster[0].url)
    store = FraudStore(client, replace(fraud_golden.CONFIG, prefix=f"{redis_prefix}g"))
    try:
        answers = await fraud_golden.story(store)
        keys: dict[str, object] = {}
        for node in cluster:
            async with aioredis.Redis(port=node.port) as node_client:
                keys.update(await fraud_golden.stored(node_client, store.config.prefix))
    finally:
        await store.aclose()
        await client.aclose()
        for node in cluster:
            with redis.Redis(port=node.port) as cleaner:
                for key in list(cleaner.scan_iter(match=f"{redis_prefix}g:*", count=1000)):
                    cleaner.delete(key)
    want = json.loads(fraud_golden.GOLDEN.read_text())
    assert json.loads(json.dumps(keys, sort_keys=True)) == want["keys"]
    assert json.loads(json.dumps(answers)) == want["answers"]


def _buckets_of(store: FraudStore, events: Sequence[ClickEvent]) -> set[int]:
    """The buckets a click batch touches (the same hashing as the store's)."""
    subjects = set()
    for event in events:
        subjects.add(f"xc:{event.affiliate_id}:{event.external_click_id}")
        subjects.add(f"ip:{event.ip}")
        subjects.add(f"aff:{event.campaign_id}:{event.affiliate_id}")
    return {zlib.crc32(s.encode()) % store.config.key_buckets for s in subjects}


async def test_the_service_checks_and_alerts_through_the_cluster(
    cluster: list[embedded.EmbeddedServer], redis_prefix: str, ipintel_dir: Path, shared_intel: IpIntelHolder
) -> None:
    settings = Settings(
        redis_url=cluster[1].url, redis_cluster=True, addr="127.0.0.1:0", metrics_port=0,
        ipintel_dir=ipintel_dir, watch_block_ms=200, store=StoreConfig(prefix=f"{redis_prefix}v"),
    )
    service = await start_fraud(settings, handle_sighup=False, intel=shared_intel)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{service.port}") as channel:
            stub = fraud_pb2_grpc.FraudServiceStub(channel)  # type: ignore[misc]
            batch = pb.CheckClickBatchRequest(requests=[
                pb.CheckClickRequest(click_id=f"c-{i}", campaign_id="camp", affiliate_id="aff",
                                     ip="81.2.69.7", user_agent=BROWSER)
                for i in range(12)
            ])
            verdicts = (await stub.CheckClickBatch(batch, timeout=5)).verdicts
            assert ["click_velocity" in {s.code for s in v.signals} for v in verdicts] == [False] * 10 + [True] * 2
            leak = [
                await stub.CheckConversion(pb.CheckConversionRequest(
                    order_id=f"o-{i}", campaign_id="camp", coupon_code="SOLO-9", coupon_kind=pb.COUPON_KIND_UNIQUE,
                    ip=f"81.2.71.{i + 1}", user_agent=BROWSER,
                ), timeout=5)
                for i in range(5)
            ]
            assert [v.action for v in leak] == [pb.VERDICT_ACTION_ALLOW] * 3 + [pb.VERDICT_ACTION_REJECT] * 2
            call = stub.WatchAlerts(pb.WatchAlertsRequest(after_id="0"), timeout=5)
            async for alert in call:
                if alert.kind == pb.ALERT_KIND_CODE_LEAK:
                    assert alert.coupon_code == "SOLO-9"
                    call.cancel()
                    break
    finally:
        await service.stop(grace_seconds=0.5)
        for node in cluster:
            with redis.Redis(port=node.port) as client:
                for key in list(client.scan_iter(match=f"{redis_prefix}v:*", count=1000)):
                    client.delete(key)


async def test_a_cluster_that_is_down_answers_unavailable(
    redis_prefix: str, ipintel_dir: Path, shared_intel: IpIntelHolder
) -> None:
    settings = Settings(
        redis_url=f"redis://127.0.0.1:{cluster_port()}/0", redis_cluster=True, addr="127.0.0.1:0", metrics_port=0,
        ipintel_dir=ipintel_dir, redis_timeout_ms=200, store=StoreConfig(prefix=f"{redis_prefix}d"),
    )
    service = await start_fraud(settings, handle_sighup=False, intel=shared_intel)  # starts all the same
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{service.port}") as channel:
            stub = fraud_pb2_grpc.FraudServiceStub(channel)  # type: ignore[misc]
            started = time.monotonic()
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await stub.CheckClick(
                    pb.CheckClickRequest(click_id="c", campaign_id="camp", ip="81.2.69.7", user_agent=BROWSER),
                    timeout=5,
                )
            assert caught.value.code() == grpc.StatusCode.UNAVAILABLE, caught.value
            assert time.monotonic() - started < 5
    finally:
        await service.stop(grace_seconds=0.5)
