"""The admin CLI (typer's CliRunner) against a real attribution server in process, on real PostgreSQL.

The server runs on the test's event loop, so each command runs in a thread.
"""

from __future__ import annotations

import asyncio
import csv
import io
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trustme
from typer.testing import CliRunner, Result

from ascribe_cli.app import app
from services.attribution.server import start_attribution
from services.common.channels import Transport
from services.common.tls import TlsSettings
from tests.support import attribution_settings, free_port

ADMIN_TOKEN = "cli-test-token"


@dataclass
class Cli:
    addr: str
    runner: CliRunner

    async def __call__(self, *args: str, token: str | None = ADMIN_TOKEN) -> Result:
        env = {"ASCRIBE_ADMIN_TOKEN": token, "ASCRIBE_ATTRIBUTION_ADDR": self.addr}
        return await asyncio.to_thread(self.runner.invoke, app, list(args), env=env)

    async def ok(self, *args: str) -> str:
        result = await self(*args)
        assert result.exit_code == 0, f"{args}: {result.exit_code}\n{result.output}"
        return result.stdout

    async def json(self, *args: str) -> Any:
        return json.loads(await self.ok(*args, "--format", "json"))


@pytest.fixture
async def cli(database_url: str) -> AsyncIterator[Cli]:
    settings = attribution_settings(
        database_url, "127.0.0.1:9", admin_token=ADMIN_TOKEN, db_pool_min=1, db_pool_max=4,
    )
    service = await start_attribution(settings)
    try:
        yield Cli(f"127.0.0.1:{service.port}", CliRunner())
    finally:
        await service.stop(0.5)


async def campaign(cli: Cli, campaign_id: str = "cmp", *extra: str) -> Any:
    return await cli.json(
        "campaigns", "create", "--id", campaign_id, "--name", f"Campaign {campaign_id}",
        "--landing-url", "https://shop.example/landing", "--currency", "EUR", "--payout", "5.00", *extra,
    )


async def test_create_returns_the_token_once_and_list_follows_every_page_in_each_format(cli: Cli) -> None:
    created = await campaign(cli, "c0")
    assert created["payout_micros"] == "5000000"
    assert len(created["postback_token"]) >= 22
    for i in range(1, 5):
        await campaign(cli, f"c{i}")
    assert (await cli.json("campaigns", "show", "c0"))["postback_token"] == ""

    listed = await cli.json("campaigns", "list", "--page-size", "2")
    assert [c["id"] for c in listed] == ["c0", "c1", "c2", "c3", "c4"]

    rows = list(csv.DictReader(io.StringIO(await cli.ok("campaigns", "list", "--page-size", "2", "-f", "csv"))))
    assert [r["id"] for r in rows] == ["c0", "c1", "c2", "c3", "c4"]
    assert rows[0]["status"] == "CAMPAIGN_STATUS_ACTIVE"

    table = await cli.ok("campaigns", "list", "--page-size", "3")
    assert all(f"c{i}" in table for i in range(5))
    assert "Campaign c4" in table


async def test_field_errors_are_shown_as_field_and_message_with_exit_code_1(cli: Cli) -> None:
    await campaign(cli)
    result = await cli(
        "coupons", "create", "cmp", "BADWINDOW", "--kind", "exclusive",
        "--valid-from", "2026-06-10", "--valid-until", "2026-06-01", "--country", "XX",
    )
    assert result.exit_code == 1, result.output
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert lines[0] == "error: INVALID_ARGUMENT"
    assert "coupon.valid_until: must be after valid_from (valid_from <= t < valid_until)" in lines
    assert "coupon.affiliate_ids: an EXCLUSIVE code needs at least one owner affiliate" in lines
    assert "coupon.countries[0]: not an ISO 3166-1 alpha-2 country: 'XX'" in lines


