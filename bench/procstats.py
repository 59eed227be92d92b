"""CPU and memory of the processes a case involves, read from /proc.

CPU of a group is utime+stime of every live process in its tree plus
cutime+cstime (the CPU of children already reaped). PostgreSQL forks a
backend per connection and reaps it when it closes, so counting the reaped
part keeps a backend's CPU even when it exits in the middle of a case.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def _stat(pid: int) -> list[str] | None:
    """The fields of /proc/<pid>/stat after the command name (field 3 first)."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return raw.rsplit(")", 1)[1].split()


def children_map() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (fields := _stat(int(entry.name))) is not None:
            children.setdefault(int(fields[1]), []).append(int(entry.name))
    return children


def tree(root: int, children: Mapping[int, Sequence[int]] | None = None) -> list[int]:
    """``root`` and every live process below it."""
    children = children_map() if children is None else children
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo.extend(children.get(pid, ()))
    return found


def process_cpu(pid: int) -> float:
    """CPU seconds of ``pid`` and of its children it has reaped; 0 when gone."""
    fields = _stat(pid)
    if fields is None:
        return 0.0
    # utime, stime, cutime, cstime are fields 14-17 of stat(5), 11-14 here.
    return sum(int(value) for value in fields[11:15]) / CLOCK_TICKS


def group_cpu(roots: Sequence[int], children: Mapping[int, Sequence[int]]) -> float:
    return sum(process_cpu(pid) for root in roots for pid in tree(root, children))


def status_kib(pid: int, field: str) -> int:
    """A ``kB`` line of /proc/<pid>/status (VmRSS, VmHWM), 0 when gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


class CpuMeter:
    """CPU seconds per named group of process trees, between two snapshots."""

    def __init__(self, groups: Mapping[str, Sequence[int]]) -> None:
        self.groups = {name: list(roots) for name, roots in groups.items() if roots}

    def snapshot(self) -> dict[str, float]:
        children = children_map()
        return {name: group_cpu(roots, children) for name, roots in self.groups.items()}

    @staticmethod
    def delta(before: Mapping[str, float], after: Mapping[str, float]) -> dict[str, float]:
        return {name: max(0.0, after[name] - before.get(name, 0.0)) for name in after}


class RssSampler:
    """Peak resident memory of some processes while a case runs (sampled VmRSS)."""

    def __init__(self, pids: Mapping[str, int], interval: float = 0.2) -> None:
        self._pids = dict(pids)
        self._interval = interval
        self.peak_kib: dict[str, int] = dict.fromkeys(self._pids, 0)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def _sample(self) -> None:
        for name, pid in self._pids.items():
            self.peak_kib[name] = max(self.peak_kib[name], status_kib(pid, "VmRSS"))

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            self._sample()

    def __enter__(self) -> RssSampler:
        self._sample()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()

    def peak_mb(self) -> dict[str, float]:
        return {name: round(kib / 1024, 1) for name, kib in self.peak_kib.items()}
