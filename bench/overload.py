"""Overload: ``wrk`` at 4,000 and 10,000 connections on ``/click`` (issue 19's admission-control goal).

    wrk -t2 -c4000 -d10s --timeout 5s --latency   (and -c10000)

with ``X-Forwarded-For`` varying per request (the gateway believes it from
loopback), against the same stack's peak measured first in the same run
(``wrk -c64``). Reported per load: p99 of all answers, timeouts and other
socket errors, the clicks actually served (302) per second against that
peak, the answers shed by admission control (``503`` with ``Retry-After``,
read from the gateway's ``ascribe_gateway_shed_total``), and the gateway's
peak RSS. Needs the ``wrk`` binary (Debian package ``wrk``); without it the
cases say so.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from bench.procstats import RssSampler

if TYPE_CHECKING:
    from bench.cases import CaseResult, Goal

PEAK_CONNECTIONS = 64
LOADS = (4000, 10_000)
DURATION_S = 10
TIMEOUT_S = 5

# Each request its own visitor: per-address fraud rules see spread, as real traffic is.
WRK_SCRIPT = """
local n = 0
local tid = 0
local threads = 0
function setup(thread)
  thread:set("tid", threads)
  threads = threads + 1
end
function request()
  n = n + 1
  local ip = string.format("24.%d.%d.%d", tid * 16 + math.floor(n / 62500) % 16,
                           math.floor(n / 250) % 250, n % 250 + 1)
  return wrk.format("GET", nil, {["X-Forwarded-For"] = ip})
