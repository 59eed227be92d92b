"""The repository's snapshot of the IP lists, its dates, and the choice of folder when none is set."""

from __future__ import annotations

import hashlib
import logging
import os
import re
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest

from services.fraud.config import Settings
from services.fraud.ipintel import (
    MANIFEST,
    REPOSITORY_LISTS,
    IpIntel,
    IpIntelHolder,
    IpList,
    choose_folder,
    list_dates,
    read_manifest,
)

REPO = Path(__file__).resolve().parents[2]
DAY = 86400.0


def write_lists(folder: Path, as_of: str | None, kinds: tuple[IpList, ...] = tuple(IpList)) -> None:
    """One small list per kind, dated ``as_of`` in SOURCES.tsv (None: no manifest, file times count)."""
    folder.mkdir(parents=True, exist_ok=True)
    addresses = {IpList.TOR: "198.51.100.7", IpList.DATACENTER: "198.51.100.0/28", IpList.VPN: "203.0.113.0/28"}
    lines = ["# file\tentries\tas_of\tsource\tlicence"]
    for kind in kinds:
        (folder / f"{kind.value}-test.txt").write_text(addresses[kind] + "\n")
        lines.append(f"{kind.value}-test.txt\t1\t{as_of}\thttps://lists.example/{kind.value}\tMIT")
    if as_of is not None:
        (folder / MANIFEST).write_text("\n".join(lines) + "\n")


def test_the_snapshot_is_complete_dated_and_licensed() -> None:
    assert REPOSITORY_LISTS == REPO / "data" / "ipintel"
    intel = IpIntel.load(REPOSITORY_LISTS)
    assert intel.available
    assert all(intel.counts[kind] > 100 for kind in IpList)
    # Dates come from SOURCES.tsv, not from file times (a clone resets those).
    dates = list_dates(REPOSITORY_LISTS)
    assert datetime.fromtimestamp(dates[IpList.TOR], UTC).date().isoformat() == "2024-02-27"
    assert datetime.fromtimestamp(dates[IpList.DATACENTER], UTC).date().isoformat() == "2026-08-22"
    assert datetime.fromtimestamp(dates[IpList.VPN], UTC).date().isoformat() == "2026-08-22"
    manifest = (REPOSITORY_LISTS / MANIFEST).read_text().splitlines()
    listed = {line.split("\t")[0]: line.split("\t") for line in manifest if not line.startswith("#")}
    assert set(listed) == {path.name for path in REPOSITORY_LISTS.glob("*.txt")}
    for name, fields in listed.items():
        entries = [line for line in (REPOSITORY_LISTS / name).read_text().splitlines() if line.strip()]
        assert int(fields[1]) == len(entries), name
        assert fields[3].startswith("https://github.com/") and fields[4].startswith("MIT"), name
        licence = re.search(r"LICENSES/[\w.-]+", fields[4])
        assert licence and "Permission is hereby granted" in (REPOSITORY_LISTS / licence.group()).read_text()
    # The copy is byte for byte: SNAPSHOT.md's checksums still match the files.
    notes = (REPOSITORY_LISTS / "SNAPSHOT.md").read_text()
    for name, digest in re.findall(r"^\| ([\w.-]+) \| ([0-9a-f]{64}) \|$", notes, re.MULTILINE):
        assert hashlib.sha256((REPOSITORY_LISTS / name).read_bytes()).hexdigest() == digest, name
    assert len(re.findall(r"[0-9a-f]{64}", notes)) == 6  # five lists and the README


def test_nothing_outside_the_repository_is_named() -> None:
    """The project runs, tests and benchmarks without the team's shared folder."""
    # Spelled in pieces so that this file does not name the folder itself.
    outside, shared_data = "/".join(("..", "shared")), "/".join(("shared", "data"))
    offenders = []
    for top in ("Makefile", "services", "gateway", "tools", "bench", "tests", "docker-compose.yml", "Dockerfile"):
        root = REPO / top
        files = [root] if root.is_file() else [p for p in root.rglob("*") if p.suffix in {".py", ".yml", ".toml"}]
        for path in files:
            if path.resolve() == Path(__file__).resolve():
                continue
            text = path.read_text(errors="replace")
            if outside in text or shared_data in text:
                offenders.append(str(path.relative_to(REPO)))
    assert offenders == []