async def test_refused_and_failed_requests_exit_1(cli: Cli) -> None:
    missing = await cli("campaigns", "show", "nope")
    assert (missing.exit_code, missing.stdout) == (1, "")
    assert missing.stderr.startswith("error: NOT_FOUND: campaign 'nope' not found")

    for fmt in ("json", "csv", "table"):
        no_token = await cli("campaigns", "list", "--format", fmt, token=None)
        assert (no_token.exit_code, no_token.stdout) == (1, ""), fmt
    assert "UNAUTHENTICATED" in no_token.stderr

    await campaign(cli)
    duplicate = await cli("campaigns", "create", "--id", "cmp", "--name", "again", "--landing-url",
                          "https://shop.example/", "--currency", "EUR")
    assert duplicate.exit_code == 1
    assert "ALREADY_EXISTS" in duplicate.stderr

    down = await cli("--addr", f"127.0.0.1:{free_port()}", "--timeout", "2", "campaigns", "list")
    assert (down.exit_code, down.stdout) == (1, "")
    assert "UNAVAILABLE: cannot reach the attribution service" in down.stderr


async def test_coupon_windows_and_updates_change_only_the_masked_fields(cli: Cli) -> None:
    await campaign(cli)
    await cli.ok("affiliates", "create", "--id", "ann", "--name", "Ann", "--channel", "influencer")
    created = await cli.json(
        "coupons", "create", "cmp", "summer25", "--kind", "exclusive", "--affiliate", "ann",
        "--valid-from", "2025-06-26", "--valid-until", "2025-09-24", "--usage-limit", "150",
        "--discount-percent", "25", "--min-order", "20.50", "--device", "mobile", "--country", "de",
    )
    assert created["code"] == "SUMMER25"
    # The contract's date-only rule: the last day counts whole.
    assert (created["valid_from"], created["valid_until"]) == ("2025-06-26T00:00:00Z", "2025-09-25T00:00:00Z")
    assert created["min_order_micros"] == "20500000"
    assert created["discount_percent_bp"] == 2500
    assert created["remaining"] == "150"

    held = await cli.json("coupons", "update", "cmp", "Summer25", "--status", "hold")
    assert held["status"] == "COUPON_STATUS_HOLD"
    assert {k: v for k, v in held.items() if k != "status"} == {k: v for k, v in created.items() if k != "status"}

    opened = await cli.json("coupons", "update", "cmp", "SUMMER25", "--valid-until", "none", "--clear", "countries")
    assert "valid_until" not in opened and opened["countries"] == []
    assert opened["valid_from"] == "2025-06-26T00:00:00Z"

    fixed = await cli.json("coupons", "update", "cmp", "SUMMER25", "--discount", "5")
    assert (fixed["discount_micros"], fixed["discount_percent_bp"]) == ("5000000", 0)

    paused = await cli.json("affiliates", "update", "ann", "--status", "paused")
    assert (paused["status"], paused["channel"]) == ("AFFILIATE_STATUS_PAUSED", "influencer")

    percent = await cli.json("campaigns", "update", "cmp", "--payout-percent", "12.5")
    assert (percent["payout_percent_bp"], percent["payout_micros"]) == (1250, "0")

    assert [c["code"] for c in await cli.json("coupons", "list", "cmp", "--status", "hold")] == ["SUMMER25"]
    assert await cli.json("coupons", "list", "cmp", "--status", "active") == []


async def test_codes_generate_then_export_in_both_formats(cli: Cli) -> None:
    await campaign(cli)
    result = await cli("codes", "generate", "cmp", "--count", "300", "--prefix", "tq", "--length", "6",
                       "--valid-until", "2030-01-31", "--format", "json")
    assert result.exit_code == 0, result.output
    answer = json.loads(result.stdout)
    assert answer["generated"] == 300
    assert "generated 300 codes in" in result.stderr and "codes/s" in result.stderr

    lines = (await cli.ok("codes", "export", answer["batch_id"])).splitlines()
    assert lines[0] == "code"
    codes = lines[1:]
    assert len(set(codes)) == 300
    # The prefix and 6 random symbols (and a check symbol, where generated codes carry one).
    assert all(code.startswith("TQ") and len(code) >= 8 for code in codes)

    jsonl = (await cli.ok("codes", "export", answer["batch_id"], "--format", "jsonl")).splitlines()
    assert sorted(json.loads(line)["code"] for line in jsonl) == sorted(codes)

    one = await cli.json("coupons", "show", "cmp", codes[0])
    assert (one["kind"], one["batch_id"], one["valid_until"]) == (
        "COUPON_KIND_UNIQUE", answer["batch_id"], "2030-02-01T00:00:00Z",
    )

    unknown = await cli("codes", "export", "bat_unknown")
    assert (unknown.exit_code, unknown.stdout) == (1, "")
    assert "NOT_FOUND" in unknown.stderr


