"""`make run` under real faults: kill -9 of every process it supervises, a paused PostgreSQL and Redis.

Each test starts its own `make run` on fresh data and free ports (embedded
PostgreSQL and Redis: supervising those is the point) and records what it
measured in the test's output (`pytest -s` shows it).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
from ascribe.attribution.v1 import attribution_pb2 as pb
from ascribe.attribution.v1 import attribution_pb2_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.common.readiness import LIVENESS_SERVICE
from tests.e2e.make_run import MakeRun
from tools.run import is_warning
from tools.stack import grpc_serving, http_ok

pytestmark = pytest.mark.slow

TRACKING_SERVICE = "ascribe.attribution.v1.TrackingService"
RESTART_WITHIN = 1.0
SERVING_AGAIN_WITHIN = 15.0
READINESS_WITHIN = 2.0


@pytest.fixture
def make_run(tmp_path: Path, ipintel_dir: Path) -> Iterator[MakeRun]:
    run = MakeRun(tmp_path / "run", ipintel_dir).start()
    try:
        run.wait_ready()
        yield run
    finally:
        for pid in run.pids().values():  # a test that failed while a server was paused
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGCONT)
        code = run.stop()
        assert code == 0, run.output()


def _wait_for(condition: Callable[[], bool], timeout: float, interval: float = 0.02) -> float:
    """Seconds until ``condition()`` held; raises after ``timeout``."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if condition():
            return time.monotonic() - started
        time.sleep(interval)
    raise AssertionError(f"condition not met within {timeout}s")


def _health(addr: str, service: str) -> int:
    with grpc.insecure_channel(addr) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=1
            )
        except grpc.RpcError:
            return -1
    return int(reply.status)


def _readyz(run: MakeRun) -> tuple[int, dict[str, object]]:
    try:
        with urllib.request.urlopen(f"{run.gateway_url}/readyz", timeout=1.5) as reply:
            return reply.status, json.loads(reply.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())
    except OSError:
        return 0, {}


def _campaign(run: MakeRun) -> str:
    """A campaign with the affiliate ``aff`` (the links' ``aff_id``)."""
    with grpc.insecure_channel(run.addr("attribution")) as channel:
        catalog = attribution_pb2_grpc.CatalogServiceStub(channel)
        campaign = catalog.CreateCampaign(
            pb.CreateCampaignRequest(campaign=pb.Campaign(
                name="Supervised", landing_url="https://shop.example/landing", currency="EUR",
                payout_micros=1_000_000,
            )),
            timeout=10,
        )
        catalog.CreateAffiliate(pb.CreateAffiliateRequest(affiliate=pb.Affiliate(id="aff", name="Aff")), timeout=10)
    return str(campaign.id)


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: object, **kwargs: object) -> None:
        return None


def _click(run: MakeRun, campaign_id: str) -> str:
    """A click through the gateway; returns its id once the gateway acknowledged it (302)."""
    opener = urllib.request.build_opener(_NoRedirect)
    try:
        opener.open(f"{run.gateway_url}/click?campaign_id={campaign_id}&aff_id=aff", timeout=10)
    except urllib.error.HTTPError as answer:
        assert answer.code == 302, answer.read()
        return str(answer.headers["X-Ascribe-Click-Id"])
    raise AssertionError("the click was not redirected")


def _stored_click(run: MakeRun, click_id: str) -> pb.Click:
    with grpc.insecure_channel(run.addr("attribution")) as channel:
        return attribution_pb2_grpc.TrackingServiceStub(channel).GetClick(
            pb.GetClickRequest(click_id=click_id), timeout=10
        )


