"""The ``ascribe`` command: its groups, the root options and the exit codes.

Exit codes: 0 success; 1 a request the server refused or that failed
(NOT_FOUND, INVALID_ARGUMENT with one ``field: message`` line per violation,
UNAVAILABLE, ...), printed on stderr; 2 bad usage (typer's own, and values
the parsers refuse).
"""

from __future__ import annotations

import os
import sys
from typing import Annotated, Any

import typer
from typer.core import TyperGroup

from ascribe_cli import affiliates, campaigns, codes, conversions, coupons, experiments, report, webhooks
from ascribe_cli.client import DEFAULT_ADDR, RequestFailed, Tls
from ascribe_cli.common import Target

TOKEN_VARIABLE = "ASCRIBE_ADMIN_TOKEN"


class _Commands(TyperGroup):
    """The root group: a refused or failed request, from any command, is exit code 1."""

    def invoke(self, ctx: Any) -> Any:
        try:
            return super().invoke(ctx)
        except RequestFailed as failure:
            for line in failure.lines():
                print(line, file=sys.stderr)
            raise typer.Exit(1) from None


app = typer.Typer(
    cls=_Commands,
    name="ascribe",
    help=(
        "Manage ascribe over its gRPC API: campaigns, affiliates, coupon codes, generated batches "
        f"and conversions. The admin token is read from {TOKEN_VARIABLE}; with ASCRIBE_TLS_CA set "
        "(and ASCRIBE_TLS_CERT, ASCRIBE_TLS_KEY for mutual TLS) the connection uses TLS, as the services do."
    ),
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
    add_completion=False,
)
app.add_typer(campaigns.app, name="campaigns")
app.add_typer(affiliates.app, name="affiliates")
app.add_typer(coupons.app, name="coupons")
app.add_typer(codes.app, name="codes")
app.add_typer(conversions.app, name="conversions")
app.add_typer(experiments.app, name="experiments")
app.add_typer(webhooks.app, name="webhooks")
app.command("report")(report.report)


@app.callback()
def root(
    ctx: typer.Context,
    addr: Annotated[
        str, typer.Option(envvar="ASCRIBE_ATTRIBUTION_ADDR", help="host:port of the attribution service")
    ] = DEFAULT_ADDR,
    timeout: Annotated[
        float | None,
        typer.Option(min=0.001, help="seconds each call may take (default 30; 900 for codes generate and export)"),
    ] = None,
) -> None:
    try:
        tls = Tls.from_env(os.environ)
    except OSError as error:
        raise typer.BadParameter(f"cannot read {error.filename}: {error.strerror}", param_hint="ASCRIBE_TLS_*") from None
    ctx.obj = Target(addr=addr, token=os.environ.get(TOKEN_VARIABLE) or None, timeout=timeout, tls=tls)
