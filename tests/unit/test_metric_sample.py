"""tests.support.sample reads a metric object the way get_sample_value reads the registry."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from prometheus_client import Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from tests.support import sample


def test_a_counter_reads_its_total_per_label_set_or_summed() -> None:
    counter = Counter("t_events", "Events.", ["event", "action"], registry=None)
    assert sample(counter, event="click", action="allow") is None  # never used yet
    counter.labels("click", "allow").inc(2)
    counter.labels("click", "reject").inc()
    counter.labels("conversion", "allow").inc(4)
    assert sample(counter, event="click", action="allow") == 2
    assert sample(counter, event="click") == 3
    assert sample(counter) == 7
    assert sample(counter, event="refund") is None


def test_a_gauge_reads_its_value_and_a_histogram_the_series_named() -> None:
    gauge = Gauge("t_up", "Up.", registry=None)
    assert sample(gauge) == 0
    gauge.set(float("inf"))
    assert sample(gauge) == float("inf")
    histogram = Histogram("t_rows", "Rows.", buckets=(1, 10), registry=None)
    histogram.observe(3)
    histogram.observe(5)
    assert (sample(histogram, "_count"), sample(histogram, "_sum")) == (2, 8)
    assert sample(histogram, "_bucket", le="10.0") == 2
    with pytest.raises(ValueError, match="name its series"):
        sample(histogram)


class Pools(Collector):
    def collect(self) -> Iterator[GaugeMetricFamily]:
        yield GaugeMetricFamily("t_pool_size", "Open.", value=3)
        yield GaugeMetricFamily("t_pool_in_use", "Lent.", value=1)


def test_a_collector_of_several_metrics_reads_the_family_named() -> None:
    assert sample(Pools(), family="t_pool_in_use") == 1
    assert sample(Pools(), family="t_pool_size") == 3
    with pytest.raises(ValueError, match="t_pool_size"):
        sample(Pools())