async def test_codes_import_then_assign_one_customer_and_a_file_of_them(cli: Cli, tmp_path: Path) -> None:
    await campaign(cli)
    csv_file = tmp_path / "shop.csv"
    csv_file.write_text("\ufeffcode,kind,valid_until\nSHOP-A1,unique,2030-01-31\nSHOP-B2,unique,\nSHOP-C3,unique,\n")
    imported = await cli("codes", "import", "cmp", str(csv_file), "--format", "json")
    assert imported.exit_code == 0, imported.output
    batch = json.loads(imported.stdout)
    assert batch["imported"] == 3 and "imported 3 codes" in imported.stderr

    first = await cli.json("codes", "assign", "cmp", batch["batch_id"], "cust-1")
    again = await cli.json("codes", "assign", "cmp", batch["batch_id"], "cust-1")
    assert first["code"] == again["code"] and first["assigned_customer_id"] == "cust-1"

    customers = tmp_path / "customers.csv"
    customers.write_text("customer_id\ncust-2\ncust-1\n")
    lines = (await cli.ok("codes", "assign", "cmp", batch["batch_id"], "--customers", str(customers))).splitlines()
    assert lines[0] == "customer_id,code" and lines[2] == f"cust-1,{first['code']}"
    handed = {line.split(",")[1] for line in lines[1:]}
    assert len(handed) == 2 and handed <= {"SHOP-A1", "SHOP-B2", "SHOP-C3"}

    bad = tmp_path / "bad.csv"
    bad.write_text("code,valid_until\nOK-1,2030-01-31\nOK-2,not a date\n")
    refused = await cli("codes", "import", "cmp", str(bad))
    assert refused.exit_code == 1 and "line 3" in refused.stderr and refused.stdout == ""
    usage = await cli("codes", "assign", "cmp", batch["batch_id"])
    assert usage.exit_code == 2


async def test_codes_assign_a_file_of_affiliates(cli: Cli, tmp_path: Path) -> None:
    await campaign(cli)
    for affiliate in ("ann", "bob"):
        await cli.ok("affiliates", "create", "--id", affiliate, "--name", affiliate.title(), "--channel", "influencer")
    batch = await cli.json("codes", "generate", "cmp", "--count", "3", "--prefix", "INF")
    affiliates = tmp_path / "affiliates.csv"
    affiliates.write_text("\ufeffaffiliate_id\nann\nbob\n")
    first = (await cli.ok("codes", "assign", "cmp", batch["batch_id"], "--affiliates", str(affiliates))).splitlines()
    assert first[0] == "affiliate_id,code" and [line.split(",")[0] for line in first[1:]] == ["ann", "bob"]
    # The same file again hands out nothing new.
    again = (await cli.ok("codes", "assign", "cmp", batch["batch_id"], "--affiliates", str(affiliates))).splitlines()
    assert again == first
    ann_code = first[1].split(",")[1]
    shown = await cli.json("coupons", "show", "cmp", ann_code)
    assert shown["assigned_affiliate_id"] == "ann" and shown["affiliate_ids"] == ["ann"]
    one = await cli.json("codes", "assign", "cmp", batch["batch_id"], "--affiliate", "bob")
    assert one["code"] == first[2].split(",")[1]

    unknown = tmp_path / "unknown.csv"
    unknown.write_text("nobody\n")
    refused = await cli("codes", "assign", "cmp", batch["batch_id"], "--affiliates", str(unknown))
    assert refused.exit_code == 1 and "NOT_FOUND" in refused.stderr and "nobody" in refused.stderr
    both = await cli("codes", "assign", "cmp", batch["batch_id"], "cust-1", "--affiliate", "ann")
    assert both.exit_code == 2


