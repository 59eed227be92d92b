"""The results: a Markdown table for the terminal and README, and JSON files."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import time
from collections.abc import Mapping, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

from bench.cases import AVAILABLE, CaseResult, Goal
from tools.stack import REPO

RESULTS_DIR = REPO / "bench" / "results"
RSS_GOAL_MB = 150.0
PACKAGES = ("grpcio", "protobuf", "aiohttp", "uvloop", "asyncpg", "redis", "prometheus-client")


def machine(versions: Mapping[str, str]) -> dict[str, Any]:
    meminfo = Path("/proc/meminfo").read_text().splitlines()
    total_kib = next((int(line.split()[1]) for line in meminfo if line.startswith("MemTotal:")), 0)
    model = next(
        (line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
         if line.startswith("model name")),
        platform.processor(),
    )
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=5
        ).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        commit = ""
    packages = {}
    for name in PACKAGES:
        try:
            packages[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            packages[name] = "absent"
    return {
        "cores": os.cpu_count(),
        "cpu": model,
        "memory_gib": round(total_kib / 1024 / 1024, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "commit": commit,
        "packages": packages,
        **versions,
    }


def _num(value: float | None, digits: int = 0) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def _result_cell(result: CaseResult) -> str:
    if result.status != AVAILABLE:
        return f"{result.status}: {result.note}"
    return f"{_num(result.throughput)} {result.unit}"


def _goal_cells(result: CaseResult) -> tuple[str, str]:
    if not result.goals:
        return "", ""
    texts = "; ".join(goal.text for goal in result.goals)
    if result.status != AVAILABLE:
        return texts, "not measured"
    marks = ["MISSED" if met is False else ("met" if met else "?") for met in result.goals_met]
    if "MISSED" in marks:
        missed = [goal.text for goal, mark in zip(result.goals, marks, strict=True) if mark == "MISSED"]
        return texts, "MISSED " + "; ".join(missed) if len(result.goals) > 1 else "MISSED"
    return texts, "met" if all(mark == "met" for mark in marks) else ", ".join(marks)


def _ratio_cell(result: CaseResult) -> tuple[str, str]:
    if not result.reference:
        return "", ""
    if result.ratio is None:
        return result.reference, "-"
    what = {"cpu_us_per_event": "CPU/event", "p99_ms": "p99"}.get(result.ratio_of, "throughput")
    return result.reference, f"{result.ratio:.2f}x {what}"


def rss_row(results: Sequence[CaseResult]) -> tuple[dict[str, float], list[str]]:
    peaks: dict[str, float] = {}
    for result in results:
        for name, mb in result.peak_rss_mb.items():
            peaks[name] = max(peaks.get(name, 0.0), mb)
    return peaks, [f"{name} {mb:.0f} MB" for name, mb in sorted(peaks.items())]


def table(results: Sequence[CaseResult]) -> str:
    lines = [
        "| case | result | p50 ms | p99 ms | errors | CPU µs/event | reference | ratio | goal | |",
        "|---|---|---:|---:|---:|---:|---|---|---|---|",
    ]
    for result in results:
        reference, ratio = _ratio_cell(result)
        goal, mark = _goal_cells(result)
        available = result.status == AVAILABLE
        lines.append(
            f"| {result.key} {result.title} | {_result_cell(result)}"
            + (f" ({result.note})" if available and result.note else "")
            + f" | {_num(result.p50_ms, 2) if available else ''} | {_num(result.p99_ms, 2) if available else ''}"
            + f" | {result.errors if available else ''} | {_num(result.cpu_us_per_event) if available else ''}"
            + f" | {reference} | {ratio} | {goal} | {mark} |"
        )
    peaks, cells = rss_row(results)
    if peaks:
        worst = max(peaks.values())
        mark = "met" if worst <= RSS_GOAL_MB else "MISSED"
        lines.append(
            f"| service peak RSS under load | {', '.join(cells)} | | | | | | | <= {RSS_GOAL_MB:.0f} MB each | {mark} |"
        )
    return "\n".join(lines)


def write(results: Sequence[CaseResult], info: Mapping[str, Any], mode: str, seconds: float) -> Path:
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    peaks, _ = rss_row(results)
    document = {
        "mode": mode,
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "seconds": round(seconds, 1),
        "machine": dict(info),
        "cases": [result.as_json() for result in results],
        "peak_rss_mb": peaks,
        "rss_goal": {"goal": f"<= {RSS_GOAL_MB:.0f} MB each", "met": all(v <= RSS_GOAL_MB for v in peaks.values())},
        "table_markdown": table(results),
    }
    text = json.dumps(document, indent=2, default=_default)
    latest = RESULTS_DIR / "latest.json"
    latest.write_text(text)
    (RESULTS_DIR / f"{time.strftime('%Y%m%dT%H%M%S')}-{mode}.json").write_text(text)
    return latest


def _default(value: object) -> object:
    if isinstance(value, Goal):
        return value.text
    return str(value)


def header(info: Mapping[str, Any], mode: str, seconds: float, backends: str) -> str:
    packages = ", ".join(f"{name} {version}" for name, version in info["packages"].items())
    return (
        f"ascribe bench ({mode} mode, {seconds:.0f} s, commit {info.get('commit') or '?'}): "
        f"{info['cores']} cores ({info['cpu']}), {info['memory_gib']} GiB, Linux {info['kernel']}, "
        f"Python {info['python']}, PostgreSQL {info.get('postgresql', '?')}, Redis {info.get('redis', '?')} "
        f"({backends}); {packages}. CPU/event counts every server process (services, PostgreSQL, Redis); "
        "the load generator runs in its own processes and is reported apart in the JSON."
    )
