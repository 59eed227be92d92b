"""``ascribe webhooks``: partner postbacks and signed events, and their deliveries."""

from __future__ import annotations

from typing import Annotated

import typer
from ascribe.attribution.v1 import attribution_pb2 as pb
from google.protobuf.field_mask_pb2 import FieldMask

from ascribe_cli.client import PAGE_SIZE, every_page
from ascribe_cli.common import Changes, FormatOption, PageSizeOption, connect
from ascribe_cli.output import Format, write_list, write_one
from ascribe_cli.values import DeliveryState, WebhookKind

app = typer.Typer(help="Webhooks: partner postbacks and signed events (see the README).", no_args_is_help=True)

COLUMNS = ("id", "kind", "campaign_id", "affiliate_id", "url", "http_method", "events", "enabled")
DELIVERY_COLUMNS = ("id", "event", "state", "attempts", "last_status_code", "last_error", "created_at")

IdArgument = Annotated[str, typer.Argument(help="the webhook's id")]
EventsOption = Annotated[
    list[str] | None, typer.Option("--event", help="an event word, e.g. conversion.approved (repeat for more)")
]


@app.command()
def create(
    ctx: typer.Context,
    kind: Annotated[WebhookKind, typer.Option(help="partner_postback (a URL template) or events (signed JSON)")],
    url: Annotated[str, typer.Option(help="http(s) URL; a postback's may hold {macros}")],
    event: EventsOption = None,
    campaign_id: Annotated[str, typer.Option(help="only this campaign (required for postbacks)")] = "",
    affiliate_id: Annotated[str, typer.Option(help="only conversions credited to this affiliate")] = "",
    method: Annotated[str, typer.Option(help='"GET" or "POST" (default: GET for postbacks, POST for events)')] = "",
    description: Annotated[str, typer.Option(help="for people")] = "",
    fmt: FormatOption = Format.table,
) -> None:
    """Create a webhook; its secret is shown this once."""
    changes = Changes(pb.Webhook(
        url=url, events=event or [], campaign_id=campaign_id, affiliate_id=affiliate_id, http_method=method,
        description=description,
    ))
    changes.set("kind", kind)
    with connect(ctx) as client:
        created = client.call(client.catalog.CreateWebhook, pb.CreateWebhookRequest(webhook=changes.message))
    write_one(created, fmt)


@app.command()
def show(ctx: typer.Context, webhook_id: IdArgument, fmt: FormatOption = Format.table) -> None:
    """Show one webhook (without its secret)."""
    with connect(ctx) as client:
        webhook = client.call(client.catalog.GetWebhook, pb.GetWebhookRequest(webhook_id=webhook_id))
    write_one(webhook, fmt)


@app.command("list")
def list_(
    ctx: typer.Context,
    campaign_id: Annotated[str, typer.Option(help="only this campaign's")] = "",
    fmt: FormatOption = Format.table,
    page_size: PageSizeOption = PAGE_SIZE,
) -> None:
    """List webhooks (all pages)."""
    with connect(ctx) as client:

        def page(token: str) -> tuple[list[pb.Webhook], str]:
            reply = client.call(client.catalog.ListWebhooks, pb.ListWebhooksRequest(
                campaign_id=campaign_id, page_size=page_size, page_token=token))
            return list(reply.webhooks), reply.next_page_token

        write_list(every_page(page), pb.Webhook.DESCRIPTOR, fmt, COLUMNS)


@app.command()
def update(
    ctx: typer.Context,
    webhook_id: IdArgument,
    url: Annotated[str | None, typer.Option(help="a new URL")] = None,
    event: EventsOption = None,
    method: Annotated[str | None, typer.Option(help='"GET" or "POST"')] = None,
    enabled: Annotated[bool | None, typer.Option("--enabled/--disabled", help="turn it on (again) or off")] = None,
    description: Annotated[str | None, typer.Option(help="for people")] = None,
    fmt: FormatOption = Format.table,
) -> None:
    """Change the given fields of a webhook (--enabled turns one disabled after failures on again)."""
    changes = Changes(pb.Webhook(id=webhook_id))
    changes.set("url", url)
    changes.set("events", event)
    changes.set("http_method", method)
    changes.set("enabled", enabled)
    changes.set("description", description)
    changes.require_some()
    request = pb.UpdateWebhookRequest(webhook=changes.message, update_mask=FieldMask(paths=changes.paths))
    with connect(ctx) as client:
        updated = client.call(client.catalog.UpdateWebhook, request)
    write_one(updated, fmt)


@app.command()
def delete(ctx: typer.Context, webhook_id: IdArgument, fmt: FormatOption = Format.table) -> None:
    """Delete a webhook; its pending deliveries are cancelled."""
    with connect(ctx) as client:
        reply = client.call(client.catalog.DeleteWebhook, pb.DeleteWebhookRequest(webhook_id=webhook_id))
    write_one(reply, fmt)


@app.command("rotate-secret")
def rotate_secret(ctx: typer.Context, webhook_id: IdArgument, fmt: FormatOption = Format.table) -> None:
    """Replace the secret (shown this once); the old one still signs for 24 h."""
    with connect(ctx) as client:
        rotated = client.call(client.catalog.RotateWebhookSecret, pb.RotateWebhookSecretRequest(webhook_id=webhook_id))
    write_one(rotated, fmt)


@app.command()
def test(ctx: typer.Context, webhook_id: IdArgument, fmt: FormatOption = Format.table) -> None:
    """Send one test event; shows its delivery."""
    with connect(ctx) as client:
        delivery = client.call(client.catalog.TestWebhook, pb.TestWebhookRequest(webhook_id=webhook_id))
    write_one(delivery, fmt)


@app.command()
def deliveries(
    ctx: typer.Context,
    webhook_id: IdArgument,
    state: Annotated[DeliveryState | None, typer.Option(help="only deliveries in this state")] = None,
    fmt: FormatOption = Format.table,
    page_size: PageSizeOption = PAGE_SIZE,
) -> None:
    """List a webhook's deliveries, newest first (all pages)."""
    with connect(ctx) as client:

        filters = Changes(pb.ListDeliveriesRequest(webhook_id=webhook_id, page_size=page_size))
        filters.set("state", state)

        def page(token: str) -> tuple[list[pb.WebhookDelivery], str]:
            request = pb.ListDeliveriesRequest()
            request.CopyFrom(filters.message)
            request.page_token = token
            reply = client.call(client.catalog.ListDeliveries, request)
            return list(reply.deliveries), reply.next_page_token

        write_list(every_page(page), pb.WebhookDelivery.DESCRIPTOR, fmt, DELIVERY_COLUMNS)


@app.command()
def redeliver(ctx: typer.Context, delivery_id: Annotated[str, typer.Argument(help="the delivery's id")],
              fmt: FormatOption = Format.table) -> None:
    """Send a delivery again (same delivery id, a fresh retry schedule)."""
    with connect(ctx) as client:
        delivery = client.call(client.catalog.RedeliverDelivery, pb.RedeliverDeliveryRequest(delivery_id=delivery_id))
    write_one(delivery, fmt)