@pytest.mark.parametrize("role", ["fraud", "attribution", "gateway", "postgres", "redis"])
def test_a_killed_process_is_restarted_and_nothing_acknowledged_is_lost(make_run: MakeRun, role: str) -> None:
    campaign_id = _campaign(make_run)
    before = _click(make_run, campaign_id)
    old = make_run.pids()
    assert set(old) == {"fraud", "attribution", "gateway", "postgres", "redis"}, old

    os.kill(old[role], signal.SIGKILL)
    killed = time.monotonic()
    restarted = _wait_for(lambda: make_run.pids().get(role, old[role]) != old[role], RESTART_WITHIN + 1)
    _wait_for(make_run.ready, SERVING_AGAIN_WITHIN)
    ready = time.monotonic() - killed
    # Serving means clicks are recorded again: a request that meets a connection
    # the restart broke may fail (503, the caller retries), none may be lost.
    clicked: list[str] = []
    failed: list[int] = []

    def click_recorded() -> bool:
        try:
            clicked.append(_click(make_run, campaign_id))
        except AssertionError:
            failed.append(1)
            return False
        return True

    _wait_for(click_recorded, max(0.1, SERVING_AGAIN_WITHIN - (time.monotonic() - killed)), interval=0.1)
    serving = time.monotonic() - killed
    print(
        f"\n{role}: new process {restarted:.2f}s after kill -9; stack ready after {ready:.2f}s, "
        f"clicks recorded again after {serving:.2f}s ({len(failed)} refused before)"
    )

    assert restarted <= RESTART_WITHIN
    assert serving <= SERVING_AGAIN_WITHIN
    # The supervisor notices on its own schedule (every 0.1 s): its line may follow our checks.
    up_line = f"{role} (pid {make_run.pids()[role]}) is up again"
    _wait_for(lambda: up_line in make_run.output(), 2.0)
    assert f"{role} (pid {old[role]}) was killed by SIGKILL" in make_run.output(), make_run.output()
    # The others were left alone.
    assert {name: pid for name, pid in make_run.pids().items() if name != role} == {
        name: pid for name, pid in old.items() if name != role
    }
    assert _stored_click(make_run, before).click_id == before
    assert _stored_click(make_run, clicked[-1]).click_id == clicked[-1]


def test_a_process_killed_while_a_later_one_starts_is_restarted_and_the_run_comes_up(
    tmp_path: Path, ipintel_dir: Path
) -> None:
    """attribution killed while the gateway starts: without a restart the gateway's /readyz never turns 200."""
    run = MakeRun(tmp_path / "run", ipintel_dir).start()
    try:
        _wait_for(lambda: "ascribe: attribution pid" in run.output(), 120.0, interval=0.005)
        assert "ascribe: ready in " not in run.output(), run.output()  # the gateway is still starting
        killed = run.pids()["attribution"]
        os.kill(killed, signal.SIGKILL)
        up = _wait_for(lambda: "ascribe: ready in " in run.output(), SERVING_AGAIN_WITHIN)
        print(f"\nattribution killed while the gateway started; the run was ready {up:.2f}s later")
        assert f"attribution (pid {killed}) was killed by SIGKILL" in run.output(), run.output()
        assert run.pids()["attribution"] != killed
        run.wait_ready()
        assert _stored_click(run, _click(run, _campaign(run)))
    finally:
        assert run.stop() == 0, run.output()


def test_readiness_follows_a_paused_postgres_and_liveness_does_not(make_run: MakeRun) -> None:
    postmaster = make_run.pids()["postgres"]
    os.kill(postmaster, signal.SIGSTOP)
    try:
        not_ready = _wait_for(lambda: _readyz(make_run)[0] == 503, READINESS_WITHIN + 3)
        assert _health(make_run.addr("attribution"), TRACKING_SERVICE) == health_pb2.HealthCheckResponse.NOT_SERVING
        assert _health(make_run.addr("attribution"), "") == health_pb2.HealthCheckResponse.NOT_SERVING
        assert _health(make_run.addr("attribution"), LIVENESS_SERVICE) == health_pb2.HealthCheckResponse.SERVING
        assert http_ok(f"{make_run.gateway_url}/healthz")
    finally:
        os.kill(postmaster, signal.SIGCONT)
    ready_again = _wait_for(lambda: _readyz(make_run)[0] == 200, READINESS_WITHIN + 3)
    print(f"\n/readyz 503 {not_ready:.2f}s after SIGSTOP of the postmaster, 200 {ready_again:.2f}s after SIGCONT")
    assert not_ready <= READINESS_WITHIN
    assert ready_again <= READINESS_WITHIN
    assert grpc_serving(make_run.addr("attribution"), service=TRACKING_SERVICE)
    # Paused is not dead: the supervisor restarted nothing.
    assert make_run.pids()["postgres"] == postmaster
    assert "was killed" not in make_run.output()