def test_manifest_dates_and_fallback_to_file_times(tmp_path: Path) -> None:
    write_lists(tmp_path / "dated", "2026-01-02T03:04:05Z")
    assert read_manifest(tmp_path / "dated")["tor-test.txt"] == datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC).timestamp()
    undated = tmp_path / "undated"
    write_lists(undated, None)
    os.utime(undated / "vpn-test.txt", (1_700_000_000, 1_700_000_000))
    dates = list_dates(undated)
    assert dates[IpList.VPN] == 1_700_000_000
    assert abs(dates[IpList.TOR] - time.time()) < 60
    # An older manifest without dates (the format before SOURCES.tsv had as_of) is ignored, not fatal.
    (undated / MANIFEST).write_text("# downloaded 2026-01-01T00:00:00+00:00\nvpn-test.txt\t1\thttps://x\n")
    assert list_dates(undated)[IpList.VPN] == 1_700_000_000


def test_choice_when_unset(tmp_path: Path) -> None:
    snapshot, downloaded = tmp_path / "snapshot", tmp_path / "downloaded"
    write_lists(snapshot, "2026-08-22T00:00:00Z")
    # Nothing downloaded: the snapshot.
    assert choose_folder(None, downloaded, snapshot) == snapshot
    # A newer complete download wins.
    write_lists(downloaded, "2026-12-01T00:00:00Z")
    assert choose_folder(None, downloaded, snapshot) == downloaded
    # ...but not an older one,
    write_lists(downloaded, "2026-01-01T00:00:00Z")
    assert choose_folder(None, downloaded, snapshot) == snapshot
    # ...nor a newer one missing a list (a half-failed `make ipintel` must not turn Tor off).
    partial = tmp_path / "partial"
    write_lists(partial, "2026-12-01T00:00:00Z", (IpList.DATACENTER, IpList.VPN))
    assert choose_folder(None, partial, snapshot) == snapshot
    # ASCRIBE_IPINTEL_DIR is taken as it is, even when empty or missing.
    assert choose_folder(tmp_path / "elsewhere", downloaded, snapshot) == tmp_path / "elsewhere"


def test_holder_switches_to_a_newer_download_on_reload(tmp_path: Path) -> None:
    snapshot, downloaded = tmp_path / "snapshot", tmp_path / "downloaded"
    write_lists(snapshot, "2026-08-22T00:00:00Z")
    holder = IpIntelHolder(None, downloaded=downloaded, snapshot=snapshot)
    assert holder.folder == snapshot and holder.current.lookup("198.51.100.7").tor
    write_lists(downloaded, "2026-12-01T00:00:00Z")
    (downloaded / "tor-test.txt").write_text("192.0.2.99\n")
    holder.reload()
    assert holder.current.source == str(downloaded)
    assert holder.current.lookup("192.0.2.99").tor
    assert holder.refresh_folder == downloaded


def test_unset_setting_loads_the_snapshot_in_a_fresh_checkout(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ASCRIBE_IPINTEL_DIR unset and no `make ipintel`: every signal is on, from the repository alone."""
    monkeypatch.delenv("ASCRIBE_IPINTEL_DIR", raising=False)
    monkeypatch.delenv("ASCRIBE_DATA_DIR", raising=False)
    monkeypatch.setenv("ASCRIBE_REDIS_URL", "redis://127.0.0.1:6379/0")
    monkeypatch.chdir(tmp_path)  # no .data/ipintel here
    settings = Settings.from_env()
    holder = IpIntelHolder(settings.ipintel_dir, downloaded=settings.ipintel_download_dir)
    assert holder.folder == REPOSITORY_LISTS
    assert holder.current.available and all(holder.current.counts[kind] > 100 for kind in IpList)
    assert holder.current.lookup("8.8.8.8").datacenter  # the README's known trap


def test_summary_line_says_how_old_each_list_is(tmp_path: Path) -> None:
    write_lists(tmp_path, "2026-08-22T00:00:00Z", (IpList.TOR, IpList.VPN))
    intel = IpIntel.load(tmp_path)
    now = datetime(2026, 8, 25, tzinfo=UTC).timestamp()
    assert intel.age_seconds(IpList.TOR, now) == 3 * DAY
    assert intel.age_seconds(IpList.DATACENTER, now) == float("inf")
    level, text = intel.summary(now)
    assert level == logging.WARNING
    assert "tor 1 entries as of 2026-08-22 (3 days old)" in text
    assert "datacenter MISSING" in text and "make ipintel" in text
    write_lists(tmp_path, "2026-08-22T00:00:00Z")
    level, text = IpIntel.load(tmp_path).summary(now)
    assert level == logging.INFO and "out of date" not in text
    level, text = IpIntel.load(tmp_path).summary(now + 30 * DAY)
    assert level == logging.WARNING and "out of date or missing: tor, datacenter, vpn" in text
