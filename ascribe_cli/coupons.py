"""``ascribe coupons``: create, show, list and update coupon codes.

The options that set a code's rules (window, limits, affiliates, discount,
restrictions) are declared once here; ``codes generate`` takes the same ones
for its template.
"""

from __future__ import annotations

import csv
import json
from enum import StrEnum
from typing import Annotated

import typer
from ascribe.attribution.v1 import attribution_pb2 as pb
from google.protobuf.field_mask_pb2 import FieldMask
from rich.table import Table
from rich.text import Text

from ascribe_cli.client import PAGE_SIZE, every_page
from ascribe_cli.common import (
    END,
    END_HELP,
    MONEY,
    MONEY_HELP,
    PERCENT,
    PERCENT_HELP,
    START,
    START_HELP,
    Bound,
    Changes,
    FormatOption,
    PageSizeOption,
    connect,
)
from ascribe_cli.output import Format, csv_cell, human, stdout, table_console, write_list, write_one
from ascribe_cli.values import CouponKind, CouponStatus, Device, enum_number

app = typer.Typer(help="Coupon codes of a campaign, with their rules.", no_args_is_help=True)

COLUMNS = (
    "code", "kind", "status", "valid_from", "valid_until", "used", "remaining", "affiliate_ids", "batch_id",
)

CampaignArgument = Annotated[str, typer.Argument(help="the code's campaign")]
CodeArgument = Annotated[str, typer.Argument(help="the code (any case)")]

StatusOption = Annotated[
    CouponStatus | None,
    typer.Option(help="active redeems; hold flags conversions for review; pending, rejected, paused refuse them"),
]
ValidFromOption = Annotated[
    Bound | None, typer.Option(parser=START, metavar="TIME", help=f"first moment the code is valid: {START_HELP}; none: no start")
]
ValidUntilOption = Annotated[
    Bound | None, typer.Option(parser=END, metavar="TIME", help=f"end of validity (exclusive): {END_HELP}; none: no end")
]
PerCustomerOption = Annotated[
    int | None, typer.Option(min=0, help="uses per customer id (0: no limit; then a customer id is optional)")
]
AffiliateOption = Annotated[
    list[str] | None, typer.Option("--affiliate", metavar="ID", help="an affiliate that may carry the code (repeat; the first owns it)")
]
AllAffiliatesOption = Annotated[
    bool | None, typer.Option("--all-affiliates/--selected-affiliates", show_default=False,
                              help="every affiliate may carry the code, or only those given with --affiliate")
]
DiscountOption = Annotated[int | None, typer.Option("--discount", parser=MONEY, metavar="AMOUNT", help=f"fixed discount: {MONEY_HELP}")]
DiscountPercentOption = Annotated[
    int | None, typer.Option("--discount-percent", parser=PERCENT, metavar="PERCENT", help=f"discount as {PERCENT_HELP}")
]
CountryOption = Annotated[list[str] | None, typer.Option("--country", metavar="CC", help="an allowed ISO country, e.g. DE (repeat)")]
DeviceOption = Annotated[list[Device] | None, typer.Option("--device", help="an allowed device (repeat)")]
ChannelOption = Annotated[list[str] | None, typer.Option("--channel", metavar="CHANNEL", help="an allowed affiliate channel (repeat)")]
SkuOption = Annotated[list[str] | None, typer.Option("--sku", metavar="SKU", help="the order must hold one of these SKUs (repeat)")]
MinOrderOption = Annotated[int | None, typer.Option("--min-order", parser=MONEY, metavar="AMOUNT", help=f"minimum order: {MONEY_HELP}")]
CustomerOption = Annotated[
    str | None, typer.Option("--customer", metavar="ID", help="the one customer id the code redeems for (a personal code)")
]


class ListField(StrEnum):
    """Lists an update can empty with --clear."""

    affiliate_ids = "affiliate_ids"
    countries = "countries"
    device_types = "device_types"
    channels = "channels"
    skus = "skus"


