"""``ascribe experiments``: holdout experiments on a coupon code and what the code really adds (issue #17)."""

from __future__ import annotations

from typing import Annotated

import typer
from ascribe.attribution.v1 import attribution_pb2 as pb
from google.protobuf.timestamp_pb2 import Timestamp

from ascribe_cli.client import PAGE_SIZE, every_page
from ascribe_cli.common import END_HELP, FROM, START_HELP, TO, FormatOption, PageSizeOption, connect
from ascribe_cli.output import Format, write_list, write_one
from ascribe_cli.values import SegmentBy, enum_number

app = typer.Typer(
    help=(
        "Holdout experiments: a share of the code's visitors never sees it, so the lift it brings is measured. "
        "Results carry a fixed-horizon interval (valid when looked at once) and an always-valid one "
        "(valid however often you look)."
    ),
    no_args_is_help=True,
)

COLUMNS = ("id", "campaign_id", "coupon_code", "name", "holdout_percent", "status", "starts_at", "ends_at")

IdArgument = Annotated[str, typer.Argument(help="the experiment's id")]


@app.command()
def create(
    ctx: typer.Context,
    campaign_id: Annotated[str, typer.Option("--campaign", metavar="ID", help="the code's campaign")],
    coupon_code: Annotated[str, typer.Option("--code", help="the coupon code under test")],
    holdout_percent: Annotated[int, typer.Option("--holdout", min=1, max=50, help="percent of visitors in control")],
    name: Annotated[str, typer.Option(help="a name for people")] = "",
    starts_at: Annotated[
        Timestamp | None, typer.Option("--starts", parser=FROM, metavar="TIME", help=f"default now; {START_HELP}")
    ] = None,
    ends_at: Annotated[
        Timestamp | None, typer.Option("--ends", parser=TO, metavar="TIME", help=f"default: until stopped; {END_HELP}")
    ] = None,
    min_detectable_effect: Annotated[
        float, typer.Option("--mde", help="smallest absolute conversion-rate lift worth detecting (0.01: 1 point)")
    ] = 0.01,
    margin_percent: Annotated[
        float | None, typer.Option("--margin", help="gross margin on revenue, percent (for incremental profit)")
    ] = None,
    fmt: FormatOption = Format.table,
) -> None:
    """Start a holdout experiment on a code (one open experiment per code)."""
    experiment = pb.Experiment(
        campaign_id=campaign_id, coupon_code=coupon_code, name=name, holdout_percent=holdout_percent,
        min_detectable_effect=min_detectable_effect,
    )
    if starts_at is not None:
        experiment.starts_at.CopyFrom(starts_at)
    if ends_at is not None:
        experiment.ends_at.CopyFrom(ends_at)
    if margin_percent is not None:
        experiment.margin_percent = margin_percent
    with connect(ctx) as client:
        created = client.call(
            client.experiments.CreateExperiment, pb.CreateExperimentRequest(experiment=experiment)
        )
    write_one(created, fmt)


@app.command()
def show(ctx: typer.Context, experiment_id: IdArgument, fmt: FormatOption = Format.table) -> None:
    """Show one experiment."""
    with connect(ctx) as client:
        found = client.call(client.experiments.GetExperiment, pb.GetExperimentRequest(experiment_id=experiment_id))
    write_one(found, fmt)


@app.command("list")
def list_(
    ctx: typer.Context,
    campaign_id: Annotated[str, typer.Option("--campaign", metavar="ID", help="only this campaign's")] = "",
    fmt: FormatOption = Format.table,
    page_size: PageSizeOption = PAGE_SIZE,
) -> None:
    """List experiments, newest first (all pages)."""
    with connect(ctx) as client:

        def page(token: str) -> tuple[list[pb.Experiment], str]:
            reply = client.call(
                client.experiments.ListExperiments,
                pb.ListExperimentsRequest(campaign_id=campaign_id, page_size=page_size, page_token=token),
            )
            return list(reply.experiments), reply.next_page_token

        write_list(every_page(page), pb.Experiment.DESCRIPTOR, fmt, COLUMNS)


@app.command()
def stop(ctx: typer.Context, experiment_id: IdArgument, fmt: FormatOption = Format.table) -> None:
    """Stop an experiment: later clicks join no arm, later conversions do not count."""
    with connect(ctx) as client:
        stopped = client.call(client.experiments.StopExperiment, pb.StopExperimentRequest(experiment_id=experiment_id))
    write_one(stopped, fmt)


@app.command()
def result(
    ctx: typer.Context,
    experiment_id: IdArgument,
    segment_by: Annotated[
        SegmentBy | None, typer.Option("--segment-by", help="the lift per device, country or channel")
    ] = None,
    fmt: FormatOption = Format.table,
) -> None:
    """The result so far: arms, lifts with both intervals, readiness, segments."""
    request = pb.GetExperimentResultRequest(experiment_id=experiment_id)
    if segment_by is not None:
        request.segment_by = enum_number(segment_by)  # type: ignore[assignment]
    with connect(ctx) as client:
        answer = client.call(client.experiments.GetExperimentResult, request)
    write_one(answer, fmt)