async def test_the_cli_speaks_mutual_tls_with_the_services_settings(database_url: str, tmp_path: Path) -> None:
    ca = trustme.CA()
    files = {"ca": tmp_path / "ca.pem"}
    ca.cert_pem.write_to_path(str(files["ca"]))
    for name in ("attribution", "admin"):
        leaf = ca.issue_cert(name, "127.0.0.1")
        files[f"{name}.crt"] = tmp_path / f"{name}.crt"
        files[f"{name}.key"] = tmp_path / f"{name}.key"
        files[f"{name}.crt"].write_bytes(b"".join(blob.bytes() for blob in leaf.cert_chain_pems))
        leaf.private_key_pem.write_to_path(str(files[f"{name}.key"]))
    transport = Transport(tls=TlsSettings(
        cert_file=files["attribution.crt"], key_file=files["attribution.key"], ca_file=files["ca"], client_auth=True,
    ))
    service = await start_attribution(attribution_settings(database_url, "127.0.0.1:9", transport=transport))
    addr = f"127.0.0.1:{service.port}"

    async def run(env: dict[str, str | None]) -> Result:
        args = ["--addr", addr, "--timeout", "5", "campaigns", "list", "--format", "json"]
        return await asyncio.to_thread(CliRunner().invoke, app, args, env=env)

    try:
        mutual = await run({"ASCRIBE_TLS_CA": str(files["ca"]), "ASCRIBE_TLS_CERT": str(files["admin.crt"]),
                            "ASCRIBE_TLS_KEY": str(files["admin.key"])})
        assert (mutual.exit_code, json.loads(mutual.stdout)) == (0, []), mutual.output
        # Without a client certificate, or in plaintext, the server refuses: exit code 1.
        no_certificate = await run({"ASCRIBE_TLS_CA": str(files["ca"]), "ASCRIBE_TLS_CERT": None,
                                    "ASCRIBE_TLS_KEY": None})
        assert (no_certificate.exit_code, no_certificate.stdout) == (1, "")
        plaintext = await run({"ASCRIBE_TLS_CA": None})
        assert (plaintext.exit_code, plaintext.stdout) == (1, "")
        unreadable = await run({"ASCRIBE_TLS_CA": str(tmp_path / "missing.pem")})
        assert unreadable.exit_code == 2 and "missing.pem" in unreadable.stderr
    finally:
        await service.stop(0.5)


async def test_experiments_create_show_list_result_stop(cli: Cli) -> None:
    await campaign(cli)
    await cli.ok("coupons", "create", "cmp", "SUMMER10")
    created = await cli.json(
        "experiments", "create", "--campaign", "cmp", "--code", "summer10", "--holdout", "30", "--margin", "40",
        "--name", "summer holdout",
    )
    assert created["coupon_code"] == "SUMMER10" and created["holdout_percent"] == 30
    assert created["status"] == "EXPERIMENT_STATUS_RUNNING"
    again = await cli("experiments", "create", "--campaign", "cmp", "--code", "SUMMER10", "--holdout", "10")
    assert again.exit_code == 1 and "ALREADY_EXISTS" in again.stderr
    bad = await cli("experiments", "create", "--campaign", "cmp", "--code", "SUMMER10", "--holdout", "60")
    assert bad.exit_code == 2  # typer's range check, before any call
    assert (await cli.json("experiments", "show", created["id"]))["name"] == "summer holdout"
    rows = list(csv.DictReader(io.StringIO(await cli.ok("experiments", "list", "--campaign", "cmp", "-f", "csv"))))
    assert [r["id"] for r in rows] == [created["id"]]
    result = await cli.json("experiments", "result", created["id"], "--segment-by", "device")
    assert [a["arm"] for a in result["arms"]] == ["EXPERIMENT_ARM_TREATMENT", "EXPERIMENT_ARM_CONTROL"]
    assert result.get("ready", False) is False and result["currency"] == "EUR"
    assert "summer holdout" in await cli.ok("experiments", "result", created["id"])
    stopped = await cli.json("experiments", "stop", created["id"])
    assert stopped["status"] == "EXPERIMENT_STATUS_STOPPED"


