"""The admin CLI without a server: values people type, the three output formats, usage errors and help."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterator

import grpc
import pytest
import typer
from ascribe.attribution.v1 import attribution_pb2 as pb
from google.protobuf.timestamp_pb2 import Timestamp
from typer.main import get_command
from typer.testing import CliRunner

from ascribe_cli import output, values
from ascribe_cli.app import app
from ascribe_cli.client import RequestFailed, every_page, exported_codes
from ascribe_cli.output import Format

runner = CliRunner()


def at(text: str) -> Timestamp:
    stamp = Timestamp()
    stamp.FromJsonString(text)
    return stamp


# ---------------------------------------------------------------- values


@pytest.mark.parametrize(
    ("text", "micros"),
    [("0", 0), ("49.90", 49_900_000), ("0.1", 100_000), ("0.000001", 1), ("1234567.891234", 1_234_567_891_234),
     (" 5 ", 5_000_000)],
)
def test_money_is_exact_micros(text: str, micros: int) -> None:
    assert values.money_micros(text) == micros


@pytest.mark.parametrize("text", ["", "-1", "1e3", "0.0000001", "1,5", "nan", "inf", "1.", ".5", "9" * 20])
def test_money_refuses_what_is_not_an_exact_amount(text: str) -> None:
    with pytest.raises(ValueError):
        values.money_micros(text)


@pytest.mark.parametrize(("text", "bp"), [("10", 1000), ("12.5", 1250), ("0.01", 1), ("100", 10_000), ("7%", 700)])
def test_percent_is_basis_points(text: str, bp: int) -> None:
    assert values.percent_basis_points(text) == bp


@pytest.mark.parametrize("text", ["100.01", "0.001", "-5", "ten"])
def test_percent_refuses_bad_values(text: str) -> None:
    with pytest.raises(ValueError):
        values.percent_basis_points(text)


def test_a_date_starts_at_midnight_and_as_an_end_counts_whole() -> None:
    assert values.instant("2026-06-26").ToJsonString() == "2026-06-26T00:00:00Z"
    # The contract's example: "2025-06-26 to 2025-09-24" ends at 2025-09-25T00:00Z.
    assert values.instant("2025-09-24", end=True).ToJsonString() == "2025-09-25T00:00:00Z"
    assert values.instant("2026-12-31", end=True).ToJsonString() == "2027-01-01T00:00:00Z"
    assert values.instant("2028-02-28", end=True).ToJsonString() == "2028-02-29T00:00:00Z"


def test_rfc3339_times_are_kept_exactly_and_stored_in_utc() -> None:
    assert values.instant("2026-06-01T09:30:00Z").ToJsonString() == "2026-06-01T09:30:00Z"
    assert values.instant("2026-06-01T09:30:00+02:00").ToJsonString() == "2026-06-01T07:30:00Z"
    assert values.instant("2026-06-01t09:30:00.250z").ToJsonString() == "2026-06-01T09:30:00.250Z"
    # A time is a time: `end` moves only a date to the next day.
    assert values.instant("2026-06-01T09:30:00Z", end=True).ToJsonString() == "2026-06-01T09:30:00Z"


@pytest.mark.parametrize(
    "text", ["2026-02-30", "2026-06-01T09:30:00", "2026-06-01 09:30", "01.06.2026", "tomorrow", "2026-6-1"]
)
def test_times_without_a_date_or_an_offset_are_refused(text: str) -> None:
    with pytest.raises(ValueError):
        values.instant(text)


def test_every_word_enum_offers_exactly_its_proto_enum() -> None:
    for words, descriptor in values.PROTO_ENUMS.items():
        prefix = values.enum_prefix(descriptor)
        proto_words = {v.name.removeprefix(prefix).lower() for v in descriptor.values if v.number != 0}
        assert {w.value for w in words} == proto_words, words.__name__
        for word in words:
            assert values.enum_word(descriptor, values.enum_number(word)) == word.value


def test_an_enum_value_newer_than_the_stubs_shows_as_its_number() -> None:
    assert values.enum_word(pb.CouponStatus.DESCRIPTOR, 99) == "99"
    assert values.enum_word(pb.CouponStatus.DESCRIPTOR, 0) == ""


# ---------------------------------------------------------------- output


def campaign(**fields: object) -> pb.Campaign:
    base: dict[str, object] = {
        "id": "cmp", "name": "Summer", "landing_url": "https://shop.example/", "currency": "EUR",
        "payout_micros": 5_000_000, "hold_days": 30, "status": pb.CAMPAIGN_STATUS_ACTIVE,
        "created_at": at("2026-06-01T00:00:00Z"),
    }
    base.update(fields)
    return pb.Campaign(**base)  # type: ignore[arg-type]


def conversion() -> pb.Conversion:
    return pb.Conversion(
        id="c1", campaign_id="cmp", order_id="o-1", status=pb.CONVERSION_STATUS_FLAGGED,
        reasons=["coupon_on_hold", "fraud_vpn_ip"], amount_micros=49_900_000, currency="EUR",
        history=[pb.ConversionEvent(to_status=pb.CONVERSION_STATUS_FLAGGED, reason="judged", actor="shop")],
    )


@pytest.fixture
def captured(monkeypatch: pytest.MonkeyPatch) -> Iterator[io.StringIO]:
    out = io.StringIO()
    monkeypatch.setattr(output, "stdout", lambda: out)
    yield out


def test_json_list_is_one_array_of_proto_named_objects_with_int64_as_strings(captured: io.StringIO) -> None:
    count = output.write_list([campaign(), campaign(id="cmp2")], pb.Campaign.DESCRIPTOR, Format.json, ("id",))
    assert count == 2
    parsed = json.loads(captured.getvalue())
    assert [c["id"] for c in parsed] == ["cmp", "cmp2"]
    first = parsed[0]
    assert first["payout_micros"] == "5000000"  # int64: a string, as the proto3 JSON mapping writes it
    assert first["payout_percent_bp"] == 0  # int32: a number
    assert first["status"] == "CAMPAIGN_STATUS_ACTIVE"
    assert first["created_at"] == "2026-06-01T00:00:00Z"
    assert "click_lookback_days" not in first  # an unset optional field stays absent
    # Keys in the proto's field order, every field without presence printed.
    assert list(first) == [f.name for f in pb.Campaign.DESCRIPTOR.fields if f.name in first]
    assert {"postback_token", "reuse_unique_after_refund"} <= set(first)


def test_json_of_an_empty_list_is_an_empty_array(captured: io.StringIO) -> None:
    assert output.write_list([], pb.Campaign.DESCRIPTOR, Format.json, ("id",)) == 0
    assert json.loads(captured.getvalue()) == []


@pytest.mark.parametrize("fmt", list(Format))
def test_a_list_whose_first_page_is_refused_writes_nothing(captured: io.StringIO, fmt: Format) -> None:
    def refused() -> Iterator[pb.Campaign]:
        raise RequestFailed(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong bearer token")
        yield pb.Campaign()

    with pytest.raises(RequestFailed):
        output.write_list(refused(), pb.Campaign.DESCRIPTOR, fmt, ("id",))
    assert captured.getvalue() == ""


def test_json_of_one_record_is_one_object_with_nested_history(captured: io.StringIO) -> None:
    output.write_one(conversion(), Format.json)
    parsed = json.loads(captured.getvalue())
    assert parsed["order_id"] == "o-1"
    assert parsed["history"] == [
        {"from_status": "CONVERSION_STATUS_UNSPECIFIED", "to_status": "CONVERSION_STATUS_FLAGGED",
         "reason": "judged", "actor": "shop", "note": "", "amount_micros": "0"},
    ]


def test_csv_is_a_header_of_proto_field_names_then_rows(captured: io.StringIO) -> None:
    output.write_list([conversion(), conversion()], pb.Conversion.DESCRIPTOR, Format.csv, ("id",))
    rows = list(csv.reader(io.StringIO(captured.getvalue())))
    assert rows[0] == [f.name for f in pb.Conversion.DESCRIPTOR.fields]
    assert len(rows) == 3
    row = dict(zip(rows[0], rows[1], strict=True))
    assert row["reasons"] == "coupon_on_hold;fraud_vpn_ip"
    assert row["amount_micros"] == "49900000"
    assert row["coupon_remaining"] == ""
    assert json.loads(row["history"])[0]["reason"] == "judged"


def test_csv_of_one_record_is_a_header_and_one_row(captured: io.StringIO) -> None:
    output.write_one(campaign(name='Sale, "big"'), Format.csv)
    rows = list(csv.reader(io.StringIO(captured.getvalue())))
    assert len(rows) == 2
    assert dict(zip(rows[0], rows[1], strict=True))["name"] == 'Sale, "big"'


def test_tables_show_words_decimals_and_server_text_literally(captured: io.StringIO) -> None:
    output.write_one(campaign(name="[bold red]x[/bold red]", payout_percent_bp=0), Format.table)
    text = captured.getvalue()
    assert "[bold red]x[/bold red]" in text  # never read as rich markup
    assert "5.00" in text and "5000000" not in text
    assert "active" in text and "CAMPAIGN_STATUS" not in text


def test_table_money_and_percentages() -> None:
    assert output.money(49_900_000) == "49.90"
    assert output.money(5_000_000) == "5.00"
    assert output.money(1_234_567) == "1.234567"
    assert output.money(0) == "0.00"
    assert output.percent(1250) == "12.5%"
    assert output.percent(1000) == "10%"


def test_an_unlimited_coupon_reads_unlimited_in_a_table() -> None:
    coupon = pb.Coupon(code="SUMMER10", usage_limit=0)
    assert output.human(coupon, "remaining") == "unlimited"
    coupon.remaining = 3
    assert output.human(coupon, "remaining") == "3"


def test_every_page_is_followed() -> None:
    pages = {"": ([1, 2], "t1"), "t1": ([3], "t2"), "t2": ([], "")}
    assert list(every_page(lambda token: pages[token])) == [1, 2, 3]


def test_exported_codes_reads_the_codes_of_the_stream() -> None:
    chunks = [pb.ExportCodesChunk(codes=["A1B2", "C3D4"]), pb.ExportCodesChunk(), pb.ExportCodesChunk(codes=["E5F6"])]
    assert list(exported_codes(chunks)) == ["A1B2", "C3D4", "E5F6"]


# ---------------------------------------------------------------- usage (exit code 2) and help


UNREACHABLE = ["--addr", "127.0.0.1:9", "--timeout", "0.5"]


@pytest.mark.parametrize(
    "args",
    [
        ["coupons", "create", "cmp", "SUMMER10", "--valid-until", "2026-02-30"],
        ["coupons", "create", "cmp", "SUMMER10", "--valid-from", "next week"],
        ["coupons", "create", "cmp", "SUMMER10", "--discount", "4.999.5"],
        ["coupons", "create", "cmp", "SUMMER10", "--kind", "bogus"],
        ["coupons", "update", "cmp", "SUMMER10"],  # nothing to change
        ["campaigns", "create", "--name", "x", "--landing-url", "https://a.example/", "--currency", "EUR",
         "--payout", "1.5e3"],
        ["campaigns", "create", "--name", "x"],  # required options missing
        ["campaigns", "list", "--format", "xml"],
        ["campaigns", "list", "--page-size", "0"],
        ["conversions", "review", "cmp", "o-1"],  # neither --approve nor --reject
        ["conversions", "list", "cmp", "--from", "2026-13-01"],
        ["codes", "generate", "cmp"],  # --count missing
        ["codes", "generate", "cmp", "--count", "0"],
        ["codes", "export", "bat_1", "--format", "table"],
        ["campaigns", "show"],  # the id is missing
        ["nonsense"],
    ],
)
def test_bad_usage_exits_2_before_any_request(args: list[str]) -> None:
    # The address answers nothing: a request would fail with exit code 1, not 2.
    result = runner.invoke(app, [*UNREACHABLE, *args])
    assert result.exit_code == 2, result.output
    assert result.stdout == ""


def _commands(command: object, path: tuple[str, ...] = ()) -> Iterator[tuple[str, ...]]:
    yield path
    for name, sub in getattr(command, "commands", {}).items():
        yield from _commands(sub, (*path, name))


ALL_COMMANDS = list(_commands(get_command(app)))


def test_the_command_tree_is_what_the_readme_shows() -> None:
    leaves = {" ".join(path) for path in ALL_COMMANDS if len(path) == 2}
    assert leaves == {
        "campaigns create", "campaigns show", "campaigns list", "campaigns update",
        "affiliates create", "affiliates show", "affiliates list", "affiliates update",
        "coupons create", "coupons show", "coupons list", "coupons update",
        "codes generate", "codes export", "codes import", "codes assign",
        "conversions list", "conversions show", "conversions review",
        "experiments create", "experiments show", "experiments list", "experiments stop", "experiments result",
        "webhooks create", "webhooks show", "webhooks list", "webhooks update", "webhooks delete",
        "webhooks rotate-secret", "webhooks test", "webhooks deliveries", "webhooks redeliver",
    }


@pytest.mark.parametrize("path", ALL_COMMANDS, ids=lambda path: " ".join(path) or "ascribe")
def test_every_command_has_help(path: tuple[str, ...]) -> None:
    result = runner.invoke(app, [*path, "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage:" in result.stdout


def test_list_and_show_commands_take_every_format() -> None:
    for path in ALL_COMMANDS:
        if path and path[-1] in ("list", "show"):
            help_text = runner.invoke(app, [*path, "--help"], terminal_width=200).stdout
            assert "--format" in help_text, path
            assert "table" in help_text and "json" in help_text and "csv" in help_text, path


def test_the_root_reads_its_address_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[object] = []

    @app.command("probe-settings", hidden=True)
    def probe(ctx: typer.Context) -> None:
        seen.append(ctx.obj)

    try:
        monkeypatch.setenv("ASCRIBE_ATTRIBUTION_ADDR", "10.1.2.3:7000")
        monkeypatch.setenv("ASCRIBE_ADMIN_TOKEN", "s3cret")
        assert runner.invoke(app, ["probe-settings"]).exit_code == 0
        monkeypatch.delenv("ASCRIBE_ATTRIBUTION_ADDR")
        monkeypatch.delenv("ASCRIBE_ADMIN_TOKEN")
        assert runner.invoke(app, ["--timeout", "3", "probe-settings"]).exit_code == 0
    finally:
        app.registered_commands.pop()
    first, second = seen
    assert (first.addr, first.token, first.timeout) == ("10.1.2.3:7000", "s3cret", None)  # type: ignore[attr-defined]
    assert (second.addr, second.token, second.timeout) == ("127.0.0.1:50051", None, 3.0)  # type: ignore[attr-defined]

