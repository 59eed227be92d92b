"""``ascribe codes``: generate batches of UNIQUE codes and export them.

GenerateCodes is one unary call: the server reports nothing until the whole
batch is committed, so ``generate`` shows an indeterminate progress bar with
the elapsed time while it waits, then the final count and rate. ``export``
counts the codes as they stream in.

Progress goes to stderr (and only to a terminal); stdout holds only the
answer, so ``ascribe codes export BATCH > codes.csv`` is the file alone.
"""

from __future__ import annotations

import json
import time
from enum import StrEnum
from typing import Annotated

import typer
from ascribe.attribution.v1 import attribution_pb2 as pb
from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from ascribe_cli.client import BULK_DEADLINE_SECONDS, exported_codes
from ascribe_cli.common import Changes, FormatOption, connect
from ascribe_cli.coupons import (
    AllAffiliatesOption,
    ChannelOption,
    CountryOption,
    DeviceOption,
    DiscountOption,
    DiscountPercentOption,
    MinOrderOption,
    PerCustomerOption,
    SkuOption,
    StatusOption,
    ValidFromOption,
    ValidUntilOption,
    apply_rules,
)
from ascribe_cli.output import Format, stderr_console, stdout, write_one
from ascribe_cli.values import CouponKind

app = typer.Typer(help="Batches of generated UNIQUE codes.", no_args_is_help=True)

# Progress is redrawn this often while a call runs, and an export's count
# every this many codes (a redraw per code would cost more than the code).
POLL_SECONDS = 0.1
EXPORT_COUNT_STEP = 4096


class ExportFormat(StrEnum):
    csv = "csv"
    jsonl = "jsonl"


def _rate(count: int, seconds: float) -> str:
    return f"{count / seconds:,.0f} codes/s" if seconds > 0 else "-"


@app.command()
def generate(
    ctx: typer.Context,
    campaign_id: Annotated[str, typer.Argument(help="the campaign the codes belong to")],
    count: Annotated[int, typer.Option(min=1, max=1_000_000, help="how many codes")],
    prefix: Annotated[str, typer.Option(help="the start of every code (A-Z 0-9 - _)")] = "",
    length: Annotated[int | None, typer.Option(min=1, help="random characters after the prefix (server default 10)")] = None,
    owner: Annotated[str | None, typer.Option("--affiliate", metavar="ID", help="the affiliate that owns every code")] = None,
    status: StatusOption = None,
    valid_from: ValidFromOption = None,
    valid_until: ValidUntilOption = None,
    per_customer_limit: PerCustomerOption = None,
    all_affiliates: AllAffiliatesOption = None,
    discount: DiscountOption = None,
    discount_percent: DiscountPercentOption = None,
    countries: CountryOption = None,
    devices: DeviceOption = None,
    channels: ChannelOption = None,
    skus: SkuOption = None,
    min_order: MinOrderOption = None,
    fmt: FormatOption = Format.table,
) -> None:
    """Generate a batch of single-use UNIQUE codes that share the given rules; prints the batch id."""
    template = Changes(pb.Coupon(campaign_id=campaign_id))
    template.set("kind", CouponKind.unique)
    apply_rules(
        template, status=status, valid_from=valid_from, valid_until=valid_until,
        per_customer_limit=per_customer_limit, affiliates=[owner] if owner else None,
        all_affiliates=all_affiliates, discount=discount, discount_percent=discount_percent,
        countries=countries, devices=devices, channels=channels, skus=skus, min_order=min_order, customer=None,
    )
    request = pb.GenerateCodesRequest(template=template.message, count=count, prefix=prefix, length=length or 0)
    console = stderr_console()
    with connect(ctx) as client:
        started = time.monotonic()
        call = client.start(client.catalog.GenerateCodes, request, client.deadline(BULK_DEADLINE_SECONDS))
        columns = (
            SpinnerColumn(), TextColumn(f"generating {count:,} codes"), BarColumn(), TimeElapsedColumn(),
        )
        try:
            with Progress(*columns, console=console, transient=True, disable=not console.is_terminal) as progress:
                progress.add_task("generate", total=None)
                while (reply := call.answer()) is None:
                    time.sleep(POLL_SECONDS)
        except KeyboardInterrupt:
            call.cancel()  # the server rolls the batch back: none of its codes stays
            raise
        seconds = time.monotonic() - started
    console.print(
        f"generated {reply.generated:,} codes in {seconds:.2f} s ({_rate(reply.generated, seconds)}); "
        f"batch {reply.batch_id}",
        markup=False,
    )
    write_one(reply, fmt)


@app.command()
def export(
    ctx: typer.Context,
    batch_id: Annotated[str, typer.Argument(help="the batch id that generate printed")],
    fmt: Annotated[
        ExportFormat, typer.Option("--format", "-f", help="csv: a 'code' header, then one code a line; jsonl: {\"code\": ...} a line")
    ] = ExportFormat.csv,
) -> None:
    """Write every code of a batch to stdout, as it streams from the server."""
    out = stdout()
    console = stderr_console()
    count = 0
    started = time.monotonic()
    columns = (SpinnerColumn(), TextColumn("exported {task.completed:,.0f} codes"), TimeElapsedColumn())
    with (
        connect(ctx) as client,
        Progress(*columns, console=console, transient=True, disable=not console.is_terminal) as progress,
    ):
        task = progress.add_task("export", total=None)
        replies = client.stream(
            client.catalog.ExportCodes, pb.ExportCodesRequest(batch_id=batch_id),
            client.deadline(BULK_DEADLINE_SECONDS),
        )
        for code in exported_codes(replies):
            if count == 0 and fmt is ExportFormat.csv:
                # Written with the first code: a refused export leaves stdout empty.
                out.write("code\n")
            out.write(f"{json.dumps({'code': code})}\n" if fmt is ExportFormat.jsonl else f"{code}\n")
            count += 1
            if count % EXPORT_COUNT_STEP == 0:
                progress.update(task, completed=count)
    seconds = time.monotonic() - started
    console.print(f"exported {count:,} codes in {seconds:.2f} s ({_rate(count, seconds)})", markup=False)

