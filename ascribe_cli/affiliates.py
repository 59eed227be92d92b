"""``ascribe affiliates``: create, show, list and update affiliates."""

from __future__ import annotations

from typing import Annotated

import typer
from ascribe.attribution.v1 import attribution_pb2 as pb
from google.protobuf.field_mask_pb2 import FieldMask

from ascribe_cli.client import PAGE_SIZE, every_page
from ascribe_cli.common import Changes, FormatOption, PageSizeOption, connect
from ascribe_cli.output import Format, write_list, write_one
from ascribe_cli.values import AffiliateStatus

app = typer.Typer(help="Affiliates: the partners that promote campaigns.", no_args_is_help=True)

COLUMNS = ("id", "name", "channel", "status", "created_at")

IdArgument = Annotated[str, typer.Argument(help="the affiliate's id")]
ChannelHelp = "e.g. influencer, email, search, social (coupon channel rules and reports use it)"


@app.command()
def create(
    ctx: typer.Context,
    name: Annotated[str, typer.Option(help="the affiliate's name")],
    channel: Annotated[str, typer.Option(help=ChannelHelp)] = "",
    affiliate_id: Annotated[str, typer.Option("--id", help="the id (default: the server assigns one)")] = "",
    status: Annotated[AffiliateStatus | None, typer.Option(help="default active")] = None,
    fmt: FormatOption = Format.table,
) -> None:
    """Create an affiliate."""
    changes = Changes(pb.Affiliate(id=affiliate_id, name=name, channel=channel))
    changes.set("status", status)
    with connect(ctx) as client:
        created = client.call(client.catalog.CreateAffiliate, pb.CreateAffiliateRequest(affiliate=changes.message))
    write_one(created, fmt)


@app.command()
def show(ctx: typer.Context, affiliate_id: IdArgument, fmt: FormatOption = Format.table) -> None:
    """Show one affiliate."""
    with connect(ctx) as client:
        affiliate = client.call(client.catalog.GetAffiliate, pb.GetAffiliateRequest(affiliate_id=affiliate_id))
    write_one(affiliate, fmt)


@app.command("list")
def list_(ctx: typer.Context, fmt: FormatOption = Format.table, page_size: PageSizeOption = PAGE_SIZE) -> None:
    """List every affiliate (all pages)."""
    with connect(ctx) as client:

        def page(token: str) -> tuple[list[pb.Affiliate], str]:
            reply = client.call(
                client.catalog.ListAffiliates, pb.ListAffiliatesRequest(page_size=page_size, page_token=token)
            )
            return list(reply.affiliates), reply.next_page_token

        write_list(every_page(page), pb.Affiliate.DESCRIPTOR, fmt, COLUMNS)


@app.command()
def update(
    ctx: typer.Context,
    affiliate_id: IdArgument,
    status: Annotated[
        AffiliateStatus | None, typer.Option(help="paused: no conversion credits it any more; active: again")
    ] = None,
    name: Annotated[str | None, typer.Option(help="a new name")] = None,
    channel: Annotated[str | None, typer.Option(help=ChannelHelp)] = None,
    fmt: FormatOption = Format.table,
) -> None:
    """Change the given fields of an affiliate (pause a partner caught cheating)."""
    changes = Changes(pb.Affiliate(id=affiliate_id))
    changes.set("status", status)
    changes.set("name", name)
    changes.set("channel", channel)
    changes.require_some()
    request = pb.UpdateAffiliateRequest(affiliate=changes.message, update_mask=FieldMask(paths=changes.paths))
    with connect(ctx) as client:
        updated = client.call(client.catalog.UpdateAffiliate, request)
    write_one(updated, fmt)
