"""The installed ``ascribe`` command (.venv/bin/ascribe, put there by ``make install``) as a real
process against the three services as real processes, with an admin token.

The command runs from a plain environment (no PYTHONPATH, another working
directory), as a person runs it from their shell.
"""

from __future__ import annotations

import asyncio
import csv
import io
import json
import os
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tools.stack import Stack, free_port

ADMIN_TOKEN = "e2e-admin-token"
COMMAND = Path(sys.executable).with_name("ascribe")


@dataclass
class Run:
    code: int
    stdout: str
    stderr: str

    def json(self) -> Any:
        assert self.code == 0, f"exit {self.code}: {self.stderr}"
        return json.loads(self.stdout)


@dataclass
class Ascribe:
    stack: Stack
    cwd: Path

    async def __call__(self, *args: str, token: str | None = ADMIN_TOKEN) -> Run:
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "ASCRIBE_ADMIN_TOKEN")}
        env["ASCRIBE_ATTRIBUTION_ADDR"] = self.stack.addr("attribution")
        if token is not None:
            env["ASCRIBE_ADMIN_TOKEN"] = token
        process = await asyncio.create_subprocess_exec(
            str(COMMAND), *args, cwd=self.cwd, env=env,
            stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )
        out, err = await asyncio.wait_for(process.communicate(), 60)
        assert process.returncode is not None
        return Run(process.returncode, out.decode(), err.decode())


@pytest.fixture
async def ascribe(
    database_url: str, redis_server_url: str, redis_prefix: str, ipintel_dir: Path, tmp_path: Path,
    redis_client: Any,
) -> AsyncIterator[Ascribe]:
    assert COMMAND.exists(), f"{COMMAND} is missing: `make install` installs the project's console script"
    stack = Stack(
        database_url=database_url, redis_url=redis_server_url, log_dir=tmp_path / "logs",
        env={
            "ASCRIBE_ADMIN_TOKEN": ADMIN_TOKEN,
            "ASCRIBE_IPINTEL_DIR": str(ipintel_dir),
            "ASCRIBE_FRAUD_KEY_PREFIX": redis_prefix,
            "ASCRIBE_CATALOG_CACHE_MS": "0",
            "ASCRIBE_FRAUD_DEADLINE_MS": "1000",
        },
    )
    await asyncio.to_thread(stack.start)
    work = tmp_path / "elsewhere"
    work.mkdir()
    try:
        yield Ascribe(stack, work)
    finally:
        await asyncio.to_thread(stack.stop)