async def test_webhooks_from_create_to_delete(cli: Cli) -> None:
    await campaign(cli)
    # An address literal: no lookup, and nothing is sent (the test runs no worker).
    created = await cli.json(
        "webhooks", "create", "--kind", "partner_postback", "--campaign-id", "cmp",
        "--url", "https://93.184.216.34/pb?o={order_id}&s={status}", "--event", "conversion.approved",
    )
    assert len(created["secret"]) >= 32 and created["http_method"] == "GET"
    webhook_id = created["id"]
    listed = await cli.json("webhooks", "list", "--campaign-id", "cmp")
    assert [w["id"] for w in listed] == [webhook_id] and listed[0]["secret"] == ""
    updated = await cli.json("webhooks", "update", webhook_id, "--disabled", "--event", "conversion.reversed")
    assert updated["enabled"] is False and updated["events"] == ["conversion.reversed"]
    delivery = await cli.json("webhooks", "test", webhook_id)
    assert delivery["event"] == "test"
    pending = await cli.json("webhooks", "deliveries", webhook_id, "--state", "pending")
    assert [d["id"] for d in pending] == [delivery["id"]]
    refused = await cli("webhooks", "create", "--kind", "events", "--url", "http://127.0.0.1/x", "--event", "coupon.held")
    assert refused.exit_code == 1 and "webhook.url" in refused.output
    deleted = await cli.json("webhooks", "delete", webhook_id)
    assert deleted["cancelled_deliveries"] == 1


async def test_coupons_validate_answers_a_checkout_in_each_format(cli: Cli) -> None:
    created = await campaign(cli)
    await cli.ok("coupons", "create", "cmp", "summer10", "--all-affiliates", "--usage-limit", "150",
                 "--min-order", "20.00", "--valid-until", "2099-01-01")
    cart = ("--amount", "49.90", "--currency", "EUR", "--ip", "203.0.113.4")
    answer = await cli.json("coupons", "validate", "cmp", "summer10", *cart)
    assert answer == {"valid": True, "reasons": [], "code": "SUMMER10", "kind": "general", "remaining": 150,
                      "valid_until": "2099-01-02T00:00:00Z"}
    small = await cli.json("coupons", "validate", "cmp", "SUMMER10", "--amount", "5", "--currency", "EUR")
    assert (small["valid"], small["reasons"]) == (False, ["below_min_order"])
    table = await cli.ok("coupons", "validate", "cmp", "NOPE", *cart)
    assert "unknown_coupon" in table and "no" in table
    rows = list(csv.DictReader(io.StringIO(await cli.ok("coupons", "validate", "cmp", "summer10", *cart, "-f", "csv"))))
    assert rows == [{"valid": "true", "reasons": "", "code": "SUMMER10", "kind": "general", "remaining": "150",
                     "valid_until": "2099-01-02T00:00:00Z"}]
    # The shop's postback token works without the admin token; a wrong one is refused (exit 1).
    by_token = await cli("coupons", "validate", "cmp", "summer10", *cart, "--token", created["postback_token"],
                         "-f", "json", token=None)
    assert by_token.exit_code == 0 and json.loads(by_token.stdout)["valid"] is True
    wrong = await cli("coupons", "validate", "cmp", "summer10", *cart, "--token", "wrong")
    assert wrong.exit_code == 1 and wrong.stdout == ""
    usage = await cli("coupons", "validate", "cmp", "summer10", "--amount", "lots", "--currency", "EUR")
    assert usage.exit_code == 2
