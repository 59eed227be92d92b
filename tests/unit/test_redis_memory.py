"""The Redis memory reading behind AscribeRedisMemoryHigh (pure: INFO answers as dicts)."""

from __future__ import annotations

import pytest

from services.fraud.redis_memory import fullest


def test_one_server_reports_its_own_figures() -> None:
    assert fullest({"used_memory": 500, "maxmemory": 1000, "used_memory_human": "500B"}) == (500, 1000)
    assert fullest({"used_memory": 500, "maxmemory": 0}) == (500, 0)


def test_a_cluster_reports_the_node_nearest_its_limit() -> None:
    nodes = {
        "10.0.0.1:6379": {"used_memory": 900, "maxmemory": 2000},  # 45 %
        "10.0.0.2:6379": {"used_memory": 700, "maxmemory": 1000},  # 70 %: the fullest
        "10.0.0.3:6379": {"used_memory": 5000, "maxmemory": 0},  # unbounded: never the one
    }
    assert fullest(nodes) == (700, 1000)
    assert fullest({"a": {"used_memory": 5, "maxmemory": 0}, "b": {"used_memory": 9, "maxmemory": 0}}) == (9, 0)


def test_an_answer_without_memory_figures_is_an_error() -> None:
    with pytest.raises(ValueError):
        fullest({"role": "master"})