def test_fraud_is_not_serving_while_redis_is_paused_and_readyz_says_degraded(make_run: MakeRun) -> None:
    campaign_id = _campaign(make_run)
    redis_pid = make_run.pids()["redis"]
    os.kill(redis_pid, signal.SIGSTOP)
    try:
        not_serving = _wait_for(
            lambda: _health(make_run.addr("fraud"), "") == health_pb2.HealthCheckResponse.NOT_SERVING,
            READINESS_WITHIN + 3,
        )
        assert _health(make_run.addr("fraud"), LIVENESS_SERVICE) == health_pb2.HealthCheckResponse.SERVING
        status, body = _readyz(make_run)
        assert status == 200, body
        assert body.get("detail") == "fraud degraded", body
        clicked = _click(make_run, campaign_id)  # fail-open: the click still flows
        assert _stored_click(make_run, clicked).decision == pb.CLICK_DECISION_FLAGGED
    finally:
        os.kill(redis_pid, signal.SIGCONT)
    serving = _wait_for(lambda: grpc_serving(make_run.addr("fraud")), READINESS_WITHIN + 3)
    print(f"\nfraud NOT_SERVING {not_serving:.2f}s after SIGSTOP of Redis, SERVING {serving:.2f}s after SIGCONT")
    assert not_serving <= READINESS_WITHIN
    assert serving <= READINESS_WITHIN
    assert "fraud degraded" not in json.dumps(_readyz(make_run)[1])


def test_a_configuration_error_stops_everything_with_its_message(tmp_path: Path, ipintel_dir: Path) -> None:
    run = MakeRun(tmp_path / "run", ipintel_dir, extra_env={"ASCRIBE_FRAUD_DEADLINE_MS": "soon"}).start()
    assert run.process is not None
    try:
        code = run.process.wait(timeout=90)
    finally:
        run.stop(signal.SIGKILL)
    output = run.output()
    assert code == 2, output
    assert "configuration error" in output and "ASCRIBE_FRAUD_DEADLINE_MS" in output, output
    assert "restarted" not in output
    assert not run.pids()


def test_start_up_warnings_reach_the_console(tmp_path: Path) -> None:
    """With no IP lists the fraud service warns at start-up; the console shows it, not only fraud.log."""
    empty = tmp_path / "no-lists"
    empty.mkdir()
    run = MakeRun(tmp_path / "run", empty).start()
    try:
        run.wait_ready()
        logged = (run.data_dir / "logs" / "fraud.log").read_text().splitlines()
        warnings = [line for line in logged if is_warning(line)]
        assert warnings, logged
        output = run.output()
        assert [line for line in warnings if f"fraud | {line}" not in output] == [], output
    finally:
        assert run.stop() == 0


def test_a_service_restarted_while_postgres_is_paused_is_up_but_not_ready(make_run: MakeRun) -> None:
    old = make_run.pids()
    os.kill(old["postgres"], signal.SIGSTOP)
    try:
        os.kill(old["attribution"], signal.SIGKILL)
        # Live (its gRPC health "liveness"), although its database answers nobody.
        live = _wait_for(
            lambda: _health(make_run.addr("attribution"), LIVENESS_SERVICE) == health_pb2.HealthCheckResponse.SERVING,
            SERVING_AGAIN_WITHIN,
        )
        up_line = f"attribution (pid {make_run.pids()['attribution']}) is up again"
        _wait_for(lambda: up_line in make_run.output(), 2.0)
        assert _readyz(make_run)[0] == 503
        assert _health(make_run.addr("attribution"), TRACKING_SERVICE) == health_pb2.HealthCheckResponse.NOT_SERVING
    finally:
        os.kill(old["postgres"], signal.SIGCONT)
    ready = _wait_for(lambda: _readyz(make_run)[0] == 200, SERVING_AGAIN_WITHIN)
    print(f"\nattribution live {live:.2f}s after kill -9 with PostgreSQL paused; ready {ready:.2f}s after SIGCONT")
    campaign_id = _campaign(make_run)
    assert _stored_click(make_run, _click(make_run, campaign_id))
    assert make_run.pids()["postgres"] == old["postgres"]
