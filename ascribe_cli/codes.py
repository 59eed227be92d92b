"""``ascribe codes``: generate, import, export and hand out batches of codes.

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
from collections.abc import Iterator
from enum import StrEnum
from pathlib import Path
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

app = typer.Typer(help="Batches of codes: generated or imported, exported, handed out.", no_args_is_help=True)

# An imported file travels in pieces of this size (the server reads them in order).
IMPORT_PIECE_BYTES = 256 * 1024

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



@app.command("import")
def import_codes(
    ctx: typer.Context,
    campaign_id: Annotated[str, typer.Argument(help="the campaign the codes join")],
    path: Annotated[
        Path, typer.Argument(exists=True, dir_okay=False, readable=True, help="CSV with a header row: code, kind, ...")
    ],
    fmt: FormatOption = Format.table,
) -> None:
    """Import codes the shop already has (all or nothing); prints the new batch id and count.

    Columns are Coupon's field names (code required; kind, status,
    valid_from, valid_until, usage_limit, affiliate_ids, countries, ...; lists
    separated by ';'); a bad row is named by its line and column.
    """

    def pieces() -> Iterator[pb.ImportCodesRequest]:
        with path.open("rb") as file:
            first = True
            while piece := file.read(IMPORT_PIECE_BYTES):
                yield pb.ImportCodesRequest(campaign_id=campaign_id if first else "", csv=piece)
                first = False

    started = time.monotonic()
    with connect(ctx) as client:
        reply = client.upload(client.catalog.ImportCodes, pieces(), client.deadline(BULK_DEADLINE_SECONDS))
    seconds = time.monotonic() - started
    stderr_console().print(
        f"imported {reply.imported:,} codes in {seconds:.2f} s; batch {reply.batch_id}", markup=False
    )
    write_one(reply, fmt)


@app.command()
def assign(
    ctx: typer.Context,
    campaign_id: Annotated[str, typer.Argument(help="the batch's campaign")],
    batch_id: Annotated[str, typer.Argument(help="a batch of generate or import")],
    customer_id: Annotated[str | None, typer.Argument(help="who gets a code (or --customers, --affiliate(s))")] = None,
    customers: Annotated[
        Path | None,
        typer.Option(exists=True, dir_okay=False, help="a file of customer ids, one a line (a 'customer_id' header is skipped)"),
    ] = None,
    affiliate: Annotated[str | None, typer.Option(help="an affiliate that gets a code: its only affiliate")] = None,
    affiliates: Annotated[
        Path | None,
        typer.Option(exists=True, dir_okay=False, help="a file of affiliate ids, one a line (an 'affiliate_id' header is skipped)"),
    ] = None,
    fmt: FormatOption = Format.table,
) -> None:
    """Hand the next free code of a batch to a customer or an affiliate (who always gets the same code again).

    An affiliate's code names it as the code's only affiliate: a sale with
    the code and no click credits it. With --customers or --affiliates,
    every id of the file (its first column; a header is skipped) gets one:
    CSV lines ``customer_id,code`` or ``affiliate_id,code`` on stdout, in
    the file's order. A refused id stops
    the run (exit 1); running the file again hands out nothing twice.
    """
    chosen = [given for given in (customer_id, customers, affiliate, affiliates) if given is not None]
    if len(chosen) != 1 or chosen[0] == "":
        raise typer.BadParameter("give one CUSTOMER_ID, --customers FILE, --affiliate ID or --affiliates FILE")
    holder = "affiliate_id" if affiliate is not None or affiliates is not None else "customer_id"

    def request(holder_id: str) -> pb.AssignCodeRequest:
        return pb.AssignCodeRequest(campaign_id=campaign_id, batch_id=batch_id, **{holder: holder_id})

    with connect(ctx) as client:
        one = customer_id if customer_id is not None else affiliate
        if one is not None:
            write_one(client.call(client.catalog.AssignCode, request(one)), fmt)
            return
        path = customers if customers is not None else affiliates
        assert path is not None
        out = stdout()
        out.write(f"{holder},code\n")
        # a header row: the column's name, or "id" in the file `affiliates list --format csv` writes
        headers = {holder, "id"} if holder == "affiliate_id" else {holder}
        for line in path.read_text(encoding="utf-8-sig").splitlines():
            holder_id = line.split(",")[0].strip()
            if not holder_id or holder_id in headers:
                continue
            coupon = client.call(client.catalog.AssignCode, request(holder_id))
            out.write(f"{holder_id},{coupon.code}\n")
