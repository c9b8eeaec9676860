"""``edgefleet webhooks``: subscriptions, the delivery log, and checking a delivery's signature."""

from __future__ import annotations

import sys
import time
from typing import Annotated, Any

import typer
from rich.table import Table

from edgefleet.api import DEFAULT_SERVER, JsonFlag, ServerOpt, TokenOpt, call
from edgefleet.common import console, err_console, fail, literal, print_json

webhooks_app = typer.Typer(
    help="Webhook subscriptions for retraining pipelines (docs/webhooks.md).",
    no_args_is_help=True,
)


@webhooks_app.command("list")
def webhooks_list(
    server: ServerOpt = DEFAULT_SERVER, token: TokenOpt = "", json_out: JsonFlag = False
) -> None:
    """Active subscriptions."""
    hooks = call(server, token, "GET", "/v1/webhooks")
    if json_out:
        print_json(hooks)
        return
    table = Table("id", "url", "events", "model", "created")
    for h in hooks:
        table.add_row(
            literal(h["id"]),
            literal(h["url"]),
            literal(", ".join(h["events"])),
            literal(h["model"] or "any"),
            literal(h["created_at"]),
        )
    console.print(table)


def _thresholds(items: list[str]) -> dict[str, Any]:
    """``KEY=VALUE`` pairs as the thresholds object (numbers as numbers, lists comma-separated)."""
    found: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            fail(f"--threshold {item!r}: expected KEY=VALUE", 2)
        if key == "negative_kinds":
            found[key] = [v for v in value.split(",") if v]
            continue
        try:
            found[key] = int(value)
        except ValueError:
            try:
                found[key] = float(value)
            except ValueError:
                found[key] = value
    return found


@webhooks_app.command("add")
def webhooks_add(
    url: Annotated[str, typer.Argument(help="Receiver URL (http or https).")],
    event: Annotated[
        list[str], typer.Option("--event", help="Event kind (repeatable), e.g. rollout.halted.")
    ],
    model: Annotated[str | None, typer.Option(help="Only this model's events.")] = None,
    secret: Annotated[
        str | None,
        typer.Option(envvar="EDGEFLEET_WEBHOOK_SECRET", help="Signing secret (default: made up)."),
    ] = None,
    threshold: Annotated[
        list[str] | None,
        typer.Option(
            help="KEY=VALUE (repeatable): window_s, drift_metric, drift_over, accuracy_under,"
            " negative_feedback_rate_over, data_quality_rate_over, schedule_every_s, ..."
        ),
    ] = None,
    server: ServerOpt = DEFAULT_SERVER,
    token: TokenOpt = "",
    json_out: JsonFlag = False,
) -> None:
    """Subscribe a URL to events; prints the signing secret once."""
    body: dict[str, Any] = {"url": url, "events": event, "model": model, "secret": secret}
    if threshold:
        body["thresholds"] = _thresholds(threshold)
    created = call(server, token, "POST", "/v1/webhooks", json=body)
    if json_out:
        print_json(created)
        return
    console.print(f"webhook {literal(created['id'])}: {literal(created['url'])}")
    console.print(f"secret (shown once): [bold]{literal(created['secret'])}[/]")


@webhooks_app.command("remove")
def webhooks_remove(
    webhook_id: int,
    server: ServerOpt = DEFAULT_SERVER,
    token: TokenOpt = "",
    json_out: JsonFlag = False,
) -> None:
    """Remove a subscription; its pending deliveries are cancelled."""
    r = call(server, token, "DELETE", f"/v1/webhooks/{webhook_id}")
    if json_out:
        print_json(r)
        return
    console.print(
        f"removed webhook {literal(webhook_id)}"
        f" ({literal(r['cancelled_deliveries'])} pending deliveries cancelled)"
    )


@webhooks_app.command("deliveries")
def webhooks_deliveries(
    webhook_id: Annotated[int | None, typer.Option(help="Only this subscription's.")] = None,
    sink: Annotated[str | None, typer.Option(help="webhook or mlflow.")] = None,
    state: Annotated[
        str | None, typer.Option(help="pending, delivered, failed, cancelled or skipped.")
    ] = None,
    limit: Annotated[int, typer.Option(help="Newest this many.")] = 100,
    server: ServerOpt = DEFAULT_SERVER,
    token: TokenOpt = "",
    json_out: JsonFlag = False,
) -> None:
    """The delivery log, newest first: state, attempts and the last answer of each."""
    params = {"webhook_id": webhook_id, "sink": sink, "state": state, "limit": limit}
    rows = call(
        server,
        token,
        "GET",
        "/v1/webhooks/deliveries",
        params={k: v for k, v in params.items() if v is not None},
    )
    if json_out:
        print_json(rows)
        return
    table = Table("id", "delivery id", "to", "kind", "state", "attempts", "last answer")
    for d in rows:
        to = "mlflow" if d["sink"] == "mlflow" else f"webhook {d['webhook_id']}"
        answer = d["last_error"] or (f"HTTP {d['last_status']}" if d["last_status"] else "")
        table.add_row(
            literal(d["id"]),
            literal(d["delivery_id"]),
            literal(to),
            literal(d["kind"]),
            literal(d["state"]),
            literal(d["attempts"]),
            literal(answer),
        )
    console.print(table)


@webhooks_app.command("verify")
def webhooks_verify(
    secret: Annotated[
        str, typer.Option(envvar="EDGEFLEET_WEBHOOK_SECRET", help="The subscription's secret.")
    ],
    delivery_id: Annotated[str, typer.Option("--id", help="X-EdgeFleet-Delivery-Id.")],
    timestamp: Annotated[str, typer.Option(help="X-EdgeFleet-Timestamp.")],
    signature: Annotated[str, typer.Option(help="X-EdgeFleet-Signature.")],
    max_age_s: Annotated[
        float, typer.Option(help="Refuse a timestamp further from now than this (0: any).")
    ] = 300.0,
) -> None:
    """Check a delivery's signature, the body on standard input: exit 0 when it holds, 1 when
    it does not (for receivers written in shell)."""
    from firmware_bundles.webhook_signature import problem

    payload = sys.stdin.buffer.read()
    why = problem(
        secret, delivery_id, timestamp, payload, signature, now=time.time(), max_age_s=max_age_s
    )
    if why is not None:
        fail(why)
    err_console.print("signature ok", highlight=False)