end
"""

_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1000.0, "m": 60_000.0}


@dataclass
class WrkRun:
    requests: int
    seconds: float
    non_2xx_3xx: int
    p99_ms: float | None
    p50_ms: float | None
    errors: dict[str, int]
    shed_by_reason: dict[str, int]
    gateway_rss_mb: float

    @property
    def shed(self) -> int:
        """The 503s of admission control (slow heads are 408s, and wrk sends none)."""
        return sum(count for reason, count in self.shed_by_reason.items() if reason != "slow_head")

    @property
    def timeouts(self) -> int:
        return self.errors.get("timeout", 0)

    @property
    def served_per_s(self) -> float:
        return (self.requests - self.non_2xx_3xx) / self.seconds if self.seconds else 0.0


def _millis(text: str) -> float:
    match = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text)
    if not match:
        raise ValueError(f"unreadable wrk latency {text!r}")
    return float(match.group(1)) * _UNITS[match.group(2)]


def parse_wrk(output: str) -> tuple[int, float, int, dict[str, float], dict[str, int]]:
    """requests, seconds, non-2xx/3xx answers, latency percentiles (ms) and socket errors of a wrk summary."""
    total = re.search(r"(\d+) requests in ([\d.]+)(ms|s|m)", output)
    if not total:
        raise ValueError("wrk printed no summary")
    seconds = _millis(total.group(2) + total.group(3)) / 1000
    non_ok = re.search(r"Non-2xx or 3xx responses: (\d+)", output)
    percentiles = {
        match.group(1): _millis(match.group(2))
        for match in re.finditer(r"^\s+(50|75|90|99)%\s+([\d.]+\w+)", output, re.MULTILINE)
    }
    errors: dict[str, int] = {}
    socket = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", output)
    if socket:
        errors = dict(zip(("connect", "read", "write", "timeout"), map(int, socket.groups()), strict=True))
    return int(total.group(1)), seconds, int(non_ok.group(1)) if non_ok else 0, percentiles, errors


def shed_counts(metrics_url: str) -> dict[str, int]:
    """ascribe_gateway_shed_total by reason."""
    with urllib.request.urlopen(metrics_url, timeout=5) as reply:
        text = reply.read().decode()
    return {
        match.group(1): int(float(match.group(2)))
        for match in re.finditer(r'^ascribe_gateway_shed_total\{reason="(\w+)"\} ([\d.e+]+)$', text, re.MULTILINE)
    }


def run_wrk(url: str, connections: int, seconds: int, metrics_url: str, gateway_pid: int) -> WrkRun:
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as script:
        script.write(WRK_SCRIPT)
    shed_before = shed_counts(metrics_url)
    try:
        with RssSampler({"gateway": gateway_pid}) as rss:
            done = subprocess.run(
                ["wrk", "-t2", f"-c{connections}", f"-d{seconds}s", f"--timeout={TIMEOUT_S}s", "--latency",
                 "-s", script.name, url],
                capture_output=True, text=True, timeout=seconds + 60, check=False,
            )
    finally:
        Path(script.name).unlink(missing_ok=True)
    if done.returncode != 0:
        raise RuntimeError(f"wrk failed: {(done.stderr or done.stdout).strip()[:200]}")
    requests, elapsed, non_ok, percentiles, errors = parse_wrk(done.stdout)
    return WrkRun(
        requests=requests, seconds=elapsed, non_2xx_3xx=non_ok,
        p99_ms=percentiles.get("99"), p50_ms=percentiles.get("50"), errors=errors,
        shed_by_reason={
            reason: count - shed_before.get(reason, 0) for reason, count in shed_counts(metrics_url).items()
        },
        gateway_rss_mb=rss.peak_mb()["gateway"],
    )


def overload_cases(
    gateway_url: str, metrics_url: str, gateway_pid: int, campaign_id: str, affiliate_id: str,
    goals: dict[str, list[Goal]],
) -> list[CaseResult]:
    from bench.cases import FAILED, CaseResult, unavailable

    keys = ["o.clicks_wrk_peak"] + [f"o.overload_{c}" for c in LOADS]
    if shutil.which("wrk") is None:
        return [unavailable(key, key, "wrk is not installed (Debian package wrk)") for key in keys]
    url = f"{gateway_url}/click?campaign_id={campaign_id}&aff_id={affiliate_id}&sub1=overload"
    results: list[CaseResult] = []
    try:
        peak = run_wrk(url, PEAK_CONNECTIONS, 5, metrics_url, gateway_pid)
    except (RuntimeError, ValueError, OSError, subprocess.TimeoutExpired) as error:
        return [CaseResult(key, key, status=FAILED, note=str(error)[:200]) for key in keys]
    results.append(_result(keys[0], f"clicks, wrk at {PEAK_CONNECTIONS} connections (the peak)", peak, None, []))
    for connections, key in zip(LOADS, keys[1:], strict=True):
        title = f"clicks, wrk at {connections:,} connections for {DURATION_S} s"
        try:
            run = run_wrk(url, connections, DURATION_S, metrics_url, gateway_pid)
        except (RuntimeError, ValueError, OSError, subprocess.TimeoutExpired) as error:
            results.append(CaseResult(key, title, status=FAILED, note=str(error)[:200]))
            continue
        results.append(_result(key, title, run, peak, goals.get(key, [])))
    return results


def _result(key: str, title: str, run: WrkRun, peak: WrkRun | None, goals: list[Goal]) -> CaseResult:
    from bench.cases import CaseResult

    result = CaseResult(key, title, unit="clicks/s", goals=goals)
    result.throughput = run.served_per_s
    result.p50_ms, result.p99_ms = run.p50_ms, run.p99_ms
    result.events = run.requests - run.non_2xx_3xx
    result.errors = sum(run.errors.values())
    result.outcomes = {"302": result.events, "other_non_3xx": run.non_2xx_3xx - run.shed,
                       **{f"503_shed_{reason}": count for reason, count in run.shed_by_reason.items() if count},
                       **{f"socket_{name}": count for name, count in run.errors.items() if count}}
    result.peak_rss_mb = {"gateway": run.gateway_rss_mb}
    result.extra = {"timeouts": run.timeouts, "answers": run.requests, "shed": run.shed}
    if peak is not None and peak.served_per_s:
        result.reference = "o.clicks_wrk_peak"
        result.ratio_of = "throughput"
        result.ratio = round(run.served_per_s / peak.served_per_s, 3)
    result.note = (
        f"{run.requests:,} answers, {run.timeouts:,} timeouts, {run.shed:,} shed (503: "
        + ", ".join(f"{reason} {count:,}" for reason, count in run.shed_by_reason.items() if count)
        + "), "
        f"gateway RSS {run.gateway_rss_mb:.0f} MB"
    )
    return result
