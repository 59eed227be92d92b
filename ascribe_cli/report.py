"""``ascribe report``: what codes, affiliates, channels and countries earn, over any range."""

from __future__ import annotations

import csv
import json
from enum import StrEnum
from typing import Annotated, Any

import typer
from ascribe.attribution.v1 import attribution_pb2 as pb
from google.protobuf.timestamp_pb2 import Timestamp
from rich.table import Table
from rich.text import Text

from ascribe_cli.common import END_HELP, FROM, START_HELP, TO, FormatOption, connect
from ascribe_cli.output import Format, column_title, money, stdout, table_console
from ascribe_cli.values import Device

# Exports of this size take a while; the stream ends the call.
EXPORT_DEADLINE_SECONDS = 600.0


class Group(StrEnum):
    campaign = "campaign"
    coupon = "coupon"
    affiliate = "affiliate"
    channel = "channel"
    sub1 = "sub1"
    country = "country"
    device = "device"
    day = "day"
    hour = "hour"
    arm = "arm"  # with --experiment: treatment or control


def flat(row: pb.ReportRow, groups: list[str]) -> dict[str, Any]:
    """A row as one flat record: its keys, then every metric (money in micros)."""
    record: dict[str, Any] = {g: row.keys.get(g, "") for g in groups}
    for field in pb.ReportMetrics.DESCRIPTOR.fields:
        record[field.name] = getattr(row.metrics, field.name)
    if row.HasField("pace"):
        record["remaining"] = row.pace.remaining
        record["uses_per_day"] = row.pace.uses_per_day
        at = row.pace.exhausted_at_forecast
        record["exhausted_at_forecast"] = at.ToJsonString() if row.pace.HasField("exhausted_at_forecast") else ""
        record["exhausted_before_valid_until"] = row.pace.exhausted_before_valid_until
    return record


def _cell(name: str, value: Any) -> str:
    if name.endswith("_micros") and isinstance(value, int):
        return money(value)
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def report(
    ctx: typer.Context,
    start: Annotated[Timestamp, typer.Option("--from", parser=FROM, metavar="TIME", help=f"from (inclusive): {START_HELP}")],
    end: Annotated[Timestamp, typer.Option("--to", parser=TO, metavar="TIME", help=f"to (exclusive): {END_HELP}")],
    group_by: Annotated[list[Group] | None, typer.Option("--group-by", "-g", help="a group; repeat for several")] = None,
    time_zone: Annotated[str, typer.Option("--tz", help="IANA zone of days and hours (default UTC)")] = "",
    campaign_id: Annotated[str, typer.Option("--campaign", metavar="ID")] = "",
    affiliate_id: Annotated[str, typer.Option("--affiliate", metavar="ID")] = "",
    coupon_code: Annotated[str, typer.Option("--coupon", metavar="CODE")] = "",
    country: Annotated[str, typer.Option(metavar="CC", help="ISO 3166-1 alpha-2")] = "",
    device: Annotated[Device | None, typer.Option()] = None,
    sub1: Annotated[str, typer.Option(metavar="SUB1")] = "",
    experiment_id: Annotated[
        str, typer.Option("--experiment", metavar="ID", help="only this experiment's clicks and conversions")
    ] = "",
    fmt: FormatOption = Format.table,
) -> None:
    """Report clicks, conversions and money over [--from, --to), by any groups (streamed: any size)."""
    groups = [g.value for g in group_by or []]
    request = pb.ExportReportRequest(
        to=end,
        group_by=[pb.ReportGroupBy.Value(f"REPORT_GROUP_BY_{g.upper()}") for g in groups],
        time_zone=time_zone,
        campaign_id=campaign_id,
        affiliate_id=affiliate_id,
        coupon_code=coupon_code,
        country=country,
        device_type=pb.DeviceType.Value(f"DEVICE_TYPE_{device.value.upper()}") if device else pb.DEVICE_TYPE_UNSPECIFIED,
        sub1=sub1,
        experiment_id=experiment_id,
    )
    getattr(request, "from").CopyFrom(start)
    with connect(ctx) as client:
        records = [
            flat(row, groups)
            for chunk in client.stream(client.reports.ExportReport, request, client.deadline(EXPORT_DEADLINE_SECONDS))
            for row in chunk.rows
        ]
    out = stdout()
    # Every record's columns: only limited codes' rows carry the pace, and a row without it may come first.
    columns = list(dict.fromkeys(name for record in records for name in record)) if records else [
        *groups, *(f.name for f in pb.ReportMetrics.DESCRIPTOR.fields)
    ]
    if fmt is Format.json:
        out.write(json.dumps(records, indent=2, ensure_ascii=False) + "\n")
    elif fmt is Format.csv:
        writer = csv.DictWriter(out, fieldnames=columns, lineterminator="\n")
        writer.writeheader()
        writer.writerows(records)
    else:
        table = Table(header_style="bold")
        for name in columns:
            table.add_column(column_title(name), overflow="fold")
        for record in records:
            table.add_row(*(Text(_cell(name, record.get(name, ""))) for name in columns))
        table_console(out).print(table)
