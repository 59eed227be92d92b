"""``ascribe campaigns``: create, show, list and update campaigns."""

from __future__ import annotations

from typing import Annotated

import typer
from ascribe.attribution.v1 import attribution_pb2 as pb
from google.protobuf.field_mask_pb2 import FieldMask

from ascribe_cli.client import PAGE_SIZE, every_page
from ascribe_cli.common import (
    MONEY,
    MONEY_HELP,
    PERCENT,
    PERCENT_HELP,
    Changes,
    FormatOption,
    PageSizeOption,
    connect,
)
from ascribe_cli.output import Format, write_list, write_one
from ascribe_cli.values import CampaignStatus, Policy

app = typer.Typer(help="Campaigns: where clicks land and how conversions pay.", no_args_is_help=True)

COLUMNS = ("id", "name", "status", "currency", "payout_micros", "payout_percent_bp", "hold_days", "landing_url")

IdArgument = Annotated[str, typer.Argument(help="the campaign's id")]
PayoutOption = Annotated[int | None, typer.Option("--payout", parser=MONEY, metavar="AMOUNT", help=f"fixed payout per conversion: {MONEY_HELP}")]
PayoutPercentOption = Annotated[
    int | None, typer.Option("--payout-percent", parser=PERCENT, metavar="PERCENT", help=f"payout as a share of the amount: {PERCENT_HELP}")
]
HoldDaysOption = Annotated[int | None, typer.Option(min=0, help="days before a conversion is approved (default 30)")]
LookbackOption = Annotated[int | None, typer.Option(min=1, help="how old a click or order may be, in days (default 30)")]
MaxPerClickOption = Annotated[
    int | None, typer.Option(min=0, help="live conversions one click may earn (default 1; 0: no limit)")
]
PolicyOption = Annotated[Policy | None, typer.Option(help="who wins when click and code disagree (default coupon_first)")]


def _payout(changes: Changes[pb.Campaign], payout: int | None, payout_percent: int | None) -> None:
    # A campaign pays one way: choosing one clears the other, unless both
    # were given (then the server says which one is wrong).
    if payout is not None:
        changes.set("payout_micros", payout)
        changes.set("payout_percent_bp", payout_percent if payout_percent is not None else 0)
    elif payout_percent is not None:
        changes.set("payout_percent_bp", payout_percent)
        changes.set("payout_micros", 0)


@app.command()
def create(
    ctx: typer.Context,
    name: Annotated[str, typer.Option(help="the campaign's name")],
    landing_url: Annotated[str, typer.Option(help="the http(s) URL every click redirects to")],
    currency: Annotated[str, typer.Option(help="ISO 4217 code of the campaign's money, e.g. EUR")],
    campaign_id: Annotated[str, typer.Option("--id", help="the id (default: the server assigns one)")] = "",
    payout: PayoutOption = None,
    payout_percent: PayoutPercentOption = None,
    hold_days: HoldDaysOption = None,
    click_lookback_days: LookbackOption = None,
    max_conversions_per_click: MaxPerClickOption = None,
    policy: PolicyOption = None,
    reuse_unique_after_refund: Annotated[
        bool, typer.Option(help="a refunded UNIQUE code becomes usable again")
    ] = False,
    status: Annotated[CampaignStatus | None, typer.Option(help="default active")] = None,
    fmt: FormatOption = Format.table,
) -> None:
    """Create a campaign. Its postback token is shown this once (the shop sends it with each postback)."""
    changes = Changes(pb.Campaign(id=campaign_id, name=name, landing_url=landing_url, currency=currency))
    _payout(changes, payout, payout_percent)
    changes.set("hold_days", hold_days)
    changes.set("click_lookback_days", click_lookback_days)
    changes.set("max_conversions_per_click", max_conversions_per_click)
    changes.set("attribution_policy", policy)
    changes.set("reuse_unique_after_refund", reuse_unique_after_refund or None)
    changes.set("status", status)
    with connect(ctx) as client:
        created = client.call(client.catalog.CreateCampaign, pb.CreateCampaignRequest(campaign=changes.message))
    write_one(created, fmt)


@app.command()
def show(ctx: typer.Context, campaign_id: IdArgument, fmt: FormatOption = Format.table) -> None:
    """Show one campaign."""
    with connect(ctx) as client:
        campaign = client.call(client.catalog.GetCampaign, pb.GetCampaignRequest(campaign_id=campaign_id))
    write_one(campaign, fmt)


@app.command("list")
def list_(ctx: typer.Context, fmt: FormatOption = Format.table, page_size: PageSizeOption = PAGE_SIZE) -> None:
    """List every campaign (all pages)."""
    with connect(ctx) as client:

        def page(token: str) -> tuple[list[pb.Campaign], str]:
            reply = client.call(
                client.catalog.ListCampaigns, pb.ListCampaignsRequest(page_size=page_size, page_token=token)
            )
            return list(reply.campaigns), reply.next_page_token

        write_list(every_page(page), pb.Campaign.DESCRIPTOR, fmt, COLUMNS)


@app.command()
def update(
    ctx: typer.Context,
    campaign_id: IdArgument,
    status: Annotated[CampaignStatus | None, typer.Option(help="pause, activate or end the campaign")] = None,
    name: Annotated[str | None, typer.Option(help="a new name")] = None,
    landing_url: Annotated[str | None, typer.Option(help="a new landing URL")] = None,
    currency: Annotated[str | None, typer.Option(help="a new ISO 4217 currency")] = None,
    payout: PayoutOption = None,
    payout_percent: PayoutPercentOption = None,
    hold_days: HoldDaysOption = None,
    click_lookback_days: LookbackOption = None,
    max_conversions_per_click: MaxPerClickOption = None,
    policy: PolicyOption = None,
    reuse_unique_after_refund: Annotated[
        bool | None, typer.Option("--reuse-unique-after-refund/--no-reuse-unique-after-refund", show_default=False)
    ] = None,
    fmt: FormatOption = Format.table,
) -> None:
    """Change the given fields of a campaign (only those: an update mask names them)."""
    changes = Changes(pb.Campaign(id=campaign_id))
    changes.set("status", status)
    changes.set("name", name)
    changes.set("landing_url", landing_url)
    changes.set("currency", currency)
    _payout(changes, payout, payout_percent)
    changes.set("hold_days", hold_days)
    changes.set("click_lookback_days", click_lookback_days)
    changes.set("max_conversions_per_click", max_conversions_per_click)
    changes.set("attribution_policy", policy)
    changes.set("reuse_unique_after_refund", reuse_unique_after_refund)
    changes.require_some()
    request = pb.UpdateCampaignRequest(campaign=changes.message, update_mask=FieldMask(paths=changes.paths))
    with connect(ctx) as client:
        updated = client.call(client.catalog.UpdateCampaign, request)
    write_one(updated, fmt)
