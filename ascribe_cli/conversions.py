"""``ascribe conversions``: the reviewers' queue, one conversion's history, and the review itself."""

from __future__ import annotations

from typing import Annotated

import typer
from ascribe.attribution.v1 import attribution_pb2 as pb
from google.protobuf.timestamp_pb2 import Timestamp

from ascribe_cli.client import PAGE_SIZE, every_page
from ascribe_cli.common import END_HELP, FROM, START_HELP, TO, Changes, FormatOption, PageSizeOption, connect
from ascribe_cli.output import Format, write_list, write_one
from ascribe_cli.values import ConversionStatus

app = typer.Typer(help="Conversions: list, show with history, review flagged ones.", no_args_is_help=True)

COLUMNS = (
    "order_id", "status", "reasons", "affiliate_id", "source", "coupon_code", "amount_micros",
    "payout_micros", "currency", "received_at",
)

CampaignArgument = Annotated[str, typer.Argument(help="the conversion's campaign")]
OrderArgument = Annotated[str, typer.Argument(help="the shop's order id")]


@app.command("list")
def list_(
    ctx: typer.Context,
    campaign_id: CampaignArgument,
    status: Annotated[ConversionStatus | None, typer.Option(help="only this status (flagged: the review queue)")] = None,
    affiliate_id: Annotated[str | None, typer.Option("--affiliate", metavar="ID", help="only conversions credited to it")] = None,
    received_from: Annotated[
        Timestamp | None, typer.Option("--from", parser=FROM, metavar="TIME", help=f"received at or after: {START_HELP}")
    ] = None,
    received_to: Annotated[
        Timestamp | None, typer.Option("--to", parser=TO, metavar="TIME", help=f"received before: {END_HELP}")
    ] = None,
    fmt: FormatOption = Format.table,
    page_size: PageSizeOption = PAGE_SIZE,
) -> None:
    """List a campaign's conversions (all pages), by status, credited affiliate and time received."""
    filters = Changes(pb.ListConversionsRequest(campaign_id=campaign_id, page_size=page_size))
    filters.set("status", status)
    filters.set("affiliate_id", affiliate_id)
    filters.set("from", received_from)
    filters.set("to", received_to)
    with connect(ctx) as client:

        def page(token: str) -> tuple[list[pb.Conversion], str]:
            request = pb.ListConversionsRequest()
            request.CopyFrom(filters.message)
            request.page_token = token
            reply = client.call(client.tracking.ListConversions, request)
            return list(reply.conversions), reply.next_page_token

        write_list(every_page(page), pb.Conversion.DESCRIPTOR, fmt, COLUMNS)


@app.command()
def show(ctx: typer.Context, campaign_id: CampaignArgument, order_id: OrderArgument, fmt: FormatOption = Format.table) -> None:
    """Show one conversion with its history."""
    with connect(ctx) as client:
        conversion = client.call(
            client.tracking.GetConversion, pb.GetConversionRequest(campaign_id=campaign_id, order_id=order_id)
        )
    write_one(conversion, fmt)


@app.command()
def review(
    ctx: typer.Context,
    campaign_id: CampaignArgument,
    order_id: OrderArgument,
    approve: Annotated[
        bool | None,
        typer.Option("--approve/--reject", show_default=False, help="the decision on a flagged conversion (required)"),
    ] = None,
    note: Annotated[str, typer.Option(help="why, kept in the conversion's history")] = "",
    fmt: FormatOption = Format.table,
) -> None:
    """Approve or reject a FLAGGED conversion (anything else is refused)."""
    if approve is None:
        raise typer.BadParameter("say --approve or --reject", param_hint="'--approve' / '--reject'")
    request = pb.ReviewConversionRequest(campaign_id=campaign_id, order_id=order_id, approve=approve, note=note)
    with connect(ctx) as client:
        conversion = client.call(client.tracking.ReviewConversion, request)
    write_one(conversion, fmt)