def apply_rules(
    changes: Changes[pb.Coupon],
    *,
    status: CouponStatus | None,
    valid_from: Bound | None,
    valid_until: Bound | None,
    per_customer_limit: int | None,
    affiliates: list[str] | None,
    all_affiliates: bool | None,
    discount: int | None,
    discount_percent: int | None,
    countries: list[str] | None,
    devices: list[Device] | None,
    channels: list[str] | None,
    skus: list[str] | None,
    min_order: int | None,
    customer: str | None,
) -> None:
    """The rule options of a code, on a new code, a template or an update."""
    changes.set("status", status)
    changes.set("valid_from", valid_from)
    changes.set("valid_until", valid_until)
    changes.set("per_customer_limit", per_customer_limit)
    changes.set("affiliate_ids", affiliates)
    changes.set("allow_all_affiliates", all_affiliates)
    # A code discounts one way: choosing one clears the other, as for payouts.
    if discount is not None:
        changes.set("discount_micros", discount)
        changes.set("discount_percent_bp", discount_percent if discount_percent is not None else 0)
    elif discount_percent is not None:
        changes.set("discount_percent_bp", discount_percent)
        changes.set("discount_micros", 0)
    changes.set("countries", countries)
    changes.set("device_types", devices)
    changes.set("channels", channels)
    changes.set("skus", skus)
    changes.set("min_order_micros", min_order)
    changes.set("assigned_customer_id", customer)


@app.command()
def create(
    ctx: typer.Context,
    campaign_id: CampaignArgument,
    code: Annotated[str, typer.Argument(help="3 to 64 of A-Z 0-9 - _ (stored upper-case)")],
    kind: Annotated[
        CouponKind, typer.Option(help="general: public; exclusive: owned by --affiliate; unique: single-use")
    ] = CouponKind.general,
    usage_limit: Annotated[int | None, typer.Option(min=0, help="uses in total (0: unlimited; unique: 1)")] = None,
    status: StatusOption = None,
    valid_from: ValidFromOption = None,
    valid_until: ValidUntilOption = None,
    per_customer_limit: PerCustomerOption = None,
    affiliates: AffiliateOption = None,
    all_affiliates: AllAffiliatesOption = None,
    discount: DiscountOption = None,
    discount_percent: DiscountPercentOption = None,
    countries: CountryOption = None,
    devices: DeviceOption = None,
    channels: ChannelOption = None,
    skus: SkuOption = None,
    min_order: MinOrderOption = None,
    customer: CustomerOption = None,
    fmt: FormatOption = Format.table,
) -> None:
    """Create a coupon code in a campaign."""
    changes = Changes(pb.Coupon(campaign_id=campaign_id, code=code))
    changes.set("kind", kind)
    changes.set("usage_limit", usage_limit)
    apply_rules(
        changes, status=status, valid_from=valid_from, valid_until=valid_until,
        per_customer_limit=per_customer_limit, affiliates=affiliates, all_affiliates=all_affiliates,
        discount=discount, discount_percent=discount_percent, countries=countries, devices=devices,
        channels=channels, skus=skus, min_order=min_order, customer=customer,
    )
    with connect(ctx) as client:
        created = client.call(client.catalog.CreateCoupon, pb.CreateCouponRequest(coupon=changes.message))
    write_one(created, fmt)


@app.command()
def show(ctx: typer.Context, campaign_id: CampaignArgument, code: CodeArgument, fmt: FormatOption = Format.table) -> None:
    """Show one coupon code with its uses."""
    with connect(ctx) as client:
        coupon = client.call(client.catalog.GetCoupon, pb.GetCouponRequest(campaign_id=campaign_id, code=code))
    write_one(coupon, fmt)


@app.command("list")
def list_(
    ctx: typer.Context,
    campaign_id: CampaignArgument,
    status: Annotated[CouponStatus | None, typer.Option(help="only codes in this status")] = None,
    fmt: FormatOption = Format.table,
    page_size: PageSizeOption = PAGE_SIZE,
) -> None:
    """List every code of a campaign (all pages), ordered by code."""
    filters = Changes(pb.ListCouponsRequest(campaign_id=campaign_id, page_size=page_size))
    filters.set("status", status)
    with connect(ctx) as client:

        def page(token: str) -> tuple[list[pb.Coupon], str]:
            request = pb.ListCouponsRequest()
            request.CopyFrom(filters.message)
            request.page_token = token
            reply = client.call(client.catalog.ListCoupons, request)
            return list(reply.coupons), reply.next_page_token

        write_list(every_page(page), pb.Coupon.DESCRIPTOR, fmt, COLUMNS)