async def test_the_installed_command_manages_a_running_stack(ascribe: Ascribe) -> None:
    # ---- create, show, list, update
    created = (await ascribe(
        "campaigns", "create", "--id", "cmp", "--name", "Summer", "--landing-url", "https://shop.example/summer",
        "--currency", "EUR", "--payout", "5.00", "--format", "json",
    )).json()
    token = created["postback_token"]
    assert token and created["payout_micros"] == "5000000"
    assert (await ascribe("affiliates", "create", "--id", "ann", "--name", "Ann", "--channel", "influencer")).code == 0

    today = datetime.now(UTC).date()
    coupon = (await ascribe(
        "coupons", "create", "cmp", "summer10", "--kind", "exclusive", "--affiliate", "ann",
        "--valid-from", today.isoformat(), "--valid-until", (today + timedelta(days=30)).isoformat(),
        "--usage-limit", "5", "--discount-percent", "10", "-f", "json",
    )).json()
    assert coupon["valid_until"] == f"{today + timedelta(days=31)}T00:00:00Z"

    shown = (await ascribe("coupons", "show", "cmp", "SUMMER10", "-f", "json")).json()
    assert shown == coupon

    table = await ascribe("coupons", "list", "cmp")
    assert table.code == 0 and "SUMMER10" in table.stdout and "exclusive" in table.stdout

    listed = await ascribe("coupons", "list", "cmp", "-f", "csv")
    rows = list(csv.DictReader(io.StringIO(listed.stdout)))
    assert [(r["code"], r["remaining"], r["affiliate_ids"]) for r in rows] == [("SUMMER10", "5", "ann")]

    held = (await ascribe("coupons", "update", "cmp", "summer10", "--status", "hold", "-f", "json")).json()
    assert held["status"] == "COUPON_STATUS_HOLD" and held["valid_until"] == coupon["valid_until"]

    # ---- a conversion with the held code waits for review; review it
    async with aiohttp.ClientSession() as http, http.post(
        f"{ascribe.stack.gateway_url}/postback",
        params={"campaign_id": "cmp", "order_id": "order-1", "amount": "49.90", "currency": "EUR",
                "coupon": "SUMMER10"},
        headers={"X-Ascribe-Token": token},
    ) as response:
        assert response.status == 200, await response.text()
    queue = (await ascribe("conversions", "list", "cmp", "--status", "flagged", "-f", "json")).json()
    assert [(c["order_id"], c["reasons"], c["amount_micros"]) for c in queue] == [
        ("order-1", ["coupon_on_hold"], "49900000"),
    ]
    # Received today (or just past midnight): a date-only --to counts the whole day.
    recent = (await ascribe(
        "conversions", "list", "cmp", "--from", today.isoformat(), "--to", str(today + timedelta(days=1)), "-f", "json",
    )).json()
    assert [c["order_id"] for c in recent] == ["order-1"]
    before_today = (await ascribe("conversions", "list", "cmp", "--to", str(today - timedelta(days=1)), "-f", "csv"))
    assert before_today.code == 0 and before_today.stdout.splitlines()[1:] == []
    reviewed = (await ascribe(
        "conversions", "review", "cmp", "order-1", "--approve", "--note", "checked by hand", "-f", "json",
    )).json()
    assert reviewed["status"] == "CONVERSION_STATUS_PENDING"
    history = await ascribe("conversions", "show", "cmp", "order-1")
    assert history.code == 0 and "review_approved" in history.stdout and "checked by hand" in history.stdout

    # ---- generated codes
    generated = await ascribe("codes", "generate", "cmp", "--count", "500", "--prefix", "E2E", "-f", "json")
    batch = generated.json()
    assert batch["generated"] == 500 and "generated 500 codes" in generated.stderr
    exported = await ascribe("codes", "export", batch["batch_id"])
    assert exported.code == 0
    codes = exported.stdout.splitlines()
    assert codes[0] == "code" and len(set(codes[1:])) == 500

    # ---- refused, failed and wrong requests
    missing = await ascribe("coupons", "show", "cmp", "NOPE10")
    assert (missing.code, missing.stdout) == (1, "")
    assert "NOT_FOUND" in missing.stderr

    invalid = await ascribe("coupons", "update", "cmp", "SUMMER10", "--valid-from", "2999-01-01")
    assert (invalid.code, invalid.stdout) == (1, "")
    assert invalid.stderr.splitlines() == [
        "error: INVALID_ARGUMENT", "coupon.valid_until: must be after valid_from (valid_from <= t < valid_until)",
    ]

    twice = await ascribe("conversions", "review", "cmp", "order-1", "--reject")
    assert twice.code == 1 and "FAILED_PRECONDITION" in twice.stderr

    unauthenticated = await ascribe("campaigns", "list", token="wrong")
    assert unauthenticated.code == 1 and "UNAUTHENTICATED" in unauthenticated.stderr

    down = await ascribe("--addr", f"127.0.0.1:{free_port()}", "--timeout", "2", "campaigns", "list")
    assert down.code == 1 and "UNAVAILABLE" in down.stderr

    usage = await ascribe("coupons", "create", "cmp", "X10", "--valid-until", "31/12/2026")
    assert (usage.code, usage.stdout) == (2, "")
