"""The overload bench reads wrk's summary (pure parsing, no wrk run)."""

from __future__ import annotations

import pytest

from bench.overload import WrkRun, parse_wrk

WRK_OUTPUT = """Running 10s test @ http://127.0.0.1:8080/click?campaign_id=c&aff_id=a
  2 threads and 4000 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency   398.57ms  277.29ms   4.97s    72.31%
    Req/Sec     1.93k     1.57k   11.39k    82.86%
  Latency Distribution
     50%  426.67ms
     75%  522.42ms
     90%  652.27ms
     99%    1.32s
  29490 requests in 8.05s, 7.21MB read
  Socket errors: connect 0, read 3, write 0, timeout 21
  Non-2xx or 3xx responses: 21074
Requests/sec:   3665.55
Transfer/sec:      0.90MB
"""


def test_the_summary_is_read() -> None:
    requests, seconds, non_ok, percentiles, errors = parse_wrk(WRK_OUTPUT)
    assert (requests, seconds, non_ok) == (29490, 8.05, 21074)
    assert percentiles == {"50": 426.67, "75": 522.42, "90": 652.27, "99": 1320.0}
    assert errors == {"connect": 0, "read": 3, "write": 0, "timeout": 21}


def test_a_clean_run_has_no_errors_or_non_2xx_lines() -> None:
    clean = WRK_OUTPUT.replace("  Socket errors: connect 0, read 3, write 0, timeout 21\n", "").replace(
        "  Non-2xx or 3xx responses: 21074\n", ""
    )
    requests, _, non_ok, percentiles, errors = parse_wrk(clean)
    assert (requests, non_ok, errors) == (29490, 0, {})
    assert percentiles["99"] == 1320.0


def test_served_clicks_per_second_and_shed_exclude_slow_heads() -> None:
    run = WrkRun(requests=1000, seconds=2.0, non_2xx_3xx=400, p99_ms=None, p50_ms=None, errors={},
                 shed_by_reason={"queue": 100, "connections": 250, "slow_head": 7}, gateway_rss_mb=90.0)
    assert run.served_per_s == 300.0
    assert run.shed == 350


def test_no_summary_is_an_error() -> None:
    with pytest.raises(ValueError, match="no summary"):
        parse_wrk("unable to connect to 127.0.0.1:8080 Connection refused")