@app.command()
def update(
    ctx: typer.Context,
    campaign_id: CampaignArgument,
    code: CodeArgument,
    status: StatusOption = None,
    kind: Annotated[CouponKind | None, typer.Option(help="general, exclusive or unique")] = None,
    usage_limit: Annotated[
        int | None, typer.Option(min=0, help="uses in total (0: unlimited); below the uses taken is refused")
    ] = None,
    valid_from: ValidFromOption = None,
    valid_until: ValidUntilOption = None,
    per_customer_limit: PerCustomerOption = None,
    affiliates: AffiliateOption = None,
    all_affiliates: AllAffiliatesOption = None,
    discount: DiscountOption = None,
    discount_percent: DiscountPercentOption = None,
    countries: CountryOption = None,
    devices: DeviceOption = None,
    channels: ChannelOption = None,
    skus: SkuOption = None,
    min_order: MinOrderOption = None,
    customer: CustomerOption = None,
    clear: Annotated[list[ListField] | None, typer.Option("--clear", help="empty this list (repeat)")] = None,
    fmt: FormatOption = Format.table,
) -> None:
    """Change the given fields of a code: hold it, pause it, move its window, change its limits."""
    changes = Changes(pb.Coupon(campaign_id=campaign_id, code=code))
    for name in clear or ():
        changes.set(name.value, [])
    changes.set("kind", kind)
    changes.set("usage_limit", usage_limit)
    apply_rules(
        changes, status=status, valid_from=valid_from, valid_until=valid_until,
        per_customer_limit=per_customer_limit, affiliates=affiliates, all_affiliates=all_affiliates,
        discount=discount, discount_percent=discount_percent, countries=countries, devices=devices,
        channels=channels, skus=skus, min_order=min_order, customer=customer,
    )
    changes.require_some()
    request = pb.UpdateCouponRequest(coupon=changes.message, update_mask=FieldMask(paths=changes.paths))
    with connect(ctx) as client:
        updated = client.call(client.catalog.UpdateCoupon, request)
    write_one(updated, fmt)


VALIDATION_COLUMNS = ("valid", "reasons", "code", "kind", "remaining", "valid_until")


@app.command()
def validate(
    ctx: typer.Context,
    campaign_id: CampaignArgument,
    code: CodeArgument,
    amount: Annotated[int, typer.Option(parser=MONEY, metavar="AMOUNT", help=f"the cart subtotal before the discount: {MONEY_HELP}")],
    currency: Annotated[str, typer.Option(help="ISO 4217 code of the cart, e.g. EUR")],
    customer: Annotated[str, typer.Option(help="the shop's customer id (per-customer limits, assigned codes)")] = "",
    sku: Annotated[list[str] | None, typer.Option("--sku", help="a SKU in the cart (repeat)")] = None,
    country: Annotated[str, typer.Option(help="the customer's country (ISO 3166-1 alpha-2)")] = "",
    device: Annotated[Device | None, typer.Option(help="the customer's device")] = None,
    ip: Annotated[str, typer.Option(help="the customer's IP: unknown codes are counted against it")] = "",
    affiliate: Annotated[str, typer.Option(help="the affiliate the customer came from")] = "",
    click: Annotated[str, typer.Option(help="the click id from the landing URL")] = "",
    token: Annotated[
        str, typer.Option(envvar="ASCRIBE_POSTBACK_TOKEN", help="the campaign's postback token (else the admin token)")
    ] = "",
    fmt: FormatOption = Format.table,
) -> None:
    """Would this code be accepted for this cart? A checkout's dry run: no use is taken."""
    request = pb.ValidateCouponRequest(
        campaign_id=campaign_id, code=code, amount_micros=amount, currency=currency, customer_id=customer,
        skus=sku or [], country=country, ip=ip, affiliate_id=affiliate, click_id=click, postback_token=token,
    )
    if device is not None:
        request.device_type = enum_number(device)  # type: ignore[assignment]
    with connect(ctx) as client:
        answer = client.call(client.catalog.ValidateCoupon, request)
    # One flat record: the answer and what a checkout shows of the code.
    flat = pb.Coupon()
    flat.CopyFrom(answer.coupon)
    row = {
        "valid": answer.valid,
        "reasons": list(answer.reasons),
        "code": flat.code,
        "kind": human(flat, "kind") if answer.HasField("coupon") else "",
        "remaining": (flat.remaining if flat.HasField("remaining") else None) if answer.HasField("coupon") else None,
        "valid_until": human(flat, "valid_until"),
    }
    out = stdout()
    if fmt is Format.json:
        out.write(json.dumps(row, indent=2, ensure_ascii=False) + "\n")
    elif fmt is Format.csv:
        writer = csv.writer(out)
        writer.writerow(VALIDATION_COLUMNS)
        writer.writerow([csv_cell(row[name]) for name in VALIDATION_COLUMNS])
    else:
        shown = dict(row, valid="yes" if answer.valid else "no", reasons=", ".join(answer.reasons))
        if answer.HasField("coupon") and shown["remaining"] is None:
            shown["remaining"] = "unlimited"
        table = Table(show_header=False)
        table.add_column(style="bold")
        table.add_column(overflow="fold")
        for name in VALIDATION_COLUMNS:
            value = shown[name]
            table.add_row(Text(name), Text("" if value is None else str(value)))
        table_console(out).print(table)
